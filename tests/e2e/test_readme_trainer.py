"""The README's "Writing a trainer" example, verbatim, runs in a simulation."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_trainer_example_trains(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (code,) = [b for b in blocks if b.startswith("# my_task.py")]
    (tmp_path / "my_task.py").write_text(code)
    rng = np.random.default_rng(0)
    w_true = np.array([1.0, -2.0, 0.5])
    for i in range(3):
        x = rng.standard_normal((40, 3))
        y = x @ w_true + 0.01 * rng.standard_normal(40)
        np.savetxt(tmp_path / f"site-{i}.csv", np.column_stack([x, y]), delimiter=",")
    spec = tmp_path / "run.toml"
    spec.write_text(f"""
[run]
name = "least-squares"
rounds = 5
[task]
trainer = "my_task:make_trainer"
[task.config]
local_steps = 20
lr = 0.1
[task.options]
data = "{tmp_path}/{{participant}}.csv"
[selection]
min_participants = 3
min_quorum = 3
[simulation]
participants = 3
name_format = "site-{{i}}"
""")
    done = subprocess.run([sys.executable, "-m", "conclave", "simulate", str(spec),
                           "--state-dir", str(tmp_path / "state")], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "state" / "summary.json").read_text())
    losses = [m["loss"] for m in summary["final"]["per_participant"].values()]
    assert summary["rounds_committed"] == 5 and max(losses) < 0.01
