"""MemoryTransport: calls pass straight through, but nothing mutable is shared."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from conclave.core.errors import RemoteProtocolError
from conclave.core.parameters import Parameters
from conclave.core.types import (
    Evaluation,
    HeartbeatReply,
    JoinRequest,
    Task,
    TaskAssignment,
    Update,
    Verdict,
)
from conclave.transport.memory import MemoryTransport


def test_fetch_task_hands_out_a_read_only_view(
    fake, params: Parameters, make_task: Callable[..., Task]
):
    original = params.copy()
    fake.assignment = TaskAssignment(task=make_task(params))
    transport = MemoryTransport(fake)

    assignment = transport.fetch_task("run-7", "p0", 1.5)

    assert fake.last("fetch_task") == ("run-7", "p0", 1.5)
    task = assignment.task
    assert task is not None
    assert task.parameters == original
    # zero-copy broadcast: one shared buffer, which participants cannot write into
    assert np.shares_memory(task.parameters.flat, params.flat)
    with pytest.raises(ValueError, match="read-only"):
        task.parameters["fc.weight"][:] = 99.0
    with pytest.raises(ValueError, match="read-only"):
        task.parameters.flat[0] = 99.0
    assert isinstance(task.config, dict)
    task.config["lr"] = 1.0
    assert params == original
    assert fake.assignment.task is not None
    assert fake.assignment.task.config["lr"] == 0.05


def test_no_task_passes_through(fake):
    fake.assignment = TaskAssignment(task=None, run_finished=True)
    assert MemoryTransport(fake).fetch_task("run-7", "p0", 0.0) == fake.assignment


def test_submit_update_hands_over_a_copy(fake, params: Parameters):
    transport = MemoryTransport(fake)
    metrics = {"loss": 0.25}
    update = Update(
        run_id="run-7", round=4, participant="p0", num_examples=32, parameters=params,
        metrics=metrics, train_seconds=1.25, digest=params.digest(),
    )
    expected = params.copy()

    assert transport.submit_update(update) == Verdict(accepted=True)

    received = fake.last("submit_update")
    assert isinstance(received, Update)
    params.flat[:] = -1.0  # the participant keeps training on its own buffer
    metrics["loss"] = 9.0
    assert received.parameters == expected
    assert received.metrics == {"loss": 0.25}
    assert not np.shares_memory(received.parameters.flat, params.flat)
    assert (received.run_id, received.round, received.participant) == ("run-7", 4, "p0")
    assert (received.num_examples, received.train_seconds) == (32, 1.25)
    assert received.digest == expected.digest()


def test_other_calls_and_errors_pass_through(fake):
    transport = MemoryTransport(fake)
    request = JoinRequest(participant="p0", capabilities={"gpu": "no"})
    assert transport.join(request) == fake.join_reply
    assert fake.last("join") == request
    assert transport.heartbeat("run-7", "p0", {"cpu": 0.5}) == HeartbeatReply(
        has_task=True, run_finished=False
    )
    assert fake.last("heartbeat") == ("run-7", "p0", {"cpu": 0.5})
    evaluation = Evaluation(run_id="run-7", round=2, participant="p0", loss=0.5, num_examples=8)
    assert transport.submit_evaluation(evaluation) == Verdict(accepted=True)
    assert fake.last("submit_evaluation") == evaluation

    error = RemoteProtocolError("unknown run 'x'")
    fake.error = error
    with pytest.raises(RemoteProtocolError) as info:
        transport.heartbeat("x", "p0", {})
    assert info.value is error
