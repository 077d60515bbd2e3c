"""No claim value changes a mounter's options: one property per provider, and the builder.

For arbitrary text in every field, either the provider refuses the claim (InvalidObject) or
the mounter gets exactly the options dynvol means: the ``-o`` strings are split the way
libfuse and libmount split them (on commas, with '\\' as escape) and compared as sets of
names, and rclone's environment is compared name by name.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynvol_core.errors import InvalidObject
from dynvol_core.models import ConnectionPolicy
from dynvol_providers import (
    CommandSpec,
    DaemonSpec,
    FuseProvider,
    MountFailed,
    MountRequest,
    Reason,
)
from dynvol_providers.base import (
    check_command_spec,
    check_option_value,
    join_mount_options,
    split_mount_options,
)
from dynvol_providers.builtin.nfs import FLAGS, NfsProvider
from dynvol_providers.builtin.rclone import (
    PARAM_ALLOWED_OPTIONS,
    RcloneProvider,
    is_local_option,
)
from dynvol_providers.builtin.s3 import S3Provider

S3 = S3Provider()
RCLONE = RcloneProvider()
NFS = NfsProvider()
#: Any host kind is allowed, so the properties explore the syntax, not the policy.
OPEN = ConnectionPolicy.permissive()
KEYS = {"access-key-id": "cldevaccesskey", "secret-access-key": "cldevsecretkey"}
ENV_PREFIX = "RCLONE_CONFIG_DYNVOL_"

# Characters that split, escape, quote or end options, next to ordinary ones.
HOSTILE = ",=\\\"' \t\n\r\x00;:/@[]?#%&$`|<>~{}-_."
hostile_text = st.text(
    alphabet=st.one_of(st.sampled_from(HOSTILE), st.sampled_from("abcz09AZ"), st.characters()),
    max_size=24,
)


def around(*valid: str) -> st.SearchStrategy[str]:
    """Valid values, valid values with hostile text appended, and hostile text."""
    return st.one_of(
        st.sampled_from(valid),
        st.sampled_from(valid),
        st.builds(lambda v, h: v + h, st.sampled_from(valid), hostile_text),
        hostile_text,
    )


hosts = st.one_of(
    st.sampled_from(
        ["s3.example.com", "127.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "2130706433", "minio"]
    ),
    hostile_text,
)
ports = st.one_of(st.just(""), st.sampled_from([":9000", ":0", ":99999", ":x"]), hostile_text)
paths = st.one_of(st.just(""), st.sampled_from(["/", "/base", "/a/b%2C"]), hostile_text)
endpoints = st.one_of(
    st.builds(
        lambda scheme, host, port, path: scheme + host + port + path,
        st.sampled_from(["http://", "https://", "ftp://", ""]),
        hosts,
        ports,
        paths,
    ),
    hostile_text,
)


def _request(provider: Any, config: Any, *, read_only: bool, keys: Mapping[str, str]) -> Any:
    return MountRequest(
        name="ns/m",
        target=PurePosixPath("/xvols/data"),
        read_only=read_only,
        config=config,
        credentials=provider.parse_credentials(dict(keys)),
        work_dir=PurePosixPath("/run/dynvol/m"),
    )


def _o_options(argv: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """Every option of every ``-o`` argument, split as the mounter splits them."""
    found: list[tuple[str, str | None]] = []
    for flag, value in itertools.pairwise(argv):
        if flag == "-o":
            found += split_mount_options(value)
    return found


# --------------------------------------------------------------------------- the builder


options_in = st.lists(
    st.tuples(hostile_text, st.one_of(st.none(), hostile_text)), min_size=1, max_size=6
)


@given(options=options_in)
def test_joined_options_split_back_into_exactly_what_was_given(
    options: list[tuple[str, str | None]],
) -> None:
    items = [key if value is None else (key, value) for key, value in options]
    try:
        text = join_mount_options(items)
    except InvalidObject:
        return
    assert split_mount_options(text) == options
    assert len({key for key, _ in options}) == len(options)


@pytest.mark.parametrize(
    "value",
    ["a,b", "x\\,dev", 'a"b,c"', "it's", "a b", "line\nnext", "nul\x00", "", "\x85"],
)
def test_values_that_could_split_are_refused(value: str) -> None:
    assert check_option_value(value, "spec.s3Config.endpoint")
    with pytest.raises(InvalidObject) as info:
        join_mount_options([("url", value)], fields={"url": "spec.s3Config.endpoint"})
    assert info.value.paths == ("spec.s3Config.endpoint",)


def test_names_and_duplicates_are_checked() -> None:
    with pytest.raises(InvalidObject, match="given twice"):
        join_mount_options(["ro", "ro"])
    with pytest.raises(InvalidObject, match="not a mount option name"):
        join_mount_options(["dev=1,suid"])
    assert join_mount_options(["ro", ("url", "http://h/a=b")]) == "ro,url=http://h/a=b"


def test_split_reads_escapes_like_libfuse() -> None:
    assert split_mount_options("a\\,b,c=d=e,,f") == [("a,b", None), ("c", "d=e"), ("f", None)]


# --------------------------------------------------------------------------- s3 via s3fs


s3_configs = st.fixed_dictionaries(
    {"bucket": around("data", "a.b-c")},
    optional={
        "endpoint": st.one_of(
            endpoints, around("http://127.0.0.1:9000", "https://s3.example.com/x")
        ),
        "region": around("us-east-1", "eu-west-1"),
        "prefix": around("team/a", ""),
        "pathStyle": st.one_of(st.booleans(), st.booleans(), hostile_text),
    },
)
S3FS_OPTIONS = {"url", "endpoint", "allow_other", "connect_timeout", "retries", "dbglevel",
                "nonempty"}  # fmt: skip


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(values=s3_configs, read_only=st.booleans(), anonymous=st.booleans())
def test_s3fs_gets_exactly_the_expected_options(
    values: dict[str, Any], read_only: bool, anonymous: bool
) -> None:
    try:
        config = S3.parse_config(values, parameters={}, connection=OPEN)
    except InvalidObject:
        return
    spec = S3.daemon_spec(_request(S3, config, read_only=read_only, keys={} if anonymous else KEYS))
    argv = spec.command.argv
    # s3fs BUCKET[:/PREFIX] TARGET -f, then only -o pairs, one option each.
    source = f"{config.bucket}:/{config.prefix}" if config.prefix else config.bucket
    assert argv[:2] == ("s3fs", source)
    assert argv[2:4] == ("/xvols/data", "-f")
    assert all(flag == "-o" for flag in argv[4::2])
    assert all(len(split_mount_options(o)) == 1 for o in argv[5::2])
    options = dict(_o_options(argv))
    expected = S3FS_OPTIONS | {"public_bucket" if anonymous else "passwd_file"}
    expected |= {"use_path_request_style"} if config.path_style else set()
    expected |= {"ro"} if read_only else set()
    assert set(options) == expected
    assert len(_o_options(argv)) == len(expected)
    assert options["url"] == config.endpoint
    assert options["endpoint"] == config.region


# --------------------------------------------------------------------------- s3 via rclone

S3_RCLONE_ENV = {f"{ENV_PREFIX}{k}" for k in
                 ("TYPE", "PROVIDER", "ENDPOINT", "REGION", "FORCE_PATH_STYLE", "ENV_AUTH",
                  "ACCESS_KEY_ID", "SECRET_ACCESS_KEY")}  # fmt: skip


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(values=s3_configs, read_only=st.booleans())
def test_s3_with_rclone_gets_exactly_the_expected_environment(
    values: dict[str, Any], read_only: bool
) -> None:
    try:
        config = S3.parse_config(values, parameters={"s3-mounter": "rclone"}, connection=OPEN)
    except InvalidObject:
        return
    spec = S3.daemon_spec(_request(S3, config, read_only=read_only, keys=KEYS))
    for command in (spec.command, spec.preflight):
        assert command is not None
        assert set(command.env) == S3_RCLONE_ENV
        assert command.env[f"{ENV_PREFIX}ENDPOINT"] == config.endpoint
        assert command.env[f"{ENV_PREFIX}ENV_AUTH"] == "false"
        assert not any("\x00" in v for v in command.env.values())
        path = f"{config.bucket}/{config.prefix}" if config.prefix else config.bucket
        assert f"dynvol:{path}" in command.argv
    assert _rclone_shape(spec.command) == _rclone_shape(_baseline_rclone_s3(read_only))


def _rclone_shape(command: CommandSpec) -> tuple[str, ...]:
    # The flags and their order; the remote and target are the only free positions.
    return tuple(a if a.startswith("-") or i < 2 else "<arg>" for i, a in enumerate(command.argv))


def _baseline_rclone_s3(read_only: bool) -> CommandSpec:
    config = S3.parse_config({"bucket": "data"}, parameters={"s3-mounter": "rclone"})
    return S3.daemon_spec(_request(S3, config, read_only=read_only, keys=KEYS)).command


# --------------------------------------------------------------------------- rclone

option_names = st.one_of(
    st.sampled_from(
        ["url", "vendor", "host", "user", "key_file", "ssh", "env_auth", "use_msi",
         "known_hosts_file", "bearer_token_command", "shell_type", "type", "pass", "endpoint"]
    ),
    hostile_text,
)  # fmt: skip
option_values = st.one_of(
    around("other", "https://dav.example.com", "sftp.example.com:22"),
    endpoints,
    st.integers(),
    st.booleans(),
    st.none(),
    st.lists(st.text(max_size=3), max_size=2),
)
rclone_configs = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(
            st.sampled_from(["webdav", "sftp", "s3", "local", "crypt"]), hostile_text
        ),
        "remotePath": st.one_of(st.sampled_from(["", "photos/2024"]), hostile_text),
        "parameters": st.dictionaries(option_names, option_values, max_size=5),
    },
)
_ENV_NAME = re.compile(r"RCLONE_CONFIG_DYNVOL_[A-Z][A-Z0-9_]*")


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=rclone_configs,
    allowed=st.sampled_from(["", "key_file", "key_file,ssh"]),
    read_only=st.booleans(),
)
def test_rclone_gets_exactly_the_expected_environment(
    values: dict[str, Any], allowed: str, read_only: bool
) -> None:
    parameters = {PARAM_ALLOWED_OPTIONS: allowed} if allowed else {}
    try:
        config = RCLONE.parse_config(values, parameters=parameters, connection=OPEN)
    except InvalidObject:
        return
    secret = {"user": "u", "pass": "obscured"}
    spec = RCLONE.daemon_spec(_request(RCLONE, config, read_only=read_only, keys=secret))
    given_options = set(values.get("parameters") or {})
    expected = {f"{ENV_PREFIX}TYPE"} | {f"{ENV_PREFIX}{k.upper()}" for k in given_options}
    expected |= {f"{ENV_PREFIX}USER", f"{ENV_PREFIX}PASS"}
    allowed_names = set(filter(None, allowed.split(",")))
    for command in (spec.command, spec.preflight):
        assert command is not None
        assert set(command.env) == expected
        assert all(_ENV_NAME.fullmatch(name) for name in command.env)
        assert command.env[f"{ENV_PREFIX}TYPE"] == values["type"]
        assert not any("\x00" in v or "\n" in v for v in command.env.values())
        assert f"dynvol:{config.path}" in command.argv
    assert not {k for k in given_options if is_local_option(k)} - allowed_names
    baseline = RCLONE.parse_config({"type": "webdav"}, parameters={})
    base_spec = RCLONE.daemon_spec(_request(RCLONE, baseline, read_only=read_only, keys=secret))
    assert _rclone_shape(spec.command) == _rclone_shape(base_spec.command)


# --------------------------------------------------------------------------- nfs

nfs_options = st.lists(
    st.one_of(
        st.sampled_from(
            ["hard", "timeo=600", "suid", "dev", "nosuid", "ro", "rw", "vers=3", "defaults",
             "addr=10.0.0.1", "clientaddr=1.2.3.4", "sec=krb5p", "proto=tcp", "hard,dev",
             "nconnect=4", "exec", "x-systemd.automount", "context=x"]
        ),
        hostile_text,
    ),
    max_size=3,
)  # fmt: skip
nfs_configs = st.fixed_dictionaries(
    {
        "server": st.one_of(hosts, around("nfs.example.com", "fd00::1", "10.0.0.2")),
        "path": around("/exports", "/srv/a b"),
    },
    optional={
        "version": st.one_of(st.sampled_from(["3", "4.1", 4, "5"]), hostile_text),
        "options": nfs_options,
    },
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(values=nfs_configs, read_only=st.booleans())
def test_nfs_gets_exactly_the_expected_options(values: dict[str, Any], read_only: bool) -> None:
    try:
        config = NFS.parse_config(values, parameters={}, connection=OPEN)
    except InvalidObject:
        return
    request = _request(NFS, config, read_only=read_only, keys={})
    argv = NFS.mount_command(request).argv
    assert argv[:4] == ("mount", "-t", NFS.mount_fs_type(request), "-o")
    assert len(argv) == 7
    options = split_mount_options(argv[4])
    user = [o.partition("=")[0] for o in values.get("options") or []]
    managed = ["vers", "ro" if read_only else "rw", "nosuid", "nodev"]
    assert [key for key, _ in options] == user + managed
    assert dict(options)["vers"] == config.version
    assert not {"suid", "dev", "exec", "defaults"} & {key for key, _ in options}
    assert all(key in FLAGS or value is not None for key, value in options[: len(user)])


# --------------------------------------------------------------------------- the last check


class _Forging(FuseProvider):
    """A third-party-style provider that builds whatever argv and env it is given."""

    name = "forging"

    def __init__(self, argv: tuple[str, ...], env: dict[str, str]) -> None:
        self.argv, self.env = argv, env

    def parse_config(self, values: Any, *, parameters: Any, connection: Any = None) -> Any:
        return dict(values)

    def parse_credentials(self, secret_data: Any) -> Any:
        return S3.parse_credentials({})

    def daemon_spec(self, request: MountRequest) -> DaemonSpec:
        return DaemonSpec(
            command=CommandSpec(argv=self.argv, env=self.env),
            target=request.target,
            fs_type="fuse.forging",
        )


class _NoHost:
    """Fails the test if the provider gets as far as running anything."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the host was asked to {name}")


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (("mounter", "-o", "a,\x00dev"), {}),
        (("mounter", "src\nx", "/t"), {}),
        (("mounter", "-o", "ro,,suid"), {}),
        (("mounter", "-o", "ro,"), {}),
        (("mounter",), {"BAD NAME": "x"}),
        (("mounter",), {"A=B": "x"}),
        (("mounter",), {"OK": "x\x00y"}),
    ],
)
async def test_base_refuses_commands_no_provider_may_run(
    argv: tuple[str, ...], env: dict[str, str]
) -> None:
    provider = _Forging(argv, env)
    request = MountRequest(
        name="ns/forged",
        target=PurePosixPath("/xvols/f"),
        read_only=False,
        config={},
        credentials=S3.parse_credentials({}),
        work_dir=PurePosixPath("/run/dynvol/f"),
    )
    with pytest.raises(MountFailed) as info:
        await provider.mount(request, _NoHost())  # type: ignore[arg-type]
    assert info.value.reason == Reason.INVALID_CONFIG
    assert not info.value.retryable
    for value in env.values():
        assert value not in info.value.message


def test_command_check_accepts_what_the_builtins_build() -> None:
    config = S3.parse_config({"bucket": "data", "endpoint": "http://127.0.0.1:9000"}, parameters={})
    spec = S3.daemon_spec(_request(S3, config, read_only=True, keys=KEYS))
    assert check_command_spec(spec.command) == []
    assert check_command_spec(CommandSpec(argv=("m", "-o", "a,,b"))) != []
