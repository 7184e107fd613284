"""The participant side of SecAgg+ as a sans-I/O state machine.

Usage, one object per participant per round (the driver carries the messages)::

    p = SecAggParticipant(config=cfg, participant_id="a", identity_key=sk, identity_keys=pks)
    advert = p.advertise()                      # -> coordinator
    share_keys = p.receive_keys(key_bundle)     # KeyBundle from coordinator -> coordinator
    masked = p.masked_input(encoded, share_bundle)  # encoded: config.dtype vector
    response = p.unmask(unmask_request)         # -> coordinator; p.stage is now DONE

Stages: ADVERTISE -> SHARE -> MASKED_INPUT -> UNMASK -> DONE. Any failure moves the machine to
ERROR and raises; every later call raises :class:`LocalProtocolError`. A message that arrives in
the wrong stage (a replay) raises :class:`RemoteProtocolError`. Bad signatures, shares not
addressed to us, shares from non-neighbours, failed AES-GCM and a request to reveal both kinds
of share for one participant all raise :class:`RemoteProtocolError`; too few neighbours to ever
be unmasked raises :class:`QuorumNotReached`. The driver treats a participant in ERROR as
dropped; the rest of the round still completes.

Masking: ``y = x + PRG(b) + sum_v sign(self, v) * PRG(HKDF(X25519(s_self, s_v)))`` over the
neighbours ``v`` whose shares arrived, with ``sign = +1`` if ``self < v`` (string order) else
``-1``, all modulo 2^bits in the config's unsigned dtype.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from conclave.core.errors import (
    ConfigError,
    LocalProtocolError,
    QuorumNotReached,
    RemoteProtocolError,
)
from conclave.core.secagg import keys, prg, shamir
from conclave.core.secagg.config import SecAggConfig, Stage
from conclave.core.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    KeyBundle,
    MaskedInput,
    RevealedShare,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)

R = TypeVar("R")
SECRET_BYTES = keys.KEY_BYTES
SHARE_BYTES = shamir.share_len(SECRET_BYTES)


class SecAggParticipant:
    """One participant's side of one secure-aggregation round."""

    def __init__(
        self,
        *,
        config: SecAggConfig,
        participant_id: str,
        identity_key: Ed25519PrivateKey,
        identity_keys: Mapping[str, Ed25519PublicKey],
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if participant_id not in config.graph:
            raise ConfigError("participant_id", participant_id, "one of the round's participants")
        self._config = config
        self._id = participant_id
        self._identity = identity_key
        self._neighbours = config.neighbours_of(participant_id)
        missing = sorted(v for v in self._neighbours if v not in identity_keys)
        if missing:
            raise ConfigError("identity_keys", missing, "a public key for every neighbour")
        self._identity_keys = identity_keys
        self._random_bytes = random_bytes
        self._stage = Stage.ADVERTISE
        self._keys: keys.RoundKeys | None = None
        self._adverts: dict[str, AdvertiseKeys] = {}
        self._c_secrets: dict[str, bytes] = {}
        self._held: dict[str, tuple[bytes, bytes]] = {}  # owner -> (self-mask, mask-key) share

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def participant_id(self) -> str:
        return self._id

    @property
    def neighbours(self) -> frozenset[str]:
        return self._neighbours

    def advertise(self) -> AdvertiseKeys:
        """Make this round's keys and return the signed advert of their public halves."""
        if self._stage is not Stage.ADVERTISE:
            self._fail()
            raise LocalProtocolError(f"advertise() called in stage {self._stage.name}")
        return self._guarded(Stage.SHARE, self._advertise)

    def receive_keys(self, bundle: KeyBundle) -> ShareKeys:
        """Check the neighbours' signed adverts; return encrypted shares of our secrets for them."""
        self._expect(Stage.SHARE, "key bundle")
        return self._guarded(Stage.MASKED_INPUT, lambda: self._receive_keys(bundle))

    def masked_input(
        self, encoded: npt.NDArray[np.unsignedinteger], bundle: ShareBundle
    ) -> MaskedInput:
        """Decrypt the shares addressed to us and return our masked encoded vector."""
        self._expect(Stage.MASKED_INPUT, "share bundle")
        return self._guarded(Stage.UNMASK, lambda: self._masked_input(encoded, bundle))

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal self-mask shares of survivors and mask-key shares of dropped neighbours."""
        self._expect(Stage.UNMASK, "unmask request")
        return self._guarded(Stage.DONE, lambda: self._unmask(request))

    # -- stage bodies -------------------------------------------------------------------------

    def _advertise(self) -> AdvertiseKeys:
        cfg = self._config
        self._keys = keys.RoundKeys.generate(self._random_bytes)
        c_pub, s_pub = self._keys.c_public, self._keys.s_public
        payload = keys.advert_payload(cfg.run_id, cfg.round, self._id, c_pub, s_pub)
        return AdvertiseKeys(
            run_id=cfg.run_id,
            round=cfg.round,
            participant=self._id,
            c_public=c_pub,
            s_public=s_pub,
            signature=keys.sign_advert(self._identity, payload),
        )

    def _receive_keys(self, bundle: KeyBundle) -> ShareKeys:
        cfg, own = self._config, self._round_keys()
        self._check_header(bundle.run_id, bundle.round, "key bundle")
        if bundle.recipient != self._id:
            raise RemoteProtocolError(f"key bundle addressed to {bundle.recipient!r}")
        for advert in bundle.adverts:
            self._accept_advert(advert)
        if len(self._adverts) < cfg.threshold:
            raise QuorumNotReached(
                f"only {len(self._adverts)} neighbours advertised keys; threshold {cfg.threshold}"
            )
        holders = sorted(self._adverts)
        b_shares, s_shares = shamir.share_secrets(
            [own.self_mask_seed, own.s_private],
            threshold=cfg.threshold,
            xs=[cfg.x_of(v) for v in holders],
            random_bytes=self._random_bytes,
        )
        out: list[EncryptedShare] = []
        for v, b_share, s_share in zip(holders, b_shares, s_shares, strict=True):
            secret = self._c_secret(v)
            plaintext = b_share.data + s_share.data
            ct = keys.encrypt_share(secret, cfg.context, self._id, v, plaintext, self._random_bytes)
            out.append(EncryptedShare(sender=self._id, recipient=v, ciphertext=ct))
        return ShareKeys(
            run_id=cfg.run_id, round=cfg.round, participant=self._id, shares=tuple(out)
        )

    def _accept_advert(self, advert: AdvertiseKeys) -> None:
        cfg, who = self._config, advert.participant
        self._check_header(advert.run_id, advert.round, f"advert of {who!r}")
        if who not in self._neighbours:
            raise RemoteProtocolError(f"advert of {who!r}, who is not a neighbour of {self._id!r}")
        if who in self._adverts:
            raise RemoteProtocolError(f"duplicate advert of {who!r}")
        sizes = (len(advert.c_public), len(advert.s_public), len(advert.signature))
        if sizes != (keys.KEY_BYTES, keys.KEY_BYTES, keys.SIGNATURE_BYTES):
            raise RemoteProtocolError(f"advert of {who!r} has malformed keys or signature")
        payload = keys.advert_payload(cfg.run_id, cfg.round, who, advert.c_public, advert.s_public)
        keys.verify_advert(self._identity_keys[who], payload, advert.signature)
        self._adverts[who] = advert

    def _masked_input(
        self, encoded: npt.NDArray[np.unsignedinteger], bundle: ShareBundle
    ) -> MaskedInput:
        cfg, own = self._config, self._round_keys()
        if encoded.dtype != cfg.dtype or encoded.shape != (cfg.vector_length,):
            raise LocalProtocolError(
                f"encoded input must be {cfg.dtype} of shape ({cfg.vector_length},), "
                f"got {encoded.dtype} {encoded.shape}"
            )
        self._check_header(bundle.run_id, bundle.round, "share bundle")
        if bundle.recipient != self._id:
            raise RemoteProtocolError(f"share bundle addressed to {bundle.recipient!r}")
        for share in bundle.shares:
            self._accept_share(share)
        if len(self._held) < cfg.threshold:
            raise QuorumNotReached(
                f"shares from only {len(self._held)} neighbours; threshold {cfg.threshold}"
            )
        masked = encoded.astype(cfg.dtype, copy=True)
        self_seed = keys.self_mask_seed(own.self_mask_seed, cfg.context)
        masked += prg.expand(self_seed, cfg.vector_length, cfg.dtype)
        for v in sorted(self._held):
            secret = keys.agree(own.s_private, self._adverts[v].s_public)
            mask = prg.expand(keys.pairwise_seed(secret, cfg.context), cfg.vector_length, cfg.dtype)
            if self._id < v:
                masked += mask
            else:
                masked -= mask
        return MaskedInput.from_vector(
            run_id=cfg.run_id, round=cfg.round, participant=self._id, vector=masked
        )

    def _accept_share(self, share: EncryptedShare) -> None:
        if share.recipient != self._id:
            raise RemoteProtocolError(
                f"share from {share.sender!r} is addressed to {share.recipient!r}, not {self._id!r}"
            )
        if share.sender not in self._adverts:
            raise RemoteProtocolError(f"share from {share.sender!r}, not an advertised neighbour")
        if share.sender in self._held:
            raise RemoteProtocolError(f"second share from {share.sender!r}")
        secret = self._c_secret(share.sender)
        plain = keys.decrypt_share(
            secret, self._config.context, share.sender, self._id, share.ciphertext
        )
        if len(plain) != 2 * SHARE_BYTES:
            raise RemoteProtocolError(f"share from {share.sender!r} has the wrong length")
        self._held[share.sender] = (plain[:SHARE_BYTES], plain[SHARE_BYTES:])

    def _unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        cfg = self._config
        self._check_header(request.run_id, request.round, "unmask request")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise RemoteProtocolError("unmask request lists a participant twice")
        both = sorted(survivors & dropped)
        if both:
            raise RemoteProtocolError(f"unmask request asks for both shares of {both}")
        if self._id not in survivors:
            raise RemoteProtocolError(f"unmask request does not list {self._id!r} as a survivor")
        alive = [u for u in sorted(self._held) if u in survivors]
        if len(alive) < cfg.threshold:
            raise QuorumNotReached(
                f"only {len(alive)} surviving neighbours; threshold {cfg.threshold}"
            )
        gone = [u for u in sorted(self._held) if u in dropped]
        return UnmaskResponse(
            run_id=cfg.run_id,
            round=cfg.round,
            participant=self._id,
            self_mask_shares=tuple(RevealedShare(owner=u, data=self._held[u][0]) for u in alive),
            mask_key_shares=tuple(RevealedShare(owner=u, data=self._held[u][1]) for u in gone),
        )

    # -- helpers --------------------------------------------------------------------------------

    def _c_secret(self, peer: str) -> bytes:
        """The X25519 secret shared with ``peer`` for sealing shares, computed once: the same
        pair of keys seals our shares to ``peer`` and opens ``peer``'s shares to us."""
        cached = self._c_secrets.get(peer)
        if cached is None:
            cached = keys.agree(self._round_keys().c_private, self._adverts[peer].c_public)
            self._c_secrets[peer] = cached
        return cached

    def _round_keys(self) -> keys.RoundKeys:
        if self._keys is None:
            raise LocalProtocolError("round keys not generated")
        return self._keys

    def _check_header(self, run_id: str, rnd: int, what: str) -> None:
        if run_id != self._config.run_id or rnd != self._config.round:
            raise RemoteProtocolError(
                f"{what} is for run {run_id!r} round {rnd}, expected "
                f"{self._config.run_id!r} round {self._config.round}"
            )

    def _expect(self, stage: Stage, what: str) -> None:
        if self._stage is Stage.ERROR:
            raise LocalProtocolError("participant is in ERROR; start a new round")
        if self._stage is not stage:
            current = self._stage
            self._fail()
            raise RemoteProtocolError(
                f"{what} arrived in stage {current.name} (replayed or out of order)"
            )

    def _guarded(self, next_stage: Stage, body: Callable[[], R]) -> R:
        try:
            result = body()
        except Exception:
            self._fail()
            raise
        self._stage = next_stage
        return result

    def _fail(self) -> None:
        self._stage = Stage.ERROR
        self._held.clear()
        self._keys = None
