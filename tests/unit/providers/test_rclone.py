"""The rclone provider's pure half."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from dynvol_core.errors import InvalidObject
from dynvol_providers import MountRequest
from dynvol_providers.builtin.rclone import RcloneConfig, RcloneProvider

PROVIDER = RcloneProvider()


def test_config_is_parsed() -> None:
    config = PROVIDER.parse_config(
        {
            "type": "webdav",
            "remotePath": "a/b",
            "parameters": {"url": "http://x", "retries": 3, "x_y": True},
        },
        parameters={},
    )
    assert config == RcloneConfig(
        type="webdav", path="a/b", options={"url": "http://x", "retries": "3", "x_y": "true"}
    )


@pytest.mark.parametrize(
    ("values", "path"),
    [
        ({}, "type"),
        ({"type": "local"}, "type"),
        ({"type": "alias"}, "type"),
        ({"type": "Web-Dav"}, "type"),
        ({"type": "webdav", "remotePath": "../x"}, "remotePath"),
        ({"type": "webdav", "parameters": {"pass": "x"}}, "parameters[pass]"),
        ({"type": "s3", "parameters": {"secret_access_key": "x"}}, "parameters[secret_access_key]"),
        ({"type": "webdav", "parameters": {"type": "local"}}, "parameters[type]"),
        ({"type": "webdav", "parameters": {"url": ["a"]}}, "parameters[url]"),
        ({"type": "webdav", "parameters": {"bad key": "a"}}, "parameters[bad key]"),
        ({"type": "webdav", "path": "x"}, "path"),
    ],
)
def test_config_errors_name_the_field(values: dict[str, object], path: str) -> None:
    with pytest.raises(InvalidObject) as info:
        PROVIDER.parse_config(values, parameters={})
    assert path in info.value.paths


def test_secrets_go_to_the_environment_only() -> None:
    config = PROVIDER.parse_config(
        {"type": "webdav", "remotePath": "dir", "parameters": {"url": "http://127.0.0.1:8080"}},
        parameters={},
    )
    creds = PROVIDER.parse_credentials({"user": b"alice", "pass": b"obscured-secret"})
    request = MountRequest(
        name="ns/m",
        target=PurePosixPath("/xvols/d"),
        read_only=True,
        config=config,
        credentials=creds,
        work_dir=PurePosixPath("/run/dynvol/m"),
    )
    spec = PROVIDER.daemon_spec(request)
    assert spec.command.argv[:4] == ("rclone", "mount", "dynvol:dir", "/xvols/d")
    assert "--read-only" in spec.command.argv
    assert "--config" in spec.command.argv
    assert spec.command.env["RCLONE_CONFIG_DYNVOL_TYPE"] == "webdav"
    assert spec.command.env["RCLONE_CONFIG_DYNVOL_URL"] == "http://127.0.0.1:8080"
    assert spec.command.env["RCLONE_CONFIG_DYNVOL_PASS"] == "obscured-secret"
    assert spec.command.env["RCLONE_CONFIG_DYNVOL_USER"] == "alice"
    assert "AWS_CA_BUNDLE" in spec.command.unset_env
    assert spec.preflight is not None
    for argv in (spec.command.argv, spec.preflight.argv):
        assert not any("obscured-secret" in arg or "alice" in arg for arg in argv)
    assert "obscured-secret" not in repr(spec)


def test_secret_keys_must_be_option_names() -> None:
    with pytest.raises(InvalidObject) as info:
        PROVIDER.parse_credentials({"not an option": b"x"})
    assert info.value.paths == ("data.not an option",)


@pytest.mark.parametrize(
    "options",
    [{"bad\nkey": "v"}, {"type": "local"}, {"URL": "x"}, {"url": "a\x00b"}],
)
def test_a_forged_config_never_reaches_the_environment(options: dict[str, str]) -> None:
    forged = RcloneConfig(type="webdav", options=options)
    req = MountRequest(
        name="ns/m",
        target=PurePosixPath("/xvols/r"),
        read_only=False,
        config=forged,
        credentials=PROVIDER.parse_credentials({}),
        work_dir=PurePosixPath("/run/dynvol/m"),
    )
    with pytest.raises(InvalidObject):
        PROVIDER.daemon_spec(req)


def test_a_forged_local_type_never_reaches_the_environment() -> None:
    req = MountRequest(
        name="ns/m",
        target=PurePosixPath("/xvols/r"),
        read_only=False,
        config=RcloneConfig(type="local"),
        credentials=PROVIDER.parse_credentials({}),
        work_dir=PurePosixPath("/run/dynvol/m"),
    )
    with pytest.raises(InvalidObject, match="not allowed"):
        PROVIDER.daemon_spec(req)
