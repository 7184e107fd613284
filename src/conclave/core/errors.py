"""One error tree for all of Conclave.

Errors are raised, never returned as strings. Adapters map foreign exceptions onto this tree
once, at their boundary (``raise TransportError(...) from exc``).
"""

from __future__ import annotations


class ConclaveError(Exception):
    """Root of every error Conclave raises on purpose."""


class ConfigError(ConclaveError):
    """A run spec or command-line option is invalid.

    The message names the field, the value given and what is allowed.
    """

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid {field} = {value!r}: {allowed}")


class ProtocolError(ConclaveError):
    """A step of a protocol was taken out of order or with bad content."""


class LocalProtocolError(ProtocolError):
    """We misused a protocol machine (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something the protocol does not allow (stale round, unknown run, ...)."""


class InvalidUpdate(RemoteProtocolError):
    """An update was rejected: wrong shapes, NaN/Inf values, bad example count."""


class AggregationError(ConclaveError):
    """Aggregation cannot produce a result (for example: no accepted contributions)."""


class QuorumNotReached(AggregationError):
    """Fewer contributions than the configured minimum arrived before the deadline."""


class PrivacyBudgetExceeded(ConclaveError):
    """The privacy accountant says the run's epsilon budget is spent."""


class LedgerError(ConclaveError):
    """The ledger could not record or read something."""


class CheckpointCorrupted(LedgerError):
    """A checkpoint file does not match the digest recorded for it."""


class TransportError(ConclaveError):
    """A message could not be delivered or decoded."""


class TrainerError(ConclaveError):
    """User trainer code failed or returned something malformed."""
