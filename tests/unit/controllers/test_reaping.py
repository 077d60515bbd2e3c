"""The idle reaper: a shared DMP is due once idle for the whole grace delay."""

from __future__ import annotations

from dynvol_controllers.reaping import IdleReaper
from dynvol_core.models import PodInfo


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def dmp(name: str) -> PodInfo:
    return PodInfo.from_object(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "dynvol-system", "uid": f"uid-{name}"},
            "spec": {"nodeName": "n1", "containers": [{"name": "dmp", "image": "i"}]},
        }
    )


def test_an_idle_dmp_is_due_after_the_grace_and_not_before() -> None:
    clock = Clock()
    reaper = IdleReaper(10, clock=clock)
    a = dmp("a")
    assert reaper.due([a]) == ([], 10)
    clock.now += 4
    assert reaper.due([a]) == ([], 6)
    clock.now += 6
    assert reaper.due([a]) == ([a], None)


def test_a_dmp_that_serves_again_starts_afresh() -> None:
    clock = Clock()
    reaper = IdleReaper(10, clock=clock)
    a = dmp("a")
    reaper.due([a])
    clock.now += 8
    assert reaper.due([]) == ([], None)  # a pod came back to it
    clock.now += 1
    assert reaper.due([a]) == ([], 10)


def test_the_next_check_is_the_soonest_deadline_and_forget_resets() -> None:
    clock = Clock()
    reaper = IdleReaper(10, clock=clock)
    a, b = dmp("a"), dmp("b")
    reaper.due([a])
    clock.now += 3
    assert reaper.due([a, b]) == ([], 7)
    clock.now += 7
    assert reaper.due([a, b]) == ([a], 3)
    reaper.forget("a")  # deleted
    assert reaper.due([a, b]) == ([], 3)
