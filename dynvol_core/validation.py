"""Validation of the user-supplied values dynvol acts on.

Every ``check_*`` function returns a list of :class:`~dynvol_core.errors.FieldError` (empty when
the value is fine), naming the field path it was given and saying what is allowed, so callers
can collect all problems of an object before reporting them. :func:`normalize_mountpoint` is
the one place a mountpoint becomes safe to join to a host path.

The same rules are written as CEL in the CRDs (manifests/base/crds); the API server rejects
most bad objects and this module is the second line for anything that reaches dynvol anyway
(an older CRD, a webhook-less cluster, a hand-edited DynamicVolumeMount).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable
from typing import Final

import attrs

from dynvol_core.errors import FieldError, InvalidObject

__all__ = [
    "MAX_MOUNTPOINT_BYTES",
    "MAX_PATH_COMPONENT_BYTES",
    "HostKind",
    "UrlParts",
    "check_bucket_name",
    "check_dns1123_label",
    "check_dns1123_subdomain",
    "check_endpoint",
    "check_host_pattern",
    "check_hostname",
    "check_label_value",
    "check_mountpoint",
    "check_nfs_path",
    "check_nfs_server",
    "check_qualified_name",
    "check_rclone_type",
    "check_s3_prefix",
    "classify_host",
    "has_control_chars",
    "host_matches",
    "normalize_mountpoint",
    "split_endpoint",
]

#: Upper bound of a mountpoint, in UTF-8 bytes, as written by the user (before normalising).
#: The host path it ends up under (``/var/lib/dynamic/xvols/<class>/<uuid>/<podUID>``, at most
#: ~330 bytes) plus kubelet's target directory must stay well inside PATH_MAX (4096).
MAX_MOUNTPOINT_BYTES: Final = 1024
#: NAME_MAX of Linux file systems.
MAX_PATH_COMPONENT_BYTES: Final = 255
#: Bound on URLs and other free text paths; long enough for any real endpoint.
MAX_URL_LENGTH: Final = 2048

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_HOSTNAME = re.compile(
    r"[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_BUCKET_CHARS = re.compile(r"[a-z0-9.-]+")
_IPV4_LIKE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")
# scheme://authority[path][?query][#fragment]; everything from '?' on is "rest".
_URL = re.compile(r"https?://(?P<authority>[^/?#]*)(?P<path>[^?#]*)(?P<rest>[?#].*)?", re.S)
#: The only characters an endpoint's path may hold: RFC 3986 unreserved characters, '/' and
#: percent-escapes. No ',' (s3fs and libfuse split -o values on it), no ';', '=', quotes or
#: backslashes (option-string and shell metacharacters), no '@' or ':' (authority lookalikes).
_URL_PATH = re.compile(r"(/([A-Za-z0-9._~-]|%[0-9A-Fa-f]{2})*)*")
_URL_HOST = re.compile(
    r"[A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?)*"
)
_RCLONE_TYPE = re.compile(r"[a-z][a-z0-9]{0,31}")

#: rclone backends a claim may not use: they reach the DMP's (privileged) file system, or wrap
#: another remote whose definition could do so.
RCLONE_FORBIDDEN_TYPES: Final = frozenset(
    {"local", "alias", "cache", "chunker", "combine", "compress", "crypt", "hasher", "union"}
)


def has_control_chars(value: str) -> bool:
    """Whether ``value`` contains NUL or another control character (C0, DEL or C1)."""
    return _CONTROL.search(value) is not None


def _not_string(path: str, value: object) -> list[FieldError]:
    return [FieldError(path, f"must be a string, not {type(value).__name__}")]


def check_dns1123_label(value: object, path: str) -> list[FieldError]:
    """An RFC 1123 label: at most 63 lowercase alphanumerics or '-', alphanumeric at both ends."""
    if not isinstance(value, str):
        return _not_string(path, value)
    if len(value) > 63 or not _DNS1123_LABEL.fullmatch(value):
        return [
            FieldError(
                path,
                f"{value!r} is not a DNS-1123 label: use at most 63 lowercase letters, digits "
                "or '-', starting and ending with a letter or digit",
            )
        ]
    return []


def check_dns1123_subdomain(value: object, path: str) -> list[FieldError]:
    """An RFC 1123 subdomain: at most 253 characters, dot-separated DNS-1123 labels."""
    if not isinstance(value, str):
        return _not_string(path, value)
    if len(value) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(value):
        return [
            FieldError(
                path,
                f"{value!r} is not a DNS-1123 subdomain: use at most 253 lowercase letters, "
                "digits, '-' or '.', starting and ending with a letter or digit",
            )
        ]
    return []


def check_qualified_name(value: object, path: str) -> list[FieldError]:
    """A label or annotation key: ``[prefix/]name``.

    The optional prefix is a DNS-1123 subdomain; the name is at most 63 alphanumerics, '-', '_'
    or '.', alphanumeric at both ends.
    """
    if not isinstance(value, str):
        return _not_string(path, value)
    prefix, slash, name = value.rpartition("/")
    errors: list[FieldError] = []
    if slash:
        if not prefix or "/" in prefix:
            return [FieldError(path, f"{value!r} is not a qualified name: at most one '/'")]
        errors += check_dns1123_subdomain(prefix, path)
    if not name or len(name) > 63 or not _QUALIFIED_NAME.fullmatch(name):
        errors.append(
            FieldError(
                path,
                f"{value!r} is not a valid label key: the name part must be 1-63 letters, "
                "digits, '-', '_' or '.', starting and ending with a letter or digit "
                "(with an optional DNS subdomain prefix and '/')",
            )
        )
    return errors


def check_label_value(value: object, path: str) -> list[FieldError]:
    """A label value: empty, or at most 63 alphanumerics, '-', '_' or '.', alphanumeric ends."""
    if not isinstance(value, str):
        return _not_string(path, value)
    if value and (len(value) > 63 or not _QUALIFIED_NAME.fullmatch(value)):
        return [
            FieldError(
                path,
                f"{value!r} is not a valid label value: use at most 63 letters, digits, '-', '_' "
                "or '.', starting and ending with a letter or digit",
            )
        ]
    return []


def _mountpoint_problem(value: str) -> str | None:
    """Why ``value`` is not an acceptable mountpoint, or None; see :func:`normalize_mountpoint`."""
    if has_control_chars(value):
        return "must not contain NUL or control characters"
    if len(value.encode("utf-8", "surrogatepass")) > MAX_MOUNTPOINT_BYTES:
        return f"must be at most {MAX_MOUNTPOINT_BYTES} bytes long"
    if not value.startswith("/"):
        return "must be an absolute path such as /data (it is relative to the pod's root path)"
    parts = value.split("/")
    if ".." in parts:
        return "must not contain '..' components"
    for part in parts:
        if len(part.encode("utf-8", "surrogatepass")) > MAX_PATH_COMPONENT_BYTES:
            return f"each path component must be at most {MAX_PATH_COMPONENT_BYTES} bytes"
    if all(p in ("", ".") for p in parts):
        return "must not be '/': name a directory below the pod's root path, such as /data"
    return None


def normalize_mountpoint(value: object, path: str = "spec.mountpoint") -> str:
    """Validate a claim's mountpoint and return its normal form.

    A mountpoint is relative to the pod's root path but written absolute-looking: it starts
    with '/', has no '..' component, is not '/' itself, has no NUL or control characters, is
    at most :data:`MAX_MOUNTPOINT_BYTES` bytes with components of at most
    :data:`MAX_PATH_COMPONENT_BYTES` bytes. The normal form collapses repeated slashes and
    '.' components and drops a trailing slash, so ``//data/./x/`` becomes ``/data/x``. The
    normal form is a fixed point and, joined below any base directory, stays below it.

    :raises InvalidObject: naming ``path``.
    """
    errors = check_mountpoint(value, path)
    if errors:
        raise InvalidObject(errors)
    assert isinstance(value, str)
    return "/" + "/".join(p for p in value.split("/") if p not in ("", "."))


def check_mountpoint(value: object, path: str) -> list[FieldError]:
    """The errors :func:`normalize_mountpoint` would raise, as a list."""
    if not isinstance(value, str):
        return _not_string(path, value)
    problem = _mountpoint_problem(value)
    return [FieldError(path, f"{value!r} {problem}")] if problem else []


def check_bucket_name(value: object, path: str) -> list[FieldError]:
    """An S3 bucket name that every S3 implementation and virtual-host addressing accept.

    3-63 characters of lowercase letters, digits, '.' and '-'; a letter or digit at both ends;
    no '..'; not shaped like an IPv4 address; not starting with 'xn--' or 'sthree-'; not ending
    with '-s3alias' or '--ol-s3' (names AWS reserves).
    """
    if not isinstance(value, str):
        return _not_string(path, value)
    problem = None
    if not 3 <= len(value) <= 63:
        problem = "must be 3-63 characters long"
    elif not _BUCKET_CHARS.fullmatch(value):
        problem = "may contain only lowercase letters, digits, '.' and '-'"
    elif not (value[0].isalnum() and value[-1].isalnum()):
        problem = "must start and end with a lowercase letter or digit"
    elif ".." in value:
        problem = "must not contain two adjacent periods"
    elif _IPV4_LIKE.fullmatch(value):
        problem = "must not be formatted as an IP address"
    elif value.startswith(("xn--", "sthree-")):
        problem = "must not start with the reserved prefixes 'xn--' or 'sthree-'"
    elif value.endswith(("-s3alias", "--ol-s3")):
        problem = "must not end with the reserved suffixes '-s3alias' or '--ol-s3'"
    if problem is None:
        return []
    return [FieldError(path, f"bucket name {value!r} {problem}")]


def check_s3_prefix(value: object, path: str) -> list[FieldError]:
    """A key prefix inside a bucket: relative ('a/b'), no '..' components, no control chars."""
    if not isinstance(value, str):
        return _not_string(path, value)
    if has_control_chars(value) or len(value) > MAX_MOUNTPOINT_BYTES:
        problem = f"must be at most {MAX_MOUNTPOINT_BYTES} characters without control characters"
    elif value.startswith("/"):
        problem = "must be relative to the bucket (no leading '/')"
    elif ".." in value.split("/"):
        problem = "must not contain '..' components"
    else:
        return []
    return [FieldError(path, f"prefix {value!r} {problem}")]


def check_endpoint(value: object, path: str) -> list[FieldError]:
    """An http(s) endpoint URL with a host and no credentials, query or fragment.

    Credentials belong in the StorageProviderClass's Secret, never in a claim, where every
    reader of the namespace (and of the DynamicVolumeMounts) would see them.
    """
    if not isinstance(value, str):
        return _not_string(path, value)
    problem = None
    match = _URL.fullmatch(value)
    if len(value) > MAX_URL_LENGTH or has_control_chars(value) or any(c.isspace() for c in value):
        problem = f"must be at most {MAX_URL_LENGTH} characters, without spaces or control chars"
    elif not value.startswith(("http://", "https://")) or match is None:
        problem = "must be an http:// or https:// URL"
    elif "@" in match["authority"]:
        problem = (
            "must not contain credentials (user:password@); put them in the Secret of "
            "the StorageProviderClass"
        )
    elif match["rest"]:
        problem = "must not have a query string or fragment"
    elif not _URL_PATH.fullmatch(match["path"]):
        problem = (
            "must have a path of letters, digits, '/', '-', '.', '_', '~' and %-escapes only "
            "(no ',', '=', ';', quotes or backslashes, which a mounter could read as options)"
        )
    else:
        problem = _authority_problem(match["authority"])
    if problem is None:
        return []
    return [FieldError(path, f"endpoint {value!r} {problem}")]


def _authority_problem(authority: str) -> str | None:
    """What is wrong with the ``host[:port]`` part of an endpoint URL, if anything."""
    if authority.startswith("["):
        host, _, after = authority[1:].partition("]")
        if after and not after.startswith(":"):
            return "must name a host: junk after the bracketed IPv6 address"
        colon, port = after[:1], after[1:]
        if "%" in host:
            return "must name a host: IPv6 zone identifiers ('%') are not allowed"
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return "must name a host: the bracketed IPv6 address is invalid"
    else:
        host, colon, port = authority.partition(":")
        if not host:
            return "must name a host, e.g. https://s3.example.com"
        if len(host) > 253 or not _URL_HOST.fullmatch(host):
            return "must name a host: letters, digits, '-', '_' and '.' or an IP address"
        numeric = _numeric_host_problem(host)
        if numeric:
            return numeric
    if colon and not port:
        return "must give a port after ':' or leave the ':' out"
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return "must have a port between 1 and 65535"
    return None


def check_nfs_server(value: object, path: str) -> list[FieldError]:
    """An NFS server: a host name (RFC 1123) or an IPv4/IPv6 address (IPv6 without brackets)."""
    if not isinstance(value, str):
        return _not_string(path, value)
    if "%" in value:
        return [FieldError(path, f"server {value!r} must not have an IPv6 zone identifier")]
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return []
    if len(value) <= 253 and _HOSTNAME.fullmatch(value):
        numeric = _numeric_host_problem(value)
        return [FieldError(path, f"server {value!r} {numeric}")] if numeric else []
    return [
        FieldError(
            path,
            f"server {value!r} must be a host name (letters, digits, '-' and '.') or an IP address",
        )
    ]


def check_nfs_path(value: object, path: str) -> list[FieldError]:
    """An exported path on the NFS server: absolute, no '..', no control characters."""
    if not isinstance(value, str):
        return _not_string(path, value)
    if has_control_chars(value) or len(value.encode("utf-8", "surrogatepass")) > 1024:
        problem = "must be at most 1024 bytes without control characters"
    elif not value.startswith("/"):
        problem = "must be an absolute path on the server, such as /exports/data"
    elif ".." in value.split("/"):
        problem = "must not contain '..' components"
    else:
        return []
    return [FieldError(path, f"export path {value!r} {problem}")]


def check_rclone_type(value: object, path: str) -> list[FieldError]:
    """An rclone backend name (``s3``, ``sftp``, ``webdav``...) a claim may use.

    Backends that reach the local file system or wrap other remotes are refused (see
    :data:`RCLONE_FORBIDDEN_TYPES`).
    """
    if not isinstance(value, str):
        return _not_string(path, value)
    if not _RCLONE_TYPE.fullmatch(value):
        return [
            FieldError(
                path,
                f"rclone backend type {value!r} must be 1-32 lowercase letters or digits, "
                "starting with a letter (e.g. s3, sftp, webdav)",
            )
        ]
    if value in RCLONE_FORBIDDEN_TYPES:
        return [
            FieldError(
                path,
                f"rclone backend type {value!r} is not allowed: it reaches the node's file "
                "system or wraps another remote; use a storage backend such as s3, sftp or "
                "webdav",
            )
        ]
    return []


# --------------------------------------------------------------------------- where a host is

#: A last label made only of digits, or a 0x hex number, makes a URL host an IPv4 address
#: for browsers and curl (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``).
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")
_CANONICAL_IPV4 = re.compile(r"(0|[1-9][0-9]{0,2})(\.(0|[1-9][0-9]{0,2})){3}")


def _numeric_host_problem(host: str) -> str | None:
    """Why an IPv4-looking host is refused: only the canonical dotted quad is accepted.

    Clients disagree on the other forms (curl reads ``2130706433`` as 127.0.0.1, Go resolves
    it as a name), so a checker cannot know where they lead: refusing them is the only safe
    reading.
    """
    last = host.rstrip(".").rpartition(".")[2]
    if not _NUMERIC_LABEL.fullmatch(last):
        return None
    if _CANONICAL_IPV4.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            pass
        else:
            return None
    return (
        "must write an IP address as a plain dotted quad such as 192.0.2.10 (decimal, octal, "
        "hexadecimal and shortened IPv4 forms are refused)"
    )


class HostKind(enum.StrEnum):
    """Where a host name or address leads, as far as can be told without DNS."""

    PUBLIC = "public"
    #: 127.0.0.0/8, ::1, 0.0.0.0 and :: (Linux connects those to the local host), localhost.
    LOOPBACK = "loopback"
    #: 169.254.0.0/16, fe80::/10 and the cloud metadata services (fd00:ec2::254,
    #: 100.100.100.200, metadata.google.internal, ...): credentials sent there leak.
    LINK_LOCAL = "link-local"
    #: RFC 1918, unique-local (fc00::/7) and shared (100.64.0.0/10) addresses, and names
    #: under private-use suffixes (.internal, .local, .lan, .home.arpa, ...).
    PRIVATE = "private"
    #: Names that resolve inside the cluster: single labels (search domains), *.svc,
    #: *.cluster.local.
    CLUSTER_LOCAL = "cluster-local"
    #: Multicast, broadcast and reserved addresses: never a storage server.
    RESERVED = "reserved"


_METADATA_ADDRESSES: Final = frozenset(
    ipaddress.ip_address(a)
    for a in ("fd00:ec2::254", "100.100.100.200", "169.254.169.254", "169.254.170.2")
)
_METADATA_NAMES: Final = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.internal",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.tencentyun.com",
        "metadata.platformequinix.com",
    }
)
_LOOPBACK_NAMES: Final = frozenset(
    {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", "loopback"}
)
_CLUSTER_SUFFIXES: Final = (".svc", ".cluster.local", ".svc.cluster.local")
_PRIVATE_SUFFIXES: Final = (
    ".internal", ".local", ".localdomain", ".lan", ".home.arpa", ".intranet", ".corp",
    ".home", ".private",
)  # fmt: skip
_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries to the same host (mapped, NAT64)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _address_kind(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> HostKind:
    if address in _METADATA_ADDRESSES:
        return HostKind.LINK_LOCAL
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return _address_kind(embedded)
    if (
        address.is_loopback
        or address.is_unspecified
        or address in ipaddress.ip_network("0.0.0.0/8")
    ):
        return HostKind.LOOPBACK
    if address.is_link_local:
        return HostKind.LINK_LOCAL
    if address.is_multicast or (
        isinstance(address, ipaddress.IPv4Address)
        and (address.is_reserved or address == ipaddress.IPv4Address("255.255.255.255"))
    ):
        return HostKind.RESERVED
    if isinstance(address, ipaddress.IPv6Address) and address.is_reserved:
        # ::/8 holds the deprecated IPv4-compatible form (::127.0.0.1) among others.
        return HostKind.RESERVED
    if (
        address.is_private
        or address in _SHARED_ADDRESS_SPACE
        or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local)
    ):
        return HostKind.PRIVATE
    return HostKind.PUBLIC


def _parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if "%" in text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def classify_host(host: str) -> HostKind:
    """Where ``host`` (a name, an IP literal, or a bracketed IPv6 literal) leads.

    Names are not resolved (no I/O here): a public name that resolves to a private address
    is PUBLIC. Call only on hosts that passed :func:`check_hostname`.
    """
    address = _parse_ip(host)
    if address is not None:
        return _address_kind(address)
    name = host.lower().rstrip(".")
    if name in _METADATA_NAMES:
        return HostKind.LINK_LOCAL
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return HostKind.LOOPBACK
    if "." not in name or name.endswith(_CLUSTER_SUFFIXES):
        return HostKind.CLUSTER_LOCAL
    if name.endswith(_PRIVATE_SUFFIXES):
        return HostKind.PRIVATE
    return HostKind.PUBLIC


def check_hostname(value: object, path: str) -> list[FieldError]:
    """A host: a DNS name, a dotted-quad IPv4 address or an IPv6 address (bracketed or not).

    Numeric forms other than the dotted quad and IPv6 zone identifiers are refused, so the
    host means the same thing to this check and to every client.
    """
    if not isinstance(value, str):
        return _not_string(path, value)
    if _parse_ip(value) is not None:
        return []
    if "%" in value:
        return [FieldError(path, f"host {value!r} must not have an IPv6 zone identifier")]
    if len(value) > 253 or not _URL_HOST.fullmatch(value):
        return [
            FieldError(
                path,
                f"host {value!r} must be a host name (letters, digits, '-', '_' and '.') or "
                "an IP address",
            )
        ]
    numeric = _numeric_host_problem(value)
    return [FieldError(path, f"host {value!r} {numeric}")] if numeric else []


@attrs.frozen(kw_only=True)
class UrlParts:
    """An endpoint URL that passed :func:`check_endpoint`, taken apart."""

    scheme: str
    #: Without brackets for IPv6, lower-cased.
    host: str
    port: int | None
    path: str


def split_endpoint(value: str) -> UrlParts:
    """Take apart an endpoint URL; :raises ValueError: if :func:`check_endpoint` refuses it."""
    if check_endpoint(value, "endpoint"):
        raise ValueError(f"not a valid endpoint URL: {value!r}")
    match = _URL.fullmatch(value)
    assert match is not None
    authority = match["authority"]
    if authority.startswith("["):
        host, _, after = authority[1:].partition("]")
        port = after[1:]
    else:
        host, _, port = authority.partition(":")
    return UrlParts(
        scheme=value.split(":", 1)[0],
        host=host.lower(),
        port=int(port) if port else None,
        path=match["path"],
    )


def check_host_pattern(value: object, path: str) -> list[FieldError]:
    """An entry of a class's ``allowedHosts``: a host, ``*.domain``, or an address/CIDR."""
    if not isinstance(value, str):
        return _not_string(path, value)
    if "/" in value:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return [FieldError(path, f"{value!r} is not a valid CIDR block such as 10.0.0.0/8")]
        return []
    host = value[2:] if value.startswith("*.") else value
    if value.startswith("*.") and _parse_ip(host) is not None:
        return [FieldError(path, f"{value!r}: '*.' goes with a domain name, not an address")]
    return check_hostname(host, path)


def host_matches(host: str, patterns: Iterable[str]) -> bool:
    """Whether ``host`` is one of ``patterns`` (see :func:`check_host_pattern`).

    ``*.example.com`` matches every name below example.com but not example.com itself; a
    CIDR block matches the addresses in it. Names compare case-insensitively, without a
    trailing dot.
    """
    address = _parse_ip(host)
    name = host.lower().rstrip(".")
    for pattern in patterns:
        if "/" in pattern:
            try:
                network = ipaddress.ip_network(pattern, strict=False)
            except ValueError:
                continue
            if address is not None and address.version == network.version and address in network:
                return True
        elif pattern.startswith("*."):
            if address is None and name.endswith(pattern[1:].lower().rstrip(".")):
                return True
        else:
            other = _parse_ip(pattern)
            if address is not None and other is not None:
                if address == other:
                    return True
            elif address is None and name == pattern.lower().rstrip("."):
                return True
    return False
