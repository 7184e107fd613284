"""Conclave errors <-> gRPC status codes, in one table used by both ends of the wire.

The server turns an exception into a status code, a message and the error's class name
(sent as trailing metadata, so ``InvalidUpdate`` and ``RemoteProtocolError`` survive the trip
exactly). The client turns a failed call back into a Conclave error. Anything the table does
not know becomes INTERNAL with a generic message on the server (the details stay in the
coordinator's log), and connection trouble becomes ``TransportError`` on the client.
"""

from __future__ import annotations

from typing import NamedTuple

import grpc

from conclave.core.errors import (
    ConclaveError,
    ConfigError,
    InvalidUpdate,
    RemoteProtocolError,
    TransportError,
)

ERROR_CLASS_KEY = "conclave-error"
"""Trailing-metadata key naming the Conclave error class behind a failed call."""

SESSION_KEY = "conclave-session"
"""Metadata key of the token a Join hands to the joining process; the process sends it with
every later call, so a process that another one (same name, new Join) replaced is told so."""

INTERNAL_DETAILS = "internal error in the coordinator (details are in its log)"

# Server side: the first row whose class matches wins, so subclasses come before bases.
_TO_STATUS: tuple[tuple[type[ConclaveError], grpc.StatusCode], ...] = (
    (InvalidUpdate, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (RemoteProtocolError, grpc.StatusCode.FAILED_PRECONDITION),
    (TransportError, grpc.StatusCode.RESOURCE_EXHAUSTED),  # busy: the caller backs off
)

# Client side: error classes rebuilt exactly from the metadata (they take one message).
_BY_NAME: dict[str, type[RemoteProtocolError]] = {
    "InvalidUpdate": InvalidUpdate,
    "RemoteProtocolError": RemoteProtocolError,
}

# Client side, without (known) metadata: the coordinator refused the request's content.
_REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)


class Status(NamedTuple):
    code: grpc.StatusCode
    details: str
    error_class: str


def status_for(exc: BaseException) -> Status | None:
    """The status to send for ``exc``, or None when it is not an expected refusal."""
    for error_type, code in _TO_STATUS:
        if isinstance(exc, error_type):
            return Status(code, str(exc), type(exc).__name__)
    return None


def error_for(
    rpc: str, code: grpc.StatusCode | None, details: str | None, error_class: str | None
) -> ConclaveError:
    """The Conclave error a participant raises for a call that failed with ``code``."""
    message = details or ""
    if error_class in _BY_NAME and code in _REFUSALS:
        return _BY_NAME[error_class](message)
    if code in _REFUSALS:
        return RemoteProtocolError(f"{rpc} refused ({_name(code)}): {message}")
    return TransportError(f"{rpc} failed ({_name(code)}): {message}")


def error_for_rpc(rpc: str, exc: grpc.RpcError) -> ConclaveError:
    """Like ``error_for``, reading code, details and metadata from a failed call."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    error_class = None
    if isinstance(exc, grpc.Call):
        for key, value in exc.trailing_metadata() or ():
            if key == ERROR_CLASS_KEY:
                error_class = value if isinstance(value, str) else value.decode()
    return error_for(rpc, code, details, error_class)


def _name(code: grpc.StatusCode | None) -> str:
    return "no status" if code is None else code.name
