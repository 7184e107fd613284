"""Shamir t-of-n secret sharing of byte strings over the prime field GF(2^31 - 1).

A secret of L bytes is cut into 30-bit chunks (``ceil(8L / 30)`` of them; 9 for a 32-byte key),
and each chunk is shared with its own random polynomial of degree ``t - 1``. Sharing is
information-theoretically hiding per chunk, so the field size does not limit security; it only
has to exceed the number of share holders (x-coordinates are 1..n, n < 2^20 here).

Why this field: with p < 2^31 every product of two field elements fits in a uint64, so the
whole scheme is exact numpy arithmetic with no object arrays:

* sharing is one Vandermonde product ``V (n x t) @ C (t x m)``, done exactly in float64 BLAS by
  splitting both factors into 16-bit limbs (each partial sum stays below 2^52);
* reconstruction uses Lagrange coefficients at 0, computed once per set of x-coordinates and
  kept in a caller-owned :class:`LagrangeCache` (no module-level state).

Random coefficients come from the injected ``random_bytes`` (``os.urandom`` by default) and are
drawn uniformly by rejection, so shares carry no bias.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from conclave.core.errors import LocalProtocolError, RemoteProtocolError

PRIME = (1 << 31) - 1
CHUNK_BITS = 30
MAX_X = 1 << 20  # keeps every limb product sum below 2^53 and x^j arithmetic in range
ELEMENT_BYTES = 4

RandomBytes = Callable[[int], bytes]
U64 = npt.NDArray[np.uint64]
_P = np.uint64(PRIME)


@dataclass(frozen=True, slots=True)
class Share:
    """One holder's share of one secret: its x-coordinate and the packed chunk values."""

    x: int
    data: bytes  # little-endian uint32 per chunk, each < PRIME


def chunk_count(secret_len: int) -> int:
    """Number of field elements used for a secret of ``secret_len`` bytes."""
    return max(1, math.ceil(8 * secret_len / CHUNK_BITS))


def share_len(secret_len: int) -> int:
    """Size in bytes of one :class:`Share` ``data`` for a secret of ``secret_len`` bytes."""
    return chunk_count(secret_len) * ELEMENT_BYTES


def share_secrets(
    secrets: Sequence[bytes],
    *,
    threshold: int,
    xs: Sequence[int],
    random_bytes: RandomBytes = os.urandom,
) -> list[list[Share]]:
    """Share each secret t-of-len(xs); result[s][i] is holder ``xs[i]``'s share of secret s.

    All secrets are shared in one matrix product, but every chunk of every secret has its own
    independent polynomial, so revealing the shares of one secret says nothing about another.
    """
    _check_xs(xs)
    if not 1 <= threshold <= len(xs):
        raise LocalProtocolError(f"threshold {threshold} must be in [1, {len(xs)}]")
    chunks = [_to_chunks(s) for s in secrets]
    widths = [c.shape[0] for c in chunks]
    coeffs = np.empty((threshold, sum(widths)), dtype=np.uint64)
    coeffs[0] = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.uint64)
    coeffs[1:] = _uniform_field(threshold - 1, coeffs.shape[1], random_bytes)
    points = _mulmod_matrix(_powers(np.asarray(xs, dtype=np.uint64), threshold), coeffs)
    packed = points.astype("<u4")
    out: list[list[Share]] = []
    start = 0
    for width in widths:
        block = packed[:, start : start + width]
        out.append([Share(x=int(x), data=block[i].tobytes()) for i, x in enumerate(xs)])
        start += width
    return out


class LagrangeCache:
    """Lagrange coefficients at 0, keyed by the sorted tuple of x-coordinates used."""

    def __init__(self) -> None:
        self._coeffs: dict[tuple[int, ...], U64] = {}

    def __len__(self) -> int:
        return len(self._coeffs)

    def coefficients(self, xs: tuple[int, ...]) -> U64:
        found = self._coeffs.get(xs)
        if found is None:
            found = lagrange_at_zero(xs)
            self._coeffs[xs] = found
        return found


def reconstruct_secret(
    shares: Sequence[Share],
    *,
    threshold: int,
    secret_len: int,
    cache: LagrangeCache | None = None,
) -> bytes:
    """Recover a secret from at least ``threshold`` shares (the ``threshold`` lowest x are used).

    With fewer shares this raises; given wrong or too few shares interpolation silently yields a
    different value, which is exactly what makes t-1 shares useless.
    """
    if len(shares) < threshold:
        raise LocalProtocolError(f"need {threshold} shares to reconstruct, got {len(shares)}")
    chosen = sorted(shares, key=lambda s: s.x)[:threshold]
    xs = tuple(s.x for s in chosen)
    _check_xs(xs)
    expected = share_len(secret_len)
    for share in chosen:
        if len(share.data) != expected:
            raise RemoteProtocolError(
                f"share for x={share.x} has {len(share.data)} bytes, expected {expected}"
            )
    values = np.frombuffer(b"".join(s.data for s in chosen), dtype="<u4").reshape(
        len(chosen), -1).astype(np.uint64)
    if np.any(values >= _P):
        raise RemoteProtocolError("share value outside the field")
    lam = (cache if cache is not None else LagrangeCache()).coefficients(xs)
    terms = (values * lam[:, None]) % _P  # each < 2^31, so the column sums stay < 2^51
    secret_chunks = terms.sum(axis=0, dtype=np.uint64) % _P
    return _from_chunks(secret_chunks, secret_len)


def lagrange_at_zero(xs: tuple[int, ...]) -> U64:
    """Coefficients l_i with f(0) = sum_i l_i f(x_i) for every polynomial of degree < len(xs)."""
    x = np.asarray(xs, dtype=np.uint64)
    size = x.shape[0]
    diff = (x[None, :] + _P - x[:, None]) % _P  # diff[i, j] = x_j - x_i
    num = np.broadcast_to(x[None, :], (size, size)).copy()
    np.fill_diagonal(diff, 1)
    np.fill_diagonal(num, 1)
    numerators = _prod_rows(num)
    denominators = _prod_rows(diff)
    inverses = np.array(_batch_inverse(denominators.tolist()), dtype=np.uint64)
    result: U64 = (numerators * inverses) % _P
    return result


def _batch_inverse(values: list[int]) -> list[int]:
    """Inverses mod p of non-zero ``values`` with one exponentiation (Montgomery's trick):
    invert the product of all, then peel each value off with prefix products."""
    prefix = [1] * (len(values) + 1)
    for i, v in enumerate(values):
        prefix[i + 1] = prefix[i] * v % PRIME
    inv = pow(prefix[-1], PRIME - 2, PRIME)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inv * prefix[i] % PRIME
        inv = inv * values[i] % PRIME
    return out


def _check_xs(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise LocalProtocolError("share x-coordinates must be distinct")
    if any(not 1 <= x < MAX_X for x in xs):
        raise LocalProtocolError(f"share x-coordinates must be in [1, {MAX_X})")


def _to_chunks(secret: bytes) -> U64:
    count = chunk_count(len(secret))
    value = int.from_bytes(secret, "little")
    mask = (1 << CHUNK_BITS) - 1
    return np.array([(value >> (CHUNK_BITS * i)) & mask for i in range(count)], dtype=np.uint64)


def _from_chunks(chunks: U64, secret_len: int) -> bytes:
    value = 0
    for i, chunk in enumerate(chunks.tolist()):
        value |= int(chunk) << (CHUNK_BITS * i)
    return (value % (1 << (8 * secret_len))).to_bytes(secret_len, "little")


def _uniform_field(rows: int, cols: int, random_bytes: RandomBytes) -> U64:
    """Uniform elements of GF(p) by rejection: 31 random bits, redraw the single value p."""
    count = rows * cols
    out = np.frombuffer(random_bytes(4 * count), dtype="<u4").astype(np.uint64) & _P
    bad = np.flatnonzero(out == _P)
    while bad.size:
        fresh = np.frombuffer(random_bytes(4 * bad.size), dtype="<u4").astype(np.uint64) & _P
        out[bad] = fresh
        bad = bad[fresh == _P]
    return out.reshape(rows, cols)


def _powers(x: U64, count: int) -> U64:
    """V[i, j] = x_i^j mod p for j < count, built by doubling the known block of columns."""
    out = np.empty((x.shape[0], count), dtype=np.uint64)
    out[:, 0] = 1
    known = 1
    step = x % _P  # x_i^known
    while known < count:
        grow = min(known, count - known)
        out[:, known : known + grow] = (out[:, :grow] * step[:, None]) % _P
        known += grow
        step = (step * step) % _P
    return out


def _mulmod_matrix(a: U64, b: U64) -> U64:
    """(a @ b) mod p exactly, for entries < p and inner dimension < 2^20, via 16-bit limbs."""
    lo16 = np.uint64(0xFFFF)
    a_lo, a_hi = (a & lo16).astype(np.float64), (a >> np.uint64(16)).astype(np.float64)
    b_lo, b_hi = (b & lo16).astype(np.float64), (b >> np.uint64(16)).astype(np.float64)
    ll = (a_lo @ b_lo).astype(np.uint64) % _P
    mid = ((a_lo @ b_hi).astype(np.uint64) + (a_hi @ b_lo).astype(np.uint64)) % _P
    hh = (a_hi @ b_hi).astype(np.uint64) % _P
    out: U64 = (ll + (mid << np.uint64(16)) % _P + (hh << np.uint64(32)) % _P) % _P
    return out


def _prod_rows(m: U64) -> U64:
    """Product of each row mod p, by pairwise tree reduction (values stay below 2^62)."""
    while m.shape[1] > 1:
        if m.shape[1] % 2:
            m = np.concatenate([m, np.ones((m.shape[0], 1), dtype=np.uint64)], axis=1)
        m = (m[:, 0::2] * m[:, 1::2]) % _P
    result: U64 = m[:, 0]
    return result
