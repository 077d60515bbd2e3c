"""Expectations: own writes are remembered until the cache shows them or they lapse."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dynvol_controllers.expectations import Expectations


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_create_is_expected_until_observed() -> None:
    clock = Clock()
    writes: Expectations[str, int] = Expectations(ttl=10, clock=clock)
    writes.created("a", 1)
    assert writes.creating("a") == 1
    assert writes.pending_creates() == {"a": 1}
    writes.observed("a")
    assert writes.creating("a") is None
    assert writes.pending_creates() == {}


def test_creates_and_deletes_lapse_after_the_ttl() -> None:
    clock = Clock()
    writes: Expectations[str, int] = Expectations(ttl=10, clock=clock)
    writes.created("a", 1)
    writes.deleted("uid-1")
    clock.now = 10
    assert writes.creating("a") == 1
    assert writes.deleting("uid-1")
    clock.now = 10.5
    assert writes.creating("a") is None
    assert not writes.deleting("uid-1")
    assert writes.pending_creates() == {}


def test_a_newer_write_replaces_the_expectation() -> None:
    clock = Clock()
    writes: Expectations[str, int] = Expectations(ttl=10, clock=clock)
    writes.created("a", 1)
    clock.now = 8
    writes.created("a", 2)
    clock.now = 15
    assert writes.creating("a") == 2


@given(
    st.lists(
        st.tuples(st.sampled_from(["create", "delete", "observe", "tick"]), st.integers(0, 3)),
        max_size=40,
    )
)
def test_only_unobserved_writes_younger_than_the_ttl_are_expected(
    steps: list[tuple[str, int]],
) -> None:
    clock = Clock()
    writes: Expectations[int, float] = Expectations(ttl=5, clock=clock)
    creates: dict[int, float] = {}  # key -> when written (the value written)
    deletes: dict[str, float] = {}
    for op, n in steps:
        if op == "create":
            writes.created(n, clock.now)
            creates[n] = clock.now
        elif op == "delete":
            writes.deleted(f"uid-{n}")
            deletes[f"uid-{n}"] = clock.now
        elif op == "observe":
            writes.observed(n)
            creates.pop(n, None)
        else:
            clock.now += n
        expected = {k: v for k, v in creates.items() if clock.now - v <= 5}
        assert writes.pending_creates() == expected
        for uid, when in deletes.items():
            assert writes.deleting(uid) == (clock.now - when <= 5)
