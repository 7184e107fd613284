#!/usr/bin/env python
"""Regenerate the committed gRPC code from ``src/conclave/transport/grpc/conclave.proto``.

    python scripts/gen_protos.py            # rewrite the committed files in place
    python scripts/gen_protos.py --out DIR  # write them to DIR instead (the drift test does)

Needs grpcio-tools and mypy-protobuf (``protoc-gen-mypy`` next to this Python or on PATH).
The proto is compiled under its package path (``conclave/transport/grpc/conclave.proto``), so
the generated ``conclave_pb2_grpc`` imports ``conclave_pb2`` through the ``conclave`` package
and the descriptor is registered under a name no other project will collide with. Any bare
``import conclave_pb2`` that a tool version still emits is rewritten to a relative import.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PROTO = Path("conclave/transport/grpc/conclave.proto")
PACKAGE_DIR = SRC / PROTO.parent
GENERATED = ("conclave_pb2.py", "conclave_pb2.pyi", "conclave_pb2_grpc.py", "conclave_pb2_grpc.pyi")

_BARE_IMPORT = re.compile(r"^import conclave_pb2 as (\w+)$", re.MULTILINE)


def _plugin(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: pip install mypy-protobuf")
    return found


def _fix_imports(text: str) -> str:
    return _BARE_IMPORT.sub(r"from . import conclave_pb2 as \1", text)


def generate(out_dir: Path) -> list[Path]:
    """Compile the proto and write the generated files (flat) into ``out_dir``."""
    try:
        from grpc_tools import protoc  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - exercised only without dev deps
        raise SystemExit("grpcio-tools is not installed: pip install grpcio-tools") from exc

    well_known = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={SRC}",
            f"--proto_path={well_known}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            str(PROTO),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written: list[Path] = []
        for name in GENERATED:
            text = (Path(tmp) / PROTO.parent / name).read_text(encoding="utf-8")
            target = out_dir / name
            target.write_text(_fix_imports(text), encoding="utf-8")
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR, help="output folder")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
