"""The idle reaper: shared DMPs that serve nothing are deleted after a grace delay.

A shared DMP serves every pod of its node, class and credential; when the last of them
goes, it is kept for ``grace`` seconds (a Deployment rolling its pods would otherwise
delete and recreate it), then deleted. The plan says which DMPs are idle
(:attr:`dynvol_core.dispatch.NodePlan.idle_dmps`); this type remembers since when.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import attrs

from dynvol_core.models import PodInfo

__all__ = ["IdleReaper"]


@attrs.define
class IdleReaper:
    """Since when each idle shared DMP has been idle; which are due for deletion."""

    grace: float
    clock: Callable[[], float] = time.monotonic
    _since: dict[str, float] = attrs.field(factory=dict, init=False)

    def due(self, idle: Iterable[PodInfo]) -> tuple[list[PodInfo], float | None]:
        """The DMPs (of those idle now) whose grace ran out, and the seconds until the next
        one's does (None when no other DMP is idle). A DMP no longer idle starts afresh."""
        now = self.clock()
        current = {pod.name: pod for pod in idle}
        for name in [n for n in self._since if n not in current]:
            del self._since[name]
        expired: list[PodInfo] = []
        wait: float | None = None
        for name, pod in current.items():
            remaining = self._since.setdefault(name, now) + self.grace - now
            if remaining <= 0:
                expired.append(pod)
            else:
                wait = remaining if wait is None else min(wait, remaining)
        return expired, wait

    def forget(self, name: str) -> None:
        """The DMP ``name`` was deleted."""
        self._since.pop(name, None)
