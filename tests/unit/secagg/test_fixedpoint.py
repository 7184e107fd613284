from __future__ import annotations

import numpy as np
import pytest

from conclave.core.errors import ConfigError, InvalidUpdate
from conclave.core.secagg import FixedPointCodec


def test_round_trip_within_half_a_step_and_clipping() -> None:
    codec = FixedPointCodec(clip=2.0, bits=32, max_summands=100)
    assert codec.headroom_bits == 7
    assert codec.levels == 2**25 - 1
    x = np.linspace(-2.0, 2.0, 1001)
    assert np.max(np.abs(codec.decode(codec.encode(x)) - x)) <= codec.step / 2 * (1 + 1e-9)
    out = codec.decode(codec.encode(np.array([-5.0, 5.0])))
    np.testing.assert_allclose(out, [-2.0, 2.0], atol=1e-12)


def test_sum_of_max_summands_extremes_does_not_wrap() -> None:
    codec = FixedPointCodec(clip=1.0, bits=32, max_summands=1000)
    total = np.zeros(3, dtype=np.uint32)
    for _ in range(1000):
        total += codec.encode(np.array([1.0, -1.0, 0.25]))
    np.testing.assert_allclose(
        codec.decode_sum(total, 1000), [1000.0, -1000.0, 250.0], atol=1000 * codec.step
    )


def test_uint64_ring() -> None:
    codec = FixedPointCodec(clip=1.0, bits=64, max_summands=10)
    enc = codec.encode(np.array([0.5, -0.3]))
    assert enc.dtype == np.uint64
    assert codec.level_bits == 52
    np.testing.assert_allclose(codec.decode(enc), [0.5, -0.3], atol=codec.step)


def test_weighted_mean() -> None:
    codec = FixedPointCodec(clip=1.0, bits=32, max_summands=3)
    updates = [np.array([0.5, -0.5]), np.array([-0.25, 1.0]), np.array([0.0, 0.0])]
    weights = [10.0, 30.0, 0.0]
    total = np.zeros(3, dtype=np.uint32)
    for u, w in zip(updates, weights, strict=True):
        total += codec.encode_weighted(u, w, max_weight=100.0)
    expected = (10 * updates[0] + 30 * updates[1]) / 40
    np.testing.assert_allclose(codec.decode_weighted_mean(total, 3), expected, atol=1e-5)
    zero = codec.encode_weighted(updates[0], 0.0, max_weight=100.0)
    with pytest.raises(InvalidUpdate, match="summed weight is zero"):
        codec.decode_weighted_mean(zero, 1)


def test_rejects_bad_input_and_config() -> None:
    codec = FixedPointCodec(clip=1.0)
    with pytest.raises(InvalidUpdate):
        codec.encode(np.array([np.nan]))
    with pytest.raises(InvalidUpdate):
        codec.encode_weighted(np.array([0.1]), 5.0, max_weight=1.0)
    with pytest.raises(ConfigError, match="clip"):
        FixedPointCodec(clip=0.0)
    with pytest.raises(ConfigError, match="bits"):
        FixedPointCodec(clip=1.0, bits=16)
    with pytest.raises(ConfigError, match="max_summands"):
        FixedPointCodec(clip=1.0, bits=32, max_summands=2**31)
    with pytest.raises(ConfigError, match="count"):
        codec.decode_sum(np.zeros(1, dtype=np.uint32), 2)


def test_weighted_encoding_of_a_change_against_a_base() -> None:
    codec = FixedPointCodec(clip=2.0, bits=32, max_summands=10)
    rng = np.random.default_rng(5)
    base = rng.standard_normal(1000).astype(np.float32)
    new = base + rng.uniform(-3, 3, 1000).astype(np.float32)
    direct = codec.encode_weighted(new, 7.0, 10.0, base=base)
    explicit = codec.encode_weighted(new.astype(np.float64) - base, 7.0, 10.0)
    assert np.array_equal(direct, explicit)
    decoded = codec.decode_sum(direct, 1)
    expected = 0.7 * np.clip(new.astype(np.float64) - base, -2.0, 2.0)
    assert np.abs(decoded[:-1] - expected).max() <= codec.step / 2 + 1e-12
    assert abs(decoded[-1] - 0.7 * 2.0) <= codec.step / 2 + 1e-12
    with pytest.raises(InvalidUpdate, match="NaN"):
        codec.encode_weighted(np.array([np.inf], dtype=np.float32), 1.0, 1.0,
                              base=np.zeros(1, dtype=np.float32))


@pytest.mark.parametrize("bits", [32, 64])
def test_rounding_matches_rint_clip_and_cast_including_ties_and_ends(bits: int) -> None:
    codec = FixedPointCodec(clip=2.0, bits=bits, max_summands=7)
    rng = np.random.default_rng(bits)
    levels = rng.integers(0, codec.levels, 1000).astype(np.float64)
    ties = np.concatenate([levels + 0.5, levels - 0.5, levels + 0.4999, [0.0, 0.5, 1.5]])
    values = ties * codec.step - 2.0  # back to the value domain
    values = np.concatenate([values, [-2.0, 2.0, -9.0, 9.0, 1e-300, -1e-300]])
    got = codec.encode(values)
    x = np.clip(values, -2.0, 2.0) + 2.0
    x /= codec.step
    expected = np.clip(np.rint(x), 0, codec.levels).astype(codec.dtype)
    assert got.dtype == codec.dtype and np.array_equal(got, expected)
    assert got.max() <= codec.levels


@pytest.mark.parametrize("bits", [32, 64])
def test_weighted_encoding_stays_in_levels_at_the_extremes(bits: int) -> None:
    """Values at the clip limits land exactly on L and 0, whatever float rounding does near L
    (with 52 level bits, clip = 1.35 once rounded +clip to 2^52, which wrapped to 0)."""
    for clip in (3.0, 1.35, 1.45, 2.7, 2.75, 2.9, 2.95, 5.35, 0.1, 1e-3):
        codec = FixedPointCodec(clip=clip, bits=bits, max_summands=7)
        x = np.array([clip, -clip, 1e30, -1e30, np.nextafter(clip, 2 * clip), 0.0])
        for weight in (0.0, 1.0, 5.0, 13.0):
            enc = codec.encode_weighted(x, weight, 13.0)
            assert enc.dtype == codec.dtype
            assert int(enc.max()) <= codec.levels
        full = codec.encode_weighted(x, 13.0, 13.0)
        assert full[0] == full[2] == full[4] == codec.levels, clip
        assert full[1] == full[3] == 0
        assert full[-1] == codec.levels  # the weight element: f * clip with f = 1
        assert codec.encode_weighted(np.array([clip]), 2e5, 1e5 * 2)[0] == codec.levels
