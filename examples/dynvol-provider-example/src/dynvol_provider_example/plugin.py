"""The ``tmpfs`` provider: a size-limited tmpfs per mount, mounted with ``mount -t tmpfs``.

Claim config (the claim's free-form ``config`` block)::

    config: {size: 64Mi, mode: "0775"}

It has no credentials. ``readOnly`` mounts it ``ro`` (an empty read-only scratch space is
not very useful, but the contract says read-only is enforced at the source mount).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from dynvol_core.errors import FieldError, InvalidObject
from dynvol_core.models import ConnectionPolicy
from dynvol_providers import (
    CommandMountProvider,
    CommandSpec,
    Credentials,
    MountRequest,
    ProviderRegistry,
    hookimpl,
)
from dynvol_providers.base import join_mount_options

_SIZE = re.compile(r"([1-9][0-9]{0,6})(Ki|Mi|Gi)")
_MODE = re.compile(r"0?[0-7]{3}")
_UNITS = {"Ki": "k", "Mi": "m", "Gi": "g"}


@attrs.frozen
class TmpfsConfig:
    size: str = "16Mi"
    mode: str = "0755"


class TmpfsProvider(CommandMountProvider):
    """Scratch space in memory."""

    name: ClassVar[str] = "tmpfs"

    def parse_config(
        self,
        values: Mapping[str, Any],
        *,
        parameters: Mapping[str, str],
        connection: ConnectionPolicy | None = None,
    ) -> Any:
        # tmpfs connects nowhere, so the class's connection policy has nothing to check. A
        # provider that reaches a server passes every host a claim names to
        # connection.check_host(host, field) and honours connection.pin(...).
        errors = [
            FieldError(k, "unknown field; config has size and mode")
            for k in sorted(set(values) - {"size", "mode"})
        ]
        size = values.get("size", "16Mi")
        if not isinstance(size, str) or not _SIZE.fullmatch(size):
            errors.append(FieldError("size", f"{size!r} must be a quantity like 64Mi or 1Gi"))
        mode = values.get("mode", "0755")
        if not isinstance(mode, str) or not _MODE.fullmatch(mode):
            errors.append(FieldError("mode", f"{mode!r} must be an octal mode like 0755"))
        if errors:
            raise InvalidObject(errors)
        return TmpfsConfig(size=size, mode=mode)

    def parse_credentials(self, secret_data: Mapping[str, bytes | str]) -> Credentials:
        return Credentials()

    def mount_fs_type(self, request: MountRequest) -> str:
        return "tmpfs"

    def mount_command(self, request: MountRequest) -> CommandSpec:
        config = request.config
        assert isinstance(config, TmpfsConfig)
        match = _SIZE.fullmatch(config.size)
        assert match is not None
        size = match.group(1) + _UNITS[match.group(2)]
        # join_mount_options refuses any value that could split into more options.
        options = join_mount_options(
            [("size", size), ("mode", config.mode), "ro" if request.read_only else "rw",
             "nosuid", "nodev"],
            fields={"size": "size", "mode": "mode"},
        )  # fmt: skip
        return CommandSpec(
            argv=("mount", "-t", "tmpfs", "-o", options, "dynvol-tmpfs", str(request.target))
        )


@hookimpl
def dynvol_register_providers(registry: ProviderRegistry) -> None:
    """Register the example ``tmpfs`` provider."""
    registry.register(TmpfsProvider())
