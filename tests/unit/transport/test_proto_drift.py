"""The committed generated gRPC code matches what scripts/gen_protos.py produces now."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "gen_protos.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("conclave_gen_protos", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _have_plugin(name: str) -> bool:
    return (Path(sys.executable).parent / name).exists() or shutil.which(name) is not None


@pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools is not installed"
)
@pytest.mark.skipif(not _have_plugin("protoc-gen-mypy"), reason="mypy-protobuf is not installed")
def test_generated_code_is_up_to_date(tmp_path: Path):
    gen = _load_script()
    written = gen.generate(tmp_path)
    assert sorted(path.name for path in written) == sorted(gen.GENERATED)
    stale = [
        path.name
        for path in written
        if path.read_bytes() != (gen.PACKAGE_DIR / path.name).read_bytes()
    ]
    assert not stale, f"run `python scripts/gen_protos.py` and commit: {stale} differ"
