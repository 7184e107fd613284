"""Coordinator-side validation, fail-closed behaviour, ledger views and mask uniformity."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from secagg_helpers import DeterministicRandom, config, identities, plain_sum, random_inputs

from conclave.core.errors import (
    ConfigError,
    LocalProtocolError,
    QuorumNotReached,
    RemoteProtocolError,
)
from conclave.core.secagg import (
    AdvertiseKeys,
    MaskedInput,
    RevealedShare,
    SecAggConfig,
    SecAggCoordinator,
    ShareKeys,
    ShareKind,
    Stage,
    UnmaskResponse,
    keys,
    run_local_round,
)
from conclave.core.secagg.local import LocalRoundOutcome

VICTIM = "p004"


def _run(
    cfg: SecAggConfig, tamper: Callable[[Stage, str, object], object] | None = None, **kw: object
) -> tuple[LocalRoundOutcome, dict[str, np.ndarray]]:
    inputs = random_inputs(cfg, seed=cfg.vector_length)
    out = run_local_round(
        cfg,
        inputs,
        identities(cfg.participants),
        intercept=tamper,
        random_bytes=DeterministicRandom(9),
        **kw,
    )  # type: ignore[arg-type]
    assert np.array_equal(out.aggregate.vector, plain_sum(cfg, inputs, out.aggregate.survivors))
    return out, inputs


def _from_victim(
    kind: type, change: Callable[[object], object]
) -> Callable[[Stage, str, object], object]:
    def tamper(stage: Stage, pid: str, msg: object) -> object:
        return change(msg) if pid == VICTIM and isinstance(msg, kind) else msg

    return tamper


def _forged_advert(msg: object) -> object:
    assert isinstance(msg, AdvertiseKeys)
    impostor = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
    payload = keys.advert_payload(
        msg.run_id, msg.round, msg.participant, msg.c_public, msg.s_public
    )
    return dataclasses.replace(msg, signature=impostor.sign(payload))


_P25519 = 2**255 - 19
_ORDER_8 = 325606250916557431795983626356110631294008115727848805560023387167927233504


def _signed_advert_with(field: str, value: bytes) -> Callable[[object], object]:
    """The victim's own, validly signed advert, carrying an unusable key."""

    def change(msg: object) -> object:
        assert isinstance(msg, AdvertiseKeys)
        bad = dataclasses.replace(msg, **{field: value})
        payload = keys.advert_payload(bad.run_id, bad.round, bad.participant, bad.c_public,
                                      bad.s_public)
        identity = identities(config(9).participants)[VICTIM]
        return dataclasses.replace(bad, signature=identity.sign(payload))

    return change


def _top_bit(key: bytes) -> bytes:
    return key[:-1] + bytes([key[-1] | 0x80])


def _share_change(how: str) -> Callable[[object], object]:
    def change(msg: object) -> object:
        assert isinstance(msg, ShareKeys)
        first = msg.shares[0]
        if how == "sender":
            return dataclasses.replace(
                msg, shares=(dataclasses.replace(first, sender="p000"), *msg.shares[1:])
            )
        if how == "missing":
            return dataclasses.replace(msg, shares=msg.shares[1:])
        return dataclasses.replace(
            msg,
            shares=(
                dataclasses.replace(first, ciphertext=first.ciphertext + b"!"),
                *msg.shares[1:],
            ),
        )

    return change


@pytest.mark.parametrize(
    ("kind", "change", "stage"),
    [
        (AdvertiseKeys, _forged_advert, Stage.ADVERTISE),
        (AdvertiseKeys, _signed_advert_with("c_public", bytes(32)), Stage.ADVERTISE),
        (AdvertiseKeys, _signed_advert_with("s_public", (1).to_bytes(32, "little")),
         Stage.ADVERTISE),
        (AdvertiseKeys, _signed_advert_with("c_public", _ORDER_8.to_bytes(32, "little")),
         Stage.ADVERTISE),
        (AdvertiseKeys, _signed_advert_with("s_public", (_P25519 - 1).to_bytes(32, "little")),
         Stage.ADVERTISE),
        (AdvertiseKeys, _signed_advert_with("s_public", (_P25519 + 3).to_bytes(32, "little")),
         Stage.ADVERTISE),
        (AdvertiseKeys, lambda m: _signed_advert_with("s_public", _top_bit(m.s_public))(m),  # type: ignore[attr-defined]
         Stage.ADVERTISE),
        (ShareKeys, _share_change("sender"), Stage.SHARE),
        (ShareKeys, _share_change("missing"), Stage.SHARE),
        (ShareKeys, _share_change("length"), Stage.SHARE),
        (MaskedInput, lambda m: dataclasses.replace(m, data=m.data[:-4]), Stage.MASKED_INPUT),  # type: ignore[attr-defined]
        (MaskedInput, lambda m: dataclasses.replace(m, bits=64), Stage.MASKED_INPUT),
    ],
    ids=[
        "forged-advert",
        "signed-zero-c-key",
        "signed-one-s-key",
        "signed-order-8-c-key",
        "signed-order-2-s-key",
        "signed-non-canonical-s-key",
        "signed-top-bit-s-key",
        "share-sender",
        "share-missing",
        "share-length",
        "short-vector",
        "wrong-bits",
    ],
)
def test_offender_is_rejected_dropped_and_the_sum_stays_exact(
    kind: type, change: Callable[[object], object], stage: Stage
) -> None:
    cfg = config(9, vector_length=24)
    out, _ = _run(cfg, _from_victim(kind, change))
    coord = out.coordinator
    assert VICTIM in coord.rejected and VICTIM in coord.dropped
    assert VICTIM not in out.aggregate.survivors
    assert VICTIM not in coord.stage_completions[stage]
    if stage is Stage.MASKED_INPUT:  # shared keys, then dropped: its mask key was reconstructed
        assert coord.revealed_share_kinds[VICTIM] is ShareKind.MASK_KEY


def test_unmask_response_asking_for_the_other_share_kind_is_rejected() -> None:
    cfg = config(9, vector_length=8)
    dropped = {Stage.MASKED_INPUT: frozenset({"p000"})}

    def change(msg: object) -> object:
        assert isinstance(msg, UnmaskResponse)
        extra = RevealedShare(
            owner=msg.self_mask_shares[0].owner, data=msg.self_mask_shares[0].data
        )
        return dataclasses.replace(msg, mask_key_shares=(*msg.mask_key_shares, extra))

    out, _ = _run(cfg, _from_victim(UnmaskResponse, change), dropouts=dropped)
    coord = out.coordinator
    assert VICTIM in coord.rejected and VICTIM in out.aggregate.survivors  # its input still counts
    assert VICTIM not in coord.stage_completions[Stage.UNMASK]
    kinds = coord.revealed_share_kinds
    assert {o for o, k in kinds.items() if k is ShareKind.SELF_MASK} == out.aggregate.survivors
    assert {o for o, k in kinds.items() if k is ShareKind.MASK_KEY} == {"p000"}


def test_ledger_views_with_dropouts_at_every_stage() -> None:
    cfg = config(12, neighbours=10, threshold=6)
    drops = {
        Stage.ADVERTISE: frozenset({"p001"}),
        Stage.SHARE: frozenset({"p002"}),
        Stage.MASKED_INPUT: frozenset({"p003"}),
        Stage.UNMASK: frozenset({"p005"}),
    }
    out, _ = _run(cfg, dropouts=drops)
    done = out.coordinator.stage_completions
    everyone = frozenset(cfg.participants)
    assert done[Stage.ADVERTISE] == everyone - {"p001"}
    assert done[Stage.SHARE] == everyone - {"p001", "p002"}
    assert (
        done[Stage.MASKED_INPUT] == out.aggregate.survivors == everyone - {"p001", "p002", "p003"}
    )
    assert done[Stage.UNMASK] == everyone - {"p001", "p002", "p003", "p005"}
    assert out.coordinator.dropped == {"p001", "p002", "p003"}
    assert out.coordinator.stage is Stage.DONE


def test_replayed_and_stale_messages_raise_without_rejecting() -> None:
    cfg = config(4)
    ident = identities(cfg.participants)
    coord = SecAggCoordinator(
        config=cfg, identity_keys={p: k.public_key() for p, k in ident.items()}
    )
    from conclave.core.secagg import SecAggParticipant

    p = SecAggParticipant(
        config=cfg,
        participant_id="p000",
        identity_key=ident["p000"],
        identity_keys={q: k.public_key() for q, k in ident.items()},
    )
    advert = p.advertise()
    coord.receive_advert(advert)
    with pytest.raises(RemoteProtocolError, match="replay"):
        coord.receive_advert(advert)
    with pytest.raises(RemoteProtocolError, match="stale"):
        coord.receive_advert(dataclasses.replace(advert, round=2))
    with pytest.raises(RemoteProtocolError, match="not a participant"):
        coord.receive_advert(dataclasses.replace(advert, participant="mallory"))
    assert coord.rejected == {}
    with pytest.raises(RemoteProtocolError, match="arrived in ADVERTISE"):
        coord.receive_masked_input(
            MaskedInput(run_id="run-1", round=3, participant="p000", bits=32, data=b"")
        )
    with pytest.raises(LocalProtocolError):
        coord.finish()
    assert coord.stage is Stage.ERROR


def test_fails_closed_below_threshold_at_masked_input() -> None:
    cfg = config(6)  # complete graph, k = 5, t = 3
    drops = {Stage.MASKED_INPUT: frozenset({"p000", "p001", "p002"})}
    with pytest.raises(QuorumNotReached, match="no aggregate is released"):
        run_local_round(cfg, random_inputs(cfg), identities(cfg.participants), dropouts=drops)


def test_fails_closed_when_too_few_unmask_responses() -> None:
    cfg = config(6)
    inputs = random_inputs(cfg)
    captured: list[SecAggCoordinator] = []
    original = SecAggCoordinator.finish

    def spy(self: SecAggCoordinator) -> object:
        captured.append(self)
        return original(self)

    drops = {Stage.UNMASK: frozenset({"p000", "p001", "p002", "p003"})}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SecAggCoordinator, "finish", spy)
        with pytest.raises(QuorumNotReached, match="2 unmask responses"):
            run_local_round(cfg, inputs, identities(cfg.participants), dropouts=drops)
    assert captured[0].stage is Stage.ERROR
    with pytest.raises(LocalProtocolError):
        captured[0].finish()  # nothing can be extracted afterwards


def test_fails_closed_when_too_few_advertise() -> None:
    cfg = config(6)
    with pytest.raises(QuorumNotReached, match="ADVERTISE"):
        run_local_round(
            cfg,
            random_inputs(cfg),
            identities(cfg.participants),
            dropouts={Stage.ADVERTISE: frozenset(cfg.participants[:3])},
        )


def test_missing_identity_key_is_a_config_error() -> None:
    cfg = config(3)
    with pytest.raises(ConfigError, match="identity_keys"):
        SecAggCoordinator(config=cfg, identity_keys={})


def _chi_square_bytes(vec: np.ndarray) -> float:
    counts = np.bincount(np.frombuffer(vec.tobytes(), dtype=np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_masked_vectors_look_uniform() -> None:
    cfg = config(6, vector_length=4096)
    zeros = {pid: np.zeros(cfg.vector_length, dtype=np.uint32) for pid in cfg.participants}
    seen: list[np.ndarray] = []

    def capture(stage: Stage, pid: str, msg: object) -> object:
        if isinstance(msg, MaskedInput):
            seen.append(msg.vector.copy())
        return msg

    out = run_local_round(
        cfg,
        zeros,
        identities(cfg.participants),
        intercept=capture,
        random_bytes=DeterministicRandom(3),
    )
    assert len(seen) == 6 and not out.aggregate.vector.any()
    limit = 400.0  # 255 degrees of freedom: mean 255, sd 22.6; 400 is p < 1e-12 for uniform bytes
    assert _chi_square_bytes(zeros["p000"]) > limit  # the test can tell an unmasked vector
    assert _chi_square_bytes(np.arange(cfg.vector_length, dtype=np.uint32)) > limit
    for vec in seen:
        assert _chi_square_bytes(vec) < limit


def test_each_survivor_is_asked_only_about_itself_and_its_neighbours() -> None:
    cfg = config(12, neighbours=4, threshold=3)
    seen: dict[str, object] = {}

    def spy(stage: Stage, pid: str, msg: object) -> object:
        if stage is Stage.UNMASK and type(msg).__name__ == "UnmaskRequest":
            seen[pid] = msg
        return msg

    gone = frozenset({"p003"})
    out, _ = _run(cfg, spy, dropouts={Stage.MASKED_INPUT: gone})
    assert set(seen) == set(cfg.participants) - gone
    for pid, req in seen.items():
        near = cfg.neighbours_of(pid)
        assert set(req.survivors) == (near - gone) | {pid}  # type: ignore[attr-defined]
        assert set(req.dropped) == near & gone  # type: ignore[attr-defined]
    assert out.aggregate.survivors == frozenset(cfg.participants) - gone
