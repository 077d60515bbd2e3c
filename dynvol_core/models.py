"""The API objects dynvol works with, as validated, immutable values.

Each model has a named constructor ``from_object(obj)`` that takes the object as the
Kubernetes API returns it (a plain dict, camelCase keys) and either returns a value or
raises :class:`~dynvol_core.errors.InvalidObject` listing every problem with its field path.
:class:`DynamicVolumeMount` also has ``to_object()``, because dynvol writes those. The models
do not depend on any Kubernetes client library.

Unknown fields in a ``spec`` are errors, mirroring the CRDs' structural schemas (which prune
or, with strict field validation, reject them); a misspelt ``readonly`` must not silently
mount read-write.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, TypeVar

import attrs

from dynvol_core import constants as c
from dynvol_core.errors import FieldError, InvalidObject
from dynvol_core.quantities import Quantity, parse_quantity
from dynvol_core.selectors import LabelSelector
from dynvol_core.validation import (
    HostKind,
    check_bucket_name,
    check_dns1123_label,
    check_dns1123_subdomain,
    check_endpoint,
    check_host_pattern,
    check_hostname,
    check_nfs_path,
    check_nfs_server,
    check_qualified_name,
    check_rclone_type,
    check_s3_prefix,
    classify_host,
    has_control_chars,
    host_matches,
    normalize_mountpoint,
)

__all__ = [
    "BUILTIN_CONFIG_BLOCKS",
    "CONFIG_BLOCKS",
    "Condition",
    "ConditionStatus",
    "ConnectionPolicy",
    "DynamicVolumeClaim",
    "DynamicVolumeMount",
    "FrozenMap",
    "InjectedVolume",
    "MountPhase",
    "MountResources",
    "MountSpec",
    "MountStatus",
    "ObjectRef",
    "OwnerReference",
    "PodInfo",
    "ProviderConfig",
    "StorageProviderClass",
    "format_time",
    "freeze_json",
    "parse_time",
    "set_condition",
    "thaw_json",
]

K = TypeVar("K")
V = TypeVar("V")

#: The config block each built-in provider takes; any other provider takes ``config``.
BUILTIN_CONFIG_BLOCKS: Final[Mapping[str, str]] = {
    c.PROVIDER_S3: "s3Config",
    c.PROVIDER_NFS: "nfsConfig",
    c.PROVIDER_RCLONE: "rcloneConfig",
}
#: Every provider config block a claim may carry (exactly one of them).
CONFIG_BLOCKS: Final = ("s3Config", "nfsConfig", "rcloneConfig", "config")
#: Bound on parameter values and free-text fields (also in the CRD schema).
MAX_PARAMETER_VALUE: Final = 4096
MAX_MESSAGE: Final = 32768
MAX_ALLOWED_NAMESPACES: Final = 256


# --------------------------------------------------------------------------- values


class FrozenMap(Mapping[K, V]):
    """An immutable, hashable mapping (for labels, parameters and free-form config)."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._data: dict[K, V] = dict(data)
        self._hash: int | None = None

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


def freeze_json(value: object) -> object:
    """A deep, hashable copy of a JSON value: objects become FrozenMap, arrays tuples."""
    if isinstance(value, Mapping):
        return FrozenMap((str(k), freeze_json(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return tuple(freeze_json(v) for v in value)
    return value


def thaw_json(value: object) -> Any:
    """The inverse of :func:`freeze_json`: plain dicts and lists, ready to serialise."""
    if isinstance(value, Mapping):
        return {k: thaw_json(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [thaw_json(v) for v in value]
    return value


def _str_map(value: Mapping[str, str] | Iterable[tuple[str, str]]) -> FrozenMap[str, str]:
    return value if isinstance(value, FrozenMap) else FrozenMap(value)


def _json_map(value: Mapping[str, object]) -> FrozenMap[str, object]:
    frozen = freeze_json(value)
    assert isinstance(frozen, FrozenMap)
    return frozen


def parse_time(value: str) -> dt.datetime:
    """Parse an RFC 3339 timestamp as the API writes it (``2024-10-18T08:00:00Z``)."""
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no time zone")
    return parsed.astimezone(dt.UTC)


def format_time(value: dt.datetime) -> str:
    """Format a timestamp the way ``metav1.Time`` does: UTC, whole seconds, 'Z'."""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- field reading


class _Fields:
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
class _Meta:
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


def _read_meta(obj: Mapping[str, Any], errors: list[FieldError], *, namespaced: bool) -> _Meta:
    meta = _Fields(obj.get("metadata"), "metadata", errors)
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
    return _Meta(
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


def _raise(errors: list[FieldError], kind: str, obj: Mapping[str, Any]) -> None:
    if errors:
        metadata = obj.get("metadata")
        name = metadata.get("name", "") if isinstance(metadata, Mapping) else ""
        raise InvalidObject(errors, kind=kind, name=name if isinstance(name, str) else "")


def _top(obj: object, kind: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise InvalidObject([FieldError("", f"a {kind} must be an object")], kind=kind)
    return obj


# --------------------------------------------------------------------------- shared parts


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
        f = _Fields(raw, path, errors)
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
        f = _Fields(obj, path, errors)
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


# --------------------------------------------------------------------------- StorageProviderClass


@attrs.frozen(kw_only=True)
class MountResources:
    """CPU and memory for the Dynamic Mount Pods of a class (any of them may be unset)."""

    cpu_request: Quantity | None = None
    memory_request: Quantity | None = None
    cpu_limit: Quantity | None = None
    memory_limit: Quantity | None = None

    def to_object(self) -> dict[str, dict[str, str]]:
        """A container ``resources`` dict (only the parts that are set)."""
        obj: dict[str, dict[str, str]] = {}
        for section, cpu, memory in (
            ("requests", self.cpu_request, self.memory_request),
            ("limits", self.cpu_limit, self.memory_limit),
        ):
            part = {k: q.text for k, q in (("cpu", cpu), ("memory", memory)) if q is not None}
            if part:
                obj[section] = part
        return obj


_RESOURCE_PARAMS = (
    ("cpu_request", c.PARAM_MOUNT_CPU_REQUEST),
    ("memory_request", c.PARAM_MOUNT_MEMORY_REQUEST),
    ("cpu_limit", c.PARAM_MOUNT_CPU_LIMIT),
    ("memory_limit", c.PARAM_MOUNT_MEMORY_LIMIT),
)
_PREFIX = c.GROUP + "/"


#: Bounds of ``spec.connection`` (also in the CRD schema).
MAX_PINNED: Final = 16
MAX_ALLOWED_HOSTS: Final = 64
_PINNED_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_CONNECTION_FIELDS = (
    "pinned",
    "allowedHosts",
    "allowLoopback",
    "allowClusterLocal",
    "allowPrivateNetworks",
    "allowLinkLocal",
)
_KIND_FLAGS: Final[Mapping[HostKind, str]] = {
    HostKind.LOOPBACK: "allowLoopback",
    HostKind.CLUSTER_LOCAL: "allowClusterLocal",
    HostKind.PRIVATE: "allowPrivateNetworks",
    HostKind.LINK_LOCAL: "allowLinkLocal",
}


@attrs.frozen(kw_only=True)
class ConnectionPolicy:
    """Where a class lets its credentials go: ``spec.connection`` of a StorageProviderClass.

    ``pinned`` fixes connection fields (their names belong to the provider: ``endpoint`` and
    ``region`` for s3, ``server`` and ``exportPrefix`` for nfs, ``type`` and rclone option
    names for rclone); a claim may leave them out or repeat them, never change them.
    Hosts that claims name (not pinned ones, which the class's author wrote) must match
    ``allowed_hosts`` when it is not empty, and must not be loopback, cluster-local, private
    or link-local/metadata addresses unless the matching ``allow_*`` flag is set. Reserved
    and multicast addresses are always refused. Names are not resolved: pin the endpoint to
    rule out DNS tricks.
    """

    pinned: FrozenMap[str, str] = attrs.field(factory=FrozenMap, converter=_str_map)
    allowed_hosts: tuple[str, ...] = ()
    allow_loopback: bool = False
    allow_cluster_local: bool = False
    allow_private_networks: bool = False
    allow_link_local: bool = False

    @classmethod
    def permissive(cls) -> ConnectionPolicy:
        """A policy that allows every host kind (for a class that trusts its claims)."""
        return cls(
            allow_loopback=True,
            allow_cluster_local=True,
            allow_private_networks=True,
            allow_link_local=True,
        )

    @classmethod
    def from_object(cls, obj: object, path: str, errors: list[FieldError]) -> ConnectionPolicy:
        """Read ``spec.connection``, appending a FieldError per problem to ``errors``."""
        f = _Fields(obj, path, errors)
        f.only(_CONNECTION_FIELDS, "connection")
        pinned = f.str_map("pinned")
        if len(pinned) > MAX_PINNED:
            f.error("pinned", f"at most {MAX_PINNED} fields")
        for key, value in pinned.items():
            where = f"{f.at('pinned')}[{key}]"
            if not _PINNED_KEY.fullmatch(key):
                errors.append(FieldError(where, "field names are letters, digits and '_'"))
            if not value or len(value) > MAX_PARAMETER_VALUE or has_control_chars(value):
                errors.append(
                    FieldError(
                        where, f"must be 1-{MAX_PARAMETER_VALUE} characters without control chars"
                    )
                )
        hosts = f.str_list("allowedHosts") or []
        if len(hosts) > MAX_ALLOWED_HOSTS:
            f.error("allowedHosts", f"at most {MAX_ALLOWED_HOSTS} items")
        for i, host in enumerate(hosts):
            errors.extend(check_host_pattern(host, f"{f.at('allowedHosts')}[{i}]"))
        return cls(
            pinned=pinned,
            allowed_hosts=tuple(hosts),
            allow_loopback=f.boolean("allowLoopback"),
            allow_cluster_local=f.boolean("allowClusterLocal"),
            allow_private_networks=f.boolean("allowPrivateNetworks"),
            allow_link_local=f.boolean("allowLinkLocal"),
        )

    def to_object(self) -> dict[str, Any]:
        """``spec.connection`` as the API stores it (defaults left out)."""
        obj: dict[str, Any] = {}
        if self.pinned:
            obj["pinned"] = dict(self.pinned)
        if self.allowed_hosts:
            obj["allowedHosts"] = list(self.allowed_hosts)
        for flag, value in (
            ("allowLoopback", self.allow_loopback),
            ("allowClusterLocal", self.allow_cluster_local),
            ("allowPrivateNetworks", self.allow_private_networks),
            ("allowLinkLocal", self.allow_link_local),
        ):
            if value:
                obj[flag] = True
        return obj

    def allows_kind(self, kind: HostKind) -> bool:
        """Whether hosts of ``kind`` may be named by claims of this class."""
        return {
            HostKind.PUBLIC: True,
            HostKind.LOOPBACK: self.allow_loopback,
            HostKind.CLUSTER_LOCAL: self.allow_cluster_local,
            HostKind.PRIVATE: self.allow_private_networks,
            HostKind.LINK_LOCAL: self.allow_link_local,
            HostKind.RESERVED: False,
        }[kind]

    def check_host(self, host: str, path: str) -> list[FieldError]:
        """Errors naming ``path`` if a claim may not send this class's credentials to ``host``."""
        errors = check_hostname(host, path)
        if errors:
            return errors
        kind = classify_host(host)
        if not self.allows_kind(kind):
            if kind is HostKind.RESERVED:
                why = "a reserved or multicast address, never a storage server"
            else:
                why = (
                    f"a {kind.value} address; the StorageProviderClass must set "
                    f"spec.connection.{_KIND_FLAGS[kind]}: true to allow it"
                )
            return [FieldError(path, f"host {host!r} is {why}")]
        if self.allowed_hosts and not host_matches(host, self.allowed_hosts):
            return [
                FieldError(
                    path,
                    f"host {host!r} is not one the StorageProviderClass allows "
                    f"(spec.connection.allowedHosts: {', '.join(self.allowed_hosts)})",
                )
            ]
        return []

    def pin(self, key: str, value: object, path: str) -> tuple[str | None, list[FieldError]]:
        """The value of connection field ``key``: the pinned one if the class pins it.

        Returns ``(value, errors)``: ``value`` is the pinned value, or ``value`` itself (as
        given, possibly None) when ``key`` is not pinned; an error names ``path`` when the
        claim gives a different value from the pinned one.
        """
        pinned = self.pinned.get(key)
        if pinned is None:
            return (value if isinstance(value, str) else None), []
        if value in (None, "") or value == pinned:
            return pinned, []
        return pinned, [
            FieldError(
                path,
                f"the StorageProviderClass pins {key} to {pinned!r} "
                f"(spec.connection.pinned[{key}]); leave it out of the claim or use that value",
            )
        ]


@attrs.frozen(kw_only=True)
class StorageProviderClass:
    """A cluster-scoped StorageProviderClass: which provider, its credentials and limits."""

    name: str
    uid: str = ""
    generation: int = 0
    provider: str
    parameters: FrozenMap[str, str] = attrs.field(factory=FrozenMap, converter=_str_map)
    secret_ref: ObjectRef | None = None
    resources: MountResources = attrs.field(factory=MountResources)
    allowed_namespaces: tuple[str, ...] | None = None
    #: ``spec.connection``: where claims may send the class's credentials.
    connection: ConnectionPolicy = attrs.field(factory=ConnectionPolicy)
    finalizers: tuple[str, ...] = ()
    deleting: bool = False

    @classmethod
    def from_object(cls, obj: object) -> StorageProviderClass:
        """Parse a StorageProviderClass; :raises InvalidObject: listing every problem."""
        top = _top(obj, c.KIND_CLASS)
        errors: list[FieldError] = []
        meta = _read_meta(top, errors, namespaced=False)
        spec = _Fields(top.get("spec"), "spec", errors)
        if "spec" not in top:
            errors.append(FieldError("spec", "required"))
        spec.only(
            ("provider", "parameters", "allowedNamespaces", "connection"), "a StorageProviderClass"
        )
        provider = spec.string("provider", required=True)
        if provider:
            spec.check(check_dns1123_label(provider, "spec.provider"))
        params = spec.str_map("parameters")
        secret_ref = _read_secret_ref(params, errors)
        resources = _read_resources(params, errors)
        for key, value in params.items():
            where = f"spec.parameters[{key}]"
            if key.startswith(_PREFIX) and key not in c.KNOWN_PARAMETERS:
                known = ", ".join(sorted(k.removeprefix(_PREFIX) for k in c.KNOWN_PARAMETERS))
                errors.append(
                    FieldError(
                        where, f"unknown dynvol parameter; known ones are {_PREFIX}{{{known}}}"
                    )
                )
            if not key or len(key) > 317 or has_control_chars(key):
                errors.append(FieldError(where, "keys must be 1-317 printable characters"))
            if len(value) > MAX_PARAMETER_VALUE:
                errors.append(FieldError(where, f"must be at most {MAX_PARAMETER_VALUE} chars"))
        allowed = spec.str_list("allowedNamespaces")
        if allowed is not None:
            if len(allowed) > MAX_ALLOWED_NAMESPACES:
                spec.error("allowedNamespaces", f"at most {MAX_ALLOWED_NAMESPACES} items")
            for i, ns in enumerate(allowed):
                spec.check(check_dns1123_label(ns, f"spec.allowedNamespaces[{i}]"))
        connection = ConnectionPolicy.from_object(
            spec.obj.get("connection"), "spec.connection", errors
        )
        _raise(errors, c.KIND_CLASS, top)
        return cls(
            name=meta.name,
            uid=meta.uid,
            generation=meta.generation,
            provider=provider,
            parameters=params,
            secret_ref=secret_ref,
            resources=resources,
            allowed_namespaces=None if allowed is None else tuple(allowed),
            connection=connection,
            finalizers=meta.finalizers,
            deleting=meta.deleting,
        )

    @property
    def provider_parameters(self) -> FrozenMap[str, str]:
        """The parameters meant for the provider: all but dynvol's own (prefixed) keys."""
        return FrozenMap((k, v) for k, v in self.parameters.items() if not k.startswith(_PREFIX))

    def allows_namespace(self, namespace: str) -> bool:
        """Whether claims and pods in ``namespace`` may use this class."""
        return self.allowed_namespaces is None or namespace in self.allowed_namespaces


def _read_secret_ref(params: Mapping[str, str], errors: list[FieldError]) -> ObjectRef | None:
    name = params.get(c.PARAM_SECRET_NAME)
    namespace = params.get(c.PARAM_SECRET_NAMESPACE)
    if name is None and namespace is None:
        return None
    if name is None or namespace is None:
        missing = c.PARAM_SECRET_NAME if name is None else c.PARAM_SECRET_NAMESPACE
        errors.append(
            FieldError(
                f"spec.parameters[{missing}]",
                "required: the Secret's name and namespace must be given together",
            )
        )
        return None
    bad = check_dns1123_subdomain(name, f"spec.parameters[{c.PARAM_SECRET_NAME}]")
    bad += check_dns1123_label(namespace, f"spec.parameters[{c.PARAM_SECRET_NAMESPACE}]")
    errors += bad
    return None if bad else ObjectRef(namespace=namespace, name=name)


def _read_resources(params: Mapping[str, str], errors: list[FieldError]) -> MountResources:
    parsed: dict[str, Quantity | None] = {}
    for attr, key in _RESOURCE_PARAMS:
        text = params.get(key)
        parsed[attr] = None
        if text is None:
            continue
        try:
            quantity = parse_quantity(text)
        except ValueError as exc:
            errors.append(FieldError(f"spec.parameters[{key}]", str(exc)))
            continue
        if quantity.is_negative:
            errors.append(FieldError(f"spec.parameters[{key}]", f"{text!r} must not be negative"))
            continue
        parsed[attr] = quantity
    for resource in ("cpu", "memory"):
        request, limit = parsed[f"{resource}_request"], parsed[f"{resource}_limit"]
        if request is not None and limit is not None and request > limit:
            key = dict(_RESOURCE_PARAMS)[f"{resource}_request"]
            errors.append(
                FieldError(
                    f"spec.parameters[{key}]",
                    f"{resource} request {request.text} must not exceed the "
                    f"{resource} limit {limit.text}",
                )
            )
    return MountResources(**parsed)


# --------------------------------------------------------------------------- DynamicVolumeClaim


@attrs.frozen
class ProviderConfig:
    """A claim's provider configuration: which block (``kind``) and its values.

    ``kind`` is the block's field name (``s3Config``, ``nfsConfig``, ``rcloneConfig`` or
    ``config``); ``values`` is its content, deeply frozen. Never holds secrets.
    """

    kind: str
    values: FrozenMap[str, object] = attrs.field(factory=FrozenMap, converter=_json_map)

    def to_object(self) -> dict[str, Any]:
        """The values as a plain dict."""
        result: dict[str, Any] = thaw_json(self.values)
        return result


_S3_FIELDS = ("bucket", "endpoint", "region", "prefix", "pathStyle")
_NFS_FIELDS = ("server", "path", "version", "options")
# Mount options the NFS provider passes to mount(8) -o; one option per item.
_NFS_OPTION = re.compile(r"[A-Za-z0-9_.=:/+-]{1,128}")
_NFS_MAX_OPTIONS = 32
_NFS_VERSIONS = ("3", "4", "4.0", "4.1", "4.2")
_RCLONE_FIELDS = ("type", "remotePath", "parameters")
_RCLONE_PARAM = re.compile(r"[a-z][a-z0-9_]{0,63}")
_REGION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_CLAIM_FIELDS = (
    "storageProvider",
    "storageProviderClass",
    "mountpoint",
    "readOnly",
    "selector",
    *CONFIG_BLOCKS,
)


def _read_s3(f: _Fields) -> None:
    f.only(_S3_FIELDS, "s3Config")
    bucket = f.obj.get("bucket")
    if bucket is None:
        f.error("bucket", "required")
    else:
        f.check(check_bucket_name(bucket, f.at("bucket")))
    if f.has("endpoint"):
        f.check(check_endpoint(f.obj["endpoint"], f.at("endpoint")))
    region = f.string("region")
    if region and not _REGION.fullmatch(region):
        f.error("region", f"{region!r} must be 1-64 letters, digits, '-' or '_'")
    if f.has("prefix"):
        f.check(check_s3_prefix(f.obj["prefix"], f.at("prefix")))
    f.boolean("pathStyle")


def _read_nfs(f: _Fields) -> None:
    f.only(_NFS_FIELDS, "nfsConfig")
    for key, check in (("server", check_nfs_server), ("path", check_nfs_path)):
        if not f.has(key):
            f.error(key, "required")
        else:
            f.check(check(f.obj[key], f.at(key)))
    version = f.string("version")
    if version and version not in _NFS_VERSIONS:
        f.error("version", f"{version!r} must be one of {', '.join(_NFS_VERSIONS)}")
    if f.has("options"):
        options = f.obj["options"]
        if not isinstance(options, list) or len(options) > _NFS_MAX_OPTIONS:
            f.error("options", f"must be a list of at most {_NFS_MAX_OPTIONS} mount options")
        else:
            for index, option in enumerate(options):
                if not isinstance(option, str) or not _NFS_OPTION.fullmatch(option):
                    f.error(
                        f"options[{index}]",
                        f"{option!r} must be one mount option such as 'hard' or 'timeo=600': "
                        "letters, digits and _.=:/+- only, no commas or spaces",
                    )


def _read_rclone(f: _Fields) -> None:
    f.only(_RCLONE_FIELDS, "rcloneConfig")
    if not f.has("type"):
        f.error("type", "required")
    else:
        f.check(check_rclone_type(f.obj["type"], f.at("type")))
    remote_path = f.string("remotePath")
    if has_control_chars(remote_path) or len(remote_path) > 1024:
        f.error("remotePath", "must be at most 1024 characters without control characters")
    for key, value in f.str_map("parameters").items():
        where = f"{f.at('parameters')}[{key}]"
        if not _RCLONE_PARAM.fullmatch(key):
            f.errors.append(
                FieldError(where, "rclone option names are lowercase words joined by '_'")
            )
        if "\x00" in value or len(value) > MAX_PARAMETER_VALUE:
            f.errors.append(FieldError(where, f"must be at most {MAX_PARAMETER_VALUE} chars"))


_BLOCK_READERS = {"s3Config": _read_s3, "nfsConfig": _read_nfs, "rcloneConfig": _read_rclone}


@attrs.frozen(kw_only=True)
class DynamicVolumeClaim:
    """A namespaced DynamicVolumeClaim: mount this storage at ``mountpoint`` in matching pods.

    ``mountpoint`` is normalised (see :func:`~dynvol_core.validation.normalize_mountpoint`).
    ``storage_provider`` defaults to the provider implied by a built-in config block.
    """

    namespace: str
    name: str
    uid: str = ""
    generation: int = 0
    storage_provider: str
    storage_provider_class: str | None = None
    mountpoint: str
    selector: LabelSelector
    read_only: bool = False
    provider_config: ProviderConfig
    creation_timestamp: dt.datetime | None = None
    deleting: bool = False

    @classmethod
    def from_object(cls, obj: object) -> DynamicVolumeClaim:
        """Parse a DynamicVolumeClaim; :raises InvalidObject: listing every problem."""
        top = _top(obj, c.KIND_CLAIM)
        errors: list[FieldError] = []
        meta = _read_meta(top, errors, namespaced=True)
        if "spec" not in top:
            errors.append(FieldError("spec", "required"))
        spec = _Fields(top.get("spec"), "spec", errors)
        spec.only(_CLAIM_FIELDS, "a DynamicVolumeClaim")

        mountpoint = ""
        if not spec.has("mountpoint"):
            spec.error("mountpoint", "required")
        else:
            try:
                mountpoint = normalize_mountpoint(spec.obj["mountpoint"], "spec.mountpoint")
            except InvalidObject as exc:
                errors += exc.errors

        selector = LabelSelector()
        if not spec.has("selector"):
            spec.error("selector", "required: a claim selects pods by label")
        else:
            try:
                selector = LabelSelector.from_object(spec.obj["selector"], "spec.selector")
            except InvalidObject as exc:
                errors += exc.errors
            else:
                if selector.is_empty:
                    spec.error(
                        "selector",
                        "must not be empty (an empty selector selects no pods): give "
                        "matchLabels or matchExpressions",
                    )

        read_only = spec.boolean("readOnly")
        provider = spec.string("storageProvider")
        if provider:
            spec.check(check_dns1123_label(provider, "spec.storageProvider"))
        pinned = spec.string("storageProviderClass") or None
        if pinned:
            spec.check(check_dns1123_subdomain(pinned, "spec.storageProviderClass"))
        config = _read_config_block(spec, provider)
        if config is not None and not provider:
            provider = next(p for p, b in BUILTIN_CONFIG_BLOCKS.items() if b == config.kind)
        _raise(errors, c.KIND_CLAIM, top)
        assert config is not None
        return cls(
            namespace=meta.namespace,
            name=meta.name,
            uid=meta.uid,
            generation=meta.generation,
            storage_provider=provider,
            storage_provider_class=pinned,
            mountpoint=mountpoint,
            selector=selector,
            read_only=read_only,
            provider_config=config,
            creation_timestamp=meta.creation_timestamp,
            deleting=meta.deleting,
        )


def _read_config_block(spec: _Fields, provider: str) -> ProviderConfig | None:
    """The one provider config block of a claim spec, checked against ``storageProvider``."""
    present = [b for b in CONFIG_BLOCKS if b in spec.obj]
    if len(present) != 1:
        spec.errors.append(
            FieldError(
                "spec",
                "exactly one of s3Config, nfsConfig, rcloneConfig or config is required, "
                f"found {len(present)}" + (f" ({', '.join(present)})" if present else ""),
            )
        )
        return None
    block = present[0]
    before = len(spec.errors)
    raw = spec.obj[block]
    f = _Fields(raw, spec.at(block), spec.errors)
    if block in _BLOCK_READERS:
        _BLOCK_READERS[block](f)
    expected = BUILTIN_CONFIG_BLOCKS.get(provider, "config") if provider else None
    if expected is None:
        if block == "config":
            spec.error(
                "storageProvider",
                "required with config: name the (third-party) provider the config is for",
            )
    elif expected != block:
        spec.error(
            "storageProvider",
            f"storageProvider {provider!r} takes {expected}, but the claim has {block}; "
            "s3Config goes with s3, nfsConfig with nfs, rcloneConfig with rclone and config "
            "with other providers",
        )
    if len(spec.errors) != before:
        return None
    return ProviderConfig(kind=block, values=f.obj)


# --------------------------------------------------------------------------- DynamicVolumeMount


class MountPhase(enum.StrEnum):
    """Where a DynamicVolumeMount is in its life."""

    PENDING = "Pending"
    MOUNTING = "Mounting"
    MOUNTED = "Mounted"
    UNMOUNTING = "Unmounting"
    FAILED = "Failed"


_MOUNT_SPEC_FIELDS = {
    "claimName": "claim_name",
    "claimUID": "claim_uid",
    "podName": "pod_name",
    "podUID": "pod_uid",
    "nodeName": "node_name",
    "dmpName": "dmp_name",
    "provider": "provider",
    "storageProviderClass": "storage_provider_class",
    "mountpoint": "mountpoint",
    "slotPath": "slot_path",
    "dmpTargetPath": "dmp_target_path",
}


@attrs.frozen(kw_only=True)
class MountSpec:
    """What one DynamicVolumeMount asks for: this claim's storage in this pod, via this DMP."""

    claim_name: str
    claim_uid: str
    pod_name: str
    pod_uid: str
    node_name: str
    dmp_name: str
    provider: str
    storage_provider_class: str
    config: FrozenMap[str, object] = attrs.field(factory=FrozenMap, converter=_json_map)
    read_only: bool = False
    mountpoint: str
    slot_path: str
    dmp_target_path: str

    def to_object(self) -> dict[str, Any]:
        """The wire form (camelCase)."""
        obj: dict[str, Any] = {wire: getattr(self, py) for wire, py in _MOUNT_SPEC_FIELDS.items()}
        obj["config"] = thaw_json(self.config)
        obj["readOnly"] = self.read_only
        return obj


@attrs.frozen(kw_only=True)
class MountStatus:
    """Observed state of a DynamicVolumeMount, written by its DMP."""

    phase: MountPhase = MountPhase.PENDING
    conditions: tuple[Condition, ...] = ()
    message: str = ""
    observed_generation: int = 0
    mounted_at: dt.datetime | None = None
    last_repair_at: dt.datetime | None = None
    repair_count: int = 0

    def to_object(self) -> dict[str, Any]:
        """The wire form."""
        obj: dict[str, Any] = {
            "phase": str(self.phase),
            "conditions": [cond.to_object() for cond in self.conditions],
            "observedGeneration": self.observed_generation,
            "repairCount": self.repair_count,
        }
        if self.message:
            obj["message"] = self.message
        if self.mounted_at is not None:
            obj["mountedAt"] = format_time(self.mounted_at)
        if self.last_repair_at is not None:
            obj["lastRepairAt"] = format_time(self.last_repair_at)
        return obj


@attrs.frozen(kw_only=True)
class DynamicVolumeMount:
    """One claim x pod: the unit of mounting work and of status. Owned by the pod."""

    name: str
    namespace: str
    uid: str = ""
    generation: int = 0
    resource_version: str = ""
    labels: FrozenMap[str, str] = attrs.field(factory=FrozenMap, converter=_str_map)
    owner_references: tuple[OwnerReference, ...] = ()
    finalizers: tuple[str, ...] = ()
    deleting: bool = False
    spec: MountSpec
    status: MountStatus | None = None

    @classmethod
    def from_object(cls, obj: object) -> DynamicVolumeMount:
        """Parse a DynamicVolumeMount; :raises InvalidObject: listing every problem."""
        top = _top(obj, c.KIND_MOUNT)
        errors: list[FieldError] = []
        meta = _read_meta(top, errors, namespaced=True)
        f = _Fields(top.get("spec"), "spec", errors)
        f.only((*_MOUNT_SPEC_FIELDS, "config", "readOnly"), "a DynamicVolumeMount")
        values = {py: f.string(wire, required=True) for wire, py in _MOUNT_SPEC_FIELDS.items()}
        if values["mountpoint"]:
            try:
                values["mountpoint"] = normalize_mountpoint(
                    values["mountpoint"], f.at("mountpoint")
                )
            except InvalidObject as exc:
                errors += exc.errors
        config = f.obj.get("config") or {}
        if not isinstance(config, Mapping):
            f.error("config", "must be an object")
            config = {}
        read_only = f.boolean("readOnly")
        status = _read_mount_status(top.get("status"), errors) if "status" in top else None
        _raise(errors, c.KIND_MOUNT, top)
        return cls(
            name=meta.name,
            namespace=meta.namespace,
            uid=meta.uid,
            generation=meta.generation,
            resource_version=meta.resource_version,
            labels=meta.labels,
            owner_references=meta.owner_references,
            finalizers=meta.finalizers,
            deleting=meta.deleting,
            spec=MountSpec(config=config, read_only=read_only, **values),
            status=status,
        )

    def to_object(self) -> dict[str, Any]:
        """The wire form, ready to create or replace (status included when set)."""
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if self.uid:
            metadata["uid"] = self.uid
        if self.resource_version:
            metadata["resourceVersion"] = self.resource_version
        if self.labels:
            metadata["labels"] = dict(self.labels)
        if self.owner_references:
            metadata["ownerReferences"] = [o.to_object() for o in self.owner_references]
        if self.finalizers:
            metadata["finalizers"] = list(self.finalizers)
        obj: dict[str, Any] = {
            "apiVersion": c.API_VERSION,
            "kind": c.KIND_MOUNT,
            "metadata": metadata,
            "spec": self.spec.to_object(),
        }
        if self.status is not None:
            obj["status"] = self.status.to_object()
        return obj


def _read_mount_status(raw: object, errors: list[FieldError]) -> MountStatus:
    f = _Fields(raw, "status", errors)
    phase_raw = f.string("phase", default=str(MountPhase.PENDING))
    try:
        phase = MountPhase(phase_raw)
    except ValueError:
        f.error("phase", f"must be one of {', '.join(p.value for p in MountPhase)}")
        phase = MountPhase.PENDING
    conditions = []
    raw_conditions = f.obj.get("conditions") or []
    if not isinstance(raw_conditions, list):
        f.error("conditions", "must be a list")
        raw_conditions = []
    for i, item in enumerate(raw_conditions):
        try:
            conditions.append(Condition.from_object(item, f"status.conditions[{i}]"))
        except InvalidObject as exc:
            errors += exc.errors
    return MountStatus(
        phase=phase,
        conditions=tuple(conditions),
        message=f.string("message"),
        observed_generation=f.integer("observedGeneration"),
        mounted_at=f.timestamp("mountedAt"),
        last_repair_at=f.timestamp("lastRepairAt"),
        repair_count=f.integer("repairCount"),
    )


# --------------------------------------------------------------------------- Pods


@attrs.frozen
class InjectedVolume:
    """The dynvol CSI inline volume the webhook put into a pod."""

    class_name: str
    policy: str = c.POLICY_INDEPENDENT


_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


@attrs.frozen(kw_only=True)
class PodInfo:
    """What dynvol needs to know about a pod (a user pod, or a DMP)."""

    namespace: str
    name: str
    uid: str
    node_name: str | None = None
    labels: FrozenMap[str, str] = attrs.field(factory=FrozenMap, converter=_str_map)
    annotations: FrozenMap[str, str] = attrs.field(factory=FrozenMap, converter=_str_map)
    phase: str = "Pending"
    deleting: bool = False
    volume: InjectedVolume | None = None

    @classmethod
    def from_object(cls, obj: object) -> PodInfo:
        """Read a Pod.

        Pods are not dynvol's to validate, except for the dynvol volume, whose attributes end
        up in host paths: :raises InvalidObject: if they are malformed.
        """
        top = _top(obj, "Pod")
        errors: list[FieldError] = []
        meta = _read_meta(top, errors, namespaced=True)
        spec = _Fields(top.get("spec"), "spec", errors)
        status = _Fields(top.get("status"), "status", errors)
        volume = _read_injected_volume(spec, errors)
        _raise(errors, "Pod", top)
        return cls(
            namespace=meta.namespace,
            name=meta.name,
            uid=meta.uid,
            node_name=spec.string("nodeName") or None,
            labels=meta.labels,
            annotations=meta.annotations,
            phase=status.string("phase", default="Pending"),
            deleting=meta.deleting,
            volume=volume,
        )

    @property
    def storage_provider_class_annotation(self) -> str | None:
        """The class the pod asked for by annotation (the volume is what counts, though)."""
        return self.annotations.get(c.ANNOTATION_STORAGE_PROVIDER_CLASS)

    @property
    def mount_path_root(self) -> str | None:
        """Where in its containers the pod wants dynamic volumes (annotation)."""
        return self.annotations.get(c.ANNOTATION_MOUNT_PATH_ROOT)

    @property
    def dispatch_policy_annotation(self) -> str | None:
        """The dispatch policy the pod asked for by annotation, if any."""
        return self.annotations.get(c.ANNOTATION_DISPATCH_POLICY)

    @property
    def opted_in(self) -> bool:
        """Whether the pod carries the dynvol volume (the only way a mount can reach it)."""
        return self.volume is not None

    @property
    def terminal(self) -> bool:
        """Whether the pod has finished (Succeeded or Failed) and will not run again."""
        return self.phase in _TERMINAL_PHASES

    @property
    def eligible(self) -> bool:
        """Whether dynvol should mount into this pod: opted in, on a node, alive."""
        return (
            self.opted_in
            and self.node_name is not None
            and not self.deleting
            and not (self.terminal)
        )


def _read_injected_volume(spec: _Fields, errors: list[FieldError]) -> InjectedVolume | None:
    volumes = spec.obj.get("volumes") or []
    if not isinstance(volumes, list):
        return None
    for i, volume in enumerate(volumes):
        if not isinstance(volume, Mapping) or volume.get("name") != c.VOLUME_NAME:
            continue
        csi = volume.get("csi")
        if not isinstance(csi, Mapping) or csi.get("driver") != c.DRIVER_NAME:
            return None
        path = f"spec.volumes[{i}].csi.volumeAttributes"
        attrs_ = _Fields(csi.get("volumeAttributes"), path, errors)
        class_name = attrs_.string(c.VOLUME_ATTR_CLASS, required=True)
        if class_name:
            attrs_.check(check_dns1123_subdomain(class_name, attrs_.at(c.VOLUME_ATTR_CLASS)))
        policy = attrs_.string(c.VOLUME_ATTR_POLICY, default=c.POLICY_INDEPENDENT)
        if policy not in c.POLICIES:
            attrs_.error(
                c.VOLUME_ATTR_POLICY, f"must be {c.POLICY_INDEPENDENT} or {c.POLICY_SHARED}"
            )
        return InjectedVolume(class_name=class_name, policy=policy)
    return None
