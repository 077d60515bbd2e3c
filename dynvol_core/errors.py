"""dynvol's own exception types.

Everything a user can get wrong in an object ends up as :class:`InvalidObject`, which carries
one :class:`FieldError` per problem, each naming the field path the way the Kubernetes API
does (``spec.s3Config.bucket``, ``spec.selector.matchExpressions[0].operator``).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs


class DynvolError(Exception):
    """Base class of every error dynvol raises on purpose."""


@attrs.frozen
class FieldError:
    """One invalid field: where it is and what is allowed instead."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class InvalidObject(DynvolError):
    """An object (or part of one) failed validation; ``errors`` says where and why."""

    def __init__(self, errors: Iterable[FieldError], *, kind: str = "", name: str = "") -> None:
        self.errors: tuple[FieldError, ...] = tuple(errors)
        if not self.errors:
            raise ValueError("InvalidObject needs at least one FieldError")
        self.kind = kind
        self.name = name
        super().__init__(str(self))

    @property
    def paths(self) -> tuple[str, ...]:
        """The field paths named by the errors, in order."""
        return tuple(e.path for e in self.errors)

    def __str__(self) -> str:
        what = " ".join(p for p in (self.kind, f'"{self.name}"' if self.name else "") if p)
        head = f"{what} is invalid: " if what else ""
        return head + "; ".join(str(e) for e in self.errors)


class InvalidPath(DynvolError):
    """A host path or path component is unsafe or malformed."""
