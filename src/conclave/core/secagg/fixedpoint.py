"""Fixed-point encoding of clipped float updates into the ring Z_(2^bits).

Scheme (``FixedPointCodec(clip=c, bits=b, max_summands=n)``):

* headroom ``h = ceil(log2 n)`` bits are reserved so that a sum of up to ``n`` encoded values
  never wraps modulo 2^b; each value gets ``levels_bits = min(b - h, 52)`` bits (52 keeps every
  level exactly representable in float64, so encoding and decoding are exact apart from the
  quantisation itself);
* ``L = 2^levels_bits - 1`` levels span ``[-c, c]`` with ``step = 2c / L``;
* ``encode(x) = round((clip(x, -c, c) + c) / step)`` in ``[0, L]``; the quantisation error per
  element is at most ``step / 2`` (plus float64 rounding, ~1e-16 relative);
* the ring sum of ``m <= n`` encodings is ``S = sum_i q_i < n * 2^(b-h) <= 2^b``, exact, and
  ``decode_sum(S, m) = S * step - m * c`` estimates ``sum_i clip(x_i)`` within ``m * step / 2``.

FedAvg weights (``encode_weighted``): with ``f = weight / max_weight`` in ``[0, 1]`` a
participant encodes the vector ``f * clip(x)`` (still inside ``[-c, c]``) followed by one extra
element ``f * c``. After summing, ``decode_weighted_mean`` divides the first part by
``(sum of the last element) / c = sum_i f_i``, which is the example-weighted mean of the clipped
updates; each of the two sums carries at most ``m * step / 2`` quantisation error.

With the default uint32 ring and 1000 summands (h = 10), c = 1 gives step = 2 / (2^22 - 1),
about 4.8e-7, below float32 resolution for values near 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from conclave.core.errors import ConfigError, InvalidUpdate

MAX_LEVEL_BITS = 52
RING_DTYPES: dict[int, np.dtype[np.unsignedinteger]] = {
    32: np.dtype(np.uint32),
    64: np.dtype(np.uint64),
}

RingArray = npt.NDArray[np.unsignedinteger]
Floats = npt.NDArray[np.floating]


def ring_dtype(bits: int) -> np.dtype[np.unsignedinteger]:
    """The numpy dtype of the ring Z_(2^bits); bits must be 32 or 64."""
    try:
        return RING_DTYPES[bits]
    except KeyError:
        raise ConfigError("bits", bits, "32 or 64") from None


_ROUNDING_MAGIC = float(2**52)


@dataclass(frozen=True, slots=True, kw_only=True)
class FixedPointCodec:
    """Encode floats in [-clip, clip] into Z_(2^bits) so that ``max_summands`` sums never wrap."""

    clip: float
    bits: int = 32
    max_summands: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError("clip", self.clip, "a finite number > 0")
        ring_dtype(self.bits)
        if self.max_summands < 1:
            raise ConfigError("max_summands", self.max_summands, "an integer >= 1")
        if self.bits - self.headroom_bits < 2:
            raise ConfigError(
                "max_summands", self.max_summands, f"too many summands for a {self.bits}-bit ring"
            )

    @property
    def headroom_bits(self) -> int:
        return math.ceil(math.log2(self.max_summands)) if self.max_summands > 1 else 0

    @property
    def level_bits(self) -> int:
        return min(self.bits - self.headroom_bits, MAX_LEVEL_BITS)

    @property
    def levels(self) -> int:
        """The largest encoded value L; encodings lie in [0, L]."""
        return (1 << self.level_bits) - 1

    @property
    def step(self) -> float:
        """Distance between neighbouring representable values; error per element <= step / 2."""
        return 2.0 * self.clip / self.levels

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger]:
        return ring_dtype(self.bits)

    def encode(self, values: npt.ArrayLike) -> RingArray:
        """Clip to [-clip, clip] and quantise to the nearest level. NaN/Inf are rejected."""
        x = np.array(values, dtype=np.float64)  # a private copy, worked on in place
        return self._encode_in_place(x)

    def _encode_in_place(self, x: Floats) -> RingArray:
        if not np.isfinite(x).all():
            raise InvalidUpdate("update contains NaN or Inf")
        np.clip(x, -self.clip, self.clip, out=x)
        x += self.clip
        x /= self.step
        return self._to_ring(x)

    def _to_ring(self, x: Floats) -> RingArray:
        """Round ``x`` (in levels, about ``[0, L]``) to the nearest integer, ties to even, and
        store it in the ring's dtype. Every level is below 2^52, so adding 2^52 makes float64
        do the rounding and leaves the integer in the low bits of the number's bit pattern:
        one pass instead of rint, then a slow float-to-integer cast.

        The clip is needed even for values computed from clipped inputs: with 52 level bits,
        float rounding of ``(f * clip + clip) / step`` can land above L + 1/2 and round to 2^52,
        which would wrap to 0."""
        np.clip(x, 0.0, float(self.levels), out=x)
        x += _ROUNDING_MAGIC
        encoded: RingArray = x.view(np.uint64).astype(self.dtype)
        if self.dtype != np.uint64:
            return encoded
        encoded &= np.uint64((1 << 52) - 1)  # the 64-bit ring keeps all 52 bits
        return encoded

    def decode(self, encoded: RingArray) -> Floats:
        """Inverse of :meth:`encode` for one participant's (unsummed) vector."""
        return self.decode_sum(encoded, 1)

    def decode_sum(self, total: RingArray, count: int) -> Floats:
        """Decode the ring sum of ``count`` encodings into the float sum of clipped values."""
        if not 1 <= count <= self.max_summands:
            raise ConfigError("count", count, f"between 1 and {self.max_summands}")
        arr = np.asarray(total)
        if arr.dtype != self.dtype:
            raise InvalidUpdate(f"aggregate has dtype {arr.dtype}, expected {self.dtype}")
        decoded: Floats = arr.astype(np.float64) * self.step - count * self.clip
        return decoded

    def encode_weighted(
        self, values: npt.ArrayLike, weight: float, max_weight: float, *,
        base: npt.ArrayLike | None = None,
    ) -> RingArray:
        """Encode ``f * clip(values - base)`` followed by ``f * clip``, where
        ``f = weight / max_weight`` (``base``: subtracted first, in float64; None: zero).

        One float64 buffer, worked on in place: this runs once per participant per round."""
        if not (math.isfinite(max_weight) and max_weight > 0):
            raise ConfigError("max_weight", max_weight, "a finite number > 0")
        if not (math.isfinite(weight) and 0 <= weight <= max_weight):
            raise InvalidUpdate(f"weight {weight!r} outside [0, {max_weight}]")
        flat = np.asarray(values).reshape(-1)
        x = np.empty(flat.size + 1, dtype=np.float64)
        body = x[:-1]
        if base is None:
            body[...] = flat
        else:
            np.subtract(flat, np.asarray(base).reshape(-1), out=body, dtype=np.float64)
        if not np.isfinite(body).all():
            raise InvalidUpdate("update contains NaN or Inf")
        np.clip(body, -self.clip, self.clip, out=body)
        x[-1] = self.clip
        # (f * v + clip) / step, as one multiply and one add
        x *= (weight / max_weight) / self.step
        x += self.clip / self.step
        return self._to_ring(x)

    def decode_weighted_mean(self, total: RingArray, count: int) -> Floats:
        """Weighted mean of the clipped updates from the ring sum of ``count`` weighted encodings.

        Raises :class:`InvalidUpdate` when the summed weight is (numerically) zero.
        """
        decoded = self.decode_sum(total, count)
        weight_sum = float(decoded[-1]) / self.clip
        if weight_sum <= count * self.step / self.clip:
            raise InvalidUpdate(
                "summed weight is zero: nothing to average (example counts are encoded as "
                "fractions of secure_aggregation.max_weight; is it far above the counts?)")
        mean: Floats = decoded[:-1] / weight_sum
        return mean
