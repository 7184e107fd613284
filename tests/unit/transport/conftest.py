"""A fake coordinator service and gRPC fixtures shared by the transport tests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import pytest

from conclave.core.parameters import Parameters
from conclave.core.types import (
    Declined,
    Evaluation,
    HeartbeatReply,
    JoinReply,
    JoinRequest,
    SecAggStep,
    StageInput,
    Task,
    TaskAssignment,
    TaskKind,
    Update,
    Verdict,
)
from conclave.transport.grpc import GrpcCoordinatorClient, GrpcServer


class FakeService:
    """Records every call; returns canned replies, or raises ``error`` when it is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.error: Exception | None = None
        self.join_reply = JoinReply(run_id="run-7", heartbeat_interval_s=2.5, current_round=3)
        self.heartbeat_reply = HeartbeatReply(has_task=True, run_finished=False)
        self.assignment = TaskAssignment(task=None, run_finished=False)
        self.verdict = Verdict(accepted=True, reason="")
        self.stage = StageInput(payload=None)
        self.fetch_delay_s = 0.0
        self.release = threading.Event()  # set to cut a fetch delay short
        self._lock = threading.Lock()

    def _record(self, name: str, arg: object) -> None:
        with self._lock:
            self.calls.append((name, arg))
        if self.error is not None:
            raise self.error

    def names(self) -> list[str]:
        with self._lock:
            return [name for name, _ in self.calls]

    def last(self, name: str) -> object:
        with self._lock:
            found = [arg for called, arg in self.calls if called == name]
        assert found, f"{name} was never called; calls: {self.names()}"
        return found[-1]

    def join(self, request: JoinRequest) -> JoinReply:
        self._record("join", request)
        return self.join_reply

    def heartbeat(
        self, run_id: str, participant: str, telemetry: Mapping[str, float]
    ) -> HeartbeatReply:
        self._record("heartbeat", (run_id, participant, dict(telemetry)))
        return self.heartbeat_reply

    def fetch_task(self, run_id: str, participant: str, wait_s: float) -> TaskAssignment:
        self._record("fetch_task", (run_id, participant, wait_s))
        if self.fetch_delay_s:
            self.release.wait(self.fetch_delay_s)
        return self.assignment

    def submit_update(self, update: Update) -> Verdict:
        self._record("submit_update", update)
        return self.verdict

    def submit_evaluation(self, evaluation: Evaluation) -> Verdict:
        self._record("submit_evaluation", evaluation)
        return self.verdict

    def decline_task(self, declined: Declined) -> Verdict:
        self._record("decline_task", declined)
        return self.verdict

    def fetch_stage(
        self, run_id: str, participant: str, round: int, step: SecAggStep, wait_s: float
    ) -> StageInput:
        self._record("fetch_stage", (run_id, participant, round, step, wait_s))
        if self.fetch_delay_s:
            self.release.wait(self.fetch_delay_s)
        return self.stage

    def submit_stage(
        self, run_id: str, participant: str, round: int, step: SecAggStep, payload: bytes
    ) -> Verdict:
        self._record("submit_stage", (run_id, participant, round, step, payload))
        return self.verdict


def small_parameters(seed: int = 0) -> Parameters:
    rng = np.random.default_rng(seed)
    return Parameters.from_arrays(
        {
            "conv.weight": rng.standard_normal((4, 3, 3, 3)),
            "conv.bias": rng.standard_normal(4),
            "fc.weight": rng.standard_normal((10, 36)),
            "scale": np.float32(1.5),
            "empty": np.zeros((0, 5)),
        }
    )


def make_task(parameters: Parameters, kind: TaskKind = TaskKind.FIT) -> Task:
    return Task(
        run_id="run-7",
        round=4,
        kind=kind,
        config={"lr": 0.05, "epochs": 3, "shuffle": True, "optimizer": "sgd", "big": 2**40},
        parameters=parameters,
        deadline_s=120.5,
    )


@pytest.fixture
def params() -> Parameters:
    """A small model with several arrays, a scalar and an empty array."""
    return small_parameters()


@pytest.fixture(name="make_task")
def make_task_fixture() -> Callable[..., Task]:
    return make_task


@pytest.fixture
def fake() -> Iterator[FakeService]:
    service = FakeService()
    yield service
    service.release.set()


@pytest.fixture
def server(fake: FakeService) -> Iterator[GrpcServer]:
    grpc_server = GrpcServer(fake)
    grpc_server.start()
    yield grpc_server
    fake.release.set()
    grpc_server.stop(grace_s=0)


@pytest.fixture
def client(server: GrpcServer) -> Iterator[GrpcCoordinatorClient]:
    with GrpcCoordinatorClient(server.address, timeout_s=10.0) as grpc_client:
        yield grpc_client
