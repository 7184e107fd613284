"""serde and chunks without a network: typed config, layouts, chunk assembly."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conclave.core.errors import InvalidUpdate, LocalProtocolError, RemoteProtocolError
from conclave.core.parameters import Layout, Parameters
from conclave.transport.grpc import serde
from conclave.transport.grpc.chunks import PayloadAssembler, iter_chunks

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(),
)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text(), scalars, max_size=8))
def test_config_round_trip_keeps_values_and_types(config):
    decoded = serde.config_from_proto(serde.config_to_proto(config))
    assert decoded == config
    assert {k: type(v) for k, v in decoded.items()} == {k: type(v) for k, v in config.items()}


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, None, b"raw", [1]])
def test_unencodable_config_values_are_refused(value):
    with pytest.raises(LocalProtocolError):
        serde.config_to_proto({"key": value})  # type: ignore[dict-item]


def test_layout_round_trip_and_validation():
    layout = Layout.of({"w": (3, 4), "s": (), "e": (0, 2)})
    assert serde.layout_from_proto(serde.layout_to_proto(layout)) == layout
    bad = serde.layout_to_proto(layout)
    bad.arrays.add(name="w", shape=[1])
    with pytest.raises(InvalidUpdate, match="duplicate"):
        serde.layout_from_proto(bad)


@pytest.mark.parametrize("chunk_bytes", [1, 7, 48, 1 << 20])
def test_chunks_reassemble(chunk_bytes):
    params = Parameters.from_arrays({"a": [[1.0, 2.0], [3.0, 4.0]], "b": [5.0, -6.0, 7.5]})
    chunks = list(iter_chunks(params, chunk_bytes))
    assert len(chunks) == math.ceil(params.layout.nbytes / chunk_bytes)
    assembler = PayloadAssembler(
        params.layout, digest=params.digest(), total_bytes=params.layout.nbytes, max_bytes=10**6
    )
    for chunk in chunks:
        assembler.add(chunk)
    assert assembler.finish() == params


def test_assembler_refusals():
    params = Parameters.from_arrays({"a": [1.0, 2.0]})
    layout, digest, nbytes = params.layout, params.digest(), params.layout.nbytes

    with pytest.raises(InvalidUpdate, match="exceeds the limit"):
        PayloadAssembler(
            layout, digest=digest, total_bytes=nbytes, max_bytes=7, error=InvalidUpdate
        )
    with pytest.raises(RemoteProtocolError, match="announces 9 bytes"):
        PayloadAssembler(layout, digest=digest, total_bytes=9, max_bytes=100)

    assembler = PayloadAssembler(layout, digest=digest, total_bytes=nbytes, max_bytes=100)
    assembler.add(bytes(params.to_bytes()))
    with pytest.raises(RemoteProtocolError, match="overflows"):
        assembler.add(b"\0")

    short = PayloadAssembler(layout, digest=digest, total_bytes=nbytes, max_bytes=100)
    short.add(bytes(params.to_bytes())[:4])
    with pytest.raises(RemoteProtocolError, match="ended after 4 of 8 bytes"):
        short.finish()

    wrong = PayloadAssembler(layout, digest="0" * 64, total_bytes=nbytes, max_bytes=100)
    wrong.add(bytes(params.to_bytes()))
    with pytest.raises(RemoteProtocolError, match="digest"):
        wrong.finish()
