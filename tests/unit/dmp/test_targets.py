"""Mount targets are opened one name at a time and never through a symbolic link."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynvol_dmp.targets import UnsafeTarget, open_below, open_parent, remove_dir_below


def _where(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _tree(base: Path) -> set[str]:
    return {str(p.relative_to(base)) for p in base.rglob("*")}


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, Path]:
    """A root (the slot) and an outside directory (the mount pod's /etc)."""
    root = tmp_path / "slot"
    outside = tmp_path / "etc"
    root.mkdir()
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0\n")
    return root, outside


def test_opens_and_creates_the_target(world: tuple[Path, Path]) -> None:
    root, _ = world
    old = os.umask(0o022)
    try:
        with open_below(PurePosixPath(root), PurePosixPath(root / "a" / "b" / "c")) as opened:
            assert _where(opened.fd) == str(root / "a" / "b" / "c")
            assert opened.fd_path == f"/proc/self/fd/{opened.fd}"
            assert opened.same_directory_as(root / "a" / "b" / "c")
    finally:
        os.umask(old)
    for part in ("a", "a/b", "a/b/c"):
        assert stat.S_IMODE((root / part).stat().st_mode) == 0o755
    # Opening again finds what is there.
    with open_below(PurePosixPath(root), PurePosixPath(root / "a" / "b" / "c")) as again:
        assert _where(again.fd) == str(root / "a" / "b" / "c")
    assert opened.fd == -1  # closed by the context manager


@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("kind", ["absolute", "relative", "dangling", "inside"])
def test_a_link_at_any_position_is_refused(
    world: tuple[Path, Path], position: int, kind: str
) -> None:
    root, outside = world
    names = ["a", "b", "c"]
    parent = root.joinpath(*names[:position])
    parent.mkdir(parents=True, exist_ok=True)
    (root / "elsewhere").mkdir()
    link = parent / names[position]
    link.symlink_to(
        {
            "absolute": str(outside),
            "relative": os.path.relpath(outside, parent),
            "dangling": str(outside / "nope"),
            "inside": str(root / "elsewhere"),  # harmless-looking, refused all the same
        }[kind]
    )
    before_outside = _tree(outside)
    with pytest.raises(UnsafeTarget, match="is a symbolic link") as info:
        open_below(PurePosixPath(root), PurePosixPath(root.joinpath(*names)))
    assert str(link) in str(info.value)
    assert _tree(outside) == before_outside  # nothing made through the link
    assert not (outside / "nope").exists()
    assert list((root / "elsewhere").iterdir()) == []


def test_a_file_where_a_directory_is_expected_is_refused(world: tuple[Path, Path]) -> None:
    root, _ = world
    (root / "a").write_text("not a directory")
    with pytest.raises(UnsafeTarget, match="exists and is not a directory"):
        open_below(PurePosixPath(root), PurePosixPath(root / "a"))
    with pytest.raises(UnsafeTarget, match="exists and is not a directory"):
        open_below(PurePosixPath(root), PurePosixPath(root / "a" / "b"))
    os.mkfifo(root / "fifo")
    with pytest.raises(UnsafeTarget, match="not a directory"):
        open_below(PurePosixPath(root), PurePosixPath(root / "fifo"))


@pytest.mark.parametrize("relative", ["..", "../etc", "a/../../etc", "a/./b", "a//b", "", "a/"])
def test_paths_that_are_not_plain_names_are_refused(
    world: tuple[Path, Path], relative: str
) -> None:
    root, _ = world
    before = _tree(root.parent)
    # The text as given: a PurePosixPath would already have dropped '.' and '//'.
    with pytest.raises(UnsafeTarget):
        open_below(PurePosixPath(root), f"{root}/{relative}")
    assert _tree(root.parent) == before


def test_a_path_outside_the_root_is_refused(world: tuple[Path, Path]) -> None:
    root, outside = world
    with pytest.raises(UnsafeTarget, match="is not below"):
        open_below(PurePosixPath(root), PurePosixPath(outside / "x"))
    assert not (outside / "x").exists()


def test_create_from_makes_only_the_mountpoint(world: tuple[Path, Path]) -> None:
    root, _ = world
    slot = PurePosixPath(root / "uuid" / "pod")
    with pytest.raises(UnsafeTarget, match="does not exist"):
        open_below(PurePosixPath(root), slot / "data", create_from=2)
    assert not (root / "uuid").exists()
    Path(slot).mkdir(parents=True)
    with open_below(PurePosixPath(root), slot / "data", create_from=2) as opened:
        assert _where(opened.fd) == str(slot / "data")
    with pytest.raises(UnsafeTarget, match="does not exist"):
        open_below(PurePosixPath(root), slot / "other", create_from=None)
    assert not Path(slot / "other").exists()


def test_a_swap_after_opening_is_detected(world: tuple[Path, Path]) -> None:
    root, outside = world
    target = root / "data"
    with open_below(PurePosixPath(root), PurePosixPath(target)) as opened:
        target.rename(root / "moved")
        target.symlink_to(outside)
        # The descriptor still holds the directory that was opened, not the link.
        assert _where(opened.fd) == str(root / "moved")
        assert not opened.same_directory_as(target)


def test_open_parent_and_remove_dir(world: tuple[Path, Path]) -> None:
    root, outside = world
    (root / "a" / "b").mkdir(parents=True)
    fd, name = open_parent(PurePosixPath(root), PurePosixPath(root / "a" / "b"))
    try:
        assert (_where(fd), name) == (str(root / "a"), "b")
    finally:
        os.close(fd)
    assert remove_dir_below(PurePosixPath(root), PurePosixPath(root / "a" / "b"))
    assert not (root / "a" / "b").exists()
    # Through a link: left alone, and nothing outside is removed.
    (outside / "victim").mkdir()
    (root / "a").rmdir()
    (root / "a").symlink_to(outside)
    assert not remove_dir_below(PurePosixPath(root), PurePosixPath(root / "a" / "victim"))
    assert (outside / "victim").is_dir()
    # The last component a link: not removed either (and not followed).
    (root / "c").symlink_to(outside / "victim")
    assert not remove_dir_below(PurePosixPath(root), PurePosixPath(root / "c"))
    assert (root / "c").is_symlink()
    assert (outside / "victim").is_dir()
    # Not empty, or gone: False, no error.
    (root / "full").mkdir()
    (root / "full" / "f").write_text("x")
    assert not remove_dir_below(PurePosixPath(root), PurePosixPath(root / "full"))
    assert not remove_dir_below(PurePosixPath(root), PurePosixPath(root / "gone"))


# A random tree of directories, files and links (to anywhere), and a random target in it:
# the resolver either refuses, or returns exactly the planned directory, never anything
# reached through a link, and creates nothing outside the root.
_NAMES = st.sampled_from(["a", "b", "c"])
_ENTRY = st.tuples(
    st.lists(_NAMES, min_size=1, max_size=3),
    st.sampled_from(["dir", "file", "link-out", "link-in", "link-dangling", "link-up"]),
)


@given(entries=st.lists(_ENTRY, max_size=8), target=st.lists(_NAMES, min_size=1, max_size=4))
@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_never_reaches_outside_or_through_a_link(
    tmp_path_factory: pytest.TempPathFactory,
    entries: list[tuple[list[str], str]],
    target: list[str],
) -> None:
    base = tmp_path_factory.mktemp("prop")
    root, outside = base / "slot", base / "etc"
    root.mkdir()
    outside.mkdir()
    for names, kind in entries:
        path = root.joinpath(*names)
        parents = [root.joinpath(*names[:n]) for n in range(1, len(names))]
        if any(p.is_symlink() or (p.exists() and not p.is_dir()) for p in parents):
            continue  # the set-up itself must not write through a link
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "dir":
                path.mkdir()
            elif kind == "file":
                path.write_text("f")
            else:
                path.symlink_to(
                    {"link-out": str(outside), "link-in": str(root), "link-up": "..",
                     "link-dangling": str(outside / "missing")}[kind]
                )  # fmt: skip
        except OSError:
            continue  # something else is already there
    planned = root.joinpath(*target)
    before = _tree(outside)
    try:
        opened = open_below(PurePosixPath(root), PurePosixPath(planned))
    except UnsafeTarget:
        pass
    else:
        with opened:
            assert _where(opened.fd) == str(planned)
        # Every component on the way is a real directory, not a link.
        for depth in range(1, len(target) + 1):
            st_ = os.lstat(root.joinpath(*target[:depth]))
            assert stat.S_ISDIR(st_.st_mode)
    assert _tree(outside) == before
