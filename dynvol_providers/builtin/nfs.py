"""The ``nfs`` provider: a kernel NFS mount (``mount -t nfs``).

Claim (``nfsConfig``)::

    nfsConfig: {server: nfs.example.com, path: /exports/data, version: "4.1",
                options: [hard, "timeo=600"]}

No credentials: the class may still name a Secret, whose keys are ignored. ``readOnly``
adds ``ro`` to the mount options; ``ro``/``rw`` in ``options`` are refused because the
claim's ``readOnly`` decides. Every mount is ``nosuid,nodev``. ``options`` is an allowlist
(:data:`FLAGS`, :data:`NUMERIC`, :data:`CHOICES`). A class may pin ``server`` and
``exportPrefix`` (``spec.connection.pinned``).

Neighbours: :class:`dynvol_providers.base.CommandMountProvider` runs the command.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final

import attrs

from dynvol_core.constants import PROVIDER_NFS
from dynvol_core.errors import FieldError, InvalidObject
from dynvol_core.models import ConnectionPolicy
from dynvol_core.validation import check_nfs_path, check_nfs_server
from dynvol_providers.base import (
    CommandMountProvider,
    CommandResult,
    CommandSpec,
    Credentials,
    MountFailed,
    MountRequest,
    Reason,
    cel_rule,
    join_mount_options,
)
from dynvol_providers.hookspecs import hookimpl

if TYPE_CHECKING:
    from dynvol_providers.registry import ProviderRegistry

__all__ = [
    "CHOICES",
    "CONFIG_SCHEMA",
    "FLAGS",
    "MANAGED",
    "NUMERIC",
    "NfsConfig",
    "NfsProvider",
    "option_pattern",
]

VERSIONS: Final = ("3", "4", "4.0", "4.1", "4.2")
#: Bounds on ``options`` (the allowlist's options are all shorter than the length bound).
MAX_OPTIONS: Final = 32
MAX_OPTION_LENGTH: Final = 128
_FIELDS = frozenset({"server", "path", "version", "options"})
#: The connection fields a class may pin (``spec.connection.pinned``).
PINNABLE: Final = ("server", "exportPrefix")
#: Options dynvol always sets: a claim's readOnly decides ro/rw, its version vers, and an
#: NFS export never brings set-user-ID programs or device nodes into a pod.
MANAGED: Final = frozenset(
    {"ro", "rw", "vers", "nfsvers", "minorversion", "suid", "nosuid", "dev", "nodev", "defaults"}
)
#: The options a claim may add: an allowlist, so a new or obscure option cannot redirect the
#: mount (addr=, clientaddr=, mounthost=) or weaken it.
FLAGS: Final = frozenset(
    {
        "hard", "soft", "softreval", "nosoftreval", "intr", "nointr", "ac", "noac", "cto",
        "nocto", "lock", "nolock", "resvport", "noresvport", "sharecache", "nosharecache",
        "fsc", "nofsc", "rdirplus", "nordirplus", "acl", "noacl", "atime", "noatime",
        "diratime", "nodiratime", "relatime", "norelatime", "strictatime", "nostrictatime",
        "lazytime", "nolazytime", "noexec", "sync", "async", "posix", "noposix", "tcp", "udp",
        "rdma", "bg", "fg",
    }
)  # fmt: skip
NUMERIC: Final = frozenset(
    {
        "timeo", "retrans", "rsize", "wsize", "acregmin", "acregmax", "acdirmin", "acdirmax",
        "actimeo", "retry", "port", "mountport", "mountvers", "namlen", "nconnect",
        "max_connect",
    }
)  # fmt: skip
_PROTOS = frozenset({"tcp", "udp", "rdma", "tcp6", "udp6", "rdma6"})
CHOICES: Final[Mapping[str, frozenset[str]]] = {
    "proto": _PROTOS,
    "mountproto": _PROTOS,
    "sec": frozenset({"sys", "none", "krb5", "krb5i", "krb5p"}),
    "lookupcache": frozenset({"all", "none", "pos", "positive"}),
    "local_lock": frozenset({"none", "all", "flock", "posix"}),
    "xprtsec": frozenset({"none", "tls", "mtls"}),
}
_NUMBER = re.compile(r"[0-9]{1,9}")


def option_pattern() -> str:
    """The allowlist as one regular expression (RE2 and Python), for the CRD's CEL rule.

    The CRD repeats it; a unit test checks that the two are the same.
    """
    choices = "|".join(
        f"{key}=({'|'.join(sorted(values))})" for key, values in sorted(CHOICES.items())
    )
    return f"^(({'|'.join(sorted(FLAGS))})|({'|'.join(sorted(NUMERIC))})=[0-9]{{1,9}}|{choices})$"


def _option_problem(option: object) -> str | None:
    """Why a claim may not add this NFS mount option, or None."""
    if not isinstance(option, str):
        return "must be a string"
    if len(option) > MAX_OPTION_LENGTH:
        return f"must be at most {MAX_OPTION_LENGTH} characters"
    key, eq, value = option.partition("=")
    if key in MANAGED:
        return f"{option!r} is set by dynvol (use readOnly and version; nosuid,nodev are always on)"
    if key in FLAGS and not eq:
        return None
    if key in NUMERIC and eq and _NUMBER.fullmatch(value):
        return None
    if key in CHOICES and eq and value in CHOICES[key]:
        return None
    if key in NUMERIC:
        return f"{option!r} must be {key}=<number>"
    if key in CHOICES:
        return f"{option!r} must be {key}=one of {', '.join(sorted(CHOICES[key]))}"
    return (
        f"{option!r} is not an NFS mount option dynvol allows; allowed are "
        f"{', '.join(sorted(FLAGS))}, {', '.join(f'{k}=N' for k in sorted(NUMERIC))} and "
        f"{', '.join(f'{k}=...' for k in sorted(CHOICES))}"
    )


def _as_pair(option: str) -> str | tuple[str, str]:
    key, eq, value = option.partition("=")
    return (key, value) if eq else key


def _normal_path(path: str) -> str:
    return "/" + "/".join(p for p in path.split("/") if p not in ("", "."))


def _is_under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


@attrs.frozen(kw_only=True)
class NfsConfig:
    server: str
    path: str
    version: str = "4.1"
    options: tuple[str, ...] = ()


class NfsProvider(CommandMountProvider):
    """NFS exports through the kernel client (``mount.nfs`` must be in the image)."""

    name: ClassVar[str] = PROVIDER_NFS
    config_block: ClassVar[str] = "nfsConfig"

    def config_schema(self) -> Mapping[str, Any]:
        """The ``nfsConfig`` schema of the claim CRD (:data:`CONFIG_SCHEMA`)."""
        return CONFIG_SCHEMA

    def parse_config(
        self,
        values: Mapping[str, Any],
        *,
        parameters: Mapping[str, str],
        connection: ConnectionPolicy | None = None,
    ) -> Any:
        errors: list[FieldError] = [
            FieldError(key, f"unknown field; nfsConfig has {', '.join(sorted(_FIELDS))}")
            for key in sorted(set(values) - _FIELDS)
        ]
        server, path = values.get("server"), values.get("path")
        if connection is not None and connection.pinned.get("server") and server in (None, ""):
            server = connection.pinned["server"]
        if server in (None, ""):
            errors.append(FieldError("server", "is required"))
        else:
            errors += check_nfs_server(server, "server")
        if path in (None, ""):
            errors.append(FieldError("path", "is required (the exported path, e.g. /exports)"))
        else:
            errors += check_nfs_path(path, "path")
        if connection is not None:
            errors += self._check_connection(connection, server, path, errors)
        version = values.get("version", "4.1")
        if isinstance(version, (int, float)) and not isinstance(version, bool):
            version = str(version)
        if version not in VERSIONS:
            errors.append(FieldError("version", f"must be one of {', '.join(VERSIONS)}"))
        raw = values.get("options") or []
        options: list[str] = []
        if isinstance(raw, str) or not isinstance(raw, (list, tuple)):
            errors.append(FieldError("options", "must be a list of mount options"))
            raw = []
        elif len(raw) > MAX_OPTIONS:
            errors.append(FieldError("options", f"must have at most {MAX_OPTIONS} options"))
            raw = []
        seen: set[str] = set()
        for index, option in enumerate(raw):
            where = f"options[{index}]"
            problem = _option_problem(option)
            if problem is None and str(option).partition("=")[0] in seen:
                problem = f"{option!r} is given twice"
            if problem is not None:
                errors.append(FieldError(where, problem))
            else:
                seen.add(str(option).partition("=")[0])
                options.append(str(option))
        if errors:
            raise InvalidObject(errors)
        return NfsConfig(
            server=str(server),
            path=_normal_path(str(path)),
            version=str(version),
            options=tuple(options),
        )

    @staticmethod
    def _check_connection(
        connection: ConnectionPolicy, server: object, path: object, errors: list[FieldError]
    ) -> list[FieldError]:
        found: list[FieldError] = [
            FieldError(
                f"connection.pinned[{key}]", f"the nfs provider pins only {', '.join(PINNABLE)}"
            )
            for key in sorted(set(connection.pinned) - set(PINNABLE))
        ]
        bad_server = any(e.path == "server" for e in errors)
        pinned_server = connection.pinned.get("server")
        if pinned_server is not None:
            found += [
                FieldError("connection.pinned[server]", e.message)
                for e in check_nfs_server(pinned_server, "server")
            ]
            if not bad_server and str(server).lower() != pinned_server.lower():
                found += connection.pin("server", server, "server")[1]
        elif not bad_server:
            found += connection.check_host(str(server), "server")
        prefix = connection.pinned.get("exportPrefix")
        if prefix is not None:
            bad = check_nfs_path(prefix, "connection.pinned[exportPrefix]")
            found += bad
            if not bad and not any(e.path == "path" for e in errors):
                normal = _normal_path(prefix)
                if not _is_under(_normal_path(str(path)), normal):
                    found.append(
                        FieldError(
                            "path",
                            f"export path {path!r} is outside {normal!r}, the prefix the "
                            "StorageProviderClass allows (spec.connection.pinned[exportPrefix])",
                        )
                    )
        return found

    def parse_credentials(self, secret_data: Mapping[str, bytes | str]) -> Credentials:
        # NFS (AUTH_SYS) takes no secrets; whatever the class's Secret holds is not used.
        return Credentials()

    def mount_fs_type(self, request: MountRequest) -> str:
        config = request.config
        assert isinstance(config, NfsConfig)
        return "nfs" if config.version == "3" else "nfs4"

    def mount_command(self, request: MountRequest) -> CommandSpec:
        config = request.config
        assert isinstance(config, NfsConfig)
        server = config.server
        try:
            if ipaddress.ip_address(server).version == 6:
                server = f"[{server}]"
        except ValueError:
            pass
        problems = [p for p in map(_option_problem, config.options) if p is not None]
        problems += [e.message for e in check_nfs_server(config.server, "server")]
        problems += [e.message for e in check_nfs_path(config.path, "path")]
        if config.version not in VERSIONS:
            problems.append(f"version {config.version!r} is not one of {', '.join(VERSIONS)}")
        if problems:
            # Defence in depth: parse_config refuses these already.
            raise InvalidObject([FieldError("options", p) for p in problems])
        # dynvol's own options come last: mount option parsers let the last one win.
        options = join_mount_options(
            [
                *(_as_pair(option) for option in config.options),
                ("vers", config.version),
                "ro" if request.read_only else "rw",
                "nosuid",
                "nodev",
            ],
            fields={"vers": "version"},
        )
        return CommandSpec(
            argv=(
                "mount",
                "-t",
                self.mount_fs_type(request),
                "-o",
                options,
                f"{server}:{config.path}",
                str(request.target),
            ),
            timeout=60.0,
        )

    def explain_failure(self, request: MountRequest, result: CommandResult) -> MountFailed:
        config = request.config
        assert isinstance(config, NfsConfig)
        what = f"NFS mount of {config.server}:{config.path}"
        text = result.output.lower()
        if "access denied" in text or "permission denied" in text:
            return MountFailed(
                Reason.ACCESS_DENIED,
                f"{what}: the server refused access; check its exports for this "
                f"node ({result.output.strip()})",
            )
        if "no such file" in text:
            return MountFailed(
                Reason.NOT_FOUND,
                f"{what}: the export does not exist; fix nfsConfig.path ({result.output.strip()})",
            )
        if "bad option" in text or "helper program" in text or "unknown filesystem" in text:
            return MountFailed(
                Reason.MOUNTER_MISSING,
                f"{what}: this node cannot mount NFS (install nfs-common in the "
                f"mount pod image) ({result.output.strip()})",
                retryable=False,
            )
        if "timed out" in text or "connection refused" in text or "no route" in text:
            return MountFailed(
                Reason.UNREACHABLE,
                f"{what}: the server cannot be reached; check nfsConfig.server "
                f"({result.output.strip()})",
            )
        return super().explain_failure(request, result)


# --------------------------------------------------------------------------- claim API schema

#: The OpenAPI v3 schema of ``nfsConfig`` in the DynamicVolumeClaim CRD: the one place its API
#: rules are written. The CRD carries exactly this (tests/unit/providers/test_schemas.py);
#: :meth:`parse_config` enforces the same rules (and more: the class's policy), and the
#: shared table in tests/cases holds both to the same good and bad values.
CONFIG_SCHEMA: Final[Mapping[str, Any]] = {
    "type": "object",
    "description": "An NFS export.",
    "required": ["server", "path"],
    "properties": {
        "server": {
            "type": "string",
            "description": "The NFS server's host name or IP address.",
            "minLength": 1,
            "maxLength": 253,
            "x-kubernetes-validations": [
                cel_rule(
                    (
                        "self.matches(r'^[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
                        "(\\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*$') "
                        "|| (self.contains(':') && self.matches(r'^[0-9A-Fa-f:.]+$'))"
                    ),
                    "server must be a host name (letters, digits, '-' and '.') or an IP address",
                ),
                cel_rule(
                    (
                        "self.contains(':') || "
                        "!self.matches(r'(^|\\.)([0-9]+|0[xX][0-9A-Fa-f]*)$') || "
                        "self.matches(r'^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$')"
                    ),
                    (
                        "server must write an IP address as a plain dotted quad such as "
                        "192.0.2.10 (decimal, octal, hexadecimal and shortened IPv4 forms are "
                        "refused)"
                    ),
                ),
            ],
        },
        "path": {
            "type": "string",
            "description": "The exported path on the server, absolute, e.g. /exports/data.",
            "minLength": 1,
            "maxLength": 1024,
            "x-kubernetes-validations": [
                cel_rule(
                    "self.startsWith('/')",
                    "path must be an absolute path on the server, such as /exports/data",
                ),
                cel_rule(
                    (
                        "!self.matches(r'(^|/)\\.\\.(/|$)') && "
                        "!self.matches(r'[\\x00-\\x1f\\x7f-\\x9f]')"
                    ),
                    "path must not contain '..' components or control characters",
                ),
            ],
        },
        "version": {
            "type": "string",
            "description": "The NFS protocol version (optional; the provider picks one otherwise).",
            "enum": list(VERSIONS),
        },
        "options": {
            "type": "array",
            "description": (
                "Extra NFS mount options, one per item (e.g. hard, timeo=600), from the nfs "
                "provider's allowlist. ro/rw come from spec.readOnly, vers from version; nosuid "
                "and nodev are always set."
            ),
            "maxItems": MAX_OPTIONS,
            "items": {
                "type": "string",
                "maxLength": MAX_OPTION_LENGTH,
                "pattern": "^[A-Za-z0-9_.=:/+-]+$",
                "x-kubernetes-validations": [
                    cel_rule(
                        f"!self.matches(r'^({'|'.join(sorted(MANAGED))})(=.*)?$')",
                        (
                            "this option is set by dynvol: use readOnly and version; nosuid and "
                            "nodev are always on"
                        ),
                    ),
                    cel_rule(
                        f"self.matches(r'{option_pattern()}')",
                        (
                            "is not an NFS mount option dynvol allows (see docs/providers.md: "
                            "flags such as hard or noac, numbers such as timeo=600, and proto, "
                            "sec, lookupcache, local_lock, xprtsec, mountproto choices)"
                        ),
                    ),
                ],
            },
        },
    },
}


@hookimpl
def dynvol_register_providers(registry: ProviderRegistry) -> None:
    """Register the built-in ``nfs`` provider."""
    registry.register(NfsProvider())
