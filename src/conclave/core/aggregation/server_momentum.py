"""FedAvgM: FedAvg with momentum on the coordinator (Hsu, Qi & Brown, 2019).

The round's FedAvg aggregate ``a`` gives a pseudo-gradient ``g = x - a`` against the global
model ``x``; the coordinator keeps a velocity ``v`` across rounds and steps

    v' = momentum * v + g
    x' = x - server_lr * v'

``v`` is the strategy's state: it lives from one committed round to the next, so it is
checkpointed with the global model and read back when a coordinator resumes a run (without it
a resumed run would silently forget its momentum and drift from an uninterrupted one).
With ``momentum = 0`` and ``server_lr = 1`` the step is FedAvg up to float32 rounding.
Pure float32 arithmetic in a fixed order: the same inputs give bit-identical outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conclave.core.errors import AggregationError
from conclave.core.parameters import DTYPE, Parameters


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerMomentum:
    """The FedAvgM step. ``state`` is the velocity (``None`` before the first round)."""

    server_lr: float = 1.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if not (np.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"server_lr must be a positive number, got {self.server_lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    def step(
        self, global_model: Parameters, aggregate: Parameters, state: Parameters | None
    ) -> tuple[Parameters, Parameters]:
        """Return ``(new global model, new state)``; the inputs are left untouched."""
        if aggregate.layout != global_model.layout:
            raise AggregationError("the aggregate's layout differs from the global model's")
        if state is not None and state.layout != global_model.layout:
            raise AggregationError(
                f"strategy state layout [{state.layout.describe()}] differs from the "
                f"model's [{global_model.layout.describe()}]"
            )
        velocity = np.subtract(global_model.flat, aggregate.flat, dtype=DTYPE)
        if state is not None:
            velocity += np.float32(self.momentum) * state.flat
        model = global_model.flat - np.float32(self.server_lr) * velocity
        return (Parameters(global_model.layout, model.astype(DTYPE, copy=False)),
                Parameters(global_model.layout, velocity))
