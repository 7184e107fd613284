"""Ledger adapters: the coordinator's durable record of runs, rounds and checkpoints.

``MemoryLedger`` keeps everything in process memory (tests, simulations without a state
directory); ``SqliteLedger`` keeps a SQLite database in WAL mode plus checkpoint files in a
state directory. Both implement ``conclave.core.ports.Ledger``.
"""

from conclave.ledger.checkpoint_file import (
    decode_checkpoint,
    encode_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from conclave.ledger.memory import MemoryLedger
from conclave.ledger.sqlite import SqliteLedger

__all__ = [
    "MemoryLedger",
    "SqliteLedger",
    "decode_checkpoint",
    "encode_checkpoint",
    "read_checkpoint",
    "write_checkpoint",
]
