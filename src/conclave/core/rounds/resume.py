"""Resuming a run: where a restarted coordinator picks it up, and how the machine does so.

A coordinator that stopped mid-run reads a ``ResumePoint`` back from its ledger (see
``conclave.coordinator.recovery``) and gives it to a new ``RunMachine``; on ``RunStarted`` the
machine continues the round in progress with the same selection and attempt, and with the
contributions already accepted. This module also commits the canonical-order aggregate the
driver computes for a round whose updates arrived out of order (``AggregateComputed``). A part
of ``RunMachine`` (see ``state``); pure, like the rest of the machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from conclave.core.aggregation.fedavg import WeightedMean
from conclave.core.parameters import Parameters
from conclave.core.rounds.events import ArmTimer, Command, Stage, Timer
from conclave.core.rounds.state import RunState
from conclave.core.types import TaskKind, Update


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumePoint:
    """Where a restarted coordinator picks a run up, as read back from its ledger."""

    completed_rounds: int
    """The last committed FIT round (its checkpoint is the machine's ``initial`` model)."""
    round: int = 0
    """The round in progress when the coordinator stopped (0: none)."""
    kind: TaskKind = TaskKind.FIT
    attempt: int = 1
    selected: tuple[str, ...] = ()
    answered: frozenset[str] = frozenset()
    """Selected participants whose answer for the round in progress was already recorded."""
    accepted: tuple[Update, ...] = ()
    """FIT: the accepted updates of the round in progress (from the spool)."""
    evaluations: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """EVALUATE: the results of the round in progress received so far."""
    last_evaluation: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    last_evaluation_round: int = 0
    """The round ``last_evaluation`` belongs to (0: none yet)."""
    evaluation_done: bool = True
    """Whether the evaluation due after ``completed_rounds`` (if any) was closed."""
    committed_digests: Mapping[str, str] = field(default_factory=dict)
    """Participant -> digest of its accepted update in round ``completed_rounds``: a
    participant that never heard its update was accepted sends it again after the restart,
    and is told "already accepted" rather than "stale"."""
    epoch: int = 1


class Resumption(RunState):
    """The part of ``RunMachine`` that resumes a run and commits in-order aggregates."""

    def _resume_run(self, point: ResumePoint) -> list[Command]:
        """Pick up a run after a coordinator restart: the round in progress continues with the
        same selection and attempt, and with the contributions already accepted."""
        if point.round == 0:
            if not point.evaluation_done and self._committed and self._evaluation_due_for(
                    self._committed):
                self._round = self._committed
                return self._begin_evaluation()
            return self._next_round()
        self._round, self._attempt, self._kind = point.round, point.attempt, point.kind
        self._selected = point.selected
        self._answered = set(point.answered) & set(point.selected)
        if point.kind is TaskKind.EVALUATE:
            self._stage = Stage.EVALUATING
            self._evaluations = {p: dict(m) for p, m in point.evaluations.items()}
            timer = ArmTimer(timer=Timer.EVALUATE, round=self._round, attempt=self._attempt,
                             timeout_s=self.spec.deadlines.evaluation_timeout_s)
            return [timer, *self._maybe_close()]
        self._stage = Stage.TRAINING
        self._agg = WeightedMean(self._global.layout)
        self._metric_sums = {}
        self._arrivals = []
        for update in sorted(point.accepted, key=lambda u: u.participant):
            self._accept(update)
            if update.digest:
                self._accepted_digests[(update.round, update.participant)] = update.digest
        cmds: list[Command] = [ArmTimer(timer=Timer.FIT, round=self._round,
                                        attempt=self._attempt,
                                        timeout_s=self.spec.deadlines.round_timeout_s)]
        if self.spec.secure_aggregation is not None:
            # The protocol state died with the old coordinator: run it again, same selection.
            self._answered = set()
            self._secure_pending = True
            return cmds
        return cmds + self._maybe_close()

    def _evaluation_due_for(self, round: int) -> bool:
        every = self.spec.evaluation.every_rounds
        return round == self.spec.rounds or (every > 0 and round % every == 0)

    def _aggregate_computed(self, round: int, parameters: Parameters) -> list[Command]:
        if self._awaiting is None or round != self._round:
            return []
        metrics = self._awaiting_metrics
        self._awaiting = None
        return self._commit(parameters, metrics)
