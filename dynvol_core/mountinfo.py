"""Parse and format ``/proc/<pid>/mountinfo`` (see proc(5)), and query the mount table.

A line reads::

    36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    (1)(2)(3)   (4)   (5)      (6)      (7)   (8) (9)    (10)         (11)

mount ID, parent ID, major:minor, root, mount point, per-mount options, zero or more
optional fields (``shared:N``, ``master:N``, ``propagate_from:N``, ``unbindable``), a ``-``
separator, filesystem type, mount source and super-block options. The kernel escapes space,
tab, newline and backslash in the string fields as octal (``\\040``, ``\\011``, ``\\012``,
``\\134``); :func:`parse_mountinfo` unescapes them and :func:`format_mountinfo` escapes them
again. Neighbours: the shells read the file; ``mountplans`` and ``propagation`` reason over
the entries parsed here.
"""

from __future__ import annotations

import re
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Final, Literal

import attrs

from dynvol_core.errors import DynvolError
from dynvol_core.paths import path_is_within

__all__ = [
    "Landing",
    "MalformedMountinfo",
    "MountEntry",
    "Propagation",
    "children_by_parent",
    "descendants_of",
    "entries_at",
    "entries_under",
    "escape_field",
    "format_mountinfo",
    "landing_of",
    "mount_containing",
    "new_mounts",
    "parse_mountinfo",
    "propagation_of",
    "resolve_mount",
    "topmost_at",
    "unescape_field",
    "unmount_order",
    "visible_stack_at",
]

Propagation = Literal["shared", "slave", "private", "unbindable", "shared+slave"]

_SEPARATOR: Final = "-"
# The kernel escapes these in every string field; ',' too inside option lists, where it is
# the separator (seq_show_option does so for super-block options).
_ESCAPED: Final = frozenset(" \t\n\\")
_ESCAPED_IN_OPTIONS: Final = _ESCAPED | {","}
_OCTAL_ESCAPE = re.compile(r"\\([0-3][0-7]{2})")
_NUMBER = re.compile(r"[0-9]+")
_NON_NEGATIVE: Final = attrs.validators.and_(
    attrs.validators.instance_of(int), attrs.validators.ge(0)
)


class MalformedMountinfo(DynvolError, ValueError):
    """A mountinfo line does not have the format proc(5) describes."""

    def __init__(self, line_number: int, line: str, problem: str) -> None:
        self.line_number = line_number
        self.line = line
        self.problem = problem
        super().__init__(f"mountinfo line {line_number}: {problem}: {line!r}")


def unescape_field(text: str) -> str:
    """Undo the kernel's octal escapes (``\\040`` -> space) in one mountinfo field."""
    if "\\" not in text:
        return text
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), text)


def _escape(text: str, special: frozenset[str]) -> str:
    if not any(char in special for char in text):
        return text
    return "".join(f"\\{ord(char):03o}" if char in special else char for char in text)


def escape_field(text: str) -> str:
    """Escape space, tab, newline and backslash as the kernel does (space -> ``\\040``)."""
    return _escape(text, _ESCAPED)


def _check_options(
    _instance: object, attribute: attrs.Attribute[tuple[str, ...]], value: object
) -> None:
    if not isinstance(value, tuple) or not all(isinstance(o, str) and o for o in value):
        raise ValueError(f"{attribute.name} must be a tuple of non-empty strings")


def _check_optional_fields(
    _instance: object, attribute: attrs.Attribute[tuple[str, ...]], value: object
) -> None:
    # '-' would be read back as the separator, and an empty field is not representable.
    if not isinstance(value, tuple) or not all(
        isinstance(o, str) and o and o != _SEPARATOR for o in value
    ):
        raise ValueError(f"{attribute.name} must be a tuple of non-empty strings other than '-'")


def _tag_value(fields: Sequence[str], tag: str) -> int | None:
    prefix = f"{tag}:"
    for field in fields:
        if field.startswith(prefix) and _NUMBER.fullmatch(field[len(prefix) :]):
            return int(field[len(prefix) :])
    return None


@attrs.frozen(kw_only=True)
class MountEntry:
    """One line of mountinfo, with its string fields unescaped."""

    mount_id: int = attrs.field(validator=_NON_NEGATIVE)
    parent_id: int = attrs.field(validator=_NON_NEGATIVE)
    major: int = attrs.field(validator=_NON_NEGATIVE)
    minor: int = attrs.field(validator=_NON_NEGATIVE)
    #: The directory of the filesystem that is the root of this mount.
    root: str
    #: Where it is mounted, relative to the reading process's root.
    mount_point: str
    options: tuple[str, ...] = attrs.field(validator=_check_options)
    optional_fields: tuple[str, ...] = attrs.field(default=(), validator=_check_optional_fields)
    fs_type: str
    source: str
    super_options: tuple[str, ...] = attrs.field(validator=_check_options)

    @property
    def path(self) -> PurePosixPath:
        """The mount point as a path."""
        return PurePosixPath(self.mount_point)

    @property
    def shared_peer_group(self) -> int | None:
        """The peer group ID if the mount is shared (``shared:N``), else None."""
        return _tag_value(self.optional_fields, "shared")

    @property
    def master(self) -> int | None:
        """The peer group this mount is a slave of (``master:N``), else None."""
        return _tag_value(self.optional_fields, "master")

    @property
    def propagate_from(self) -> int | None:
        """The nearest dominant peer group visible to this process (``propagate_from:N``)."""
        return _tag_value(self.optional_fields, "propagate_from")

    @property
    def unbindable(self) -> bool:
        """Whether the mount is unbindable."""
        return "unbindable" in self.optional_fields

    @property
    def is_shared(self) -> bool:
        """Whether mounts and unmounts below it propagate to its peers."""
        return self.shared_peer_group is not None

    @property
    def read_only(self) -> bool:
        """Whether the per-mount options make it read-only."""
        return "ro" in self.options

    def format(self) -> str:
        """This entry as a mountinfo line (without the newline)."""
        fields = [
            str(self.mount_id),
            str(self.parent_id),
            f"{self.major}:{self.minor}",
            escape_field(self.root),
            escape_field(self.mount_point),
            _format_options(self.options),
            *(escape_field(field) for field in self.optional_fields),
            _SEPARATOR,
            escape_field(self.fs_type),
            escape_field(self.source),
            _format_options(self.super_options),
        ]
        return " ".join(fields)


def _format_options(options: Sequence[str]) -> str:
    return ",".join(_escape(option, _ESCAPED_IN_OPTIONS) for option in options)


def _parse_options(text: str) -> tuple[str, ...]:
    if not text:
        return ()
    return tuple(unescape_field(option) for option in text.split(","))


def _parse_line(line_number: int, line: str) -> MountEntry:
    # Split on single spaces, not on runs of whitespace: every space inside a field is
    # escaped, and an empty field (two spaces in a row) must stay a field.
    fields = line.split(" ")
    try:
        separator = fields.index(_SEPARATOR, 6)
    except ValueError:
        raise MalformedMountinfo(line_number, line, "no '-' separator after field 6") from None
    if len(fields) != separator + 4:
        raise MalformedMountinfo(
            line_number, line, "expected filesystem type, source and super options after '-'"
        )
    mount_id, parent_id, device = fields[0:3]
    major, colon, minor = device.partition(":")
    if not colon:
        raise MalformedMountinfo(line_number, line, "device is not major:minor")
    if not all(_NUMBER.fullmatch(number) for number in (mount_id, parent_id, major, minor)):
        raise MalformedMountinfo(line_number, line, "mount ID, parent ID or device is not numeric")
    optional_fields = tuple(unescape_field(field) for field in fields[6:separator])
    if "" in optional_fields:
        raise MalformedMountinfo(line_number, line, "empty optional field")
    options = _parse_options(fields[5])
    super_options = _parse_options(fields[separator + 3])
    if "" in options or "" in super_options:
        raise MalformedMountinfo(line_number, line, "empty mount option")
    return MountEntry(
        mount_id=int(mount_id),
        parent_id=int(parent_id),
        major=int(major),
        minor=int(minor),
        root=unescape_field(fields[3]),
        mount_point=unescape_field(fields[4]),
        options=options,
        optional_fields=optional_fields,
        fs_type=unescape_field(fields[separator + 1]),
        source=unescape_field(fields[separator + 2]),
        super_options=super_options,
    )


def parse_mountinfo(text: str) -> tuple[MountEntry, ...]:
    """Parse the whole text of a mountinfo file, in order.

    Lines are separated by ``\\n`` only (other line-break characters can be part of a path,
    the kernel does not escape them); blank lines are skipped.

    :raises MalformedMountinfo: naming the first line that does not parse.
    """
    return tuple(
        _parse_line(number, line)
        for number, line in enumerate(text.split("\n"), start=1)
        if line.strip(" ")
    )


def format_mountinfo(entries: Iterable[MountEntry]) -> str:
    """Format entries as mountinfo text, one line each, each ending in a newline."""
    return "".join(f"{entry.format()}\n" for entry in entries)


def propagation_of(entry: MountEntry) -> Propagation:
    """The propagation type of a mount, as findmnt(8) would name it."""
    if entry.unbindable:
        return "unbindable"
    shared = entry.shared_peer_group is not None
    slave = entry.master is not None
    if shared and slave:
        return "shared+slave"
    if shared:
        return "shared"
    if slave:
        return "slave"
    return "private"


def _as_path(path: str | PurePosixPath) -> PurePosixPath:
    return path if isinstance(path, PurePosixPath) else PurePosixPath(path)


def entries_at(
    entries: Iterable[MountEntry], mount_point: str | PurePosixPath
) -> tuple[MountEntry, ...]:
    """Every entry mounted exactly at ``mount_point``, bottom first when stacked."""
    target = _as_path(mount_point)
    return tuple(entry for entry in entries if entry.path == target)


def topmost_at(
    entries: Iterable[MountEntry], mount_point: str | PurePosixPath
) -> MountEntry | None:
    """The visible mount at ``mount_point`` (the last one when several are stacked), or None.

    An entry that another entry at the same place is mounted on is below it, whatever the
    order of the lines; among the rest the last line wins, as in the kernel's listing.
    """
    stacked = entries_at(entries, mount_point)
    if not stacked:
        return None
    covered = {entry.parent_id for entry in stacked}
    uncovered = [entry for entry in stacked if entry.mount_id not in covered]
    return uncovered[-1] if uncovered else stacked[-1]


def _normal(path: str) -> str:
    """``path`` as PurePosixPath spells it. The kernel's mount points already are; building a
    PurePosixPath for each of a node's hundreds of mounts is what made scans slow."""
    if "//" in path or "/." in path or (path.endswith("/") and path != "/"):
        return str(PurePosixPath(path))
    return path


def entries_under(
    entries: Iterable[MountEntry], path: str | PurePosixPath, *, include_self: bool = False
) -> tuple[MountEntry, ...]:
    """Entries whose mount point lies below ``path`` (component-wise: ``/a/bc`` is not below
    ``/a/b``), in their original order; with ``include_self``, also those at ``path``."""
    base = str(_as_path(path))
    prefix = base.rstrip("/") + "/"
    found = []
    for entry in entries:
        point = _normal(entry.mount_point)
        if point == base:
            if include_self:
                found.append(entry)
        elif point.startswith(prefix):
            found.append(entry)
    return tuple(found)


def unmount_order(
    entries: Iterable[MountEntry], scope: str | PurePosixPath, *, include_self: bool
) -> list[str]:
    """Mount points at (optionally) or below ``scope``, in the order to unmount them.

    Deepest first; mounts stacked on one mount point come topmost first (higher mount IDs
    were mounted later), so each unmount exposes the next.
    """
    found = sorted(
        entries_under(entries, scope, include_self=include_self),
        key=lambda e: (e.mount_point.count("/"), e.mount_id),
        reverse=True,
    )
    return [entry.mount_point for entry in found]


def mount_containing(entries: Sequence[MountEntry], path: str | PurePosixPath) -> MountEntry | None:
    """The visible mount that ``path`` lies on: the topmost entry at the deepest mount point
    that is ``path`` or one of its ancestors. None if no entry covers it."""
    target = _as_path(path)
    for candidate in (target, *target.parents):
        entry = topmost_at(entries, candidate)
        if entry is not None:
            return entry
    return None


def children_by_parent(entries: Iterable[MountEntry]) -> Mapping[int, tuple[MountEntry, ...]]:
    """The mount tree: parent mount ID -> the entries mounted on it, in order."""
    children: defaultdict[int, list[MountEntry]] = defaultdict(list)
    for entry in entries:
        if entry.parent_id != entry.mount_id:
            children[entry.parent_id].append(entry)
    return {parent: tuple(kids) for parent, kids in children.items()}


def descendants_of(entries: Iterable[MountEntry], mount_id: int) -> tuple[MountEntry, ...]:
    """Every entry below mount ``mount_id`` in the mount tree, parents before children."""
    tree = children_by_parent(entries)
    found: list[MountEntry] = []
    seen = {mount_id}
    pending = deque(tree.get(mount_id, ()))
    while pending:
        entry = pending.popleft()
        if entry.mount_id in seen:  # a corrupt table must not loop forever
            continue
        seen.add(entry.mount_id)
        found.append(entry)
        pending.extend(tree.get(entry.mount_id, ()))
    return tuple(found)


def resolve_mount(entries: Sequence[MountEntry], path: str | PurePosixPath) -> MountEntry | None:
    """The mount a lookup of ``path`` lands on, walking the mount tree like the kernel.

    Unlike :func:`mount_containing`, this does not trust mount points alone: a mount made
    at ``/a/b`` before another mount at ``/a`` covered it is hidden, and a lookup of
    ``/a/b/x`` lands on the mount at ``/a``. The walk starts at the deepest tree root
    (an entry whose parent is not in the table) that holds ``path``.
    """
    target = _as_path(path)
    ids = {entry.mount_id for entry in entries}
    current: MountEntry | None = None
    for entry in entries:
        is_root = entry.parent_id == entry.mount_id or entry.parent_id not in ids
        if (
            is_root
            and path_is_within(target, entry.path)
            and (current is None or len(entry.path.parts) >= len(current.path.parts))
        ):
            current = entry
    if current is None:
        return None
    tree = children_by_parent(entries)
    depth = len(current.path.parts)
    prefixes = [
        current.path,
        *(PurePosixPath(*target.parts[:n]) for n in range(depth + 1, len(target.parts) + 1)),
    ]
    seen = {current.mount_id}
    for prefix in prefixes:
        while True:
            over = [c for c in tree.get(current.mount_id, ()) if c.path == prefix]
            if not over or over[-1].mount_id in seen:
                break
            current = over[-1]
            seen.add(current.mount_id)
    return current


def visible_stack_at(
    entries: Sequence[MountEntry], mount_point: str | PurePosixPath
) -> tuple[MountEntry, ...]:
    """The mounts stacked at ``mount_point`` that a lookup reaches, bottom first: the top
    one is visible, and each lazy unmount there uncovers the next. Empty if the lookup of
    ``mount_point`` does not land on a mount made exactly there."""
    target = _as_path(mount_point)
    top = resolve_mount(entries, target)
    by_id = {entry.mount_id: entry for entry in entries}
    stack: list[MountEntry] = []
    seen: set[int] = set()
    while top is not None and top.path == target and top.mount_id not in seen:
        stack.append(top)
        seen.add(top.mount_id)
        top = by_id.get(top.parent_id)
    return tuple(reversed(stack))


def _identity(entry: MountEntry) -> tuple[int, int, int, str]:
    # Mount IDs are reused after an unmount; with the device and the place, a reused ID
    # that now names another mount is still told apart.
    return (entry.mount_id, entry.major, entry.minor, entry.mount_point)


def new_mounts(before: Iterable[MountEntry], after: Iterable[MountEntry]) -> tuple[MountEntry, ...]:
    """The entries of ``after`` that ``before`` did not have, in ``after``'s order."""
    seen = {_identity(entry) for entry in before}
    return tuple(entry for entry in after if _identity(entry) not in seen)


@attrs.frozen(kw_only=True)
class Landing:
    """Where a mount attempt's new mounts of its filesystem type ended up.

    ``at_target``: the new mount exactly at the planned place (None if there is none).
    ``stray``: new mounts of that type anywhere else, except at places other attempts
    under way are mounting (those are theirs); each one must be undone.
    """

    target: PurePosixPath
    at_target: MountEntry | None
    stray: tuple[MountEntry, ...]

    @property
    def ok(self) -> bool:
        """Whether the mount is where it was planned and nowhere else."""
        return self.at_target is not None and not self.stray

    def describe(self) -> str:
        """Why the landing is not ok, for a status message (empty when it is)."""
        if self.ok:
            return ""
        parts = []
        if self.at_target is None:
            parts.append(f"no new mount appeared at {self.target}")
        if self.stray:
            places = ", ".join(sorted({entry.mount_point for entry in self.stray}))
            parts.append(f"a new mount appeared at {places} instead")
        return "; ".join(parts)


def landing_of(
    before: Iterable[MountEntry],
    after: Iterable[MountEntry],
    *,
    target: str | PurePosixPath,
    fs_type: str,
    others: Iterable[str | PurePosixPath] = (),
    shared_root: str | PurePosixPath | None = None,
    own: str | PurePosixPath | None = None,
) -> Landing:
    """Check, from the mount tables before and after a mount attempt, where it landed.

    :param fs_type: the type the attempt mounts (``fuse.s3fs``); an empty string counts
        every new mount as the attempt's.
    :param others: the targets of other attempts made at the same time.
    :param shared_root: a tree others mount in too (a shared mount pod's class directory,
        where independent mount pods of the same class mount into their own slots): new
        mounts below it count only if they are below ``own`` (the attempt's slot).
    """
    planned = _as_path(target)
    theirs = {_as_path(path) for path in others} - {planned}
    fresh = [e for e in new_mounts(before, after) if not fs_type or e.fs_type == fs_type]
    at_target = [e for e in fresh if e.path == planned]

    def counts(entry: MountEntry) -> bool:
        if entry.path == planned or entry.path in theirs:
            return False
        if shared_root is None or not path_is_within(entry.path, _as_path(shared_root)):
            return True
        return own is not None and path_is_within(entry.path, _as_path(own))

    stray = tuple(e for e in fresh if counts(e))
    return Landing(target=planned, at_target=at_target[-1] if at_target else None, stray=stray)
