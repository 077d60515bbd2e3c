"""LabelSelector: Kubernetes semantics, validation, and the laws that hold between operators."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dynvol_core.errors import InvalidObject
from dynvol_core.selectors import LabelSelector, Operator, Requirement


def sel(obj: object) -> LabelSelector:
    return LabelSelector.from_object(obj, "spec.selector")


# ----------------------------------------------------------------------------- semantics


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({"matchLabels": {"app": "a"}}, {"app": "a"}, True),
        ({"matchLabels": {"app": "a"}}, {"app": "a", "x": "y"}, True),
        ({"matchLabels": {"app": "a"}}, {"app": "b"}, False),
        ({"matchLabels": {"app": "a"}}, {}, False),
        ({"matchLabels": {"app": ""}}, {"app": ""}, True),
        ({"matchLabels": {"app": ""}}, {}, False),
        (
            {"matchExpressions": [{"key": "t", "operator": "In", "values": ["a", "b"]}]},
            {"t": "b"},
            True,
        ),
        ({"matchExpressions": [{"key": "t", "operator": "In", "values": ["a"]}]}, {}, False),
        ({"matchExpressions": [{"key": "t", "operator": "NotIn", "values": ["a"]}]}, {}, True),
        (
            {"matchExpressions": [{"key": "t", "operator": "NotIn", "values": ["a"]}]},
            {"t": "a"},
            False,
        ),
        (
            {"matchExpressions": [{"key": "t", "operator": "NotIn", "values": ["a"]}]},
            {"t": "c"},
            True,
        ),
        ({"matchExpressions": [{"key": "t", "operator": "Exists"}]}, {"t": ""}, True),
        ({"matchExpressions": [{"key": "t", "operator": "Exists"}]}, {}, False),
        ({"matchExpressions": [{"key": "t", "operator": "DoesNotExist"}]}, {}, True),
        (
            {"matchExpressions": [{"key": "t", "operator": "DoesNotExist", "values": []}]},
            {"t": "x"},
            False,
        ),
        (
            {
                "matchLabels": {"app": "a"},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["web"]}],
            },
            {"app": "a", "tier": "db"},
            False,
        ),
    ],
)
def test_kubernetes_semantics(selector: object, labels: dict[str, str], expected: bool) -> None:
    assert sel(selector).matches(labels) is expected
    assert sel(selector).selects(labels) is expected


def test_empty_selector_matches_all_but_selects_nothing() -> None:
    for empty in ({}, None, {"matchLabels": {}, "matchExpressions": []}):
        selector = sel(empty)
        assert selector.is_empty
        assert selector.matches({"app": "x"})
        assert not selector.selects({"app": "x"})
        assert not selector.selects({})


def test_round_trip_and_canonical_form() -> None:
    obj = {
        "matchLabels": {"b": "2", "a": "1"},
        "matchExpressions": [{"key": "t", "operator": "In", "values": ["y", "x", "x"]}],
    }
    selector = sel(obj)
    assert selector.to_object() == {
        "matchLabels": {"a": "1", "b": "2"},
        "matchExpressions": [{"key": "t", "operator": "In", "values": ["x", "y"]}],
    }
    assert sel(selector.to_object()) == selector
    assert hash(sel(obj)) == hash(selector)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("obj", "path"),
    [
        ("app=a", "spec.selector"),
        ({"matchLabel": {"a": "b"}}, "spec.selector.matchLabel"),
        ({"matchLabels": ["a"]}, "spec.selector.matchLabels"),
        ({"matchLabels": {"bad key": "v"}}, "spec.selector.matchLabels"),
        ({"matchLabels": {"Example.com/app": "v"}}, "spec.selector.matchLabels"),
        ({"matchLabels": {"app": "-v"}}, "spec.selector.matchLabels[app]"),
        ({"matchLabels": {"app": "v" * 64}}, "spec.selector.matchLabels[app]"),
        ({"matchLabels": {f"k{i}": "v" for i in range(65)}}, "spec.selector.matchLabels"),
        ({"matchExpressions": {"key": "a"}}, "spec.selector.matchExpressions"),
        ({"matchExpressions": ["a"]}, "spec.selector.matchExpressions[0]"),
        ({"matchExpressions": [{"operator": "Exists"}]}, "spec.selector.matchExpressions[0].key"),
        (
            {"matchExpressions": [{"key": "a", "operator": "exists"}]},
            "spec.selector.matchExpressions[0].operator",
        ),
        ({"matchExpressions": [{"key": "a"}]}, "spec.selector.matchExpressions[0].operator"),
        (
            {"matchExpressions": [{"key": "a", "operator": "In", "values": []}]},
            "spec.selector.matchExpressions[0].values",
        ),
        (
            {"matchExpressions": [{"key": "a", "operator": "NotIn"}]},
            "spec.selector.matchExpressions[0].values",
        ),
        (
            {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
            "spec.selector.matchExpressions[0].values",
        ),
        (
            {"matchExpressions": [{"key": "a", "operator": "In", "values": "x"}]},
            "spec.selector.matchExpressions[0].values",
        ),
        (
            {"matchExpressions": [{"key": "a", "operator": "In", "values": ["ok", "-no"]}]},
            "spec.selector.matchExpressions[0].values[1]",
        ),
        (
            {"matchExpressions": [{"key": "a", "operator": "In", "values": ["x"], "op": 1}]},
            "spec.selector.matchExpressions[0].op",
        ),
    ],
)
def test_invalid_selectors_name_the_field(obj: object, path: str) -> None:
    with pytest.raises(InvalidObject) as info:
        sel(obj)
    assert path in info.value.paths, str(info.value)


def test_operator_message_lists_the_allowed_ones() -> None:
    with pytest.raises(InvalidObject, match="In, NotIn, Exists or DoesNotExist"):
        sel({"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["x"]}]})


# ----------------------------------------------------------------------------- laws

_KEYS = st.sampled_from(["app", "tier", "example.com/team", "x"])
_VALUES = st.sampled_from(["", "a", "b", "web", "db"])
_LABELS = st.dictionaries(_KEYS, _VALUES, max_size=4)
_VALUE_SETS = st.lists(_VALUES.filter(bool), min_size=1, max_size=3)


def _req(key: str, op: Operator, values: list[str] | None = None) -> LabelSelector:
    return LabelSelector(match_expressions=[Requirement(key, op, values or [])])


@settings(max_examples=50, deadline=None)
@given(_KEYS, _VALUES, _LABELS)
def test_match_labels_is_in_with_one_value(key: str, value: str, labels: dict[str, str]) -> None:
    assert LabelSelector(match_labels={key: value}).matches(labels) == _req(
        key, Operator.IN, [value]
    ).matches(labels)


@settings(max_examples=50, deadline=None)
@given(_KEYS, _VALUE_SETS, _LABELS)
def test_not_in_complements_in_when_key_present(
    key: str, values: list[str], labels: dict[str, str]
) -> None:
    in_ = _req(key, Operator.IN, values).matches(labels)
    not_in = _req(key, Operator.NOT_IN, values).matches(labels)
    if key in labels:
        assert in_ != not_in
    else:
        assert not in_
        assert not_in


@settings(max_examples=50, deadline=None)
@given(_KEYS, _LABELS)
def test_exists_and_does_not_exist_are_complementary(key: str, labels: dict[str, str]) -> None:
    assert _req(key, Operator.EXISTS).matches(labels) != _req(key, Operator.DOES_NOT_EXIST).matches(
        labels
    )


_SELECTORS = st.builds(
    lambda labels, exprs: LabelSelector(match_labels=labels, match_expressions=exprs),
    st.dictionaries(_KEYS, _VALUES, max_size=2),
    st.lists(
        st.one_of(
            st.builds(
                Requirement, _KEYS, st.sampled_from([Operator.IN, Operator.NOT_IN]), _VALUE_SETS
            ),
            st.builds(
                Requirement, _KEYS, st.sampled_from([Operator.EXISTS, Operator.DOES_NOT_EXIST])
            ),
        ),
        max_size=3,
    ),
)


@settings(max_examples=60, deadline=None)
@given(_SELECTORS, _LABELS, st.sampled_from(["unrelated", "other.io/k"]), _VALUES)
def test_unrelated_label_never_changes_a_match(
    selector: LabelSelector, labels: dict[str, str], key: str, value: str
) -> None:
    assume(key not in labels)
    assert selector.matches(labels) == selector.matches({**labels, key: value})


@settings(max_examples=50, deadline=None)
@given(_SELECTORS, _LABELS)
def test_wire_round_trip_preserves_meaning(selector: LabelSelector, labels: dict[str, str]) -> None:
    again = LabelSelector.from_object(selector.to_object())
    assert again == selector
    assert again.matches(labels) == selector.matches(labels)


@settings(max_examples=50, deadline=None)
@given(_SELECTORS, _LABELS)
def test_selects_is_matches_for_non_empty(selector: LabelSelector, labels: dict[str, str]) -> None:
    assert selector.selects(labels) == (not selector.is_empty and selector.matches(labels))
