"""Mount plans when a desire changes on a live mount: another key at the same target (a
changed config or readOnly), or the same mount wanted at another target (a changed
mountpoint, passed as ``retire``). docs/design.md §9 states the order chosen per field."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath

from hypothesis import given, settings
from hypothesis import strategies as st

from dynvol_core.mountinfo import MountEntry, parse_mountinfo, resolve_mount, topmost_at
from dynvol_core.mountplans import (
    DesiredMount,
    LazyUnmount,
    Mount,
    Repair,
    SimulatedMounts,
    Step,
    plan_mounts,
)
from tests.unit.core.test_mountplans import table, want

SCOPE = PurePosixPath("/xvols")
P = PurePosixPath

BASE = parse_mountinfo(
    """\
1 1 254:0 / / rw - ext4 /dev/vda rw
2 1 254:0 /xvols /xvols rw shared:1 - ext4 /dev/vda rw
3 1 0:31 / /other rw - tmpfs tmpfs rw
"""
)


def made(*mounts: DesiredMount) -> SimulatedMounts:
    """This module's BASE plus ``mounts``, made in order."""
    return table(*mounts, base=BASE)


def replan(
    state: SimulatedMounts, desired: DesiredMount, *, retire: Sequence[PurePosixPath] = ()
) -> tuple[Step, ...]:
    return plan_mounts(
        desired=[desired], observed=state.entries, scope=SCOPE, known=state.known, retire=retire
    )


def test_a_moved_mountpoint_is_mounted_before_the_old_one_goes() -> None:
    old, new = want("/xvols/m1"), want("/xvols/m2")
    state = made(old)
    steps = replan(state, new, retire=[old.target])
    assert steps == (Mount(new.target, new), LazyUnmount(old.target, "Retired"))
    after = state.apply(steps)
    assert topmost_at(after.entries, old.target) is None
    assert replan(after, new, retire=[old.target]) == ()


def test_a_move_into_or_above_the_old_mount_unmounts_it_first() -> None:
    old = want("/xvols/m1")
    below = want("/xvols/m1/sub")
    # The old mount is on the way to the new target, but is the caller's own: the new
    # directory must not be made inside the old mount's file system.
    assert replan(made(old), below, retire=[old.target]) == (
        LazyUnmount(old.target, "Retired"),
        Mount(below.target, below),
    )
    # The new mount above would hide the old one from every path lookup.
    deep = want("/xvols/a/b")
    above = want("/xvols/a")
    assert replan(made(deep), above, retire=[deep.target]) == (
        LazyUnmount(deep.target, "Retired"),
        Mount(above.target, above),
    )


def test_a_changed_key_at_the_same_target_cannot_overlap() -> None:
    state = made(want("/xvols/data"))
    changed = want("/xvols/data", key="k2")
    assert replan(state, changed) == (
        LazyUnmount(changed.target, "ConfigChanged"),
        Mount(changed.target, changed),
    )


def test_retire_of_a_desired_or_outside_path_is_ignored() -> None:
    data = want("/xvols/data")
    state = made(data)
    assert replan(state, data, retire=[data.target, P("/other"), P("/xvols")]) == ()


def test_a_stale_retired_mount_goes_first() -> None:
    old, new = want("/xvols/m1"), want("/xvols/m2")
    steps = plan_mounts(
        desired=[new],
        observed=made(old).entries,
        scope=SCOPE,
        known=made(old).known,
        stale=[old.target],
        retire=[old.target],
    )
    assert steps == (LazyUnmount(old.target, "Stale"), Mount(new.target, new))


def test_a_retired_mount_with_mounts_below_it_goes_first() -> None:
    old, other = want("/xvols/m1"), want("/xvols/m1/x", key="other")
    new = want("/xvols/m2")
    state = made(old, other)
    steps = plan_mounts(
        desired=[new, other], observed=state.entries, scope=SCOPE, known=state.known,
        retire=[old.target],
    )  # fmt: skip
    assert steps == (
        LazyUnmount(other.target, "ParentRemoved"),
        LazyUnmount(old.target, "Retired"),
        Mount(new.target, new),
        Mount(other.target, other),
    )


def _nests(a: PurePosixPath, b: PurePosixPath) -> bool:
    return a == b or a in b.parents or b in a.parents


# -- property: every transition of one live mount converges, safely, in one plan ----------

names = st.sampled_from(["a", "b", "data"])
targets = st.lists(names, min_size=1, max_size=3).map(lambda parts: SCOPE.joinpath(*parts))


def _apply_checking(state: SimulatedMounts, steps: Sequence[Step], old: MountEntry) -> None:
    """Run ``steps`` one by one; no mount may be made inside (or over) the retired mount."""
    for step in steps:
        if isinstance(step, Mount | Repair) and old in state.entries:
            holder = resolve_mount(state.entries, step.target)
            assert holder != old, (step, steps)
            assert topmost_at(state.entries, step.target) != old, (step, steps)
        state = state.apply([step])


@given(old_target=targets, new_target=targets, same_key=st.booleans(), extra=st.booleans())
@settings(max_examples=200, deadline=None)
def test_any_change_of_target_or_key_converges(
    old_target: PurePosixPath, new_target: PurePosixPath, same_key: bool, extra: bool
) -> None:
    old = want(old_target)
    state = made(old)
    if extra:  # an unrelated mount elsewhere in the scope, which must stay
        bystander = want("/xvols/zz", key="bystander")
        state = state.apply([Mount(bystander.target, bystander)])
    new = want(new_target, key="k1" if same_key else "k2")
    retire = [old_target] if old_target != new_target else []
    desired = [new, bystander] if extra else [new]
    steps = plan_mounts(
        desired=desired, observed=state.entries, scope=SCOPE, known=state.known, retire=retire
    )
    (old_entry,) = [e for e in state.entries if e.path == old_target]
    _apply_checking(state, steps, old_entry)
    after = state.apply(steps)
    # The new desire is met, the old mount is gone, nothing else was touched.
    visible = topmost_at(after.entries, new_target)
    assert visible is not None
    assert after.known[new_target] == new.key
    if old_target != new_target:
        assert old_entry not in after.entries
        assert old_target not in after.known or old_target in new_target.parents
    if extra:
        assert [e for e in after.entries if e.path == P("/xvols/zz")] == [
            e for e in state.entries if e.path == P("/xvols/zz")
        ]
    assert (
        plan_mounts(
            desired=desired, observed=after.entries, scope=SCOPE, known=after.known, retire=retire
        )
        == ()
    )
    # Unmounts last only when make before break is safe: retired, and nesting with no
    # planned mount.
    mounts_at = [s.target for s in steps if isinstance(s, Mount | Repair)]
    first_mount = next((i for i, s in enumerate(steps) if isinstance(s, Mount | Repair)), None)
    if first_mount is not None:
        for step in steps[first_mount:]:
            if isinstance(step, LazyUnmount):
                assert step.reason == "Retired"
                for target in mounts_at:
                    assert not _nests(target, step.target), (step, target)
    # A move to a disjoint target never leaves the pod without either mount.
    if not _nests(old_target, new_target):
        assert steps[-1] == LazyUnmount(old_target, "Retired")
