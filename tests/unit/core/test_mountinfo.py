"""mountinfo parsing and formatting (proc(5)), and queries over the mount table."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynvol_core.mountinfo import (
    MalformedMountinfo,
    MountEntry,
    children_by_parent,
    descendants_of,
    entries_at,
    entries_under,
    escape_field,
    format_mountinfo,
    mount_containing,
    parse_mountinfo,
    propagation_of,
    topmost_at,
    unescape_field,
    unmount_order,
)

DATA = Path(__file__).parent / "data"

# The example line of proc(5).
PROC5_EXAMPLE = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue"

# A node-like table: rshared xvols tree, a slot bound onto kubelet's target path, FUSE mounts
# with awkward names, a stacked mount, and prefix traps (/xvols-old, "data x").
SAMPLE = "".join(
    [
        "1 0 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n",
        "20 1 254:0 /var/lib/dynamic/xvols /var/lib/dynamic/xvols rw,relatime "
        "shared:7 - ext4 /dev/vda rw\n",
        "21 1 254:0 /var/lib/dynamic/xvols/s3/u/p "
        "/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/v/mount ro,relatime "
        "shared:7 - ext4 /dev/vda rw\n",
        "22 20 0:50 / /var/lib/dynamic/xvols/s3/u/p/data\\040x rw,nosuid,nodev "
        "shared:9 - fuse.s3fs s3fs rw,user_id=0,group_id=0\n",
        "23 21 0:50 / "
        "/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/v/mount/data\\040x "
        "rw,nosuid,nodev shared:9 - fuse.s3fs s3fs rw,user_id=0,group_id=0\n",
        "24 22 0:51 / /var/lib/dynamic/xvols/s3/u/p/data\\040x rw,nosuid,nodev "
        "shared:10 master:3 - fuse.rclone remote:tab\\011back\\134slash rw\n",
        "25 20 0:52 / /var/lib/dynamic/xvols/s3/u/p/new\\012line rw "
        "propagate_from:4 master:5 - tmpfs none rw,size=1024k\n",
        "26 1 0:53 / /var/lib/dynamic/xvols-old rw unbindable - tmpfs tmpfs rw,opt=a\\054b\n",
    ]
)


def test_proc5_example() -> None:
    (entry,) = parse_mountinfo(PROC5_EXAMPLE)
    assert entry == MountEntry(
        mount_id=36,
        parent_id=35,
        major=98,
        minor=0,
        root="/mnt1",
        mount_point="/mnt2",
        options=("rw", "noatime"),
        optional_fields=("master:1",),
        fs_type="ext3",
        source="/dev/root",
        super_options=("rw", "errors=continue"),
    )
    assert entry.master == 1
    assert entry.shared_peer_group is None
    assert not entry.is_shared
    assert propagation_of(entry) == "slave"
    assert format_mountinfo([entry]) == PROC5_EXAMPLE + "\n"


def test_sample_escapes_and_optional_fields() -> None:
    entries = parse_mountinfo(SAMPLE)
    assert len(entries) == 8
    by_id = {entry.mount_id: entry for entry in entries}
    assert by_id[22].mount_point == "/var/lib/dynamic/xvols/s3/u/p/data x"
    assert by_id[24].source == "remote:tab\tback\\slash"
    assert by_id[25].mount_point == "/var/lib/dynamic/xvols/s3/u/p/new\nline"
    assert by_id[26].super_options == ("rw", "opt=a,b")
    assert by_id[21].read_only
    assert not by_id[22].read_only
    assert by_id[24].shared_peer_group == 10
    assert by_id[24].master == 3
    assert by_id[25].propagate_from == 4
    assert by_id[25].master == 5
    assert by_id[26].unbindable
    assert [propagation_of(by_id[i]) for i in (1, 24, 25, 26)] == [
        "shared",
        "shared+slave",
        "slave",
        "unbindable",
    ]
    assert format_mountinfo(entries) == SAMPLE


@pytest.mark.parametrize("name", ["mountinfo-host.txt", "mountinfo-rshared-ns.txt"])
def test_captured_tables_round_trip(name: str) -> None:
    text = (DATA / name).read_text()
    entries = parse_mountinfo(text)
    assert entries
    assert format_mountinfo(entries) == text
    assert any(entry.mount_point == "/" for entry in entries)


def test_captured_rshared_namespace() -> None:
    # Captured in a private mount namespace: a self-bound rshared dir, a tmpfs on a dir with
    # a space, bound elsewhere, stacked over, plus unbindable and shared+slave mounts.
    entries = parse_mountinfo((DATA / "mountinfo-rshared-ns.txt").read_text())
    base = "/tmp/mi.2kMk"
    xvols = topmost_at(entries, f"{base}/xvols")
    assert xvols is not None
    assert xvols.root == f"{base}/xvols"
    assert xvols.is_shared
    spaced = entries_at(entries, f"{base}/xvols/with space")
    assert [e.source for e in spaced] == ["tmpfs-src", "stacked"]
    top = topmost_at(entries, f"{base}/xvols/with space")
    assert top is not None
    assert top.source == "stacked"
    backslash = topmost_at(entries, f"{base}/back\\slash")
    assert backslash is not None
    assert propagation_of(backslash) == "unbindable"
    slave = topmost_at(entries, f"{base}/slave")
    assert slave is not None
    assert propagation_of(slave) == "shared+slave"


def test_topmost_follows_the_tree_not_the_line_order() -> None:
    entries = parse_mountinfo(SAMPLE)
    point = "/var/lib/dynamic/xvols/s3/u/p/data x"
    assert [e.mount_id for e in entries_at(entries, point)] == [22, 24]
    top = topmost_at(entries, point)
    assert top is not None
    assert top.mount_id == 24
    top = topmost_at(tuple(reversed(entries)), point)
    assert top is not None
    assert top.mount_id == 24
    assert topmost_at(entries, "/nowhere") is None


def test_entries_under_is_component_wise() -> None:
    entries = parse_mountinfo(SAMPLE)
    under = entries_under(entries, "/var/lib/dynamic/xvols")
    assert [e.mount_id for e in under] == [22, 24, 25]  # not 26 at /var/lib/dynamic/xvols-old
    with_self = entries_under(entries, PurePosixPath("/var/lib/dynamic/xvols"), include_self=True)
    assert [e.mount_id for e in with_self] == [20, 22, 24, 25]
    assert [e.mount_id for e in entries_under(entries, "/var/lib/dynamic/xvols/s3/u/p/data")] == []


def test_mount_containing() -> None:
    entries = parse_mountinfo(SAMPLE)
    holder = mount_containing(entries, "/var/lib/dynamic/xvols/s3/u/p")
    assert holder is not None
    assert holder.mount_id == 20
    holder = mount_containing(entries, "/var/lib/dynamic/xvols/s3/u/p/data x/deep")
    assert holder is not None
    assert holder.mount_id == 24
    holder = mount_containing(entries, "/etc")
    assert holder is not None
    assert holder.mount_id == 1
    assert mount_containing(entries[1:], "/etc") is None


def test_tree() -> None:
    entries = parse_mountinfo(SAMPLE)
    tree = children_by_parent(entries)
    assert [e.mount_id for e in tree[1]] == [20, 21, 26]
    assert [e.mount_id for e in tree[20]] == [22, 25]
    assert 0 not in tree or all(e.mount_id == 1 for e in tree[0])
    assert [e.mount_id for e in descendants_of(entries, 20)] == [22, 25, 24]
    assert descendants_of(entries, 26) == ()


def test_cyclic_table_does_not_hang() -> None:
    line = "{0} {1} 0:1 / /x rw - tmpfs t rw\n"
    entries = parse_mountinfo(line.format(1, 2) + line.format(2, 1))
    assert [e.mount_id for e in descendants_of(entries, 1)] == [2]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 ext3 /dev/root rw", "separator"),
        ("36 35 98:0 /mnt1 /mnt2 - ext3 /dev/root rw", "separator"),
        ("36 35 98:0 /mnt1 /mnt2 rw - ext3 /dev/root", "after '-'"),
        ("36 35 98:0 /mnt1 /mnt2 rw - ext3 /dev/root rw extra", "after '-'"),
        ("x 35 98:0 /mnt1 /mnt2 rw - ext3 /dev/root rw", "numeric"),
        ("36 35 98 /mnt1 /mnt2 rw - ext3 /dev/root rw", "major:minor"),
        ("36 35 ²:0 /mnt1 /mnt2 rw - ext3 /dev/root rw", "numeric"),
        ("36 35 98:0 /mnt1 /mnt2 rw  - ext3 /dev/root rw", "empty optional field"),
        ("36 35 98:0 /mnt1 /mnt2 rw,,ro - ext3 /dev/root rw", "empty mount option"),
    ],
)
def test_malformed_lines(line: str, problem: str) -> None:
    with pytest.raises(MalformedMountinfo, match=problem) as caught:
        parse_mountinfo(PROC5_EXAMPLE + "\n" + line + "\n")
    assert caught.value.line_number == 2
    assert caught.value.line == line


def test_blank_lines_and_missing_final_newline() -> None:
    assert parse_mountinfo("") == ()
    assert parse_mountinfo("\n\n") == ()
    assert parse_mountinfo(PROC5_EXAMPLE) == parse_mountinfo(f"\n{PROC5_EXAMPLE}\n\n")


def test_escape_helpers() -> None:
    assert escape_field("a b\tc\nd\\e") == "a\\040b\\011c\\012d\\134e"
    assert unescape_field("a\\040b\\011c\\012d\\134e") == "a b\tc\nd\\e"
    assert unescape_field("no escapes") == "no escapes"
    assert unescape_field("\\9") == "\\9"  # not an octal escape: kept as is
    assert escape_field("é,x") == "é,x"


def test_entry_validation() -> None:
    with pytest.raises(ValueError, match="optional_fields"):
        parse_mountinfo(PROC5_EXAMPLE)[0].__class__(
            mount_id=1,
            parent_id=1,
            major=0,
            minor=0,
            root="/",
            mount_point="/",
            options=("rw",),
            optional_fields=("-",),
            fs_type="x",
            source="x",
            super_options=(),
        )


# Text for path-like fields: every character the kernel escapes, other line breaks that it
# does not (\r, \x0b, \u2028), the separator and non-ASCII.
awkward_text = st.lists(
    st.sampled_from([*" \t\n\\/-,:=a0é\r\x0b\u2028", "\\040", "\\134"]), max_size=6
).map("".join)
options = st.lists(awkward_text.filter(bool), max_size=3).map(tuple)
optional_fields = st.lists(
    st.sampled_from(["shared:1", "master:22", "propagate_from:3", "unbindable"])
    | awkward_text.filter(lambda f: f not in ("", "-")),
    max_size=3,
).map(tuple)
counters = st.integers(min_value=0, max_value=2**32)
entries = st.builds(
    MountEntry,
    mount_id=counters,
    parent_id=counters,
    major=counters,
    minor=counters,
    root=awkward_text,
    mount_point=awkward_text,
    options=options,
    optional_fields=optional_fields,
    fs_type=awkward_text,
    source=awkward_text,
    super_options=options,
)


@given(table=st.lists(entries, max_size=3))
@settings(max_examples=100)
def test_round_trip_property(table: list[MountEntry]) -> None:
    text = format_mountinfo(table)
    assert parse_mountinfo(text) == tuple(table)
    assert format_mountinfo(parse_mountinfo(text)) == text
    assert text.count("\n") == len(table)  # newlines inside fields are escaped


@given(text=st.text())
@settings(max_examples=200)
def test_escape_round_trip_property(text: str) -> None:
    escaped = escape_field(text)
    assert not any(char in escaped for char in " \t\n")
    assert unescape_field(escaped) == text


def test_unmount_order_is_deepest_first_one_step_per_stacked_mount() -> None:
    table = parse_mountinfo(
        "\n".join(
            [
                "20 1 0:1 / /s rw shared:1 - tmpfs t rw",
                "21 20 0:2 / /s/a rw shared:1 - tmpfs t rw",
                "22 21 0:3 / /s/a/b rw - tmpfs t rw",
                "23 21 0:4 / /s/a/b rw - tmpfs t rw",
                "24 1 0:5 / /sa rw - tmpfs t rw",
                "25 20 0:6 / /s/c rw - tmpfs t rw",
            ]
        )
    )
    assert unmount_order(table, "/s", include_self=False) == ["/s/a/b", "/s/a/b", "/s/c", "/s/a"]
    order = unmount_order(table, PurePosixPath("/s"), include_self=True)
    assert order[-1] == "/s"
    assert "/sa" not in order


def test_entries_under_normalises_unusual_spellings() -> None:
    table = parse_mountinfo("30 1 0:7 / /x//y/ rw - tmpfs t rw")
    assert [e.mount_id for e in entries_under(table, "/x", include_self=False)] == [30]
    assert entries_under(table, "/x/y", include_self=False) == ()
    assert len(entries_under(table, "/x/y", include_self=True)) == 1
