"""``conclave``: the command line. The only place concrete adapters are chosen and wired."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib import metadata, resources
from pathlib import Path

from conclave.core.errors import ConclaveError, ConfigError
from conclave.core.spec import NAME_RULE, RunSpec, is_valid_name
from conclave.core.types import PROTOCOL_VERSION

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
    except UnicodeDecodeError as exc:
        raise ConfigError("spec", source, f"a UTF-8 TOML file (byte {exc.start} is not "
                          "UTF-8)") from None
    try:
        return RunSpec.from_toml(text)
    except ConfigError as exc:
        if exc.field == "run spec":  # a TOML syntax error: name the file, not "<toml>"
            raise ConfigError("spec", source, exc.allowed) from None
        raise


# -- argument types: a bad value is exit 2 with argparse's usage line -----------------------
def _state_dir(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder (got an empty path)")
    return Path(text)


def _participant_name(text: str) -> str:
    if not is_valid_name(text):
        raise argparse.ArgumentTypeError(f"{text!r}: {NAME_RULE}")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r}: a finite number of seconds > 0")
    return value


def _address(lowest_port: int) -> Callable[[str], str]:
    def parse(text: str) -> str:
        host, sep, port = text.rpartition(":")
        if (not sep or not host or "/" in host or not port.isdigit()
                or not lowest_port <= int(port) <= 65535):
            raise argparse.ArgumentTypeError(
                f"{text!r}: HOST:PORT with a port from {lowest_port} to 65535")
        return text

    return parse


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


def _version() -> str:
    try:
        return metadata.version("conclave")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


class _OneLineWarning(logging.Filter):
    """gRPC logs a full traceback when a peer sends bytes that are not a valid message (a
    scanner, a broken client). The coordinator answers such calls with an error and goes on:
    one warning line, not a traceback, for each."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(error).__name__}: {error})"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conclave", description="Federated learning: coordinator, participants, simulation.")
    parser.add_argument("--version", action="version",
                        version=f"conclave {_version()} (protocol {PROTOCOL_VERSION})")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="a coordinator and 4 hospital processes on loopback")
    demo.add_argument("--state-dir", type=_state_dir, default=Path("conclave-demo"),
                      help="ledger, checkpoints, logs and summary.json (default: conclave-demo)")
    demo.add_argument("--rounds", type=int, default=None,
                      help="number of rounds (default: the spec's, 15)")
    demo.add_argument("--trainer", default=None,
                      help="trainer factory module:attribute (default: the spec's)")
    demo.add_argument("--secure-aggregation", action="store_true",
                      help="SecAgg+: the coordinator learns only the sum of the updates")

    sim = sub.add_parser("simulate", help="run a spec with virtual participants in one process")
    sim.add_argument("spec", help="run spec TOML file, or 'heart-disease'")
    sim.add_argument("--state-dir", type=_state_dir, default=None,
                     help="keep the ledger and checkpoints here (default: in memory)")
    sim.add_argument("--rounds", type=int, default=None,
                     help="number of rounds (default: the spec's)")
    sim.add_argument("--secure-aggregation", action="store_true",
                     help="turn on [secure_aggregation] with its defaults")

    coord = sub.add_parser("coordinator", help="serve one run over gRPC")
    coord.add_argument("--spec", required=True, help="run spec TOML file, or 'heart-disease'")
    coord.add_argument("--state-dir", type=_state_dir, required=True,
                       help="the ledger, checkpoints and summary.json live here")
    coord.add_argument("--address", default="127.0.0.1:0", type=_address(0),
                       help="HOST:PORT to bind (port 0 picks a free one); default 127.0.0.1:0")
    coord.add_argument("--rounds", type=int, default=None,
                       help="number of rounds (default: the spec's)")
    coord.add_argument("--new-run", action="store_true",
                       help="start a new run even if the state dir holds an unfinished run of "
                            "this spec (by default that run is resumed)")
    coord.add_argument("--crash-at", default=None, metavar="POINT:ROUND",
                       help="fault injection for tests: kill itself with SIGKILL at POINT "
                            "(selection, upload, aggregation, commit, unmask) of ROUND")

    part = sub.add_parser("participant", help="join a coordinator and train on local data")
    part.add_argument("--coordinator", required=True, type=_address(1),
                      help="HOST:PORT of the coordinator")
    part.add_argument("--name", required=True, type=_participant_name,
                      help="this participant's name, e.g. hospital-0")
    part.add_argument("--trainer", default="conclave.tasks.heart_disease:make_trainer",
                      help="trainer factory module:attribute")
    part.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                      help="passed to the trainer factory (data paths and the like)")
    part.add_argument("--connect-timeout", type=_seconds, default=60.0,
                      help="seconds to keep retrying the first connection")
    part.add_argument("--crash-at", default=None, metavar="STEP:ROUND",
                      help="fault injection for tests: kill itself with SIGKILL (no goodbye, "
                           "like a power cut) just before sending STEP in ROUND: fit (the trained "
                           "update) or a secure-aggregation step (advertise, share, "
                           "masked_input, unmask)")

    ledger = sub.add_parser("ledger", help="read a state directory's ledger")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    show = ledger_sub.add_parser("show", help="rounds and contributions as tables")
    show.add_argument("state_dir", type=_state_dir, help="a coordinator's --state-dir")
    show.add_argument("--json", action="store_true", help="everything, as JSON")
    show.add_argument("--run", default=None, help="run id (default: the latest)")
    show.add_argument("--participant", default=None, help="one participant's whole history")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("grpc._common").addFilter(_OneLineWarning())
    # gRPC's C core prints its own lines (e.g. a failed bind) next to our one-line errors
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
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
