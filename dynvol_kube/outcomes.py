"""The one result type of a reconcile, as in controller-runtime.

A reconcile either finished (:class:`Done`) or wants to look again later
(:class:`RequeueAfter`, a timer, not an error). Failure is not an outcome but an exception:
:mod:`.processing` retries the key with rate-limited backoff, or after the delay a
:class:`~.errors.TemporaryError` names. Each outcome is its own class, so no combination
such as "requeue after 5 s *and* error" can be written. Produced by reconcilers; consumed
by :mod:`.processing`.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Done:
    """Reconciled; forget any backoff for the key."""


@attrs.frozen
class RequeueAfter:
    """Reconciled for now; look again after ``delay`` seconds (a timer, not an error)."""

    delay: float = attrs.field(validator=attrs.validators.ge(0))


Outcome = Done | RequeueAfter

DONE = Done()
