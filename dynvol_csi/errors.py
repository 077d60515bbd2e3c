"""The node plugin's errors and the one table that maps them to gRPC status codes.

Handlers never build a :class:`~grpclib.exceptions.GRPCError` by hand: they raise project
errors and :func:`grpc_errors` converts them on the way out, so that a given failure always
gets the same code wherever it happens (the CSI spec gives some codes a meaning the CO acts
on: INVALID_ARGUMENT is not retried as is, NOT_FOUND on unpublish is not expected, ...).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Final, ParamSpec, TypeVar

from grpclib import Status
from grpclib.exceptions import GRPCError

from dynvol_core.errors import DynvolError, InvalidObject, InvalidPath
from dynvol_csi.guards import GuardUnavailable, PublishRefused
from dynvol_csi.mounting import MountFailed

__all__ = [
    "ShuttingDown",
    "TargetUnavailable",
    "VolumeConflict",
    "VolumeNotFound",
    "grpc_errors",
    "status_of",
]

log = logging.getLogger(__name__)


class VolumeNotFound(DynvolError):
    """The volume is not published on this node (or not at the path given)."""


class VolumeConflict(DynvolError):
    """The volume is already published, but at another target or with other parameters."""


class TargetUnavailable(DynvolError):
    """The target path cannot be used as it is (its parent is missing, it is a symlink...)."""


class ShuttingDown(DynvolError):
    """The plugin is draining and takes no new work; the CO retries later."""


#: First match wins, so subclasses come before their bases.
_STATUS_TABLE: Final[tuple[tuple[type[BaseException], Status], ...]] = (
    (InvalidObject, Status.INVALID_ARGUMENT),
    (InvalidPath, Status.INVALID_ARGUMENT),
    (VolumeNotFound, Status.NOT_FOUND),
    (VolumeConflict, Status.ALREADY_EXISTS),
    (TargetUnavailable, Status.FAILED_PRECONDITION),
    (PublishRefused, Status.FAILED_PRECONDITION),
    (GuardUnavailable, Status.UNAVAILABLE),
    (ShuttingDown, Status.UNAVAILABLE),
    (MountFailed, Status.INTERNAL),
    (DynvolError, Status.INTERNAL),
    (OSError, Status.INTERNAL),
)


def status_of(exc: BaseException) -> Status:
    """The gRPC status code for ``exc`` (INTERNAL for anything not in the table)."""
    for kind, status in _STATUS_TABLE:
        if isinstance(exc, kind):
            return status
    return Status.INTERNAL


P = ParamSpec("P")
R = TypeVar("R")


def grpc_errors(
    handler: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Decorate an RPC handler so that project errors leave it as :class:`GRPCError`.

    Cancellation and errors that already are GRPCErrors pass through untouched. Failures
    that are the plugin's fault (INTERNAL) are logged with their traceback; the others are
    the caller's and are logged briefly.
    """

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except GRPCError:
            raise
        except Exception as exc:
            status = status_of(exc)
            if status is Status.INTERNAL:
                log.exception("%s failed", handler.__name__)
            else:
                log.info("%s: %s: %s", handler.__name__, status.name, exc)
            raise GRPCError(status, str(exc)) from exc

    return wrapper
