"""A participant's view of the coordinator over gRPC: a ``CoordinatorService`` client.

Failed calls come back as Conclave errors (see ``status``): refusals as
``RemoteProtocolError`` / ``InvalidUpdate`` with the coordinator's reason, connection trouble
(UNAVAILABLE, DEADLINE_EXCEEDED, ...) as ``TransportError``, always chained to the gRPC error.
"""

from __future__ import annotations

import logging
import math

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import grpc

from conclave.core.errors import RemoteProtocolError, TransportError
from conclave.core.types import (
    PROTOCOL_VERSION,
    Declined,
    Evaluation,
    HeartbeatReply,
    JoinReply,
    JoinRequest,
    SecAggStep,
    StageInput,
    TaskAssignment,
    Update,
    Verdict,
)
from conclave.transport.grpc import conclave_pb2_grpc as pb_grpc
from conclave.transport.grpc import serde, stage_serde
from conclave.transport.grpc.chunks import (
    DEFAULT_CHUNK_BYTES,
    default_stage_limit,
    message_limit,
)
from conclave.transport.grpc.status import SESSION_KEY, error_for_rpc

_log = logging.getLogger(__name__)


@contextmanager
def _translated(rpc: str) -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as exc:
        raise error_for_rpc(rpc, exc) from exc


class GrpcCoordinatorClient:
    """Calls a coordinator's gRPC server; implements ``CoordinatorService``.

    ``timeout_s`` bounds every call; ``fetch_task`` and ``fetch_stage`` get
    ``wait_s + timeout_s`` because the coordinator may hold them open for ``wait_s`` (a long
    poll). ``chunk_bytes`` must not exceed the server's (both default to 1 MiB).
    ``max_model_bytes`` and ``max_stage_bytes`` (default ``max_model_bytes * 2 + 1 MiB``) cap
    what this client accepts from the coordinator. ``protocol_version`` exists for
    compatibility tests.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 30.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_model_bytes: int = 2**31,
        max_stage_bytes: int | None = None,
        protocol_version: int = PROTOCOL_VERSION,
        stage_prefetch_s: float = 0.0,
    ) -> None:
        """``stage_prefetch_s``: how long a SubmitStage call may wait, once the upload is
        accepted, for the input of the participant's next step, which then comes back with
        the verdict and the next ``fetch_stage`` needs no call (one round trip less per step;
        0, the default, turns it off; ``conclave participant`` uses its long-poll wait)."""
        if timeout_s <= 0 or chunk_bytes <= 0:
            raise ValueError("timeout_s and chunk_bytes must be positive")
        if not (math.isfinite(stage_prefetch_s) and stage_prefetch_s >= 0):
            raise ValueError("stage_prefetch_s must be a finite number >= 0")
        self._prefetch_s = stage_prefetch_s
        self._prefetched: tuple[tuple[str, str, int, SecAggStep], StageInput] | None = None
        self._address = address
        self._timeout_s = timeout_s
        self._chunk_bytes = chunk_bytes
        self._max_model_bytes = max_model_bytes
        self._max_stage_bytes = (
            default_stage_limit(max_model_bytes) if max_stage_bytes is None else max_stage_bytes
        )
        self._version = protocol_version
        options = [
            ("grpc.max_receive_message_length", message_limit(chunk_bytes)),
            ("grpc.max_send_message_length", message_limit(chunk_bytes)),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._closed = False
        self._session = ""
        """The token the coordinator gave this process at its last Join (see ``SESSION_KEY``)."""

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return ((SESSION_KEY, self._session),) if self._session else ()

    def join(self, request: JoinRequest) -> JoinReply:
        with _translated("Join"):
            reply, call = self._stub.Join.with_call(serde.join_request_to_proto(request),
                                                    timeout=self._timeout_s)
        self._session = dict(call.initial_metadata() or ()).get(SESSION_KEY, "")
        return serde.join_reply_from_proto(reply)

    def heartbeat(
        self, run_id: str, participant: str, telemetry: Mapping[str, float]
    ) -> HeartbeatReply:
        request = serde.heartbeat_request_to_proto(run_id, participant, telemetry, self._version)
        with _translated("Heartbeat"):
            reply = self._stub.Heartbeat(request, timeout=self._timeout_s,
                                         metadata=self._metadata())
        return serde.heartbeat_reply_from_proto(reply)

    def fetch_task(self, run_id: str, participant: str, wait_s: float) -> TaskAssignment:
        wait_s = max(0.0, wait_s)
        request = serde.fetch_request_to_proto(run_id, participant, wait_s, self._version)
        with _translated("FetchTask"):
            stream = self._stub.FetchTask(request, timeout=wait_s + self._timeout_s,
                                          metadata=self._metadata())
            try:
                return serde.assignment_from_messages(stream, max_bytes=self._max_model_bytes)
            finally:
                stream.cancel()  # a no-op once the stream completed; frees it on errors

    def submit_update(self, update: Update) -> Verdict:
        messages = serde.update_messages(update, self._chunk_bytes, self._version)
        with _translated("SubmitUpdate"):
            reply = self._stub.SubmitUpdate(messages, timeout=self._timeout_s,
                                            metadata=self._metadata())
        return serde.verdict_from_proto(reply)

    def submit_evaluation(self, evaluation: Evaluation) -> Verdict:
        request = serde.evaluation_to_proto(evaluation, self._version)
        with _translated("SubmitEvaluation"):
            reply = self._stub.SubmitEvaluation(request, timeout=self._timeout_s,
                                                metadata=self._metadata())
        return serde.verdict_from_proto(reply)

    def decline_task(self, declined: Declined) -> Verdict:
        request = serde.declined_to_proto(declined, self._version)
        with _translated("DeclineTask"):
            reply = self._stub.DeclineTask(request, timeout=self._timeout_s,
                                           metadata=self._metadata())
        return serde.verdict_from_proto(reply)

    def fetch_stage(
        self, run_id: str, participant: str, round: int, step: SecAggStep, wait_s: float
    ) -> StageInput:
        ready, self._prefetched = self._prefetched, None
        if ready is not None and ready[0] == (run_id, participant, round, step):
            return ready[1]  # came back with the previous step's verdict
        wait_s = max(0.0, wait_s)
        request = stage_serde.fetch_stage_request_to_proto(
            run_id, participant, round, step, wait_s, self._version
        )
        with _translated("FetchStage"):
            stream = self._stub.FetchStage(request, timeout=wait_s + self._timeout_s,
                                           metadata=self._metadata())
            try:
                return stage_serde.stage_from_messages(stream, max_bytes=self._max_stage_bytes)
            finally:
                stream.cancel()  # a no-op once the stream completed; frees it on errors

    def submit_stage(
        self, run_id: str, participant: str, round: int, step: SecAggStep, payload: bytes
    ) -> Verdict:
        following = stage_serde.NEXT_STEP.get(step)
        wait = self._prefetch_s if following is not None else 0.0
        messages = stage_serde.stage_upload_messages(
            run_id, participant, round, step, payload, self._chunk_bytes, self._version,
            wait_next_s=wait,
        )
        with _translated("SubmitStage"):
            reply = self._stub.SubmitStage(messages, timeout=self._timeout_s + wait,
                                           metadata=self._metadata())
        verdict = serde.verdict_from_proto(reply)
        if following is not None:
            try:
                stage = stage_serde.next_stage_from_verdict(
                    reply, max_bytes=self._max_stage_bytes)
            except RemoteProtocolError as exc:  # the upload stands; fetch the input instead
                _log.warning("ignoring a malformed next-step input: %s", exc)
                stage = None
            if stage is not None:
                self._prefetched = ((run_id, participant, round, following), stage)
        return verdict

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> GrpcCoordinatorClient:
        if self._closed:
            raise TransportError(f"client for {self._address} is closed")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
