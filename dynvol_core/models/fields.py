"""The field walker the models' ``from_object`` constructors read API objects with.

:class:`Fields` reads one JSON object and records a :class:`~dynvol_core.errors.FieldError`
(with its full field path) for each problem instead of raising, so a constructor can report
every problem of an object at once. :func:`read_meta` reads ``metadata``; the references it
holds (:class:`OwnerReference`, and :class:`ObjectRef` for Secrets) live here too.
Neighbours: :mod:`.freezing` (values), the per-kind modules (callers).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from dynvol_core.errors import FieldError, InvalidObject
from dynvol_core.models.freezing import FrozenMap, parse_time

__all__ = [
    "MAX_PARAMETER_VALUE",
    "Fields",
    "Meta",
    "ObjectRef",
    "OwnerReference",
    "raise_if_errors",
    "read_meta",
    "top_object",
]

#: Bound on parameter values and free-text fields (also in the CRD schema).
MAX_PARAMETER_VALUE: Final = 4096


class Fields:
    """Reads one JSON object, recording a FieldError for each problem instead of raising."""

    def __init__(self, obj: object, path: str, errors: list[FieldError]) -> None:
        self.path = path
        self.errors = errors
        if obj is None:
            obj = {}
        if not isinstance(obj, Mapping):
            errors.append(FieldError(path, f"must be an object, not {type(obj).__name__}"))
            obj = {}
        self.obj: Mapping[str, Any] = obj

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> None:
        self.errors.append(FieldError(self.at(key), message))

    def only(self, allowed: Iterable[str], what: str) -> None:
        allowed = tuple(allowed)
        for key in self.obj:
            if key not in allowed:
                self.error(key, f"unknown field in {what}; allowed fields: {', '.join(allowed)}")

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def string(self, key: str, *, required: bool = False, default: str = "") -> str:
        value = self.obj.get(key)
        if value is None:
            if required:
                self.error(key, "required")
            return default
        if not isinstance(value, str):
            self.error(key, f"must be a string, not {type(value).__name__}")
            return default
        return value

    def boolean(self, key: str, *, default: bool = False) -> bool:
        value = self.obj.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.error(key, f"must be a boolean (true or false), not {type(value).__name__}")
            return default
        return value

    def integer(self, key: str, *, default: int = 0) -> int:
        value = self.obj.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(key, f"must be an integer, not {type(value).__name__}")
            return default
        return value

    def str_map(self, key: str) -> dict[str, str]:
        value = self.obj.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.error(key, "must be a map of strings to strings")
            return {}
        result = {}
        for k, v in value.items():
            if not isinstance(v, str):
                self.errors.append(FieldError(f"{self.at(key)}[{k}]", "must be a string"))
            else:
                result[str(k)] = v
        return result

    def str_list(self, key: str) -> list[str] | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            self.error(key, "must be a list of strings")
            return None
        result = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.errors.append(FieldError(f"{self.at(key)}[{i}]", "must be a string"))
            else:
                result.append(item)
        return result

    def timestamp(self, key: str) -> dt.datetime | None:
        value = self.obj.get(key)
        if value is None:
            return None
        try:
            if not isinstance(value, str):
                raise ValueError("not a string")
            return parse_time(value)
        except ValueError:
            self.error(key, "must be an RFC 3339 timestamp such as 2024-10-18T08:00:00Z")
            return None

    def check(self, errors: list[FieldError]) -> bool:
        self.errors += errors
        return not errors


@attrs.frozen(kw_only=True)
class Meta:
    name: str
    namespace: str
    uid: str
    generation: int
    resource_version: str
    labels: FrozenMap[str, str]
    annotations: FrozenMap[str, str]
    finalizers: tuple[str, ...]
    deleting: bool
    creation_timestamp: dt.datetime | None
    owner_references: tuple[OwnerReference, ...]


def read_meta(obj: Mapping[str, Any], errors: list[FieldError], *, namespaced: bool) -> Meta:
    meta = Fields(obj.get("metadata"), "metadata", errors)
    name = meta.string("name", required=True)
    namespace = ""
    if namespaced:
        # The API always sets it; a manifest without one lands in "default", as with kubectl.
        namespace = meta.string("namespace", default="default")
    owners = []
    raw_owners = meta.obj.get("ownerReferences") or []
    if isinstance(raw_owners, list):
        for i, raw in enumerate(raw_owners):
            owner = OwnerReference.read(raw, f"metadata.ownerReferences[{i}]", errors)
            if owner is not None:
                owners.append(owner)
    return Meta(
        name=name,
        namespace=namespace,
        uid=meta.string("uid"),
        generation=meta.integer("generation"),
        resource_version=meta.string("resourceVersion"),
        labels=FrozenMap(meta.str_map("labels")),
        annotations=FrozenMap(meta.str_map("annotations")),
        finalizers=tuple(meta.str_list("finalizers") or ()),
        deleting=meta.obj.get("deletionTimestamp") is not None,
        creation_timestamp=meta.timestamp("creationTimestamp"),
        owner_references=tuple(owners),
    )


def raise_if_errors(errors: list[FieldError], kind: str, obj: Mapping[str, Any]) -> None:
    if errors:
        metadata = obj.get("metadata")
        name = metadata.get("name", "") if isinstance(metadata, Mapping) else ""
        raise InvalidObject(errors, kind=kind, name=name if isinstance(name, str) else "")


def top_object(obj: object, kind: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise InvalidObject([FieldError("", f"a {kind} must be an object")], kind=kind)
    return obj


@attrs.frozen
class ObjectRef:
    """A reference to a namespaced object by name (here: the credentials Secret)."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@attrs.frozen(kw_only=True)
class OwnerReference:
    """``metadata.ownerReferences[]`` entry."""

    api_version: str
    kind: str
    name: str
    uid: str
    controller: bool | None = None
    block_owner_deletion: bool | None = None

    @classmethod
    def read(cls, raw: object, path: str, errors: list[FieldError]) -> OwnerReference | None:
        f = Fields(raw, path, errors)
        before = len(errors)
        ref = cls(
            api_version=f.string("apiVersion", required=True),
            kind=f.string("kind", required=True),
            name=f.string("name", required=True),
            uid=f.string("uid", required=True),
            controller=f.obj.get("controller")
            if isinstance(f.obj.get("controller"), bool)
            else None,
            block_owner_deletion=(
                f.obj.get("blockOwnerDeletion")
                if isinstance(f.obj.get("blockOwnerDeletion"), bool)
                else None
            ),
        )
        return ref if len(errors) == before else None

    def to_object(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
        }
        if self.controller is not None:
            obj["controller"] = self.controller
        if self.block_owner_deletion is not None:
            obj["blockOwnerDeletion"] = self.block_owner_deletion
        return obj
