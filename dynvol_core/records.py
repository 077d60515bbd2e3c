"""The node plugin's persisted record of a published CSI volume.

The CSI node plugin writes one record per volume (at ``XvolsLayout.record_path``) before it
touches the host, and updates its phase as publishing proceeds, so that after a restart it
can finish or undo what it started and find a pod's slot again. This module only converts
records to and from JSON; the node plugin does the file I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any, Final, Literal

import attrs

from dynvol_core.constants import POLICIES
from dynvol_core.errors import FieldError, InvalidObject, InvalidPath
from dynvol_core.paths import (
    PodSlot,
    XvolsLayout,
    validate_class_name,
    validate_uid,
    validate_volume_id,
)

__all__ = ["RECORD_FORMAT_VERSION", "RecordPhase", "VolumeRecord"]

#: Bumped whenever a change would make an older node plugin misread a record.
RECORD_FORMAT_VERSION: Final = 1

RecordPhase = Literal["publishing", "published", "unpublishing"]
_PHASES: Final = frozenset({"publishing", "published", "unpublishing"})
_KIND: Final = "VolumeRecord"


def _invalid(field: str, message: str) -> InvalidObject:
    return InvalidObject([FieldError(field, message)], kind=_KIND)


def _path_problem(check: Callable[[str], str]) -> Callable[[object], str | None]:
    def problem(value: object) -> str | None:
        try:
            check(value)  # type: ignore[arg-type]  # the checks reject non-strings themselves
        except InvalidPath as exc:
            return str(exc)
        return None

    return problem


def _non_empty_problem(value: object) -> str | None:
    return None if isinstance(value, str) and value else "must be a non-empty string"


def _one_of(allowed: frozenset[str]) -> Callable[[object], str | None]:
    def problem(value: object) -> str | None:
        return None if value in allowed else f"must be one of {sorted(allowed)}, not {value!r}"

    return problem


def _target_problem(value: object) -> str | None:
    path = PurePosixPath(value) if isinstance(value, str) else value
    if isinstance(path, PurePosixPath) and path.is_absolute() and ".." not in path.parts:
        return None
    return f"must be an absolute path without '..', not {value!r}"


def _bool_problem(value: object) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, not {value!r}"


# One check per field, shared by the constructor's validators and by from_json (which
# reports every bad field at once). Each returns what is wrong, or None.
_PROBLEMS: Final[dict[str, Callable[[object], str | None]]] = {
    "volume_id": _path_problem(validate_volume_id),
    "pod_uid": _path_problem(lambda v: validate_uid(v, what="pod UID")),
    "pod_name": _non_empty_problem,
    "pod_namespace": _non_empty_problem,
    "class_name": _path_problem(validate_class_name),
    "policy": _one_of(POLICIES),
    "slot_uuid": _path_problem(lambda v: validate_uid(v, what="slot UUID")),
    "target_path": _target_problem,
    "read_only": _bool_problem,
    "phase": _one_of(_PHASES),
}


def _validate(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    problem = _PROBLEMS[attribute.name](value)
    if problem is not None:
        raise _invalid(attribute.name, problem)


def _to_path(value: str | PurePosixPath) -> PurePosixPath:
    return value if isinstance(value, PurePosixPath) else PurePosixPath(value)


@attrs.frozen(kw_only=True)
class VolumeRecord:
    """What the node plugin knows about one published volume (one pod's dynvol volume).

    Every field is validated on construction; :meth:`from_json` reports malformed input as
    :class:`~dynvol_core.errors.InvalidObject` naming each bad field.
    """

    volume_id: str = attrs.field(validator=_validate)
    pod_uid: str = attrs.field(validator=_validate)
    pod_name: str = attrs.field(validator=_validate)
    pod_namespace: str = attrs.field(validator=_validate)
    class_name: str = attrs.field(validator=_validate)
    policy: str = attrs.field(validator=_validate)
    slot_uuid: str = attrs.field(validator=_validate)
    #: kubelet's target path, where the slot is bound.
    target_path: PurePosixPath = attrs.field(converter=_to_path, validator=_validate)
    read_only: bool = attrs.field(validator=_validate)
    phase: RecordPhase = attrs.field(validator=_validate)

    def slot(self, layout: XvolsLayout) -> PodSlot:
        """The pod's slot under ``layout``."""
        return layout.slot(self.class_name, self.slot_uuid, self.pod_uid)

    def with_phase(self, phase: RecordPhase) -> VolumeRecord:
        """A copy of this record in another phase."""
        return attrs.evolve(self, phase=phase)

    def to_json(self) -> str:
        """The record as a JSON document (stable key order, trailing newline)."""
        document: dict[str, object] = {
            "version": RECORD_FORMAT_VERSION,
            "volume_id": self.volume_id,
            "pod_uid": self.pod_uid,
            "pod_name": self.pod_name,
            "pod_namespace": self.pod_namespace,
            "class_name": self.class_name,
            "policy": self.policy,
            "slot_uuid": self.slot_uuid,
            "target_path": str(self.target_path),
            "read_only": self.read_only,
            "phase": self.phase,
        }
        return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> VolumeRecord:
        """Read a record written by :meth:`to_json`.

        Keys this release does not know are ignored (an additive change by a newer release
        does not bump the format version).

        :raises InvalidObject: if the text is not JSON, not an object, of another format
            version, or has missing or invalid fields; every problem is listed.
        """
        try:
            document = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _invalid("<document>", f"is not valid JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise _invalid("<document>", f"must be a JSON object, not {type(document).__name__}")
        version = document.get("version")
        if version != RECORD_FORMAT_VERSION or isinstance(version, bool):
            raise _invalid(
                "version",
                f"format version {version!r} is not supported (expected {RECORD_FORMAT_VERSION})",
            )

        errors: list[FieldError] = []
        values: dict[str, Any] = {}
        for name, problem_of in _PROBLEMS.items():
            if name not in document:
                errors.append(FieldError(name, "is required"))
                continue
            value = document[name]
            problem = problem_of(value)
            if name == "target_path" and not isinstance(value, str):
                problem = f"must be a string, not {type(value).__name__}"
            if problem is not None:
                errors.append(FieldError(name, problem))
            values[name] = value
        if errors:
            raise InvalidObject(errors, kind=_KIND)
        return cls(**values)
