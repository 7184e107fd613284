"""The SecAgg+ neighbour graph: a randomly relabelled Harary graph, and default k and t.

All parties compute the same graph from the round's public 32-byte seed and the sorted
participant ids: each id gets the rank of ``SHA-256(HKDF(seed) || id)`` (a uniformly random
permutation), ids are placed on a ring in that order, and each is joined to the ``k / 2``
nearest ids on either side. The result is exactly k-regular (k even, k < n - 1); with
``k >= n - 1`` it is the complete graph, i.e. the original SecAgg of Bonawitz et al.

Defaults (documented choices, not a formal security proof):

* ``default_neighbours(n) = min(n - 1, 2 * ceil(3 * log2 n))``: O(log n) as in Bell et al.
  (CCS 2020); the factor 3 keeps a random Harary graph well connected and leaves slack for
  dropouts (n = 100 gives k = 40, n = 1000 gives 60, n = 10^6 gives 120). Deployments that
  assume a given fraction of corrupt participants should derive k from Bell et al.'s bounds.
* ``default_threshold(k) = k // 2 + 1``: the smallest t with t > k / 2, which is what stops
  the coordinator from collecting t self-mask shares *and* t mask-key shares for one
  participant from its k neighbours. It tolerates just under k / 2 dropped neighbours.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

from conclave.core.errors import ConfigError
from conclave.core.secagg.keys import derive, encode_field

SEED_BYTES = 32


def default_neighbours(n: int) -> int:
    """k for n participants: the complete graph when n is small, else 2 * ceil(3 log2 n)."""
    if n < 2:
        raise ConfigError("participants", n, "at least 2")
    return min(n - 1, 2 * math.ceil(3 * math.log2(n)))


def default_threshold(k: int) -> int:
    """The smallest threshold strictly above k / 2."""
    return k // 2 + 1


def validate_degree(n: int, k: int) -> int:
    """Return the effective degree (clamped to n - 1), or raise ConfigError."""
    if k < 1:
        raise ConfigError("neighbours", k, "an integer >= 1")
    if k >= n - 1:
        return n - 1
    if k % 2:
        raise ConfigError("neighbours", k, f"even when smaller than n - 1 = {n - 1}")
    return k


def validate_threshold(k: int, t: int) -> None:
    """t must satisfy k / 2 < t <= k (a strict majority of the share holders)."""
    if not (2 * t > k and t <= k):
        raise ConfigError("threshold", t, f"an integer with {k}/2 < t <= {k} (neighbours k={k})")


def neighbour_graph(
    seed: bytes, participants: Sequence[str], k: int
) -> Mapping[str, frozenset[str]]:
    """The neighbours of every participant; symmetric, no self loops."""
    ids = sorted(participants)
    n = len(ids)
    if len(set(ids)) != n:
        raise ConfigError("participants", ids, "distinct ids")
    if len(seed) != SEED_BYTES:
        raise ConfigError("graph_seed", seed.hex(), f"{SEED_BYTES} bytes")
    degree = validate_degree(n, k)
    if degree == n - 1:
        everyone = frozenset(ids)
        return {pid: everyone - {pid} for pid in ids}
    key = derive(seed, b"conclave/secagg/v1/graph", b"")
    ring = sorted(ids, key=lambda pid: hashlib.sha256(key + encode_field(pid.encode())).digest())
    half = degree // 2
    graph: dict[str, frozenset[str]] = {}
    for pos, pid in enumerate(ring):
        near = {ring[(pos + off) % n] for off in range(1, half + 1)}
        near |= {ring[(pos - off) % n] for off in range(1, half + 1)}
        graph[pid] = frozenset(near)
    return graph
