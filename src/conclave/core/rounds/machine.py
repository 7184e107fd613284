"""The run machine: rounds of select -> configure -> collect -> aggregate -> commit.

Sans-I/O: events in (``handle``), commands out. The machine never reads a clock, sleeps, or
touches the network or the ledger; its randomness comes from generators seeded by the run seed,
the round and the attempt, so a run can be replayed exactly.
"""

from __future__ import annotations

import hashlib

import numpy as np

from conclave.core.aggregation.fedavg import WeightedMean
from conclave.core.aggregation.server_momentum import ServerMomentum
from conclave.core.errors import AggregationError, LocalProtocolError
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
    Reply,
    RunStarted,
    Stage,
    StageReceived,
    StartRound,
    Substitute,
    TaskDeclined,
    Timer,
    UpdateReceived,
)
from conclave.core.rounds.resume import ResumePoint, Resumption
from conclave.core.rounds.secure_steps import SecureSteps
from conclave.core.rounds.submissions import Submissions
from conclave.core.selection.uniform import select_uniform
from conclave.core.spec import RunSpec, StrategyName
from conclave.core.types import (
    ContributionStatus,
    Declined,
    RoundStatus,
    Scalar,
    SecAggStep,
    Task,
    TaskKind,
    Verdict,
)


def participant_seed(run_seed: int, round: int, participant: str) -> int:
    """A per-participant, per-round seed for local training, independent of arrival order."""
    digest = hashlib.sha256(f"{run_seed}/{round}/{participant}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class RunMachine(Submissions, SecureSteps, Resumption):
    """Drives one run. Feed it events with ``handle``; carry out the commands it returns.

    This module holds the events dispatch, membership, the round lifecycle and deadlines; the
    other parts live in ``submissions``, ``secure_steps`` and ``resume``, and the state they
    share and the read-only queries (``stage``, ``round``, ...) in ``state``."""

    def __init__(
        self,
        *,
        run_id: str,
        spec: RunSpec,
        initial: Parameters,
        completed_rounds: int = 0,
        resume: ResumePoint | None = None,
        strategy_state: Parameters | None = None,
    ) -> None:
        """``initial`` is the global model to start from (the last checkpoint when resuming);
        ``strategy_state`` the strategy's state checkpointed with it (FedAvgM's velocity)."""
        if resume is not None:
            completed_rounds = resume.completed_rounds
        if strategy_state is not None and strategy_state.layout != initial.layout:
            raise AggregationError(
                f"strategy state layout [{strategy_state.layout.describe()}] differs from the "
                f"model's [{initial.layout.describe()}]"
            )
        self.run_id = run_id
        self.spec = spec
        self._global = initial
        self._global_digest = initial.digest()
        self._stage = Stage.IDLE
        self._round = completed_rounds
        self._kind = TaskKind.FIT
        self._attempt = 0
        self._available = set()
        self._selected = ()
        self._answered = set()
        self._agg = WeightedMean(initial.layout)
        self._metric_sums = {}
        self._evaluations = {}
        self._last_evaluation = {}
        self._last_evaluation_round = 0
        self._committed = completed_rounds
        self._identity = {}
        self._secure = None
        self._secure_pending = False
        self._arrivals = []
        self._awaiting = None
        self._awaiting_metrics = {}
        self._accepted_digests = {}
        self._substitutions = 0
        strategy = spec.strategy
        self._server = (
            ServerMomentum(server_lr=strategy.server_lr, momentum=strategy.server_momentum)
            if strategy.name is StrategyName.FEDAVGM else None
        )
        self._strategy_state = strategy_state if self._server is not None else None
        self._resume: ResumePoint | None = resume
        self.epoch = 0 if resume is None else resume.epoch
        """How many times this run was resumed: tasks re-issued after a restart are new."""
        if resume is not None:
            self._last_evaluation = {p: dict(m) for p, m in resume.last_evaluation.items()}
            self._last_evaluation_round = resume.last_evaluation_round
            self._accepted_digests = {(resume.completed_rounds, p): d
                                      for p, d in resume.committed_digests.items()}

    # -- queries ------------------------------------------------------------------------
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
            case TaskDeclined(declined=d):
                return self._declined(d)
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
        return self._stop_waiting_for(participant, f"participant lost: {reason}")

    def _declined(self, declined: Declined) -> list[Command]:
        """The participant's trainer failed on its task, or it refused to go on with a secure
        round: record why, stop waiting for it."""
        reason = self._check_submission(declined.kind, declined.participant, declined.round)
        if reason:
            return [Reply(verdict=Verdict(accepted=False, reason=reason))]
        # past the advertise step the trainer is done: what failed is the protocol (a share
        # that did not decrypt, say), as the participant saw it
        during = ("stopped secure aggregation"
                  if self._secure is not None and self._secure.step is not SecAggStep.ADVERTISE
                  else "trainer failed")
        cmds = self._stop_waiting_for(declined.participant, f"{during}: {declined.reason}")
        return [Reply(verdict=Verdict(accepted=True)), *cmds]

    def _stop_waiting_for(self, participant: str, reason: str) -> list[Command]:
        """``participant`` will not answer the open task: it is dropped with ``reason``, a
        substitute takes its task if quorum is at risk, and the round closes if it was the
        last one awaited."""
        if self._secure is not None:
            # the step closes as soon as the others answered, instead of at its deadline;
            # the protocol recovers its masks as for any dropout
            if (self._stage is Stage.TRAINING and self._secure.forget(participant, reason)
                    and not self._secure.pending):
                return self._close_secure_step()
            return []
        if (
            self._stage in (Stage.TRAINING, Stage.EVALUATING)
            and participant in self._selected
            and participant not in self._answered
        ):
            self._answered.add(participant)
            cmds: list[Command] = [
                RecordContribution(
                    round=self._round, kind=self._kind, participant=participant,
                    status=ContributionStatus.DROPPED, reason=reason,
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

    def _candidates(self) -> set[str]:
        """Who may be selected: with secure aggregation, only participants that joined with an
        identity key (a name without one can never take part, so it must not count either)."""
        if self.spec.secure_aggregation is not None:
            return {p for p in self._available if p in self._identity}
        return self._available

    def _enough_participants(self) -> bool:
        return len(self._candidates()) >= self.spec.selection.min_participants

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
        self._selected = select_uniform(
            self._candidates(), self.spec.selection.participants_per_round, rng
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
        if not streamed.is_finite():
            # Each update was finite, but weight x value summed past float32's range: commit
            # nothing rather than a model of Inf (robust aggregation would clip such updates).
            return self._fail_attempt(
                "the aggregate is not finite: the accepted updates' weighted values overflow "
                "float32 (an update with huge values?); the global model is unchanged"
            )
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
        # The failed attempt's updates are discarded: the same update sent for the next
        # attempt is a new contribution, not a resubmission to acknowledge and ignore.
        self._accepted_digests = {k: v for k, v in self._accepted_digests.items()
                                  if k[0] != self._round}
        cmds: list[Command] = [CloseRound(round=self._round, kind=TaskKind.FIT,
                                          status=RoundStatus.FAILED, reason=reason)]
        if self._attempt >= self.spec.selection.max_round_attempts:
            self._stage = Stage.FAILED
            return cmds + [FailRun(reason=f"round {self._round}: {reason}")]
        return cmds + self._begin_fit()

    def _commit(self, parameters: Parameters, metrics: dict[str, float]) -> list[Command]:
        if self._server is not None:
            parameters, state = self._server.step(self._global, parameters, self._strategy_state)
            if not parameters.is_finite():
                return self._fail_attempt(
                    "the server momentum step gives a model that is not finite "
                    "(strategy.server_lr too large?); the global model is unchanged"
                )
            self._strategy_state = state
        self._accepted_digests = {k: v for k, v in self._accepted_digests.items()
                                  if k[0] >= self._round}
        self._global = parameters
        self._global_digest = parameters.digest()
        self._committed = self._round
        self._secure = None
        cmds: list[Command] = [CommitRound(round=self._round, parameters=parameters,
                                           metrics=metrics, strategy_state=self._strategy_state)]
        if self._evaluation_due():
            return cmds + self._begin_evaluation()
        return cmds + self._next_round()

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
        self._last_evaluation_round = self._round
        cmds: list[Command] = [CloseRound(round=self._round, kind=TaskKind.EVALUATE,
                                          status=RoundStatus.COMMITTED, metrics=metrics)]
        return cmds + self._next_round()

    def _finish(self) -> list[Command]:
        self._stage = Stage.FINISHED
        self._selected = ()
        return [FinishRun(rounds_committed=self._committed,
                          final_evaluation=self._last_evaluation)]

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
