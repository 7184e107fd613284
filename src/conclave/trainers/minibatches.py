"""Mini-batch order shared by the built-in trainers.

The same as a PyTorch ``DataLoader(shuffle=True, drop_last=False)`` that is iterated
again whenever it runs out: every pass over the data is a fresh permutation, cut into
batches of ``batch_size`` (the last one may be smaller). Given the same generator, the numpy
and the torch trainers see exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

IndexArray = npt.NDArray[np.intp]


def minibatch_indices(
    num_examples: int, batch_size: int, steps: int, rng: np.random.Generator
) -> Iterator[IndexArray]:
    """Yield ``steps`` index arrays, reshuffling at the start of every pass."""
    if num_examples <= 0:
        raise ValueError("cannot draw mini-batches from an empty data set")
    if batch_size <= 0 or steps < 0:
        raise ValueError(
            f"batch_size must be positive and steps non-negative, got {batch_size}, {steps}"
        )
    drawn = 0
    while drawn < steps:
        order = rng.permutation(num_examples).astype(np.intp, copy=False)
        for start in range(0, num_examples, batch_size):
            if drawn == steps:
                return
            yield order[start : start + batch_size]
            drawn += 1
