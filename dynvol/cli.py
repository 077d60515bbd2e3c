"""The ``dynvol`` command line: one entry point for every process.

Each subcommand lives in :mod:`dynvol.commands` and exposes ``register(subparsers)``, which
adds its parser and sets ``func`` to a callable taking the parsed arguments and returning
the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

_COMMANDS = ("node", "dmp", "controller", "dev", "demo")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every subcommand that could be imported."""
    parser = argparse.ArgumentParser(
        prog="dynvol",
        description="Add and remove external storage to running Kubernetes pods.",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
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
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
