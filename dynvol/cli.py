"""The ``dynvol`` command line: one entry point for every process.

Each subcommand lives in :mod:`dynvol.commands` and exposes ``register(subparsers)``, which
adds its parser and sets ``func`` to a callable taking the parsed arguments and returning
the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dynvol import logs

_COMMANDS = ("node", "dmp", "controller", "dev", "demo")


def _requested(argv: list[str]) -> tuple[str, ...]:
    """The subcommand named in ``argv``, so only its (heavy) imports are paid for; every
    subcommand when none is named (``--help``)."""
    args = iter(argv)
    for arg in args:
        if arg in ("--log-level", "--log-format"):
            next(args, None)
        elif not arg.startswith("-"):
            return (arg,) if arg in _COMMANDS else _COMMANDS
    return _COMMANDS


def build_parser(commands: tuple[str, ...] = _COMMANDS) -> argparse.ArgumentParser:
    """The argument parser, with those of ``commands`` that are installed."""
    parser = argparse.ArgumentParser(
        prog="dynvol",
        description="Add and remove external storage to running Kubernetes pods.",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=logs.FORMATS,
        help="text (default) or json: one object per line with the keys ts, level, logger, "
        "msg (and namespace, name, node, reason when known)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in commands:
        try:
            module = importlib.import_module(f"dynvol.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"dynvol.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``dynvol``; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_requested(argv))
    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
