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
#: The extra (pyproject.toml) that brings each service's runtime; the base install has
#: none of them, so ``dynvol node`` there says what to install instead of failing to import.
_EXTRAS = {"node": "node", "dmp": "dmp", "controller": "controller"}


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
            if exc.name == f"dynvol.commands.{name}":
                continue
            if name not in _EXTRAS or (exc.name or "").split(".")[0] in _OWN_PACKAGES:
                raise
            _register_missing(sub, name, exc.name or "?")
            continue
        module.register(sub)
    return parser


_OWN_PACKAGES = frozenset(
    {"dynvol", "dynvol_core", "dynvol_providers", "dynvol_kube", "dynvol_csi"}
    | {"dynvol_controllers", "dynvol_dmp"}
)


def _missing_extra(name: str, missing: str) -> str:
    extra = _EXTRAS[name]
    return (
        f"dynvol {name} needs the '{extra}' extra, which is not installed (no module "
        f"{missing!r}): pip install 'dynvol[{extra}]' (or 'dynvol[services]' for all three)"
    )


def _register_missing(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, missing: str
) -> None:
    """A stand-in for a service whose extra is not installed: it says which to install."""
    extra = _EXTRAS[name]
    message = _missing_extra(name, missing)
    stub = sub.add_parser(name, help=f"(not installed: pip install 'dynvol[{extra}]')")
    stub.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def refuse(args: argparse.Namespace) -> int:
        print(message, file=sys.stderr)
        return 2

    stub.set_defaults(func=refuse)


def main(argv: list[str] | None = None) -> int:
    """Run ``dynvol``; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    requested = _requested(argv)
    parser = build_parser(requested)
    try:
        # Parsing may import a service's runtime too (a flag's type checks its value).
        args = parser.parse_args(argv)
    except ModuleNotFoundError as exc:
        command = requested[0] if len(requested) == 1 else ""
        if not _is_missing_extra(command, exc):
            raise
        print(_missing_extra(command, exc.name or "?"), file=sys.stderr)
        return 2
    logs.configure(args.log_level, args.log_format)
    try:
        status: int = args.func(args)
    except ModuleNotFoundError as exc:
        # A service that imports its runtime only when it runs (``dynvol controller``).
        if not _is_missing_extra(args.command, exc):
            raise
        print(_missing_extra(args.command, exc.name or "?"), file=sys.stderr)
        return 2
    return status


def _is_missing_extra(command: str, exc: ModuleNotFoundError) -> bool:
    """Whether ``exc`` says that ``command``'s extra is not installed (not a bug of ours)."""
    top = (exc.name or "").split(".")[0]
    return command in _EXTRAS and bool(top) and top not in _OWN_PACKAGES


if __name__ == "__main__":
    sys.exit(main())
