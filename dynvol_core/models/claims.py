"""DynamicVolumeClaim: mount this storage at this mountpoint in the pods a selector matches."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, Final

import attrs

from dynvol_core import constants as c
from dynvol_core.errors import FieldError, InvalidObject
from dynvol_core.models.fields import (
    Fields,
    raise_if_errors,
    read_meta,
    top_object,
)
from dynvol_core.models.freezing import FrozenMap, json_map_of, thaw_json
from dynvol_core.selectors import LabelSelector
from dynvol_core.validation import (
    check_dns1123_label,
    check_dns1123_subdomain,
    normalize_mountpoint,
)

__all__ = [
    "BUILTIN_CONFIG_BLOCKS",
    "CONFIG_BLOCKS",
    "GENERIC_CONFIG_BLOCK",
    "TYPED_CONFIG_BLOCKS",
    "DynamicVolumeClaim",
    "ProviderConfig",
    "config_block_for",
]

#: The claim API's typed config blocks (fields of the CRD, so ``kubectl explain`` shows
#: them): ``<provider>Config`` belongs to the provider named ``<provider>``, which alone
#: parses and validates what is inside (see ``docs/design.md`` section 4). The core knows
#: only their names; any other provider takes the free-form :data:`GENERIC_CONFIG_BLOCK`.
TYPED_CONFIG_BLOCKS: Final = ("s3Config", "nfsConfig", "rcloneConfig")
#: The block a provider without a typed block takes.
GENERIC_CONFIG_BLOCK: Final = "config"
#: Every provider config block a claim may carry (exactly one of them).
CONFIG_BLOCKS: Final = (*TYPED_CONFIG_BLOCKS, GENERIC_CONFIG_BLOCK)
#: The provider each typed block is for, by the ``<provider>Config`` naming rule.
BUILTIN_CONFIG_BLOCKS: Final[Mapping[str, str]] = {
    block.removesuffix("Config"): block for block in TYPED_CONFIG_BLOCKS
}


def config_block_for(provider: str) -> str:
    """The claim field that carries ``provider``'s config (``s3`` -> ``s3Config``)."""
    return BUILTIN_CONFIG_BLOCKS.get(provider, GENERIC_CONFIG_BLOCK)


@attrs.frozen
class ProviderConfig:
    """A claim's provider configuration, as the claim gives it: which block and its values.

    ``kind`` is the block's field name (``s3Config``, ``nfsConfig``, ``rcloneConfig`` or
    ``config``); ``values`` is its content, deeply frozen and not interpreted here: the
    provider named by ``provider`` parses it (``Provider.parse_config``), so the rules of a
    block have one owner. Never holds secrets.
    """

    kind: str
    values: FrozenMap[str, object] = attrs.field(factory=FrozenMap, converter=json_map_of)
    provider: str = ""

    def to_object(self) -> dict[str, Any]:
        """The values as a plain dict."""
        result: dict[str, Any] = thaw_json(self.values)
        return result


_CLAIM_FIELDS = (
    "storageProvider",
    "storageProviderClass",
    "mountpoint",
    "readOnly",
    "selector",
    *CONFIG_BLOCKS,
)


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
        if config is not None:
            provider = config.provider
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
    # Only the shape is the core's: the block is an object. Its content is the provider's.
    f = Fields(raw, spec.at(block), spec.errors)
    expected = config_block_for(provider) if provider else None
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
    if not provider:
        provider = next(p for p, b in BUILTIN_CONFIG_BLOCKS.items() if b == block)
    return ProviderConfig(kind=block, values=f.obj, provider=provider)
