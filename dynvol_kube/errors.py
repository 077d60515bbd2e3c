"""Project errors for talking to the kube-apiserver.

Raised by :mod:`dynvol_kube.client` (the one module that touches the HTTP client) so
that no service ever sees ``kubernetes_asyncio`` exceptions; the
original error is always chained as ``__cause__``.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """The apiserver answered with an error status, or could not be reached.

    ``status`` is the HTTP status (``None`` for transport errors), ``reason`` the
    ``Status.reason`` (CamelCase, e.g. ``AlreadyExists``) and ``details`` the decoded
    ``Status`` object when there was one; ``retry_after`` the seconds of the answer's
    ``Retry-After`` header (an overloaded apiserver's 429 says when to come back).
    """

    retry_after: float | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        reason: str = "",
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.details = details or {}


class APINotFound(APIError):
    """404: the object (or its namespace, or its API) does not exist."""


class APIConflict(APIError):
    """409: a stale resourceVersion, or the object already exists (``reason`` tells)."""

    @property
    def already_exists(self) -> bool:
        """Whether the conflict is a create of an existing name."""
        return self.reason == "AlreadyExists"


class APIGone(APIError):
    """410: the resourceVersion is too old; a watch must relist."""


class APIForbidden(APIError):
    """403: RBAC (or an admission plugin such as namespace termination) refused it."""


class APIInvalid(APIError):
    """422: the object failed validation (schema, CEL rules, or a validating webhook)."""


_BY_STATUS: dict[int, type[APIError]] = {
    403: APIForbidden,
    404: APINotFound,
    409: APIConflict,
    410: APIGone,
    422: APIInvalid,
}


def error_for_status(
    status: int | None, message: str, *, reason: str = "", details: dict[str, Any] | None = None
) -> APIError:
    """The most specific :class:`APIError` subclass for an HTTP status."""
    cls = _BY_STATUS.get(status or 0, APIError)
    return cls(message, status=status, reason=reason, details=details)


class TemporaryError(Exception):
    """Raised by a reconcile: try again after ``delay`` seconds (rate-limited when None).

    Read by :mod:`.processing`; any other exception is retried with rate-limited backoff
    too, but logged with its traceback.
    """

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        if delay is not None and delay < 0:
            raise ValueError("delay must not be negative")
        self.delay = delay
