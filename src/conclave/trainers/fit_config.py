"""The fit settings every built-in trainer reads from a task's config."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conclave.core.errors import ConfigError
from conclave.core.types import Config


@dataclass(frozen=True, slots=True, kw_only=True)
class FitConfig:
    """How one ``fit`` call trains: ``local_steps`` SGD steps on batches of ``batch_size``.

    ``seed`` fixes the order of the mini-batches; None means the trainer derives one from
    its own seed and the number of fits so far (still deterministic).
    """

    local_steps: int
    batch_size: int
    lr: float
    seed: int | None = None

    @classmethod
    def from_config(cls, config: Config) -> FitConfig:
        """Read and check ``local_steps``, ``batch_size``, ``lr`` and optional ``seed``."""
        return cls(
            local_steps=_positive_int(config, "local_steps"),
            batch_size=_positive_int(config, "batch_size"),
            lr=_positive_float(config, "lr"),
            seed=_seed(config),
        )

    def rng(self, trainer_seed: int, fit_count: int) -> np.random.Generator:
        """The generator for this fit's batch order."""
        if self.seed is not None:
            return np.random.default_rng(self.seed)
        return np.random.default_rng(np.random.SeedSequence([trainer_seed, fit_count]))


def _positive_int(config: Config, key: str) -> int:
    if key not in config:
        raise ConfigError(key, None, "a positive integer is required")
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(key, value, "a positive integer is required")
    return value


def _positive_float(config: Config, key: str) -> float:
    if key not in config:
        raise ConfigError(key, None, "a positive number is required")
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, "a positive number is required")
    number = float(value)
    if not np.isfinite(number) or number <= 0.0:
        raise ConfigError(key, value, "a positive finite number is required")
    return number


def _seed(config: Config) -> int | None:
    value = config.get("seed")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError("seed", value, "a non-negative integer is required")
    return value
