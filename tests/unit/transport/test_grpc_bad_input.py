"""The gRPC server refuses bad input without calling the service, and keeps serving."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from conclave.core.errors import InvalidUpdate, RemoteProtocolError, TransportError
from conclave.core.parameters import Layout, Parameters
from conclave.core.types import (
    PROTOCOL_VERSION,
    Evaluation,
    JoinRequest,
    Task,
    TaskAssignment,
    Update,
)
from conclave.transport.grpc import GrpcCoordinatorClient, GrpcServer
from conclave.transport.grpc import conclave_pb2 as pb
from conclave.transport.grpc import conclave_pb2_grpc as pb_grpc
from conclave.transport.grpc import serde
from conclave.transport.grpc.status import error_for_rpc

SERVER_LOGGER = "conclave.transport.grpc.server"
CHUNK = 256  # small chunks so even the small model spans several messages


def make_update(parameters: Parameters) -> Update:
    return Update(run_id="run-7", round=4, participant="p0", num_examples=10, parameters=parameters)


def upload_messages(parameters: Parameters) -> list[pb.UpdateMessage]:
    messages = list(serde.update_messages(make_update(parameters), CHUNK))
    assert len(messages) > 3
    return messages


def raw_upload(address: str, messages: list[pb.UpdateMessage]) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.CoordinatorStub(channel).SubmitUpdate(iter(messages), timeout=10)
    return info.value


def assert_serving(client: GrpcCoordinatorClient, fake) -> None:
    assert client.join(JoinRequest(participant="still-there")) == fake.join_reply


# -- protocol version ----------------------------------------------------------------------

CALLS: dict[str, Callable[[GrpcCoordinatorClient, Parameters], object]] = {
    "heartbeat": lambda c, p: c.heartbeat("run-7", "p0", {}),
    "fetch_task": lambda c, p: c.fetch_task("run-7", "p0", 0.0),
    "submit_update": lambda c, p: c.submit_update(make_update(p)),
    "submit_evaluation": lambda c, p: c.submit_evaluation(
        Evaluation(run_id="run-7", round=1, participant="p0", loss=1.0, num_examples=1)
    ),
    "join": lambda c, p: c.join(JoinRequest(participant="p0", protocol_version=99)),
}


@pytest.mark.parametrize("rpc", sorted(CALLS))
def test_wrong_protocol_version_is_refused(server: GrpcServer, fake, params: Parameters, rpc):
    with GrpcCoordinatorClient(server.address, protocol_version=99) as old_client:
        with pytest.raises(RemoteProtocolError) as info:
            CALLS[rpc](old_client, params)
    message = str(info.value)
    assert "participant speaks version 99" in message
    assert f"coordinator speaks version {PROTOCOL_VERSION}" in message
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert info.value.__cause__.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert fake.calls == []


# -- uploads -------------------------------------------------------------------------------


def _flip_a_bit(messages: list[pb.UpdateMessage]) -> list[pb.UpdateMessage]:
    chunk = bytearray(messages[2].chunk)
    chunk[5] ^= 0x01
    return [*messages[:2], pb.UpdateMessage(chunk=bytes(chunk)), *messages[3:]]


def _without_header(messages: list[pb.UpdateMessage]) -> list[pb.UpdateMessage]:
    return messages[1:]


def _two_headers(messages: list[pb.UpdateMessage]) -> list[pb.UpdateMessage]:
    return [messages[0], *messages]


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_flip_a_bit, "does not match its digest"),
        (lambda m: [*m, pb.UpdateMessage(chunk=b"\0\0\0\0")], "overflows"),
        (lambda m: m[:-1], "payload ended after"),
        (_without_header, "does not start with a header"),
        (_two_headers, "got another header"),
    ],
    ids=["bad-digest", "extra-bytes", "missing-bytes", "no-header", "two-headers"],
)
def test_bad_upload_is_refused(server, client, fake, params: Parameters, tamper, reason):
    error = raw_upload(server.address, tamper(upload_messages(params)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in error.details()
    mapped = error_for_rpc("SubmitUpdate", error)
    assert type(mapped) is InvalidUpdate
    assert fake.calls == []
    assert_serving(client, fake)


def test_untampered_raw_upload_is_accepted(server, fake, params: Parameters):
    with grpc.insecure_channel(server.address) as channel:
        verdict = pb_grpc.CoordinatorStub(channel).SubmitUpdate(
            iter(upload_messages(params)), timeout=10
        )
    assert verdict.accepted
    received = fake.last("submit_update")
    assert received == dataclasses.replace(make_update(params), digest=params.digest())


def test_oversized_layout_is_refused_before_allocating(server, client, fake, params):
    header = upload_messages(params)[0]
    huge = Layout.of({"huge": (2**40,)})  # 4 TiB: allocating it would fail with MemoryError
    header.header.layout.CopyFrom(serde.layout_to_proto(huge))
    header.header.total_bytes = huge.nbytes
    started = time.monotonic()
    error = raw_upload(server.address, [header])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"model of {huge.nbytes} bytes exceeds the limit of {2**31} bytes" in error.details()
    assert time.monotonic() - started < 5
    assert fake.calls == []
    assert_serving(client, fake)


def test_max_model_bytes_is_inclusive(fake, params: Parameters):
    nbytes = params.layout.nbytes
    with GrpcServer(fake, max_model_bytes=nbytes) as roomy:
        with GrpcCoordinatorClient(roomy.address) as client:
            assert client.submit_update(make_update(params)).accepted
    with GrpcServer(fake, max_model_bytes=nbytes - 1) as tight:
        with GrpcCoordinatorClient(tight.address) as client:
            with pytest.raises(InvalidUpdate, match="exceeds the limit"):
                client.submit_update(make_update(params))
    assert fake.names() == ["submit_update"]


def test_invalid_layout_is_refused(server, client, fake, params: Parameters):
    header = upload_messages(params)[0]
    header.header.layout.arrays.add(name="conv.bias", shape=[1])  # a duplicate name
    error = raw_upload(server.address, [header])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid model layout" in error.details()
    assert fake.calls == []
    assert_serving(client, fake)


@pytest.mark.parametrize("how", ["cancel", "close-channel"])
def test_abandoned_upload_never_reaches_the_service(server, client, fake, params, caplog, how):
    caplog.set_level(logging.INFO, logger=SERVER_LOGGER)
    messages = upload_messages(params)
    gate = threading.Event()

    def requests() -> Iterator[pb.UpdateMessage]:
        yield from messages[:2]
        gate.wait(10)  # the rest never comes

    channel = grpc.insecure_channel(server.address)
    future = pb_grpc.CoordinatorStub(channel).SubmitUpdate.future(requests(), timeout=20)
    time.sleep(0.5)  # let the server take the header and start waiting for chunks
    if how == "cancel":
        future.cancel()
    else:
        channel.close()
    gate.set()
    # gRPC reports a cancelled stream either as an error or (racing the cancellation
    # notice) as an early end of stream; both must end the upload without the service.
    outcomes = ("SubmitUpdate abandoned by the participant", "payload ended after 256 of")
    deadline = time.monotonic() + 10
    while not any(o in caplog.text for o in outcomes) and time.monotonic() < deadline:
        time.sleep(0.02)
    channel.close()
    assert any(o in caplog.text for o in outcomes), caplog.text
    assert_serving(client, fake)
    assert "submit_update" not in fake.names()


# -- garbage on the wire and failing services ----------------------------------------------


def test_garbage_bytes_on_the_socket_do_not_hurt(server, client, fake):
    host, port = server.address.rsplit(":", 1)
    noise = np.random.default_rng(11).bytes(64 * 1024)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    for payload in (noise, preface + noise, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            try:
                sock.sendall(payload)
            except OSError:
                pass  # the server may hang up on us mid-send: that is fine
    assert_serving(client, fake)


@pytest.mark.parametrize("rpc", ["join", "fetch_task", "submit_update"])
def test_failing_service_gives_a_generic_error(
    server, client, fake, params, make_task: Callable[..., Task], caplog, rpc
):
    caplog.set_level(logging.INFO, logger=SERVER_LOGGER)
    fake.assignment = TaskAssignment(task=make_task(params))
    fake.error = RuntimeError("secret database password in a traceback")
    call = CALLS[rpc] if rpc != "join" else (lambda c, p: c.join(JoinRequest(participant="p0")))
    with pytest.raises(TransportError) as info:
        call(client, params)
    assert "INTERNAL" in str(info.value)
    assert "secret" not in str(info.value)
    logged = [r for r in caplog.records if r.name == SERVER_LOGGER and r.exc_info]
    assert logged and isinstance(logged[0].exc_info[1], RuntimeError)
    fake.error = None
    assert_serving(client, fake)


def test_unencodable_task_is_an_internal_error(server, client, fake, params, make_task, caplog):
    caplog.set_level(logging.INFO, logger=SERVER_LOGGER)
    task = make_task(params)
    fake.assignment = TaskAssignment(
        task=Task(
            run_id=task.run_id, round=task.round, kind=task.kind, config={"too_big": 2**70},
            parameters=params, deadline_s=1.0,
        )
    )
    with pytest.raises(TransportError, match="INTERNAL"):
        client.fetch_task("run-7", "p0", 0.0)
    assert "does not fit in 64 bits" in caplog.text
    assert_serving(client, fake)
