"""The simulation engine: the real coordinator, virtual participants, a simulated clock.

The coordinator and participants are the same classes as in a deployment; only the transport
(in-memory) and the clock (simulated, advanced to the next deadline when nobody can make
progress) differ. Runs are deterministic: participants act in sorted order.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from conclave.coordinator.recovery import Recovered
from conclave.coordinator.service import Coordinator, RoundTiming
from conclave.core.errors import TrainerError
from conclave.core.parameters import Parameters
from conclave.core.ports import CoordinatorService, Ledger, Trainer, TrainerFactory
from conclave.core.spec import RunSpec
from conclave.core.types import (
    Config,
    EvaluateResult,
    FitResult,
    SecAggStep,
    Task,
    TrainerContext,
)
from conclave.participant.agent import Answer, ParticipantAgent, build_trainer
from conclave.participant.secure import StageMessage
from conclave.simulation.faults import FaultPlan
from conclave.transport.memory import MemoryTransport

logger = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class SimulatedClock:
    """Wall-clock time plus the waits the simulation skipped.

    Time flows as it really does while participants work (so the ledger shows real dates and
    durations), and jumps ahead to the next deadline when nobody can act, so a simulated
    straggler or dropout costs no real waiting. Outcomes do not depend on real time: deadlines
    are only fired when no participant can make progress.
    """

    def __init__(self, start: float | None = None) -> None:
        self._origin = time.time() if start is None else start
        self._t0 = time.perf_counter()
        self._skipped = 0.0

    def now(self) -> float:
        return self._origin + (time.perf_counter() - self._t0) + self._skipped

    def advance_to(self, t: float) -> None:
        self._skipped += max(0.0, t - self.now())


@dataclass(frozen=True, slots=True)
class SimulationResult:
    summary: dict[str, object]
    run_id: str


class Simulation:
    def __init__(
        self,
        *,
        spec: RunSpec,
        ledger: Ledger,
        factory: TrainerFactory,
        participants: Sequence[str] | None = None,
        on_round: Callable[[RoundTiming], None] | None = None,
        workers: int | None = None,
        before_send: Callable[[str, SecAggStep | str, int], bool | None] | None = None,
        wrap_transport: Callable[[CoordinatorService], CoordinatorService] | None = None,
        resume: Recovered | None = None,
    ) -> None:
        """``before_send(participant, step, round)`` returning False makes that participant
        vanish from a secure round just before sending ``step``; ``wrap_transport`` lets tests
        put an adversary on the wire."""
        self.spec = spec
        names = tuple(participants) if participants is not None else spec.simulation.names()
        self.faults = FaultPlan.from_table(spec.faults, seed=spec.seed, names=names)
        self.workers = max(1, workers if workers is not None else min(4, os.cpu_count() or 1))
        self.clock = SimulatedClock()
        initial = build_trainer(factory, TrainerContext(
            participant=None, seed=spec.seed, options=dict(spec.task.options))).get_weights()
        self.coordinator = Coordinator(
            spec=spec, ledger=ledger,
            initial=initial if resume is None or resume.parameters is None else resume.parameters,
            clock=self.clock.now, on_round=on_round, detect_lost=False, spool=False,
            run_id=None if resume is None else resume.run.run_id,
            resume=None if resume is None else resume.point,
            strategy_state=None if resume is None else resume.strategy_state)
        transport: CoordinatorService = MemoryTransport(self.coordinator)
        if wrap_transport is not None:
            transport = wrap_transport(transport)
        self.crashed: set[str] = set()
        self._late: list[tuple[ParticipantAgent, Answer | None]] = []
        self.agents = [
            ParticipantAgent(name=name, service=transport, trainer=_lazy(factory, name, spec),
                             before_send=functools.partial(self._before_send, before_send, name))
            for name in names
        ]

    def run(self, *, max_idle_advances: int = 1_000_000) -> SimulationResult:
        """Run to the end. Trainers of one wave run in parallel threads (numpy and hashing
        release the GIL); results are submitted in participant order, so the outcome does not
        depend on thread timing. Memory holds at most one window of updates at a time."""
        for agent in self.agents:
            agent.join()
        self.coordinator.start()
        idle = 0
        with ThreadPoolExecutor(max_workers=self.workers,
                                thread_name_prefix="conclave-sim") as pool:
            while not self.coordinator.finished:
                alive = [a for a in self.agents if a.name not in self.crashed]
                work = [(a, t) for a in alive
                        if not a.in_secure_round and (t := a.fetch(0.0)) is not None]
                work = self._apply_faults(work)
                if work:
                    self._perform(pool, work)
                    continue
                secure = [a for a in alive if a.in_secure_round]
                # Secure aggregation sums exactly in a ring: the order of steps cannot change
                # the result, so sessions advance in parallel.
                if secure and any(self._map(pool, lambda a: a.step(0.0), secure)):
                    continue
                due = self.coordinator.next_deadline()
                if due is None:
                    raise RuntimeError("simulation stalled: no participant can act and no deadline")
                idle += 1
                if idle > max_idle_advances:
                    raise RuntimeError("simulation made no progress")
                self.clock.advance_to(due)
                self.coordinator.poll()
                late, self._late = self._late, []
                for agent, result in late:  # slow participants answer after the deadline
                    agent.submit(result)
        return SimulationResult(summary=self.coordinator.summary(),
                                run_id=self.coordinator.run_id)

    def _before_send(self, user: Callable[[str, SecAggStep | str, int], bool | None] | None,
                     name: str, step: SecAggStep | str, round: int) -> bool:
        where = step.value if isinstance(step, SecAggStep) else step
        if self.faults.crashes_before(name, where, round):
            self._crash(name, f"crashed before sending {where} in round {round} "
                              f"(fault injection)")
            return False
        return user is None or user(name, step, round) is not False

    def _crash(self, name: str, reason: str) -> None:
        self.crashed.add(name)
        self.coordinator.mark_lost(name, reason)

    def _apply_faults(self, work: list[tuple[ParticipantAgent, Task]]
                      ) -> list[tuple[ParticipantAgent, Task]]:
        if not self.faults.active:
            return work
        kept = []
        for agent, task in work:
            if self.faults.crashes_before(agent.name, task.kind.value, task.round):
                self._crash(agent.name, f"crashed before sending {task.kind.value} in round "
                                        f"{task.round} (fault injection)")
            elif not self.faults.silent(agent.name, task.round,
                                        int(task.config.get("attempt", 1))):
                kept.append((agent, task))
        return kept

    def _map(self, pool: ThreadPoolExecutor, fn: Callable[[T], R], items: list[T]) -> list[R]:
        if self.workers == 1:
            return [fn(item) for item in items]
        return list(pool.map(fn, items))

    def _perform(self, pool: ThreadPoolExecutor,
                 work: list[tuple[ParticipantAgent, Task]]) -> None:
        window = max(1, 4 * self.workers)
        for start in range(0, len(work), window):
            batch = work[start:start + window]
            results = self._map(pool, lambda at: _prepare(at[0], at[1]), batch)
            for (agent, _), result in zip(batch, results, strict=True):
                if agent.name in self.faults.slow and not isinstance(result, StageMessage):
                    self._late.append((agent, result))
                else:
                    agent.submit(result)


def _prepare(agent: ParticipantAgent, task: Task) -> Answer | None:
    """A virtual participant whose trainer fails declines the task, as a real one does."""
    try:
        return agent.prepare(task)
    except TrainerError as exc:
        agent.stats.failures.append(str(exc))
        logger.error("%s", exc)
        return agent.declined(task, exc)


class _LazyTrainer:
    """Builds the user's trainer on first use, so 1,000 virtual participants cost nothing
    until they are selected."""

    def __init__(self, factory: TrainerFactory, name: str, spec: RunSpec) -> None:
        self._factory = factory
        self._name = name
        self._spec = spec
        self._trainer: Trainer | None = None

    def _get(self) -> Trainer:
        if self._trainer is None:
            self._trainer = build_trainer(self._factory, TrainerContext(
                participant=self._name, seed=self._spec.seed,
                options=dict(self._spec.task.options)))
        return self._trainer

    def get_weights(self) -> Parameters:
        return self._get().get_weights()

    def set_weights(self, parameters: Parameters) -> None:
        self._get().set_weights(parameters)

    def fit(self, config: Config) -> FitResult:
        return self._get().fit(config)

    def evaluate(self, config: Config) -> EvaluateResult:
        return self._get().evaluate(config)


def _lazy(factory: TrainerFactory, name: str, spec: RunSpec) -> Trainer:
    return _LazyTrainer(factory, name, spec)
