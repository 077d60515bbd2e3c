"""Mount plans: desired mounts and the observed mount table in, ordered steps out.

The DMP agent (and the node plugin, to clean up after dead DMPs) read mountinfo, ask
:func:`plan_mounts` or :func:`plan_teardown` what to do, and execute the steps in order
(``Mount`` through a provider, ``LazyUnmount`` as ``umount -l``, ``Repair`` as a lazy
unmount of a stale mount followed by a mount). Planning again after the steps succeeded
yields no steps; :class:`SimulatedMounts` applies steps to a mount table in memory so the
tests can check that.

Rules of :func:`plan_mounts`, for the mounts strictly below ``scope``:

- a desired target with no mount gets ``Mount``;
- a desired target whose mount has another key than desired (``known``), or, when the key
  is not known, another filesystem type or source, is unmounted and mounted again;
- a mounted desired target that answered ``ENOTCONN`` (``stale``) gets ``Repair``;
- a mount that is not desired is unmounted, unless it lies on the way to a desired target
  (its unmount would detach that target too) and is not stale;
- a mount the caller ``retire``s (its own mount, whose desire moved to another target) is
  unmounted as ``Retired`` even on the way to a desired target (the new target may lie
  below the old one, and must not be made inside the old mount's file system);
- only mounts a path lookup reaches count: one hidden under a later mount above it cannot
  be unmounted or used by path, and is planned for once uncovered;
- everything mounted below a path that is unmounted, repaired or freshly mounted (which
  would hide it) is unmounted first, deepest first, and mounted again if desired;
- ``scope`` itself and everything outside it is never touched.

Steps come ordered: unmounts deepest-first, then repairs, then mounts shallowest-first,
then (make before break) the unmounts of the retired mounts that nothing else planned nests
with: a retired mount with no mount below it, at no path that is mounted or unmounted in
this plan, and above or below none of them. While such a mount is unmounted last, a pod
sees the old and the new target both for a moment, rather than neither. Every other
unmount comes first: a target inside (or above) a retired mount must not be made inside
that mount's file system, nor hide it where a path lookup cannot reach it any more.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Literal, TypeAlias

import attrs

from dynvol_core.errors import InvalidPath
from dynvol_core.mountinfo import (
    MountEntry,
    descendants_of,
    resolve_mount,
    visible_stack_at,
)

__all__ = [
    "DesiredMount",
    "LazyUnmount",
    "Mount",
    "Repair",
    "SimulatedMounts",
    "Step",
    "UnmountReason",
    "apply_to_model",
    "plan_mounts",
    "plan_teardown",
]

#: Why a mount is unmounted; CamelCase so it can be used as an Event or condition reason.
UnmountReason = Literal[
    "NotDesired",  # nothing wants a mount there
    "ConfigChanged",  # the desired mount's key differs from what was mounted
    "ForeignMount",  # unknown key, and the filesystem type or source differ from the desire
    "Stale",  # the mount answered ENOTCONN and is not repaired in place
    "ParentRemoved",  # a mount above it is unmounted or repaired
    "Shadowed",  # a fresh mount above it would hide it
    "Teardown",  # plan_teardown
    "Retired",  # the caller's own mount whose desire moved to another target (retire)
]


def _as_path(value: str | PurePosixPath) -> PurePosixPath:
    return value if isinstance(value, PurePosixPath) else PurePosixPath(value)


def _is_normalised_absolute(path: PurePosixPath) -> bool:
    text = str(path)
    return (
        path.is_absolute()
        and not text.startswith("//")
        and ".." not in path.parts
        and "\0" not in text
    )


def _check_target(
    _instance: object, attribute: attrs.Attribute[PurePosixPath], value: PurePosixPath
) -> None:
    if not _is_normalised_absolute(value) or value == PurePosixPath("/"):
        raise InvalidPath(
            f"{attribute.name} {str(value)!r} must be a normalised absolute path below '/', "
            "without '..'"
        )


@attrs.frozen(kw_only=True)
class DesiredMount:
    """A mount that should exist at ``target``.

    ``key`` is an opaque identity (for example the DynamicVolumeMount UID and a hash of its
    resolved configuration): a mount made for another key is replaced.
    """

    target: PurePosixPath = attrs.field(converter=_as_path, validator=_check_target)
    source: str
    fs_type: str
    key: str


@attrs.frozen
class Mount:
    """Mount ``desired`` at ``target`` (create the directory first if needed)."""

    target: PurePosixPath
    desired: DesiredMount


@attrs.frozen
class LazyUnmount:
    """Detach the topmost mount at ``target`` (``umount -l``; "not mounted" is success)."""

    target: PurePosixPath
    reason: UnmountReason


@attrs.frozen
class Repair:
    """Lazily unmount the stale mount at ``target``, then mount ``desired`` there again."""

    target: PurePosixPath
    desired: DesiredMount


Step: TypeAlias = Mount | LazyUnmount | Repair


def _depth(path: PurePosixPath) -> int:
    return len(path.parts)


def _deepest_first(path: PurePosixPath) -> tuple[int, str]:
    return (-_depth(path), str(path))


def _shallowest_first(path: PurePosixPath) -> tuple[int, str]:
    return (_depth(path), str(path))


def _strictly_below(path: PurePosixPath, base: PurePosixPath) -> bool:
    return base in path.parents


def _layers_below(
    observed: Sequence[MountEntry], scope: PurePosixPath, *, include_scope: bool = False
) -> dict[PurePosixPath, tuple[MountEntry, ...]]:
    # Mount points as the kernel prints them are normalised absolute paths; anything else
    # (a "..", a relative path) is skipped rather than trusted to be inside scope. Only the
    # stacks a path lookup reaches count: a mount hidden under a later mount above it cannot
    # be unmounted (or used) by path until that mount is gone.
    layers: dict[PurePosixPath, tuple[MountEntry, ...]] = {}
    for entry in observed:
        path = entry.path
        if path in layers or not _is_normalised_absolute(path):
            continue
        if _strictly_below(path, scope) or (include_scope and path == scope):
            stack = visible_stack_at(observed, path)
            if stack:
                layers[path] = stack
    return layers


def _check_scope(scope: PurePosixPath) -> PurePosixPath:
    if not _is_normalised_absolute(scope):
        raise InvalidPath(f"scope {str(scope)!r} must be a normalised absolute path")
    return scope


def plan_mounts(
    *,
    desired: Iterable[DesiredMount],
    observed: Sequence[MountEntry],
    scope: str | PurePosixPath,
    stale: Iterable[str | PurePosixPath] = frozenset(),
    known: Mapping[PurePosixPath, str] | None = None,
    retire: Iterable[str | PurePosixPath] = frozenset(),
) -> tuple[Step, ...]:
    """Plan the steps that turn the mounts below ``scope`` into ``desired``.

    :param desired: the mounts that should exist; every target must lie strictly below
        ``scope``.
    :param observed: the mount table (parsed mountinfo) of the namespace the steps run in.
    :param scope: the directory this planner owns (a slot, or the DMP's ``/xvols``); it is
        never unmounted itself and nothing outside it is ever touched.
    :param stale: targets that answered ``ENOTCONN`` (their FUSE daemon died).
    :param known: target -> key of the mounts the caller made itself.
    :param retire: targets of mounts the caller made whose desire moved elsewhere (a
        changed mountpoint); ignored where a mount is still desired or outside ``scope``.
    :returns: the steps, in the order they must run; empty when nothing is to be done.
    :raises InvalidPath: if a desired target is not strictly below ``scope``, or two
        different mounts are desired at the same target.
    """
    scope = _check_scope(_as_path(scope))
    known = known or {}
    wanted: dict[PurePosixPath, DesiredMount] = {}
    for mount in desired:
        if not _strictly_below(mount.target, scope):
            raise InvalidPath(f"desired mount target {mount.target} is not inside {scope}")
        previous = wanted.setdefault(mount.target, mount)
        if previous != mount:
            raise InvalidPath(f"two different mounts are desired at {mount.target}")
    stale_paths = {
        path
        for path in map(_as_path, stale)
        if _is_normalised_absolute(path) and _strictly_below(path, scope)
    }
    retired = {
        path
        for path in map(_as_path, retire)
        if _is_normalised_absolute(path) and _strictly_below(path, scope) and path not in wanted
    }
    layers = _layers_below(observed, scope)
    # Every ancestor of a desired target: an undesired mount there is kept, because
    # unmounting it would detach the desired mount below it.
    on_the_way = {parent for target in wanted for parent in target.parents}

    unmount: dict[PurePosixPath, UnmountReason] = {}
    for path, stack in layers.items():
        want = wanted.get(path)
        if want is None:
            if path in stale_paths:
                unmount[path] = "Stale"
            elif path in retired:
                unmount[path] = "Retired"
            elif path not in on_the_way:
                unmount[path] = "NotDesired"
        elif path in stale_paths:
            # Repair handles one stale mount; a stack of them is cleared and mounted afresh.
            if len(stack) > 1:
                unmount[path] = "Stale"
        else:
            reason = _mismatch(want, stack[-1], known.get(path))
            if reason is not None:
                unmount[path] = reason

    fresh = {target for target in wanted if target not in layers or target in unmount}
    fresh |= {target for target in wanted if target in stale_paths}
    # Whatever lies below a replaced or freshly mounted path goes too (detached with its
    # parent, or hidden under the new mount), and is mounted again if desired. Repeat until
    # nothing changes, since a desired mount added here replaces its own subtree in turn.
    changed = True
    while changed:
        changed = False
        for path in sorted(layers, key=_shallowest_first):
            if path in unmount:
                continue
            replaced = [parent for parent in path.parents if parent in fresh or parent in unmount]
            if not replaced:
                continue
            unmount[path] = "ParentRemoved" if any(p in layers for p in replaced) else "Shadowed"
            if path in wanted:
                fresh.add(path)
            changed = True

    late = _retired_last(unmount, layers, fresh)
    steps: list[Step] = []
    for path in sorted(unmount.keys() - late, key=_deepest_first):
        steps.extend(LazyUnmount(path, unmount[path]) for _ in layers[path])
    # A stale target that is still mounted, with nothing replaced above it, is repaired in
    # place; anything else (not mounted, or taken down with its parent) is simply mounted.
    repairs = sorted(
        (t for t in fresh if t in stale_paths and t in layers and t not in unmount),
        key=_shallowest_first,
    )
    steps.extend(Repair(target, wanted[target]) for target in repairs)
    mounts = sorted(fresh.difference(repairs), key=_shallowest_first)
    steps.extend(Mount(target, wanted[target]) for target in mounts)
    steps.extend(LazyUnmount(path, "Retired") for path in sorted(late, key=_deepest_first))
    return tuple(steps)


def _nested(a: PurePosixPath, b: PurePosixPath) -> bool:
    return a == b or a in b.parents or b in a.parents


def _retired_last(
    unmount: Mapping[PurePosixPath, UnmountReason],
    layers: Mapping[PurePosixPath, tuple[MountEntry, ...]],
    fresh: Iterable[PurePosixPath],
) -> set[PurePosixPath]:
    """The retired mounts that may be unmounted after the mounts (see the module rules)."""
    busy = set(fresh) | {path for path, reason in unmount.items() if reason != "Retired"}
    late = set()
    for path, reason in unmount.items():
        if reason != "Retired" or len(layers[path]) != 1:
            continue
        if any(_strictly_below(other, path) for other in layers):
            continue
        if not any(_nested(path, other) for other in busy):
            late.add(path)
    return late


def _mismatch(
    want: DesiredMount, mounted: MountEntry, known_key: str | None
) -> UnmountReason | None:
    if known_key is not None:
        return None if known_key == want.key else "ConfigChanged"
    # Not mounted by the caller as far as it remembers (e.g. it restarted): adopt the mount
    # only if it is what would have been mounted.
    if mounted.fs_type == want.fs_type and mounted.source == want.source:
        return None
    return "ForeignMount"


def plan_teardown(
    observed: Sequence[MountEntry],
    scope: str | PurePosixPath,
    *,
    include_scope: bool = True,
) -> tuple[LazyUnmount, ...]:
    """Plan unmounting everything below ``scope``, deepest first, every stacked layer.

    :param include_scope: also unmount what is mounted at ``scope`` itself (the default:
        tearing down kubelet's target path removes the bind there too).
    """
    scope = _check_scope(_as_path(scope))
    layers = _layers_below(observed, scope, include_scope=include_scope)
    return tuple(
        LazyUnmount(path, "Teardown")
        for path in sorted(layers, key=_deepest_first)
        for _ in layers[path]
    )


@attrs.frozen(kw_only=True)
class SimulatedMounts:
    """A mount table and the caller's memory of what it mounted, changed by steps in memory.

    It follows the kernel where plans depend on it: paths are looked up through the mount
    tree (:func:`~dynvol_core.mountinfo.resolve_mount`), a lazy unmount detaches the mount a
    lookup of its target reaches together with every mount below it in the tree (and does
    nothing if that is not a mount made at the target), and a new mount goes on top of what
    the lookup of its target reaches.
    """

    entries: tuple[MountEntry, ...]
    known: Mapping[PurePosixPath, str] = attrs.field(factory=dict)

    def apply(self, steps: Iterable[Step]) -> SimulatedMounts:
        """The state after running ``steps`` in order, each succeeding."""
        entries = list(self.entries)
        known = dict(self.known)
        for step in steps:
            if isinstance(step, LazyUnmount | Repair):
                _unmount(entries, step.target)
            if isinstance(step, Mount | Repair):
                _mount(entries, step.desired)
                known[step.target] = step.desired.key
        remaining = {entry.path for entry in entries}
        known = {path: key for path, key in known.items() if path in remaining}
        return SimulatedMounts(entries=tuple(entries), known=known)


def _unmount(entries: list[MountEntry], target: PurePosixPath) -> None:
    stack = visible_stack_at(entries, target)
    if not stack:
        return  # "not mounted" (or hidden): a lazy unmount by path cannot reach it
    top = stack[-1]
    gone = {top.mount_id} | {entry.mount_id for entry in descendants_of(entries, top.mount_id)}
    entries[:] = [entry for entry in entries if entry.mount_id not in gone]


def _mount(entries: list[MountEntry], desired: DesiredMount) -> None:
    parent = resolve_mount(entries, desired.target)
    mount_id = max((entry.mount_id for entry in entries), default=0) + 1
    entries.append(
        MountEntry(
            mount_id=mount_id,
            parent_id=parent.mount_id if parent is not None else mount_id,
            major=0,
            minor=mount_id,
            root="/",
            mount_point=str(desired.target),
            options=("rw",),
            optional_fields=(),
            fs_type=desired.fs_type,
            source=desired.source,
            super_options=("rw",),
        )
    )


def apply_to_model(
    observed: Sequence[MountEntry],
    steps: Iterable[Step],
    *,
    known: Mapping[PurePosixPath, str] | None = None,
) -> SimulatedMounts:
    """Apply ``steps`` to ``observed`` in memory; see :class:`SimulatedMounts`."""
    return SimulatedMounts(entries=tuple(observed), known=dict(known or {})).apply(steps)
