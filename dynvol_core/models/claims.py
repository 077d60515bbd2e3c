"""DynamicVolumeClaim: mount this storage at this mountpoint in the pods a selector matches."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

from dynvol_core import constants as c
from dynvol_core.errors import FieldError, InvalidObject
from dynvol_core.models.fields import (
    MAX_PARAMETER_VALUE,
    Fields,
    raise_if_errors,
    read_meta,
    top_object,
)
from dynvol_core.models.freezing import FrozenMap, json_map_of, thaw_json
from dynvol_core.selectors import LabelSelector
from dynvol_core.validation import (
    check_bucket_name,
    check_dns1123_label,
    check_dns1123_subdomain,
    check_endpoint,
    check_nfs_path,
    check_nfs_server,
    check_rclone_type,
    check_s3_prefix,
    has_control_chars,
    normalize_mountpoint,
)

__all__ = ["BUILTIN_CONFIG_BLOCKS", "CONFIG_BLOCKS", "DynamicVolumeClaim", "ProviderConfig"]

#: The config block each built-in provider takes; any other provider takes ``config``.
BUILTIN_CONFIG_BLOCKS: Final[Mapping[str, str]] = {
    c.PROVIDER_S3: "s3Config",
    c.PROVIDER_NFS: "nfsConfig",
    c.PROVIDER_RCLONE: "rcloneConfig",
}
#: Every provider config block a claim may carry (exactly one of them).
CONFIG_BLOCKS: Final = ("s3Config", "nfsConfig", "rcloneConfig", "config")


@attrs.frozen
class ProviderConfig:
    """A claim's provider configuration: which block (``kind``) and its values.

    ``kind`` is the block's field name (``s3Config``, ``nfsConfig``, ``rcloneConfig`` or
    ``config``); ``values`` is its content, deeply frozen. Never holds secrets.
    """

    kind: str
    values: FrozenMap[str, object] = attrs.field(factory=FrozenMap, converter=json_map_of)

    def to_object(self) -> dict[str, Any]:
        """The values as a plain dict."""
        result: dict[str, Any] = thaw_json(self.values)
        return result


_S3_FIELDS = ("bucket", "endpoint", "region", "prefix", "pathStyle")
_NFS_FIELDS = ("server", "path", "version", "options")
# Mount options the NFS provider passes to mount(8) -o; one option per item.
_NFS_OPTION = re.compile(r"[A-Za-z0-9_.=:/+-]{1,128}")
_NFS_MAX_OPTIONS = 32
_NFS_VERSIONS = ("3", "4", "4.0", "4.1", "4.2")
_RCLONE_FIELDS = ("type", "remotePath", "parameters")
_RCLONE_PARAM = re.compile(r"[a-z][a-z0-9_]{0,63}")
_REGION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_CLAIM_FIELDS = (
    "storageProvider",
    "storageProviderClass",
    "mountpoint",
    "readOnly",
    "selector",
    *CONFIG_BLOCKS,
)


def _read_s3(f: Fields) -> None:
    f.only(_S3_FIELDS, "s3Config")
    bucket = f.obj.get("bucket")
    if bucket is None:
        f.error("bucket", "required")
    else:
        f.check(check_bucket_name(bucket, f.at("bucket")))
    if f.has("endpoint"):
        f.check(check_endpoint(f.obj["endpoint"], f.at("endpoint")))
    region = f.string("region")
    if region and not _REGION.fullmatch(region):
        f.error("region", f"{region!r} must be 1-64 letters, digits, '-' or '_'")
    if f.has("prefix"):
        f.check(check_s3_prefix(f.obj["prefix"], f.at("prefix")))
    f.boolean("pathStyle")


def _read_nfs(f: Fields) -> None:
    f.only(_NFS_FIELDS, "nfsConfig")
    for key, check in (("server", check_nfs_server), ("path", check_nfs_path)):
        if not f.has(key):
            f.error(key, "required")
        else:
            f.check(check(f.obj[key], f.at(key)))
    version = f.string("version")
    if version and version not in _NFS_VERSIONS:
        f.error("version", f"{version!r} must be one of {', '.join(_NFS_VERSIONS)}")
    if f.has("options"):
        options = f.obj["options"]
        if not isinstance(options, list) or len(options) > _NFS_MAX_OPTIONS:
            f.error("options", f"must be a list of at most {_NFS_MAX_OPTIONS} mount options")
        else:
            for index, option in enumerate(options):
                if not isinstance(option, str) or not _NFS_OPTION.fullmatch(option):
                    f.error(
                        f"options[{index}]",
                        f"{option!r} must be one mount option such as 'hard' or 'timeo=600': "
                        "letters, digits and _.=:/+- only, no commas or spaces",
                    )


def _read_rclone(f: Fields) -> None:
    f.only(_RCLONE_FIELDS, "rcloneConfig")
    if not f.has("type"):
        f.error("type", "required")
    else:
        f.check(check_rclone_type(f.obj["type"], f.at("type")))
    remote_path = f.string("remotePath")
    if has_control_chars(remote_path) or len(remote_path) > 1024:
        f.error("remotePath", "must be at most 1024 characters without control characters")
    for key, value in f.str_map("parameters").items():
        where = f"{f.at('parameters')}[{key}]"
        if not _RCLONE_PARAM.fullmatch(key):
            f.errors.append(
                FieldError(where, "rclone option names are lowercase words joined by '_'")
            )
        if "\x00" in value or len(value) > MAX_PARAMETER_VALUE:
            f.errors.append(FieldError(where, f"must be at most {MAX_PARAMETER_VALUE} chars"))


_BLOCK_READERS = {"s3Config": _read_s3, "nfsConfig": _read_nfs, "rcloneConfig": _read_rclone}


@attrs.frozen(kw_only=True)
class DynamicVolumeClaim:
    """A namespaced DynamicVolumeClaim: mount this storage at ``mountpoint`` in matching pods.

    ``mountpoint`` is normalised (see :func:`~dynvol_core.validation.normalize_mountpoint`).
    ``storage_provider`` defaults to the provider implied by a built-in config block.
    """

    namespace: str
    name: str
    uid: str = ""
    generation: int = 0
    storage_provider: str
    storage_provider_class: str | None = None
    mountpoint: str
    selector: LabelSelector
    read_only: bool = False
    provider_config: ProviderConfig
    creation_timestamp: dt.datetime | None = None
    deleting: bool = False

    @classmethod
    def from_object(cls, obj: object) -> DynamicVolumeClaim:
        """Parse a DynamicVolumeClaim; :raises InvalidObject: listing every problem."""
        top = top_object(obj, c.KIND_CLAIM)
        errors: list[FieldError] = []
        meta = read_meta(top, errors, namespaced=True)
        if "spec" not in top:
            errors.append(FieldError("spec", "required"))
        spec = Fields(top.get("spec"), "spec", errors)
        spec.only(_CLAIM_FIELDS, "a DynamicVolumeClaim")

        mountpoint = ""
        if not spec.has("mountpoint"):
            spec.error("mountpoint", "required")
        else:
            try:
                mountpoint = normalize_mountpoint(spec.obj["mountpoint"], "spec.mountpoint")
            except InvalidObject as exc:
                errors += exc.errors

        selector = LabelSelector()
        if not spec.has("selector"):
            spec.error("selector", "required: a claim selects pods by label")
        else:
            try:
                selector = LabelSelector.from_object(spec.obj["selector"], "spec.selector")
            except InvalidObject as exc:
                errors += exc.errors
            else:
                if selector.is_empty:
                    spec.error(
                        "selector",
                        "must not be empty (an empty selector selects no pods): give "
                        "matchLabels or matchExpressions",
                    )

        read_only = spec.boolean("readOnly")
        provider = spec.string("storageProvider")
        if provider:
            spec.check(check_dns1123_label(provider, "spec.storageProvider"))
        pinned = spec.string("storageProviderClass") or None
        if pinned:
            spec.check(check_dns1123_subdomain(pinned, "spec.storageProviderClass"))
        config = _read_config_block(spec, provider)
        if config is not None and not provider:
            provider = next(p for p, b in BUILTIN_CONFIG_BLOCKS.items() if b == config.kind)
        raise_if_errors(errors, c.KIND_CLAIM, top)
        assert config is not None
        return cls(
            namespace=meta.namespace,
            name=meta.name,
            uid=meta.uid,
            generation=meta.generation,
            storage_provider=provider,
            storage_provider_class=pinned,
            mountpoint=mountpoint,
            selector=selector,
            read_only=read_only,
            provider_config=config,
            creation_timestamp=meta.creation_timestamp,
            deleting=meta.deleting,
        )


def _read_config_block(spec: Fields, provider: str) -> ProviderConfig | None:
    """The one provider config block of a claim spec, checked against ``storageProvider``."""
    present = [b for b in CONFIG_BLOCKS if b in spec.obj]
    if len(present) != 1:
        spec.errors.append(
            FieldError(
                "spec",
                "exactly one of s3Config, nfsConfig, rcloneConfig or config is required, "
                f"found {len(present)}" + (f" ({', '.join(present)})" if present else ""),
            )
        )
        return None
    block = present[0]
    before = len(spec.errors)
    raw = spec.obj[block]
    f = Fields(raw, spec.at(block), spec.errors)
    if block in _BLOCK_READERS:
        _BLOCK_READERS[block](f)
    expected = BUILTIN_CONFIG_BLOCKS.get(provider, "config") if provider else None
    if expected is None:
        if block == "config":
            spec.error(
                "storageProvider",
                "required with config: name the (third-party) provider the config is for",
            )
    elif expected != block:
        spec.error(
            "storageProvider",
            f"storageProvider {provider!r} takes {expected}, but the claim has {block}; "
            "s3Config goes with s3, nfsConfig with nfs, rcloneConfig with rclone and config "
            "with other providers",
        )
    if len(spec.errors) != before:
        return None
    return ProviderConfig(kind=block, values=f.obj)
