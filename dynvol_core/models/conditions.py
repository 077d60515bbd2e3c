"""Status conditions (``metav1.Condition``) and the one way to update a list of them."""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Iterable
from typing import Any, Final

import attrs

from dynvol_core.errors import FieldError, InvalidObject
from dynvol_core.models.fields import Fields
from dynvol_core.models.freezing import format_time
from dynvol_core.validation import check_qualified_name

__all__ = ["MAX_MESSAGE", "Condition", "ConditionStatus", "set_condition"]

#: Bound on a condition's message (also in the CRD schema).
MAX_MESSAGE: Final = 32768


class ConditionStatus(enum.StrEnum):
    """``status`` of a condition."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


_CONDITION_REASON = re.compile(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?")


@attrs.frozen(kw_only=True)
class Condition:
    """A status condition following the Kubernetes API conventions (``metav1.Condition``).

    ``reason`` is a stable CamelCase word (``Mounted``, ``ProviderMismatch``) shared with
    Events and metrics; ``message`` is for humans.
    """

    type: str
    status: ConditionStatus
    reason: str
    message: str = ""
    last_transition_time: dt.datetime
    observed_generation: int | None = None

    def __attrs_post_init__(self) -> None:
        errors = check_qualified_name(self.type, "type")
        if not _CONDITION_REASON.fullmatch(self.reason) or len(self.reason) > 1024:
            errors.append(FieldError("reason", f"{self.reason!r} must be a CamelCase word"))
        if len(self.message) > MAX_MESSAGE:
            errors.append(FieldError("message", f"must be at most {MAX_MESSAGE} characters"))
        if errors:
            raise InvalidObject(errors, kind="Condition")

    @classmethod
    def from_object(cls, obj: object, path: str = "condition") -> Condition:
        """Parse a condition dict; :raises InvalidObject: naming the fields."""
        errors: list[FieldError] = []
        f = Fields(obj, path, errors)
        status_raw = f.string("status", required=True)
        try:
            status = ConditionStatus(status_raw)
        except ValueError:
            f.error("status", "must be True, False or Unknown")
            status = ConditionStatus.UNKNOWN
        when = f.timestamp("lastTransitionTime")
        if when is None and not f.has("lastTransitionTime"):
            f.error("lastTransitionTime", "required")
        generation = f.integer("observedGeneration", default=-1)
        kwargs = {
            "type": f.string("type", required=True),
            "reason": f.string("reason", required=True),
            "message": f.string("message"),
        }
        if errors:
            raise InvalidObject(errors, kind="Condition")
        try:
            return cls(
                status=status,
                last_transition_time=when or dt.datetime.fromtimestamp(0, dt.UTC),
                observed_generation=None if generation < 0 else generation,
                **kwargs,
            )
        except InvalidObject as exc:
            raise InvalidObject(
                [FieldError(f"{path}.{e.path}", e.message) for e in exc.errors], kind="Condition"
            ) from None

    def to_object(self) -> dict[str, Any]:
        """The wire form."""
        obj: dict[str, Any] = {
            "type": self.type,
            "status": str(self.status),
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": format_time(self.last_transition_time),
        }
        if self.observed_generation is not None:
            obj["observedGeneration"] = self.observed_generation
        return obj


def set_condition(conditions: Iterable[Condition], new: Condition) -> tuple[Condition, ...]:
    """Return ``conditions`` with ``new`` replacing the condition of the same type.

    As in ``meta.SetStatusCondition``, ``lastTransitionTime`` only moves when the status
    actually changes, so re-reporting the same state is a no-op for watchers.
    """
    result = []
    found = False
    for old in conditions:
        if old.type != new.type:
            result.append(old)
            continue
        found = True
        if old.status == new.status:
            new = attrs.evolve(new, last_transition_time=old.last_transition_time)
        result.append(new)
    if not found:
        result.append(new)
    return tuple(result)
