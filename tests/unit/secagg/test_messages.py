from __future__ import annotations

import numpy as np
import pytest

from conclave.core.errors import RemoteProtocolError
from conclave.core.secagg import (
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

ADVERT = AdvertiseKeys(
    run_id="r",
    round=7,
    participant="ä",
    c_public=b"c" * 32,
    s_public=b"s" * 32,
    signature=b"g" * 64,
)
SHARE = EncryptedShare(sender="a", recipient="b", ciphertext=b"\x00\x01" * 30)
MESSAGES = [
    ADVERT,
    KeyBundle(run_id="r", round=7, recipient="b", adverts=(ADVERT, ADVERT)),
    ShareKeys(run_id="r", round=7, participant="a", shares=(SHARE,)),
    ShareBundle(run_id="r", round=7, recipient="b", shares=()),
    MaskedInput.from_vector(
        run_id="r", round=7, participant="a", vector=np.arange(5, dtype=np.uint32)
    ),
    UnmaskRequest(run_id="r", round=7, survivors=("a", "b"), dropped=("c",)),
    UnmaskResponse(
        run_id="r",
        round=7,
        participant="a",
        self_mask_shares=(RevealedShare(owner="b", data=b"x" * 36),),
        mask_key_shares=(RevealedShare(owner="c", data=b"y" * 36),),
    ),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_and_corruption(msg: object) -> None:
    cls = type(msg)
    data = msg.to_bytes()  # type: ignore[attr-defined]
    assert cls.from_bytes(data) == msg  # type: ignore[attr-defined]
    for cut in (0, 4, 5, len(data) // 2, len(data) - 1):
        with pytest.raises(RemoteProtocolError):
            cls.from_bytes(data[:cut])  # type: ignore[attr-defined]
    with pytest.raises(RemoteProtocolError, match="trailing"):
        cls.from_bytes(data + b"\x00")  # type: ignore[attr-defined]


def test_wrong_tag_and_absurd_count() -> None:
    with pytest.raises(RemoteProtocolError, match="not a ShareKeys"):
        ShareKeys.from_bytes(ADVERT.to_bytes())
    data = bytearray(ShareBundle(run_id="r", round=1, recipient="b", shares=()).to_bytes())
    data[-4:] = (10**6).to_bytes(4, "little")
    with pytest.raises(RemoteProtocolError, match="impossible item count"):
        ShareBundle.from_bytes(bytes(data))


def test_masked_input_vector() -> None:
    vec = np.array([1, 2**32 - 1], dtype=np.uint32)
    msg = MaskedInput.from_vector(run_id="r", round=1, participant="a", vector=vec)
    assert msg.bits == 32 and np.array_equal(msg.vector, vec)
    bad = MaskedInput(run_id="r", round=1, participant="a", bits=32, data=b"\x00" * 5)
    with pytest.raises(RemoteProtocolError):
        _ = bad.vector


def test_bad_utf8() -> None:
    data = bytearray(UnmaskRequest(run_id="r", round=1, survivors=("a",), dropped=()).to_bytes())
    data[data.rindex(b"a")] = 0xFF
    with pytest.raises(RemoteProtocolError, match="UTF-8"):
        UnmaskRequest.from_bytes(bytes(data))
