"""``conclave``: the command line. The only place concrete adapters are chosen and wired."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from conclave.core.errors import ConclaveError, ConfigError
from conclave.core.spec import RunSpec

logger = logging.getLogger("conclave.cli")

BUILTIN_SPECS = {"heart-disease": ("conclave.tasks.heart_disease", "run.toml")}


def read_spec(source: str) -> RunSpec:
    """Read a run spec from a TOML file, or a built-in one by name (``heart-disease``)."""
    if source in BUILTIN_SPECS:
        package, name = BUILTIN_SPECS[source]
        return RunSpec.from_toml(resources.files(package).joinpath(name).read_text())
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("spec", source, f"a readable TOML file or one of "
                          f"{', '.join(BUILTIN_SPECS)} ({exc.strerror})") from exc
    return RunSpec.from_toml(text)


def write_summary(state_dir: Path, summary: dict[str, object]) -> Path:
    path = state_dir / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _parse_options(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError("--option", pair, "KEY=VALUE")
        out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conclave", description="Federated learning: coordinator, participants, simulation.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="a coordinator and 4 hospital processes on loopback")
    demo.add_argument("--state-dir", type=Path, default=Path("conclave-demo"))
    demo.add_argument("--rounds", type=int, default=None)
    demo.add_argument("--trainer", default=None,
                      help="trainer factory module:attribute (default: the spec's)")
    demo.add_argument("--secure-aggregation", action="store_true",
                      help="SecAgg+: the coordinator learns only the sum of the updates")

    sim = sub.add_parser("simulate", help="run a spec with virtual participants in one process")
    sim.add_argument("spec", help="run spec TOML file, or 'heart-disease'")
    sim.add_argument("--state-dir", type=Path, default=None,
                     help="keep the ledger and checkpoints here (default: in memory)")
    sim.add_argument("--rounds", type=int, default=None)
    sim.add_argument("--secure-aggregation", action="store_true",
                     help="turn on [secure_aggregation] with its defaults")

    coord = sub.add_parser("coordinator", help="serve one run over gRPC")
    coord.add_argument("--spec", required=True, help="run spec TOML file, or 'heart-disease'")
    coord.add_argument("--state-dir", type=Path, required=True)
    coord.add_argument("--address", default="127.0.0.1:0",
                       help="HOST:PORT to bind (port 0 picks a free one); default 127.0.0.1:0")
    coord.add_argument("--rounds", type=int, default=None)
    coord.add_argument("--new-run", action="store_true",
                       help="start a new run even if the state dir holds an unfinished run of "
                            "this spec (by default that run is resumed)")
    coord.add_argument("--crash-at", default=None, metavar="POINT:ROUND",
                       help="fault injection for tests: kill itself with SIGKILL at POINT "
                            "(selection, upload, aggregation, commit, unmask) of ROUND")

    part = sub.add_parser("participant", help="join a coordinator and train on local data")
    part.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    part.add_argument("--name", required=True, help="this participant's name, e.g. hospital-0")
    part.add_argument("--trainer", default="conclave.tasks.heart_disease:make_trainer",
                      help="trainer factory module:attribute")
    part.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                      help="passed to the trainer factory (data paths and the like)")
    part.add_argument("--connect-timeout", type=float, default=60.0,
                      help="seconds to keep retrying the first connection")
    part.add_argument("--crash-at", default=None, metavar="STEP:ROUND",
                      help="fault injection for tests: kill itself with SIGKILL (no goodbye, "
                           "like a power cut) just before sending STEP in ROUND: fit (the trained "
                           "update) or a secure-aggregation step (advertise, share, "
                           "masked_input, unmask)")

    ledger = sub.add_parser("ledger", help="read a state directory's ledger")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    show = ledger_sub.add_parser("show", help="rounds and contributions as tables")
    show.add_argument("state_dir", type=Path)
    show.add_argument("--json", action="store_true")
    show.add_argument("--run", default=None, help="run id (default: the latest)")
    show.add_argument("--participant", default=None, help="one participant's whole history")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for name in ("rounds",):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"conclave: error: invalid --{name} = {value}: an integer >= 1", file=sys.stderr)
            return 2
    from conclave.cli import commands

    try:
        match args.command:
            case "demo":
                return commands.demo(args)
            case "simulate":
                return commands.simulate(args)
            case "coordinator":
                return commands.coordinator(args)
            case "participant":
                return commands.participant(args)
            case "ledger":
                return commands.ledger_show(args)
    except KeyboardInterrupt:
        print("\nconclave: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `conclave ledger show DIR | head`): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except ConfigError as exc:
        print(f"conclave: error: {exc}", file=sys.stderr)
        return 2
    except ConclaveError as exc:
        print(f"conclave: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"conclave: error:{where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
