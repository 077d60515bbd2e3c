"""The shared table of bad objects, through the core validators (the API is the other half).

The content of a built-in provider's block (``spec.s3Config.bucket``...) is that provider's
to judge, not the core's: the core takes it as it is, and the provider refuses it (here
through the registry, as the webhook, the node plugin and the DMP ask it).
"""

from __future__ import annotations

import pytest

from dynvol_core.errors import InvalidObject
from dynvol_core.models import TYPED_CONFIG_BLOCKS, DynamicVolumeClaim, StorageProviderClass
from dynvol_providers.registry import load_registry
from tests.cases.bad_objects import BAD_OBJECTS, DVC, EDGE_GOOD_OBJECTS, GOOD_OBJECTS, SPC, BadCase

_PARSERS = {SPC: StorageProviderClass.from_object, DVC: DynamicVolumeClaim.from_object}
_REGISTRY = load_registry()


def _in_provider_block(case: BadCase) -> bool:
    return case.kind == DVC and case.path.startswith(
        tuple(f"spec.{block}." for block in TYPED_CONFIG_BLOCKS)
    )


def _names_path(path: str, expected: str) -> bool:
    # The core may be more precise than the API: spec.parameters[key], matchLabels[key].
    return path == expected or path.startswith((f"{expected}.", f"{expected}["))


def test_table_is_large_and_unique() -> None:
    ids = [case.id for case in BAD_OBJECTS]
    assert len(ids) == len(set(ids))
    assert len(BAD_OBJECTS) >= 24
    assert {case.kind for case in BAD_OBJECTS} == {SPC, DVC}


@pytest.mark.parametrize(
    "case", [c for c in BAD_OBJECTS if not _in_provider_block(c)], ids=lambda case: case.id
)
def test_core_rejects_bad_object(case: BadCase) -> None:
    with pytest.raises(InvalidObject) as info:
        _PARSERS[case.kind](case.fresh())
    _check_names(info.value, case)


@pytest.mark.parametrize(
    "case", [c for c in BAD_OBJECTS if _in_provider_block(c)], ids=lambda case: case.id
)
def test_core_leaves_block_content_to_the_provider(case: BadCase) -> None:
    claim = DynamicVolumeClaim.from_object(case.fresh())
    with pytest.raises(InvalidObject) as info:
        _REGISTRY.parse_claim_config(claim.provider_config)
    assert any(_names_path(e.path, case.path) for e in info.value.errors), str(info.value)


def test_the_table_still_has_block_cases() -> None:
    assert len([c for c in BAD_OBJECTS if _in_provider_block(c)]) >= 25


def _check_names(exc: InvalidObject, case: BadCase) -> None:
    errors = exc.errors
    named = [e for e in errors if _names_path(e.path, case.path)]
    assert named, f"no error names {case.path}: {exc}"
    assert any(case.message in e.message for e in named), str(exc)
    # The message says which object and which field, so users can act on it.
    assert case.path.split("[")[0] in str(exc)


@pytest.mark.parametrize(
    "obj",
    [o for o in GOOD_OBJECTS if o["kind"] in _PARSERS],
    ids=lambda o: o["metadata"]["name"],
)
def test_core_accepts_seed_objects(obj: dict[str, object]) -> None:
    _PARSERS[str(obj["kind"])](obj)


def test_fresh_copies_do_not_share_state() -> None:
    case = next(c for c in BAD_OBJECTS if c.kind == DVC)
    one = case.fresh(namespace="elsewhere")
    one["spec"]["mountpoint"] = "/changed"
    assert case.fresh()["metadata"]["namespace"] == "default"
    assert case.fresh()["spec"] != one["spec"]


@pytest.mark.parametrize("obj", EDGE_GOOD_OBJECTS, ids=lambda o: o["metadata"]["name"])
def test_core_accepts_edge_objects(obj: dict[str, object]) -> None:
    _PARSERS[str(obj["kind"])](obj)
