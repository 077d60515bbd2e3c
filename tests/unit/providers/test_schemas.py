"""Providers own their claim blocks' schemas; the CRD carries them, the table holds them.

Each built-in provider publishes the OpenAPI schema of its block (``config_schema()``); the
DynamicVolumeClaim CRD must contain exactly that (hack/gen-crd-config-blocks.py writes it),
and on the shared table of good and bad values (tests/cases CONFIG_VALUES) the provider's
parser must agree with what the schema says (the apiserver half of that check is in
tests/integration/crds). A third-party provider's schema and rules reach dynvol through its
plugin, never through the core.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from dynvol_core.errors import InvalidObject
from dynvol_core.models import (
    TYPED_CONFIG_BLOCKS,
    ConnectionPolicy,
    DynamicVolumeClaim,
    config_block_for,
)
from dynvol_providers import Credentials, hookimpl
from dynvol_providers.base import FuseProvider, config_error
from dynvol_providers.registry import ProviderRegistry, load_registry, make_plugin_manager
from tests.cases.bad_objects import CONFIG_VALUES, ConfigValue
from tests.unit.crd_generator import check_generated_crds

ROOT = Path(__file__).parents[3]
CRD = ROOT / "manifests" / "base" / "crds" / "dynamicvolumeclaims.yaml"
REGISTRY = load_registry()


def _crd_blocks() -> Mapping[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    spec: Mapping[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec["properties"]


@pytest.mark.parametrize("block", TYPED_CONFIG_BLOCKS)
def test_the_crd_carries_exactly_the_providers_schema(block: str) -> None:
    provider = block.removesuffix("Config")
    schema = REGISTRY.config_schema(provider)
    assert schema is not None, f"{provider} publishes no schema"
    # Through JSON: tuples and lists are the same to the apiserver.
    assert _crd_blocks()[block] == json.loads(json.dumps(schema)), (
        f"manifests/base/crds/dynamicvolumeclaims.yaml differs from {provider}'s "
        "config_schema(): run hack/gen-crd-config-blocks.py"
    )


def test_the_generator_finds_the_crd_current() -> None:
    result = check_generated_crds()
    assert result.returncode == 0, result.stderr


def test_the_crd_has_a_typed_block_for_every_builtin_provider_and_no_other() -> None:
    blocks = {b for b in _crd_blocks() if b.endswith("Config")}
    assert blocks == set(TYPED_CONFIG_BLOCKS)
    for name in REGISTRY:
        assert REGISTRY.get(name).config_block == config_block_for(name)  # type: ignore[attr-defined]


def test_the_schemas_use_only_cel_the_apiserver_compiles() -> None:
    """Every rule is a string with a message (the apiserver checks the CEL itself)."""

    def rules(node: Any) -> list[Mapping[str, str]]:
        if isinstance(node, Mapping):
            found = list(node.get("x-kubernetes-validations", ()))
            for value in node.values():
                found += rules(value)
            return found
        if isinstance(node, list):
            return [r for item in node for r in rules(item)]
        return []

    for block in TYPED_CONFIG_BLOCKS:
        found = rules(REGISTRY.config_schema(block.removesuffix("Config")))
        assert found
        for rule in found:
            assert set(rule) == {"rule", "message"}
            assert rule["rule"]
            assert rule["message"]


# --------------------------------------------------------------------------- the shared table


def _provider_refusal(case: ConfigValue) -> list[str] | None:
    claim = DynamicVolumeClaim.from_object(case.claim())  # the core takes any block content
    try:
        REGISTRY.parse_claim_config(claim.provider_config)
    except InvalidObject as exc:
        return list(exc.paths)
    return None


@pytest.mark.parametrize("case", CONFIG_VALUES, ids=lambda case: case.id)
def test_the_provider_judges_each_value_as_the_table_says(case: ConfigValue) -> None:
    paths = _provider_refusal(case)
    if case.path is None:
        assert paths is None
    else:
        assert paths is not None, f"{case.id} was accepted"
        assert any(p == case.path or p.startswith(f"{case.path}[") for p in paths), paths


def test_the_table_has_good_and_bad_values_for_every_builtin_provider() -> None:
    for name in ("s3", "nfs", "rclone"):
        mine = [case for case in CONFIG_VALUES if case.provider == name]
        assert any(case.path is None for case in mine)
        assert any(case.path is not None for case in mine)
    assert len({case.id for case in CONFIG_VALUES}) == len(CONFIG_VALUES)


@pytest.mark.parametrize(
    "case", [c for c in CONFIG_VALUES if "region" in c.config], ids=lambda case: case.id
)
def test_the_s3_region_rule_is_one_pattern(case: ConfigValue) -> None:
    """The schema's pattern is the one the parser matches (no second, looser copy)."""
    region_schema = REGISTRY.config_schema("s3")["properties"]["region"]  # type: ignore[index]
    region = case.config["region"]
    by_schema = len(region) <= region_schema["maxLength"] and bool(
        re.fullmatch(region_schema["pattern"], region)
    )
    assert by_schema == (case.path is None), region


# --------------------------------------------------------------------------- third parties


class AcmeProvider(FuseProvider):
    """A third-party provider: its config comes in ``spec.config``; it owns the rules."""

    name: ClassVar[str] = "acme-fs"

    def config_schema(self) -> Mapping[str, Any]:
        return {
            "type": "object",
            "required": ["volume"],
            "properties": {"volume": {"type": "string", "pattern": "^v-[0-9]+$"}},
        }

    def parse_config(
        self,
        values: Mapping[str, Any],
        *,
        parameters: Mapping[str, str],
        connection: ConnectionPolicy | None = None,
    ) -> Any:
        volume = values.get("volume")
        if not isinstance(volume, str) or not re.fullmatch(r"v-[0-9]+", volume):
            raise config_error("volume", "must be v-<number>")
        return volume

    def parse_credentials(self, secret_data: Mapping[str, bytes | str]) -> Credentials:
        return Credentials()

    def daemon_spec(self, request: Any) -> Any:
        raise NotImplementedError("not mounted in these tests")


class AcmePlugin:
    @hookimpl
    def dynvol_register_providers(self, registry: ProviderRegistry) -> None:
        registry.register(AcmeProvider())


def _acme_claim(config: Mapping[str, Any]) -> DynamicVolumeClaim:
    return DynamicVolumeClaim.from_object(
        {
            "apiVersion": "dynamicvolume.csi.cloudnative101.net/v1alpha1",
            "kind": "DynamicVolumeClaim",
            "metadata": {"name": "acme", "namespace": "default"},
            "spec": {
                "mountpoint": "/acme",
                "selector": {"matchLabels": {"app": "a"}},
                "storageProvider": "acme-fs",
                "config": dict(config),
            },
        }
    )


def test_a_third_party_schema_and_rules_come_through_its_plugin() -> None:
    registry = ProviderRegistry.from_plugin_manager(
        make_plugin_manager(load_entry_points=False, plugins=[AcmePlugin()])
    )
    assert registry.config_schema("acme-fs") == AcmeProvider().config_schema()
    assert registry.parse_claim_config(_acme_claim({"volume": "v-1"}).provider_config) == "v-1"
    with pytest.raises(InvalidObject) as info:
        registry.parse_claim_config(_acme_claim({"volume": "../etc"}).provider_config)
    assert info.value.paths == ("spec.config.volume",)


def test_a_provider_cannot_claim_a_typed_block_that_is_not_its_own() -> None:
    class Squatter(AcmeProvider):
        config_block: ClassVar[str] = "s3Config"

    with pytest.raises(TypeError, match=r"spec\.config"):
        ProviderRegistry().register(Squatter())


def test_a_claim_whose_block_is_not_the_providers_is_refused() -> None:
    claim = _acme_claim({"volume": "v-1"})
    s3_claim = DynamicVolumeClaim.from_object(
        {
            "apiVersion": "dynamicvolume.csi.cloudnative101.net/v1alpha1",
            "kind": "DynamicVolumeClaim",
            "metadata": {"name": "s3", "namespace": "default"},
            "spec": {
                "mountpoint": "/s3",
                "selector": {"matchLabels": {"app": "a"}},
                "s3Config": {"bucket": "data"},
            },
        }
    )
    forged = type(claim.provider_config)(
        kind="config", values=s3_claim.provider_config.values, provider="s3"
    )
    with pytest.raises(InvalidObject) as info:
        REGISTRY.parse_claim_config(forged)
    assert info.value.paths == ("spec.config",)
