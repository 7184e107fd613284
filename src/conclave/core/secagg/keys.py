"""Per-round keys, signed key adverts, key agreement, key derivation and share encryption.

Each participant makes, for every round, two X25519 key pairs: ``c`` (agreement for the
AES-GCM keys that protect shares routed through the coordinator) and ``s`` (agreement for the
pairwise mask seeds), plus a 32-byte self-mask seed ``b``. The two public keys are signed with
the participant's long-term Ed25519 identity key over
``DOMAIN || run_id || round || participant || c_public || s_public`` (length-prefixed), so the
coordinator cannot substitute keys without the signature failing.

Derivations (HKDF-SHA256, 32 bytes, no salt; ``ctx`` = length-prefixed run id and round):

* pairwise mask seed: ``info = b"conclave/secagg/v1/pairwise" || ctx``;
* share encryption key: ``info = b"conclave/secagg/v1/share" || ctx || sender || recipient``,
  so the two directions of a pair use different keys;
* self-mask PRG seed: ``info = b"conclave/secagg/v1/self" || ctx`` applied to ``b``.

Share ciphertexts are ``nonce (12 random bytes) || AES-GCM(key, nonce, plaintext, aad)`` with
``aad = ctx || sender || recipient``: a ciphertext moved to another pair or round fails.

Libraries: signature checks and X25519 agreements, the bulk of a participant's public-key work
(k checks and 2k agreements per round), run in libsodium through PyNaCl; AES and signing use
``cryptography``, HKDF the standard library's HMAC. libsodium checks an Ed25519 signature about
twice as fast as the OpenSSL build here (~55 us against ~105 us) and both of its calls release
the GIL, so the virtual participants of a simulation run them in parallel. Keys and results are
the standard RFC 7748 / RFC 8032 / RFC 5869 bytes whichever library computes them (tested).
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl import bindings as sodium
from nacl.exceptions import CryptoError

from conclave.core.errors import RemoteProtocolError

RandomBytes = Callable[[int], bytes]

KEY_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_BYTES = 12
_ADVERT_DOMAIN = b"conclave/secagg/v1/advertise"


def encode_field(data: bytes) -> bytes:
    """Length-prefix ``data`` (u32 little-endian) so concatenations are unambiguous."""
    return struct.pack("<I", len(data)) + data


def round_context(run_id: str, round_number: int) -> bytes:
    """The bytes that bind every derivation and signature to one run and round."""
    return encode_field(run_id.encode("utf-8")) + struct.pack("<Q", round_number)


@dataclass(frozen=True, slots=True)
class RoundKeys:
    """One participant's secrets for one round. Never leaves the participant (only shares do).

    The X25519 private keys are kept as their raw 32 bytes (RFC 7748 scalars)."""

    c_private: bytes
    s_private: bytes
    self_mask_seed: bytes
    c_public: bytes
    s_public: bytes

    @classmethod
    def generate(cls, random_bytes: RandomBytes = os.urandom) -> RoundKeys:
        c = _fresh(random_bytes, KEY_BYTES)
        s = _fresh(random_bytes, KEY_BYTES)
        return cls(c_private=c, s_private=s, self_mask_seed=_fresh(random_bytes, KEY_BYTES),
                   c_public=x25519_public(c), s_public=x25519_public(s))


def x25519_public(private: bytes) -> bytes:
    """The X25519 public key of a raw 32-byte private key."""
    if len(private) != KEY_BYTES:
        raise ValueError(f"X25519 private key must be {KEY_BYTES} bytes, got {len(private)}")
    return bytes(sodium.crypto_scalarmult_base(private))


def advert_payload(
    run_id: str, round_number: int, participant: str, c_public: bytes, s_public: bytes
) -> bytes:
    """The exact bytes an advert's Ed25519 signature covers."""
    return (
        _ADVERT_DOMAIN
        + round_context(run_id, round_number)
        + encode_field(participant.encode("utf-8"))
        + encode_field(c_public)
        + encode_field(s_public)
    )


def sign_advert(identity: Ed25519PrivateKey, payload: bytes) -> bytes:
    return identity.sign(payload)


def verify_advert(identity: Ed25519PublicKey | bytes, payload: bytes, signature: bytes) -> None:
    """Raise :class:`RemoteProtocolError` unless ``signature`` is valid for ``payload``.

    ``identity`` is the signer's Ed25519 public key, as a key object or its 32 raw bytes."""
    raw = identity if isinstance(identity, bytes) else identity.public_bytes_raw()
    if len(signature) != SIGNATURE_BYTES or len(raw) != KEY_BYTES:
        raise RemoteProtocolError("key advert signature does not verify")
    try:
        sodium.crypto_sign_open(signature + payload, raw)
    except (CryptoError, ValueError, TypeError):
        raise RemoteProtocolError("key advert signature does not verify") from None


_FIELD_PRIME = 2**255 - 19
_PROBE = bytes([0x48]) + bytes(30) + bytes([0x40])  # a clamped scalar (multiple of 8)


def check_public_key(public: bytes) -> None:
    """Refuse an X25519 public key that is not 32 bytes, not in canonical form (top bit set,
    or u >= 2^255 - 19: encodings RFC 7748 would silently reduce, so the same key could be
    advertised under several byte strings) or of low order (every agreement with it is zero,
    so it would knock out its neighbours instead of itself)."""
    if len(public) != KEY_BYTES:
        raise RemoteProtocolError(f"X25519 public key of {len(public)} bytes, expected {KEY_BYTES}")
    if int.from_bytes(public, "little") >= _FIELD_PRIME:
        raise RemoteProtocolError("X25519 public key not in canonical form")
    try:
        sodium.crypto_scalarmult(_PROBE, public)
    except (CryptoError, RuntimeError, ValueError, TypeError):
        raise RemoteProtocolError("X25519 public key is a low-order point") from None


def agree(private: bytes, peer_public: bytes) -> bytes:
    """X25519 shared secret of a raw private key with a peer's raw public key. A malformed or
    low-order public key (shared secret all zeros) is the peer's fault."""
    if len(peer_public) != KEY_BYTES:
        raise RemoteProtocolError(
            f"unusable X25519 public key: {len(peer_public)} bytes, expected {KEY_BYTES}")
    try:
        secret = bytes(sodium.crypto_scalarmult(private, peer_public))
    except (CryptoError, RuntimeError, ValueError, TypeError):
        # libsodium refuses an all-zero result: the peer's key is a low-order point
        raise RemoteProtocolError("unusable X25519 public key: a low-order point") from None
    if not any(secret):
        raise RemoteProtocolError("unusable X25519 public key: a low-order point")
    return secret


_NO_SALT = bytes(32)  # RFC 5869: an absent salt is HashLen zero bytes


def derive(secret: bytes, label: bytes, context: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``secret`` to 32 bytes with ``info = label || context``.

    32 bytes are one block of SHA-256, so HKDF is exactly two HMACs: extract
    ``PRK = HMAC(0^32, secret)``, expand ``OKM = HMAC(PRK, info || 0x01)``. Computed with the
    standard library's one-shot ``hmac.digest`` (a participant derives ~4k keys a round, and
    building a ``cryptography`` HKDF object costs ~5 us each); equality with ``cryptography``'s
    HKDF is tested."""
    prk = hmac.digest(_NO_SALT, secret, "sha256")
    return hmac.digest(prk, label + context + b"\x01", "sha256")


def pairwise_seed(shared_secret: bytes, ctx: bytes) -> bytes:
    return derive(shared_secret, b"conclave/secagg/v1/pairwise", ctx)


def self_mask_seed(seed: bytes, ctx: bytes) -> bytes:
    return derive(seed, b"conclave/secagg/v1/self", ctx)


def _pair_context(ctx: bytes, sender: str, recipient: str) -> bytes:
    return ctx + encode_field(sender.encode("utf-8")) + encode_field(recipient.encode("utf-8"))


def encrypt_share(
    shared_secret: bytes,
    ctx: bytes,
    sender: str,
    recipient: str,
    plaintext: bytes,
    random_bytes: RandomBytes = os.urandom,
) -> bytes:
    pair = _pair_context(ctx, sender, recipient)
    key = derive(shared_secret, b"conclave/secagg/v1/share", pair)
    nonce = _fresh(random_bytes, NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, pair)


def decrypt_share(
    shared_secret: bytes, ctx: bytes, sender: str, recipient: str, ciphertext: bytes
) -> bytes:
    """Decrypt a routed share; any tampering (or wrong pair/round) raises RemoteProtocolError."""
    if len(ciphertext) < NONCE_BYTES + 16:
        raise RemoteProtocolError(f"share ciphertext from {sender!r} is too short")
    pair = _pair_context(ctx, sender, recipient)
    key = derive(shared_secret, b"conclave/secagg/v1/share", pair)
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], pair)
    except InvalidTag:
        raise RemoteProtocolError(
            f"share from {sender!r} to {recipient!r} failed authentication"
        ) from None


def _fresh(random_bytes: RandomBytes, size: int) -> bytes:
    data = random_bytes(size)
    if len(data) != size:
        raise ValueError(f"random_bytes({size}) returned {len(data)} bytes")
    return data
