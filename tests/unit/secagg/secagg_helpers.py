"""Shared helpers for the secure-aggregation unit tests (deterministic keys and inputs)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conclave.core.secagg import SecAggConfig


class DeterministicRandom:
    """A reproducible stand-in for os.urandom (SHAKE-256 over a seed and a counter)."""

    def __init__(self, seed: int | bytes) -> None:
        raw = seed if isinstance(seed, bytes) else seed.to_bytes(8, "little")
        self._key = hashlib.sha256(raw).digest()
        self._counter = 0

    def __call__(self, size: int) -> bytes:
        self._counter += 1
        return hashlib.shake_256(self._key + self._counter.to_bytes(8, "little")).digest(size)


def ids(n: int) -> list[str]:
    return [f"p{i:03d}" for i in range(n)]


def identities(participants: Sequence[str], seed: int = 0) -> dict[str, Ed25519PrivateKey]:
    rnd = DeterministicRandom(b"identity" + seed.to_bytes(4, "little"))
    return {pid: Ed25519PrivateKey.from_private_bytes(rnd(32)) for pid in participants}


def config(n: int, *, vector_length: int = 16, seed: int = 0, **kwargs: int) -> SecAggConfig:
    return SecAggConfig.create(
        run_id="run-1",
        round=3,
        participants=ids(n),
        graph_seed=DeterministicRandom(seed)(32),
        vector_length=vector_length,
        **kwargs,
    )


def random_inputs(cfg: SecAggConfig, seed: int = 0) -> dict[str, npt.NDArray[np.unsignedinteger]]:
    rng = np.random.default_rng(seed)
    high = np.iinfo(cfg.dtype).max
    return {
        pid: rng.integers(0, high, size=cfg.vector_length, dtype=cfg.dtype, endpoint=True)
        for pid in cfg.participants
    }


def plain_sum(
    cfg: SecAggConfig, inputs: dict[str, npt.NDArray[np.unsignedinteger]], who: frozenset[str]
) -> npt.NDArray[np.unsignedinteger]:
    total = np.zeros(cfg.vector_length, dtype=cfg.dtype)
    for pid in who:
        total += inputs[pid]
    return total
