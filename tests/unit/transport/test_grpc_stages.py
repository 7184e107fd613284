"""Secure-aggregation stages over gRPC (FetchStage, SubmitStage) and the in-memory transport."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from conclave.core.errors import InvalidUpdate, RemoteProtocolError, TransportError
from conclave.core.types import PROTOCOL_VERSION, SecAggStep, StageInput, Verdict
from conclave.transport.grpc import GrpcCoordinatorClient, GrpcServer
from conclave.transport.grpc import conclave_pb2 as pb
from conclave.transport.grpc import conclave_pb2_grpc as pb_grpc
from conclave.transport.grpc import stage_serde
from conclave.transport.grpc.chunks import default_stage_limit
from conclave.transport.grpc.status import error_for_rpc
from conclave.transport.memory import MemoryTransport

SERVER_LOGGER = "conclave.transport.grpc.server"
CHUNK = 256  # small chunks so small payloads span several messages
PAYLOAD = np.random.default_rng(5).bytes(CHUNK * 7 + 13)  # 8 chunks, the last one short
STEPS = list(SecAggStep)


@pytest.fixture
def small(fake) -> Iterator[tuple[GrpcServer, GrpcCoordinatorClient]]:
    with GrpcServer(fake, chunk_bytes=CHUNK) as server:
        with GrpcCoordinatorClient(server.address, timeout_s=10.0, chunk_bytes=CHUNK) as client:
            yield server, client


def upload(payload: bytes = PAYLOAD) -> list[pb.StageUploadMessage]:
    return list(
        stage_serde.stage_upload_messages(
            "run-7", "p0", 5, SecAggStep.MASKED_INPUT, payload, CHUNK
        )
    )


def raw_submit(address: str, messages: list[pb.StageUploadMessage]) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.CoordinatorStub(channel).SubmitStage(iter(messages), timeout=10)
    return info.value


def assert_serving(client: GrpcCoordinatorClient, fake) -> None:
    fake.stage = StageInput(payload=b"still here")
    assert client.fetch_stage("run-7", "p9", 1, SecAggStep.SETUP, 0.0).payload == b"still here"


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("step", STEPS, ids=[s.name for s in STEPS])
def test_every_step_round_trips_both_ways(small, fake, step: SecAggStep):
    _, client = small
    fake.stage = StageInput(payload=PAYLOAD, reason="keys of 3 neighbours")
    fetched = client.fetch_stage("run-7", "p0", 5, step, 0.25)
    assert fetched == StageInput(payload=PAYLOAD, aborted=False, reason="keys of 3 neighbours")
    assert fake.last("fetch_stage") == ("run-7", "p0", 5, step, 0.25)

    fake.verdict = Verdict(accepted=False, reason=f"{step.name} too late")
    verdict = client.submit_stage("run-7", "p1", 6, step, PAYLOAD[::-1])
    assert verdict == Verdict(accepted=False, reason=f"{step.name} too late")
    assert fake.last("submit_stage") == ("run-7", "p1", 6, step, PAYLOAD[::-1])


def test_twenty_megabyte_payload_round_trips_both_ways(fake):
    big = np.random.default_rng(8).bytes(20 * 2**20 + 3)  # 21 default chunks, not aligned
    fake.stage = StageInput(payload=big)
    with GrpcServer(fake) as server, GrpcCoordinatorClient(server.address) as client:
        fetched = client.fetch_stage("run-7", "p0", 2, SecAggStep.MASKED_INPUT, 0.0)
        assert fetched.payload == big
        assert client.submit_stage("run-7", "p0", 2, SecAggStep.MASKED_INPUT, big[::-1]).accepted
    received = fake.last("submit_stage")
    assert isinstance(received, tuple)
    assert len(received[4]) == len(big)
    assert received[4] == big[::-1]


def test_empty_payload_is_not_no_payload(small, fake):
    _, client = small
    fake.stage = StageInput(payload=b"")
    empty = client.fetch_stage("run-7", "p0", 1, SecAggStep.SHARE, 0.0)
    assert empty.payload == b"" and empty.payload is not None
    fake.stage = StageInput(payload=None)
    assert client.fetch_stage("run-7", "p0", 1, SecAggStep.SHARE, 0.0).payload is None

    header = next(stage_serde.stage_messages(StageInput(payload=b""), CHUNK)).header
    assert (header.has_payload, header.total_bytes) == (True, 0)
    header = next(stage_serde.stage_messages(StageInput(payload=None), CHUNK)).header
    assert (header.has_payload, header.total_bytes) == (False, 0)

    assert client.submit_stage("run-7", "p0", 1, SecAggStep.UNMASK, b"").accepted
    assert fake.last("submit_stage") == ("run-7", "p0", 1, SecAggStep.UNMASK, b"")


@pytest.mark.parametrize("payload", [None, b"partial"], ids=["no-payload", "with-payload"])
def test_abort_and_reason_round_trip(small, fake, payload):
    _, client = small
    fake.stage = StageInput(payload=payload, aborted=True, reason="dropped from round 5")
    fetched = client.fetch_stage("run-7", "p0", 5, SecAggStep.UNMASK, 0.0)
    assert fetched == StageInput(payload=payload, aborted=True, reason="dropped from round 5")


def test_fetch_deadline_covers_the_long_poll(fake):
    fake.fetch_delay_s = 0.6  # longer than timeout_s, shorter than wait_s + timeout_s
    with GrpcServer(fake) as server:
        with GrpcCoordinatorClient(server.address, timeout_s=0.4) as client:
            fetched = client.fetch_stage("run-7", "p0", 1, SecAggStep.SETUP, 0.6)
    assert fetched == StageInput(payload=None)
    assert fake.last("fetch_stage") == ("run-7", "p0", 1, SecAggStep.SETUP, 0.6)


# -- refusals ------------------------------------------------------------------------------

CALLS: dict[str, Callable[[GrpcCoordinatorClient], object]] = {
    "fetch_stage": lambda c: c.fetch_stage("run-7", "p0", 1, SecAggStep.SETUP, 0.0),
    "submit_stage": lambda c: c.submit_stage("run-7", "p0", 1, SecAggStep.SHARE, PAYLOAD),
}


@pytest.mark.parametrize("rpc", sorted(CALLS))
def test_wrong_protocol_version_is_refused(small, fake, rpc):
    server, client = small
    with GrpcCoordinatorClient(server.address, chunk_bytes=CHUNK, protocol_version=7) as old:
        with pytest.raises(RemoteProtocolError) as info:
            CALLS[rpc](old)
    assert type(info.value) is RemoteProtocolError
    assert "participant speaks version 7" in str(info.value)
    assert f"coordinator speaks version {PROTOCOL_VERSION}" in str(info.value)
    assert info.value.__cause__.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert fake.calls == []
    assert_serving(client, fake)


@pytest.mark.parametrize("value", [pb.SEC_AGG_STEP_UNSPECIFIED, 42], ids=["unset", "unknown"])
def test_unspecified_or_unknown_step_is_refused(small, fake, value):
    server, client = small
    expected = "is unspecified (SEC_AGG_STEP_UNSPECIFIED)" if value == 0 else "unknown"
    request = stage_serde.fetch_stage_request_to_proto("run-7", "p0", 1, SecAggStep.SETUP, 0.0)
    request.step = value
    with grpc.insecure_channel(server.address) as channel:
        stream = pb_grpc.CoordinatorStub(channel).FetchStage(request, timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert expected in info.value.details()
    assert type(error_for_rpc("FetchStage", info.value)) is RemoteProtocolError

    messages = upload()
    messages[0].header.step = value
    error = raw_submit(server.address, messages)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details()
    assert type(error_for_rpc("SubmitStage", error)) is InvalidUpdate
    assert fake.calls == []
    assert_serving(client, fake)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda m: [*m, pb.StageUploadMessage(chunk=b"x")], "overflows its declared size"),
        (lambda m: m[:-1], f"payload ended after {CHUNK * 7} of {len(PAYLOAD)} bytes"),
        (lambda m: m[1:], "does not start with a header"),
        (lambda m: [m[0], *m], "got another header"),
    ],
    ids=["extra-bytes", "missing-bytes", "no-header", "two-headers"],
)
def test_bad_upload_is_refused(small, fake, tamper, reason):
    server, client = small
    error = raw_submit(server.address, tamper(upload()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in error.details()
    assert type(error_for_rpc("SubmitStage", error)) is InvalidUpdate
    assert fake.calls == []
    assert_serving(client, fake)


def test_oversized_declared_size_is_refused_before_allocating(small, fake):
    server, client = small
    header = upload()[0]
    header.header.total_bytes = 2**40  # 1 TiB: nothing may be allocated for it
    started = time.monotonic()
    error = raw_submit(server.address, [header])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    limit = default_stage_limit(2**31)
    assert f"stage payload of {2**40} bytes exceeds the limit of {limit} bytes" in error.details()
    assert time.monotonic() - started < 5
    assert fake.calls == []
    assert_serving(client, fake)


def test_stage_limit_defaults_from_the_model_limit_and_is_inclusive(fake):
    limit = 1000 * 2 + 2**20
    assert default_stage_limit(1000) == limit
    payload = bytes(limit)
    with GrpcServer(fake, max_model_bytes=1000) as server:
        with GrpcCoordinatorClient(server.address) as client:
            assert client.submit_stage("r", "p", 1, SecAggStep.SHARE, payload).accepted
            with pytest.raises(InvalidUpdate, match=f"exceeds the limit of {limit} bytes"):
                client.submit_stage("r", "p", 1, SecAggStep.SHARE, payload + b"!")
    with GrpcServer(fake, max_stage_bytes=10) as server:
        with GrpcCoordinatorClient(server.address) as client:
            assert client.submit_stage("r", "p", 2, SecAggStep.SHARE, b"0123456789").accepted
            with pytest.raises(InvalidUpdate, match="exceeds the limit of 10 bytes"):
                client.submit_stage("r", "p", 2, SecAggStep.SHARE, b"0123456789a")
    assert [arg[2] for name, arg in fake.calls] == [1, 2]


@pytest.mark.parametrize("how", ["cancel", "close-channel"])
def test_abandoned_upload_never_reaches_the_service(small, fake, caplog, how):
    server, client = small
    caplog.set_level(logging.INFO, logger=SERVER_LOGGER)
    messages = upload()
    gate = threading.Event()

    def requests() -> Iterator[pb.StageUploadMessage]:
        yield from messages[:2]
        gate.wait(10)  # the rest never comes

    channel = grpc.insecure_channel(server.address)
    future = pb_grpc.CoordinatorStub(channel).SubmitStage.future(requests(), timeout=20)
    time.sleep(0.5)  # let the server take the header and start waiting for chunks
    if how == "cancel":
        future.cancel()
    else:
        channel.close()
    gate.set()
    outcomes = ("SubmitStage abandoned by the participant", f"payload ended after {CHUNK} of")
    deadline = time.monotonic() + 10
    while not any(o in caplog.text for o in outcomes) and time.monotonic() < deadline:
        time.sleep(0.02)
    channel.close()
    assert any(o in caplog.text for o in outcomes), caplog.text
    assert_serving(client, fake)
    assert "submit_stage" not in fake.names()


@pytest.mark.parametrize("rpc", sorted(CALLS))
def test_service_errors_map_through_the_status_table(small, fake, rpc):
    _, client = small
    fake.error = RemoteProtocolError("participant p0 is not in round 1")
    with pytest.raises(RemoteProtocolError, match="not in round 1") as info:
        CALLS[rpc](client)
    assert type(info.value) is RemoteProtocolError
    fake.error = RuntimeError("secret mask seed")
    with pytest.raises(TransportError, match="INTERNAL") as failed:
        CALLS[rpc](client)
    assert "secret" not in str(failed.value)
    fake.error = None
    assert_serving(client, fake)


# -- a coordinator that sends a bad stage --------------------------------------------------


class _Rogue(pb_grpc.CoordinatorServicer):
    def __init__(self, messages: list[pb.StageMessage]) -> None:
        self.messages = messages

    def FetchStage(self, request, context) -> Iterator[pb.StageMessage]:
        yield from self.messages


def _reply(payload: bytes | None, **header: object) -> list[pb.StageMessage]:
    messages = list(stage_serde.stage_messages(StageInput(payload=payload), CHUNK))
    for key, value in header.items():
        setattr(messages[0].header, key, value)
    return messages


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        (_reply(PAYLOAD, total_bytes=len(PAYLOAD) - 1), "overflows its declared size"),
        (_reply(PAYLOAD, total_bytes=len(PAYLOAD) + 1), "payload ended after"),
        (_reply(PAYLOAD)[:-1], "payload ended after"),
        (_reply(None, total_bytes=3), "announces 3 bytes but no payload"),
        ([*_reply(None), pb.StageMessage(chunk=b"x")], "without a payload carries chunks"),
        (_reply(PAYLOAD, total_bytes=2**40), f"stage payload of {2**40} bytes exceeds"),
        (_reply(b"ok", protocol_version=3), "coordinator speaks version 3"),
        (_reply(PAYLOAD)[1:], "does not start with a header"),
    ],
    ids=["overflow", "underflow", "short", "size-no-payload", "chunks-no-payload", "huge",
         "version", "no-header"],
)
def test_client_refuses_a_bad_stage(messages, reason):
    executor = ThreadPoolExecutor(max_workers=2)
    rogue = grpc.server(executor)
    pb_grpc.add_CoordinatorServicer_to_server(_Rogue(messages), rogue)
    port = rogue.add_insecure_port("127.0.0.1:0")
    rogue.start()
    try:
        with GrpcCoordinatorClient(f"127.0.0.1:{port}", chunk_bytes=CHUNK) as client:
            with pytest.raises(RemoteProtocolError, match=reason) as info:
                client.fetch_stage("run-7", "p0", 1, SecAggStep.SETUP, 0.0)
        assert type(info.value) is RemoteProtocolError
    finally:
        rogue.stop(0).wait()
        executor.shutdown(wait=False)


# -- in memory -----------------------------------------------------------------------------


def test_memory_transport_passes_stages_through(fake):
    transport = MemoryTransport(fake)
    fake.stage = StageInput(payload=PAYLOAD, aborted=True, reason="late")
    fetched = transport.fetch_stage("run-7", "p0", 3, SecAggStep.SHARE, 1.5)
    assert fetched is fake.stage  # bytes are immutable: nothing to copy
    assert fake.last("fetch_stage") == ("run-7", "p0", 3, SecAggStep.SHARE, 1.5)

    fake.verdict = Verdict(accepted=False, reason="duplicate")
    assert transport.submit_stage("run-7", "p0", 3, SecAggStep.MASKED_INPUT, PAYLOAD) == (
        Verdict(accepted=False, reason="duplicate")
    )
    received = fake.last("submit_stage")
    assert received == ("run-7", "p0", 3, SecAggStep.MASKED_INPUT, PAYLOAD)
    assert received[4] is PAYLOAD

    error = RemoteProtocolError("no such round")
    fake.error = error
    with pytest.raises(RemoteProtocolError) as info:
        transport.fetch_stage("run-7", "p0", 9, SecAggStep.SETUP, 0.0)
    assert info.value is error


def test_memory_transport_freezes_a_mutable_buffer(fake):
    transport = MemoryTransport(fake)
    buffer = bytearray(b"mask")
    transport.submit_stage("run-7", "p0", 1, SecAggStep.UNMASK, buffer)  # type: ignore[arg-type]
    buffer[:] = b"XXXX"
    assert fake.last("submit_stage")[4] == b"mask"
    fake.stage = StageInput(payload=bytearray(b"keys"))  # type: ignore[arg-type]
    fetched = transport.fetch_stage("run-7", "p0", 1, SecAggStep.SHARE, 0.0)
    assert type(fetched.payload) is bytes and fetched.payload == b"keys"


# -- the next step's input returned with a stage upload's verdict ------------------------


def test_an_accepted_upload_brings_back_the_next_steps_input(fake):
    fake.stage = StageInput(payload=b"share bundle")
    with GrpcServer(fake, chunk_bytes=CHUNK) as server, GrpcCoordinatorClient(
            server.address, chunk_bytes=CHUNK, stage_prefetch_s=2.0) as client:
        assert client.submit_stage("run-7", "p0", 3, SecAggStep.ADVERTISE, b"keys").accepted
        assert fake.last("fetch_stage")[:4] == ("run-7", "p0", 3, SecAggStep.SHARE)
        # the next fetch of exactly that step needs no call
        assert client.fetch_stage("run-7", "p0", 3, SecAggStep.SHARE, 5.0).payload == (
            b"share bundle")
        assert fake.names().count("fetch_stage") == 1
        # it is used once; another step (or round) is fetched as usual
        fake.stage = StageInput(payload=b"fresh")
        assert client.fetch_stage("run-7", "p0", 3, SecAggStep.SHARE, 0.0).payload == b"fresh"
        assert fake.names().count("fetch_stage") == 2
        # the last step has no next one: nothing is waited for
        assert client.submit_stage("run-7", "p0", 3, SecAggStep.UNMASK, b"shares").accepted
        assert fake.names().count("fetch_stage") == 2


def test_an_abort_comes_back_too_and_a_refused_upload_brings_nothing(fake):
    with GrpcServer(fake, chunk_bytes=CHUNK) as server, GrpcCoordinatorClient(
            server.address, chunk_bytes=CHUNK, stage_prefetch_s=2.0) as client:
        fake.stage = StageInput(payload=None, aborted=True, reason="the round failed")
        assert client.submit_stage("run-7", "p0", 1, SecAggStep.SHARE, b"x").accepted
        got = client.fetch_stage("run-7", "p0", 1, SecAggStep.MASKED_INPUT, 5.0)
        assert got.aborted and got.reason == "the round failed"
        calls = fake.names().count("fetch_stage")
        fake.verdict = Verdict(accepted=False, reason="stale")
        assert not client.submit_stage("run-7", "p0", 2, SecAggStep.SHARE, b"x").accepted
        assert fake.names().count("fetch_stage") == calls  # no wait for a refused upload


def test_an_input_not_ready_in_time_or_too_big_is_fetched_as_usual(fake):
    fake.fetch_delay_s = 0.05  # "nothing yet" after a short wait, as the coordinator would
    with GrpcServer(fake, chunk_bytes=CHUNK) as server, GrpcCoordinatorClient(
            server.address, chunk_bytes=CHUNK, stage_prefetch_s=0.2) as client:
        started = time.monotonic()
        assert client.submit_stage("run-7", "p0", 1, SecAggStep.SHARE, b"x").accepted
        assert time.monotonic() - started < 5
        fake.fetch_delay_s = 0.0
        fake.stage = StageInput(payload=PAYLOAD)  # bigger than one chunk: not carried
        calls = fake.names().count("fetch_stage")
        assert client.fetch_stage("run-7", "p0", 1, SecAggStep.MASKED_INPUT, 0.0).payload == (
            PAYLOAD)
        assert fake.names().count("fetch_stage") == calls + 1
        assert client.submit_stage("run-7", "p0", 2, SecAggStep.SHARE, b"x").accepted
        assert client.fetch_stage("run-7", "p0", 2, SecAggStep.MASKED_INPUT, 0.0).payload == (
            PAYLOAD)
        assert fake.names().count("fetch_stage") == calls + 3  # the server's try, then ours
