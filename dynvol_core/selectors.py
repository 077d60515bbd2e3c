"""Label selectors with the exact semantics of Kubernetes' ``metav1.LabelSelector``.

- ``matchLabels`` entries and ``matchExpressions`` requirements are ANDed.
- ``In``: the key is present and its value is one of ``values``.
- ``NotIn``: the key is absent, or its value is not one of ``values``.
- ``Exists`` / ``DoesNotExist``: the key is present / absent; ``values`` must be empty.
- An empty selector matches every set of labels (:meth:`LabelSelector.matches`), as in
  Kubernetes. A DynamicVolumeClaim is stricter: an empty claim selector selects nothing,
  which is what :meth:`LabelSelector.selects` implements and what dispatch uses, so a claim
  with a forgotten selector can never mount into every pod of its namespace.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from dynvol_core.errors import FieldError, InvalidObject
from dynvol_core.validation import check_label_value, check_qualified_name

__all__ = ["LabelSelector", "Operator", "Requirement"]

#: Bounds matching the CRD schema, so that CEL cost stays small and objects stay readable.
MAX_MATCH_LABELS: Final = 64
MAX_MATCH_EXPRESSIONS: Final = 64
MAX_VALUES: Final = 64


class Operator(enum.StrEnum):
    """A ``matchExpressions`` operator."""

    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


def _sorted_values(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(values)))


def _requirements(values: Iterable[Requirement]) -> tuple[Requirement, ...]:
    return tuple(values)


@attrs.frozen
class Requirement:
    """One ``matchExpressions`` entry; values are kept sorted and de-duplicated."""

    key: str
    operator: Operator
    values: tuple[str, ...] = attrs.field(default=(), converter=_sorted_values)

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` satisfy this requirement."""
        if self.operator is Operator.EXISTS:
            return self.key in labels
        if self.operator is Operator.DOES_NOT_EXIST:
            return self.key not in labels
        present = self.key in labels and labels[self.key] in self.values
        return present if self.operator is Operator.IN else not present

    def to_object(self) -> dict[str, Any]:
        """The wire form."""
        obj: dict[str, Any] = {"key": self.key, "operator": str(self.operator)}
        if self.values:
            obj["values"] = list(self.values)
        return obj


def _labels_converter(
    value: Mapping[str, str] | Iterable[tuple[str, str]],
) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted(items))


@attrs.frozen
class LabelSelector:
    """A validated label selector. Build it with :meth:`from_object` from the wire form."""

    match_labels: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_labels_converter)
    match_expressions: tuple[Requirement, ...] = attrs.field(default=(), converter=_requirements)

    @classmethod
    def from_object(cls, obj: object, path: str = "selector") -> LabelSelector:
        """Parse and validate a ``metav1.LabelSelector`` dict.

        :raises InvalidObject: naming ``path`` and the offending sub-fields.
        """
        errors: list[FieldError] = []
        if obj is None:
            return cls()
        if not isinstance(obj, Mapping):
            raise InvalidObject([FieldError(path, "must be an object")])
        for key in obj:
            if key not in ("matchLabels", "matchExpressions"):
                errors.append(
                    FieldError(
                        f"{path}.{key}",
                        "unknown field; a selector has only matchLabels and matchExpressions",
                    )
                )
        labels = _parse_match_labels(obj.get("matchLabels"), f"{path}.matchLabels", errors)
        exprs = _parse_expressions(obj.get("matchExpressions"), f"{path}.matchExpressions", errors)
        if errors:
            raise InvalidObject(errors)
        return cls(match_labels=labels, match_expressions=exprs)

    @property
    def is_empty(self) -> bool:
        """Whether the selector has no terms at all."""
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Kubernetes semantics: every term holds; an empty selector matches everything."""
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.match_expressions
        )

    def selects(self, labels: Mapping[str, str]) -> bool:
        """Claim semantics: like :meth:`matches`, but an empty selector selects nothing."""
        return not self.is_empty and self.matches(labels)

    def to_object(self) -> dict[str, Any]:
        """The wire form (omitting empty parts)."""
        obj: dict[str, Any] = {}
        if self.match_labels:
            obj["matchLabels"] = dict(self.match_labels)
        if self.match_expressions:
            obj["matchExpressions"] = [r.to_object() for r in self.match_expressions]
        return obj


def _parse_match_labels(
    raw: object, path: str, errors: list[FieldError]
) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        errors.append(FieldError(path, "must be a map of label keys to values"))
        return ()
    if len(raw) > MAX_MATCH_LABELS:
        errors.append(FieldError(path, f"must have at most {MAX_MATCH_LABELS} entries"))
    result = []
    for key, value in raw.items():
        key_errors = check_qualified_name(key, path)
        value_errors = check_label_value(value, f"{path}[{key}]")
        errors += key_errors + value_errors
        if not key_errors and not value_errors:
            result.append((key, value))
    return tuple(result)


def _parse_expressions(raw: object, path: str, errors: list[FieldError]) -> tuple[Requirement, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        errors.append(FieldError(path, "must be a list of {key, operator, values}"))
        return ()
    if len(raw) > MAX_MATCH_EXPRESSIONS:
        errors.append(FieldError(path, f"must have at most {MAX_MATCH_EXPRESSIONS} entries"))
    result = []
    for i, item in enumerate(raw):
        here = f"{path}[{i}]"
        if not isinstance(item, Mapping):
            errors.append(FieldError(here, "must be an object with key, operator and values"))
            continue
        before = len(errors)
        for field in item:
            if field not in ("key", "operator", "values"):
                errors.append(FieldError(f"{here}.{field}", "unknown field"))
        key = item.get("key")
        if key is None:
            errors.append(FieldError(f"{here}.key", "required"))
        else:
            errors += check_qualified_name(key, f"{here}.key")
        op_raw = item.get("operator")
        try:
            op = Operator(str(op_raw))
        except ValueError:
            errors.append(
                FieldError(
                    f"{here}.operator",
                    f"unsupported operator {op_raw!r}: use In, NotIn, Exists or DoesNotExist",
                )
            )
            continue
        values = item.get("values")
        if values is None:
            values = []
        if not isinstance(values, list):
            errors.append(FieldError(f"{here}.values", "must be a list of strings"))
            continue
        if op in (Operator.IN, Operator.NOT_IN) and not values:
            errors.append(FieldError(f"{here}.values", f"must be non-empty for operator {op}"))
        if op in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and values:
            errors.append(FieldError(f"{here}.values", f"must be empty for operator {op}"))
        if len(values) > MAX_VALUES:
            errors.append(FieldError(f"{here}.values", f"must have at most {MAX_VALUES} items"))
        for j, value in enumerate(values):
            errors += check_label_value(value, f"{here}.values[{j}]")
        if len(errors) == before:
            assert isinstance(key, str)
            result.append(Requirement(key=key, operator=op, values=values))
    return tuple(result)
