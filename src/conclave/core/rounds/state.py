"""What the run machine knows: its state, declared once, and the queries that read it.

``RunMachine`` is made of parts, one module each: ``submissions`` (updates and evaluations),
``secure_steps`` (the secure-aggregation steps of a FIT round) and ``resume`` (picking a run
up after a coordinator restart), plus the round lifecycle in ``machine``. Each part subclasses
``RunState``, so all of them see the same typed attributes; ``RunMachine.__init__`` sets them.
The transitions a part needs from another are declared here as abstract methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from conclave.core.aggregation.fedavg import WeightedMean
from conclave.core.aggregation.server_momentum import ServerMomentum
from conclave.core.parameters import Parameters
from conclave.core.rounds.events import Command, Stage
from conclave.core.rounds.secure import SecureRound
from conclave.core.spec import RunSpec
from conclave.core.types import TaskKind, Update


class RunState(ABC):
    """The state of one run's machine and its read-only queries (see the module docstring)."""

    run_id: str
    spec: RunSpec
    epoch: int
    _global: Parameters
    _global_digest: str
    _stage: Stage
    _round: int
    _kind: TaskKind
    _attempt: int
    _available: set[str]
    _selected: tuple[str, ...]
    _answered: set[str]
    _agg: WeightedMean
    _metric_sums: dict[str, tuple[float, int]]
    _evaluations: dict[str, dict[str, float]]
    _last_evaluation: dict[str, dict[str, float]]
    _last_evaluation_round: int
    _committed: int
    _identity: dict[str, bytes]
    _secure: SecureRound | None
    _secure_pending: bool
    _arrivals: list[tuple[str, int]]
    _awaiting: Parameters | None
    _awaiting_metrics: dict[str, float]
    _accepted_digests: dict[tuple[int, str], str]
    _substitutions: int
    _server: ServerMomentum | None
    _strategy_state: Parameters | None

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
    def strategy_state(self) -> Parameters | None:
        """The strategy's state after the last committed round (FedAvgM: its velocity)."""
        return self._strategy_state

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

    # -- transitions one part calls in another --------------------------------------------
    @abstractmethod
    def _next_round(self) -> list[Command]:
        """Start the next FIT round, or finish the run (``machine``)."""

    @abstractmethod
    def _begin_evaluation(self) -> list[Command]:
        """Open the evaluation round for the current round (``machine``)."""

    @abstractmethod
    def _maybe_close(self) -> list[Command]:
        """Close the open round if every selected participant answered (``machine``)."""

    @abstractmethod
    def _fail_attempt(self, why: str) -> list[Command]:
        """Fail this attempt of the FIT round: retry it, or fail the run (``machine``)."""

    @abstractmethod
    def _commit(self, parameters: Parameters, metrics: dict[str, float]) -> list[Command]:
        """Commit the FIT round with the new global model (``machine``)."""

    @abstractmethod
    def _accept(self, update: Update) -> dict[str, float]:
        """Add an accepted update to the round's aggregate (``submissions``)."""
