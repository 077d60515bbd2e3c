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

import ipaddress
import re
from typing import Final

from dynvol_core.errors import FieldError, InvalidObject

__all__ = [
    "MAX_MOUNTPOINT_BYTES",
    "MAX_PATH_COMPONENT_BYTES",
    "check_bucket_name",
    "check_dns1123_label",
    "check_dns1123_subdomain",
    "check_endpoint",
    "check_label_value",
    "check_mountpoint",
    "check_nfs_path",
    "check_nfs_server",
    "check_qualified_name",
    "check_rclone_type",
    "check_s3_prefix",
    "has_control_chars",
    "normalize_mountpoint",
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
        port = after[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return "must name a host: the bracketed IPv6 address is invalid"
    else:
        host, _, port = authority.partition(":")
        if not host:
            return "must name a host, e.g. https://s3.example.com"
        if len(host) > 253 or not _URL_HOST.fullmatch(host):
            return "must name a host: letters, digits, '-', '_' and '.' or an IP address"
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        return "must have a port between 1 and 65535"
    return None


def check_nfs_server(value: object, path: str) -> list[FieldError]:
    """An NFS server: a host name (RFC 1123) or an IPv4/IPv6 address (IPv6 without brackets)."""
    if not isinstance(value, str):
        return _not_string(path, value)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return []
    if len(value) <= 253 and _HOSTNAME.fullmatch(value):
        return []
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
