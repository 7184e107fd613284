"""A trainer with no data: "training" adds N(0, sigma) noise to the model.

It measures the framework, not the model: benchmarks use it (the same workload Flower is
measured on in PEERS.md), and it is a quick way to check a deployment's plumbing.
Factory options: ``dim`` (model size, default 100000), ``sigma`` (default 1e-3),
``examples`` (the example count it reports, default 1), ``delay_s`` (seconds each fit takes,
default 0: a slow participant, for tests of deadlines and stragglers).
"""

from __future__ import annotations

import time

import numpy as np

from conclave.core.errors import ConfigError
from conclave.core.parameters import Layout, Parameters
from conclave.core.types import Config, EvaluateResult, FitResult, TrainerContext


class NoiseTrainer:
    def __init__(self, *, dim: int, sigma: float, examples: int, seed: int,
                 delay_s: float = 0.0) -> None:
        self._delay_s = delay_s
        self._layout = Layout.of({"vector": (dim,)})
        self._sigma = np.float32(sigma)
        self._examples = examples
        self._weights = Parameters.zeros(self._layout)
        self._seed = seed

    def get_weights(self) -> Parameters:
        return self._weights

    def set_weights(self, parameters: Parameters) -> None:
        # Keep a reference: fit() writes a new buffer, so the received model is never mutated.
        self._weights = parameters

    def fit(self, config: Config) -> FitResult:
        if self._delay_s > 0:
            time.sleep(self._delay_s)
        if self._sigma == 0:
            out = self._weights.flat.copy()
        else:
            rng = np.random.default_rng(int(config.get("seed", self._seed)))
            out = rng.standard_normal(self._layout.size, dtype=np.float32)
            out *= self._sigma
            out += self._weights.flat
        return FitResult(parameters=Parameters(self._layout, out), num_examples=self._examples,
                         metrics={"train_loss": 0.0})

    def evaluate(self, config: Config) -> EvaluateResult:
        return EvaluateResult(loss=float(np.abs(self._weights.flat).mean()),
                              num_examples=self._examples, metrics={"accuracy": 0.0})


def make_trainer(ctx: TrainerContext) -> NoiseTrainer:
    try:
        dim = int(ctx.options.get("dim", "100000"))
        sigma = float(ctx.options.get("sigma", "1e-3"))
        examples = int(ctx.options.get("examples", "1"))
        delay_s = float(ctx.options.get("delay_s", "0"))
    except ValueError as exc:
        raise ConfigError("task.options", dict(ctx.options), f"numbers for dim/sigma/examples ({exc})") from exc
    if dim < 1 or examples < 1 or not sigma >= 0 or not 0 <= delay_s < 3600:
        raise ConfigError("task.options", dict(ctx.options),
                          "dim >= 1, examples >= 1, sigma >= 0, 0 <= delay_s < 3600")
    return NoiseTrainer(dim=dim, sigma=sigma, examples=examples, seed=ctx.seed, delay_s=delay_s)
