"""The checkpoint file format: round trips, and every kind of damage is caught."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conclave.core.errors import CheckpointCorrupted, LedgerError
from conclave.core.parameters import Parameters
from conclave.ledger.checkpoint_file import (
    FORMAT_VERSION,
    MAGIC,
    decode_checkpoint,
    decode_checkpoint_with_state,
    encode_checkpoint,
    read_checkpoint,
    read_checkpoint_with_state,
    write_checkpoint,
)

shapes = st.lists(st.lists(st.integers(0, 4), max_size=3).map(tuple), min_size=1, max_size=4)


@settings(max_examples=50, deadline=None)
@given(shapes=shapes, seed=st.integers(0, 2**32 - 1))
def test_round_trip(shapes: list[tuple[int, ...]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    model = Parameters.from_arrays(
        {f"layer{i}.weight": rng.standard_normal(shape) for i, shape in enumerate(shapes)}
    )
    data = encode_checkpoint(model)
    assert data.startswith(MAGIC)
    back = decode_checkpoint(data, source="mem", expected_digest=model.digest())
    assert back == model
    assert back.layout == model.layout


def small() -> Parameters:
    return Parameters.from_arrays({"w": [[1.0, 2.0], [3.0, 4.0]], "b": [0.5]})


def test_every_truncation_is_caught() -> None:
    data = encode_checkpoint(small())
    for length in range(len(data)):
        with pytest.raises(CheckpointCorrupted, match=r"file\.ckpt"):
            decode_checkpoint(data[:length], source="file.ckpt")


def test_every_single_byte_flip_is_caught() -> None:
    data = encode_checkpoint(small())
    for index in range(len(data)):
        damaged = bytearray(data)
        damaged[index] ^= 0x10
        with pytest.raises(LedgerError):
            decode_checkpoint(bytes(damaged), source="x")


def test_newer_format_version_is_refused_not_called_corrupt() -> None:
    data = bytearray(encode_checkpoint(small()))
    struct.pack_into("<H", data, len(MAGIC), FORMAT_VERSION + 1)
    with pytest.raises(LedgerError, match="format version") as info:
        decode_checkpoint(bytes(data), source="x")
    assert not isinstance(info.value, CheckpointCorrupted)


def test_write_is_atomic_replace_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "round-00001.ckpt"
    first = write_checkpoint(target, small())
    assert first == target.stat().st_size
    bigger = Parameters.from_arrays({"w": np.ones((8, 8))})
    write_checkpoint(target, bigger)
    assert read_checkpoint(target, expected_digest=bigger.digest()) == bigger
    assert [p.name for p in target.parent.iterdir()] == ["round-00001.ckpt"]


def test_missing_file_is_corrupted(tmp_path: Path) -> None:
    with pytest.raises(CheckpointCorrupted, match="missing"):
        read_checkpoint(tmp_path / "gone.ckpt")


def _model_and_velocity() -> tuple[Parameters, Parameters]:
    model = Parameters.from_arrays({"w": np.arange(6.0).reshape(2, 3), "b": [0.5, -1.0]})
    velocity = Parameters.from_arrays({"w": np.full((2, 3), 0.25), "b": [-2.0, 3.0]})
    return model, velocity


def test_strategy_state_round_trips_and_is_checked_on_its_own() -> None:
    model, velocity = _model_and_velocity()
    plain = encode_checkpoint(model)
    with_state = encode_checkpoint(model, state=velocity)
    assert struct.unpack_from("<H", plain, len(MAGIC))[0] == 1  # still readable by v1 readers
    assert struct.unpack_from("<H", with_state, len(MAGIC))[0] == FORMAT_VERSION == 2
    assert decode_checkpoint_with_state(plain, source="m") == (model, None)
    back, state = decode_checkpoint_with_state(with_state, source="m",
                                               expected_digest=model.digest())
    assert back == model and state == velocity
    assert decode_checkpoint(with_state, source="m") == model
    # a flipped byte inside the state (the payload's tail) is caught, naming the state
    damaged = with_state[:-3] + bytes([with_state[-3] ^ 0x01]) + with_state[-2:]
    with pytest.raises(CheckpointCorrupted, match="strategy state has digest"):
        decode_checkpoint_with_state(damaged, source="m")
    with pytest.raises(CheckpointCorrupted, match="strategy state has digest"):
        decode_checkpoint(damaged, source="m")  # the model alone is no excuse
    with pytest.raises(CheckpointCorrupted, match="truncated"):
        decode_checkpoint(with_state[:-4], source="m")
    with pytest.raises(CheckpointCorrupted, match="corrupted"):
        decode_checkpoint(with_state + b"\0\0\0\0", source="m")


def test_state_written_atomically_to_a_file(tmp_path: Path) -> None:
    model, velocity = _model_and_velocity()
    path = tmp_path / "ck" / "round-00001.ckpt"
    size = write_checkpoint(path, model, state=velocity)
    assert size == path.stat().st_size
    assert read_checkpoint_with_state(path) == (model, velocity)
    assert read_checkpoint(path) == model
