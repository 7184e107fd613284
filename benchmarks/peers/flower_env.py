"""A private Flower installation for side-by-side benchmarks, and a runner for its workload.

Flower (with Ray) is installed into its own virtual environment, never into Conclave's: it
pulls ~530 MB and pins its own protobuf/grpcio. The venv lives under the benchmark cache
(``$CONCLAVE_BENCH_CACHE``, default ``~/.cache/conclave-bench``) as ``flwr-venv`` and is
created once; a marker file records a finished installation, so an interrupted one is redone.

Every Flower process is started with :func:`flower_env_vars`, which switches off all outside
contact (telemetry, update check, runtime dependency installation, Ray usage statistics) and
gives Flower a home folder of its own. The workload itself is
``benchmarks/peers/flower_sim_workload.py``; it runs on the Flower venv's Python and never
imports conclave.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "FLOWER_REQUIREMENT",
    "FlowerEnvError",
    "bench_cache_dir",
    "ensure_flower_venv",
    "flower_env_vars",
    "flower_venv_dir",
    "run_flower",
    "run_flower_secagg",
]

FLOWER_REQUIREMENT = "flwr[simulation]==1.42.*"
_EXTRA_REQUIREMENTS = ("psutil>=5.9",)  # the workload measures its process tree with psutil
_MARKER_NAME = ".conclave-bench-ready.json"
_WORKLOAD = Path(__file__).with_name("flower_sim_workload.py")
_PIP_TIMEOUT_S = 1800.0
_STDERR_TAIL_CHARS = 4000


class FlowerEnvError(RuntimeError):
    """The Flower venv could not be built, or the Flower workload did not produce a result."""


def bench_cache_dir() -> Path:
    """The benchmark cache root: ``$CONCLAVE_BENCH_CACHE`` or ``~/.cache/conclave-bench``."""
    configured = os.environ.get("CONCLAVE_BENCH_CACHE")
    root = Path(configured) if configured else Path.home() / ".cache" / "conclave-bench"
    return root.expanduser().resolve()


def flower_venv_dir() -> Path:
    return bench_cache_dir() / "flwr-venv"


def flower_env_vars(home: Path) -> dict[str, str]:
    """Variables that keep Flower and Ray from reaching any outside host.

    ``home`` becomes ``FLWR_HOME`` (Flower's config and state folder) and is created if absent.
    ``HOME`` points at ``home/user``, which holds a stub ``ray_bootstrap_config.yaml``: Ray's
    dashboard (started even with ``include_dashboard=False``) otherwise probes the Azure, GCP
    and AWS metadata services (169.254.169.254, a DNS lookup of metadata.google.internal) to
    guess a cloud provider, whether or not usage statistics are enabled.
    """
    user_home = home / "user"
    user_home.mkdir(parents=True, exist_ok=True)
    bootstrap = user_home / "ray_bootstrap_config.yaml"
    if not bootstrap.is_file():
        bootstrap.write_text("{}\n", encoding="utf-8")
    return {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Off: Ray binds and advertises 127.0.0.1 instead of the host's routable address.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "FLWR_HOME": str(home),
        "HOME": str(user_home),
    }


def _progress(message: str) -> None:
    print(f"[flower-env] {message}", file=sys.stderr, flush=True)


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _read_marker(venv: Path) -> dict[str, str] | None:
    marker = venv / _MARKER_NAME
    if not marker.is_file() or not _venv_python(venv).exists():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("requirement") != FLOWER_REQUIREMENT:
        return None
    return {str(k): str(v) for k, v in data.items()}


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialise venv creation between processes sharing one cache."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _run_step(what: str, argv: list[str], env: Mapping[str, str]) -> str:
    _progress(f"{what}: {' '.join(argv)}")
    try:
        done = subprocess.run(
            argv,
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=_PIP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise FlowerEnvError(f"{what} timed out after {_PIP_TIMEOUT_S:.0f} s") from exc
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-_STDERR_TAIL_CHARS:]
        raise FlowerEnvError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def _build_venv(venv: Path) -> None:
    if venv.exists():
        _progress(f"removing incomplete venv {venv}")
        shutil.rmtree(venv)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # nothing of conclave's environment leaks into the install
    env.pop("VIRTUAL_ENV", None)
    _run_step("creating venv", [sys.executable, "-m", "venv", str(venv)], env)
    python = str(_venv_python(venv))
    pip = [python, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run_step("upgrading pip", [*pip, "install", "--upgrade", "pip"], env)
    _run_step("installing Flower", [*pip, "install", FLOWER_REQUIREMENT, *_EXTRA_REQUIREMENTS], env)
    version = _run_step(
        "checking Flower",
        [python, "-c", "import importlib.metadata as m; print(m.version('flwr'))"],
        {**env, **flower_env_vars(bench_cache_dir() / "flwr-home")},
    ).strip()
    marker = {"requirement": FLOWER_REQUIREMENT, "flwr_version": version}
    (venv / _MARKER_NAME).write_text(json.dumps(marker), encoding="utf-8")
    _progress(f"Flower {version} ready in {venv}")


def ensure_flower_venv() -> Path:
    """Create the Flower venv once (cached) and return the path of its Python interpreter.

    Raises FlowerEnvError with pip's output when the installation fails.
    """
    venv = flower_venv_dir()
    if _read_marker(venv) is not None:
        return _venv_python(venv)
    with _exclusive(bench_cache_dir() / "flwr-venv.lock"):
        if _read_marker(venv) is None:  # another process may have finished it meanwhile
            started = time.monotonic()
            _progress(f"building Flower venv ({FLOWER_REQUIREMENT}) in {venv}")
            _build_venv(venv)
            _progress(f"Flower venv built in {time.monotonic() - started:.1f} s")
    return _venv_python(venv)


def run_flower(clients: int, dim: int, rounds: int, timeout_s: float) -> dict[str, object]:
    """Run the Flower simulation workload once and return its JSON result.

    Raises FlowerEnvError (with the tail of the workload's stderr) when it fails or times out.
    """
    if clients < 1 or dim < 1 or rounds < 1:
        raise ValueError("clients, dim and rounds must all be positive")
    return _run_workload([f"--clients={clients}", f"--dim={dim}", f"--rounds={rounds}"], timeout_s)


def run_flower_secagg(
    clients: int,
    dim: int,
    rounds: int,
    timeout_s: float,
    *,
    num_shares: int = 5,
    threshold: int = 3,
    drop_fraction: float = 0.0,
    clipping_range: float = 8.0,
    quantization_range: int = 2**22,
    max_weight: float = 1000.0,
    seed: int = 0,
) -> dict[str, object]:
    """Run the same workload aggregated with Flower's SecAgg+ and return its JSON result.

    ``drop_fraction`` of the clients (chosen once from ``seed``) fail in every round after
    sharing their keys and before sending their masked vector. The result holds the plain
    run's fields plus ``"secagg": true``, the SecAgg+ parameters, ``rounds_not_aggregated``
    (rounds SecAgg+ halted on, keeping the previous model) and ``max_abs_error`` (aggregate
    against the exact mean of the survivors; each client's update is scaled by 1 / max_weight
    before quantisation, so Flower's default 1000 costs ~3 decimal digits).
    Raises FlowerEnvError as :func:`run_flower`.
    """
    if clients < 3 or dim < 1 or rounds < 1:
        raise ValueError("SecAgg+ needs clients >= 3, and dim and rounds must be positive")
    if not 2 < num_shares <= clients or not 1 < threshold < num_shares:
        raise ValueError("need 2 < num_shares <= clients and 1 < threshold < num_shares")
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError("drop_fraction must be in [0, 1)")
    argv = [
        f"--clients={clients}",
        f"--dim={dim}",
        f"--rounds={rounds}",
        "--secagg",
        f"--num-shares={num_shares}",
        f"--threshold={threshold}",
        f"--drop-fraction={drop_fraction!r}",
        f"--clipping-range={clipping_range!r}",
        f"--quantization-range={quantization_range}",
        f"--max-weight={max_weight!r}",
        f"--seed={seed}",
    ]
    return _run_workload(argv, timeout_s)


def _run_workload(workload_args: list[str], timeout_s: float) -> dict[str, object]:
    python = ensure_flower_venv()
    cache = bench_cache_dir()
    run_dir = cache / "runs" / f"{os.getpid()}-{time.monotonic_ns()}"
    run_dir.mkdir(parents=True)
    json_out = run_dir / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(flower_env_vars(cache / "flwr-home"))
    argv = [str(python), str(_WORKLOAD), *workload_args, f"--json-out={json_out}"]
    stderr_path = run_dir / "stderr.log"
    with stderr_path.open("w", encoding="utf-8") as stderr:
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=run_dir,
            stdout=stderr,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            _kill_tree(process)
            raise FlowerEnvError(
                f"Flower workload timed out after {timeout_s:.0f} s; full log in {stderr_path}; "
                "output tail:\n" + _tail(stderr_path)
            ) from exc
        except BaseException:
            _kill_tree(process)
            raise
    if returncode != 0 or not json_out.is_file():
        raise FlowerEnvError(
            f"Flower workload failed (exit {returncode}); full log in {stderr_path}; "
            "output tail:\n" + _tail(stderr_path)
        )
    result: dict[str, object] = json.loads(json_out.read_text(encoding="utf-8"))
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _tail(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-_STDERR_TAIL_CHARS:]
    except OSError:
        return "(no output captured)"


def _kill_tree(process: subprocess.Popen[bytes]) -> None:
    """Kill the workload and every process it started (Ray's daemons included)."""
    import psutil  # conclave depends on psutil; imported here to keep module import light

    try:
        victims = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        victims = []
    try:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: start_new_session=True
    except ProcessLookupError:
        pass
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()
