"""The simulation engine: the real coordinator, virtual participants, a simulated clock.

The coordinator and participants are the same classes as in a deployment; only the transport
(in-memory) and the clock (simulated, advanced to the next deadline when nobody can make
progress) differ. Runs are deterministic: participants act in sorted order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from conclave.coordinator.service import Coordinator, RoundTiming
from conclave.core.ports import Ledger, Trainer, TrainerFactory
from conclave.core.spec import RunSpec
from conclave.core.parameters import Parameters
from conclave.core.types import Config, EvaluateResult, FitResult, TrainerContext
from conclave.participant.agent import ParticipantAgent
from conclave.transport.memory import MemoryTransport

logger = logging.getLogger(__name__)


class SimulatedClock:
    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance_to(self, t: float) -> None:
        self._now = max(self._now, t)


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
    ) -> None:
        self.spec = spec
        self.clock = SimulatedClock()
        initial = factory(TrainerContext(participant=None, seed=spec.seed,
                                         options=dict(spec.task.options))).get_weights()
        self.coordinator = Coordinator(spec=spec, ledger=ledger, initial=initial,
                                       clock=self.clock.now, on_round=on_round)
        transport = MemoryTransport(self.coordinator)
        names = tuple(participants) if participants is not None else spec.simulation.names()
        self.agents = [
            ParticipantAgent(name=name, service=transport, trainer=_lazy(factory, name, spec))
            for name in names
        ]

    def run(self, *, max_steps: int = 10_000_000) -> SimulationResult:
        for agent in self.agents:
            agent.join()
        self.coordinator.start()
        steps = 0
        while not self.coordinator.finished:
            progressed = False
            for agent in self.agents:
                progressed |= agent.step(0.0)
                steps += 1
            if progressed:
                continue
            due = self.coordinator.next_deadline()
            if due is None:
                raise RuntimeError("simulation stalled: no participant can act and no deadline")
            self.clock.advance_to(due)
            self.coordinator.poll()
            if steps > max_steps:
                raise RuntimeError(f"simulation did not finish within {max_steps} steps")
        return SimulationResult(summary=self.coordinator.summary(),
                                run_id=self.coordinator.run_id)


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
            self._trainer = self._factory(TrainerContext(
                participant=self._name, seed=self._spec.seed, options=dict(self._spec.task.options)))
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
