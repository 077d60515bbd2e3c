"""Errors a reconciler raises to say how its key should be retried.

Read by :mod:`.processing`, which turns them (and every other exception) into one
:class:`~.outcomes.Outcome`.
"""

from __future__ import annotations


class ReconcileError(Exception):
    """Base class of the errors that steer retries."""


class TemporaryError(ReconcileError):
    """Try again: after ``delay`` seconds, or with rate-limited backoff when ``None``."""

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        if delay is not None and delay < 0:
            raise ValueError("delay must not be negative")
        self.delay = delay


class PermanentError(ReconcileError):
    """Do not retry until the object changes; report it (Event, condition, log, counter).

    ``reason`` is a stable CamelCase word shared by Events, conditions and metrics.
    """

    def __init__(self, message: str, *, reason: str = "ReconcileFailed") -> None:
        super().__init__(message)
        self.reason = reason
