"""Layering rules: conclave.core is pure; imports point downward (import-linter)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_importing_core_loads_no_io_libraries() -> None:
    code = (
        "import sys, conclave.core.spec, conclave.core.rounds, conclave.core.aggregation, "
        "conclave.core.selection, conclave.core.parameters, conclave.core.ports\n"
        "bad = sorted(m for m in ('grpc', 'sqlite3', 'ray', 'psutil', 'torch') if m in sys.modules)\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_import_contracts_hold() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed")
    out = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
