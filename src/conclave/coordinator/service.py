"""The coordinator: drives the run machine, keeps the ledger, answers participants.

It implements ``CoordinatorService`` for every transport. All state changes happen under one
lock, and each reaches the ledger before the participant that caused it gets its answer.
Time comes from an injected clock, so the same class runs on the wall clock (gRPC) and on a
simulated clock (``conclave simulate``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from conclave.coordinator.endpoints import ParticipantEndpoints
from conclave.core.aggregation.fedavg import WeightedMean
from conclave.core.errors import LedgerError
from conclave.core.parameters import Parameters
from conclave.core.ports import Ledger
from conclave.core.records import ContributionRecord, ParticipantEvent, RoundRecord, RunRecord
from conclave.core.rounds.events import (
    AggregateComputed,
    AggregateInOrder,
    ArmTimer,
    CloseRound,
    Command,
    CommitRound,
    DeadlinePassed,
    Event,
    FailRun,
    FinishRun,
    ParticipantLost,
    RecordContribution,
    RecordStage,
    Reply,
    RunStarted,
    SpoolUpdate,
    StartRound,
    Substitute,
    Timer,
)
from conclave.core.rounds.machine import RunMachine
from conclave.core.rounds.resume import ResumePoint
from conclave.core.spec import RunSpec
from conclave.core.types import (
    ContributionStatus,
    ParticipantState,
    RoundStatus,
    RunStatus,
    SecAggStep,
    TaskKind,
)

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(slots=True)
class RoundTiming:
    round: int
    kind: TaskKind
    started_at: float
    finished_at: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    status: RoundStatus = RoundStatus.COMMITTED
    """How the attempt ended: COMMITTED, or FAILED (a failed fit round is retried)."""
    reason: str = ""


class Coordinator(ParticipantEndpoints):
    """One run's coordinator. Thread-safe; transports call the service methods (the
    ``CoordinatorService`` methods live in ``endpoints``)."""

    def __init__(
        self,
        *,
        spec: RunSpec,
        ledger: Ledger,
        initial: Parameters,
        clock: Clock = time.time,
        run_id: str | None = None,
        on_round: Callable[[RoundTiming], None] | None = None,
        detect_lost: bool = True,
        spool: bool = True,
        resume: ResumePoint | None = None,
        fault: Callable[[str, int], None] | None = None,
        strategy_state: Parameters | None = None,
    ) -> None:
        """``spool``: make accepted updates durable before acknowledging them, and aggregate
        in canonical order from the spool (off in simulation, whose order is canonical).
        ``resume``: continue run ``run_id`` from its ledger (see ``coordinator.recovery``),
        with ``initial`` and ``strategy_state`` read back from its last checkpoint.
        ``fault(point, round)``: a test hook called at named points (fault injection)."""
        self.spec = spec
        self._detect_lost = detect_lost
        self._spool = spool
        self._fault = fault
        self.run_id = run_id or f"{spec.name}-{uuid.uuid4().hex[:12]}"
        self._ledger = ledger
        self._clock = clock
        self._on_round = on_round
        self._cond = threading.Condition()
        self._machine = RunMachine(run_id=self.run_id, spec=spec, initial=initial,
                                   resume=resume, strategy_state=strategy_state)
        self._timers: dict[tuple[Timer, int, int], float] = {}
        self._last_seen = {}
        self._ever_joined = set()
        self._told_finished = set()
        self._lost = set()
        self._rejected = set()
        self._identities = {}
        self._started = False
        self._status = RunStatus.RUNNING
        self._reason = ""
        self._final_evaluation: dict[str, dict[str, float]] = {}
        self._timings: list[RoundTiming] = []
        self._started_at = clock()
        if resume is None:
            ledger.create_run(RunRecord(
                run_id=self.run_id, name=spec.name, spec_toml=spec.source, seed=spec.seed,
                status=RunStatus.RUNNING, created_at=self._started_at,
            ))
        else:
            ledger.set_run_status(self.run_id, RunStatus.RUNNING,
                                  f"resumed after round {resume.completed_rounds}")
            self._final_evaluation = {p: dict(m) for p, m in resume.last_evaluation.items()}

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Begin the first round as soon as enough participants have joined."""
        with self._cond:
            if self._started:
                return
            self._started = True
            self._apply(RunStarted())

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._status is not RunStatus.RUNNING

    @property
    def status(self) -> RunStatus:
        return self._status

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def global_parameters(self) -> Parameters:
        return self._machine.global_parameters

    @property
    def timings(self) -> list[RoundTiming]:
        return list(self._timings)

    def next_deadline(self) -> float | None:
        """When the earliest armed timer or heartbeat check falls due (clock time)."""
        with self._cond:
            times = list(self._timers.values())
            if self._detect_lost:
                limit = self._lost_after_s()
                times += [seen + limit for p, seen in self._last_seen.items()
                          if p not in self._lost]
            return min(times) if times else None

    def poll(self) -> None:
        """Fire due timers and mark participants that stopped heartbeating as lost."""
        with self._cond:
            now = self._clock()
            limit = self._lost_after_s()
            for participant, seen in sorted(self._last_seen.items()):
                if self._detect_lost and participant not in self._lost and now - seen > limit:
                    self._lost.add(participant)
                    self._event(participant, ParticipantState.LOST,
                                f"no heartbeat for {now - seen:.1f} s")
                    self._apply(ParticipantLost(participant, reason="missed heartbeats"))
            for key, due in sorted(self._timers.items(), key=lambda kv: kv[1]):
                if due <= now and key in self._timers:
                    del self._timers[key]
                    timer, round_, attempt = key
                    self._apply(DeadlinePassed(timer, round_, attempt))

    def wait(self, timeout_s: float | None = None, *, tick_s: float = 0.25) -> bool:
        """Block (wall clock) until the run ends, firing timers on time. True if it ended."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            self.poll()
            with self._cond:
                if self._status is not RunStatus.RUNNING:
                    return True
                due = self.next_deadline()
                pause = tick_s if due is None else max(0.0, min(tick_s, due - self._clock()))
                if end is not None:
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        return False
                    pause = min(pause, remaining)
                self._cond.wait(pause)

    def mark_lost(self, participant: str, reason: str) -> None:
        """An outside failure detector (the simulation's) says ``participant`` is gone."""
        with self._cond:
            if participant in self._ever_joined and participant not in self._lost:
                self._lost.add(participant)
                self._event(participant, ParticipantState.LOST, reason)
                if self._status is RunStatus.RUNNING:
                    self._apply(ParticipantLost(participant, reason=reason))

    def interrupt(self, reason: str) -> None:
        """Record that the run was stopped from outside before it ended (signal, Ctrl-C)."""
        with self._cond:
            if self._status is RunStatus.RUNNING:
                self._finish(RunStatus.INTERRUPTED, reason)
                self._cond.notify_all()

    def linger(self, timeout_s: float) -> bool:
        """After the run ended, wait (wall clock) until every participant still connected has
        been told so, so none of them finds a closed port. True if all were told."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while True:
                waiting = self._ever_joined - self._told_finished - self._lost
                remaining = end - time.monotonic()
                if not waiting or remaining <= 0:
                    return not waiting
                self._cond.wait(min(remaining, 0.1))

    def _lost_after_s(self) -> float:
        fed = self.spec.federation
        return fed.heartbeat_interval_s * fed.lost_after_heartbeats

    # -- carrying out commands ----------------------------------------------------------
    def _apply(self, event: Event) -> list[Command]:
        commands = self._machine.handle(event)
        if commands:
            with self._ledger.transaction():  # all an event changed is recorded at once
                for cmd in commands:
                    self._execute(cmd)
        if commands:
            self._cond.notify_all()
        return commands

    def _execute(self, cmd: Command) -> None:
        now = self._clock()
        match cmd:
            case StartRound(round=r, kind=kind, attempt=attempt, selected=selected):
                self._ledger.start_round(RoundRecord(
                    run_id=self.run_id, round=r, kind=kind, status=RoundStatus.RUNNING,
                    selected=selected, started_at=now, attempt=attempt,
                ))
                self._hit("selection", r)
                at = self._clock()
                self._ledger.record_participant_events([
                    ParticipantEvent(run_id=self.run_id, participant=p,
                                     state=ParticipantState.TASKED, at=at,
                                     detail=f"{kind.value} round {r} attempt {attempt}")
                    for p in selected])
                self._timings.append(RoundTiming(round=r, kind=kind, started_at=now))
                logger.info("round %d (%s) started with %d participant(s)", r, kind.value,
                            len(selected))
            case Substitute(round=r, attempt=attempt, participant=p, replaces=lost,
                            selected=selected):
                started = next((t.started_at for t in reversed(self._timings)
                                if t.round == r and t.kind is TaskKind.FIT), now)
                self._ledger.start_round(RoundRecord(
                    run_id=self.run_id, round=r, kind=TaskKind.FIT, status=RoundStatus.RUNNING,
                    selected=selected, started_at=started, attempt=attempt,
                ))
                self._event(p, ParticipantState.TASKED,
                            f"fit round {r} attempt {attempt}: substitute for {lost}")
                logger.warning("round %d: %s substitutes for %s", r, p, lost)
            case ArmTimer(timer=timer, round=r, attempt=attempt, timeout_s=timeout):
                self._timers = {k: v for k, v in self._timers.items() if k[0] is not timer}
                self._timers[(timer, r, attempt)] = now + timeout
            case RecordContribution():
                self._record_contribution(cmd, now)
            case Reply():
                pass
            case RecordStage(round=r, step=step, completed=done, dropped=missing):
                if step is SecAggStep.MASKED_INPUT:
                    self._hit("unmask", r)
                for p in done:
                    self._event(p, ParticipantState.ACCEPTED,
                                f"secure aggregation round {r}: completed {step.value}")
                for p in missing:
                    self._event(p, ParticipantState.DROPPED,
                                f"secure aggregation round {r}: nothing at {step.value}")
            case SpoolUpdate(round=r, participant=p, parameters=params):
                if self._spool:
                    self._ledger.spool_update(self.run_id, r, p, params)
            case AggregateInOrder(round=r, contributors=contributors, streamed=streamed):
                self._hit("aggregation", r)
                self._apply(AggregateComputed(r, self._aggregate_in_order(r, contributors,
                                                                          streamed)))
            case CommitRound(round=r, parameters=params, metrics=metrics, strategy_state=state):
                self._hit("aggregation", r)
                self._ledger.commit_round(self.run_id, r, params, finished_at=now, metrics=metrics,
                                          strategy_state=state)
                self._hit("commit", r)
                if self._spool:
                    self._ledger.clear_spool(self.run_id, r)
                self._retain_checkpoints()
                self._drop_timers(Timer.FIT)
                self._close_timing(r, TaskKind.FIT, now, metrics)
                logger.info("round %d committed: %s", r, _fmt(metrics))
            case CloseRound(round=r, kind=kind, status=status, metrics=metrics, reason=reason):
                self._ledger.finish_round(self.run_id, r, kind, status, finished_at=now,
                                          metrics=dict(metrics), reason=reason)
                self._drop_timers(Timer.FIT if kind is TaskKind.FIT else Timer.EVALUATE)
                if kind is TaskKind.EVALUATE:
                    self._final_evaluation = self._machine.last_evaluation
                self._close_timing(r, kind, now, metrics, status=status, reason=reason)
                if status is RoundStatus.FAILED:
                    logger.warning("round %d failed: %s", r, reason)
                    if kind is TaskKind.FIT:  # what that attempt accepted is in no model
                        self._ledger.supersede_contributions(self.run_id, r,
                                                             f"attempt failed: {reason}")
                        if self._spool:
                            self._ledger.clear_spool(self.run_id, r)
            case FinishRun(rounds_committed=n, final_evaluation=final):
                self._final_evaluation = {p: dict(m) for p, m in final.items()}
                self._finish(RunStatus.FINISHED, f"{n} round(s) committed")
            case FailRun(reason=reason):
                self._finish(RunStatus.FAILED, reason)

    def _hit(self, point: str, round_: int) -> None:
        if self._fault is not None:
            self._fault(point, round_)

    def _aggregate_in_order(self, round_: int, contributors: tuple[tuple[str, int], ...],
                            streamed: Parameters) -> Parameters:
        """The weighted mean of the spooled updates, in sorted participant order (one update
        in memory at a time), so the model does not depend on the order they arrived in."""
        if not self._spool:
            return streamed
        agg = WeightedMean(streamed.layout)
        for participant, weight in contributors:
            agg.add(self._ledger.load_spooled(self.run_id, round_, participant), weight)
        return agg.result()

    def _retain_checkpoints(self) -> None:
        keep = self.spec.checkpoints
        if keep.keep_last > 0:
            self._ledger.prune_checkpoints(self.run_id, keep_last=keep.keep_last,
                                           keep_every=keep.keep_every)

    def _drop_timers(self, timer: Timer) -> None:
        self._timers = {k: v for k, v in self._timers.items() if k[0] is not timer}

    def _record_contribution(self, cmd: RecordContribution, now: float) -> None:
        self._ledger.record_contribution(ContributionRecord(
            run_id=self.run_id, round=cmd.round, kind=cmd.kind, participant=cmd.participant,
            status=cmd.status, weight=cmd.weight, metrics=dict(cmd.metrics), digest=cmd.digest,
            reason=cmd.reason, received_at=now, train_seconds=cmd.train_seconds,
        ))
        if cmd.status is ContributionStatus.ACCEPTED:
            return  # the contribution row is the record; an event would only repeat it
        state = (ParticipantState.DROPPED if cmd.status is ContributionStatus.DROPPED
                 else ParticipantState.REJECTED)
        detail = f"{cmd.kind.value} round {cmd.round}: {cmd.status.value} ({cmd.reason})"
        logger.warning("%s %s", cmd.participant, detail)
        self._event(cmd.participant, state, detail)

    def _close_timing(self, round_: int, kind: TaskKind, now: float,
                      metrics: Mapping[str, float], *,
                      status: RoundStatus = RoundStatus.COMMITTED, reason: str = "") -> None:
        for timing in reversed(self._timings):
            if timing.round == round_ and timing.kind is kind and timing.finished_at is None:
                timing.finished_at = now
                timing.metrics = dict(metrics)
                timing.status, timing.reason = status, reason
                if self._on_round is not None:
                    self._on_round(timing)
                return

    def _finish(self, status: RunStatus, reason: str) -> None:
        self._status = status
        self._reason = reason
        self._timers.clear()
        self._ledger.set_run_status(self.run_id, status, reason)
        logger.info("run %s %s: %s", self.run_id, status.value, reason)

    def _event(self, participant: str, state: ParticipantState, detail: str) -> None:
        self._ledger.record_participant_event(ParticipantEvent(
            run_id=self.run_id, participant=participant, state=state, at=self._clock(),
            detail=detail,
        ))

    # -- results ------------------------------------------------------------------------
    def _committed_rounds(self) -> list[dict[str, Any]]:
        """The committed FIT rounds with their seconds and metrics: read from the ledger, so a
        resumed run lists the rounds of every process that ran it (this process's own
        timings if the ledger is already closed)."""
        try:
            records = [r for r in self._ledger.rounds(self.run_id)
                       if r.kind is TaskKind.FIT and r.status is RoundStatus.COMMITTED]
        except LedgerError:
            return [_round_row(t.round, t.started_at, t.finished_at, t.metrics)
                    for t in self._timings if t.kind is TaskKind.FIT and t.finished_at]
        return [_round_row(r.round, r.started_at, r.finished_at, r.metrics)
                for r in sorted(records, key=lambda r: r.round)]

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` holds."""
        with self._cond:
            per = {p: dict(m) for p, m in sorted(self._final_evaluation.items())}
            accs = [m["accuracy"] for m in per.values() if "accuracy" in m]
            return {
                "run_id": self.run_id,
                "name": self.spec.name,
                "status": self._status.value,
                "reason": self._reason,
                "seed": self.spec.seed,
                "rounds_planned": self.spec.rounds,
                "rounds_committed": self._machine.rounds_committed,
                "model_digest": self._machine.global_parameters.digest(),
                "final": {
                    "mean_accuracy": sum(accs) / len(accs) if accs else None,
                    "per_participant": per,
                },
                "rounds": self._committed_rounds(),
            }


def _round_row(round_: int, started_at: float, finished_at: float | None,
               metrics: Mapping[str, float]) -> dict[str, Any]:
    return {"round": round_, "seconds": (finished_at or started_at) - started_at,
            "metrics": dict(metrics)}


def _fmt(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
