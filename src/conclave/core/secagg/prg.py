"""A cryptographic pseudo-random generator: AES-256 in counter mode over zeros.

``expand(seed, length, dtype)`` turns a 32-byte seed into ``length`` ring elements. The
keystream of AES-256-CTR with an all-zero nonce is indistinguishable from random as long as
each key is used for one stream, which holds here: every seed is either fresh per round (self
masks) or derived by HKDF from a fresh per-round key agreement (pairwise masks).

Elements are read as little-endian unsigned integers, so the output is the same on every
platform. Throughput is that of OpenSSL's AES-CTR (several GB/s with AES-NI); the only extra
cost is one allocation of the output buffer.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from conclave.core.errors import LocalProtocolError

SEED_BYTES = 32
_ZERO_NONCE = bytes(16)
_BLOCK = 1 << 20  # bytes encrypted per update_into call
_ZEROS = memoryview(bytes(_BLOCK))


def expand_bytes(seed: bytes, nbytes: int) -> bytes:
    """Return ``nbytes`` pseudo-random bytes determined by the 32-byte ``seed``."""
    return bytes(_keystream(seed, nbytes))


def expand(seed: bytes, length: int, dtype: npt.DTypeLike) -> npt.NDArray[np.unsignedinteger]:
    """Expand ``seed`` to a vector of ``length`` unsigned integers of ``dtype`` (uint32/uint64).

    The result is a fresh, writable array (callers add it in place into masks).
    """
    dt = np.dtype(dtype).newbyteorder("<")
    if dt.kind != "u":
        raise LocalProtocolError(f"PRG output dtype must be unsigned, got {dt}")
    if length < 0:
        raise LocalProtocolError(f"PRG length must be >= 0, got {length}")
    buf = _keystream(seed, length * dt.itemsize)
    out = np.frombuffer(buf, dtype=dt)
    return out.astype(dt.newbyteorder("="), copy=False)


def _keystream(seed: bytes, nbytes: int) -> bytearray:
    if len(seed) != SEED_BYTES:
        raise LocalProtocolError(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    out = bytearray(nbytes + 15)  # update_into needs room for one extra block
    view = memoryview(out)
    done = 0
    while done < nbytes:
        step = min(_BLOCK, nbytes - done)
        written = encryptor.update_into(_ZEROS[:step], view[done:])  # a view: no copy
        done += written
    del view
    del out[nbytes:]
    return out
