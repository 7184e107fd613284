"""Hypothesis properties of secure aggregation: exact sums under dropouts, Shamir, codecs."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conclave.core.errors import QuorumNotReached
from conclave.core.secagg import (
    FixedPointCodec,
    MaskedInput,
    SecAggConfig,
    ShareKind,
    Stage,
    UnmaskRequest,
    prg,
    run_local_round,
    shamir,
)

STAGES = (Stage.ADVERTISE, Stage.SHARE, Stage.MASKED_INPUT, Stage.UNMASK)


class _Random:
    def __init__(self, seed: int) -> None:
        self._key, self._n = seed.to_bytes(8, "little"), 0

    def __call__(self, size: int) -> bytes:
        self._n += 1
        return hashlib.shake_256(self._key + self._n.to_bytes(8, "little")).digest(size)


@st.composite
def rounds(draw: st.DrawFn) -> tuple[SecAggConfig, dict[Stage, frozenset[str]], int]:
    n = draw(st.integers(2, 50))
    ids = [f"u{i}" for i in range(n)]
    complete = n <= 3 or draw(st.booleans())
    k = n - 1 if complete else draw(st.integers(1, (n - 2) // 2)) * 2
    t = draw(st.integers(k // 2 + 1, k))
    bits = draw(st.sampled_from([32, 64]))
    seed = draw(st.integers(0, 2**32))
    cfg = SecAggConfig.create(
        run_id="prop",
        round=seed % 100,
        participants=ids,
        graph_seed=_Random(seed)(32),
        vector_length=draw(st.integers(1, 40)),
        bits=bits,
        neighbours=k,
        threshold=t,
    )
    # at most k - t dropouts in total: every participant keeps >= t live neighbours throughout
    gone = draw(st.lists(st.sampled_from(ids), unique=True, max_size=k - t))
    when = [draw(st.sampled_from(STAGES)) for _ in gone]
    drops = {s: frozenset(p for p, w in zip(gone, when, strict=True) if w is s) for s in STAGES}
    return cfg, drops, seed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds())
def test_unmasked_aggregate_is_the_exact_sum_of_survivors(
    case: tuple[SecAggConfig, dict[Stage, frozenset[str]], int],
) -> None:
    cfg, drops, seed = case
    rng = np.random.default_rng(seed)
    inputs = {
        p: rng.integers(
            0, np.iinfo(cfg.dtype).max, cfg.vector_length, dtype=cfg.dtype, endpoint=True
        )
        for p in cfg.participants
    }
    ident = {
        p: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(p.encode()).digest())
        for p in cfg.participants
    }
    requests: list[UnmaskRequest] = []

    def watch(stage: Stage, pid: str, msg: object) -> object:
        if isinstance(msg, UnmaskRequest):
            requests.append(msg)
        if isinstance(msg, MaskedInput):
            assert not np.array_equal(msg.vector, inputs[pid])  # the coordinator never sees x
        return msg

    out = run_local_round(
        cfg, inputs, ident, dropouts=drops, intercept=watch, random_bytes=_Random(seed)
    )
    expected_survivors = (
        frozenset(cfg.participants)
        - drops[Stage.ADVERTISE]
        - drops[Stage.SHARE]
        - drops[Stage.MASKED_INPUT]
    )
    assert out.aggregate.survivors == expected_survivors
    expected = np.zeros(cfg.vector_length, dtype=cfg.dtype)
    for p in expected_survivors:
        expected += inputs[p]
    assert out.aggregate.vector.dtype == cfg.dtype
    assert np.array_equal(out.aggregate.vector, expected)
    assert not out.participant_errors
    kinds = out.coordinator.revealed_share_kinds
    assert all(kinds[p] is ShareKind.SELF_MASK for p in expected_survivors)
    assert all(
        kinds.get(p, ShareKind.MASK_KEY) is ShareKind.MASK_KEY for p in drops[Stage.MASKED_INPUT]
    )
    for request in requests:
        assert not set(request.survivors) & set(request.dropped)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(4, 12), seed=st.integers(0, 1000))
def test_below_threshold_survivors_fail_closed(n: int, seed: int) -> None:
    cfg = SecAggConfig.create(
        run_id="r",
        round=0,
        participants=[f"u{i}" for i in range(n)],
        graph_seed=_Random(seed)(32),
        vector_length=3,
    )
    survivors = cfg.threshold - 1
    drops = {Stage.MASKED_INPUT: frozenset(cfg.participants[survivors:])}
    ident = {
        p: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(p.encode()).digest())
        for p in cfg.participants
    }
    inputs = {p: np.ones(3, dtype=np.uint32) for p in cfg.participants}
    with pytest.raises(QuorumNotReached):
        run_local_round(cfg, inputs, ident, dropouts=drops, random_bytes=_Random(seed))


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=64),
    n=st.integers(1, 40),
    data=st.data(),
)
def test_shamir_any_t_shares_reconstruct_and_t_minus_1_do_not(
    secret: bytes, n: int, data: st.DataObject
) -> None:
    t = data.draw(st.integers(1, n))
    xs = data.draw(st.lists(st.integers(1, 5000), min_size=n, max_size=n, unique=True))
    (shares,) = shamir.share_secrets([secret], threshold=t, xs=xs, random_bytes=_Random(n))
    subset = data.draw(st.permutations(shares)).copy()[:t]
    assert shamir.reconstruct_secret(subset, threshold=t, secret_len=len(secret)) == secret
    if t > 1 and len(secret) >= 8:  # with fewer shares interpolation lands elsewhere
        assert (
            shamir.reconstruct_secret(subset[:-1], threshold=t - 1, secret_len=len(secret))
            != secret
        )


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=50),
    clip=st.floats(1e-3, 1e3),
    bits=st.sampled_from([32, 64]),
    summands=st.integers(1, 10_000),
)
def test_fixed_point_error_is_at_most_half_a_step(
    values: list[float], clip: float, bits: int, summands: int
) -> None:
    codec = FixedPointCodec(clip=clip, bits=bits, max_summands=summands)
    x = np.array(values)
    clipped = np.clip(x, -clip, clip)
    err = np.abs(codec.decode(codec.encode(x)) - clipped)
    assert np.all(err <= codec.step / 2 + 4 * np.finfo(np.float64).eps * clip)


@settings(max_examples=20, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), length=st.integers(0, 3000))
def test_prg_is_deterministic_and_prefix_consistent(seed: bytes, length: int) -> None:
    a = prg.expand(seed, length, np.uint32)
    assert np.array_equal(a, prg.expand(seed, length, np.uint32))
    assert np.array_equal(a[: length // 2], prg.expand(seed, length // 2, np.uint32))


@settings(max_examples=30, deadline=None)
@given(
    run_id=st.text(max_size=20),
    survivors=st.lists(st.text(min_size=1, max_size=8), max_size=10),
    dropped=st.lists(st.text(min_size=1, max_size=8), max_size=10),
    words=st.lists(st.integers(0, 2**64 - 1), max_size=20),
)
def test_message_codec_round_trips(
    run_id: str, survivors: list[str], dropped: list[str], words: list[int]
) -> None:
    req = UnmaskRequest(run_id=run_id, round=5, survivors=tuple(survivors), dropped=tuple(dropped))
    assert UnmaskRequest.from_bytes(req.to_bytes()) == req
    vec = np.array(words, dtype=np.uint64)
    msg = MaskedInput.from_vector(run_id=run_id, round=2**40, participant="p", vector=vec)
    back = MaskedInput.from_bytes(msg.to_bytes())
    assert back == msg and np.array_equal(back.vector, vec)
