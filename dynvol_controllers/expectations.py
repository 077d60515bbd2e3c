"""Expectations: the writes this process made that the informer cache does not show yet.

A reconciler plans from informer caches, which lag its own writes by the watch latency.
Without expectations the next pass would create an object again (AlreadyExists), or
count a deleted one as still there. :class:`Expectations` remembers, per resource, the
objects created (by key, with what was written) and deleted (by UID) until the cache
catches up or ``ttl`` seconds pass, whichever comes first; the lapse covers a watch event
that never comes (a relist drops nothing the cache would report again).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import attrs

__all__ = ["Expectations"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: How long a write is assumed to have happened before the cache confirms it; covers
#: watch lag on a busy apiserver.
DEFAULT_TTL = 120.0


@attrs.define
class Expectations(Generic[K, V]):
    """Creates (key -> what was written) and deletes (UIDs) not yet seen in the cache."""

    ttl: float = DEFAULT_TTL
    clock: Callable[[], float] = time.monotonic
    _creates: dict[K, tuple[float, V]] = attrs.field(factory=dict, init=False)
    _deletes: dict[str, float] = attrs.field(factory=dict, init=False)

    def created(self, key: K, value: V) -> None:
        """This process created (or found existing) ``key``, as ``value``."""
        self._creates[key] = (self.clock() + self.ttl, value)

    def deleted(self, uid: str) -> None:
        """This process deleted the object with ``uid``."""
        self._deletes[uid] = self.clock() + self.ttl

    def observed(self, key: K) -> None:
        """The cache shows ``key`` now: forget its create."""
        self._creates.pop(key, None)

    def creating(self, key: K) -> V | None:
        """What was written for ``key``, while its create is still expected."""
        entry = self._creates.get(key)
        if entry is None or entry[0] < self.clock():
            return None
        return entry[1]

    def pending_creates(self) -> dict[K, V]:
        """Every create still expected (lapsed creates and deletes are dropped)."""
        self._prune()
        return {key: value for key, (_, value) in self._creates.items()}

    def deleting(self, uid: str) -> bool:
        """Whether the object with ``uid`` was deleted by this process, recently enough
        that the cache may still hold it."""
        deadline = self._deletes.get(uid)
        return deadline is not None and deadline >= self.clock()

    def _prune(self) -> None:
        now = self.clock()
        for key in [k for k, (deadline, _) in self._creates.items() if deadline < now]:
            del self._creates[key]
        for uid in [u for u, deadline in self._deletes.items() if deadline < now]:
            del self._deletes[uid]
