"""The ``nfs`` provider: a kernel NFS mount (``mount -t nfs``).

Claim (``nfsConfig``)::

    nfsConfig: {server: nfs.example.com, path: /exports/data, version: "4.1",
                options: [hard, "timeo=600"]}

No credentials: the class may still name a Secret, whose keys are ignored. ``readOnly``
adds ``ro`` to the mount options; ``ro``/``rw`` in ``options`` are refused because the
claim's ``readOnly`` decides.

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
from dynvol_core.validation import check_nfs_path, check_nfs_server
from dynvol_providers.base import (
    CommandMountProvider,
    CommandResult,
    CommandSpec,
    Credentials,
    MountFailed,
    MountRequest,
    Reason,
)
from dynvol_providers.hookspecs import hookimpl

if TYPE_CHECKING:
    from dynvol_providers.registry import ProviderRegistry

__all__ = ["NfsConfig", "NfsProvider"]

VERSIONS: Final = ("3", "4", "4.0", "4.1", "4.2")
_FIELDS = frozenset({"server", "path", "version", "options"})
_OPTION = re.compile(r"[a-z][a-z0-9_]*(=[A-Za-z0-9_.:/-]+)?")
#: Options the provider decides itself, or that would defeat the claim's intent.
_MANAGED = frozenset({"ro", "rw", "vers", "nfsvers", "minorversion"})


@attrs.frozen(kw_only=True)
class NfsConfig:
    server: str
    path: str
    version: str = "4.1"
    options: tuple[str, ...] = ()


class NfsProvider(CommandMountProvider):
    """NFS exports through the kernel client (``mount.nfs`` must be in the image)."""

    name: ClassVar[str] = PROVIDER_NFS

    def parse_config(self, values: Mapping[str, Any], *, parameters: Mapping[str, str]) -> Any:
        errors: list[FieldError] = [
            FieldError(key, f"unknown field; nfsConfig has {', '.join(sorted(_FIELDS))}")
            for key in sorted(set(values) - _FIELDS)
        ]
        server, path = values.get("server"), values.get("path")
        if server in (None, ""):
            errors.append(FieldError("server", "is required"))
        else:
            errors += check_nfs_server(server, "server")
        if path in (None, ""):
            errors.append(FieldError("path", "is required (the exported path, e.g. /exports)"))
        else:
            errors += check_nfs_path(path, "path")
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
        for index, option in enumerate(raw):
            where = f"options[{index}]"
            if not isinstance(option, str) or not _OPTION.fullmatch(option):
                errors.append(FieldError(where, f"{option!r} is not a valid NFS mount option"))
            elif option.split("=", 1)[0] in _MANAGED:
                errors.append(
                    FieldError(
                        where, f"{option!r} is set by dynvol (use readOnly and version instead)"
                    )
                )
            else:
                options.append(option)
        if errors:
            raise InvalidObject(errors)
        return NfsConfig(
            server=str(server), path=str(path), version=str(version), options=tuple(options)
        )

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
        options = [f"vers={config.version}", "ro" if request.read_only else "rw", *config.options]
        return CommandSpec(
            argv=(
                "mount",
                "-t",
                self.mount_fs_type(request),
                "-o",
                ",".join(options),
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


@hookimpl
def dynvol_register_providers(registry: ProviderRegistry) -> None:
    """Register the built-in ``nfs`` provider."""
    registry.register(NfsProvider())
