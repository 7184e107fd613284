"""Model parameters: named float32 arrays backed by one contiguous flat buffer.

Every named array is a zero-copy view into ``Parameters.flat``, so the math (aggregation,
masking, compression) works on one 1-D vector and the transport sends one buffer of raw
little-endian float32, never a pickle.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from conclave.core.errors import InvalidUpdate

DTYPE = np.dtype("<f4")
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class ArraySpec:
    """One named array's place in the flat buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Layout:
    """The names and shapes of a model's arrays, in order. Hashable and comparable."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, shapes: Mapping[str, tuple[int, ...]] | list[tuple[str, tuple[int, ...]]]) -> Layout:
        items = list(shapes.items()) if isinstance(shapes, Mapping) else list(shapes)
        entries = tuple((str(name), tuple(int(d) for d in shape)) for name, shape in items)
        names = [name for name, _ in entries]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate array names in layout: {names}")
        for name, shape in entries:
            if not name:
                raise ValueError("array names must be non-empty")
            if any(d < 0 for d in shape):
                raise ValueError(f"array {name!r} has a negative dimension: {shape}")
        return cls(entries)

    @property
    def size(self) -> int:
        """Total number of float32 elements."""
        return sum(math.prod(shape) for _, shape in self.entries)

    @property
    def nbytes(self) -> int:
        return self.size * DTYPE.itemsize

    def specs(self) -> tuple[ArraySpec, ...]:
        out: list[ArraySpec] = []
        offset = 0
        for name, shape in self.entries:
            size = math.prod(shape)
            out.append(ArraySpec(name=name, shape=shape, offset=offset, size=size))
            offset += size
        return tuple(out)

    def describe(self) -> str:
        return ", ".join(f"{name}{list(shape)}" for name, shape in self.entries)


class Parameters:
    """Named float32 arrays that share one flat buffer.

    >>> p = Parameters.from_arrays({"w": np.ones((2, 3)), "b": np.zeros(3)})
    >>> p.flat.shape
    (9,)
    >>> p["w"][0, 0] = 5.0
    >>> float(p.flat[0])
    5.0
    """

    __slots__ = ("_flat", "_layout", "_specs")

    def __init__(self, layout: Layout, flat: FloatArray) -> None:
        if flat.dtype != DTYPE or flat.ndim != 1 or flat.size != layout.size:
            raise ValueError(
                f"flat buffer must be 1-D float32 of {layout.size} elements, "
                f"got {flat.dtype} shape {flat.shape}"
            )
        self._layout = layout
        self._flat = flat
        self._specs = layout.specs()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, arrays: Mapping[str, npt.ArrayLike]) -> Parameters:
        """Copy the given arrays, in order, into one new contiguous buffer."""
        converted = {name: np.asarray(a) for name, a in arrays.items()}
        layout = Layout.of({name: a.shape for name, a in converted.items()})
        params = cls.zeros(layout)
        for spec in params._specs:
            params._flat[spec.offset : spec.offset + spec.size] = converted[spec.name].reshape(-1)
        return params

    @classmethod
    def zeros(cls, layout: Layout) -> Parameters:
        return cls(layout, np.zeros(layout.size, dtype=DTYPE))

    @classmethod
    def from_flat(cls, layout: Layout, flat: npt.NDArray[np.floating]) -> Parameters:
        """Wrap ``flat`` without copying when it already is contiguous float32."""
        arr = np.ascontiguousarray(flat, dtype=DTYPE).reshape(-1)
        return cls(layout, arr)

    @classmethod
    def from_bytes(cls, layout: Layout, data: bytes | bytearray | memoryview) -> Parameters:
        """Decode raw little-endian float32 bytes (zero-copy over ``data``'s buffer)."""
        if len(data) != layout.nbytes:
            raise InvalidUpdate(
                f"payload has {len(data)} bytes, layout [{layout.describe()}] needs {layout.nbytes}"
            )
        arr = np.frombuffer(data, dtype=DTYPE)
        if isinstance(data, bytes):
            # bytes is immutable; a writable copy keeps Parameters safely mutable.
            arr = arr.copy()
        return cls(layout, arr)

    # -- access -------------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        return self._layout

    @property
    def flat(self) -> FloatArray:
        return self._flat

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self._specs)

    def __getitem__(self, name: str) -> FloatArray:
        for spec in self._specs:
            if spec.name == name:
                return self._flat[spec.offset : spec.offset + spec.size].reshape(spec.shape)
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self._specs)

    def items(self) -> Iterator[tuple[str, FloatArray]]:
        for spec in self._specs:
            yield spec.name, self._flat[spec.offset : spec.offset + spec.size].reshape(spec.shape)

    def to_bytes(self) -> memoryview:
        """The raw little-endian float32 buffer, without copying."""
        return memoryview(self._flat).cast("B")  # type: ignore[arg-type]  # numpy stubs lack Buffer

    def copy(self) -> Parameters:
        return Parameters(self._layout, self._flat.copy())

    def digest(self) -> str:
        """SHA-256 over the layout and the raw bytes: equal digests mean identical models."""
        h = hashlib.sha256()
        h.update(self._layout.describe().encode())
        h.update(b"\0")
        h.update(self.to_bytes())
        return h.hexdigest()

    def is_finite(self) -> bool:
        return bool(np.isfinite(self._flat).all())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Parameters):
            return NotImplemented
        return self._layout == other._layout and bool(np.array_equal(self._flat, other._flat))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Parameters([{self._layout.describe()}], {self._layout.nbytes} bytes)"
