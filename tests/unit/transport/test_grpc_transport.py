"""gRPC transport round trips over 127.0.0.1: every RPC, values equal on both sides."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import grpc
import pytest

from conclave.core.errors import (
    ConfigError,
    InvalidUpdate,
    LocalProtocolError,
    RemoteProtocolError,
    TransportError,
)
from conclave.core.parameters import Parameters
from conclave.core.types import (
    PROTOCOL_VERSION,
    Evaluation,
    HeartbeatReply,
    JoinRequest,
    Task,
    TaskAssignment,
    TaskKind,
    Update,
    Verdict,
)
from conclave.transport.grpc import GrpcCoordinatorClient, GrpcServer


def test_start_returns_the_bound_port(server: GrpcServer):
    host, port = server.address.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert int(port) > 0
    with pytest.raises(LocalProtocolError):
        server.start()


def test_a_taken_port_is_refused(fake, server: GrpcServer):
    with pytest.raises(TransportError, match="cannot listen"):
        GrpcServer(fake, server.address).start()


def test_join(client: GrpcCoordinatorClient, fake):
    request = JoinRequest(participant="hospital-0", capabilities={"gpu": "none", "os": "linux"})
    assert client.join(request) == fake.join_reply
    assert fake.last("join") == request
    assert request.protocol_version == PROTOCOL_VERSION


def test_heartbeat(client: GrpcCoordinatorClient, fake):
    fake.heartbeat_reply = HeartbeatReply(has_task=False, run_finished=True)
    telemetry = {"cpu_percent": 12.5, "rss_bytes": 1e9}
    reply = client.heartbeat("run-7", "hospital-0", telemetry)
    assert reply == HeartbeatReply(has_task=False, run_finished=True)
    assert fake.last("heartbeat") == ("run-7", "hospital-0", telemetry)


@pytest.mark.parametrize("kind", list(TaskKind))
def test_fetch_task(
    client: GrpcCoordinatorClient, fake, params: Parameters, make_task: Callable[..., Task], kind
):
    sent = make_task(params, kind)
    fake.assignment = TaskAssignment(task=sent, run_finished=False)

    assignment = client.fetch_task("run-7", "hospital-0", 0.25)

    assert fake.last("fetch_task") == ("run-7", "hospital-0", 0.25)
    task = assignment.task
    assert task is not None and not assignment.run_finished
    assert (task.run_id, task.round, task.kind, task.deadline_s) == ("run-7", 4, kind, 120.5)
    assert task.config == sent.config
    assert {k: type(v) for k, v in task.config.items()} == {
        "lr": float, "epochs": int, "shuffle": bool, "optimizer": str, "big": int
    }
    assert task.parameters.layout == params.layout
    assert task.parameters.names == ("conv.weight", "conv.bias", "fc.weight", "scale", "empty")
    assert task.parameters.digest() == params.digest()
    assert task.parameters == params
    task.parameters.flat[:] = 0.0  # the received model is writable and our own
    assert task.parameters != params


def test_fetch_without_task(client: GrpcCoordinatorClient, fake):
    fake.assignment = TaskAssignment(task=None, run_finished=True)
    assert client.fetch_task("run-7", "hospital-0", 0.0) == TaskAssignment(
        task=None, run_finished=True
    )


def test_submit_update(client: GrpcCoordinatorClient, fake, params: Parameters):
    fake.verdict = Verdict(accepted=False, reason="stale round 3")
    update = Update(
        run_id="run-7", round=3, participant="hospital-0", num_examples=640,
        parameters=params, metrics={"loss": 0.125, "accuracy": 0.875}, train_seconds=4.5,
    )
    assert client.submit_update(update) == Verdict(accepted=False, reason="stale round 3")
    received = fake.last("submit_update")
    assert isinstance(received, Update)
    assert received.parameters.digest() == params.digest()
    assert received.digest == params.digest()  # verified by the server, not recomputed
    assert received.parameters == params
    assert (received.run_id, received.round, received.participant) == ("run-7", 3, "hospital-0")
    assert (received.num_examples, received.train_seconds) == (640, 4.5)
    assert dict(received.metrics) == {"loss": 0.125, "accuracy": 0.875}


def test_sender_digest_is_used_and_checked(client: GrpcCoordinatorClient, fake, params):
    update = Update(
        run_id="run-7", round=3, participant="p0", num_examples=1, parameters=params,
        digest=params.digest(),
    )
    assert client.submit_update(update).accepted
    assert fake.last("submit_update") == update

    stale = Update(
        run_id="run-7", round=3, participant="p0", num_examples=1, parameters=params,
        digest=Parameters.zeros(params.layout).digest(),
    )
    with pytest.raises(InvalidUpdate, match="does not match its digest"):
        client.submit_update(stale)
    assert fake.names() == ["submit_update"]


def test_submit_evaluation(client: GrpcCoordinatorClient, fake):
    evaluation = Evaluation(
        run_id="run-7", round=5, participant="hospital-1", loss=0.75, num_examples=99,
        metrics={"auc": 0.5},
    )
    assert client.submit_evaluation(evaluation) == Verdict(accepted=True, reason="")
    assert fake.last("submit_evaluation") == evaluation


@pytest.mark.parametrize(
    ("raised", "expected_type", "expected_text"),
    [
        (RemoteProtocolError("unknown run 'zzz'"), RemoteProtocolError, "unknown run 'zzz'"),
        (InvalidUpdate("shapes differ"), InvalidUpdate, "shapes differ"),
        (ConfigError("wait_s", -1, "must be >= 0"), RemoteProtocolError, "invalid wait_s = -1"),
    ],
)
def test_refusals_keep_their_type_and_reason(
    client: GrpcCoordinatorClient, fake, raised, expected_type, expected_text
):
    fake.error = raised
    with pytest.raises(expected_type) as info:
        client.heartbeat("zzz", "hospital-0", {})
    assert type(info.value) is expected_type
    assert expected_text in str(info.value)
    assert isinstance(info.value.__cause__, grpc.RpcError)


def test_long_poll_gets_wait_s_on_top_of_the_timeout(server: GrpcServer, fake):
    fake.fetch_delay_s = 0.8  # the service holds the call for the whole wait
    with GrpcCoordinatorClient(server.address, timeout_s=0.5) as client:
        started = time.monotonic()
        assert client.fetch_task("run-7", "p0", 0.8) == fake.assignment
        assert time.monotonic() - started >= 0.8


def test_deadline_exceeded_is_a_transport_error(server: GrpcServer, fake):
    fake.fetch_delay_s = 10.0
    with GrpcCoordinatorClient(server.address, timeout_s=0.2) as client:
        with pytest.raises(TransportError, match="DEADLINE_EXCEEDED") as info:
            client.fetch_task("run-7", "p0", 0.0)
    assert isinstance(info.value.__cause__, grpc.RpcError)
    fake.release.set()


def test_unreachable_coordinator_is_a_transport_error():
    with socket.socket() as probe:  # a port that was free a moment ago, now closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with GrpcCoordinatorClient(f"127.0.0.1:{port}", timeout_s=2.0) as client:
        with pytest.raises(TransportError, match="UNAVAILABLE"):
            client.join(JoinRequest(participant="p0"))


def test_decline_task_round_trips_and_the_reason_is_bounded(client: GrpcCoordinatorClient, fake):
    from conclave.core.types import Declined, TaskKind

    declined = Declined(run_id="run-7", round=4, participant="p0", kind=TaskKind.EVALUATE,
                        reason="trainer.evaluate failed: OSError: disk full")
    assert client.decline_task(declined) == fake.verdict
    assert fake.last("decline_task") == declined
    client.decline_task(Declined(run_id="run-7", round=4, participant="p0", kind=TaskKind.FIT,
                                 reason="x" * 100_000))
    assert len(fake.last("decline_task").reason) == 2000

