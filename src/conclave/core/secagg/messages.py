"""Messages of the secure-aggregation stages, with a small length-checked binary codec.

Every message is a frozen dataclass with ``to_bytes()`` and ``from_bytes(data)``. The encoding
is ``MAGIC (4 bytes) || tag (1 byte)`` followed by the fields in declaration order: strings and
byte strings as u32 length + bytes, integers as u64, sequences as u32 count + items, all
little-endian. No pickle. ``from_bytes`` raises :class:`RemoteProtocolError` on a wrong tag,
a truncated buffer, trailing bytes, bad UTF-8 or an absurd count, never anything else.

Stage flow (participant -> coordinator unless noted):
``AdvertiseKeys`` -> (coordinator -> each) ``KeyBundle`` -> ``ShareKeys`` ->
(coordinator -> each) ``ShareBundle`` -> ``MaskedInput`` -> (coordinator -> survivors)
``UnmaskRequest`` -> ``UnmaskResponse``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import numpy as np
import numpy.typing as npt

from conclave.core.errors import RemoteProtocolError

MAGIC = b"CSA1"
T = TypeVar("T")


class _Writer:
    def __init__(self, tag: int) -> None:
        self._parts: list[bytes] = [MAGIC, bytes([tag])]

    def u64(self, value: int) -> _Writer:
        self._parts.append(struct.pack("<Q", value))
        return self

    def raw(self, value: bytes) -> _Writer:
        self._parts.append(struct.pack("<I", len(value)))
        self._parts.append(bytes(value))
        return self

    def text(self, value: str) -> _Writer:
        return self.raw(value.encode("utf-8"))

    def count(self, value: int) -> _Writer:
        self._parts.append(struct.pack("<I", value))
        return self

    def done(self) -> bytes:
        return b"".join(self._parts)


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Reader:
    """Reads fields off one message. Offsets into ``bytes`` and ``unpack_from``, no views:
    a key bundle of n participants is read n times a round, so this is a hot path."""

    def __init__(self, data: bytes, tag: int, name: str) -> None:
        self._data = bytes(data)
        self._pos = 0
        self._name = name
        if self._data[: len(MAGIC)] != MAGIC or self._data[len(MAGIC) : len(MAGIC) + 1] != bytes(
                [tag]):
            raise RemoteProtocolError(f"not a {name} message")
        self._pos = len(MAGIC) + 1

    def _truncated(self) -> RemoteProtocolError:
        return RemoteProtocolError(f"truncated {self._name} message")

    def _u32(self) -> int:
        pos = self._pos
        if pos + 4 > len(self._data):
            raise self._truncated()
        self._pos = pos + 4
        return int(_U32.unpack_from(self._data, pos)[0])

    def u64(self) -> int:
        pos = self._pos
        if pos + 8 > len(self._data):
            raise self._truncated()
        self._pos = pos + 8
        return int(_U64.unpack_from(self._data, pos)[0])

    def raw(self) -> bytes:
        size = self._u32()
        pos = self._pos
        end = pos + size
        if end > len(self._data):
            raise self._truncated()
        self._pos = end
        return self._data[pos:end]

    def text(self) -> str:
        try:
            return self.raw().decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError(f"bad UTF-8 in {self._name} message") from None

    def items(self, read: Callable[[], T]) -> tuple[T, ...]:
        size = self._u32()
        if size > len(self._data) - self._pos:  # every item takes at least one byte
            raise RemoteProtocolError(f"impossible item count in {self._name} message")
        return tuple(read() for _ in range(int(size)))

    def end(self) -> None:
        if self._pos != len(self._data):
            raise RemoteProtocolError(f"trailing bytes after {self._name} message")


@dataclass(frozen=True, slots=True, kw_only=True)
class AdvertiseKeys:
    """A participant's two X25519 public keys for the round, signed by its identity key."""

    TAG: ClassVar[int] = 1
    run_id: str
    round: int
    participant: str
    c_public: bytes
    s_public: bytes
    signature: bytes

    def write(self, w: _Writer) -> _Writer:
        w.text(self.run_id).u64(self.round).text(self.participant)
        return w.raw(self.c_public).raw(self.s_public).raw(self.signature)

    @classmethod
    def read(cls, r: _Reader) -> AdvertiseKeys:
        return cls(
            run_id=r.text(),
            round=r.u64(),
            participant=r.text(),
            c_public=r.raw(),
            s_public=r.raw(),
            signature=r.raw(),
        )

    def to_bytes(self) -> bytes:
        return self.write(_Writer(self.TAG)).done()

    @classmethod
    def from_bytes(cls, data: bytes) -> AdvertiseKeys:
        r = _Reader(data, cls.TAG, cls.__name__)
        msg = cls.read(r)
        r.end()
        return msg


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyBundle:
    """Coordinator -> one participant: the adverts of that participant's neighbours."""

    TAG: ClassVar[int] = 2
    run_id: str
    round: int
    recipient: str
    adverts: tuple[AdvertiseKeys, ...]

    def to_bytes(self) -> bytes:
        w = _Writer(self.TAG).text(self.run_id).u64(self.round).text(self.recipient)
        w.count(len(self.adverts))
        for advert in self.adverts:
            advert.write(w)
        return w.done()

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyBundle:
        r = _Reader(data, cls.TAG, cls.__name__)
        msg = cls(
            run_id=r.text(),
            round=r.u64(),
            recipient=r.text(),
            adverts=r.items(lambda: AdvertiseKeys.read(r)),
        )
        r.end()
        return msg


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedShare:
    """``sender``'s shares (self-mask seed and mask key) for ``recipient``, AES-GCM sealed."""

    sender: str
    recipient: str
    ciphertext: bytes

    def write(self, w: _Writer) -> _Writer:
        return w.text(self.sender).text(self.recipient).raw(self.ciphertext)

    @classmethod
    def read(cls, r: _Reader) -> EncryptedShare:
        return cls(sender=r.text(), recipient=r.text(), ciphertext=r.raw())


def _shares_to_bytes(
    tag: int, run_id: str, rnd: int, who: str, shares: tuple[EncryptedShare, ...]
) -> bytes:
    w = _Writer(tag).text(run_id).u64(rnd).text(who).count(len(shares))
    for share in shares:
        share.write(w)
    return w.done()


@dataclass(frozen=True, slots=True, kw_only=True)
class ShareKeys:
    """Participant -> coordinator: one encrypted share per neighbour that advertised."""

    TAG: ClassVar[int] = 3
    run_id: str
    round: int
    participant: str
    shares: tuple[EncryptedShare, ...]

    def to_bytes(self) -> bytes:
        return _shares_to_bytes(self.TAG, self.run_id, self.round, self.participant, self.shares)

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareKeys:
        r = _Reader(data, cls.TAG, cls.__name__)
        msg = cls(
            run_id=r.text(),
            round=r.u64(),
            participant=r.text(),
            shares=r.items(lambda: EncryptedShare.read(r)),
        )
        r.end()
        return msg


@dataclass(frozen=True, slots=True, kw_only=True)
class ShareBundle:
    """Coordinator -> one participant: the encrypted shares addressed to it."""

    TAG: ClassVar[int] = 4
    run_id: str
    round: int
    recipient: str
    shares: tuple[EncryptedShare, ...]

    def to_bytes(self) -> bytes:
        return _shares_to_bytes(self.TAG, self.run_id, self.round, self.recipient, self.shares)

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareBundle:
        r = _Reader(data, cls.TAG, cls.__name__)
        msg = cls(
            run_id=r.text(),
            round=r.u64(),
            recipient=r.text(),
            shares=r.items(lambda: EncryptedShare.read(r)),
        )
        r.end()
        return msg


@dataclass(frozen=True, slots=True, kw_only=True)
class MaskedInput:
    """A participant's masked vector: raw little-endian ring elements of ``bits`` bits."""

    TAG: ClassVar[int] = 5
    run_id: str
    round: int
    participant: str
    bits: int
    data: bytes

    @classmethod
    def from_vector(
        cls, *, run_id: str, round: int, participant: str, vector: npt.NDArray[np.unsignedinteger]
    ) -> MaskedInput:
        bits = vector.dtype.itemsize * 8
        data = vector.astype(vector.dtype.newbyteorder("<"), copy=False).tobytes()
        return cls(run_id=run_id, round=round, participant=participant, bits=bits, data=data)

    @property
    def vector(self) -> npt.NDArray[np.unsignedinteger]:
        """The masked vector (read-only view); raises if ``data`` does not fit ``bits``."""
        if self.bits not in (32, 64) or len(self.data) % (self.bits // 8):
            raise RemoteProtocolError(f"masked input of {len(self.data)} bytes at {self.bits} bits")
        return np.frombuffer(self.data, dtype=np.dtype(f"<u{self.bits // 8}"))

    def to_bytes(self) -> bytes:
        w = _Writer(self.TAG).text(self.run_id).u64(self.round).text(self.participant)
        return w.u64(self.bits).raw(self.data).done()

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskedInput:
        r = _Reader(data, cls.TAG, cls.__name__)
        msg = cls(run_id=r.text(), round=r.u64(), participant=r.text(), bits=r.u64(), data=r.raw())
        r.end()
        return msg


@dataclass(frozen=True, slots=True, kw_only=True)
class UnmaskRequest:
    """Coordinator -> survivors: who is in the sum (survivors) and who dropped after sharing."""

    TAG: ClassVar[int] = 6
    run_id: str
    round: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]

    def to_bytes(self) -> bytes:
        w = _Writer(self.TAG).text(self.run_id).u64(self.round).count(len(self.survivors))
        for pid in self.survivors:
            w.text(pid)
        w.count(len(self.dropped))
        for pid in self.dropped:
            w.text(pid)
        return w.done()

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        r = _Reader(data, cls.TAG, cls.__name__)
        msg = cls(
            run_id=r.text(), round=r.u64(), survivors=r.items(r.text), dropped=r.items(r.text)
        )
        r.end()
        return msg


@dataclass(frozen=True, slots=True, kw_only=True)
class RevealedShare:
    """One decrypted Shamir share of ``owner``'s secret, revealed to the coordinator."""

    owner: str
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class UnmaskResponse:
    """Survivor -> coordinator: self-mask shares of survivors, mask-key shares of the dropped."""

    TAG: ClassVar[int] = 7
    run_id: str
    round: int
    participant: str
    self_mask_shares: tuple[RevealedShare, ...]
    mask_key_shares: tuple[RevealedShare, ...]

    def to_bytes(self) -> bytes:
        w = _Writer(self.TAG).text(self.run_id).u64(self.round).text(self.participant)
        for group in (self.self_mask_shares, self.mask_key_shares):
            w.count(len(group))
            for share in group:
                w.text(share.owner).raw(share.data)
        return w.done()

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskResponse:
        r = _Reader(data, cls.TAG, cls.__name__)

        def revealed() -> RevealedShare:
            return RevealedShare(owner=r.text(), data=r.raw())

        msg = cls(
            run_id=r.text(),
            round=r.u64(),
            participant=r.text(),
            self_mask_shares=r.items(revealed),
            mask_key_shares=r.items(revealed),
        )
        r.end()
        return msg
