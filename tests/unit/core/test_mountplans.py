"""Mount plans: each rule on its own, then properties over generated mount tables.

The generated tables are built by applying mounts through the simulator, so they are
consistent trees (every mount's parent is the mount it was made on), like the kernel's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynvol_core.errors import InvalidPath
from dynvol_core.mountinfo import (
    MountEntry,
    mount_containing,
    parse_mountinfo,
    resolve_mount,
    topmost_at,
    visible_stack_at,
)
from dynvol_core.mountplans import (
    DesiredMount,
    LazyUnmount,
    Mount,
    Repair,
    SimulatedMounts,
    Step,
    apply_to_model,
    plan_mounts,
    plan_teardown,
)
from dynvol_core.paths import XvolsLayout

SCOPE = PurePosixPath("/xvols")
P = PurePosixPath

BASE = parse_mountinfo(
    """\
1 1 254:0 / / rw - ext4 /dev/vda rw
2 1 254:0 /xvols /xvols rw shared:1 - ext4 /dev/vda rw
3 1 0:30 / /xvols-old rw - tmpfs tmpfs rw
4 1 0:31 / /other rw - tmpfs tmpfs rw
"""
)


def want(
    target: str | PurePosixPath, key: str = "k1", source: str = "s3fs", fs_type: str = "fuse.s3fs"
) -> DesiredMount:
    return DesiredMount(target=P(target), source=source, fs_type=fs_type, key=key)


def table(*mounts: DesiredMount, base: Sequence[MountEntry] = BASE) -> SimulatedMounts:
    """BASE plus ``mounts`` made in order by the caller (so their keys are known)."""
    return apply_to_model(base, [Mount(m.target, m) for m in mounts])


def plan(
    state: SimulatedMounts,
    desired: Iterable[DesiredMount],
    *,
    stale: Iterable[PurePosixPath] = (),
    known: Mapping[PurePosixPath, str] | None = None,
    scope: PurePosixPath = SCOPE,
) -> tuple[Step, ...]:
    return plan_mounts(
        desired=desired,
        observed=state.entries,
        scope=scope,
        stale=frozenset(stale),
        known=state.known if known is None else known,
    )


def test_nothing_to_do() -> None:
    assert plan(table(), []) == ()
    data = want("/xvols/data")
    assert plan(table(data), [data]) == ()


def test_missing_mounts_are_mounted_shallowest_first() -> None:
    a, ab, b = want("/xvols/a"), want("/xvols/a/b"), want("/xvols/b")
    assert plan(table(), [ab, b, a]) == (
        Mount(a.target, a),
        Mount(b.target, b),
        Mount(ab.target, ab),
    )


def test_changed_key_remounts() -> None:
    old, new = want("/xvols/data", "k1"), want("/xvols/data", "k2")
    assert plan(table(old), [new]) == (
        LazyUnmount(P("/xvols/data"), "ConfigChanged"),
        Mount(new.target, new),
    )


def test_unknown_mount_is_adopted_only_if_it_matches() -> None:
    data = want("/xvols/data")
    state = table(data)
    # The caller restarted and forgot what it mounted.
    assert plan(state, [data], known={}) == ()
    other = want("/xvols/data", source="other-bucket")
    assert plan(state, [other], known={}) == (
        LazyUnmount(P("/xvols/data"), "ForeignMount"),
        Mount(other.target, other),
    )


def test_stale_desired_mount_is_repaired() -> None:
    data = want("/xvols/data")
    assert plan(table(data), [data], stale=[P("/xvols/data")]) == (Repair(data.target, data),)


def test_stale_undesired_mount_is_unmounted() -> None:
    data = want("/xvols/data")
    assert plan(table(data), [], stale=[P("/xvols/data")]) == (
        LazyUnmount(P("/xvols/data"), "Stale"),
    )


def test_stale_stack_is_cleared_and_mounted() -> None:
    data = want("/xvols/data")
    state = table(data, data)
    assert plan(state, [data], stale=[P("/xvols/data")]) == (
        LazyUnmount(P("/xvols/data"), "Stale"),
        LazyUnmount(P("/xvols/data"), "Stale"),
        Mount(data.target, data),
    )


def test_undesired_mounts_are_unmounted_deepest_first_with_every_layer() -> None:
    a, ab, abc = want("/xvols/a"), want("/xvols/a/b"), want("/xvols/a/b/c")
    state = table(a, ab, abc, want("/xvols/a/c"), ab)
    # The second mount at /xvols/a/b hides /xvols/a/b/c (mounted on the first one), which
    # a lookup cannot reach; it goes with the first /xvols/a/b.
    assert plan(state, []) == (
        LazyUnmount(P("/xvols/a/b"), "NotDesired"),
        LazyUnmount(P("/xvols/a/b"), "NotDesired"),
        LazyUnmount(P("/xvols/a/c"), "NotDesired"),
        LazyUnmount(P("/xvols/a"), "NotDesired"),
    )
    assert [e.mount_point for e in state.apply(plan(state, [])).entries] == [
        e.mount_point for e in BASE
    ]


def test_mounts_hidden_by_a_later_mount_above_are_left_until_uncovered() -> None:
    ab, a = want("/xvols/a/b"), want("/xvols/a")
    state = table(ab, a)  # made out of order by someone else: /xvols/a covers /xvols/a/b
    assert plan(state, [a, ab]) == (Mount(ab.target, ab),)
    first = plan(state, [])
    assert first == (LazyUnmount(a.target, "NotDesired"),)
    uncovered = state.apply(first)
    assert plan(uncovered, []) == (LazyUnmount(ab.target, "NotDesired"),)


def test_mounts_on_the_way_to_a_desired_target_are_kept() -> None:
    # e.g. a slot bound onto itself, seen by a shared DMP below its /xvols
    slot = want("/xvols/uuid/pod", source="/dev/vda", fs_type="ext4", key="slot")
    data = want("/xvols/uuid/pod/data")
    state = table(slot)
    assert plan(state, [data]) == (Mount(data.target, data),)
    assert plan(state.apply([Mount(data.target, data)]), [data]) == ()
    # ... unless it is stale.
    steps = plan(state.apply([Mount(data.target, data)]), [data], stale=[slot.target])
    assert steps == (
        LazyUnmount(data.target, "ParentRemoved"),
        LazyUnmount(slot.target, "Stale"),
        Mount(data.target, data),
    )


def test_submounts_of_a_remount_are_unmounted_first_and_mounted_again() -> None:
    a, ab, junk = want("/xvols/a"), want("/xvols/a/b"), want("/xvols/a/junk")
    state = table(a, ab, junk)
    new_a = want("/xvols/a", key="k2")
    assert plan(state, [new_a, ab]) == (
        LazyUnmount(P("/xvols/a/b"), "ParentRemoved"),
        LazyUnmount(P("/xvols/a/junk"), "NotDesired"),
        LazyUnmount(P("/xvols/a"), "ConfigChanged"),
        Mount(new_a.target, new_a),
        Mount(ab.target, ab),
    )


def test_a_new_mount_does_not_hide_existing_ones() -> None:
    ab = want("/xvols/a/b")
    a = want("/xvols/a")
    assert plan(table(ab), [a, ab]) == (
        LazyUnmount(P("/xvols/a/b"), "Shadowed"),
        Mount(a.target, a),
        Mount(ab.target, ab),
    )


def test_repairs_come_before_mounts_below_them() -> None:
    a, ab = want("/xvols/a"), want("/xvols/a/b")
    state = table(a, ab)
    assert plan(state, [a, ab], stale=[a.target, ab.target]) == (
        LazyUnmount(P("/xvols/a/b"), "ParentRemoved"),
        Repair(a.target, a),
        Mount(ab.target, ab),
    )


def test_scope_and_outside_are_never_touched() -> None:
    outside = [want("/other/x"), want("/xvols-old/x"), want("/elsewhere")]
    state = table(*outside)
    # A mount stacked on the scope itself is not the planner's either.
    state = state.apply([Mount(SCOPE, want("/xvols", key="scope"))])
    assert plan(state, [], stale=[P("/other/x"), SCOPE, P("/xvols-old/x")]) == ()


def test_invalid_desires_are_rejected() -> None:
    for target in ["/xvols", "/other/x", "/xvols-old/x", "/"]:
        with pytest.raises(InvalidPath):
            plan(table(), [want(target)])
    with pytest.raises(InvalidPath, match="two different mounts"):
        plan(table(), [want("/xvols/a", "k1"), want("/xvols/a", "k2")])
    assert plan(table(), [want("/xvols/a"), want("/xvols/a")]) == (
        Mount(P("/xvols/a"), want("/xvols/a")),
    )
    for target in ["relative", "/xvols/../etc", "//xvols/a"]:
        with pytest.raises(InvalidPath):
            want(target)
    with pytest.raises(InvalidPath, match="scope"):
        plan(table(), [], scope=P("/xvols/../etc"))


def test_unnormalised_observed_mount_points_are_ignored() -> None:
    weird = parse_mountinfo("9 2 0:40 / /xvols/../etc rw - tmpfs t rw\n")
    state = SimulatedMounts(entries=(*BASE, *weird))
    assert plan(state, []) == ()
    assert plan_teardown(state.entries, SCOPE, include_scope=False) == ()


def test_teardown() -> None:
    state = table(want("/xvols/a"), want("/xvols/a/b"), want("/xvols/a/b"), want("/other/x"))
    assert plan_teardown(state.entries, "/xvols/a") == (
        LazyUnmount(P("/xvols/a/b"), "Teardown"),
        LazyUnmount(P("/xvols/a/b"), "Teardown"),
        LazyUnmount(P("/xvols/a"), "Teardown"),
    )
    assert plan_teardown(state.entries, "/xvols/a", include_scope=False) == (
        LazyUnmount(P("/xvols/a/b"), "Teardown"),
        LazyUnmount(P("/xvols/a/b"), "Teardown"),
    )
    after = state.apply(plan_teardown(state.entries, SCOPE, include_scope=False))
    assert [e.mount_point for e in after.entries] == [
        "/",
        "/xvols",
        "/xvols-old",
        "/other",
        "/other/x",
    ]
    assert after.known == {P("/other/x"): "k1"}


def test_simulator_follows_the_kernel() -> None:
    a, ab = want("/xvols/a"), want("/xvols/a/b")
    state = table(a, ab)
    # Lazy unmount detaches the whole subtree; unmounting what is not mounted is a no-op.
    after = state.apply([LazyUnmount(a.target, "NotDesired"), LazyUnmount(P("/x"), "Stale")])
    assert [e.mount_point for e in after.entries] == [e.mount_point for e in BASE]
    assert after.known == {}
    stacked = state.apply([Mount(a.target, want("/xvols/a", key="k9"))])
    assert stacked.entries[-1].parent_id == stacked.entries[-3].mount_id
    assert stacked.known[a.target] == "k9"


# --- properties -------------------------------------------------------------------------

names = st.sampled_from(["a", "b d", "é"])
relative = st.lists(names, min_size=1, max_size=3).map(lambda parts: P(*parts))
scoped = relative.map(lambda rel: SCOPE / rel)
outside = st.sampled_from([P("/other"), P("/xvols-old"), P("/")]).flatmap(
    lambda base: relative.map(lambda rel: base / rel)
)
keys = st.sampled_from(["k1", "k2"])
sources = st.sampled_from(["s3fs", "remote:bucket"])


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[SimulatedMounts, list[DesiredMount], frozenset[PurePosixPath]]:
    """A mount table, what the caller remembers of it, desires and stale paths."""
    made = draw(
        st.lists(
            st.builds(want, (scoped | outside).map(str), keys, sources, st.just("fuse.x")),
            max_size=7,
        )
    )
    state = table(*made)
    forget = draw(
        st.sets(st.sampled_from(sorted(state.known)), max_size=3) if state.known else st.just(set())
    )
    state = SimulatedMounts(
        entries=state.entries,
        known={path: key for path, key in state.known.items() if path not in forget},
    )
    # Desire partly what is there (so keys, sources and staleness matter), partly new paths.
    present = sorted({e.path for e in state.entries if SCOPE in e.path.parents})
    desired_targets = draw(st.sets(scoped, max_size=4))
    if present:
        desired_targets |= draw(st.sets(st.sampled_from(present), max_size=4))
    desired = [
        want(str(target), draw(keys), draw(sources), "fuse.x") for target in sorted(desired_targets)
    ]
    stale = draw(st.sets(scoped | outside, max_size=3))
    stale |= draw(st.sets(st.sampled_from([e.path for e in state.entries]), max_size=2))
    return state, desired, frozenset(stale)


def _visible(entries: Sequence[MountEntry], entry: MountEntry) -> bool:
    """Whether ``entry`` is what a process sees at its mount point: stacked under nothing,
    and mounted on what is visible at its parent directory (not on a mount since covered)."""
    if topmost_at(entries, entry.path) != entry:
        return False
    while True:
        below = [
            e
            for e in entries
            if e.mount_id == entry.parent_id != entry.mount_id and e.path == entry.path
        ]
        if not below:
            break
        entry = below[0]  # stacked over a lower layer at the same place
    if entry.path == P("/"):
        return True
    holder = mount_containing(entries, entry.path.parent)
    return holder is not None and holder.mount_id == entry.parent_id and _visible(entries, holder)


def _check_order(steps: Sequence[Step], observed: Sequence[MountEntry]) -> None:
    kinds = [type(step) for step in steps]
    rank = {LazyUnmount: 0, Repair: 1, Mount: 2}
    assert [rank[k] for k in kinds] == sorted(rank[k] for k in kinds)
    unmounts = [s.target for s in steps if isinstance(s, LazyUnmount)]
    depths = [len(t.parts) for t in unmounts]
    assert depths == sorted(depths, reverse=True)
    mounts = [len(s.target.parts) for s in steps if isinstance(s, Mount)]
    assert mounts == sorted(mounts)
    # Whatever is reachable below an unmounted path has been unmounted before it.
    reachable = {e.path for e in _in_scope(observed) if e in visible_stack_at(observed, e.path)}
    for index, target in enumerate(unmounts):
        below = {path for path in reachable if target in path.parents}
        assert below <= set(unmounts[:index])


@given(scenario=scenarios())
@settings(max_examples=100, deadline=None)
def test_plan_then_replan_is_empty(
    scenario: tuple[SimulatedMounts, list[DesiredMount], frozenset[PurePosixPath]],
) -> None:
    state, desired, stale = scenario
    steps = plan(state, desired, stale=stale)
    for step in steps:
        assert SCOPE in step.target.parents, step
    _check_order(steps, state.entries)

    after = state.apply(steps)
    # One round is enough, unless the table had mounts hidden under a later mount above
    # them: those can only be dealt with once uncovered.
    hidden = [
        e for e in _in_scope(state.entries) if e not in visible_stack_at(state.entries, e.path)
    ]
    for _ in range(len(hidden)):
        again = plan(after, desired)
        if not again:
            break
        after = after.apply(again)
    assert plan(after, desired) == ()
    # Every desire is met by the visible mount, and nothing outside the scope changed.
    for mount in desired:
        visible = topmost_at(after.entries, mount.target)
        assert visible is not None
        assert resolve_mount(after.entries, mount.target) == visible
        if not hidden:
            assert _visible(after.entries, visible), mount.target
        if mount.target in after.known:
            assert after.known[mount.target] == mount.key
        else:  # adopted after the caller forgot it
            assert (visible.source, visible.fs_type) == (mount.source, mount.fs_type)
    untouched = [e for e in state.entries if e not in _in_scope(state.entries)]
    assert [e for e in after.entries if e in untouched] == untouched
    # Tearing down (again while something is uncovered) leaves only what is outside.
    for _ in range(len(hidden) + 1):
        after = after.apply(plan_teardown(after.entries, SCOPE, include_scope=False))
    assert plan_teardown(after.entries, SCOPE, include_scope=False) == ()
    assert list(after.entries) == untouched


def _in_scope(entries: Sequence[MountEntry]) -> list[MountEntry]:
    return [e for e in entries if SCOPE in e.path.parents]


layout = XvolsLayout("/var/lib/dynamic")
slot = layout.slot(
    "s3-sample", "1f8c3ad2-5b1e-4c4e-9d0a-2f1b7c6e9a10", "0a2b4c6d-8e0f-4123-8456-789abcdef012"
)
mountpoints = st.lists(
    st.sampled_from(["/", "//", ".", "..", "data", "é", " ", "x"]), max_size=6
).map("".join)


@given(
    texts=st.lists(mountpoints, max_size=6), stale_texts=st.lists(st.text(max_size=10), max_size=3)
)
@settings(max_examples=100, deadline=None)
def test_no_planned_path_escapes_the_slot(texts: list[str], stale_texts: list[str]) -> None:
    desired = []
    for text in texts:
        try:
            desired.append(want(str(slot.target(text))))
        except InvalidPath:
            continue
    # Some hostile entries: mount points next to, above and "inside via .." the slot.
    hostile = parse_mountinfo(
        f"50 1 0:60 / {slot.path}/../other rw - tmpfs t rw\n"
        f"51 1 0:61 / {slot.path}x rw - tmpfs t rw\n"
        f"52 1 0:62 / {slot.path.parent} rw - tmpfs t rw\n"
        f"53 52 0:63 / {slot.path} rw - tmpfs t rw\n"
    )
    state = SimulatedMounts(entries=(*BASE, *hostile))
    stale = {slot.path / text.lstrip("/") for text in stale_texts} | {
        P(t or "/") for t in stale_texts
    }
    unique = {m.target: m for m in desired}.values()
    steps = plan(state, unique, stale=stale, scope=slot.path)
    for step in steps:
        assert slot.path in step.target.parents
        assert ".." not in step.target.parts
    teardown = plan_teardown(state.entries, slot.path)
    assert teardown == (LazyUnmount(slot.path, "Teardown"),)
