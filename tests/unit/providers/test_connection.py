"""Credentials go only where the class allows: each provider against spec.connection."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynvol_core.errors import InvalidObject
from dynvol_core.models import ConnectionPolicy
from dynvol_core.validation import HostKind, check_hostname, classify_host, host_matches
from dynvol_providers.base import parse_provider_config
from dynvol_providers.builtin.nfs import NfsProvider
from dynvol_providers.builtin.rclone import PARAM_ALLOWED_OPTIONS, RcloneProvider
from dynvol_providers.builtin.s3 import S3Provider

S3 = S3Provider()
NFS = NfsProvider()
RCLONE = RcloneProvider()
STRICT = ConnectionPolicy()
LOOPBACK = ConnectionPolicy(allow_loopback=True)


def refused(provider: Any, values: Mapping[str, Any], policy: ConnectionPolicy, **kw: Any) -> str:
    """The message of the one error naming a field; fails unless the claim is refused."""
    with pytest.raises(InvalidObject) as info:
        provider.parse_config(values, parameters=kw.get("parameters", {}), connection=policy)
    return str(info.value)


# --------------------------------------------------------------------------- s3


@pytest.mark.parametrize(
    ("endpoint", "flag"),
    [
        ("http://127.0.0.1:9000", "allowLoopback"),
        ("http://127.9.9.9", "allowLoopback"),
        ("http://[::1]:9000", "allowLoopback"),
        ("http://[::ffff:127.0.0.1]:9000", "allowLoopback"),
        ("http://[::ffff:7f00:1]", "allowLoopback"),
        ("http://[64:ff9b::7f00:1]", "allowLoopback"),
        ("http://0.0.0.0:9000", "allowLoopback"),
        ("http://localhost:9000", "allowLoopback"),
        ("http://LocalHost", "allowLoopback"),
        ("http://x.localhost", "allowLoopback"),
        ("http://169.254.169.254", "allowLinkLocal"),
        ("http://169.254.1.1", "allowLinkLocal"),
        ("http://[fe80::1]", "allowLinkLocal"),
        ("http://[fd00:ec2::254]", "allowLinkLocal"),
        ("http://[::ffff:169.254.169.254]", "allowLinkLocal"),
        ("http://100.100.100.200", "allowLinkLocal"),
        ("http://metadata.google.internal", "allowLinkLocal"),
        ("http://metadata", "allowLinkLocal"),
        ("http://minio", "allowClusterLocal"),
        ("http://minio.dynvol-system.svc", "allowClusterLocal"),
        ("http://minio.dynvol-system.svc.cluster.local:9000", "allowClusterLocal"),
        ("http://10.96.0.10", "allowPrivateNetworks"),
        ("http://192.168.1.5", "allowPrivateNetworks"),
        ("http://[fd12::5]", "allowPrivateNetworks"),
        ("http://nas.internal", "allowPrivateNetworks"),
    ],
)
def test_s3_endpoint_needs_the_class_flag(endpoint: str, flag: str) -> None:
    values = {"bucket": "data", "endpoint": endpoint}
    message = refused(S3, values, STRICT)
    assert "endpoint" in message
    assert flag in message
    snake = {"allowLoopback": "allow_loopback", "allowLinkLocal": "allow_link_local",
             "allowClusterLocal": "allow_cluster_local",
             "allowPrivateNetworks": "allow_private_networks"}[flag]  # fmt: skip
    allowed = ConnectionPolicy(**{snake: True})
    assert S3.parse_config(values, parameters={}, connection=allowed).endpoint == endpoint
    # Allowing another kind does not help.
    others = [f for f in ("allow_loopback", "allow_link_local", "allow_cluster_local",
                          "allow_private_networks") if f != snake]  # fmt: skip
    refused(S3, values, ConnectionPolicy(**dict.fromkeys(others, True)))


@pytest.mark.parametrize(
    "endpoint",
    ["http://2130706433", "http://0x7f.1", "http://0177.0.0.1", "http://127.1", "http://[fe80::1%25eth0]",
     "http://224.0.0.1", "http://[::127.0.0.1]", "http://255.255.255.255"],
)  # fmt: skip
def test_s3_endpoint_forms_refused_whatever_the_class_allows(endpoint: str) -> None:
    message = refused(S3, {"bucket": "data", "endpoint": endpoint}, ConnectionPolicy.permissive())
    assert "endpoint" in message


def test_public_endpoints_and_the_aws_default_pass_a_strict_class() -> None:
    assert S3.parse_config({"bucket": "data"}, parameters={}, connection=STRICT).endpoint == (
        "https://s3.amazonaws.com"
    )
    config = S3.parse_config(
        {"bucket": "data", "endpoint": "https://s3.example.com/base"},
        parameters={},
        connection=STRICT,
    )
    assert config.endpoint == "https://s3.example.com/base"


def test_without_a_class_only_the_syntax_is_checked() -> None:
    # Admission of a claim that pins no class: the class is not known yet; the DMP checks.
    config = S3.parse_config({"bucket": "data", "endpoint": "http://127.0.0.1:9000"}, parameters={})
    assert config.endpoint == "http://127.0.0.1:9000"


def test_s3_pinned_endpoint_and_region() -> None:
    policy = ConnectionPolicy(
        pinned={"endpoint": "https://s3.eu.example.com/", "region": "eu-west-1"}
    )
    config = S3.parse_config({"bucket": "data"}, parameters={}, connection=policy)
    assert (config.endpoint, config.region, config.path_style) == (
        "https://s3.eu.example.com",
        "eu-west-1",
        True,
    )
    same = {"bucket": "data", "endpoint": "https://s3.eu.example.com", "region": "eu-west-1"}
    assert S3.parse_config(same, parameters={}, connection=policy) == config
    message = refused(S3, {"bucket": "data", "endpoint": "https://evil.example.net"}, policy)
    assert "endpoint" in message
    assert "pins endpoint" in message
    message = refused(S3, {"bucket": "data", "region": "us-east-1"}, policy)
    assert "region" in message
    assert "pins region" in message


def test_a_pinned_endpoint_is_trusted_even_on_loopback() -> None:
    policy = ConnectionPolicy(pinned={"endpoint": "http://127.0.0.1:9000"})
    config = S3.parse_config({"bucket": "data"}, parameters={}, connection=policy)
    assert config.endpoint == "http://127.0.0.1:9000"


def test_s3_unknown_or_invalid_pins_are_class_errors() -> None:
    with pytest.raises(InvalidObject) as info:
        S3.parse_config(
            {"bucket": "data"}, parameters={}, connection=ConnectionPolicy(pinned={"server": "x"})
        )
    assert info.value.paths == ("connection.pinned[server]",)
    with pytest.raises(InvalidObject) as info:
        S3.parse_config(
            {"bucket": "data"},
            parameters={},
            connection=ConnectionPolicy(pinned={"endpoint": "http://h/x,dev"}),
        )
    assert info.value.paths == ("connection.pinned[endpoint]",)


def test_s3_allowed_hosts() -> None:
    policy = ConnectionPolicy(allowed_hosts=("*.example.com", "203.0.113.0/24"))
    for endpoint in ("https://s3.example.com", "https://a.b.example.com:8443"):
        S3.parse_config({"bucket": "data", "endpoint": endpoint}, parameters={}, connection=policy)
    for endpoint in (
        "https://example.com",
        "https://s3.example.com.evil.net",
        "https://s3.evil.com",
    ):
        message = refused(S3, {"bucket": "data", "endpoint": endpoint}, policy)
        assert "allowedHosts" in message
    # The AWS default is a host like any other.
    assert "allowedHosts" in refused(S3, {"bucket": "data"}, policy)
    # The address-kind flags still apply to listed hosts.
    listed = ConnectionPolicy(allowed_hosts=("127.0.0.1",))
    assert "allowLoopback" in refused(
        S3, {"bucket": "data", "endpoint": "http://127.0.0.1"}, listed
    )


# --------------------------------------------------------------------------- nfs


def test_nfs_server_is_held_to_the_class() -> None:
    for server, flag in (
        ("169.254.169.254", "allowLinkLocal"),
        ("127.0.0.1", "allowLoopback"),
        ("::ffff:127.0.0.1", "allowLoopback"),
        ("10.0.0.2", "allowPrivateNetworks"),
        ("nfs", "allowClusterLocal"),
    ):
        message = refused(NFS, {"server": server, "path": "/exports"}, STRICT)
        assert "server" in message, message
        assert flag in message, message
    assert "dotted quad" in refused(NFS, {"server": "2130706433", "path": "/x"}, STRICT)
    NFS.parse_config({"server": "nfs.example.com", "path": "/x"}, parameters={}, connection=STRICT)


def test_nfs_pinned_server_and_export_prefix() -> None:
    policy = ConnectionPolicy(pinned={"server": "10.0.0.2", "exportPrefix": "/exports/team-a/"})
    config = NFS.parse_config({"path": "/exports/team-a/x"}, parameters={}, connection=policy)
    assert (config.server, config.path) == ("10.0.0.2", "/exports/team-a/x")
    NFS.parse_config(
        {"server": "10.0.0.2", "path": "/exports/team-a"}, parameters={}, connection=policy
    )
    assert "pins server" in refused(NFS, {"server": "10.0.0.3", "path": "/exports/team-a"}, policy)
    for path in ("/exports/team-b", "/exports/team-a-evil", "/exports", "/exports//team-b/./x"):
        message = refused(NFS, {"path": path}, policy)
        assert "outside '/exports/team-a'" in message, message


# --------------------------------------------------------------------------- rclone


def test_rclone_host_options_are_held_to_the_class() -> None:
    for key, value, flag in (
        ("url", "http://127.0.0.1:8080", "allowLoopback"),
        ("url", "http://[::ffff:169.254.169.254]/", "allowLinkLocal"),
        ("host", "169.254.169.254", "allowLinkLocal"),
        ("host", "minio.team.svc:22", "allowClusterLocal"),
        ("endpoint", "https://10.1.2.3", "allowPrivateNetworks"),
        ("sts_endpoint", "http://metadata.google.internal/token", "allowLinkLocal"),
        ("socks_proxy", "localhost:1080", "allowLoopback"),
    ):
        values = {"type": "webdav", "parameters": {key: value}}
        message = refused(RCLONE, values, STRICT)
        assert f"parameters[{key}]" in message, message
        assert flag in message, message
    for value in ("http://user:pw@dav.example.com", "http://dav.example.com:x", "", "http://"):
        refused(RCLONE, {"type": "webdav", "parameters": {"url": value}}, STRICT)
    config = RCLONE.parse_config(
        {"type": "sftp", "parameters": {"host": "sftp.example.com", "port": 22}},
        parameters={},
        connection=STRICT,
    )
    assert dict(config.options) == {"host": "sftp.example.com", "port": "22"}


def test_rclone_pins_type_and_options() -> None:
    policy = ConnectionPolicy(pinned={"type": "webdav", "url": "http://127.0.0.1:8080"})
    config = RCLONE.parse_config(
        {"parameters": {"vendor": "other"}}, parameters={}, connection=policy
    )
    assert config.type == "webdav"
    assert dict(config.options) == {"vendor": "other", "url": "http://127.0.0.1:8080"}
    assert "pins type" in refused(RCLONE, {"type": "sftp"}, policy)
    message = refused(RCLONE, {"parameters": {"url": "https://evil.example.net"}}, policy)
    assert "parameters[url]" in message
    assert "pins url" in message


def test_rclone_allowed_hosts_need_a_host_option() -> None:
    policy = ConnectionPolicy(allowed_hosts=("dav.example.com",))
    assert "allowedHosts" in refused(RCLONE, {"type": "webdav"}, policy)
    assert "allowedHosts" in refused(
        RCLONE, {"type": "webdav", "parameters": {"url": "https://dav.example.org"}}, policy
    )
    RCLONE.parse_config(
        {"type": "webdav", "parameters": {"url": "https://dav.example.com/x"}},
        parameters={},
        connection=policy,
    )


@pytest.mark.parametrize(
    "option",
    ["key_file", "known_hosts_file", "pubkey_file", "service_account_file", "ssh",
     "bearer_token_command", "env_auth", "use_msi", "msi_client_id", "ca_cert", "client_cert",
     "unix_socket", "shared_credentials_file", "md5sum_command", "ask_password", "profile"],
)  # fmt: skip
def test_rclone_options_that_touch_the_node_need_the_class(option: str) -> None:
    values = {"type": "sftp", "parameters": {option: "/etc/shadow"}}
    with pytest.raises(InvalidObject) as info:
        RCLONE.parse_config(values, parameters={})
    assert info.value.paths == (f"parameters[{option}]",)
    assert PARAM_ALLOWED_OPTIONS in str(info.value)
    config = RCLONE.parse_config(values, parameters={PARAM_ALLOWED_OPTIONS: f"x, {option}"})
    assert dict(config.options) == {option: "/etc/shadow"}


def test_rclone_allowed_options_parameter_is_checked() -> None:
    with pytest.raises(InvalidObject) as info:
        RCLONE.parse_config(
            {"type": "sftp"}, parameters={PARAM_ALLOWED_OPTIONS: "key_file,Bad-Name"}
        )
    assert info.value.paths == (f"parameters.{PARAM_ALLOWED_OPTIONS}",)


# --------------------------------------------------------------------------- third parties


class _LegacyProvider:
    """A provider written before parse_config took ``connection``."""

    name = "legacy"

    def parse_config(self, values: Mapping[str, Any], *, parameters: Mapping[str, str]) -> Any:
        return ("parsed", tuple(values), tuple(parameters))


def test_providers_without_the_keyword_are_called_without_it() -> None:
    legacy: Any = _LegacyProvider()
    assert parse_provider_config(legacy, {"a": 1}, parameters={"p": "v"}, connection=STRICT) == (
        "parsed",
        ("a",),
        ("p",),
    )
    with pytest.raises(InvalidObject):
        parse_provider_config(
            S3, {"bucket": "data", "endpoint": "http://127.0.0.1"}, parameters={}, connection=STRICT
        )


# --------------------------------------------------------------------------- properties

_OCTET = st.integers(min_value=0, max_value=255)
_IPV4 = st.builds(lambda *o: ".".join(map(str, o)), _OCTET, _OCTET, _OCTET, _OCTET)
_SPECIAL = st.sampled_from(
    ["127.0.0.1", "169.254.169.254", "10.0.0.1", "0.0.0.0", "100.100.100.200", "192.168.1.1"]
)
_HOSTS = st.one_of(
    _IPV4,
    _SPECIAL,
    _SPECIAL.map(lambda a: f"[::ffff:{a}]"),
    _SPECIAL.map(lambda a: f"[64:ff9b::{a}]"),
    st.integers(min_value=0, max_value=2**32 - 1).map(str),
    st.sampled_from(["localhost", "metadata", "minio", "a.svc", "s3.example.com", "x.internal",
                     "[::1]", "[fe80::1]", "[fd00:ec2::254]", "[2001:db8::1]", "0x7f.1"]),
    st.text(alphabet="abc019.:-_[]%x", min_size=1, max_size=20),
)  # fmt: skip


def _bare(host: str) -> str:
    return host[1:-1] if host.startswith("[") else host


def _named_host(authority: str) -> str:
    """The host that ``host[:port]`` names, as URL parsers read it (the generated text may
    itself hold a ':', making its tail a port: ``0._:1`` is host ``0._``, port 1)."""
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    return authority.partition(":")[0]


@settings(max_examples=300, deadline=None)
@given(host=_HOSTS, port=st.sampled_from(["", ":9000"]))
def test_a_strict_class_only_ever_sends_credentials_to_public_hosts(host: str, port: str) -> None:
    url_host = _named_host(f"{host}{port}")
    for provider, values, field, named in (
        (S3, {"bucket": "data", "endpoint": f"http://{host}{port}"}, "endpoint", url_host),
        (NFS, {"server": _bare(host), "path": "/x"}, "server", _bare(host)),
        (
            RCLONE,
            {"type": "webdav", "parameters": {"url": f"https://{host}{port}/d"}},
            "url",
            url_host,
        ),
        (RCLONE, {"type": "sftp", "parameters": {"host": host}}, "host", _named_host(host)),
    ):
        try:
            provider.parse_config(values, parameters={}, connection=STRICT)
        except InvalidObject:
            continue
        assert check_hostname(named, "h") == [], (provider.name, field, host)
        assert classify_host(named) is HostKind.PUBLIC, (provider.name, field, host)


@settings(max_examples=200, deadline=None)
@given(host=_HOSTS)
def test_allowed_hosts_bound_every_accepted_host(host: str) -> None:
    policy = ConnectionPolicy(
        allowed_hosts=("*.example.com", "10.0.0.0/8"),
        allow_loopback=True,
        allow_private_networks=True,
        allow_cluster_local=True,
        allow_link_local=True,
    )
    try:
        S3.parse_config(
            {"bucket": "data", "endpoint": f"http://{host}"}, parameters={}, connection=policy
        )
    except InvalidObject:
        return
    assert host_matches(_named_host(host), policy.allowed_hosts), host
