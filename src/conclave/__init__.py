"""Conclave: federated learning orchestration.

Raw data never leaves a participant; a coordinator runs rounds of select, configure,
collect, aggregate and commit, and records every step in a durable ledger.
"""

import logging

from conclave.core.errors import ConclaveError
from conclave.core.parameters import Layout, Parameters
from conclave.core.ports import Trainer
from conclave.core.types import EvaluateResult, FitResult, TrainerContext

__all__ = [
    "ConclaveError",
    "EvaluateResult",
    "FitResult",
    "Layout",
    "Parameters",
    "Trainer",
    "TrainerContext",
]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
