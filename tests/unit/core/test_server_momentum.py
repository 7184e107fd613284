"""FedAvgM's coordinator step: the arithmetic, its state, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from conclave.core.aggregation.server_momentum import ServerMomentum
from conclave.core.errors import AggregationError
from conclave.core.parameters import Parameters


def vec(*values: float) -> Parameters:
    return Parameters.from_arrays({"w": np.array(values, dtype=np.float32)})


def test_two_steps_by_hand() -> None:
    opt = ServerMomentum(server_lr=0.5, momentum=0.9)
    x0 = vec(1.0, 2.0)
    # round 1: g = x0 - a = (0.5, -1); v = g; x1 = x0 - 0.5 v
    x1, v1 = opt.step(x0, vec(0.5, 3.0), None)
    assert v1.flat.tolist() == [0.5, -1.0]
    assert x1.flat.tolist() == [0.75, 2.5]
    # round 2: g = x1 - a = (0.75, 0.5); v = 0.9 v1 + g = (1.2, -0.4); x2 = x1 - 0.5 v
    x2, v2 = opt.step(x1, vec(0.0, 2.0), v1)
    np.testing.assert_allclose(v2.flat, [1.2, -0.4], rtol=1e-6)
    np.testing.assert_allclose(x2.flat, [0.15, 2.7], rtol=1e-6)
    # the inputs are untouched
    assert x0.flat.tolist() == [1.0, 2.0] and v1.flat.tolist() == [0.5, -1.0]


def test_no_momentum_and_unit_step_is_fedavg() -> None:
    rng = np.random.default_rng(3)
    x = Parameters.from_arrays({"a": rng.standard_normal((4, 5)), "b": rng.standard_normal(3)})
    agg = Parameters.from_arrays({"a": rng.standard_normal((4, 5)), "b": rng.standard_normal(3)})
    new, _ = ServerMomentum(server_lr=1.0, momentum=0.0).step(x, agg, None)
    np.testing.assert_allclose(new.flat, agg.flat, atol=1e-6)
    assert new.layout == agg.layout


def test_same_inputs_give_bit_identical_outputs() -> None:
    opt = ServerMomentum(server_lr=0.7, momentum=0.5)
    x, a, v = vec(0.1, 0.2, 0.3), vec(0.3, -0.2, 0.1), vec(1.0, 1.0, -1.0)
    first, second = opt.step(x, a, v), opt.step(x, a, v)
    assert first[0].digest() == second[0].digest() and first[1].digest() == second[1].digest()


@pytest.mark.parametrize(("lr", "momentum"), [(0.0, 0.9), (-1.0, 0.9), (float("nan"), 0.9),
                                              (1.0, 1.0), (1.0, -0.1)])
def test_bad_settings(lr: float, momentum: float) -> None:
    with pytest.raises(ValueError):
        ServerMomentum(server_lr=lr, momentum=momentum)


def test_layouts_must_agree() -> None:
    opt = ServerMomentum()
    with pytest.raises(AggregationError, match="aggregate's layout"):
        opt.step(vec(1.0, 2.0), vec(1.0), None)
    with pytest.raises(AggregationError, match="strategy state layout"):
        opt.step(vec(1.0, 2.0), vec(1.0, 2.0), vec(1.0))
