"""Pod tolerations as dynvol reads them, checked as the apiserver checks them.

A Dynamic Mount Pod inherits the tolerations of the pods it serves
(:func:`dynvol_core.dispatch.dmp_tolerations`), so a pod's tolerations end up in a
privileged pod that dynvol creates: :meth:`Toleration.read` refuses anything the
apiserver would not store, naming the field.
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from dynvol_core.errors import FieldError
from dynvol_core.models.fields import Fields
from dynvol_core.validation import check_label_value, check_qualified_name

__all__ = ["EFFECTS", "OPERATORS", "Toleration"]

OPERATORS: Final = ("Equal", "Exists")
#: The taint effects; an empty effect in a toleration matches every effect.
EFFECTS: Final = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_FIELDS: Final = ("key", "operator", "value", "effect", "tolerationSeconds")


@attrs.frozen(kw_only=True)
class Toleration:
    """One entry of a pod's ``spec.tolerations``.

    ``operator`` is kept as written ("" means Equal to the apiserver), so that
    :meth:`to_object` gives back exactly what a pod holds.
    """

    key: str = ""
    operator: str = ""
    value: str = ""
    effect: str = ""
    seconds: int | None = None

    @classmethod
    def read(cls, raw: object, path: str, errors: list[FieldError]) -> Toleration | None:
        """Read one toleration at ``path``; None (with errors recorded) if it is malformed."""
        before = len(errors)
        fields = Fields(raw, path, errors)
        fields.only(_FIELDS, "a toleration")
        key = fields.string("key")
        operator = fields.string("operator")
        value = fields.string("value")
        effect = fields.string("effect")
        seconds = fields.obj.get("tolerationSeconds")
        if key:
            errors.extend(check_qualified_name(key, fields.at("key")))
        elif operator != "Exists":
            fields.error("operator", "must be Exists when the key is empty")
        if operator not in ("", *OPERATORS):
            fields.error("operator", f"must be one of {', '.join(OPERATORS)}, not {operator!r}")
        if operator == "Exists" and value:
            fields.error("value", "must be empty when the operator is Exists")
        elif value:
            errors.extend(check_label_value(value, fields.at("value")))
        if effect not in ("", *EFFECTS):
            fields.error("effect", f"must be empty or one of {', '.join(EFFECTS)}, not {effect!r}")
        if seconds is not None:
            if isinstance(seconds, bool) or not isinstance(seconds, int):
                fields.error("tolerationSeconds", "must be an integer")
                seconds = None
            elif effect != "NoExecute":
                fields.error("tolerationSeconds", "is only allowed with the effect NoExecute")
        if len(errors) > before:
            return None
        return cls(key=key, operator=operator, value=value, effect=effect, seconds=seconds)

    @property
    def is_equal(self) -> bool:
        """Whether the toleration matches one value (operator Equal, or empty)."""
        return self.operator != "Exists"

    def covers(self, other: Toleration) -> bool:
        """Whether every taint ``other`` tolerates (for as long) is tolerated by this one."""
        if self.effect and self.effect != other.effect:
            return False
        if self.key or self.is_equal:
            if self.key != other.key:
                return False
            if self.is_equal and (not other.is_equal or self.value != other.value):
                return False
        if self.seconds is not None:
            return other.seconds is not None and other.seconds <= self.seconds
        return True

    def unbounded(self) -> Toleration:
        """The same toleration without ``tolerationSeconds`` (tolerating for ever), its
        operator spelt out."""
        return attrs.evolve(self, seconds=None, operator=self.operator or "Equal")

    def to_object(self) -> dict[str, Any]:
        """The toleration as the API writes it (empty fields left out)."""
        out: dict[str, Any] = {
            k: v
            for k, v in (
                ("key", self.key),
                ("operator", self.operator),
                ("value", self.value),
                ("effect", self.effect),
            )
            if v
        }
        if self.seconds is not None:
            out["tolerationSeconds"] = self.seconds
        return out

    def sort_key(self) -> tuple[str, str, str, str, int]:
        """A total order, so that rendered lists do not depend on input order."""
        seconds = -1 if self.seconds is None else self.seconds
        return (self.key, self.effect, self.operator, self.value, seconds)
