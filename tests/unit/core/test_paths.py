"""Host path layout: every component validated, no mountpoint ever escapes its slot."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynvol_core.errors import InvalidPath
from dynvol_core.paths import (
    DEFAULT_DMP_ROOT,
    PodSlot,
    XvolsLayout,
    components_below,
    path_is_within,
    validate_volume_id,
)

ROOT = PurePosixPath("/var/lib/dynamic")
SLOT_UUID = "1f8c3ad2-5b1e-4c4e-9d0a-2f1b7c6e9a10"
POD_UID = "0a2b4c6d-8e0f-4123-8456-789abcdef012"
LAYOUT = XvolsLayout(ROOT)
SLOT = LAYOUT.slot("s3-sample", SLOT_UUID, POD_UID)
SLOT_PATH = PurePosixPath(f"/var/lib/dynamic/xvols/s3-sample/{SLOT_UUID}/{POD_UID}")

uuids = st.uuids().map(str)
class_names = st.from_regex(
    r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?(\.[a-z0-9]{1,5}){0,2}", fullmatch=True
)
# Mountpoint text with everything that could go wrong: separators, dots, control and
# non-ASCII characters.
mountpoint_text = st.lists(
    st.sampled_from(["/", "//", ".", "..", "data", "x", " ", "é", "日本", "\0", "\n", "\t", "\\"]),
    max_size=8,
).map("".join) | st.text(max_size=40)


def test_layout_directories() -> None:
    assert LAYOUT.xvols_dir == PurePosixPath("/var/lib/dynamic/xvols")
    assert LAYOUT.state_dir == PurePosixPath("/var/lib/dynamic/state")
    assert LAYOUT.volumes_state_dir == PurePosixPath("/var/lib/dynamic/state/volumes")
    assert LAYOUT.class_dir("s3-sample") == PurePosixPath("/var/lib/dynamic/xvols/s3-sample")
    assert LAYOUT.record_path("csi-0123abc") == PurePosixPath(
        "/var/lib/dynamic/state/volumes/csi-0123abc.json"
    )
    assert XvolsLayout.default() == LAYOUT
    assert XvolsLayout("/srv/dyn").root == PurePosixPath("/srv/dyn")


def test_slot_paths() -> None:
    assert SLOT.path == SLOT_PATH
    assert SLOT.class_dir == PurePosixPath("/var/lib/dynamic/xvols/s3-sample")
    assert SLOT.target("/data") == SLOT_PATH / "data"
    assert SLOT.target("//data/./x/") == SLOT_PATH / "data/x"
    assert SLOT.target(PurePosixPath("/data/x")) == SLOT_PATH / "data/x"
    assert SLOT.target("/a b/é") == SLOT_PATH / "a b" / "é"


@pytest.mark.parametrize(
    "name",
    ["", "S3", "a_b", "-a", "a-", "a..b", "a/b", "..", ".", "a b", "x" * 254, "é", "a\0"],
)
def test_class_name_must_be_dns_subdomain(name: str) -> None:
    with pytest.raises(InvalidPath, match="DNS-1123 subdomain"):
        LAYOUT.slot(name, SLOT_UUID, POD_UID)
    with pytest.raises(InvalidPath):
        LAYOUT.class_dir(name)


@pytest.mark.parametrize(
    "uid",
    [
        "",
        SLOT_UUID.upper(),
        SLOT_UUID.replace("-", ""),
        "{" + SLOT_UUID + "}",
        SLOT_UUID + "/..",
        "../" + SLOT_UUID,
        SLOT_UUID[:-1],
        SLOT_UUID + "\n",
    ],
)
def test_uuids_must_be_canonical(uid: str) -> None:
    with pytest.raises(InvalidPath, match="slot UUID"):
        LAYOUT.slot("s3-sample", uid, POD_UID)
    with pytest.raises(InvalidPath, match="pod UID"):
        LAYOUT.slot("s3-sample", SLOT_UUID, uid)


@pytest.mark.parametrize("root", ["relative", "/a/../b", "//net/x", "/a\0b", "/a\nb", ""])
def test_root_must_be_normalised_absolute(root: str) -> None:
    with pytest.raises(InvalidPath):
        XvolsLayout(root)
    with pytest.raises(InvalidPath):
        PodSlot(root=root, class_name="s3-sample", slot_uuid=SLOT_UUID, pod_uid=POD_UID)


@pytest.mark.parametrize(
    ("mountpoint", "message"),
    [
        ("data", "absolute"),
        ("", "absolute"),
        ("/", "must not be '/'"),
        ("//./", "must not be '/'"),
        ("/..", r"'\.\.'"),
        ("/data/../../etc", r"'\.\.'"),
        ("/data/..", r"'\.\.'"),
        ("/a\0b", "control"),
        ("/a\nb", "control"),
        ("/" + "x" * 256, "255 bytes"),
        ("/x" * 600, "1024 bytes"),
    ],
)
def test_target_rejects_unsafe_mountpoints(mountpoint: str, message: str) -> None:
    with pytest.raises(InvalidPath, match=message):
        SLOT.target(mountpoint)


@given(text=mountpoint_text)
@settings(max_examples=200)
def test_target_never_escapes_slot(text: str) -> None:
    try:
        target = SLOT.target(text)
    except InvalidPath:
        return
    assert path_is_within(target, SLOT.path)
    assert target != SLOT.path
    assert ".." not in target.parts
    assert "." not in target.parts
    # The normal form is a fixed point.
    assert SLOT.target("/" + str(target.relative_to(SLOT.path))) == target
    for policy in ("independent", "shared"):
        inside = LAYOUT.dmp_target(SLOT, policy, text)
        assert path_is_within(inside, DEFAULT_DMP_ROOT)
        assert inside != DEFAULT_DMP_ROOT
        # The DMP's view and the host's view name the same directory.
        host = LAYOUT.dmp_host_path(SLOT, policy) / inside.relative_to(DEFAULT_DMP_ROOT)
        assert host == target


def test_parse_slot() -> None:
    assert LAYOUT.parse_slot(SLOT_PATH) == SLOT
    assert LAYOUT.parse_slot(str(SLOT_PATH)) == SLOT
    others: list[str | PurePosixPath] = [
        SLOT_PATH / "data",
        SLOT_PATH.parent,
        f"{SLOT_PATH}/",
        f"/var/lib/dynamic/xvols//s3-sample/{SLOT_UUID}/{POD_UID}",
        f"/var/lib/dynamic/xvols/s3-sample/{SLOT_UUID}/../{POD_UID}",
        f"/var/lib/dynamic/xvols/S3/{SLOT_UUID}/{POD_UID}",
        f"/var/lib/dynamic/xvols/s3-sample/{SLOT_UUID.upper()}/{POD_UID}",
        f"/var/lib/dynamic/xvolsx/s3-sample/{SLOT_UUID}/{POD_UID}",
        f"/srv/xvols/s3-sample/{SLOT_UUID}/{POD_UID}",
        "/",
        "",
    ]
    for other in others:
        assert LAYOUT.parse_slot(other) is None, other


def test_slot_containing() -> None:
    assert LAYOUT.slot_containing(SLOT_PATH) == SLOT
    assert LAYOUT.slot_containing(SLOT_PATH / "data" / "x") == SLOT
    assert LAYOUT.slot_containing(SLOT_PATH.parent) is None
    assert LAYOUT.slot_containing(f"{SLOT_PATH}/../{POD_UID}") is None
    assert LAYOUT.slot_containing("/elsewhere/x") is None


@given(class_name=class_names, slot_uuid=uuids, pod_uid=uuids)
@settings(max_examples=50)
def test_parse_slot_round_trips(class_name: str, slot_uuid: str, pod_uid: str) -> None:
    slot = LAYOUT.slot(class_name, slot_uuid, pod_uid)
    assert LAYOUT.parse_slot(slot.path) == slot
    assert XvolsLayout("/other").parse_slot(slot.path) is None


def test_dmp_views() -> None:
    assert LAYOUT.dmp_host_path(SLOT, "independent") == SLOT_PATH
    assert LAYOUT.dmp_host_path(SLOT, "shared") == SLOT_PATH.parent.parent
    assert LAYOUT.dmp_target(SLOT, "independent", "/data") == PurePosixPath("/xvols/data")
    assert LAYOUT.dmp_target(SLOT, "shared", "/data/x") == PurePosixPath(
        f"/xvols/{SLOT_UUID}/{POD_UID}/data/x"
    )
    assert LAYOUT.dmp_target(SLOT, "independent", "/d", PurePosixPath("/mnt")) == PurePosixPath(
        "/mnt/d"
    )


def test_dmp_views_reject_bad_input() -> None:
    with pytest.raises(InvalidPath, match="dispatch policy"):
        LAYOUT.dmp_host_path(SLOT, "per-node")
    with pytest.raises(InvalidPath, match="dispatch policy"):
        LAYOUT.dmp_target(SLOT, "", "/data")
    with pytest.raises(InvalidPath, match="does not belong"):
        XvolsLayout("/srv").dmp_host_path(SLOT, "shared")
    with pytest.raises(InvalidPath):
        LAYOUT.dmp_target(SLOT, "shared", "/../x")
    with pytest.raises(InvalidPath):
        LAYOUT.dmp_target(SLOT, "shared", "/data", PurePosixPath("xvols"))


@pytest.mark.parametrize(
    "volume_id", ["", ".", "..", ".hidden", "a/b", "a\0b", "a\nb", "x" * 129, "é" * 65]
)
def test_record_path_rejects_unsafe_volume_ids(volume_id: str) -> None:
    with pytest.raises(InvalidPath, match="volume ID"):
        LAYOUT.record_path(volume_id)


def test_volume_ids_from_kubelet_and_csi_sanity_are_accepted() -> None:
    for volume_id in [
        "csi-3a9f4c2e1b0d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f",
        "sanity-node-full-5E1F8A2B-3C4D5E6F",
        "x" * 128,
    ]:
        assert validate_volume_id(volume_id) == volume_id


def test_path_is_within_is_component_wise() -> None:
    assert path_is_within(PurePosixPath("/a/b"), PurePosixPath("/a"))
    assert path_is_within(PurePosixPath("/a"), PurePosixPath("/a"))
    assert path_is_within(PurePosixPath("/a"), PurePosixPath("/"))
    assert not path_is_within(PurePosixPath("/a/bc"), PurePosixPath("/a/b"))
    assert not path_is_within(PurePosixPath("/a"), PurePosixPath("/a/b"))


# ---- components_below: the names a no-follow walk opens one at a time ------------------


def test_components_below() -> None:
    assert components_below("/xvols/data", "/xvols") == ("data",)
    assert components_below(PurePosixPath("/xvols/a/b/c"), PurePosixPath("/xvols")) == (
        "a",
        "b",
        "c",
    )
    assert components_below("/xvols/a", "/xvols/") == ("a",)


@pytest.mark.parametrize(
    ("path", "base", "message"),
    [
        ("/xvols", "/xvols", "is not below"),
        ("/xvols/", "/xvols", "component ''"),
        ("/xvols/a/../b", "/xvols", "component '..'"),
        ("/xvols/..", "/xvols", "component '..'"),
        ("/xvols/./a", "/xvols", "component '.'"),
        ("/xvols//a", "/xvols", "component ''"),
        ("/xvols/a/", "/xvols", "component ''"),
        ("/xvols/a\nb", "/xvols", "control"),
        ("/xvolsx/a", "/xvols", "is not below"),
        ("/etc/passwd", "/xvols", "is not below"),
        ("xvols/a", "xvols", "absolute"),
    ],
)
def test_components_below_refuses(path: str, base: str, message: str) -> None:
    with pytest.raises(InvalidPath, match=message):
        components_below(path, base)


@given(text=mountpoint_text)
@settings(max_examples=300)
def test_components_below_are_plain_names_that_rebuild_the_path(text: str) -> None:
    path = f"/xvols/{text}"
    try:
        names = components_below(path, "/xvols")
    except InvalidPath:
        return
    assert names
    for name in names:
        assert name not in ("", ".", "..")
        assert "/" not in name
        assert "\0" not in name
    # Nothing was normalised away: joining the names gives back the very text.
    assert "/xvols/" + "/".join(names) == path
    assert path_is_within(PurePosixPath(path), PurePosixPath("/xvols"))
