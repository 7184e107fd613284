"""Long polls cannot wedge the coordinator: they are capped, end when their caller goes away,
and only so many may wait at once, so heartbeats and uploads always find a worker thread."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import FakeService

from conclave.core.errors import TransportError
from conclave.core.types import TaskAssignment
from conclave.transport.grpc import GrpcCoordinatorClient, GrpcServer
from conclave.transport.grpc import conclave_pb2_grpc as pb_grpc
from conclave.transport.grpc.serde import fetch_request_to_proto


class WaitingService(FakeService):
    """fetch_task waits as the real service does, up to wait_s; ``release`` ends the run."""

    def fetch_task(self, run_id: str, participant: str, wait_s: float) -> TaskAssignment:
        self._record("fetch_task", (run_id, participant, wait_s))
        return TaskAssignment(task=None, run_finished=self.release.wait(wait_s))


@pytest.fixture
def one_slot() -> tuple[WaitingService, GrpcServer]:
    service = WaitingService()
    server = GrpcServer(service, max_workers=17)  # 16 reserved for short calls: 1 long poll
    server.start()
    yield service, server
    service.release.set()
    server.stop(grace_s=0)


def _fetches(service: FakeService) -> int:
    return service.names().count("fetch_task")


def test_a_long_poll_whose_caller_went_away_ends(one_slot) -> None:
    service, server = one_slot
    import grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        request = fetch_request_to_proto("run-7", "p0", 1e9, 1)  # asks to wait "forever"
        with pytest.raises(grpc.RpcError):
            list(stub.FetchTask(request, timeout=0.3))  # ...but gives up after 0.3 s
    time.sleep(1.5)  # the server notices within one slice
    settled = _fetches(service)
    time.sleep(1.5)
    assert _fetches(service) == settled, "the abandoned long poll is still polling"
    # its slot is free again: the next long poll is served, not refused as busy
    with GrpcCoordinatorClient(server.address, timeout_s=5.0) as client:
        assert client.fetch_task("run-7", "p0", 0.1) == TaskAssignment(task=None)
        service.release.set()
        assert client.fetch_task("run-7", "p0", 0.1).run_finished


def test_a_long_poll_over_the_limit_is_refused_as_busy_and_heartbeats_still_answer(
        one_slot) -> None:
    service, server = one_slot
    with GrpcCoordinatorClient(server.address, timeout_s=5.0) as first, \
            GrpcCoordinatorClient(server.address, timeout_s=5.0) as second:
        waiting = threading.Thread(target=first.fetch_task, args=("run-7", "p0", 20.0))
        waiting.start()
        end = time.monotonic() + 5
        while _fetches(service) == 0:
            assert time.monotonic() < end
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(TransportError, match="RESOURCE_EXHAUSTED.*busy"):
            second.fetch_task("run-7", "p1", 20.0)
        second.heartbeat("run-7", "p1", {})
        assert time.monotonic() - started < 2.0
        service.release.set()
        waiting.join(timeout=10)
        assert not waiting.is_alive()


def test_one_participant_cannot_hold_every_long_poll_slot() -> None:
    service = WaitingService()
    server = GrpcServer(service, max_workers=40)  # 24 long-poll slots
    server.start()
    threads = []
    try:
        with GrpcCoordinatorClient(server.address, timeout_s=5.0) as greedy, \
                GrpcCoordinatorClient(server.address, timeout_s=5.0) as honest:
            for _ in range(4):
                t = threading.Thread(target=greedy.fetch_task, args=("run-7", "hog", 20.0))
                t.start()
                threads.append(t)
            end = time.monotonic() + 5
            while _fetches(service) < 4:
                assert time.monotonic() < end
                time.sleep(0.01)
            with pytest.raises(TransportError, match="'hog' already has 4 waiting calls"):
                greedy.fetch_task("run-7", "hog", 20.0)
            got: list[object] = []
            waiting = threading.Thread(
                target=lambda: got.append(honest.fetch_task("run-7", "p1", 20.0)))
            waiting.start()  # another participant still finds a slot and waits in it
            while _fetches(service) < 5:
                assert time.monotonic() < end + 5 and waiting.is_alive()
                time.sleep(0.01)
            service.release.set()  # the run ends: every poll answers
            waiting.join(timeout=10)
            assert got and got[0].run_finished  # type: ignore[attr-defined]
    finally:
        service.release.set()
        for t in threads:
            t.join(timeout=10)
        server.stop(grace_s=0)


def test_stalled_uploads_cannot_take_the_workers_heartbeats_need(one_slot) -> None:
    """An upload that sends its header and then nothing holds a worker thread: uploads share
    the long-poll slots, so the next one is refused as busy and heartbeats still answer."""
    import grpc

    from conclave.core.types import SecAggStep
    from conclave.transport.grpc import stage_serde

    service, server = one_slot
    stall = threading.Event()
    header = next(stage_serde.stage_upload_messages("run-7", "p0", 1, SecAggStep.SHARE,
                                                    b"x" * 10, 4))

    def stalled():  # type: ignore[no-untyped-def]
        yield header
        stall.wait(20)

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        future = stub.SubmitStage.future(stalled(), timeout=20)
        time.sleep(0.5)  # the server now holds the only slot, reading
        with GrpcCoordinatorClient(server.address, timeout_s=5.0) as client:
            started = time.monotonic()
            with pytest.raises(TransportError, match="RESOURCE_EXHAUSTED.*busy"):
                client.submit_stage("run-7", "p1", 1, SecAggStep.SHARE, b"y")
            client.heartbeat("run-7", "p1", {})
            assert time.monotonic() - started < 2.0
            stall.set()  # the stalled upload ends (short of its declared size: refused)
            with pytest.raises(grpc.RpcError):
                future.result(timeout=10)
            assert client.submit_stage("run-7", "p1", 1, SecAggStep.SHARE, b"y").accepted
