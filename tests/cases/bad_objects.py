"""One table of invalid StorageProviderClasses and DynamicVolumeClaims, and the seed objects.

Every case in :data:`BAD_OBJECTS` must be rejected twice over: by a real kube-apiserver with
dynvol's CRDs (HTTP 422, or 400 for unknown fields under strict field validation) and by the
core's ``from_object`` (an ``InvalidObject`` naming ``path``). ``path`` is the field path
both report (the core may add a map key or list index after it: ``spec.parameters[key]``);
``message`` is a fragment of the core's message and ``api_message`` (if set) one of the
apiserver's. :data:`GOOD_OBJECTS` are the seed examples of docs/design.md §2, verbatim;
both must accept them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

API_VERSION = "dynamicvolume.csi.cloudnative101.net/v1alpha1"
SPC = "StorageProviderClass"
DVC = "DynamicVolumeClaim"
_P = "dynamicvolume.csi.cloudnative101.net/"


@dataclass(frozen=True)
class BadCase:
    """One object that must be rejected, and how."""

    id: str
    kind: str
    object: Mapping[str, Any]
    path: str
    message: str
    api_message: str = ""
    #: Unknown fields: the apiserver prunes them unless field validation is Strict, in which
    #: case it answers 400 (not 422) with "unknown field".
    strict_only: bool = False

    def fresh(self, *, namespace: str | None = None) -> dict[str, Any]:
        """A deep copy of the object, optionally moved to ``namespace`` (claims only)."""
        obj = copy.deepcopy(dict(self.object))
        if namespace is not None and self.kind == DVC:
            obj["metadata"]["namespace"] = namespace
        return obj


def _spc(case_id: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": SPC,
        "metadata": {"name": f"bad-{case_id}"},
        "spec": dict(spec),
    }


def _params(**extra: str) -> dict[str, str]:
    return {f"{_P}{k.replace('_', '-')}": v for k, v in extra.items()}


_GOOD_SELECTOR = {"matchLabels": {"app": "demo"}}
_GOOD_S3 = {"bucket": "demo-bucket", "endpoint": "https://s3.example.com"}


def _dvc(case_id: str, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"mountpoint": "/data", "selector": _GOOD_SELECTOR, "s3Config": _GOOD_S3}
    for key, value in spec.items():
        if value is _DROP:
            base.pop(key, None)
        else:
            base[key] = value
    return {
        "apiVersion": API_VERSION,
        "kind": DVC,
        "metadata": {"name": f"bad-{case_id}", "namespace": "default"},
        "spec": base,
    }


_DROP = object()


def _spc_case(case_id: str, spec: Mapping[str, Any], path: str, message: str, **kw: Any) -> BadCase:
    return BadCase(
        id=case_id, kind=SPC, object=_spc(case_id, spec), path=path, message=message, **kw
    )


def _dvc_case(
    case_id: str,
    path: str,
    message: str,
    *,
    api_message: str = "",
    strict_only: bool = False,
    **spec: Any,
) -> BadCase:
    return BadCase(
        id=case_id,
        kind=DVC,
        object=_dvc(case_id, **spec),
        path=path,
        message=message,
        api_message=api_message,
        strict_only=strict_only,
    )


_CPU_REQ = f"spec.parameters[{_P}mount-cpu-request]"
_MEM_REQ = f"spec.parameters[{_P}mount-memory-request]"
_MEM_LIM = f"spec.parameters[{_P}mount-memory-limit]"
_SECRET_NS = f"spec.parameters[{_P}storage-provider-secret-namespace]"
_GRACE = f"spec.parameters[{_P}unmount-grace-period]"
_DMP_START = f"spec.parameters[{_P}dmp-start]"

BAD_OBJECTS: tuple[BadCase, ...] = (
    # ------------------------------------------------------------ StorageProviderClass
    _spc_case("class-provider-missing", {"parameters": {}}, "spec.provider", "required"),
    _spc_case(
        "class-provider-not-dns-label",
        {"provider": "S3_Fast"},
        "spec.provider",
        "DNS-1123 label",
        api_message="DNS-1123 label",
    ),
    _spc_case("class-provider-wrong-type", {"provider": 3}, "spec.provider", "must be a string"),
    _spc_case(
        "class-cpu-request-not-quantity",
        {"provider": "s3", "parameters": _params(mount_cpu_request="ten")},
        _CPU_REQ,
        "is not a quantity",
        api_message="quantity",
    ),
    _spc_case(
        "class-memory-limit-negative",
        {"provider": "s3", "parameters": _params(mount_memory_limit="-50Mi")},
        _MEM_LIM,
        "must not be negative",
        api_message="non-negative",
    ),
    _spc_case(
        "class-cpu-request-over-limit",
        {"provider": "s3", "parameters": _params(mount_cpu_request="100m", mount_cpu_limit="10m")},
        _CPU_REQ,
        "must not exceed",
        api_message="must not exceed",
    ),
    _spc_case(
        "class-memory-request-over-limit",
        {
            "provider": "s3",
            "parameters": _params(mount_memory_request="1Gi", mount_memory_limit="50Mi"),
        },
        _MEM_REQ,
        "must not exceed",
        api_message="must not exceed",
    ),
    _spc_case(
        "class-secret-name-without-namespace",
        {"provider": "s3", "parameters": _params(storage_provider_secret_name="creds")},
        _SECRET_NS,
        "must be given together",
        api_message="must be given together",
    ),
    _spc_case(
        "class-unmount-grace-not-seconds",
        {"provider": "s3", "parameters": _params(unmount_grace_period="30s")},
        _GRACE,
        "whole number of seconds",
        api_message="whole number of seconds",
    ),
    _spc_case(
        "class-unmount-grace-too-long",
        {"provider": "s3", "parameters": _params(unmount_grace_period="3601")},
        _GRACE,
        "from 0 to 3600",
        api_message="from 0 to 3600",
    ),
    _spc_case(
        "class-dmp-start-unknown",
        {"provider": "s3", "parameters": _params(dmp_start="onpublish")},
        _DMP_START,
        "must be one of OnClaim, OnPublish",
        api_message="must be one of OnClaim, OnPublish",
    ),
    _spc_case(
        "class-unknown-dynvol-parameter",
        {"provider": "s3", "parameters": _params(mount_cpu_requets="10m")},
        "spec.parameters",
        "unknown dynvol parameter",
        api_message="unknown dynvol parameter",
    ),
    _spc_case(
        "class-parameter-not-string",
        {"provider": "s3", "parameters": {"region": 5}},
        "spec.parameters",
        "must be a string",
    ),
    _spc_case(
        "class-allowed-namespace-invalid",
        {"provider": "s3", "allowedNamespaces": ["Team_A"]},
        "spec.allowedNamespaces[0]",
        "DNS-1123 label",
    ),
    _spc_case(
        "class-unknown-field",
        {"provider": "s3", "secretName": "creds"},
        "spec.secretName",
        "unknown field",
        api_message="unknown field",
        strict_only=True,
    ),
    # ------------------------------------------------------------ DynamicVolumeClaim: mountpoint
    _dvc_case(
        "mountpoint-relative",
        "spec.mountpoint",
        "must be an absolute path",
        api_message="must be an absolute path",
        mountpoint="data",
    ),
    _dvc_case(
        "mountpoint-dotdot-escape",
        "spec.mountpoint",
        "'..'",
        api_message="'..'",
        mountpoint="/data/../../etc",
    ),
    _dvc_case("mountpoint-dotdot-only", "spec.mountpoint", "'..'", mountpoint="/.."),
    _dvc_case(
        "mountpoint-root",
        "spec.mountpoint",
        "must not be '/'",
        api_message="must not be '/'",
        mountpoint="/",
    ),
    _dvc_case(
        "mountpoint-root-in-disguise",
        "spec.mountpoint",
        "must not be '/'",
        api_message="must not be '/'",
        mountpoint="//./",
    ),
    _dvc_case(
        "mountpoint-over-long",
        "spec.mountpoint",
        "at most 1024 bytes",
        mountpoint="/" + "/".join(["d" * 200] * 6),
    ),
    _dvc_case(
        "mountpoint-component-over-long",
        "spec.mountpoint",
        "at most 255 bytes",
        api_message="at most 255",
        mountpoint="/" + "x" * 256,
    ),
    _dvc_case(
        "mountpoint-nul", "spec.mountpoint", "NUL", api_message="NUL", mountpoint="/data\x00/etc"
    ),
    _dvc_case(
        "mountpoint-newline",
        "spec.mountpoint",
        "control characters",
        api_message="control characters",
        mountpoint="/data\nx",
    ),
    _dvc_case("mountpoint-missing", "spec.mountpoint", "required", mountpoint=_DROP),
    _dvc_case("mountpoint-wrong-type", "spec.mountpoint", "must be a string", mountpoint=5),
    # ------------------------------------------------------------ selector
    _dvc_case(
        "selector-empty",
        "spec.selector",
        "must not be empty",
        api_message="must not be empty",
        selector={},
    ),
    _dvc_case(
        "selector-empty-terms",
        "spec.selector",
        "must not be empty",
        api_message="must not be empty",
        selector={"matchLabels": {}, "matchExpressions": []},
    ),
    _dvc_case("selector-missing", "spec.selector", "required", selector=_DROP),
    _dvc_case(
        "selector-bad-operator",
        "spec.selector.matchExpressions[0].operator",
        "unsupported operator",
        selector={"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["x"]}]},
    ),
    _dvc_case(
        "selector-in-without-values",
        "spec.selector.matchExpressions[0].values",
        "must be non-empty",
        api_message="must be non-empty",
        selector={"matchExpressions": [{"key": "app", "operator": "In"}]},
    ),
    _dvc_case(
        "selector-exists-with-values",
        "spec.selector.matchExpressions[0].values",
        "must be empty",
        selector={"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]},
    ),
    _dvc_case(
        "selector-bad-label-key",
        "spec.selector.matchLabels",
        "not a valid label key",
        api_message="qualified names",
        selector={"matchLabels": {"bad key!": "x"}},
    ),
    _dvc_case(
        "selector-label-value-not-string",
        "spec.selector.matchLabels",
        "must be a string",
        selector={"matchLabels": {"app": 5}},
    ),
    # ------------------------------------------------------------ s3Config
    _dvc_case(
        "bucket-uppercase", "spec.s3Config.bucket", "lowercase", s3Config={"bucket": "MyBucket"}
    ),
    _dvc_case(
        "bucket-too-short", "spec.s3Config.bucket", "3-63 characters", s3Config={"bucket": "ab"}
    ),
    _dvc_case(
        "bucket-too-long", "spec.s3Config.bucket", "3-63 characters", s3Config={"bucket": "b" * 64}
    ),
    _dvc_case(
        "bucket-ip-address",
        "spec.s3Config.bucket",
        "IP address",
        api_message="IP address",
        s3Config={"bucket": "192.168.10.1"},
    ),
    _dvc_case(
        "bucket-adjacent-periods",
        "spec.s3Config.bucket",
        "adjacent periods",
        api_message="adjacent periods",
        s3Config={"bucket": "my..bucket"},
    ),
    _dvc_case(
        "bucket-xn-prefix",
        "spec.s3Config.bucket",
        "xn--",
        api_message="xn--",
        s3Config={"bucket": "xn--bucket"},
    ),
    _dvc_case(
        "bucket-s3alias-suffix",
        "spec.s3Config.bucket",
        "-s3alias",
        api_message="-s3alias",
        s3Config={"bucket": "mybucket-s3alias"},
    ),
    _dvc_case(
        "bucket-leading-hyphen",
        "spec.s3Config.bucket",
        "start and end",
        s3Config={"bucket": "-bucket"},
    ),
    _dvc_case(
        "bucket-underscore", "spec.s3Config.bucket", "lowercase", s3Config={"bucket": "my_bucket"}
    ),
    _dvc_case(
        "bucket-missing",
        "spec.s3Config.bucket",
        "required",
        s3Config={"endpoint": "https://s3.example.com"},
    ),
    _dvc_case(
        "endpoint-with-credentials",
        "spec.s3Config.endpoint",
        "must not contain credentials",
        api_message="must not contain credentials",
        s3Config={"bucket": "b-1", "endpoint": "https://AKIAEXAMPLE:secret@s3.example.com"},
    ),
    _dvc_case(
        "endpoint-with-user",
        "spec.s3Config.endpoint",
        "must not contain credentials",
        api_message="must not contain credentials",
        s3Config={"bucket": "b-1", "endpoint": "http://admin@minio.local:9000"},
    ),
    _dvc_case(
        "endpoint-ftp",
        "spec.s3Config.endpoint",
        "http:// or https://",
        api_message="http:// or https://",
        s3Config={"bucket": "b-1", "endpoint": "ftp://files.example.com"},
    ),
    _dvc_case(
        "endpoint-not-a-url",
        "spec.s3Config.endpoint",
        "http:// or https://",
        s3Config={"bucket": "b-1", "endpoint": "s3.example.com"},
    ),
    _dvc_case(
        "endpoint-query",
        "spec.s3Config.endpoint",
        "query string",
        api_message="query string",
        s3Config={"bucket": "b-1", "endpoint": "https://s3.example.com/?X-Amz-Credential=a"},
    ),
    _dvc_case(
        "endpoint-no-host",
        "spec.s3Config.endpoint",
        "must name a host",
        api_message="naming a host",
        s3Config={"bucket": "b-1", "endpoint": "https:///bucket"},
    ),
    _dvc_case(
        "s3-prefix-escape",
        "spec.s3Config.prefix",
        "'..'",
        s3Config={"bucket": "b-1", "prefix": "../other-team"},
    ),
    _dvc_case(
        "s3-credentials-field",
        "spec.s3Config.secretAccessKey",
        "unknown field",
        api_message="unknown field",
        strict_only=True,
        s3Config={"bucket": "b-1", "secretAccessKey": "hunter2"},
    ),
    # ------------------------------------------------------------ config blocks and provider
    _dvc_case(
        "two-config-blocks",
        "spec",
        "exactly one of",
        api_message="exactly one of",
        nfsConfig={"server": "nfs.example.com", "path": "/exports"},
    ),
    _dvc_case(
        "no-config-block", "spec", "exactly one of", api_message="exactly one of", s3Config=_DROP
    ),
    _dvc_case(
        "config-block-wrong-provider",
        "spec.storageProvider",
        "takes nfsConfig",
        api_message="s3Config goes with storageProvider s3",
        storageProvider="nfs",
    ),
    _dvc_case(
        "free-config-without-provider",
        "spec.storageProvider",
        "required with config",
        api_message="config is for third-party providers",
        s3Config=_DROP,
        config={"volume": "v1"},
    ),
    _dvc_case(
        "free-config-for-builtin",
        "spec.storageProvider",
        "takes s3Config",
        api_message="config is for third-party providers",
        s3Config=_DROP,
        storageProvider="s3",
        config={"bucket": "b-1"},
    ),
    _dvc_case(
        "storage-provider-invalid", "spec.storageProvider", "DNS-1123 label", storageProvider="S3!"
    ),
    _dvc_case(
        "pinned-class-invalid",
        "spec.storageProviderClass",
        "DNS-1123 subdomain",
        storageProviderClass="Fast_S3",
    ),
    _dvc_case(
        "nfs-relative-path",
        "spec.nfsConfig.path",
        "absolute path",
        api_message="absolute path",
        s3Config=_DROP,
        nfsConfig={"server": "nfs.example.com", "path": "exports/data"},
    ),
    _dvc_case(
        "nfs-bad-server",
        "spec.nfsConfig.server",
        "host name",
        api_message="host name",
        s3Config=_DROP,
        nfsConfig={"server": "nfs server!", "path": "/exports"},
    ),
    _dvc_case(
        "nfs-option-with-comma",
        "spec.nfsConfig.options[0]",
        "one mount option",
        api_message="should match",
        s3Config=_DROP,
        nfsConfig={"server": "nfs.example.com", "path": "/exports", "options": ["hard,intr"]},
    ),
    _dvc_case(
        "rclone-local-backend",
        "spec.rcloneConfig.type",
        "not allowed",
        api_message="not allowed",
        s3Config=_DROP,
        rcloneConfig={"type": "local"},
    ),
    _dvc_case(
        "rclone-bad-type",
        "spec.rcloneConfig.type",
        "rclone backend type",
        s3Config=_DROP,
        rcloneConfig={"type": "Web DAV"},
    ),
    # ------------------------------------------------------------ types and unknown fields
    _dvc_case("read-only-wrong-type", "spec.readOnly", "must be a boolean", readOnly="yes"),
    _dvc_case(
        "misspelt-read-only",
        "spec.readonly",
        "unknown field",
        api_message="unknown field",
        strict_only=True,
        readonly=True,
    ),
    # ------------------------------------------------------------ mounter option injection
    _dvc_case(
        "endpoint-comma-injects-s3fs-options",
        "spec.s3Config.endpoint",
        "must have a path",
        api_message="must have a path",
        s3Config={"bucket": "b-1", "endpoint": "http://host:9000/x,use_cache=/tmp,dbglevel=info"},
    ),
    _dvc_case(
        "endpoint-escaped-comma",
        "spec.s3Config.endpoint",
        "must have a path",
        api_message="must have a path",
        s3Config={"bucket": "b-1", "endpoint": "http://host:9000/x\\,dev,suid"},
    ),
    _dvc_case(
        "endpoint-equals-in-path",
        "spec.s3Config.endpoint",
        "must have a path",
        api_message="must have a path",
        s3Config={"bucket": "b-1", "endpoint": "https://s3.example.com/iam_role=auto"},
    ),
    _dvc_case(
        "endpoint-quote-in-path",
        "spec.s3Config.endpoint",
        "must have a path",
        api_message="must have a path",
        s3Config={"bucket": "b-1", "endpoint": 'https://s3.example.com/"a,b"'},
    ),
    _dvc_case(
        "endpoint-decimal-ip",
        "spec.s3Config.endpoint",
        "dotted quad",
        api_message="dotted quad",
        s3Config={"bucket": "b-1", "endpoint": "http://2130706433:9000"},
    ),
    _dvc_case(
        "endpoint-octal-ip",
        "spec.s3Config.endpoint",
        "dotted quad",
        api_message="dotted quad",
        s3Config={"bucket": "b-1", "endpoint": "http://0177.0.0.1:9000"},
    ),
    _dvc_case(
        "endpoint-hex-ip",
        "spec.s3Config.endpoint",
        "dotted quad",
        api_message="dotted quad",
        s3Config={"bucket": "b-1", "endpoint": "http://0xa9.254.169.254"},
    ),
    _dvc_case(
        "endpoint-short-ip",
        "spec.s3Config.endpoint",
        "dotted quad",
        api_message="dotted quad",
        s3Config={"bucket": "b-1", "endpoint": "http://169.254.43518"},
    ),
    _dvc_case(
        "endpoint-ipv6-zone",
        "spec.s3Config.endpoint",
        "zone",
        api_message="zone",
        s3Config={"bucket": "b-1", "endpoint": "http://[fe80::1%25eth0]:9000"},
    ),
    _dvc_case(
        "nfs-server-decimal-ip",
        "spec.nfsConfig.server",
        "dotted quad",
        api_message="dotted quad",
        s3Config=_DROP,
        nfsConfig={"server": "2852039166", "path": "/exports"},
    ),
    # ------------------------------------------------------------ class connection policy
    _spc_case(
        "class-pinned-key-invalid",
        {"provider": "s3", "connection": {"pinned": {"end-point": "https://s3.example.com"}}},
        "spec.connection.pinned",
        "letters, digits and '_'",
        api_message="pinned field names",
    ),
    _spc_case(
        "class-pinned-value-control-chars",
        {"provider": "s3", "connection": {"pinned": {"endpoint": "https://a\nb"}}},
        "spec.connection.pinned",
        "control chars",
        api_message="control characters",
    ),
    _spc_case(
        "class-allowed-host-invalid",
        {"provider": "s3", "connection": {"allowedHosts": ["s3.example.com,evil.net"]}},
        "spec.connection.allowedHosts[0]",
        "host name",
        api_message="should match",
    ),
    _spc_case(
        "class-allow-flag-not-boolean",
        {"provider": "s3", "connection": {"allowLoopback": "yes"}},
        "spec.connection.allowLoopback",
        "must be a boolean",
        api_message="boolean",
    ),
    _spc_case(
        "class-connection-unknown-field",
        {"provider": "s3", "connection": {"allowEverything": True}},
        "spec.connection.allowEverything",
        "unknown field",
        api_message="unknown field",
        strict_only=True,
    ),
)

#: The seed examples of docs/design.md §2, exactly as written there.
GOOD_OBJECTS: tuple[dict[str, Any], ...] = (
    {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "provider-s3-secret", "namespace": "default"},
        "type": "Opaque",
        "stringData": {"access-key-id": "cldevaccesskey", "secret-access-key": "cldevsecretkey"},
    },
    {
        "apiVersion": API_VERSION,
        "kind": SPC,
        "metadata": {"name": "s3-sample"},
        "spec": {
            "provider": "s3",
            "parameters": {
                f"{_P}storage-provider-secret-name": "provider-s3-secret",
                f"{_P}storage-provider-secret-namespace": "default",
                f"{_P}mount-cpu-request": "10m",
                f"{_P}mount-memory-request": "50Mi",
                f"{_P}mount-cpu-limit": "10m",
                f"{_P}mount-memory-limit": "50Mi",
            },
        },
    },
    {
        "apiVersion": API_VERSION,
        "kind": DVC,
        "metadata": {"name": "externalvolume-s3-sample", "namespace": "dynamic-volume-test"},
        "spec": {
            "mountpoint": "/data",
            "s3Config": {"bucket": "ssat202410181", "endpoint": "https://play.min.io"},
            "selector": {"matchLabels": {"app": "app-4-s3"}},
            "storageProvider": "s3",
        },
    },
    {
        "apiVersion": API_VERSION,
        "kind": DVC,
        "metadata": {"name": "dynamicvolume-s3-sample"},
        "spec": {
            "selector": {"matchLabels": {"app": "nginx"}},
            "s3Config": {"bucket": "my-s3-bucket", "endpoint": "http://my-s3-service.example.com"},
            "mountpoint": "/data",
            "readOnly": True,
        },
    },
)

#: Valid objects beyond the seeds, near the edges of the rules: both must accept them too.
EDGE_GOOD_OBJECTS: tuple[dict[str, Any], ...] = (
    {
        "apiVersion": API_VERSION,
        "kind": SPC,
        "metadata": {"name": "edge-nfs"},
        "spec": {
            "provider": "nfs",
            "parameters": {
                "mountOptions": "nolock",
                f"{_P}mount-memory-limit": "1.5Gi",
                f"{_P}mount-cpu-request": "0",
                f"{_P}mount-cpu-limit": "1e3",
                f"{_P}unmount-grace-period": "3600",
            },
            "allowedNamespaces": ["team-a", "team-b"],
        },
    },
    {
        "apiVersion": API_VERSION,
        "kind": DVC,
        "metadata": {"name": "edge-nfs", "namespace": "default"},
        "spec": {
            "mountpoint": "//shared/./nfs/",
            "selector": {
                "matchExpressions": [
                    {"key": "app.kubernetes.io/name", "operator": "In", "values": ["a", "b"]},
                    {"key": "tier", "operator": "NotIn", "values": ["db"]},
                    {"key": "canary", "operator": "DoesNotExist"},
                ]
            },
            "nfsConfig": {
                "server": "fd00::2",
                "path": "/",
                "version": "4.1",
                "options": ["hard", "timeo=600"],
            },
            "storageProviderClass": "edge-nfs",
        },
    },
    {
        "apiVersion": API_VERSION,
        "kind": DVC,
        "metadata": {"name": "edge-rclone", "namespace": "default"},
        "spec": {
            "mountpoint": "/remote/..hidden/x..y",
            "selector": {"matchLabels": {"example.com/team": "", "app": "x_y.z"}},
            "storageProvider": "rclone",
            "rcloneConfig": {
                "type": "sftp",
                "remotePath": "home/data",
                "parameters": {"host": "sftp.example.com", "shell_type": "unix"},
            },
        },
    },
    {
        "apiVersion": API_VERSION,
        "kind": DVC,
        "metadata": {"name": "edge-third-party", "namespace": "default"},
        "spec": {
            "mountpoint": "/" + "/".join(["d" * 255] * 3),
            "selector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]},
            "storageProvider": "acme-fs",
            "config": {"volume": {"id": "v-1", "tags": ["a", 1, True]}},
            "readOnly": False,
        },
    },
    {
        "apiVersion": API_VERSION,
        "kind": DVC,
        "metadata": {"name": "edge-s3", "namespace": "default"},
        "spec": {
            "mountpoint": "/s3",
            "selector": {"matchLabels": {"app": "web"}},
            "storageProvider": "s3",
            "s3Config": {
                "bucket": "a.b-c.123",
                "endpoint": "http://[::1]:9000/base",
                "region": "us-east-1",
                "prefix": "team/data/",
                "pathStyle": True,
            },
        },
    },
)


# --------------------------------------------------------------------------- provider rules
#: Claims whose config block the CRD schema and the provider's ``parse_config`` (hence the
#: validating webhook) refuse, but ``DynamicVolumeClaim.from_object`` does not: the provider
#: owns these rules (the NFS option allowlist), the CRD repeats them.
_NFS_OPTION_CASES = tuple(
    _dvc_case(
        f"nfs-option-{case_id}",
        "spec.nfsConfig.options[0]",
        message,
        api_message=api_message,
        s3Config=_DROP,
        nfsConfig={"server": "nfs.example.com", "path": "/exports", "options": [option]},
    )
    for case_id, option, message, api_message in (
        ("suid", "suid", "set by dynvol", "set by dynvol"),
        ("dev", "dev", "set by dynvol", "set by dynvol"),
        ("defaults", "defaults", "set by dynvol", "set by dynvol"),
        ("ro-override", "rw", "set by dynvol", "set by dynvol"),
        ("vers-override", "vers=3", "set by dynvol", "set by dynvol"),
        ("addr-redirect", "addr=169.254.169.254", "not an NFS mount option", "dynvol allows"),
        ("clientaddr", "clientaddr=10.0.0.1", "not an NFS mount option", "dynvol allows"),
        ("exec", "exec", "not an NFS mount option", "dynvol allows"),
        ("selinux-context", "context=system_u:object_r:x", "not an NFS", "dynvol allows"),
        ("bad-number", "timeo=soon", "timeo=<number>", "dynvol allows"),
    )
)
PROVIDER_BAD_CLAIMS: tuple[BadCase, ...] = (
    *_NFS_OPTION_CASES,
    _dvc_case(
        "rclone-parameter-newline",
        "spec.rcloneConfig.parameters",
        "without control characters",
        api_message="control characters",
        s3Config=_DROP,
        storageProvider="rclone",
        rcloneConfig={"type": "webdav", "parameters": {"vendor": "other\nurl = http://x"}},
    ),
)


@dataclass(frozen=True)
class PolicyCase:
    """A claim that pins a class whose ``spec.connection`` (or parameters) refuse it.

    Only the provider (with the class's policy) can judge these: the DMP always does, the
    validating webhook does when the claim pins the class. ``allowed`` is a change to the
    class that makes the same claim acceptable (``None`` when nothing should).
    """

    id: str
    provider: str
    config: Mapping[str, Any]
    path: str
    message: str
    connection: Mapping[str, Any] | None = None
    parameters: Mapping[str, str] | None = None
    allowed: Mapping[str, Any] | None = None

    @property
    def block(self) -> str:
        return {"s3": "s3Config", "nfs": "nfsConfig", "rclone": "rcloneConfig"}[self.provider]

    def spc(self, name: str, *, allowed: bool = False) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "provider": self.provider,
            "parameters": dict(self.parameters or {}),
        }
        if self.connection is not None:
            spec["connection"] = copy.deepcopy(dict(self.connection))
        if allowed and self.allowed is not None:
            spec.update(copy.deepcopy(dict(self.allowed)))
        return {"apiVersion": API_VERSION, "kind": SPC, "metadata": {"name": name}, "spec": spec}

    def claim(self, class_name: str, *, namespace: str = "default") -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": DVC,
            "metadata": {"name": f"policy-{self.id}", "namespace": namespace},
            "spec": {
                "mountpoint": "/data",
                "selector": _GOOD_SELECTOR,
                "storageProvider": self.provider,
                "storageProviderClass": class_name,
                self.block: copy.deepcopy(dict(self.config)),
            },
        }


_PINNED_S3 = {"pinned": {"endpoint": "https://s3.eu.example.com", "region": "eu-west-1"}}
POLICY_CASES: tuple[PolicyCase, ...] = (
    PolicyCase(
        "s3-loopback-endpoint",
        "s3",
        {"bucket": "b-1", "endpoint": "http://127.0.0.1:9000"},
        "spec.s3Config.endpoint",
        "allowLoopback",
        allowed={"connection": {"allowLoopback": True}},
    ),
    PolicyCase(
        "s3-mapped-loopback-endpoint",
        "s3",
        {"bucket": "b-1", "endpoint": "http://[::ffff:127.0.0.1]:9000"},
        "spec.s3Config.endpoint",
        "allowLoopback",
        allowed={"connection": {"allowLoopback": True}},
    ),
    PolicyCase(
        "s3-metadata-endpoint",
        "s3",
        {"bucket": "b-1", "endpoint": "http://169.254.169.254"},
        "spec.s3Config.endpoint",
        "allowLinkLocal",
        connection={"allowLoopback": True, "allowClusterLocal": True},
        allowed={"connection": {"allowLinkLocal": True}},
    ),
    PolicyCase(
        "s3-metadata-name",
        "s3",
        {"bucket": "b-1", "endpoint": "http://metadata.google.internal"},
        "spec.s3Config.endpoint",
        "allowLinkLocal",
    ),
    PolicyCase(
        "s3-ec2-ipv6-metadata",
        "s3",
        {"bucket": "b-1", "endpoint": "http://[fd00:ec2::254]"},
        "spec.s3Config.endpoint",
        "allowLinkLocal",
    ),
    PolicyCase(
        "s3-cluster-service",
        "s3",
        {"bucket": "b-1", "endpoint": "http://minio.other-team.svc.cluster.local:9000"},
        "spec.s3Config.endpoint",
        "allowClusterLocal",
        allowed={"connection": {"allowClusterLocal": True}},
    ),
    PolicyCase(
        "s3-endpoint-not-pinned-one",
        "s3",
        {"bucket": "b-1", "endpoint": "https://collector.evil.example"},
        "spec.s3Config.endpoint",
        "pins endpoint",
        connection=_PINNED_S3,
    ),
    PolicyCase(
        "s3-region-not-pinned-one",
        "s3",
        {"bucket": "b-1", "region": "us-east-1"},
        "spec.s3Config.region",
        "pins region",
        connection=_PINNED_S3,
    ),
    PolicyCase(
        "s3-host-not-allowed",
        "s3",
        {"bucket": "b-1", "endpoint": "https://s3.evil.example"},
        "spec.s3Config.endpoint",
        "allowedHosts",
        connection={"allowedHosts": ["*.example.com"]},
        allowed={"connection": {"allowedHosts": ["*.example.com", "*.evil.example"]}},
    ),
    PolicyCase(
        "nfs-server-not-pinned-one",
        "nfs",
        {"server": "nfs.evil.example", "path": "/exports/team-a"},
        "spec.nfsConfig.server",
        "pins server",
        connection={"pinned": {"server": "nfs.example.com", "exportPrefix": "/exports/team-a"}},
    ),
    PolicyCase(
        "nfs-path-outside-export-prefix",
        "nfs",
        {"server": "nfs.example.com", "path": "/exports/team-a-other"},
        "spec.nfsConfig.path",
        "outside",
        connection={"pinned": {"server": "nfs.example.com", "exportPrefix": "/exports/team-a"}},
    ),
    PolicyCase(
        "nfs-private-server",
        "nfs",
        {"server": "10.0.0.2", "path": "/exports"},
        "spec.nfsConfig.server",
        "allowPrivateNetworks",
        allowed={"connection": {"allowPrivateNetworks": True}},
    ),
    PolicyCase(
        "rclone-url-to-metadata",
        "rclone",
        {"type": "webdav", "parameters": {"url": "http://169.254.169.254/latest/"}},
        "spec.rcloneConfig.parameters[url]",
        "allowLinkLocal",
    ),
    PolicyCase(
        "rclone-host-not-pinned-one",
        "rclone",
        {"type": "sftp", "parameters": {"host": "sftp.evil.example"}},
        "spec.rcloneConfig.parameters[host]",
        "pins host",
        connection={"pinned": {"type": "sftp", "host": "sftp.example.com"}},
    ),
    PolicyCase(
        "rclone-type-not-pinned-one",
        "rclone",
        {"type": "ftp", "parameters": {"host": "sftp.example.com"}},
        "spec.rcloneConfig.type",
        "pins type",
        connection={"pinned": {"type": "sftp"}},
    ),
    PolicyCase(
        "rclone-key-file-not-allowed",
        "rclone",
        {"type": "sftp", "parameters": {"host": "sftp.example.com", "key_file": "/etc/shadow"}},
        "spec.rcloneConfig.parameters[key_file]",
        "rclone-allowed-options",
        allowed={"parameters": {"rclone-allowed-options": "key_file"}},
    ),
    PolicyCase(
        "rclone-ssh-command-not-allowed",
        "rclone",
        {"type": "sftp", "parameters": {"host": "sftp.example.com", "ssh": "sh -c id"}},
        "spec.rcloneConfig.parameters[ssh]",
        "rclone-allowed-options",
    ),
    PolicyCase(
        "rclone-env-auth-not-allowed",
        "rclone",
        {"type": "s3", "parameters": {"endpoint": "https://s3.example.com", "env_auth": "true"}},
        "spec.rcloneConfig.parameters[env_auth]",
        "rclone-allowed-options",
    ),
)


# --------------------------------------------------------------------------- config values
@dataclass(frozen=True)
class ConfigValue:
    """One value of one field of a built-in provider's claim block, good or bad.

    The CRD schema (the apiserver), the validating webhook and the provider's
    ``parse_config`` must all accept it (``path is None``) or all refuse it, the webhook and
    the provider naming ``path``. The schema of each block is its provider's
    (``config_schema()``), so these are the cases where the two ways its rules are written
    (CEL for the apiserver, Python for the rest) could drift apart.
    """

    id: str
    provider: str
    config: Mapping[str, Any]
    path: str | None = None

    @property
    def block(self) -> str:
        return f"{self.provider}Config"

    def claim(self, *, namespace: str = "default") -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": DVC,
            "metadata": {"name": f"value-{self.id}"[:63].rstrip("-"), "namespace": namespace},
            "spec": {
                "mountpoint": "/data",
                "selector": _GOOD_SELECTOR,
                "storageProvider": self.provider,
                self.block: copy.deepcopy(dict(self.config)),
            },
        }


def _s3_region(case_id: str, region: str, *, good: bool) -> ConfigValue:
    config = {**_GOOD_S3, "region": region}
    return ConfigValue(
        f"s3-region-{case_id}", "s3", config, None if good else "spec.s3Config.region"
    )


def _nfs_option(case_id: str, option: str, *, good: bool) -> ConfigValue:
    config = {"server": "nfs.example.com", "path": "/exports", "options": [option]}
    path = None if good else "spec.nfsConfig.options[0]"
    return ConfigValue(f"nfs-option-{case_id}", "nfs", config, path)


def _rclone(case_id: str, path: str | None, **config: Any) -> ConfigValue:
    return ConfigValue(f"rclone-{case_id}", "rclone", {"type": "webdav", **config}, path)


CONFIG_VALUES: tuple[ConfigValue, ...] = (
    _s3_region("aws", "eu-west-1", good=True),
    _s3_region("us-east", "us-east-1", good=True),
    _s3_region("long-name", "ap-southeast-2", good=True),
    _s3_region("china", "cn-north-1", good=True),
    _s3_region("max-length", "r" * 64, good=True),
    _s3_region("upper-underscore", "EU_WEST", good=False),
    _s3_region("underscore", "eu_west_1", good=False),
    _s3_region("mixed-case", "Eu-West-1", good=False),
    _s3_region("space", "eu west", good=False),
    _s3_region("comma-option", "eu-west-1,dbglevel=debug", good=False),
    _s3_region("too-long", "r" * 65, good=False),
    ConfigValue("s3-endpoint-port", "s3", {**_GOOD_S3, "endpoint": "http://minio.example:9000"}),
    ConfigValue("s3-endpoint-ipv6-port", "s3", {**_GOOD_S3, "endpoint": "http://[::1]:9000/b"}),
    ConfigValue(
        "s3-endpoint-empty-port",
        "s3",
        {**_GOOD_S3, "endpoint": "http://minio.example:/"},
        "spec.s3Config.endpoint",
    ),
    ConfigValue(
        "s3-endpoint-ipv6-empty-port",
        "s3",
        {**_GOOD_S3, "endpoint": "http://[::1]:"},
        "spec.s3Config.endpoint",
    ),
    _nfs_option("hard", "hard", good=True),
    _nfs_option("timeo", "timeo=600", good=True),
    _nfs_option("proto", "proto=tcp", good=True),
    _nfs_option("nconnect", "nconnect=16", good=True),
    _nfs_option("sec", "sec=krb5p", good=True),
    _nfs_option("noac", "noac", good=True),
    _nfs_option("suid", "suid", good=False),
    _nfs_option("rw", "rw", good=False),
    _nfs_option("addr", "addr=10.0.0.1", good=False),
    _nfs_option("comma", "hard,suid", good=False),
    _nfs_option("empty-number", "timeo=", good=False),
    _nfs_option("ten-digits", "timeo=1234567890", good=False),
    _nfs_option("upper", "Hard", good=False),
    _nfs_option("proto-sctp", "proto=sctp", good=False),
    _nfs_option("too-long", "timeo=" + "1" * 123, good=False),
    _rclone("path-relative", None, remotePath="bucket/dir"),
    _rclone("path-with-space", None, remotePath="team a/data"),
    _rclone("path-absolute", "spec.rcloneConfig.remotePath", remotePath="/etc"),
    _rclone("path-dotdot", "spec.rcloneConfig.remotePath", remotePath="a/../../b"),
    _rclone("path-newline", "spec.rcloneConfig.remotePath", remotePath="a\nb"),
    _rclone("parameter", None, parameters={"vendor": "other"}),
    _rclone("parameter-upper", "spec.rcloneConfig.parameters", parameters={"Vendor": "x"}),
    _rclone("parameter-tab", "spec.rcloneConfig.parameters", parameters={"vendor": "a\tb"}),
)
