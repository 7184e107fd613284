"""The coordinator side of SecAgg+ as a sans-I/O state machine.

The driver feeds each stage's messages in with ``receive_*`` and closes the stage (on a quorum
or a deadline) with ``close_*``, which returns what to send next::

    c = SecAggCoordinator(config=cfg, identity_keys=pks)
    c.receive_advert(msg) ...            ; bundles = c.close_advertise()    # KeyBundle per id
    c.receive_share_keys(msg) ...        ; bundles = c.close_share()        # ShareBundle per id
    c.receive_masked_input(msg) ...      ; request = c.close_masked_input() # to c.survivors
    c.receive_unmask_response(msg) ...   ; result = c.finish()              # AggregateResult

A message with bad content raises :class:`RemoteProtocolError` and the sender is *rejected*:
it counts as dropped from then on (at the unmask stage only its response is ignored: its input
is already in the sum). A late, early, stale or replayed message raises without penalty.
Too few participants to finish safely raises :class:`QuorumNotReached`, moves to ERROR and
discards every masked vector: no partial sum is ever released. ``stage_completions``,
``dropped`` and ``rejected`` are there for the ledger.

The coordinator never stores both a self-mask share and a mask-key share of one participant:
self-mask shares are accepted only for survivors, mask-key shares only for participants that
shared keys and then dropped, and ``revealed_share_kinds`` records which kind each owner got.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Container, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from conclave.core.errors import (
    AggregationError,
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
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from conclave.core.secagg.participant import SECRET_BYTES, SHARE_BYTES

CIPHERTEXT_BYTES = keys.NONCE_BYTES + 2 * SHARE_BYTES + 16
_COLLECTING = (Stage.ADVERTISE, Stage.SHARE, Stage.MASKED_INPUT, Stage.UNMASK)


class ShareKind(enum.Enum):
    SELF_MASK = "self_mask"
    MASK_KEY = "mask_key"


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class AggregateResult:
    """The exact sum mod 2^bits of the survivors' encoded vectors."""

    vector: npt.NDArray[np.unsignedinteger]
    survivors: frozenset[str]

    @property
    def count(self) -> int:
        return len(self.survivors)


class SecAggCoordinator:
    """The server side of one secure-aggregation round."""

    def __init__(
        self, *, config: SecAggConfig, identity_keys: Mapping[str, Ed25519PublicKey]
    ) -> None:
        missing = sorted(p for p in config.participants if p not in identity_keys)
        if missing:
            raise ConfigError("identity_keys", missing, "a public key for every participant")
        self._cfg = config
        self._identity_keys = identity_keys
        self._stage = Stage.ADVERTISE
        self._completions: dict[Stage, frozenset[str]] = {}
        self._rejected: dict[str, str] = {}
        self._adverts: dict[str, AdvertiseKeys] = {}
        self._share_keys: dict[str, ShareKeys] = {}
        # Masked inputs are summed as they arrive (exact, mod 2^bits), so the coordinator holds
        # one vector however many participants report.
        self._masked: set[str] = set()
        self._masked_sum: npt.NDArray[np.unsignedinteger] | None = None
        self._responders: set[str] = set()
        self._dropped: frozenset[str] = frozenset()  # shared keys, sent no masked input
        self._revealed: dict[str, ShareKind] = {}
        self._shares: dict[str, dict[int, bytes]] = {}  # owner -> x -> share data
        self._lagrange = shamir.LagrangeCache()

    # -- views for the driver and the ledger ----------------------------------------------------

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def stage_completions(self) -> Mapping[Stage, frozenset[str]]:
        """Who completed each closed stage (UNMASK: whose responses were accepted)."""
        return dict(self._completions)

    @property
    def rejected(self) -> Mapping[str, str]:
        """Participants whose messages were invalid, with the reason."""
        return dict(self._rejected)

    @property
    def dropped(self) -> frozenset[str]:
        """Participants whose input is not (or will not be) in the sum."""
        everyone = frozenset(self._cfg.participants)
        closed = [
            s for s in (Stage.ADVERTISE, Stage.SHARE, Stage.MASKED_INPUT) if s in self._completions
        ]
        alive = self._completions[closed[-1]] if closed else everyone
        return (everyone - alive) | (frozenset(self._rejected) - self.survivors)

    @property
    def survivors(self) -> frozenset[str]:
        return self._completions.get(Stage.MASKED_INPUT, frozenset())

    @property
    def revealed_share_kinds(self) -> Mapping[str, ShareKind]:
        return dict(self._revealed)

    # -- ADVERTISE ------------------------------------------------------------------------------

    def receive_advert(self, msg: AdvertiseKeys) -> None:
        who = self._admit(Stage.ADVERTISE, msg.run_id, msg.round, msg.participant, self._adverts)
        with self._blame(who):
            sizes = (len(msg.c_public), len(msg.s_public), len(msg.signature))
            if sizes != (keys.KEY_BYTES, keys.KEY_BYTES, keys.SIGNATURE_BYTES):
                raise RemoteProtocolError("malformed keys or signature")
            payload = keys.advert_payload(msg.run_id, msg.round, who, msg.c_public, msg.s_public)
            keys.verify_advert(self._identity_keys[who], payload, msg.signature)
            # a signed but unusable key would make its neighbours drop out, not its owner
            keys.check_public_key(msg.c_public)
            keys.check_public_key(msg.s_public)
        self._adverts[who] = msg

    def close_advertise(self) -> dict[str, KeyBundle]:
        """End ADVERTISE; return each advertiser's bundle of its advertised neighbours' keys."""
        u1 = self._close(Stage.ADVERTISE, Stage.SHARE, frozenset(self._adverts))
        return {
            u: KeyBundle(
                run_id=self._cfg.run_id,
                round=self._cfg.round,
                recipient=u,
                adverts=tuple(self._adverts[v] for v in sorted(self._cfg.graph[u] & u1)),
            )
            for u in sorted(u1)
        }

    # -- SHARE ----------------------------------------------------------------------------------

    def receive_share_keys(self, msg: ShareKeys) -> None:
        who = self._admit(Stage.SHARE, msg.run_id, msg.round, msg.participant, self._share_keys)
        with self._blame(who):
            expected = self._cfg.graph[who] & self._completions[Stage.ADVERTISE]
            recipients = [s.recipient for s in msg.shares]
            if len(set(recipients)) != len(recipients) or set(recipients) != expected:
                raise RemoteProtocolError("shares must go to each advertised neighbour once")
            for share in msg.shares:
                if share.sender != who:
                    raise RemoteProtocolError(f"share claims sender {share.sender!r}")
                if len(share.ciphertext) != CIPHERTEXT_BYTES:
                    raise RemoteProtocolError("share ciphertext has the wrong length")
        self._share_keys[who] = msg

    def close_share(self) -> dict[str, ShareBundle]:
        """End SHARE; return, for each participant that shared, the shares addressed to it."""
        u2 = self._close(Stage.SHARE, Stage.MASKED_INPUT, frozenset(self._share_keys))
        inbox: dict[str, list[EncryptedShare]] = {v: [] for v in u2}
        for sender in sorted(u2):
            for share in self._share_keys[sender].shares:
                if share.recipient in inbox:
                    inbox[share.recipient].append(share)
        cfg = self._cfg
        return {
            v: ShareBundle(run_id=cfg.run_id, round=cfg.round, recipient=v, shares=tuple(got))
            for v, got in sorted(inbox.items())
        }

    # -- MASKED_INPUT ---------------------------------------------------------------------------

    def receive_masked_input(self, msg: MaskedInput) -> None:
        who = self._admit(Stage.MASKED_INPUT, msg.run_id, msg.round, msg.participant, self._masked)
        cfg = self._cfg
        with self._blame(who):
            if msg.bits != cfg.bits or len(msg.data) != cfg.vector_length * cfg.dtype.itemsize:
                raise RemoteProtocolError(
                    f"masked input must be {cfg.vector_length} elements of {cfg.bits} bits"
                )
        if self._masked_sum is None:
            self._masked_sum = np.zeros(cfg.vector_length, dtype=cfg.dtype)
        np.add(self._masked_sum, msg.vector, out=self._masked_sum, dtype=cfg.dtype)
        self._masked.add(who)

    def close_masked_input(self) -> UnmaskRequest:
        """End MASKED_INPUT; check every needed secret is recoverable; ask survivors to unmask."""
        u3 = self._close(Stage.MASKED_INPUT, Stage.UNMASK, frozenset(self._masked))
        dropped = self._dropped = self._completions[Stage.SHARE] - u3
        t, graph = self._cfg.threshold, self._cfg.graph
        short = [u for u in sorted(u3) if len(graph[u] & u3) < t]
        short += [d for d in sorted(dropped) if 0 < len(graph[d] & u3) < t]
        if len(u3) < t or short:
            self._fail()
            raise QuorumNotReached(
                f"{len(u3)} survivors; participants with fewer than {t} surviving neighbours: "
                f"{short}; no aggregate is released"
            )
        cfg = self._cfg
        return UnmaskRequest(
            run_id=cfg.run_id,
            round=cfg.round,
            survivors=tuple(sorted(u3)),
            dropped=tuple(sorted(dropped)),
        )

    def unmask_requests(self, request: UnmaskRequest) -> dict[str, UnmaskRequest]:
        """``request`` cut down for each survivor to what it acts on: itself and its own
        neighbours (it holds shares of nobody else). O(k) names per survivor instead of O(n),
        so the unmask step costs O(n k) in all rather than O(n^2)."""
        survivors, dropped = frozenset(request.survivors), frozenset(request.dropped)
        out: dict[str, UnmaskRequest] = {}
        for pid in request.survivors:
            near = self._cfg.graph[pid]
            out[pid] = UnmaskRequest(
                run_id=request.run_id,
                round=request.round,
                survivors=tuple(sorted((near & survivors) | {pid})),
                dropped=tuple(sorted(near & dropped)),
            )
        return out

    # -- UNMASK ---------------------------------------------------------------------------------

    def receive_unmask_response(self, msg: UnmaskResponse) -> None:
        who = self._admit(Stage.UNMASK, msg.run_id, msg.round, msg.participant, self._responders)
        u3, dropped = self._completions[Stage.MASKED_INPUT], self._dropped
        mine = self._cfg.graph[who]
        accepted: list[tuple[str, ShareKind, bytes]] = []
        with self._blame(who):
            for group, kind, allowed in (
                (msg.self_mask_shares, ShareKind.SELF_MASK, u3 & mine),
                (msg.mask_key_shares, ShareKind.MASK_KEY, dropped & mine),
            ):
                for share in group:
                    if share.owner not in allowed or self._revealed.get(share.owner, kind) != kind:
                        raise RemoteProtocolError(
                            f"{kind.value} share of {share.owner!r} not allowed"
                        )
                    if len(share.data) != SHARE_BYTES:
                        raise RemoteProtocolError(f"share of {share.owner!r} has the wrong length")
                    accepted.append((share.owner, kind, share.data))
            owners = [owner for owner, _, _ in accepted]
            if len(set(owners)) != len(owners):
                raise RemoteProtocolError("a participant's share appears twice")
        x = self._cfg.x_of(who)
        for owner, kind, data in accepted:
            self._revealed[owner] = kind
            self._shares.setdefault(owner, {})[x] = data
        self._responders.add(who)

    def finish(self) -> AggregateResult:
        """End UNMASK: remove every mask and return the survivors' exact sum (or fail closed)."""
        if self._stage is not Stage.UNMASK:
            self._fail()
            raise LocalProtocolError(f"finish() called in stage {self._stage.name}")
        cfg, t = self._cfg, self._cfg.threshold
        u3 = self._completions[Stage.MASKED_INPUT]
        needed = sorted(u3) + sorted(
            d for d in self._completions[Stage.SHARE] - u3 if cfg.graph[d] & u3
        )
        short = [u for u in needed if len(self._shares.get(u, {})) < t]
        if len(self._responders) < t or short:
            self._fail()
            raise QuorumNotReached(
                f"{len(self._responders)} unmask responses; too few shares for {short}; "
                "no aggregate is released"
            )
        self._completions[Stage.UNMASK] = frozenset(self._responders)
        try:
            total = self._unmasked_sum(needed, u3)
        except Exception:
            self._fail()
            raise
        self._stage = Stage.DONE
        self._masked_sum = None
        return AggregateResult(vector=total, survivors=u3)

    def _unmasked_sum(
        self, owners: list[str], u3: frozenset[str]
    ) -> npt.NDArray[np.unsignedinteger]:
        cfg = self._cfg
        total = (np.zeros(cfg.vector_length, dtype=cfg.dtype) if self._masked_sum is None
                 else self._masked_sum.copy())
        for owner in owners:
            held = self._shares[owner]
            lowest = sorted(held)[: cfg.threshold]  # reconstruct_secret uses the t lowest x
            secret = shamir.reconstruct_secret(
                [shamir.Share(x=x, data=held[x]) for x in lowest],
                threshold=cfg.threshold,
                secret_len=SECRET_BYTES,
                cache=self._lagrange,
            )
            if owner in u3:
                seed = keys.self_mask_seed(secret, cfg.context)
                total -= prg.expand(seed, cfg.vector_length, cfg.dtype)
                continue
            s_private = bytes(secret)
            if keys.x25519_public(s_private) != self._adverts[owner].s_public:
                raise AggregationError(
                    f"reconstructed mask key of {owner!r} does not match its advert"
                )
            for u in sorted(cfg.graph[owner] & u3):
                shared = keys.agree(s_private, self._adverts[u].s_public)
                mask = prg.expand(
                    keys.pairwise_seed(shared, cfg.context), cfg.vector_length, cfg.dtype
                )
                if u < owner:
                    total -= mask
                else:
                    total += mask
        return total

    # -- helpers --------------------------------------------------------------------------------

    def _admit(self, stage: Stage, run_id: str, rnd: int, who: str, seen: Container[str]) -> str:
        cfg = self._cfg
        if run_id != cfg.run_id or rnd != cfg.round:
            raise RemoteProtocolError(f"message for run {run_id!r} round {rnd} is stale or foreign")
        if who not in cfg.graph:
            raise RemoteProtocolError(f"{who!r} is not a participant of this round")
        if self._stage is not stage:
            raise RemoteProtocolError(
                f"{stage.name} message from {who!r} arrived in {self._stage.name}"
            )
        if who in self._rejected:
            raise RemoteProtocolError(f"{who!r} was rejected: {self._rejected[who]}")
        previous = (
            _COLLECTING[_COLLECTING.index(stage) - 1] if stage is not Stage.ADVERTISE else None
        )
        if previous is not None and who not in self._completions[previous]:
            raise RemoteProtocolError(f"{who!r} did not complete {previous.name}")
        if who in seen:
            raise RemoteProtocolError(f"{stage.name} message from {who!r} is a replay")
        return who

    @contextlib.contextmanager
    def _blame(self, who: str) -> Iterator[None]:
        """A RemoteProtocolError raised inside rejects ``who`` (and is re-raised naming them)."""
        try:
            yield
        except RemoteProtocolError as exc:
            self._rejected[who] = str(exc)
            raise RemoteProtocolError(f"rejected {who!r}: {exc}") from exc

    def _close(self, stage: Stage, next_stage: Stage, done: frozenset[str]) -> frozenset[str]:
        if self._stage is not stage:
            self._fail()
            raise LocalProtocolError(f"closing {stage.name} in stage {self._stage.name}")
        self._completions[stage] = done
        if stage is not Stage.MASKED_INPUT and len(done) <= self._cfg.threshold:
            self._fail()
            raise QuorumNotReached(
                f"only {len(done)} participants completed {stage.name}; need more than "
                f"threshold {self._cfg.threshold}; no aggregate is released"
            )
        self._stage = next_stage
        return done

    def _fail(self) -> None:
        self._stage = Stage.ERROR
        self._masked_sum = None
        self._shares.clear()
