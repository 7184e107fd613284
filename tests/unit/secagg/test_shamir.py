from __future__ import annotations

import itertools

import numpy as np
import pytest
from secagg_helpers import DeterministicRandom

from conclave.core.errors import LocalProtocolError, RemoteProtocolError
from conclave.core.secagg import shamir


def test_any_t_of_n_shares_reconstruct_and_t_minus_1_do_not() -> None:
    secret = bytes(range(32))
    (shares,) = shamir.share_secrets(
        [secret], threshold=3, xs=[1, 2, 3, 4, 5], random_bytes=DeterministicRandom(1)
    )
    cache = shamir.LagrangeCache()
    for subset in itertools.combinations(shares, 3):
        assert shamir.reconstruct_secret(subset, threshold=3, secret_len=32, cache=cache) == secret
    assert len(cache) == 10  # one set of Lagrange coefficients per distinct x-set
    for subset in itertools.combinations(shares, 2):
        assert shamir.reconstruct_secret(subset, threshold=2, secret_len=32) != secret


def test_fewer_than_threshold_shares_raise() -> None:
    (shares,) = shamir.share_secrets([b"k" * 32], threshold=4, xs=range(1, 8))
    with pytest.raises(LocalProtocolError, match="need 4 shares"):
        shamir.reconstruct_secret(shares[:3], threshold=4, secret_len=32)


def test_secrets_shared_together_are_independent_and_sized() -> None:
    a, b = b"\x01" * 32, b"\xfe" * 32
    sa, sb = shamir.share_secrets([a, b], threshold=2, xs=[3, 9, 11])
    assert [s.x for s in sa] == [3, 9, 11]
    assert all(len(s.data) == shamir.share_len(32) == 36 for s in sa + sb)
    assert shamir.reconstruct_secret(sa[1:], threshold=2, secret_len=32) == a
    assert shamir.reconstruct_secret(sb[:2], threshold=2, secret_len=32) == b


def test_share_values_are_field_elements_even_when_randomness_hits_p() -> None:
    calls = []

    def biased(size: int) -> bytes:
        calls.append(size)
        return b"\xff" * size if len(calls) == 1 else DeterministicRandom(5)(size)

    (shares,) = shamir.share_secrets(
        [b"\x00" * 32], threshold=5, xs=range(1, 11), random_bytes=biased
    )
    assert len(calls) >= 2  # every 0x7fffffff draw was rejected and redrawn
    values = np.concatenate([np.frombuffer(s.data, dtype="<u4") for s in shares])
    assert values.max() < shamir.PRIME
    assert shamir.reconstruct_secret(shares[3:8], threshold=5, secret_len=32) == b"\x00" * 32


def test_deterministic_given_the_randomness() -> None:
    one = shamir.share_secrets(
        [b"s" * 32], threshold=3, xs=[1, 2, 3], random_bytes=DeterministicRandom(7)
    )
    two = shamir.share_secrets(
        [b"s" * 32], threshold=3, xs=[1, 2, 3], random_bytes=DeterministicRandom(7)
    )
    three = shamir.share_secrets(
        [b"s" * 32], threshold=3, xs=[1, 2, 3], random_bytes=DeterministicRandom(8)
    )
    assert one == two
    assert one != three


def test_large_threshold_matches_python_reference() -> None:
    xs = list(range(1, 301))
    (shares,) = shamir.share_secrets(
        [b"\x5a" * 32], threshold=151, xs=xs, random_bytes=DeterministicRandom(2)
    )
    chosen = shares[149:300]
    assert shamir.reconstruct_secret(chosen, threshold=151, secret_len=32) == b"\x5a" * 32
    lam = shamir.lagrange_at_zero(tuple(s.x for s in chosen[:5]))
    p = shamir.PRIME
    for i, xi in enumerate(s.x for s in chosen[:5]):
        others = [s.x for s in chosen[:5] if s.x != xi]
        num = den = 1
        for xj in others:
            num, den = num * xj % p, den * (xj - xi) % p
        assert int(lam[i]) == num * pow(den, p - 2, p) % p


@pytest.mark.parametrize(
    ("threshold", "xs"), [(0, [1, 2]), (3, [1, 2]), (2, [1, 1, 2]), (2, [0, 1]), (2, [1, 1 << 20])]
)
def test_bad_parameters_raise(threshold: int, xs: list[int]) -> None:
    with pytest.raises(LocalProtocolError):
        shamir.share_secrets([b"x" * 32], threshold=threshold, xs=xs)


def test_malformed_share_is_a_remote_error() -> None:
    (shares,) = shamir.share_secrets([b"x" * 32], threshold=2, xs=[1, 2])
    bad = shamir.Share(x=2, data=b"\xff" * 36)
    with pytest.raises(RemoteProtocolError, match="outside the field"):
        shamir.reconstruct_secret([shares[0], bad], threshold=2, secret_len=32)
    with pytest.raises(RemoteProtocolError, match="bytes"):
        shamir.reconstruct_secret(
            [shares[0], shamir.Share(x=2, data=b"")], threshold=2, secret_len=32
        )


def test_batch_inverse_matches_fermat_inverses() -> None:
    from conclave.core.secagg.shamir import PRIME, _batch_inverse

    values = [1, 2, 3, PRIME - 1, 12345, 2**30 + 7]
    assert _batch_inverse(values) == [pow(v, PRIME - 2, PRIME) for v in values]
    assert _batch_inverse([]) == []
