"""The claim model is generic over providers: it keeps a block raw and never judges it."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynvol_core.errors import InvalidObject
from dynvol_core.models import (
    BUILTIN_CONFIG_BLOCKS,
    CONFIG_BLOCKS,
    TYPED_CONFIG_BLOCKS,
    DynamicVolumeClaim,
    FrozenMap,
    config_block_for,
    thaw_json,
)


def _claim(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "dynamicvolume.csi.cloudnative101.net/v1alpha1",
        "kind": "DynamicVolumeClaim",
        "metadata": {"name": "c", "namespace": "ns"},
        "spec": {"mountpoint": "/data", "selector": {"matchLabels": {"app": "a"}}, **spec},
    }


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(
    block=st.sampled_from(TYPED_CONFIG_BLOCKS),
    content=st.dictionaries(st.text(max_size=8), _JSON, max_size=4),
)
def test_any_block_content_is_kept_as_given_for_its_provider(
    block: str, content: dict[str, Any]
) -> None:
    claim = DynamicVolumeClaim.from_object(_claim(**{block: content}))
    assert claim.provider_config.kind == block
    assert claim.storage_provider == claim.provider_config.provider == block.removesuffix("Config")
    assert thaw_json(claim.provider_config.values) == thaw_json(content)
    assert isinstance(claim.provider_config.values, FrozenMap)
    hash(claim.provider_config)  # frozen all the way down


def test_third_party_config_needs_its_provider_named() -> None:
    claim = DynamicVolumeClaim.from_object(_claim(storageProvider="acme-fs", config={"a": [1]}))
    assert (claim.provider_config.kind, claim.provider_config.provider) == ("config", "acme-fs")
    with pytest.raises(InvalidObject) as info:
        DynamicVolumeClaim.from_object(_claim(config={"a": 1}))
    assert "spec.storageProvider" in info.value.paths


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"storageProvider": "nfs", "s3Config": {}}, "spec.storageProvider"),
        ({"storageProvider": "s3", "config": {}}, "spec.storageProvider"),
        ({"storageProvider": "acme-fs", "s3Config": {}}, "spec.storageProvider"),
        ({"s3Config": "bucket"}, "spec.s3Config"),
        ({"s3Config": {}, "nfsConfig": {}}, "spec"),
        ({}, "spec"),
    ],
)
def test_only_the_shape_and_the_pairing_are_the_cores(spec: dict[str, Any], path: str) -> None:
    with pytest.raises(InvalidObject) as info:
        DynamicVolumeClaim.from_object(_claim(**spec))
    assert path in info.value.paths, info.value


def test_the_block_naming_rule() -> None:
    assert (*TYPED_CONFIG_BLOCKS, "config") == CONFIG_BLOCKS
    for provider, block in BUILTIN_CONFIG_BLOCKS.items():
        assert block == f"{provider}Config"
        assert config_block_for(provider) == block
    assert config_block_for("acme-fs") == "config"
