"""Protobuf <-> core types for the secure-aggregation stage RPCs (FetchStage, SubmitStage).

The companion of ``serde`` (which holds the shared building blocks): the only other module
that touches protobuf types. Stage payloads are opaque bytes; both directions send a header
(protocol version, declared size) and then the payload as raw chunks. ``has_payload`` keeps
"nothing yet" (``None``) apart from an empty payload (``b""``). Decoding refuses a size over
the limit before keeping anything, and overflow or underflow of the declared size; a bad
upload raises ``InvalidUpdate``, a bad reply from the coordinator ``RemoteProtocolError``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from conclave.core.errors import InvalidUpdate, RemoteProtocolError
from conclave.core.types import PROTOCOL_VERSION, SecAggStep, StageInput
from conclave.transport.grpc import conclave_pb2 as pb
from conclave.transport.grpc.chunks import BytesAssembler, iter_byte_chunks
from conclave.transport.grpc.serde import check_version

_STEP_TO_PROTO = {
    SecAggStep.SETUP: pb.SEC_AGG_STEP_SETUP,
    SecAggStep.ADVERTISE: pb.SEC_AGG_STEP_ADVERTISE,
    SecAggStep.SHARE: pb.SEC_AGG_STEP_SHARE,
    SecAggStep.MASKED_INPUT: pb.SEC_AGG_STEP_MASKED_INPUT,
    SecAggStep.UNMASK: pb.SEC_AGG_STEP_UNMASK,
}
_STEP_FROM_PROTO = {value: step for step, value in _STEP_TO_PROTO.items()}


class StageFetchCall(NamedTuple):
    run_id: str
    participant: str
    round: int
    step: SecAggStep
    wait_s: float


class StageSubmission(NamedTuple):
    run_id: str
    participant: str
    round: int
    step: SecAggStep
    payload: bytes
    wait_next_s: float = 0.0


NEXT_STEP: dict[SecAggStep, SecAggStep] = {
    SecAggStep.ADVERTISE: SecAggStep.SHARE,
    SecAggStep.SHARE: SecAggStep.MASKED_INPUT,
    SecAggStep.MASKED_INPUT: SecAggStep.UNMASK,
}
"""The step whose input a participant fetches after submitting each step."""


def step_to_proto(step: SecAggStep) -> pb.SecAggStep.ValueType:
    return _STEP_TO_PROTO[step]


def step_from_proto(
    value: pb.SecAggStep.ValueType, error: type[RemoteProtocolError] = RemoteProtocolError
) -> SecAggStep:
    """The core step for a wire value; ``error`` for UNSPECIFIED (unset) or unknown values."""
    step = _STEP_FROM_PROTO.get(value)
    if step is not None:
        return step
    if value == pb.SEC_AGG_STEP_UNSPECIFIED:
        raise error("secure-aggregation step is unspecified (SEC_AGG_STEP_UNSPECIFIED)")
    raise error(f"unknown secure-aggregation step {value}")


def _assemble(
    messages: Iterable[pb.StageMessage] | Iterable[pb.StageUploadMessage],
    assembler: BytesAssembler,
    error: type[RemoteProtocolError],
) -> bytes:
    for message in messages:
        if message.WhichOneof("part") != "chunk":
            raise error("expected a raw chunk after the header, got another header")
        assembler.add(message.chunk)
    return assembler.finish()


# -- FetchStage: request, then one StageHeader and the payload in chunks -----------------


def fetch_stage_request_to_proto(
    run_id: str,
    participant: str,
    round: int,
    step: SecAggStep,
    wait_s: float,
    protocol_version: int = PROTOCOL_VERSION,
) -> pb.FetchStageRequest:
    return pb.FetchStageRequest(
        protocol_version=protocol_version,
        run_id=run_id,
        round=round,
        participant=participant,
        step=step_to_proto(step),
        wait_s=wait_s,
    )


def fetch_stage_request_from_proto(request: pb.FetchStageRequest) -> StageFetchCall:
    """Decode a FetchStage request (server side; the version is checked by the caller)."""
    step = step_from_proto(request.step)
    return StageFetchCall(
        request.run_id, request.participant, request.round, step, max(0.0, request.wait_s)
    )


def _stage_header(stage: StageInput) -> pb.StageHeader:
    payload = stage.payload
    return pb.StageHeader(
        protocol_version=PROTOCOL_VERSION,
        has_payload=payload is not None,
        aborted=stage.aborted,
        reason=stage.reason,
        total_bytes=0 if payload is None else len(payload),
    )


def stage_messages(stage: StageInput, chunk_bytes: int) -> Iterator[pb.StageMessage]:
    """The FetchStage reply stream. The header is built before anything is sent."""
    payload = stage.payload
    header = _stage_header(stage)
    chunks = iter_byte_chunks(b"" if payload is None else payload, chunk_bytes)
    return _stage_stream(pb.StageMessage(header=header), chunks)


def _stage_stream(first: pb.StageMessage, chunks: Iterator[bytes]) -> Iterator[pb.StageMessage]:
    yield first
    for chunk in chunks:
        yield pb.StageMessage(chunk=chunk)


def stage_from_messages(messages: Iterator[pb.StageMessage], *, max_bytes: int) -> StageInput:
    """Read a FetchStage reply stream back into a ``StageInput`` (client side)."""
    first = next(messages, None)
    if first is None or first.WhichOneof("part") != "header":
        raise RemoteProtocolError("stage stream does not start with a header")
    header = first.header
    check_version(header.protocol_version, peer="coordinator", local="this participant")
    if header.has_payload:
        assembler = BytesAssembler(total_bytes=header.total_bytes, max_bytes=max_bytes)
        payload: bytes | None = _assemble(messages, assembler, RemoteProtocolError)
    else:
        if header.total_bytes:
            raise RemoteProtocolError(
                f"stage header announces {header.total_bytes} bytes but no payload"
            )
        payload = None
        if next(messages, None) is not None:
            raise RemoteProtocolError("stage stream without a payload carries chunks")
    return StageInput(payload=payload, aborted=header.aborted, reason=header.reason)


def attach_next_stage(verdict: pb.Verdict, stage: StageInput) -> pb.Verdict:
    """Put the next step's input into a SubmitStage reply (server side)."""
    verdict.next.CopyFrom(_stage_header(stage))
    if stage.payload:
        verdict.next_payload = stage.payload
    return verdict


def next_stage_from_verdict(verdict: pb.Verdict, *, max_bytes: int) -> StageInput | None:
    """The next step's input carried by a SubmitStage reply, or None (client side)."""
    if not verdict.HasField("next"):
        return None
    header = verdict.next
    check_version(header.protocol_version, peer="coordinator", local="this participant")
    data = verdict.next_payload
    if not header.has_payload:
        if header.total_bytes or data:
            raise RemoteProtocolError("next-step input without a payload carries bytes")
        return StageInput(payload=None, aborted=header.aborted, reason=header.reason)
    if header.total_bytes != len(data) or len(data) > max_bytes:
        raise RemoteProtocolError(
            f"next-step input announces {header.total_bytes} bytes, carries {len(data)} "
            f"(limit {max_bytes})")
    return StageInput(payload=bytes(data), aborted=header.aborted, reason=header.reason)


# -- SubmitStage: one StageUploadHeader, then the payload in chunks ----------------------


def stage_upload_messages(
    run_id: str,
    participant: str,
    round: int,
    step: SecAggStep,
    payload: bytes,
    chunk_bytes: int,
    protocol_version: int = PROTOCOL_VERSION,
    *,
    wait_next_s: float = 0.0,
) -> Iterator[pb.StageUploadMessage]:
    """The SubmitStage request stream (client side); the header is built before this returns."""
    header = pb.StageUploadHeader(
        protocol_version=protocol_version,
        run_id=run_id,
        round=round,
        participant=participant,
        step=step_to_proto(step),
        total_bytes=len(payload),
        wait_next_s=wait_next_s,
    )
    chunks = iter_byte_chunks(payload, chunk_bytes)
    return _upload_stream(pb.StageUploadMessage(header=header), chunks)


def _upload_stream(
    first: pb.StageUploadMessage, chunks: Iterator[bytes]
) -> Iterator[pb.StageUploadMessage]:
    yield first
    for chunk in chunks:
        yield pb.StageUploadMessage(chunk=chunk)


def stage_submission_from_messages(
    messages: Iterator[pb.StageUploadMessage], *, max_bytes: int
) -> StageSubmission:
    """Read a SubmitStage stream (server side).

    The header is checked (version, step, size limit) before any chunk is kept, and the
    payload must be exactly the declared size before this returns.
    """
    first = next(messages, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidUpdate("stage upload does not start with a header")
    header = first.header
    check_version(header.protocol_version, peer="participant", local="this coordinator")
    step = step_from_proto(header.step, InvalidUpdate)
    assembler = BytesAssembler(
        total_bytes=header.total_bytes, max_bytes=max_bytes, error=InvalidUpdate
    )
    payload = _assemble(messages, assembler, InvalidUpdate)
    wait = header.wait_next_s if math.isfinite(header.wait_next_s) else 0.0
    return StageSubmission(header.run_id, header.participant, header.round, step, payload,
                           max(0.0, wait))
