"""Exposes a ``CoordinatorService`` as the ``conclave.v1.Coordinator`` gRPC service.

The servicer is thin: check the protocol version, decode (``serde``), call the service,
encode. Every exception is translated in one place (``status``): expected refusals become
their status code, anything else is logged here and answered with a generic INTERNAL, so a
failing service never takes the server down. Uploads (models and secure-aggregation stage
payloads) are assembled only after the header passed its checks (version, size limit), and
the service sees one only once every announced byte arrived (and a model's digest matched);
an upload the participant abandons never reaches it.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn, TypeVar

import grpc

from conclave.core.errors import (
    ConclaveError,
    LocalProtocolError,
    RemoteProtocolError,
    TransportError,
)
from conclave.core.ports import CoordinatorService
from conclave.core.types import SecAggStep, StageInput
from conclave.transport.grpc import conclave_pb2 as pb
from conclave.transport.grpc import conclave_pb2_grpc as pb_grpc
from conclave.transport.grpc import serde, stage_serde
from conclave.transport.grpc.chunks import (
    DEFAULT_CHUNK_BYTES,
    default_stage_limit,
    message_limit,
)
from conclave.transport.grpc.status import (
    ERROR_CLASS_KEY,
    INTERNAL_DETAILS,
    SESSION_KEY,
    status_for,
)

_log = logging.getLogger(__name__)

_R = TypeVar("_R")

MAX_LONG_POLL_S = 30.0
"""A long poll (FetchTask, FetchStage) waits at most this long, whatever the caller asked."""
_POLL_SLICE_S = 1.0
"""A long poll checks this often whether its caller is still there."""
_SHORT_CALL_WORKERS = 16
"""Worker threads long polls may never take: Join, Heartbeat and uploads always find one."""
_POLLS_PER_PARTICIPANT = 4
"""Long polls one participant name may hold at once (an honest one holds one), so no single
caller can take every long-poll slot from the others."""


def _server_options(chunk_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", message_limit(chunk_bytes)),
        ("grpc.max_send_message_length", message_limit(chunk_bytes)),
        ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def _abort(context: grpc.ServicerContext, rpc: str, exc: Exception) -> NoReturn:
    """Answer the call with the status for ``exc``; call only from an ``except`` block."""
    status = status_for(exc)
    if status is None:
        _log.exception("%s failed inside the coordinator", rpc)
        context.abort(grpc.StatusCode.INTERNAL, INTERNAL_DETAILS)
        raise AssertionError("unreachable")  # context.abort always raises
    _log.info("%s refused (%s): %s", rpc, status.code.name, status.details)
    context.set_trailing_metadata(((ERROR_CLASS_KEY, status.error_class),))
    context.abort(status.code, status.details)
    raise AssertionError("unreachable")


def _guarded(context: grpc.ServicerContext, rpc: str, call: Callable[[], _R]) -> _R:
    try:
        return call()
    except Exception as exc:  # the one boundary where every error is translated
        _abort(context, rpc, exc)


def _received(context: grpc.ServicerContext, rpc: str, read: Callable[[], _R]) -> _R:
    """Read a client-streamed upload; a bad one is refused, an abandoned one answers nobody."""
    try:
        return read()
    except grpc.RpcError:
        # The participant cancelled or disconnected mid-upload: nothing reaches the
        # service. gRPC knows this error as its own and answers nobody.
        _log.info("%s abandoned by the participant before it completed", rpc)
        raise
    except Exception as exc:
        if not context.is_active():
            # A cancelled stream can also just end early; it is still no refusal.
            _log.info("%s abandoned by the participant before it completed", rpc)
            context.abort(grpc.StatusCode.CANCELLED, "upload abandoned")
        _abort(context, rpc, exc)


def _check(version: int) -> None:
    serde.check_version(version, peer="participant", local="this coordinator")


class _Servicer(pb_grpc.CoordinatorServicer):
    def __init__(
        self,
        service: CoordinatorService,
        *,
        max_model_bytes: int,
        max_stage_bytes: int,
        chunk_bytes: int,
        long_poll_slots: int,
    ) -> None:
        self._service = service
        self._max_model_bytes = max_model_bytes
        self._max_stage_bytes = max_stage_bytes
        self._chunk_bytes = chunk_bytes
        self._poll_slots = threading.BoundedSemaphore(long_poll_slots)
        self._slot_count = long_poll_slots
        self._polls_lock = threading.Lock()
        self._polls_by: dict[str, int] = {}
        self._sessions: dict[str, str] = {}
        """Participant name -> the token of the process that joined under it last."""

    def _check_session(self, context: grpc.ServicerContext, participant: str) -> None:
        """Only the process that joined last under a name may act as that participant: one
        that another process replaced (a restart elsewhere, a duplicate that waited its turn)
        is told so instead of working on alongside it."""
        expected = self._sessions.get(participant)
        if expected is None:
            return
        got = dict(context.invocation_metadata()).get(SESSION_KEY, "")
        if got != expected:
            raise RemoteProtocolError(
                f"participant {participant!r} has joined again from another process, which "
                "replaced this one; stop this process (or restart it once the other is gone)"
            )

    def _long_poll(self, context: grpc.ServicerContext, participant: str, wait_s: float,
                   poll: Callable[[float], _R], ready: Callable[[_R], bool]) -> _R:
        """Wait up to ``wait_s`` (capped at MAX_LONG_POLL_S) for ``ready(poll(...))``, in
        slices, giving up as soon as the caller cancels or disconnects. Long polls hold a
        worker thread each, so only so many may wait at once; one more is refused as busy
        (RESOURCE_EXHAUSTED: the participant backs off and retries), never queued in front
        of heartbeats."""
        with self._polls_lock:
            held = self._polls_by.get(participant, 0)
            if held >= _POLLS_PER_PARTICIPANT:
                raise TransportError(
                    f"coordinator busy: {participant!r} already has {held} waiting calls"
                )
            if not self._poll_slots.acquire(blocking=False):
                raise TransportError(
                    f"coordinator busy: {self._slot_count} calls are already waiting; retry later"
                )
            self._polls_by[participant] = held + 1
        try:
            budget = min(wait_s, MAX_LONG_POLL_S) if math.isfinite(wait_s) and wait_s > 0 else 0.0
            end = time.monotonic() + budget
            remaining = budget
            while True:
                result = poll(min(_POLL_SLICE_S, remaining))
                remaining = end - time.monotonic()
                if ready(result) or remaining <= 0 or not context.is_active():
                    return result
        finally:
            with self._polls_lock:
                left = self._polls_by[participant] - 1
                if left:
                    self._polls_by[participant] = left
                else:
                    del self._polls_by[participant]
            self._poll_slots.release()

    def _reading(self, read: Callable[[], _R]) -> _R:
        """Read an upload's stream while holding one of the long-poll slots: a client that
        starts uploads and stalls them holds worker threads as a long poll does, so uploads
        share that pool and can never take the workers Join and Heartbeat rely on. Over the
        limit, the upload is refused as busy (the participant backs off and sends it again)."""
        if not self._poll_slots.acquire(blocking=False):
            raise TransportError(
                f"coordinator busy: {self._slot_count} calls already hold its workers; "
                "retry later")
        try:
            return read()
        finally:
            self._poll_slots.release()

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        def call() -> pb.JoinReply:
            _check(request.protocol_version)
            reply = self._service.join(serde.join_request_from_proto(request))
            token = secrets.token_hex(16)
            self._sessions[request.participant] = token
            context.send_initial_metadata(((SESSION_KEY, token),))
            return serde.join_reply_to_proto(reply)

        return _guarded(context, "Join", call)

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        def call() -> pb.HeartbeatReply:
            _check(request.protocol_version)
            beat = serde.heartbeat_request_from_proto(request)
            self._check_session(context, beat.participant)
            reply = self._service.heartbeat(beat.run_id, beat.participant, beat.telemetry)
            return serde.heartbeat_reply_to_proto(reply)

        return _guarded(context, "Heartbeat", call)

    def FetchTask(
        self, request: pb.FetchTaskRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.TaskMessage]:
        def call() -> Iterator[pb.TaskMessage]:
            _check(request.protocol_version)
            fetch = serde.fetch_request_from_proto(request)
            self._check_session(context, fetch.participant)
            assignment = self._long_poll(
                context, fetch.participant, fetch.wait_s,
                lambda wait: self._service.fetch_task(fetch.run_id, fetch.participant, wait),
                lambda got: got.task is not None or got.run_finished,
            )
            return serde.task_messages(assignment, self._chunk_bytes)

        # The header is built (and checked) inside call(); chunks are plain copies.
        yield from _guarded(context, "FetchTask", call)

    def SubmitUpdate(
        self, request_iterator: Iterator[pb.UpdateMessage], context: grpc.ServicerContext
    ) -> pb.Verdict:
        update = _received(
            context,
            "SubmitUpdate",
            lambda: self._reading(lambda: serde.update_from_messages(
                request_iterator, max_bytes=self._max_model_bytes)),
        )
        def call() -> pb.Verdict:
            self._check_session(context, update.participant)
            return serde.verdict_to_proto(self._service.submit_update(update))

        return _guarded(context, "SubmitUpdate", call)

    def SubmitEvaluation(
        self, request: pb.EvaluationRequest, context: grpc.ServicerContext
    ) -> pb.Verdict:
        def call() -> pb.Verdict:
            _check(request.protocol_version)
            self._check_session(context, request.participant)
            verdict = self._service.submit_evaluation(serde.evaluation_from_proto(request))
            return serde.verdict_to_proto(verdict)

        return _guarded(context, "SubmitEvaluation", call)

    def DeclineTask(self, request: pb.DeclineRequest, context: grpc.ServicerContext) -> pb.Verdict:
        def call() -> pb.Verdict:
            _check(request.protocol_version)
            self._check_session(context, request.participant)
            verdict = self._service.decline_task(serde.declined_from_proto(request))
            return serde.verdict_to_proto(verdict)

        return _guarded(context, "DeclineTask", call)

    def FetchStage(
        self, request: pb.FetchStageRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StageMessage]:
        def call() -> Iterator[pb.StageMessage]:
            _check(request.protocol_version)
            fetch = stage_serde.fetch_stage_request_from_proto(request)
            self._check_session(context, fetch.participant)
            stage = self._wait_for_stage(context, fetch.run_id, fetch.participant, fetch.round,
                                         fetch.step, fetch.wait_s)
            return stage_serde.stage_messages(stage, self._chunk_bytes)

        yield from _guarded(context, "FetchStage", call)

    def SubmitStage(
        self, request_iterator: Iterator[pb.StageUploadMessage], context: grpc.ServicerContext
    ) -> pb.Verdict:
        sub = _received(
            context,
            "SubmitStage",
            lambda: self._reading(lambda: stage_serde.stage_submission_from_messages(
                request_iterator, max_bytes=self._max_stage_bytes)),
        )

        def call() -> pb.Verdict:
            self._check_session(context, sub.participant)
            verdict = self._service.submit_stage(
                sub.run_id, sub.participant, sub.round, sub.step, sub.payload
            )
            reply = serde.verdict_to_proto(verdict)
            following = stage_serde.NEXT_STEP.get(sub.step)
            if verdict.accepted and following is not None and sub.wait_next_s > 0:
                stage = self._next_stage(context, sub, following)
                if stage is not None:
                    stage_serde.attach_next_stage(reply, stage)
            return reply

        return _guarded(context, "SubmitStage", call)

    def _wait_for_stage(self, context: grpc.ServicerContext, run_id: str, participant: str,
                        round: int, step: SecAggStep, wait_s: float) -> StageInput:
        """A step's input, long-polled for up to ``wait_s`` (FetchStage, or after an upload)."""
        return self._long_poll(
            context, participant, wait_s,
            lambda wait: self._service.fetch_stage(run_id, participant, round, step, wait),
            lambda got: got.payload is not None or got.aborted,
        )

    def _next_stage(self, context: grpc.ServicerContext, sub: stage_serde.StageSubmission,
                    step: SecAggStep) -> StageInput | None:
        """The input of the step after ``sub``, waited for like a FetchStage; None when it is
        not ready in time, too big for one message, or the wait is refused. The upload is
        accepted whatever happens here: the participant then fetches the input itself."""
        try:
            stage = self._wait_for_stage(context, sub.run_id, sub.participant, sub.round, step,
                                         sub.wait_next_s)
        except ConclaveError as exc:
            _log.debug("no next-step input for %s: %s", sub.participant, exc)
            return None
        if stage.payload is None and not stage.aborted:
            return None
        if stage.payload is not None and len(stage.payload) > self._chunk_bytes:
            return None
        return stage


class GrpcServer:
    """Serves ``service`` over gRPC. ``start()`` returns the bound ``host:port``.

    ``max_model_bytes`` caps an uploaded model, ``max_stage_bytes`` a secure-aggregation
    stage payload (default: ``max_model_bytes * 2 + 1 MiB``); both limits are inclusive.
    """

    def __init__(
        self,
        service: CoordinatorService,
        address: str = "127.0.0.1:0",
        *,
        max_model_bytes: int = 2**31,
        max_stage_bytes: int | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_workers: int = 128,
    ) -> None:
        if max_stage_bytes is None:
            max_stage_bytes = default_stage_limit(max_model_bytes)
        if (chunk_bytes <= 0 or max_workers <= _SHORT_CALL_WORKERS
                or min(max_model_bytes, max_stage_bytes) < 0):
            raise ValueError(
                f"chunk_bytes must be positive, max_workers above {_SHORT_CALL_WORKERS}, "
                "max_model_bytes and max_stage_bytes >= 0"
            )
        self._servicer = _Servicer(
            service,
            max_model_bytes=max_model_bytes,
            max_stage_bytes=max_stage_bytes,
            chunk_bytes=chunk_bytes,
            long_poll_slots=max_workers - _SHORT_CALL_WORKERS,
        )
        self._requested = address
        self._chunk_bytes = chunk_bytes
        self._max_workers = max_workers
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._address: str | None = None

    @property
    def address(self) -> str:
        if self._address is None:
            raise LocalProtocolError("the server has not been started")
        return self._address

    def start(self) -> str:
        if self._server is not None:
            raise LocalProtocolError("the server is already started")
        executor = ThreadPoolExecutor(
            max_workers=self._max_workers, thread_name_prefix="conclave-grpc"
        )
        server = grpc.server(executor, options=_server_options(self._chunk_bytes))
        pb_grpc.add_CoordinatorServicer_to_server(self._servicer, server)
        try:
            port = server.add_insecure_port(self._requested)
        except RuntimeError as exc:
            executor.shutdown(wait=False)
            raise TransportError(f"cannot listen on {self._requested}: {exc}") from exc
        if port == 0:
            executor.shutdown(wait=False)
            raise TransportError(f"cannot listen on {self._requested}")
        server.start()
        host = self._requested.rsplit(":", 1)[0]
        self._server, self._executor = server, executor
        self._address = f"{host}:{port}"
        _log.info("coordinator gRPC server listening on %s", self._address)
        return self._address

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop accepting calls; running calls get ``grace_s`` to finish, then are cancelled."""
        server, executor = self._server, self._executor
        if server is None or executor is None:
            return
        self._server = self._executor = None
        server.stop(grace_s).wait()
        # Handlers stuck in a service call (a long poll) must not block shutdown.
        executor.shutdown(wait=False, cancel_futures=True)
        _log.info("coordinator gRPC server on %s stopped", self._address)

    def __enter__(self) -> GrpcServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
