"""Mountpoints, bucket names, endpoints and the other user-supplied values; quantities."""

from __future__ import annotations

import ipaddress
import posixpath
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynvol_core.errors import InvalidObject
from dynvol_core.quantities import parse_quantity
from dynvol_core.validation import (
    MAX_MOUNTPOINT_BYTES,
    HostKind,
    check_bucket_name,
    check_dns1123_label,
    check_dns1123_subdomain,
    check_endpoint,
    check_host_pattern,
    check_hostname,
    check_label_value,
    check_nfs_path,
    check_nfs_server,
    check_qualified_name,
    check_rclone_type,
    check_s3_prefix,
    classify_host,
    host_matches,
    normalize_mountpoint,
    split_endpoint,
)

# ----------------------------------------------------------------------------- mountpoints


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/data", "/data"),
        ("/data/", "/data"),
        ("//data//x", "/data/x"),
        ("/./data/./x/.", "/data/x"),
        ("/a b/ü", "/a b/ü"),
        ("/...", "/..."),
        ("/..data/x..", "/..data/x.."),
    ],
)
def test_mountpoint_normal_form(raw: str, normal: str) -> None:
    assert normalize_mountpoint(raw) == normal


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("data", "absolute"),
        ("", "absolute"),
        ("/", "must not be '/'"),
        ("//./", "must not be '/'"),
        ("/..", "'..'"),
        ("/data/../x", "'..'"),
        ("/a/b/../../..", "'..'"),
        ("/da\x00ta", "NUL"),
        ("/da\tta", "control"),
        ("/da\x85ta", "control"),
        ("/" + "x" * 256, "255 bytes"),
        ("/" + "é" * 128, "255 bytes"),  # 256 bytes in UTF-8
        ("/" + "/".join(["y" * 200] * 6), f"{MAX_MOUNTPOINT_BYTES} bytes"),
    ],
)
def test_mountpoint_rejected(raw: str, fragment: str) -> None:
    with pytest.raises(InvalidObject) as info:
        normalize_mountpoint(raw, "spec.mountpoint")
    assert info.value.paths == ("spec.mountpoint",)
    assert fragment in str(info.value)


def test_mountpoint_must_be_string() -> None:
    with pytest.raises(InvalidObject, match="must be a string"):
        normalize_mountpoint(5)


_COMPONENT = st.sampled_from(["", ".", "..", "data", "a b", "ü", "...", "x.y", "-"])
_MOUNTPOINTS = st.lists(_COMPONENT, max_size=8).map(lambda parts: "/" + "/".join(parts)) | (
    st.text(alphabet="/.ab\x00", max_size=20)
)


def _accepted(raw: str) -> str | None:
    try:
        return normalize_mountpoint(raw)
    except InvalidObject:
        return None


@settings(max_examples=60, deadline=None)
@given(_MOUNTPOINTS)
def test_normal_mountpoints_are_fixed_points(raw: str) -> None:
    normal = _accepted(raw)
    if normal is not None:
        assert normalize_mountpoint(normal) == normal
        assert posixpath.normpath(normal) == normal


@settings(max_examples=60, deadline=None)
@given(_MOUNTPOINTS)
def test_normal_mountpoints_never_contain_dotdot_or_escape(raw: str) -> None:
    normal = _accepted(raw)
    if normal is None:
        return
    assert ".." not in normal.split("/")
    assert normal != "/"
    base = "/var/lib/dynamic/xvols/c/slot/pod"
    joined = posixpath.normpath(base + normal)
    assert joined.startswith(base + "/")


@settings(max_examples=50, deadline=None)
@given(_MOUNTPOINTS)
def test_raw_dotdot_is_always_rejected(raw: str) -> None:
    if ".." in raw.split("/") or "\x00" in raw:
        assert _accepted(raw) is None


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["a", "s3", "my-class", "a" * 63, "0abc"])
def test_dns1123_label_ok(name: str) -> None:
    assert check_dns1123_label(name, "p") == []


@pytest.mark.parametrize("name", ["", "A", "-a", "a-", "a.b", "a" * 64, "a_b"])
def test_dns1123_label_bad(name: str) -> None:
    assert check_dns1123_label(name, "p")[0].path == "p"


@pytest.mark.parametrize("name", ["a.b", "s3-sample", "x." * 100 + "y"])
def test_dns1123_subdomain_ok(name: str) -> None:
    assert check_dns1123_subdomain(name, "p") == []


@pytest.mark.parametrize("name", ["a..b", ".a", "a" * 254, "A.b"])
def test_dns1123_subdomain_bad(name: str) -> None:
    assert check_dns1123_subdomain(name, "p")


@pytest.mark.parametrize(
    "key", ["app", "app.kubernetes.io/name", "a_b.c-d", "example.com/" + "n" * 63]
)
def test_label_key_ok(key: str) -> None:
    assert check_qualified_name(key, "k") == []


@pytest.mark.parametrize(
    "key", ["", "/app", "a/b/c", "Example.com/app", "-app", "n" * 64, "bad key", "x/" + "n" * 64]
)
def test_label_key_bad(key: str) -> None:
    assert check_qualified_name(key, "k")


@pytest.mark.parametrize("value", ["", "v", "v1.2_3-x", "x" * 63])
def test_label_value_ok(value: str) -> None:
    assert check_label_value(value, "v") == []


@pytest.mark.parametrize("value", ["-v", "v-", "x" * 64, "a b", 3])
def test_label_value_bad(value: object) -> None:
    assert check_label_value(value, "v")


# ----------------------------------------------------------------------------- S3


@pytest.mark.parametrize(
    "bucket", ["ssat202410181", "my-s3-bucket", "abc", "a.b.c", "b" * 63, "1bucket", "192.168.1"]
)
def test_bucket_ok(bucket: str) -> None:
    assert check_bucket_name(bucket, "b") == []


@pytest.mark.parametrize(
    ("bucket", "fragment"),
    [
        ("ab", "3-63"),
        ("b" * 64, "3-63"),
        ("Bucket", "lowercase"),
        ("my_bucket", "lowercase"),
        ("-bucket", "start and end"),
        ("bucket.", "start and end"),
        ("my..bucket", "adjacent"),
        ("10.0.0.1", "IP address"),
        ("xn--abc", "xn--"),
        ("sthree-abc", "sthree-"),
        ("abc-s3alias", "-s3alias"),
        ("abc--ol-s3", "--ol-s3"),
    ],
)
def test_bucket_bad(bucket: str, fragment: str) -> None:
    errors = check_bucket_name(bucket, "spec.s3Config.bucket")
    assert [e.path for e in errors] == ["spec.s3Config.bucket"]
    assert fragment in errors[0].message


@pytest.mark.parametrize(
    "url",
    [
        "https://play.min.io",
        "http://my-s3-service.example.com",
        "http://127.0.0.1:9000",
        "http://[::1]:9000/",
        "https://s3.example.com/base/path",
        "http://minio.ns.svc.cluster.local:9000",
    ],
)
def test_endpoint_ok(url: str) -> None:
    assert check_endpoint(url, "e") == []


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://x.example.com", "http:// or https://"),
        ("s3.example.com", "http:// or https://"),
        ("HTTPS://x.example.com", "http:// or https://"),
        ("https://user:pw@x.example.com", "credentials"),
        ("https://user@x.example.com", "credentials"),
        ("https://x.example.com/?a=b", "query"),
        ("https://x.example.com/#frag", "query"),
        ("https:///bucket", "must name a host"),
        ("https://x.example.com:0", "port"),
        ("https://x.example.com:70000", "port"),
        ("https://x example.com", "spaces"),
        ("https://[zz::1]/", "IPv6"),
        ("https://" + "a" * 2048, "at most"),
        ("http://h:9000/x,use_cache=/tmp,dbglevel=info", "must have a path"),
        ("http://h/a;b", "must have a path"),
        ("http://h/a=b", "must have a path"),
        ("http://h/a\\,dev", "must have a path"),
        ("http://h/a'b", "must have a path"),
        ('http://h/a"b', "must have a path"),
        ("http://h/%zz", "must have a path"),
        ("http://h/@x", "must have a path"),
        ("http://h,dev/", "must name a host"),
        ("http://2130706433:9000", "dotted quad"),
        ("http://0x7f.1", "dotted quad"),
        ("http://0177.0.0.1", "dotted quad"),
        ("http://127.1", "dotted quad"),
        ("http://127.0.0.01", "dotted quad"),
        ("http://256.0.0.1", "dotted quad"),
        ("http://a.b.1", "dotted quad"),
        ("http://[fe80::1%25eth0]:9000", "zone"),
    ],
)
def test_endpoint_bad(url: str, fragment: str) -> None:
    errors = check_endpoint(url, "spec.s3Config.endpoint")
    assert errors
    assert fragment in errors[0].message


def test_endpoint_error_does_not_leak_more_than_the_value() -> None:
    (error,) = check_endpoint("https://k:s@h", "e")
    assert error.path == "e"


@pytest.mark.parametrize(
    ("prefix", "ok"),
    [("a/b", True), ("", True), ("/a", False), ("a/../b", False), ("a\x00", False)],
)
def test_s3_prefix(prefix: str, ok: bool) -> None:
    assert (check_s3_prefix(prefix, "p") == []) is ok


# ----------------------------------------------------------------------------- NFS, rclone


@pytest.mark.parametrize(
    ("server", "ok"),
    [
        ("nfs.example.com", True),
        ("10.0.0.2", True),
        ("fd00::2", True),
        ("NFS-1", True),
        ("nfs server", False),
        ("nfs_1", False),
        ("", False),
        ("-nfs", False),
        ("2130706433", False),
        ("0x7f000001", False),
        ("010.0.0.2", False),
        ("10.2", False),
        ("fe80::1%eth0", False),
    ],
)
def test_nfs_server(server: str, ok: bool) -> None:
    assert (check_nfs_server(server, "s") == []) is ok


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/", True),
        ("/exports/data", True),
        ("exports", False),
        ("/a/../b", False),
        ("/a\nb", False),
    ],
)
def test_nfs_path(path: str, ok: bool) -> None:
    assert (check_nfs_path(path, "p") == []) is ok


@pytest.mark.parametrize(
    ("kind", "ok"),
    [
        ("s3", True),
        ("sftp", True),
        ("webdav", True),
        ("local", False),
        ("alias", False),
        ("crypt", False),
        ("S3", False),
        ("web dav", False),
        ("", False),
        ("9p", False),
    ],
)
def test_rclone_type(kind: str, ok: bool) -> None:
    assert (check_rclone_type(kind, "t") == []) is ok


# ----------------------------------------------------------------------------- quantities


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("10m", Decimal("0.01")),
        ("0.5", Decimal("0.5")),
        ("1", Decimal(1)),
        ("50Mi", Decimal(50 * 1024**2)),
        ("1.5Gi", Decimal(3 * 1024**3 // 2)),
        ("1e3", Decimal(1000)),
        ("1E3", Decimal(1000)),
        ("2k", Decimal(2000)),
        ("1E", Decimal(10**18)),
        (".5", Decimal("0.5")),
        ("5.", Decimal(5)),
        ("100n", Decimal("0.0000001")),
        ("+1Ki", Decimal(1024)),
        ("-1", Decimal(-1)),
    ],
)
def test_quantity_values(text: str, value: Decimal) -> None:
    quantity = parse_quantity(text)
    assert quantity.value == value
    assert str(quantity) == text


@pytest.mark.parametrize(
    "text", ["", "ten", "1 Mi", "1MB", "1.2.3", "Mi", "1e", "--1", "1ki", "1e1000", "1" * 65]
)
def test_quantity_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="quantity"):
        parse_quantity(text)


def test_quantity_order_uses_value() -> None:
    assert parse_quantity("1Gi") == parse_quantity("1073741824")
    assert parse_quantity("500m") == parse_quantity("0.5")
    assert parse_quantity("10m") < parse_quantity("1")
    assert parse_quantity("50Mi") < parse_quantity("1Gi")
    assert parse_quantity("-1").is_negative


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["", "m", "k", "Ki", "Mi"]))
def test_quantity_integer_forms(number: int, suffix: str) -> None:
    scale = {"": 1, "m": Decimal("0.001"), "k": 1000, "Ki": 1024, "Mi": 1024**2}[suffix]
    assert parse_quantity(f"{number}{suffix}").value == number * scale


# ----------------------------------------------------------------------------- hosts


@pytest.mark.parametrize("port", ["\u00b2", "\u0661\u0662", "\uff18\uff10"])
def test_an_endpoint_port_of_non_ascii_digits_is_an_error_naming_the_field(port: str) -> None:
    # str.isdigit() accepts superscripts and other scripts' digits; int() does not take
    # all of them, and a port is ASCII digits only.
    errors = check_endpoint(f"http://a:{port}", "spec.s3Config.endpoint")
    assert [e.path for e in errors] == ["spec.s3Config.endpoint"]
    assert "port" in errors[0].message


def test_endpoints_with_escapes_and_ports_split() -> None:
    assert check_endpoint("https://s3.example.com/a%2Cb/~c", "e") == []
    parts = split_endpoint("https://S3.Example.com:8443/base")
    assert (parts.scheme, parts.host, parts.port, parts.path) == (
        "https",
        "s3.example.com",
        8443,
        "/base",
    )
    assert split_endpoint("http://[::1]/").host == "::1"
    with pytest.raises(ValueError, match="not a valid endpoint"):
        split_endpoint("http://h/x,dev")


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("s3.example.com", HostKind.PUBLIC),
        ("8.8.8.8", HostKind.PUBLIC),
        ("2001:4860::8888", HostKind.PUBLIC),
        ("127.0.0.1", HostKind.LOOPBACK),
        ("127.255.0.9", HostKind.LOOPBACK),
        ("0.0.0.0", HostKind.LOOPBACK),
        ("0.1.2.3", HostKind.LOOPBACK),
        ("::", HostKind.LOOPBACK),
        ("::1", HostKind.LOOPBACK),
        ("[::1]", HostKind.LOOPBACK),
        ("::ffff:127.0.0.1", HostKind.LOOPBACK),
        ("::ffff:7f00:1", HostKind.LOOPBACK),
        ("64:ff9b::127.0.0.1", HostKind.LOOPBACK),
        ("localhost", HostKind.LOOPBACK),
        ("LocalHost", HostKind.LOOPBACK),
        ("db.localhost", HostKind.LOOPBACK),
        ("ip6-localhost", HostKind.LOOPBACK),
        ("169.254.169.254", HostKind.LINK_LOCAL),
        ("169.254.0.1", HostKind.LINK_LOCAL),
        ("fe80::1", HostKind.LINK_LOCAL),
        ("febf::1", HostKind.LINK_LOCAL),
        ("fd00:ec2::254", HostKind.LINK_LOCAL),
        ("::ffff:169.254.169.254", HostKind.LINK_LOCAL),
        ("100.100.100.200", HostKind.LINK_LOCAL),
        ("metadata.google.internal", HostKind.LINK_LOCAL),
        ("Metadata.Google.Internal", HostKind.LINK_LOCAL),
        ("metadata", HostKind.LINK_LOCAL),
        ("instance-data", HostKind.LINK_LOCAL),
        ("minio", HostKind.CLUSTER_LOCAL),
        ("minio.team.svc", HostKind.CLUSTER_LOCAL),
        ("minio.team.svc.cluster.local", HostKind.CLUSTER_LOCAL),
        ("10.0.0.1", HostKind.PRIVATE),
        ("172.16.0.1", HostKind.PRIVATE),
        ("192.168.0.1", HostKind.PRIVATE),
        ("100.64.0.1", HostKind.PRIVATE),
        ("fd12:3456::1", HostKind.PRIVATE),
        ("::ffff:10.0.0.1", HostKind.PRIVATE),
        ("nas.internal", HostKind.PRIVATE),
        ("printer.local", HostKind.PRIVATE),
        ("224.0.0.1", HostKind.RESERVED),
        ("ff02::1", HostKind.RESERVED),
        ("255.255.255.255", HostKind.RESERVED),
        ("240.0.0.1", HostKind.RESERVED),
        ("::127.0.0.1", HostKind.RESERVED),
    ],
)
def test_host_kinds(host: str, kind: HostKind) -> None:
    assert check_hostname(host, "h") == []
    assert classify_host(host) is kind


@pytest.mark.parametrize(
    "host",
    ["2130706433", "0x7f000001", "0x7f.1", "0177.0.0.1", "127.1", "127.0.1", "017700000001",
     "1.2.3.04", "a.0x10", "fe80::1%eth0", "[fe80::1%25eth0]", "h,dev", "h\nx", "", "a" * 254],
)  # fmt: skip
def test_ambiguous_hosts_are_refused(host: str) -> None:
    (error,) = check_hostname(host, "spec.nfsConfig.server")
    assert error.path == "spec.nfsConfig.server"


_IPV4 = st.integers(min_value=0, max_value=2**32 - 1).map(ipaddress.IPv4Address)


@settings(max_examples=300, deadline=None)
@given(_IPV4)
def test_an_ipv4_address_is_one_kind_in_every_spelling(address: ipaddress.IPv4Address) -> None:
    kind = classify_host(str(address))
    for spelling in (f"::ffff:{address}", f"[::ffff:{address}]", f"64:ff9b::{address}"):
        assert check_hostname(spelling, "h") == []
        assert classify_host(spelling) is kind, spelling
    # Every other numeric spelling is refused outright, never classified.
    for spelling in (str(int(address)), hex(int(address)), f"0{oct(int(address))[2:]}"):
        if spelling != str(address):
            assert check_hostname(spelling, "h"), spelling
    parts = str(address).split(".")
    assert check_hostname(".".join(f"0{p}" if p != "0" else "00" for p in parts), "h")


@pytest.mark.parametrize(
    ("host", "patterns", "ok"),
    [
        ("s3.example.com", ["s3.example.com"], True),
        ("S3.Example.COM", ["s3.example.com"], True),
        ("a.s3.example.com", ["*.example.com"], True),
        ("example.com", ["*.example.com"], False),
        ("badexample.com", ["*.example.com"], False),
        ("s3.example.com.evil.net", ["*.example.com"], False),
        ("10.1.2.3", ["10.0.0.0/8"], True),
        ("11.1.2.3", ["10.0.0.0/8"], False),
        ("::ffff:10.1.2.3", ["10.0.0.0/8"], False),
        ("fd00::5", ["fd00::/64"], True),
        ("10.1.2.3", ["10.1.2.3"], True),
        ("10.1.2.3", ["*.1.2.3"], False),
        ("[::1]", ["::1"], True),
    ],
)
def test_host_matches(host: str, patterns: list[str], ok: bool) -> None:
    assert host_matches(host, patterns) is ok


@pytest.mark.parametrize(
    ("pattern", "ok"),
    [("s3.example.com", True), ("*.example.com", True), ("10.0.0.0/8", True), ("::1", True),
     ("10.0.0.0/33", False), ("*.10.0.0.1", False), ("a,b", False), ("2130706433", False)],
)  # fmt: skip
def test_host_patterns(pattern: str, ok: bool) -> None:
    assert (check_host_pattern(pattern, "p") == []) is ok
