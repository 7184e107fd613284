"""In-process transport: participants call the coordinator's service directly.

Used by simulations and tests. It behaves like a wire in the one way that matters for
correctness: nothing mutable is shared across it. The global model goes to every participant
as one shared read-only view (zero-copy: 1,000 virtual participants do not hold 1,000 copies;
a trainer that wants to write must copy, as it must anyway on any transport); an update is
copied once (one flat buffer copy, no serialisation); mappings are copied. So a participant
that mutates what it received, or the update it sent, cannot touch the coordinator's state
(and the other way round). Secure-aggregation stage payloads are immutable ``bytes`` and pass
through uncopied (a mutable buffer handed over against the types is frozen into ``bytes``).
``Update.digest`` passes through as the sender computed it (no re-hashing: both sides share
one process and trust each other). Errors the service raises reach the caller unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from conclave.core.parameters import Parameters
from conclave.core.ports import CoordinatorService
from conclave.core.types import (
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


class MemoryTransport:
    """Implements ``CoordinatorService`` by calling ``service`` in the same process."""

    __slots__ = ("_service",)

    def __init__(self, service: CoordinatorService) -> None:
        self._service = service

    def join(self, request: JoinRequest) -> JoinReply:
        request = dataclasses.replace(request, capabilities=dict(request.capabilities))
        return self._service.join(request)

    def heartbeat(
        self, run_id: str, participant: str, telemetry: Mapping[str, float]
    ) -> HeartbeatReply:
        return self._service.heartbeat(run_id, participant, dict(telemetry))

    def fetch_task(self, run_id: str, participant: str, wait_s: float) -> TaskAssignment:
        assignment = self._service.fetch_task(run_id, participant, wait_s)
        task = assignment.task
        if task is None:
            return assignment
        task = dataclasses.replace(
            task, config=dict(task.config), parameters=_read_only(task.parameters)
        )
        return dataclasses.replace(assignment, task=task)

    def submit_update(self, update: Update) -> Verdict:
        update = dataclasses.replace(
            update, metrics=dict(update.metrics), parameters=update.parameters.copy()
        )
        return self._service.submit_update(update)

    def submit_evaluation(self, evaluation: Evaluation) -> Verdict:
        evaluation = dataclasses.replace(evaluation, metrics=dict(evaluation.metrics))
        return self._service.submit_evaluation(evaluation)

    def decline_task(self, declined: Declined) -> Verdict:
        return self._service.decline_task(declined)

    def fetch_stage(
        self, run_id: str, participant: str, round: int, step: SecAggStep, wait_s: float
    ) -> StageInput:
        stage = self._service.fetch_stage(run_id, participant, round, step, wait_s)
        if stage.payload is None or type(stage.payload) is bytes:
            return stage
        return dataclasses.replace(stage, payload=bytes(stage.payload))

    def submit_stage(
        self, run_id: str, participant: str, round: int, step: SecAggStep, payload: bytes
    ) -> Verdict:
        return self._service.submit_stage(run_id, participant, round, step, bytes(payload))


def _read_only(parameters: Parameters) -> Parameters:
    view = parameters.flat.view()
    view.flags.writeable = False
    return Parameters(parameters.layout, view)
