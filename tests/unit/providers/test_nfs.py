"""The nfs provider's pure half: config and the mount command."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from dynvol_core.errors import InvalidObject
from dynvol_providers import MountRequest
from dynvol_providers.builtin.nfs import NfsConfig, NfsProvider

PROVIDER = NfsProvider()


def request(config: NfsConfig, *, read_only: bool = False) -> MountRequest:
    return MountRequest(
        name="ns/m",
        target=PurePosixPath("/xvols/share"),
        read_only=read_only,
        config=config,
        credentials=PROVIDER.parse_credentials({"ignored": b"x"}),
        work_dir=PurePosixPath("/run/dynvol/m"),
    )


def test_default_is_nfs_4_1_read_write() -> None:
    config = PROVIDER.parse_config({"server": "nfs.example.com", "path": "/exports"}, parameters={})
    spec = PROVIDER.mount_command(request(config))
    assert spec.argv == (
        "mount", "-t", "nfs4", "-o", "vers=4.1,rw,nosuid,nodev",
        "nfs.example.com:/exports", "/xvols/share",
    )  # fmt: skip
    assert PROVIDER.mount_fs_type(request(config)) == "nfs4"


def test_v3_read_only_with_options_and_ipv6() -> None:
    config = PROVIDER.parse_config(
        {"server": "fd00::1", "path": "/srv/a", "version": 3, "options": ["hard", "timeo=600"]},
        parameters={},
    )
    spec = PROVIDER.mount_command(request(config, read_only=True))
    assert spec.argv == (
        "mount", "-t", "nfs", "-o", "hard,timeo=600,vers=3,ro,nosuid,nodev",
        "[fd00::1]:/srv/a", "/xvols/share",
    )  # fmt: skip
    assert PROVIDER.mount_fs_type(request(config)) == "nfs"


@pytest.mark.parametrize(
    ("values", "path"),
    [
        ({"path": "/x"}, "server"),
        ({"server": "a b", "path": "/x"}, "server"),
        ({"server": "s"}, "path"),
        ({"server": "s", "path": "relative"}, "path"),
        ({"server": "s", "path": "/a/../b"}, "path"),
        ({"server": "s", "path": "/x", "version": "5"}, "version"),
        ({"server": "s", "path": "/x", "options": ["rw"]}, "options[0]"),
        ({"server": "s", "path": "/x", "options": ["hard", "a,b"]}, "options[1]"),
        ({"server": "s", "path": "/x", "options": "hard"}, "options"),
        ({"server": "s", "path": "/x", "extra": 1}, "extra"),
    ],
)
def test_config_errors_name_the_field(values: dict[str, object], path: str) -> None:
    with pytest.raises(InvalidObject) as info:
        PROVIDER.parse_config(values, parameters={})
    assert path in info.value.paths


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        ("suid", "set by dynvol"),
        ("dev", "set by dynvol"),
        ("nosuid", "set by dynvol"),
        ("defaults", "set by dynvol"),
        ("nfsvers=3", "set by dynvol"),
        ("minorversion=1", "set by dynvol"),
        ("addr=169.254.169.254", "not an NFS mount option dynvol allows"),
        ("mounthost=evil.example", "not an NFS mount option dynvol allows"),
        ("exec", "not an NFS mount option dynvol allows"),
        ("timeo=soon", "timeo=<number>"),
        ("sec=krb9", "sec=one of"),
    ],
)
def test_managed_and_unknown_options_are_refused(option: str, fragment: str) -> None:
    with pytest.raises(InvalidObject) as info:
        PROVIDER.parse_config({"server": "s", "path": "/x", "options": [option]}, parameters={})
    (error,) = info.value.errors
    assert error.path == "options[0]"
    assert fragment in error.message


def test_repeated_options_are_refused() -> None:
    with pytest.raises(InvalidObject, match="given twice"):
        PROVIDER.parse_config(
            {"server": "s", "path": "/x", "options": ["timeo=1", "timeo=2"]}, parameters={}
        )


def test_a_forged_config_never_reaches_mount() -> None:
    forged = NfsConfig(server="s", path="/x", options=("suid",))
    with pytest.raises(InvalidObject):
        PROVIDER.mount_command(request(forged))
    forged = NfsConfig(server="s", path="/x", options=("hard,dev",))
    with pytest.raises(InvalidObject):
        PROVIDER.mount_command(request(forged))
