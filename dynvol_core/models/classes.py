"""StorageProviderClass: a provider, its credentials, DMP resources and connection policy."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

from dynvol_core import constants as c
from dynvol_core.errors import FieldError
from dynvol_core.models.fields import (
    MAX_PARAMETER_VALUE,
    Fields,
    ObjectRef,
    raise_if_errors,
    read_meta,
    top_object,
)
from dynvol_core.models.freezing import FrozenMap, str_map_of
from dynvol_core.quantities import Quantity, parse_quantity
from dynvol_core.validation import (
    HostKind,
    check_dns1123_label,
    check_dns1123_subdomain,
    check_host_pattern,
    check_hostname,
    classify_host,
    has_control_chars,
    host_matches,
)

__all__ = [
    "MAX_ALLOWED_NAMESPACES",
    "ConnectionPolicy",
    "MountResources",
    "StorageProviderClass",
]

MAX_ALLOWED_NAMESPACES: Final = 256


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

    pinned: FrozenMap[str, str] = attrs.field(factory=FrozenMap, converter=str_map_of)
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
        f = Fields(obj, path, errors)
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
    parameters: FrozenMap[str, str] = attrs.field(factory=FrozenMap, converter=str_map_of)
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
        top = top_object(obj, c.KIND_CLASS)
        errors: list[FieldError] = []
        meta = read_meta(top, errors, namespaced=False)
        spec = Fields(top.get("spec"), "spec", errors)
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
        _check_unmount_grace(params, errors)
        start = params.get(c.PARAM_DMP_START)
        if start is not None and start not in c.DMP_STARTS:
            errors.append(
                FieldError(
                    f"spec.parameters[{c.PARAM_DMP_START}]",
                    f"must be one of {', '.join(c.DMP_STARTS)}",
                )
            )
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
        raise_if_errors(errors, c.KIND_CLASS, top)
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

    @property
    def unmount_grace(self) -> float:
        """Seconds a deleted mount still in use is kept before its mounter is stopped."""
        raw = self.parameters.get(c.PARAM_UNMOUNT_GRACE)
        if raw is None or not _is_grace(raw):
            return float(c.DEFAULT_UNMOUNT_GRACE)
        return float(int(raw))

    @property
    def starts_on_publish(self) -> bool:
        """Whether a pod's DMP starts when its volume is published (``dmp-start:
        OnPublish``), not when a claim first selects the pod."""
        return self.parameters.get(c.PARAM_DMP_START) == c.DMP_START_ON_PUBLISH

    def allows_namespace(self, namespace: str) -> bool:
        """Whether claims and pods in ``namespace`` may use this class."""
        return self.allowed_namespaces is None or namespace in self.allowed_namespaces


def _is_grace(raw: str) -> bool:
    return raw.isascii() and raw.isdigit() and len(raw) <= 4 and int(raw) <= c.MAX_UNMOUNT_GRACE


def _check_unmount_grace(params: Mapping[str, str], errors: list[FieldError]) -> None:
    raw = params.get(c.PARAM_UNMOUNT_GRACE)
    if raw is not None and not _is_grace(raw):
        errors.append(
            FieldError(
                f"spec.parameters[{c.PARAM_UNMOUNT_GRACE}]",
                f"must be a whole number of seconds from 0 to {c.MAX_UNMOUNT_GRACE} "
                f"(default {c.DEFAULT_UNMOUNT_GRACE})",
            )
        )


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
