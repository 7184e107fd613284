"""The checkpoint file format: a global model on disk, without pickle.

A file is a fixed header, a JSON description, then the raw parameters::

    magic  b"CONCLAVE-CKPT\\0"   14 bytes
    format version              uint16, little-endian
    description length          uint32, little-endian
    description                 UTF-8 JSON: {"layout": [[name, [dims...]], ...],
                                             "digest": "<sha256 hex>", "payload_bytes": N}
    payload                     N bytes of little-endian float32 (``Parameters.to_bytes()``)

Format version 2 adds the strategy's state (FedAvgM's velocity): the description gains
``"state": {"layout": [...], "digest": "<sha256 hex>"}`` and the state's float32 bytes follow
the model's in the payload (``payload_bytes`` counts both). Files without state are written as
version 1, so they stay readable by older Conclave versions.

The description carries the model digest, so a file can be checked on its own; the ledger
also checks it against the digest recorded when the round was committed. Any mismatch,
truncation or trailing garbage raises ``CheckpointCorrupted`` naming the file.

Files are written atomically: a temporary file in the same folder is written, flushed and
fsynced, renamed over the target, and the folder is fsynced, so a crash leaves either the old
file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import tempfile
from pathlib import Path

from conclave.core.errors import CheckpointCorrupted, LedgerError
from conclave.core.parameters import Layout, Parameters

logger = logging.getLogger(__name__)

MAGIC = b"CONCLAVE-CKPT\x00"
FORMAT_VERSION = 2
_PREFIX = struct.Struct(f"<{len(MAGIC)}sHI")
_MAX_DESCRIPTION_BYTES = 64 * 1024 * 1024


def encode_checkpoint(
    parameters: Parameters, *, digest: str | None = None, state: Parameters | None = None
) -> bytes:
    """Serialise ``parameters`` (and the strategy's ``state``, if any) into the checkpoint file
    format; ``digest``, when the caller already has ``parameters.digest()``, saves hashing the
    model a second time."""
    payload = parameters.to_bytes()
    description: dict[str, object] = {
        "layout": _layout_json(parameters.layout),
        "digest": parameters.digest() if digest is None else digest,
        "payload_bytes": payload.nbytes,
    }
    parts = [payload]
    if state is not None:
        description["state"] = {"layout": _layout_json(state.layout), "digest": state.digest()}
        description["payload_bytes"] = payload.nbytes + state.layout.nbytes
        parts.append(state.to_bytes())
    desc_bytes = json.dumps(description, separators=(",", ":")).encode("utf-8")
    prefix = _PREFIX.pack(MAGIC, 1 if state is None else 2, len(desc_bytes))
    return b"".join((prefix, desc_bytes, *parts))


def _layout_json(layout: Layout) -> list[list[object]]:
    return [[name, list(shape)] for name, shape in layout.entries]


def decode_checkpoint(
    data: bytes | bytearray | memoryview,
    *,
    source: str,
    expected_digest: str | None = None,
    what: str = "checkpoint",
) -> Parameters:
    """Parse checkpoint bytes into the model; ``what`` and ``source`` name the file in error
    messages (spooled updates use this format too, as ``what="spooled update"``).

    Raises ``CheckpointCorrupted`` when the bytes are truncated, altered or do not match
    ``expected_digest``; ``LedgerError`` when the file was written by a newer format version.
    """
    return decode_checkpoint_with_state(
        data, source=source, expected_digest=expected_digest, what=what
    )[0]


def decode_checkpoint_with_state(
    data: bytes | bytearray | memoryview,
    *,
    source: str,
    expected_digest: str | None = None,
    what: str = "checkpoint",
) -> tuple[Parameters, Parameters | None]:
    """As ``decode_checkpoint``, returning ``(model, strategy state or None)``; the state is
    checked against its own digest as well."""
    label = f"{what} {source}"
    view = memoryview(data).cast("B")
    if len(view) < _PREFIX.size:
        raise CheckpointCorrupted(f"{label} is truncated: {len(view)} bytes")
    magic, version, desc_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise CheckpointCorrupted(f"{label} is not a Conclave checkpoint file")
    if version > FORMAT_VERSION:
        raise LedgerError(
            f"{label} has format version {version}; this Conclave reads up to {FORMAT_VERSION}"
        )
    desc_end = _PREFIX.size + desc_len
    if desc_len > _MAX_DESCRIPTION_BYTES or desc_end > len(view):
        raise CheckpointCorrupted(f"{label} is truncated inside its description")
    layout, recorded_digest, payload_bytes, state_desc = _parse_description(
        bytes(view[_PREFIX.size : desc_end]), label
    )
    state_nbytes = 0 if state_desc is None else state_desc[0].nbytes
    needed = layout.nbytes + state_nbytes
    payload = view[desc_end:]
    if payload_bytes != needed or len(payload) != needed:
        problem = "is truncated" if len(payload) < needed else "is corrupted"
        raise CheckpointCorrupted(
            f"{label} {problem}: it holds {len(payload)} payload bytes; "
            f"its layout [{layout.describe()}] needs {needed}"
        )
    parameters = Parameters.from_bytes(layout, bytes(payload[: layout.nbytes]))
    actual = parameters.digest()
    if actual != recorded_digest:
        raise CheckpointCorrupted(
            f"{label} is corrupted: its content has digest {actual[:12]}, "
            f"the file says {recorded_digest[:12]}"
        )
    if expected_digest is not None and actual != expected_digest:
        raise CheckpointCorrupted(
            f"{label} has digest {actual[:12]}, but the ledger recorded {expected_digest[:12]}"
        )
    state = None
    if state_desc is not None:
        state_layout, state_digest = state_desc
        state = Parameters.from_bytes(state_layout, bytes(payload[layout.nbytes :]))
        if state.digest() != state_digest:
            raise CheckpointCorrupted(
                f"{label} is corrupted: its strategy state has digest {state.digest()[:12]}, "
                f"the file says {state_digest[:12]}"
            )
    return parameters, state


def _parse_description(
    raw: bytes, label: str
) -> tuple[Layout, str, int, tuple[Layout, str] | None]:
    try:
        desc = json.loads(raw.decode("utf-8"))
        layout = _parse_layout(desc["layout"])
        digest = desc["digest"]
        payload_bytes = desc["payload_bytes"]
        state = None
        if "state" in desc:
            state = (_parse_layout(desc["state"]["layout"]), desc["state"]["digest"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointCorrupted(f"{label} has an unreadable description") from exc
    if not isinstance(digest, str) or not isinstance(payload_bytes, int) or (
            state is not None and not isinstance(state[1], str)):
        raise CheckpointCorrupted(f"{label} has an unreadable description")
    return layout, digest, payload_bytes, state


def _parse_layout(raw: object) -> Layout:
    if not isinstance(raw, list):
        raise TypeError("layout is not a list")
    return Layout.of([(str(name), tuple(int(d) for d in shape)) for name, shape in raw])


def write_checkpoint(
    path: Path, parameters: Parameters, *, digest: str | None = None,
    state: Parameters | None = None,
) -> int:
    """Atomically write ``parameters`` (and the strategy ``state``) to ``path``; returns the
    file size in bytes.

    Missing folders are created (and their parents fsynced). OS errors become ``LedgerError``.
    ``digest`` is as for ``encode_checkpoint``.
    """
    data = encode_checkpoint(parameters, digest=digest, state=state)
    folder = path.parent
    try:
        _make_dirs_durably(folder)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            _unlink_quietly(Path(tmp_name))
            raise
        fsync_dir(folder)
    except OSError as exc:
        raise LedgerError(f"cannot write checkpoint {path}: {exc}") from exc
    return len(data)


def read_checkpoint(
    path: Path, *, expected_digest: str | None = None, what: str = "checkpoint"
) -> Parameters:
    """Read and verify a checkpoint file (``CheckpointCorrupted`` if missing or damaged)."""
    return read_checkpoint_with_state(path, expected_digest=expected_digest, what=what)[0]


def read_checkpoint_with_state(
    path: Path, *, expected_digest: str | None = None, what: str = "checkpoint"
) -> tuple[Parameters, Parameters | None]:
    """Read and verify a checkpoint file: ``(model, strategy state or None)``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CheckpointCorrupted(f"{what} {path} is missing") from exc
    except OSError as exc:
        raise LedgerError(f"cannot read {what} {path}: {exc}") from exc
    return decode_checkpoint_with_state(
        data, source=str(path), expected_digest=expected_digest, what=what
    )


def delete_checkpoint_files(paths: list[Path]) -> None:
    """Delete files the ledger no longer references (pruned checkpoints) and sync their
    folders. A file that cannot be deleted is only wasted space: log it and go on."""
    folders: set[Path] = set()
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("cannot delete unreferenced checkpoint %s: %s", path, exc)
        folders.add(path.parent)
    for folder in sorted(folders):
        with contextlib.suppress(OSError):
            fsync_dir(folder)


def _make_dirs_durably(folder: Path) -> None:
    missing: list[Path] = []
    current = folder
    while not current.exists():
        missing.append(current)
        current = current.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        fsync_dir(new.parent)


def fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
