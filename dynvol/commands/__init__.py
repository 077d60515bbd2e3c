"""Subcommands of ``dynvol``; each module exposes ``register(subparsers)``."""
