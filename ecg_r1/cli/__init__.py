"""``ecg-r1``: the command line. Each stage's subcommand lives in its own module of this package
and exposes ``register(subparsers)``; :func:`main` finds them all."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import signal
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecg-r1",
        description="Ingest, simulate, render, train and evaluate ECG-R1 models "
        "(ischemic vs non-ischemic T-wave inversion).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module.name.startswith("_"):  # __main__ (python -m ecg_r1.cli) is no subcommand
            continue
        importlib.import_module(f"{__name__}.{module.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    # SIGTERM ends the command as Ctrl-C does, through the clean-up of the code running (an ingest
    # removes its unfinished cohort), instead of killing the process mid-write.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return int(args.func(args) or 0)
    except (OSError, ValueError) as exc:
        # What a user can cause (a path that cannot be written, an argument out of range) reads as
        # one line; --debug shows where it came from.
        if args.debug:
            raise
        print(f"ecg-r1 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ecg-r1 {args.command}: interrupted", file=sys.stderr)
        return 130


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
