"""Cutting a payload into raw chunks and assembling it back, checking its size (and digest).

Both directions of the wire use this: the server assembles uploads, the client assembles
downloaded tasks and stage inputs. ``PayloadAssembler`` (models) allocates exactly the
announced number of bytes once (after checking it against a limit), copies each chunk into
place, and refuses overflow, underflow and a digest that does not match. ``BytesAssembler``
(opaque secure-aggregation payloads) checks the announced size against a limit first, keeps
the chunks as they arrive and joins them once at the end. Neither knows anything of protobuf.
"""

from __future__ import annotations

from collections.abc import Iterator

from conclave.core.errors import RemoteProtocolError
from conclave.core.parameters import Layout, Parameters

DEFAULT_CHUNK_BYTES = 1 << 20
HEADER_ALLOWANCE_BYTES = 1 << 20
"""Room beside one chunk for a header (layout, config, metrics) in one message."""


def default_stage_limit(max_model_bytes: int) -> int:
    """The largest secure-aggregation stage payload accepted when no limit is given.

    A masked input is the model in a fixed-point ring (up to 8 bytes per float32) plus
    room for keys and shares.
    """
    return max_model_bytes * 2 + (1 << 20)


def message_limit(chunk_bytes: int) -> int:
    """The largest gRPC message either side accepts: one chunk plus room for a header.

    Models of any size travel as many chunks, so this never has to grow with the model.
    """
    return chunk_bytes + HEADER_ALLOWANCE_BYTES


def iter_chunks(parameters: Parameters, chunk_bytes: int) -> Iterator[bytes]:
    """The raw little-endian float32 buffer, ``chunk_bytes`` at a time."""
    return iter_byte_chunks(parameters.to_bytes(), chunk_bytes)


def iter_byte_chunks(data: bytes | memoryview, chunk_bytes: int) -> Iterator[bytes]:
    """``data``, ``chunk_bytes`` at a time (nothing at all for empty data)."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    return _slices(memoryview(data), chunk_bytes)


def _slices(view: memoryview, chunk_bytes: int) -> Iterator[bytes]:
    for start in range(0, len(view), chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])


class BytesAssembler:
    """Collects the chunks of one opaque payload of an announced size.

    The announced size is checked against ``max_bytes`` before anything is kept, chunks
    past it are refused as they arrive, and ``finish`` refuses a short payload. ``error``
    is raised on any of these (as for ``PayloadAssembler``).
    """

    __slots__ = ("_chunks", "_error", "_expected", "_filled")

    def __init__(
        self,
        *,
        total_bytes: int,
        max_bytes: int,
        error: type[RemoteProtocolError] = RemoteProtocolError,
    ) -> None:
        if total_bytes > max_bytes:
            raise error(
                f"stage payload of {total_bytes} bytes exceeds the limit of {max_bytes} bytes"
            )
        self._expected = total_bytes
        self._error = error
        self._chunks: list[bytes] = []
        self._filled = 0

    @property
    def received(self) -> int:
        return self._filled

    def add(self, chunk: bytes) -> None:
        end = self._filled + len(chunk)
        if end > self._expected:
            raise self._error(
                f"payload overflows its declared size: more than {self._expected} bytes sent"
            )
        self._chunks.append(chunk)
        self._filled = end

    def finish(self) -> bytes:
        """The payload, once every announced byte arrived (one copy: the final join)."""
        if self._filled != self._expected:
            raise self._error(f"payload ended after {self._filled} of {self._expected} bytes")
        payload = b"".join(self._chunks)
        self._chunks.clear()
        return payload


class PayloadAssembler:
    """Collects the chunks of one model into one preallocated buffer.

    ``error`` is the exception raised on any mismatch: the server passes ``InvalidUpdate``
    (a participant sent a bad upload), the client ``RemoteProtocolError`` (the coordinator
    sent a bad task).
    """

    __slots__ = ("_buffer", "_digest", "_error", "_filled", "_layout", "_view")

    def __init__(
        self,
        layout: Layout,
        *,
        digest: str,
        total_bytes: int,
        max_bytes: int,
        error: type[RemoteProtocolError] = RemoteProtocolError,
    ) -> None:
        nbytes = layout.nbytes
        if nbytes > max_bytes:
            raise error(f"model of {nbytes} bytes exceeds the limit of {max_bytes} bytes")
        if total_bytes != nbytes:
            raise error(
                f"header announces {total_bytes} bytes, layout [{layout.describe()}] "
                f"needs {nbytes}"
            )
        self._layout = layout
        self._digest = digest
        self._error = error
        self._buffer = bytearray(nbytes)
        self._view = memoryview(self._buffer)
        self._filled = 0

    @property
    def received(self) -> int:
        return self._filled

    def add(self, chunk: bytes) -> None:
        end = self._filled + len(chunk)
        if end > len(self._buffer):
            raise self._error(
                f"payload overflows its layout: more than {len(self._buffer)} bytes sent"
            )
        self._view[self._filled : end] = chunk
        self._filled = end

    def finish(self) -> Parameters:
        """The assembled model, once every byte arrived and the digest matches."""
        if self._filled != len(self._buffer):
            raise self._error(
                f"payload ended after {self._filled} of {len(self._buffer)} bytes"
            )
        self._view.release()
        parameters = Parameters.from_bytes(self._layout, self._buffer)
        if parameters.digest() != self._digest:
            raise self._error("payload does not match its digest")
        return parameters
