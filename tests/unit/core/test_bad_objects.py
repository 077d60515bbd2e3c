"""The shared table of bad objects, through the core validators (the API is the other half)."""

from __future__ import annotations

import pytest

from dynvol_core.errors import InvalidObject
from dynvol_core.models import DynamicVolumeClaim, StorageProviderClass
from tests.cases.bad_objects import BAD_OBJECTS, DVC, EDGE_GOOD_OBJECTS, GOOD_OBJECTS, SPC, BadCase

_PARSERS = {SPC: StorageProviderClass.from_object, DVC: DynamicVolumeClaim.from_object}


def _names_path(path: str, expected: str) -> bool:
    # The core may be more precise than the API: spec.parameters[key], matchLabels[key].
    return path == expected or path.startswith((f"{expected}.", f"{expected}["))


def test_table_is_large_and_unique() -> None:
    ids = [case.id for case in BAD_OBJECTS]
    assert len(ids) == len(set(ids))
    assert len(BAD_OBJECTS) >= 24
    assert {case.kind for case in BAD_OBJECTS} == {SPC, DVC}


@pytest.mark.parametrize("case", BAD_OBJECTS, ids=lambda case: case.id)
def test_core_rejects_bad_object(case: BadCase) -> None:
    with pytest.raises(InvalidObject) as info:
        _PARSERS[case.kind](case.fresh())
    errors = info.value.errors
    named = [e for e in errors if _names_path(e.path, case.path)]
    assert named, f"no error names {case.path}: {info.value}"
    assert any(case.message in e.message for e in named), str(info.value)
    # The message says which object and which field, so users can act on it.
    assert case.path.split("[")[0] in str(info.value)


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
