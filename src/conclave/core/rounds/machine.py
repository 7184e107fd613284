"""The run machine: rounds of select -> configure -> collect -> aggregate -> commit.

Sans-I/O: events in (``handle``), commands out. The machine never reads a clock, sleeps, or
touches the network or the ledger; its randomness comes from generators seeded by the run seed,
the round and the attempt, so a run can be replayed exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from conclave.core.aggregation.fedavg import MAX_EXAMPLES, WeightedMean, validate_update
from conclave.core.errors import ConclaveError, InvalidUpdate, LocalProtocolError
from conclave.core.parameters import Parameters
from conclave.core.rounds.events import (
    AggregateComputed,
    AggregateInOrder,
    ArmTimer,
    CloseRound,
    Command,
    CommitRound,
    DeadlinePassed,
    EvaluationReceived,
    Event,
    FailRun,
    FinishRun,
    ParticipantJoined,
    ParticipantLost,
    RecordContribution,
    RecordStage,
    Reply,
    RunStarted,
    SpoolUpdate,
    Stage,
    StageReceived,
    StartRound,
    Substitute,
    Timer,
    UpdateReceived,
)
from conclave.core.rounds.secure import SecureOutcome, SecureRound
from conclave.core.secagg.config import Stage as SecAggStage
from conclave.core.selection.uniform import select_uniform
from conclave.core.spec import RunSpec
from conclave.core.types import (
    ContributionStatus,
    Evaluation,
    RoundStatus,
    Scalar,
    SecAggStep,
    StageInput,
    Task,
    TaskKind,
    Update,
    Verdict,
)


def participant_seed(run_seed: int, round: int, participant: str) -> int:
    """A per-participant, per-round seed for local training, independent of arrival order."""
    digest = hashlib.sha256(f"{run_seed}/{round}/{participant}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


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
    evaluation_done: bool = True
    """Whether the evaluation due after ``completed_rounds`` (if any) was closed."""
    epoch: int = 1


class RunMachine:
    """Drives one run. Feed it events with ``handle``; carry out the commands it returns."""

    def __init__(
        self,
        *,
        run_id: str,
        spec: RunSpec,
        initial: Parameters,
        completed_rounds: int = 0,
        resume: ResumePoint | None = None,
    ) -> None:
        if resume is not None:
            completed_rounds = resume.completed_rounds
        self.run_id = run_id
        self.spec = spec
        self._global = initial
        self._global_digest = initial.digest()
        self._stage = Stage.IDLE
        self._round = completed_rounds
        self._kind = TaskKind.FIT
        self._attempt = 0
        self._available: set[str] = set()
        self._selected: tuple[str, ...] = ()
        self._answered: set[str] = set()
        self._agg = WeightedMean(initial.layout)
        self._metric_sums: dict[str, tuple[float, int]] = {}
        self._evaluations: dict[str, dict[str, float]] = {}
        self._last_evaluation: dict[str, dict[str, float]] = {}
        self._committed = completed_rounds
        self._identity: dict[str, bytes] = {}
        self._secure: SecureRound | None = None
        self._secure_pending = False
        self._arrivals: list[tuple[str, int]] = []
        self._awaiting: Parameters | None = None
        self._awaiting_metrics: dict[str, float] = {}
        self._accepted_digests: dict[tuple[int, str], str] = {}
        self._substitutions = 0
        self._resume = resume
        self.epoch = 0 if resume is None else resume.epoch
        """How many times this run was resumed: tasks re-issued after a restart are new."""
        if resume is not None:
            self._last_evaluation = {p: dict(m) for p, m in resume.last_evaluation.items()}

    # -- queries ------------------------------------------------------------------------
    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def round(self) -> int:
        return self._round

    @property
    def kind(self) -> TaskKind:
        return self._kind

    @property
    def global_parameters(self) -> Parameters:
        return self._global

    @property
    def rounds_committed(self) -> int:
        return self._committed

    @property
    def available(self) -> frozenset[str]:
        return frozenset(self._available)

    @property
    def last_evaluation(self) -> dict[str, dict[str, float]]:
        """Per-participant results of the most recent closed evaluation round."""
        return {p: dict(m) for p, m in self._last_evaluation.items()}

    @property
    def finished(self) -> bool:
        return self._stage in (Stage.FINISHED, Stage.FAILED)

    def task_for(self, participant: str) -> Task | None:
        """The task ``participant`` should work on now, if any."""
        if self._stage not in (Stage.TRAINING, Stage.EVALUATING) or self._secure_pending:
            return None
        if participant not in self._selected or participant in self._answered:
            return None
        if self._secure is not None and (
            self._secure.step is not SecAggStep.ADVERTISE or participant not in self._secure.pending
        ):
            return None
        config: dict[str, Scalar] = dict(self.spec.task.config)
        if self._secure is not None and self._kind is TaskKind.FIT:
            config["secure_aggregation"] = True
        config["seed"] = participant_seed(self.spec.seed, self._round, participant)
        config["round"] = self._round
        config["attempt"] = self._attempt
        config["epoch"] = self.epoch
        timeout = (
            self.spec.deadlines.round_timeout_s
            if self._kind is TaskKind.FIT
            else self.spec.deadlines.evaluation_timeout_s
        )
        return Task(
            run_id=self.run_id,
            round=self._round,
            kind=self._kind,
            config=config,
            parameters=self._global,
            deadline_s=timeout,
            digest=self._global_digest,
        )

    def stage_input(self, participant: str, round: int, step: SecAggStep) -> StageInput:
        """Secure aggregation: what ``participant`` needs for ``step`` (payload None: not yet)."""
        if self.finished:
            return StageInput(payload=None, aborted=True, reason=f"the run is {self._stage.value}")
        if self._secure is None or round != self._round or self._kind is not TaskKind.FIT:
            return StageInput(payload=None, aborted=True,
                              reason=f"no secure round {round} in progress (round is {self._round})")
        return self._secure.input_for(participant, step)

    # -- events -------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Command]:
        match event:
            case RunStarted():
                if self._stage is not Stage.IDLE:
                    raise LocalProtocolError("the run was already started")
                if self._resume is not None:
                    return self._resume_run(self._resume)
                return self._next_round()
            case AggregateComputed(round=r, parameters=params):
                return self._aggregate_computed(r, params)
            case ParticipantJoined(participant=p, identity_key=key):
                if key:
                    self._identity[p] = key
                return self._joined(p)
            case ParticipantLost(participant=p, reason=reason):
                return self._lost(p, reason)
            case UpdateReceived(update=u, digest=digest):
                return self._update(u, digest)
            case EvaluationReceived(evaluation=e):
                return self._evaluation(e)
            case StageReceived(participant=p, round=r, step=step, payload=payload):
                return self._stage_message(p, r, step, payload)
            case DeadlinePassed(timer=timer, round=r, attempt=a):
                return self._deadline(timer, r, a)
        raise LocalProtocolError(f"unknown event {event!r}")

    # -- membership ---------------------------------------------------------------------
    def _joined(self, participant: str) -> list[Command]:
        self._available.add(participant)
        if self._stage is Stage.WAITING and self._enough_participants():
            return self._begin_fit()
        if self._secure_pending and all(p in self._identity for p in self._selected):
            return self._start_secure()
        return []

    def _lost(self, participant: str, reason: str) -> list[Command]:
        self._available.discard(participant)
        if self._secure is not None:
            return []  # the secure round's step deadlines account for it
        if (
            self._stage in (Stage.TRAINING, Stage.EVALUATING)
            and participant in self._selected
            and participant not in self._answered
        ):
            self._answered.add(participant)
            cmds: list[Command] = [
                RecordContribution(
                    round=self._round, kind=self._kind, participant=participant,
                    status=ContributionStatus.DROPPED, reason=f"participant lost: {reason}",
                )
            ]
            if self._stage is Stage.TRAINING:
                cmds += self._substitute(participant)
            return cmds + self._maybe_close()
        return []

    def _substitute(self, lost: str) -> list[Command]:
        """Give a lost participant's task to one from the pool of available participants that
        were not selected, when the round could otherwise no longer reach quorum."""
        accepted = self._agg.count
        still_possible = accepted + len(set(self._selected) - self._answered)
        if still_possible >= self.spec.selection.min_quorum:
            return []
        pool = sorted(self._available - set(self._selected))
        if self.spec.secure_aggregation is not None or not pool:
            return []
        self._substitutions += 1
        rng = np.random.default_rng([self.spec.seed, self._round, self._attempt,
                                     10_000 + self._substitutions])
        chosen = pool[int(rng.integers(len(pool)))]
        self._selected = tuple(sorted((*self._selected, chosen)))
        return [
            Substitute(round=self._round, attempt=self._attempt, participant=chosen,
                       replaces=lost, selected=self._selected),
            ArmTimer(timer=Timer.FIT, round=self._round, attempt=self._attempt,
                     timeout_s=self.spec.deadlines.round_timeout_s),
        ]

    def _enough_participants(self) -> bool:
        return len(self._available) >= self.spec.selection.min_participants

    # -- round lifecycle ----------------------------------------------------------------
    def _next_round(self) -> list[Command]:
        if self._committed >= self.spec.rounds:
            return self._finish()
        self._round = self._committed + 1
        self._attempt = 0
        return self._begin_fit()

    def _begin_fit(self) -> list[Command]:
        if not self._enough_participants():
            self._stage = Stage.WAITING
            return [ArmTimer(timer=Timer.JOIN, round=self._round, attempt=self._attempt,
                             timeout_s=self.spec.deadlines.join_timeout_s)]
        self._attempt += 1
        rng = np.random.default_rng([self.spec.seed, self._round, self._attempt])
        candidates = self._available
        if self.spec.secure_aggregation is not None:
            candidates = {p for p in self._available if p in self._identity}
        self._selected = select_uniform(
            candidates, self.spec.selection.participants_per_round, rng
        )
        self._kind = TaskKind.FIT
        self._stage = Stage.TRAINING
        self._answered = set()
        self._agg = WeightedMean(self._global.layout)
        self._metric_sums = {}
        self._secure = None
        self._arrivals = []
        self._substitutions = 0
        if self.spec.secure_aggregation is not None:
            failed = self._start_secure()
            if failed:
                return failed
        return [
            StartRound(round=self._round, kind=TaskKind.FIT, attempt=self._attempt,
                       selected=self._selected),
            ArmTimer(timer=Timer.FIT, round=self._round, attempt=self._attempt,
                     timeout_s=self.spec.deadlines.round_timeout_s),
        ]

    def _begin_evaluation(self) -> list[Command]:
        self._attempt = max(self._attempt, 1)
        self._kind = TaskKind.EVALUATE
        self._stage = Stage.EVALUATING
        self._selected = tuple(sorted(self._available))
        self._answered = set()
        self._evaluations = {}
        cmds: list[Command] = [
            StartRound(round=self._round, kind=TaskKind.EVALUATE, attempt=self._attempt,
                       selected=self._selected),
            ArmTimer(timer=Timer.EVALUATE, round=self._round, attempt=self._attempt,
                     timeout_s=self.spec.deadlines.evaluation_timeout_s),
        ]
        return cmds + self._maybe_close()

    def _evaluation_due(self) -> bool:
        every = self.spec.evaluation.every_rounds
        return self._round == self.spec.rounds or (every > 0 and self._round % every == 0)

    def _maybe_close(self) -> list[Command]:
        if set(self._selected) - self._answered:
            return []
        return self._close()

    def _close(self) -> list[Command]:
        if self._stage is Stage.TRAINING:
            return self._close_fit()
        if self._stage is Stage.EVALUATING:
            return self._close_evaluation()
        return []

    def _close_fit(self) -> list[Command]:
        if self._awaiting is not None:
            return []  # already closed; waiting for the canonical-order aggregate
        if self._secure is not None:
            return self._close_secure_step()
        needed = self.spec.selection.min_quorum
        if self._agg.count < needed:
            return self._fail_attempt(
                f"quorum not reached: {self._agg.count} accepted contribution(s), {needed} needed"
            )
        total = self._agg.total_weight
        metrics = {name: value / weight for name, (value, weight) in self._metric_sums.items()}
        metrics["contributions"] = float(self._agg.count)
        metrics["examples"] = float(total)
        streamed = self._agg.result()
        canonical = sorted(self._arrivals)
        if self._arrivals == canonical:
            return self._commit(streamed, metrics)
        self._awaiting, self._awaiting_metrics = streamed, metrics
        return [AggregateInOrder(round=self._round, contributors=tuple(canonical),
                                 streamed=streamed)]

    def _fail_attempt(self, why: str) -> list[Command]:
        reason = (f"{why} (attempt {self._attempt} of "
                  f"{self.spec.selection.max_round_attempts})")
        self._secure = None
        cmds: list[Command] = [CloseRound(round=self._round, kind=TaskKind.FIT,
                                          status=RoundStatus.FAILED, reason=reason)]
        if self._attempt >= self.spec.selection.max_round_attempts:
            self._stage = Stage.FAILED
            return cmds + [FailRun(reason=f"round {self._round}: {reason}")]
        return cmds + self._begin_fit()

    def _commit(self, parameters: Parameters, metrics: dict[str, float]) -> list[Command]:
        self._accepted_digests = {k: v for k, v in self._accepted_digests.items()
                                  if k[0] >= self._round}
        self._global = parameters
        self._global_digest = parameters.digest()
        self._committed = self._round
        self._secure = None
        cmds: list[Command] = [CommitRound(round=self._round, parameters=parameters,
                                           metrics=metrics)]
        if self._evaluation_due():
            return cmds + self._begin_evaluation()
        return cmds + self._next_round()

    # -- resuming -----------------------------------------------------------------------
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

    # -- secure aggregation -------------------------------------------------------------
    def _start_secure(self) -> list[Command]:
        """Set up the secure round for the current selection (empty list when fine)."""
        assert self.spec.secure_aggregation is not None
        self._secure_pending = False
        try:
            self._secure = SecureRound(
                run_id=self.run_id, round=self._round, attempt=self._attempt,
                run_seed=self.spec.seed, selected=self._selected,
                identity_keys=self._identity, spec=self.spec.secure_aggregation,
                global_parameters=self._global,
            )
        except ConclaveError as exc:
            self._stage = Stage.FAILED
            return [FailRun(reason=f"round {self._round}: cannot set up secure aggregation "
                                   f"among {len(self._selected)} participant(s): {exc}")]
        return []

    # -- secure aggregation steps -------------------------------------------------------
    def _stage_message(self, participant: str, round: int, step: SecAggStep,
                       payload: bytes) -> list[Command]:
        secure = self._secure
        if secure is None or round != self._round or self._stage is not Stage.TRAINING:
            reason = (f"stale {step.value} message for round {round}: no secure round "
                      f"{round} is collecting")
            return [Reply(verdict=Verdict(accepted=False, reason=reason))]
        reason = secure.submit(participant, step, payload)
        if reason:
            cmds: list[Command] = [
                RecordContribution(round=round, kind=TaskKind.FIT, participant=participant,
                                   status=ContributionStatus.REJECTED,
                                   reason=f"secure aggregation, {step.value}: {reason}"),
                Reply(verdict=Verdict(accepted=False, reason=reason)),
            ]
        else:
            cmds = [Reply(verdict=Verdict(accepted=True))]
        if not secure.pending:
            cmds += self._close_secure_step()
        return cmds

    def _close_secure_step(self) -> list[Command]:
        secure = self._secure
        assert secure is not None
        cmds: list[Command] = []
        while True:
            step = secure.step
            missing = tuple(sorted(secure.pending))
            outcome = secure.close()
            completions = secure.completions
            done = tuple(sorted(p for p in completions.get(_STAGE_OF[step], frozenset())))
            if outcome is None or outcome.mean is not None:
                cmds.append(RecordStage(round=self._round, step=step, completed=done,
                                        dropped=missing))
            if outcome is not None:
                return cmds + self._secure_outcome(outcome)
            if secure.pending:
                timeout = self.spec.secure_aggregation.stage_timeout_s  # type: ignore[union-attr]
                return cmds + [ArmTimer(timer=Timer.SECAGG, round=self._round,
                                        attempt=self._attempt, timeout_s=timeout)]

    def _secure_outcome(self, outcome: SecureOutcome) -> list[Command]:
        cmds: list[Command] = []
        for p in self._selected:
            if p in outcome.survivors:
                cmds.append(RecordContribution(round=self._round, kind=TaskKind.FIT,
                                               participant=p,
                                               status=ContributionStatus.ACCEPTED))
            elif p in outcome.dropped:
                cmds.append(RecordContribution(round=self._round, kind=TaskKind.FIT,
                                               participant=p, status=ContributionStatus.DROPPED,
                                               reason=outcome.dropped[p]))
        if outcome.mean is None:
            return cmds + self._fail_attempt(outcome.reason)
        needed = self.spec.selection.min_quorum
        if len(outcome.survivors) < needed:
            return cmds + self._fail_attempt(
                f"quorum not reached: {len(outcome.survivors)} survivor(s) of secure "
                f"aggregation, {needed} needed")
        metrics = {"contributions": float(len(outcome.survivors)),
                   "secagg_dropped": float(len(outcome.dropped))}
        return cmds + self._commit(outcome.mean, metrics)

    def _close_evaluation(self) -> list[Command]:
        results = self._evaluations
        metrics: dict[str, float] = {}
        total = sum(r["num_examples"] for r in results.values())
        if results:
            names = set.intersection(*(set(r) for r in results.values())) - {"num_examples"}
            for name in sorted(names):
                if total > 0:
                    metrics[name] = sum(r[name] * r["num_examples"] for r in results.values()) / total
            if "accuracy" in names:
                metrics["mean_accuracy"] = sum(r["accuracy"] for r in results.values()) / len(results)
        metrics["participants"] = float(len(results))
        self._last_evaluation = dict(results)
        cmds: list[Command] = [CloseRound(round=self._round, kind=TaskKind.EVALUATE,
                                          status=RoundStatus.COMMITTED, metrics=metrics)]
        return cmds + self._next_round()

    def _finish(self) -> list[Command]:
        self._stage = Stage.FINISHED
        self._selected = ()
        return [FinishRun(rounds_committed=self._committed,
                          final_evaluation=self._last_evaluation)]

    # -- submissions --------------------------------------------------------------------
    def _check_submission(self, kind: TaskKind, participant: str, round: int) -> str:
        """The reason to reject a submission, or '' if it is for the open task."""
        if self.finished:
            return f"the run is {self._stage.value}"
        if round != self._round or kind is not self._kind or self._stage not in (
            Stage.TRAINING, Stage.EVALUATING
        ):
            return (
                f"stale submission: {kind.value} for round {round}, but the open task is "
                f"{self._kind.value} for round {self._round}"
            )
        if participant not in self._selected:
            return f"{participant} was not selected for {kind.value} round {round}"
        if participant in self._answered:
            return f"duplicate submission: {participant} already answered {kind.value} round {round}"
        return ""

    def _update(self, update: Update, digest: str) -> list[Command]:
        if digest and self._accepted_digests.get((update.round, update.participant)) == digest:
            # The same update again (the participant lost our answer): accepted, once.
            return [Reply(verdict=Verdict(accepted=True, reason="already accepted"))]
        reason = self._check_submission(TaskKind.FIT, update.participant, update.round)
        if not reason and self.spec.secure_aggregation is not None:
            reason = "this run uses secure aggregation: submit stage messages, not an update"
        invalid = False
        if not reason:
            try:
                validate_update(self._global.layout, update.parameters, update.num_examples)
            except InvalidUpdate as exc:
                # The participant answered its task, badly: it counts as answered.
                reason, invalid = str(exc), True
                self._answered.add(update.participant)
        if reason:
            status = (
                ContributionStatus.LATE if reason.startswith("stale") else ContributionStatus.REJECTED
            )
            cmds: list[Command] = [
                RecordContribution(round=update.round, kind=TaskKind.FIT,
                                   participant=update.participant, status=status,
                                   weight=_safe_weight(update.num_examples), digest=digest,
                                   reason=reason, metrics=_finite(update.metrics),
                                   train_seconds=update.train_seconds),
                Reply(verdict=Verdict(accepted=False, reason=reason)),
            ]
            return cmds + (self._maybe_close() if invalid else [])
        metrics = self._accept(update)
        self._accepted_digests[(update.round, update.participant)] = digest
        cmds = [
            SpoolUpdate(round=update.round, participant=update.participant,
                        parameters=update.parameters),
            RecordContribution(round=update.round, kind=TaskKind.FIT,
                               participant=update.participant,
                               status=ContributionStatus.ACCEPTED, weight=update.num_examples,
                               metrics=metrics, digest=digest,
                               train_seconds=update.train_seconds),
            Reply(verdict=Verdict(accepted=True)),
        ]
        return cmds + self._maybe_close()

    def _accept(self, update: Update) -> dict[str, float]:
        if update.digest:
            self._accepted_digests[(update.round, update.participant)] = update.digest
        self._agg.add(update.parameters, update.num_examples)
        self._answered.add(update.participant)
        self._arrivals.append((update.participant, update.num_examples))
        metrics = _finite(update.metrics)
        n = update.num_examples
        for name, value in metrics.items():  # each metric averaged over those who reported it
            total, weight = self._metric_sums.get(name, (0.0, 0))
            self._metric_sums[name] = (total + value * n, weight + n)
        return metrics

    def _evaluation(self, evaluation: Evaluation) -> list[Command]:
        reason = self._check_submission(TaskKind.EVALUATE, evaluation.participant, evaluation.round)
        metrics = _finite(evaluation.metrics)
        invalid = False
        if not reason and (evaluation.num_examples < 0 or not np.isfinite(evaluation.loss)):
            reason = (f"invalid evaluation: loss {evaluation.loss}, "
                      f"num_examples {evaluation.num_examples}")
            invalid = True
            self._answered.add(evaluation.participant)
        if reason:
            return [
                RecordContribution(round=evaluation.round, kind=TaskKind.EVALUATE,
                                   participant=evaluation.participant,
                                   status=ContributionStatus.REJECTED, reason=reason,
                                   metrics=metrics),
                Reply(verdict=Verdict(accepted=False, reason=reason)),
            ] + (self._maybe_close() if invalid else [])
        self._answered.add(evaluation.participant)
        result = dict(metrics)
        result["loss"] = float(evaluation.loss)
        result["num_examples"] = float(evaluation.num_examples)
        self._evaluations[evaluation.participant] = result
        return [
            RecordContribution(round=evaluation.round, kind=TaskKind.EVALUATE,
                               participant=evaluation.participant,
                               status=ContributionStatus.ACCEPTED,
                               weight=evaluation.num_examples, metrics=result),
            Reply(verdict=Verdict(accepted=True)),
        ] + self._maybe_close()

    # -- time ---------------------------------------------------------------------------
    def _deadline(self, timer: Timer, round: int, attempt: int) -> list[Command]:
        if round != self._round or attempt != self._attempt:
            return []
        if timer is Timer.JOIN and self._stage is Stage.WAITING:
            self._stage = Stage.FAILED
            return [FailRun(reason=(
                f"only {len(self._available)} participant(s) available, "
                f"{self.spec.selection.min_participants} needed; waited "
                f"deadlines.join_timeout_s = {self.spec.deadlines.join_timeout_s} s"
            ))]
        if timer is Timer.SECAGG or (timer is Timer.FIT and self._secure is not None):
            if self._stage is not Stage.TRAINING or self._secure is None:
                return []
            if timer is Timer.FIT and self._secure.step is not SecAggStep.ADVERTISE:
                return []
            return self._close_secure_step()
        expected = Stage.TRAINING if timer is Timer.FIT else Stage.EVALUATING
        if timer is Timer.JOIN or self._stage is not expected:
            return []
        cmds: list[Command] = []
        for participant in self._selected:
            if participant not in self._answered:
                self._answered.add(participant)
                cmds.append(RecordContribution(
                    round=self._round, kind=self._kind, participant=participant,
                    status=ContributionStatus.DROPPED, reason="no answer before the deadline",
                ))
        return cmds + self._close()


_STAGE_OF = {
    SecAggStep.ADVERTISE: SecAggStage.ADVERTISE,
    SecAggStep.SHARE: SecAggStage.SHARE,
    SecAggStep.MASKED_INPUT: SecAggStage.MASKED_INPUT,
    SecAggStep.UNMASK: SecAggStage.UNMASK,
}


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {str(k): float(v) for k, v in metrics.items() if np.isfinite(v)}


def _safe_weight(num_examples: int) -> int:
    """The weight to record for a rejected update: its claim, if it is a sane integer."""
    ok = isinstance(num_examples, int) and 0 < num_examples <= MAX_EXAMPLES
    return num_examples if ok else 0
