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
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

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
    """One participant's secrets for one round. Never leaves the participant (only shares do)."""

    c_private: X25519PrivateKey
    s_private: X25519PrivateKey
    self_mask_seed: bytes

    @classmethod
    def generate(cls, random_bytes: RandomBytes = os.urandom) -> RoundKeys:
        return cls(
            c_private=X25519PrivateKey.from_private_bytes(_fresh(random_bytes, KEY_BYTES)),
            s_private=X25519PrivateKey.from_private_bytes(_fresh(random_bytes, KEY_BYTES)),
            self_mask_seed=_fresh(random_bytes, KEY_BYTES),
        )

    @property
    def c_public(self) -> bytes:
        return public_bytes(self.c_private)

    @property
    def s_public(self) -> bytes:
        return public_bytes(self.s_private)

    @property
    def s_private_bytes(self) -> bytes:
        return private_bytes(self.s_private)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


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


def verify_advert(identity: Ed25519PublicKey, payload: bytes, signature: bytes) -> None:
    """Raise :class:`RemoteProtocolError` unless ``signature`` is valid for ``payload``."""
    try:
        identity.verify(signature, payload)
    except InvalidSignature:
        raise RemoteProtocolError("key advert signature does not verify") from None


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 shared secret with a peer's raw public key; a bad key is the peer's fault."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise RemoteProtocolError(f"unusable X25519 public key: {exc}") from exc


def derive(secret: bytes, label: bytes, context: bytes) -> bytes:
    """HKDF-SHA256 of ``secret`` to 32 bytes with ``info = label || context``."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=label + context)
    return hkdf.derive(secret)


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
