"""PRG, key adverts, neighbour graph and round config."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from secagg_helpers import DeterministicRandom, config, ids

from conclave.core.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from conclave.core.secagg import SecAggConfig, graph, keys, prg


def test_prg_is_deterministic_prefix_stable_and_seed_sensitive() -> None:
    seed = bytes(range(32))
    a = prg.expand(seed, 1000, np.uint32)
    assert a.dtype == np.uint32 and a.shape == (1000,)
    assert np.array_equal(a, prg.expand(seed, 1000, np.uint32))
    assert np.array_equal(a[:10], prg.expand(seed, 10, np.uint32))
    other = prg.expand(bytes(31) + b"\x01", 1000, np.uint32)
    assert np.count_nonzero(a == other) < 5
    wide = prg.expand(seed, 500, np.uint64)
    assert wide.tobytes() == a.tobytes()  # the same keystream, read as little-endian words
    assert prg.expand_bytes(seed, 8) == a[:2].tobytes()


def test_prg_long_streams_cross_the_block_boundary() -> None:
    seed = b"\x07" * 32
    long = prg.expand(seed, (1 << 18) + 3, np.uint32)  # 1 MiB + 12 bytes: two update calls
    assert np.array_equal(long[-3:], prg.expand(seed, (1 << 18) + 3, np.uint32)[-3:])
    assert len(np.unique(long[-1000:])) > 990


def test_prg_rejects_bad_arguments() -> None:
    with pytest.raises(LocalProtocolError):
        prg.expand(b"short", 4, np.uint32)
    with pytest.raises(LocalProtocolError):
        prg.expand(bytes(32), 4, np.int32)


def test_advert_signature_binds_every_field() -> None:
    identity = Ed25519PrivateKey.from_private_bytes(bytes(32))
    c, s = b"c" * 32, b"s" * 32
    payload = keys.advert_payload("run", 1, "alice", c, s)
    sig = keys.sign_advert(identity, payload)
    keys.verify_advert(identity.public_key(), payload, sig)
    for changed in (
        keys.advert_payload("run2", 1, "alice", c, s),
        keys.advert_payload("run", 2, "alice", c, s),
        keys.advert_payload("run", 1, "bob", c, s),
        keys.advert_payload("run", 1, "alice", s, c),
    ):
        with pytest.raises(RemoteProtocolError, match="signature"):
            keys.verify_advert(identity.public_key(), changed, sig)


def test_share_encryption_binds_the_pair() -> None:
    ctx = keys.round_context("run", 1)
    ct = keys.encrypt_share(b"k" * 32, ctx, "a", "b", b"secret", DeterministicRandom(1))
    assert keys.decrypt_share(b"k" * 32, ctx, "a", "b", ct) == b"secret"
    with pytest.raises(RemoteProtocolError, match="authentication"):
        keys.decrypt_share(b"k" * 32, ctx, "b", "a", ct)
    with pytest.raises(RemoteProtocolError, match="authentication"):
        keys.decrypt_share(b"k" * 32, keys.round_context("run", 2), "a", "b", ct)


def test_graph_is_deterministic_symmetric_and_regular() -> None:
    seed = DeterministicRandom(3)(32)
    people = ids(40)
    g = graph.neighbour_graph(seed, people, 10)
    assert g == graph.neighbour_graph(seed, list(reversed(people)), 10)
    assert g != graph.neighbour_graph(DeterministicRandom(4)(32), people, 10)
    for u, near in g.items():
        assert len(near) == 10 and u not in near
        assert all(u in g[v] for v in near)
    complete = graph.neighbour_graph(seed, people, 39)
    assert all(near == frozenset(people) - {u} for u, near in complete.items())


def test_config_defaults_and_validation() -> None:
    big = config(100)
    assert (big.neighbours, big.threshold) == (40, 21)
    small = config(5)
    assert small.is_complete and (small.neighbours, small.threshold) == (4, 3)
    assert small.x_of("p000") == 1 and small.x_of("p004") == 5
    assert config(2).threshold == 1
    for bad in ({"threshold": 20}, {"threshold": 41}, {"neighbours": 9}, {"bits": 16}):
        with pytest.raises(ConfigError):
            config(100, **bad)
    with pytest.raises(ConfigError, match="participants"):
        SecAggConfig.create(
            run_id="r", round=0, participants=["a", "a", "b"], graph_seed=bytes(32), vector_length=1
        )
    with pytest.raises(ConfigError, match="graph_seed"):
        SecAggConfig.create(
            run_id="r", round=0, participants=["a", "b"], graph_seed=b"", vector_length=1
        )
    with pytest.raises(ConfigError, match="vector_length"):
        SecAggConfig.create(
            run_id="r", round=0, participants=["a", "b"], graph_seed=bytes(32), vector_length=0
        )


def test_libsodium_agreement_matches_rfc7748_as_computed_by_openssl() -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    for i in range(5):
        a, b = bytes([i + 1]) * 32, bytes(range(i, i + 32))
        a_pub, b_pub = keys.x25519_public(a), keys.x25519_public(b)
        assert a_pub == X25519PrivateKey.from_private_bytes(a).public_key().public_bytes_raw()
        openssl = X25519PrivateKey.from_private_bytes(a).exchange(
            X25519PublicKey.from_public_bytes(b_pub))
        assert keys.agree(a, b_pub) == openssl == keys.agree(b, a_pub)


def test_agreement_rejects_malformed_and_low_order_public_keys() -> None:
    own = bytes(range(32))
    with pytest.raises(RemoteProtocolError, match="unusable X25519"):
        keys.agree(own, b"\x01" * 31)
    for low_order in (bytes(32), b"\x01" + bytes(31)):  # the points 0 and 1
        with pytest.raises(RemoteProtocolError, match="unusable X25519"):
            keys.agree(own, low_order)


def test_advert_signature_check_takes_raw_keys_and_rejects_malformed_signatures() -> None:
    identity = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    raw = identity.public_key().public_bytes_raw()
    payload = keys.advert_payload("run", 1, "alice", b"c" * 32, b"s" * 32)
    sig = keys.sign_advert(identity, payload)  # signed by OpenSSL, checked by libsodium
    keys.verify_advert(raw, payload, sig)
    for bad in (sig[:-1], sig + b"\x00", bytes(64), sig[:32] + bytes(32)):
        with pytest.raises(RemoteProtocolError, match="signature"):
            keys.verify_advert(raw, payload, bad)
    with pytest.raises(RemoteProtocolError, match="signature"):
        keys.verify_advert(raw[:31], payload, sig)


def test_derive_is_rfc5869_hkdf_sha256() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    for secret, label, ctx in ((bytes(32), b"a", b""), (b"\xff" * 32, b"label", b"ctx" * 40),
                               (b"x", b"", b"")):
        reference = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                         info=label + ctx).derive(secret)
        assert keys.derive(secret, label, ctx) == reference
