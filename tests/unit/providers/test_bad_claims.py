"""The shared table of bad objects, through the providers (the core and the API are the others).

The core (``DynamicVolumeClaim.from_object``) and the CRD schema refuse BAD_OBJECTS; here the
built-in providers must refuse the same config blocks, naming the same field, so that the
validating webhook and the DMP (which ask the provider) agree with them. PROVIDER_BAD_CLAIMS
are provider rules the CRD repeats; POLICY_CASES depend on the class and only the provider,
given the class's policy, can judge them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from dynvol_core.errors import InvalidObject
from dynvol_core.models import (
    BUILTIN_CONFIG_BLOCKS,
    ConnectionPolicy,
    DynamicVolumeClaim,
    StorageProviderClass,
)
from dynvol_providers.base import qualify_config_errors
from dynvol_providers.builtin.nfs import MANAGED, option_pattern
from dynvol_providers.registry import load_registry
from tests.cases.bad_objects import (
    BAD_OBJECTS,
    DVC,
    POLICY_CASES,
    PROVIDER_BAD_CLAIMS,
    BadCase,
    PolicyCase,
)

REGISTRY = load_registry()
BLOCK_PROVIDERS = {block: name for name, block in BUILTIN_CONFIG_BLOCKS.items()}
CRDS = Path(__file__).parents[3] / "manifests" / "base" / "crds"


def _block_cases() -> list[BadCase]:
    """BAD_OBJECTS claims whose bad field is inside a built-in provider's block."""
    return [
        case
        for case in BAD_OBJECTS
        if case.kind == DVC
        and any(case.path.startswith(f"spec.{block}.") for block in BLOCK_PROVIDERS)
    ]


def _parse(obj: dict[str, Any], spc: StorageProviderClass | None = None) -> Any:
    spec = obj["spec"]
    block = next(b for b in BLOCK_PROVIDERS if b in spec)
    provider = REGISTRY.get(BLOCK_PROVIDERS[block])
    try:
        return provider.parse_config(
            spec[block],
            parameters=spc.provider_parameters if spc else {},
            connection=spc.connection if spc else None,
        )
    except InvalidObject as exc:
        raise qualify_config_errors(exc, block=block, class_name=spc.name if spc else None) from exc


@pytest.mark.parametrize("case", _block_cases(), ids=lambda case: case.id)
@pytest.mark.parametrize(
    "connection", [None, ConnectionPolicy.permissive()], ids=["no-class", "open"]
)
def test_providers_refuse_what_the_core_refuses(
    case: BadCase, connection: ConnectionPolicy | None
) -> None:
    spec = case.fresh()["spec"]
    block = next(b for b in BLOCK_PROVIDERS if b in spec)
    provider = REGISTRY.get(BLOCK_PROVIDERS[block])
    with pytest.raises(InvalidObject) as info:
        provider.parse_config(spec[block], parameters={}, connection=connection)
    paths = qualify_config_errors(info.value, block=block).paths
    assert any(p == case.path or p.startswith((f"{case.path}[", f"{case.path}.")) for p in paths), (
        paths
    )


def test_the_block_table_covers_every_builtin_provider() -> None:
    blocks = {next(b for b in BLOCK_PROVIDERS if b in c.fresh()["spec"]) for c in _block_cases()}
    assert blocks == set(BLOCK_PROVIDERS)
    assert len(_block_cases()) >= 25


@pytest.mark.parametrize("case", PROVIDER_BAD_CLAIMS, ids=lambda case: case.id)
def test_providers_refuse_provider_rules(case: BadCase) -> None:
    DynamicVolumeClaim.from_object(case.fresh())  # syntax is fine: the provider decides
    with pytest.raises(InvalidObject) as info:
        _parse(case.fresh())
    (error,) = info.value.errors
    assert error.path == case.path or error.path.startswith(f"{case.path}[")
    assert case.message in error.message


@pytest.mark.parametrize("case", POLICY_CASES, ids=lambda case: case.id)
def test_class_policy_refuses_and_names_the_claim_field(case: PolicyCase) -> None:
    spc = StorageProviderClass.from_object(case.spc("policy"))
    claim = case.claim("policy")
    DynamicVolumeClaim.from_object(claim)  # a valid claim, refused only by this class
    with pytest.raises(InvalidObject) as info:
        _parse(claim, spc)
    assert case.path in info.value.paths, str(info.value)
    assert any(case.message in e.message for e in info.value.errors if e.path == case.path)
    if case.allowed is not None:
        _parse(claim, StorageProviderClass.from_object(case.spc("policy", allowed=True)))


def test_policy_cases_cover_every_builtin_provider() -> None:
    assert {case.provider for case in POLICY_CASES} == set(BUILTIN_CONFIG_BLOCKS)


def test_the_crd_repeats_the_nfs_option_rules() -> None:
    crd = yaml.safe_load((CRDS / "dynamicvolumeclaims.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    items = spec["properties"]["nfsConfig"]["properties"]["options"]["items"]
    rules = [rule["rule"] for rule in items["x-kubernetes-validations"]]
    assert f"self.matches(r'{option_pattern()}')" in rules
    assert f"!self.matches(r'^({'|'.join(sorted(MANAGED))})(=.*)?$')" in rules
