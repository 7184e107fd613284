"""FedAvg: the example-weighted mean of participants' models, computed as a stream.

Contributions are folded in one at a time into a single float32 accumulator, so memory stays
O(model size) however many participants report, and no update has to be held once added.
"""

from __future__ import annotations

import numpy as np

from conclave.core.errors import AggregationError, InvalidUpdate
from conclave.core.parameters import DTYPE, Layout, Parameters

MAX_EXAMPLES = 2**40


def validate_update(layout: Layout, parameters: Parameters, num_examples: int) -> None:
    """Raise InvalidUpdate with the reason if an update cannot be aggregated."""
    if parameters.layout != layout:
        raise InvalidUpdate(
            f"wrong shapes: got [{parameters.layout.describe()}], "
            f"expected [{layout.describe()}]"
        )
    if isinstance(num_examples, bool) or not isinstance(num_examples, int):
        raise InvalidUpdate(f"num_examples must be an integer, got {num_examples!r}")
    if not 0 < num_examples <= MAX_EXAMPLES:
        raise InvalidUpdate(f"num_examples must be in 1..{MAX_EXAMPLES}, got {num_examples}")
    flat = parameters.flat
    if not np.isfinite(flat).all():
        bad = int(np.count_nonzero(~np.isfinite(flat)))
        raise InvalidUpdate(f"update contains {bad} NaN or Inf values")


class WeightedMean:
    """Streaming weighted mean: ``add`` each contribution, then ``result``.

    >>> from conclave.core.parameters import Parameters
    >>> agg = WeightedMean(Layout.of({"w": (2,)}))
    >>> agg.add(Parameters.from_arrays({"w": [1.0, 2.0]}), 1)
    >>> agg.add(Parameters.from_arrays({"w": [4.0, 5.0]}), 2)
    >>> agg.result()["w"].tolist()
    [3.0, 4.0]
    """

    __slots__ = ("_acc", "_count", "_layout", "_scratch", "_total")

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._acc = np.zeros(layout.size, dtype=DTYPE)
        self._scratch = np.empty(layout.size, dtype=DTYPE)
        self._total = 0
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> int:
        return self._total

    def add(self, parameters: Parameters, weight: int) -> None:
        """Fold in one contribution. Validation is the caller's job (``validate_update``)."""
        if parameters.layout != self._layout:
            raise AggregationError("contribution layout differs from the aggregator's")
        if weight <= 0:
            raise AggregationError(f"weight must be positive, got {weight}")
        with np.errstate(over="ignore"):  # an overflow shows in result(): is_finite() is False
            np.multiply(parameters.flat, np.float32(weight), out=self._scratch)
            self._acc += self._scratch
        self._total += weight
        self._count += 1

    def result(self) -> Parameters:
        if self._count == 0:
            raise AggregationError("no contributions to aggregate")
        out = np.empty_like(self._acc)
        np.divide(self._acc, np.float32(self._total), out=out)
        return Parameters(self._layout, out)
