"""The one result type of a reconcile, as in controller-runtime.

A reconcile either finished (:class:`Done`), wants to look again later
(:class:`RequeueAfter`), failed and should be retried (:class:`Retry`, rate-limited unless
the error named a delay) or failed for good (:class:`Terminal`: not retried until the object
changes, but logged, counted and reported). Each is its own class, so no combination such
as "requeue after 5 s *and* error" can be expressed. Produced by reconcilers (or derived
from what they raise, by :func:`outcome_of`); consumed by :mod:`.processing`.
"""

from __future__ import annotations

import attrs

from .errors import PermanentError, TemporaryError


@attrs.frozen
class Done:
    """Reconciled; forget any backoff for the key."""


@attrs.frozen
class RequeueAfter:
    """Reconciled for now; look again after ``delay`` seconds (a timer, not an error)."""

    delay: float = attrs.field(validator=attrs.validators.ge(0))


@attrs.frozen
class Retry:
    """Failed; retry after ``delay`` seconds, or with per-key exponential backoff if None."""

    error: BaseException
    delay: float | None = None


@attrs.frozen
class Terminal:
    """Failed for good: no retry until something about the key changes."""

    error: BaseException
    reason: str = "ReconcileFailed"


Outcome = Done | RequeueAfter | Retry | Terminal

DONE = Done()


def outcome_of(result: Outcome | BaseException | None) -> Outcome:
    """Normalise what a reconcile returned (or raised) into an :data:`Outcome`."""
    if result is None:
        return DONE
    if isinstance(result, Done | RequeueAfter | Retry | Terminal):
        return result
    if isinstance(result, PermanentError):
        return Terminal(result, result.reason)
    if isinstance(result, TemporaryError):
        return Retry(result, result.delay)
    if isinstance(result, Exception):
        return Retry(result)
    raise TypeError(f"not an outcome: {result!r}")
