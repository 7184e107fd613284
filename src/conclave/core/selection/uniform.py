"""Uniform random selection, seeded."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def select_uniform(candidates: Iterable[str], k: int, rng: np.random.Generator) -> tuple[str, ...]:
    """Choose ``k`` of ``candidates`` uniformly without replacement (all of them if k <= 0).

    The result depends only on the set of candidates and the rng state, never on the order
    the candidates arrived in, and comes back sorted.
    """
    pool = sorted(set(candidates))
    if k <= 0 or k >= len(pool):
        return tuple(pool)
    idx = rng.choice(len(pool), size=k, replace=False)
    return tuple(sorted(pool[i] for i in idx))
