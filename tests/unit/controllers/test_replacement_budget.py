"""The budget for replacing crash-looping DMPs (dynvol_controllers.syncing)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dynvol_controllers.syncing import ReplacementBudget


def test_the_budget_refills_as_old_replacements_leave_the_window() -> None:
    budget = ReplacementBudget(limit=2, window=600.0)
    assert budget.take("dmp-a", 0.0)
    assert budget.take("dmp-a", 10.0)
    assert not budget.take("dmp-a", 20.0)
    assert budget.take("dmp-b", 20.0)  # per DMP name
    assert not budget.take("dmp-a", 599.0)
    assert budget.take("dmp-a", 600.0)  # the first one has left the window
    assert not budget.take("dmp-a", 605.0)


def test_zero_never_replaces() -> None:
    budget = ReplacementBudget(limit=0, window=600.0)
    assert not budget.take("dmp-a", 0.0)
    assert not budget.take("dmp-a", 10_000.0)


def test_a_refusal_is_said_once_per_pod() -> None:
    budget = ReplacementBudget(limit=0, window=600.0)
    assert budget.first_refusal("dmp-a", "uid-1")
    assert not budget.first_refusal("dmp-a", "uid-1")
    assert budget.first_refusal("dmp-a", "uid-2")  # a new pod of that name


@given(
    limit=st.integers(min_value=0, max_value=4),
    window=st.floats(min_value=1.0, max_value=100.0),
    steps=st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.floats(min_value=0.0, max_value=50.0)),
        max_size=40,
    ),
)
def test_never_more_than_the_limit_in_any_window(
    limit: int, window: float, steps: list[tuple[str, float]]
) -> None:
    budget = ReplacementBudget(limit=limit, window=window)
    now = 0.0
    taken: dict[str, list[float]] = {"a": [], "b": []}
    for name, advance in steps:
        now += advance
        recent = [t for t in taken[name] if now - t < window]
        allowed = budget.take(name, now)
        # Allowed exactly when fewer than the limit were taken in the last window.
        assert allowed == (len(recent) < limit)
        if allowed:
            taken[name].append(now)
