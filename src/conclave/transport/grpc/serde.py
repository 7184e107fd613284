"""The one place where protobuf messages become core types and back (with ``stage_serde``,
which does the same for the secure-aggregation stage RPCs).

Nothing outside ``conclave.transport.grpc`` sees a protobuf type: the server and the client
hand core values (``JoinRequest``, ``Update``, ``Parameters`` ...) to this module and get
messages back, and the other way round. Decoding checks the protocol version and the shape
of a stream (header first, then raw chunks) and raises ``RemoteProtocolError`` (or its
subclass ``InvalidUpdate`` for a bad upload); encoding our own values badly raises
``LocalProtocolError``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

from conclave.core.errors import InvalidUpdate, LocalProtocolError, RemoteProtocolError
from conclave.core.parameters import Layout, Parameters
from conclave.core.types import (
    PROTOCOL_VERSION,
    Config,
    Declined,
    Evaluation,
    HeartbeatReply,
    JoinReply,
    JoinRequest,
    Scalar,
    Task,
    TaskAssignment,
    TaskKind,
    Update,
    Verdict,
)
from conclave.transport.grpc import conclave_pb2 as pb
from conclave.transport.grpc.chunks import PayloadAssembler, iter_chunks

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

_KIND_TO_PROTO = {TaskKind.FIT: pb.TASK_KIND_FIT, TaskKind.EVALUATE: pb.TASK_KIND_EVALUATE}
_KIND_FROM_PROTO = {value: kind for kind, value in _KIND_TO_PROTO.items()}


class HeartbeatCall(NamedTuple):
    run_id: str
    participant: str
    telemetry: dict[str, float]


class FetchCall(NamedTuple):
    run_id: str
    participant: str
    wait_s: float


def check_version(version: int, *, peer: str, local: str) -> None:
    """Raise ``RemoteProtocolError`` naming both versions unless the peer speaks ours."""
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"protocol version mismatch: {peer} speaks version {version}, "
            f"{local} speaks version {PROTOCOL_VERSION}"
        )


# -- building blocks ---------------------------------------------------------------------


def _scalar_to_proto(key: str, value: Scalar) -> pb.ConfigValue:
    # bool first: bool is a subclass of int.
    if isinstance(value, bool):
        return pb.ConfigValue(bool_value=value)
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise LocalProtocolError(f"config {key!r} = {value} does not fit in 64 bits")
        return pb.ConfigValue(int_value=value)
    if isinstance(value, float):
        return pb.ConfigValue(double_value=value)
    if isinstance(value, str):
        return pb.ConfigValue(string_value=value)
    raise LocalProtocolError(
        f"config {key!r} has unsupported type {type(value).__name__}: use bool, int, float or str"
    )


def _scalar_from_proto(key: str, value: pb.ConfigValue) -> Scalar:
    which = value.WhichOneof("value")
    if which == "bool_value":
        return value.bool_value
    if which == "int_value":
        return value.int_value
    if which == "double_value":
        return value.double_value
    if which == "string_value":
        return value.string_value
    raise RemoteProtocolError(f"config {key!r} carries no value")


def config_to_proto(config: Config) -> dict[str, pb.ConfigValue]:
    return {key: _scalar_to_proto(key, value) for key, value in config.items()}


def config_from_proto(config: Mapping[str, pb.ConfigValue]) -> dict[str, Scalar]:
    return {key: _scalar_from_proto(key, value) for key, value in config.items()}


def layout_to_proto(layout: Layout) -> pb.ModelLayout:
    return pb.ModelLayout(
        arrays=[pb.ArrayLayout(name=name, shape=list(shape)) for name, shape in layout.entries]
    )


def layout_from_proto(layout: pb.ModelLayout) -> Layout:
    try:
        return Layout.of([(array.name, tuple(array.shape)) for array in layout.arrays])
    except ValueError as exc:
        raise InvalidUpdate(f"invalid model layout: {exc}") from exc


def _assemble(
    chunks: Iterable[pb.TaskMessage] | Iterable[pb.UpdateMessage],
    assembler: PayloadAssembler,
    error: type[RemoteProtocolError],
) -> Parameters:
    for message in chunks:
        if message.WhichOneof("part") != "chunk":
            raise error("expected a raw chunk after the header, got another header")
        assembler.add(message.chunk)
    return assembler.finish()


# -- Join, Heartbeat, Verdict, Evaluation ------------------------------------------------


def join_request_to_proto(request: JoinRequest) -> pb.JoinRequest:
    return pb.JoinRequest(
        protocol_version=request.protocol_version,
        participant=request.participant,
        capabilities=dict(request.capabilities),
    )


def join_request_from_proto(request: pb.JoinRequest) -> JoinRequest:
    return JoinRequest(
        participant=request.participant,
        protocol_version=request.protocol_version,
        capabilities=dict(request.capabilities),
    )


def join_reply_to_proto(reply: JoinReply) -> pb.JoinReply:
    return pb.JoinReply(
        protocol_version=PROTOCOL_VERSION,
        run_id=reply.run_id,
        heartbeat_interval_s=reply.heartbeat_interval_s,
        current_round=reply.current_round,
    )


def join_reply_from_proto(reply: pb.JoinReply) -> JoinReply:
    check_version(reply.protocol_version, peer="coordinator", local="this participant")
    return JoinReply(
        run_id=reply.run_id,
        heartbeat_interval_s=reply.heartbeat_interval_s,
        current_round=reply.current_round,
    )


def heartbeat_request_to_proto(
    run_id: str,
    participant: str,
    telemetry: Mapping[str, float],
    protocol_version: int = PROTOCOL_VERSION,
) -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(
        protocol_version=protocol_version,
        run_id=run_id,
        participant=participant,
        telemetry={key: float(value) for key, value in telemetry.items()},
    )


def heartbeat_request_from_proto(request: pb.HeartbeatRequest) -> HeartbeatCall:
    return HeartbeatCall(request.run_id, request.participant, dict(request.telemetry))


def heartbeat_reply_to_proto(reply: HeartbeatReply) -> pb.HeartbeatReply:
    return pb.HeartbeatReply(has_task=reply.has_task, run_finished=reply.run_finished)


def heartbeat_reply_from_proto(reply: pb.HeartbeatReply) -> HeartbeatReply:
    return HeartbeatReply(has_task=reply.has_task, run_finished=reply.run_finished)


def verdict_to_proto(verdict: Verdict) -> pb.Verdict:
    return pb.Verdict(accepted=verdict.accepted, reason=verdict.reason)


def verdict_from_proto(verdict: pb.Verdict) -> Verdict:
    return Verdict(accepted=verdict.accepted, reason=verdict.reason)


def evaluation_to_proto(
    evaluation: Evaluation, protocol_version: int = PROTOCOL_VERSION
) -> pb.EvaluationRequest:
    return pb.EvaluationRequest(
        protocol_version=protocol_version,
        run_id=evaluation.run_id,
        round=evaluation.round,
        participant=evaluation.participant,
        loss=evaluation.loss,
        num_examples=evaluation.num_examples,
        metrics={key: float(value) for key, value in evaluation.metrics.items()},
    )


def evaluation_from_proto(request: pb.EvaluationRequest) -> Evaluation:
    return Evaluation(
        run_id=request.run_id,
        round=request.round,
        participant=request.participant,
        loss=request.loss,
        num_examples=request.num_examples,
        metrics=dict(request.metrics),
    )


MAX_REASON_CHARS = 2000
"""A participant's reason for declining a task is cut to this length."""


def declined_to_proto(
    declined: Declined, protocol_version: int = PROTOCOL_VERSION
) -> pb.DeclineRequest:
    return pb.DeclineRequest(
        protocol_version=protocol_version,
        run_id=declined.run_id,
        round=declined.round,
        participant=declined.participant,
        kind=_KIND_TO_PROTO[declined.kind],
        reason=declined.reason,
    )


def declined_from_proto(request: pb.DeclineRequest) -> Declined:
    kind = _KIND_FROM_PROTO.get(request.kind)
    if kind is None:
        raise RemoteProtocolError(f"DeclineRequest has an unknown task kind {request.kind}")
    return Declined(run_id=request.run_id, round=request.round,
                    participant=request.participant, kind=kind,
                    reason=request.reason[:MAX_REASON_CHARS])


# -- FetchTask: one header, then the global model in chunks ------------------------------


def fetch_request_to_proto(
    run_id: str, participant: str, wait_s: float, protocol_version: int = PROTOCOL_VERSION
) -> pb.FetchTaskRequest:
    return pb.FetchTaskRequest(
        protocol_version=protocol_version, run_id=run_id, participant=participant, wait_s=wait_s
    )


def fetch_request_from_proto(request: pb.FetchTaskRequest) -> FetchCall:
    return FetchCall(request.run_id, request.participant, max(0.0, request.wait_s))


def _task_header(task: Task) -> pb.TaskHeader:
    parameters = task.parameters
    return pb.TaskHeader(
        protocol_version=PROTOCOL_VERSION,
        has_task=True,
        run_id=task.run_id,
        round=task.round,
        kind=_KIND_TO_PROTO[task.kind],
        config=config_to_proto(task.config),
        deadline_s=task.deadline_s,
        layout=layout_to_proto(parameters.layout),
        digest=task.digest or parameters.digest(),
        total_bytes=parameters.layout.nbytes,
    )


def task_messages(assignment: TaskAssignment, chunk_bytes: int) -> Iterator[pb.TaskMessage]:
    """The FetchTask reply stream. The header is built (and checked) before anything is sent."""
    task = assignment.task
    if task is None:
        header = pb.TaskHeader(
            protocol_version=PROTOCOL_VERSION, has_task=False, run_finished=assignment.run_finished
        )
        return iter([pb.TaskMessage(header=header)])
    header = _task_header(task)
    header.run_finished = assignment.run_finished
    return _task_stream(pb.TaskMessage(header=header), task.parameters, chunk_bytes)


def _task_stream(
    first: pb.TaskMessage, parameters: Parameters, chunk_bytes: int
) -> Iterator[pb.TaskMessage]:
    yield first
    for chunk in iter_chunks(parameters, chunk_bytes):
        yield pb.TaskMessage(chunk=chunk)


def assignment_from_messages(
    messages: Iterator[pb.TaskMessage], *, max_bytes: int
) -> TaskAssignment:
    """Read a FetchTask reply stream back into a ``TaskAssignment`` (client side)."""
    first = next(messages, None)
    if first is None or first.WhichOneof("part") != "header":
        raise RemoteProtocolError("task stream does not start with a header")
    header = first.header
    check_version(header.protocol_version, peer="coordinator", local="this participant")
    if not header.has_task:
        return TaskAssignment(task=None, run_finished=header.run_finished)
    kind = _KIND_FROM_PROTO.get(header.kind)
    if kind is None:
        raise RemoteProtocolError(f"task has unknown kind {header.kind}")
    try:
        layout = layout_from_proto(header.layout)
    except InvalidUpdate as exc:
        raise RemoteProtocolError(f"task carries {exc}") from exc
    assembler = PayloadAssembler(
        layout, digest=header.digest, total_bytes=header.total_bytes, max_bytes=max_bytes
    )
    parameters = _assemble(messages, assembler, RemoteProtocolError)
    task = Task(
        run_id=header.run_id,
        round=header.round,
        kind=kind,
        config=config_from_proto(header.config),
        parameters=parameters,
        deadline_s=header.deadline_s,
    )
    return TaskAssignment(task=task, run_finished=header.run_finished)


# -- SubmitUpdate: one header, then the trained model in chunks --------------------------


def update_messages(
    update: Update, chunk_bytes: int, protocol_version: int = PROTOCOL_VERSION
) -> Iterator[pb.UpdateMessage]:
    """The SubmitUpdate request stream (client side).

    The header (and the digest) is built before this returns, so encoding errors surface
    in the caller instead of inside gRPC's request-consuming thread.
    """
    parameters = update.parameters
    header = pb.UpdateHeader(
        protocol_version=protocol_version,
        run_id=update.run_id,
        round=update.round,
        participant=update.participant,
        num_examples=update.num_examples,
        metrics={key: float(value) for key, value in update.metrics.items()},
        layout=layout_to_proto(parameters.layout),
        # The sender's digest when it has one; the server checks it against the bytes.
        digest=update.digest or parameters.digest(),
        total_bytes=parameters.layout.nbytes,
        train_seconds=update.train_seconds,
    )
    return _update_stream(pb.UpdateMessage(header=header), parameters, chunk_bytes)


def _update_stream(
    first: pb.UpdateMessage, parameters: Parameters, chunk_bytes: int
) -> Iterator[pb.UpdateMessage]:
    yield first
    for chunk in iter_chunks(parameters, chunk_bytes):
        yield pb.UpdateMessage(chunk=chunk)


def update_from_messages(messages: Iterator[pb.UpdateMessage], *, max_bytes: int) -> Update:
    """Read a SubmitUpdate stream into an ``Update`` (server side).

    The header is checked (version, layout, size limit) before any buffer is allocated; the
    buffer is exactly the layout's size and the digest must match before this returns, so
    the returned ``Update.digest`` is verified and the coordinator need not recompute it.
    """
    first = next(messages, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidUpdate("update stream does not start with a header")
    header = first.header
    check_version(header.protocol_version, peer="participant", local="this coordinator")
    layout = layout_from_proto(header.layout)
    assembler = PayloadAssembler(
        layout,
        digest=header.digest,
        total_bytes=header.total_bytes,
        max_bytes=max_bytes,
        error=InvalidUpdate,
    )
    parameters = _assemble(messages, assembler, InvalidUpdate)
    return Update(
        run_id=header.run_id,
        round=header.round,
        participant=header.participant,
        num_examples=header.num_examples,
        parameters=parameters,
        metrics=dict(header.metrics),
        train_seconds=header.train_seconds,
        digest=header.digest,  # verified by the assembler
    )
