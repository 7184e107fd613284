"""Rules every ledger adapter applies the same way: round transitions and checkpoint names."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from conclave.core.errors import LedgerError
from conclave.core.records import RoundRecord
from conclave.core.types import RoundStatus, TaskKind

_KIND_ORDER = {TaskKind.FIT: 0, TaskKind.EVALUATE: 1}
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def round_label(run_id: str, round: int, kind: TaskKind) -> str:
    return f"{kind.value} round {round} of run {run_id!r}"


def round_sort_key(record: RoundRecord) -> tuple[int, int]:
    """Rounds are listed by number, the FIT round before the EVALUATE round of one number."""
    return record.round, _KIND_ORDER[record.kind]


def check_startable(existing: RoundRecord | None, record: RoundRecord) -> None:
    """A round may be (re)started unless it was already committed.

    Restarting a RUNNING or FAILED round replaces its record: that is what a coordinator
    resuming after a crash does with the round it was in the middle of.
    """
    if record.status is not RoundStatus.RUNNING:
        raise LedgerError(
            f"cannot start {round_label(record.run_id, record.round, record.kind)} "
            f"with status {record.status.value}; a started round is running"
        )
    if existing is not None and existing.status is RoundStatus.COMMITTED:
        raise LedgerError(
            f"{round_label(record.run_id, record.round, record.kind)} is already committed"
        )


def check_finishable(
    existing: RoundRecord | None, run_id: str, round: int, kind: TaskKind, status: RoundStatus
) -> RoundRecord:
    """Return the running round that ``finish_round`` may close, or raise ``LedgerError``."""
    label = round_label(run_id, round, kind)
    if status is RoundStatus.RUNNING:
        raise LedgerError(f"cannot finish {label} with status running")
    if existing is None:
        raise LedgerError(f"{label} was never started")
    if existing.status is not RoundStatus.RUNNING:
        raise LedgerError(f"{label} is already {existing.status.value}")
    return existing


def check_committable(existing: RoundRecord | None, run_id: str, round: int) -> RoundRecord:
    """Return the running FIT round that ``commit_round`` may commit, or raise."""
    return check_finishable(existing, run_id, round, TaskKind.FIT, RoundStatus.COMMITTED)


def checkpoint_relpath(run_id: str, round: int) -> PurePosixPath:
    """Where a round's checkpoint lives, relative to the state directory.

    The run id is percent-encoded so that any id (slashes, dots, spaces) maps to one safe
    folder name inside ``checkpoints/``.
    """
    folder = _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), run_id)
    return PurePosixPath("checkpoints", folder or "%", f"round-{round:05d}.ckpt")
