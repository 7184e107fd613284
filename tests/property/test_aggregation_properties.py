"""Hypothesis: FedAvg and Parameters behave like the math says."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conclave.core.aggregation import WeightedMean
from conclave.core.parameters import Layout, Parameters

finite = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def contributions(draw: st.DrawFn) -> tuple[list[np.ndarray], list[int]]:
    n = draw(st.integers(1, 8))
    d = draw(st.integers(1, 16))
    xs = [draw(hnp.arrays(np.float32, d, elements=finite)) for _ in range(n)]
    ws = [draw(st.integers(1, 10_000)) for _ in range(n)]
    return xs, ws


def mean(xs: list[np.ndarray], ws: list[int]) -> np.ndarray:
    layout = Layout.of({"v": xs[0].shape})
    agg = WeightedMean(layout)
    for x, w in zip(xs, ws, strict=True):
        agg.add(Parameters.from_arrays({"v": x}), w)
    return agg.result().flat


@settings(max_examples=150, deadline=None)
@given(contributions())
def test_weighted_mean_matches_float64_reference(c: tuple[list[np.ndarray], list[int]]) -> None:
    xs, ws = c
    ref = np.average(np.stack(xs).astype(np.float64), axis=0, weights=ws)
    scale = max(1.0, float(np.abs(np.stack(xs)).max()))
    np.testing.assert_allclose(mean(xs, ws), ref, rtol=0, atol=1e-5 * scale * len(xs))


@settings(max_examples=100, deadline=None)
@given(contributions(), st.randoms(use_true_random=False))
def test_weighted_mean_is_permutation_invariant(
    c: tuple[list[np.ndarray], list[int]], rnd: object
) -> None:
    xs, ws = c
    order = list(range(len(xs)))
    rnd.shuffle(order)  # type: ignore[attr-defined]
    a = mean(xs, ws)
    b = mean([xs[i] for i in order], [ws[i] for i in order])
    scale = max(1.0, float(np.abs(np.stack(xs)).max()))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale * len(xs))


@settings(max_examples=100, deadline=None)
@given(contributions(), st.integers(2, 50))
def test_scaling_all_weights_changes_nothing(
    c: tuple[list[np.ndarray], list[int]], k: int
) -> None:
    xs, ws = c
    scale = max(1.0, float(np.abs(np.stack(xs)).max()))
    np.testing.assert_allclose(mean(xs, ws), mean(xs, [w * k for w in ws]), rtol=0,
                               atol=1e-5 * scale * len(xs))


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 32), elements=finite), st.integers(1, 20))
def test_identical_updates_average_to_themselves(x: np.ndarray, n: int) -> None:
    np.testing.assert_allclose(mean([x] * n, list(range(1, n + 1))), x, rtol=1e-6, atol=1e-6)


shapes = st.lists(st.tuples(st.integers(0, 4), st.integers(1, 5)), min_size=1, max_size=4)


@settings(max_examples=100, deadline=None)
@given(shapes, st.integers(0, 2**32 - 1))
def test_parameters_bytes_round_trip_and_views(dims: list[tuple[int, int]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    arrays = {f"a{i}": rng.standard_normal(d).astype(np.float32) for i, d in enumerate(dims)}
    p = Parameters.from_arrays(arrays)
    back = Parameters.from_bytes(p.layout, bytes(p.to_bytes()))
    assert back == p and back.digest() == p.digest()
    for name, arr in arrays.items():
        np.testing.assert_array_equal(p[name], arr)
    # views are zero-copy: writing through a named view changes the flat buffer
    first = p.names[0]
    if p[first].size:
        p[first].reshape(-1)[0] = 123.0
        assert 123.0 in p.flat
        assert back.digest() != p.digest()


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 16).flatmap(lambda d: st.tuples(
    *(hnp.arrays(np.float32, d, elements=finite) for _ in range(3)))),
    st.floats(0.0, 0.99), st.floats(0.01, 2.0))
def test_server_momentum_matches_float64_reference(
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray], momentum: float, lr: float
) -> None:
    from conclave.core.aggregation.server_momentum import ServerMomentum

    x, a, v = arrays
    p = {"x": Parameters.from_arrays({"v": x}), "a": Parameters.from_arrays({"v": a}),
         "v": Parameters.from_arrays({"v": v})}
    new, velocity = ServerMomentum(server_lr=lr, momentum=momentum).step(p["x"], p["a"], p["v"])
    ref_v = np.float64(np.float32(momentum)) * v.astype(np.float64) + (x.astype(np.float64) - a)
    ref_x = x.astype(np.float64) - np.float64(np.float32(lr)) * ref_v
    scale = max(1.0, float(np.abs(np.stack(arrays)).max()))
    np.testing.assert_allclose(velocity.flat, ref_v, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(new.flat, ref_x, rtol=0, atol=1e-5 * scale * 3)
