"""The ``s3`` provider: a bucket (or a prefix in it) mounted with s3fs, or rclone.

Claim (``s3Config``)::

    s3Config: {bucket: data, endpoint: https://s3.example.com, region: eu-west-1,
               prefix: team/a, pathStyle: true}

Class: the Secret named by the class holds ``access-key-id`` and ``secret-access-key``
(both, or neither for a public bucket). The class parameter ``s3-mounter`` picks the
mounter: ``s3fs`` (default) or ``rclone``.

The keys reach s3fs in a 0600 ``passwd_file`` in the mount's private work directory and
rclone through its environment; never on a command line. ``readOnly`` is enforced by the
mounter itself (``-o ro`` / ``--read-only``) because a read-only bind further down the
propagation chain does not make sub-mounts read-only.

Neighbours: :mod:`dynvol_providers.builtin.rclone` (the rclone mounter).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final

import attrs

from dynvol_core.constants import PROVIDER_S3
from dynvol_core.errors import FieldError, InvalidObject
from dynvol_core.models import ConnectionPolicy
from dynvol_core.validation import (
    check_bucket_name,
    check_endpoint,
    check_s3_prefix,
    split_endpoint,
)
from dynvol_providers.base import (
    CommandSpec,
    Credentials,
    DaemonSpec,
    FileSpec,
    FuseProvider,
    MountFailed,
    MountRequest,
    Reason,
    cel_rule,
    check_option_value,
    join_mount_options,
)
from dynvol_providers.builtin.rclone import explain_rclone_failure, rclone_daemon_spec
from dynvol_providers.hookspecs import hookimpl

if TYPE_CHECKING:
    from dynvol_providers.registry import ProviderRegistry

__all__ = ["CONFIG_SCHEMA", "PARAM_MOUNTER", "REGION_PATTERN", "S3Config", "S3Provider"]

#: Class parameter choosing the mounter. Not under dynvol's API group: parameters without
#: that prefix belong to the provider.
PARAM_MOUNTER: Final = "s3-mounter"
MOUNTERS: Final = ("s3fs", "rclone")
KEY_ACCESS: Final = "access-key-id"
KEY_SECRET: Final = "secret-access-key"
AWS_ENDPOINT: Final = "https://s3.amazonaws.com"
_FIELDS = frozenset({"bucket", "endpoint", "region", "prefix", "pathStyle"})
#: The connection fields a class may pin (``spec.connection.pinned``).
PINNABLE: Final = ("endpoint", "region")
#: A region as s3fs and rclone take it (and AWS names them): lowercase letters, digits, '-'.
REGION_PATTERN: Final = "^[a-z0-9-]*$"
MAX_REGION: Final = 64
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dt[\d:.]+z?|\(\d+\)")
_HTTP_404 = re.compile(r"(?<![\d.:])404(?![\d.:])")
_HTTP_401_403 = re.compile(r"(?<![\d.:])40[13](?![\d.:])")


@attrs.frozen(kw_only=True)
class S3Config:
    """A parsed ``s3Config`` plus the class's choice of mounter."""

    bucket: str
    endpoint: str = AWS_ENDPOINT
    region: str = "us-east-1"
    prefix: str = ""
    path_style: bool = False
    mounter: str = "s3fs"


class S3Provider(FuseProvider):
    """S3 and S3-compatible object stores."""

    name: ClassVar[str] = PROVIDER_S3
    config_block: ClassVar[str] = "s3Config"
    #: Seconds s3fs waits for a connection; low so an unreachable endpoint fails fast.
    connect_timeout: int = 5

    def parse_config(
        self,
        values: Mapping[str, Any],
        *,
        parameters: Mapping[str, str],
        connection: ConnectionPolicy | None = None,
    ) -> Any:
        errors: list[FieldError] = [
            FieldError(key, f"unknown field; s3Config has {', '.join(sorted(_FIELDS))}")
            for key in sorted(set(values) - _FIELDS)
        ]
        bucket = values.get("bucket")
        if bucket in (None, ""):
            errors.append(FieldError("bucket", "is required"))
        else:
            errors += check_bucket_name(bucket, "bucket")
        claimed_endpoint = values.get("endpoint") or None
        endpoint: object = claimed_endpoint
        if claimed_endpoint is not None:
            errors += check_endpoint(claimed_endpoint, "endpoint")
        region: object = values.get("region") or None
        if connection is not None:
            errors += [
                FieldError(
                    f"connection.pinned[{key}]",
                    f"the s3 provider pins only {', '.join(PINNABLE)}",
                )
                for key in sorted(set(connection.pinned) - set(PINNABLE))
            ]
            pinned_endpoint = connection.pinned.get("endpoint")
            if pinned_endpoint is not None:
                errors += [
                    FieldError("connection.pinned[endpoint]", e.message)
                    for e in check_endpoint(pinned_endpoint, "endpoint")
                ]
                if claimed_endpoint is not None and _normal_endpoint(
                    claimed_endpoint
                ) != _normal_endpoint(pinned_endpoint):
                    errors += connection.pin("endpoint", claimed_endpoint, "endpoint")[1]
                endpoint = pinned_endpoint
            elif not any(e.path == "endpoint" for e in errors):
                # The claim chose where the credentials go: hold it to the class's rules.
                host = split_endpoint(str(claimed_endpoint or AWS_ENDPOINT)).host
                errors += connection.check_host(host, "endpoint")
            region, pin_errors = connection.pin("region", region, "region")
            errors += pin_errors
        region = region or "us-east-1"
        if (
            not isinstance(region, str)
            or len(region) > MAX_REGION
            or not re.fullmatch(REGION_PATTERN, region)
        ):
            errors.append(
                FieldError("region", f"region {region!r} must be lowercase letters, digits and '-'")
            )
        prefix = values.get("prefix") or ""
        errors += check_s3_prefix(prefix, "prefix")
        # A custom endpoint (MinIO, Ceph...) rarely has per-bucket DNS names: default to
        # path-style there, to virtual-hosted style on AWS.
        path_style = values.get("pathStyle", endpoint is not None)
        if not isinstance(path_style, bool):
            errors.append(FieldError("pathStyle", "must be true or false"))
        mounter = parameters.get(PARAM_MOUNTER, "s3fs") or "s3fs"
        if mounter not in MOUNTERS:
            errors.append(
                FieldError(
                    f"parameters.{PARAM_MOUNTER}",
                    f"unknown S3 mounter {mounter!r}; use one of {', '.join(MOUNTERS)}",
                )
            )
        if errors:
            raise InvalidObject(errors)
        return S3Config(
            bucket=str(bucket),
            endpoint=_normal_endpoint(endpoint) or AWS_ENDPOINT,
            region=str(region),
            prefix=str(prefix).strip("/"),
            path_style=bool(path_style),
            mounter=mounter,
        )

    def config_schema(self) -> Mapping[str, Any]:
        """The ``s3Config`` schema of the claim CRD (:data:`CONFIG_SCHEMA`)."""
        return CONFIG_SCHEMA

    def parse_credentials(self, secret_data: Mapping[str, bytes | str]) -> Credentials:
        creds = Credentials.from_secret_data(secret_data)
        access, secret = creds.get(KEY_ACCESS), creds.get(KEY_SECRET)
        errors: list[FieldError] = []
        if bool(access) != bool(secret):
            missing = KEY_SECRET if access else KEY_ACCESS
            errors.append(
                FieldError(
                    f"data.{missing}",
                    f"is required with {KEY_SECRET if missing == KEY_ACCESS else KEY_ACCESS} "
                    "(give both keys, or neither for a public bucket)",
                )
            )
        for key in (KEY_ACCESS, KEY_SECRET):
            value = creds.get(key) or ""
            # s3fs's passwd file is colon-separated: a ':' or newline would corrupt it.
            if any(c in value for c in ":\n\r\x00"):
                errors.append(
                    FieldError(f"data.{key}", "must not contain ':', newlines or NUL characters")
                )
        if errors:
            raise InvalidObject(errors)
        return Credentials(
            values={k: v for k, v in creds.values.items() if k in (KEY_ACCESS, KEY_SECRET)}
        )

    def daemon_spec(self, request: MountRequest) -> DaemonSpec:
        config = request.config
        assert isinstance(config, S3Config)
        if config.mounter == "rclone":
            return self._rclone_spec(request, config)
        return self._s3fs_spec(request, config)

    def _s3fs_spec(self, request: MountRequest, config: S3Config) -> DaemonSpec:
        # Defence in depth: parse_config already refused these, but a config value can also
        # come from an older dynvol or a hand-made MountRequest.
        errors = check_endpoint(config.endpoint, "endpoint") + check_s3_prefix(
            config.prefix, "prefix"
        )
        errors += check_option_value(config.region, "region")
        if errors:
            raise InvalidObject(errors)
        source = f"{config.bucket}:/{config.prefix}" if config.prefix else config.bucket
        options: list[str | tuple[str, str]] = [
            ("url", config.endpoint),
            ("endpoint", config.region),
            "allow_other",
            ("connect_timeout", str(self.connect_timeout)),
            ("retries", "2"),
            ("dbglevel", "warn"),
            "nonempty",
        ]
        files: tuple[FileSpec, ...] = ()
        access, secret = request.credentials.get(KEY_ACCESS), request.credentials.get(KEY_SECRET)
        if access and secret:
            passwd = request.work_dir / "passwd-s3fs"
            files = (FileSpec(path=passwd, content=f"{access}:{secret}\n".encode(), mode=0o600),)
            options.append(("passwd_file", str(passwd)))
        else:
            options.append(("public_bucket", "1"))
        if config.path_style:
            options.append("use_path_request_style")
        if request.read_only:
            options.append("ro")
        joined = join_mount_options(
            options, fields={"url": "endpoint", "endpoint": "region", "passwd_file": "workDir"}
        )
        argv = ["s3fs", source, str(request.target), "-f"]
        # One option per -o (joined has no escaped commas: join_mount_options refuses them).
        for option in joined.split(","):
            argv += ["-o", option]
        command = CommandSpec(
            argv=tuple(argv),
            # s3fs would otherwise pick up keys from the DMP's own environment.
            unset_env=(
                "AWSACCESSKEYID",
                "AWSSECRETACCESSKEY",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN",
            ),
            files=files,
            secrets=request.credentials.secret_values(),
        )
        return DaemonSpec(command=command, target=request.target, fs_type="fuse.s3fs")

    def _rclone_spec(self, request: MountRequest, config: S3Config) -> DaemonSpec:
        options = {
            "provider": "Other",
            "endpoint": config.endpoint,
            "region": config.region,
            "force_path_style": "true" if config.path_style else "false",
            "env_auth": "false",
        }
        access, secret = request.credentials.get(KEY_ACCESS), request.credentials.get(KEY_SECRET)
        secret_options = (
            {"access_key_id": access, "secret_access_key": secret} if access and secret else {}
        )
        path = f"{config.bucket}/{config.prefix}" if config.prefix else config.bucket
        return rclone_daemon_spec(
            request=request,
            remote_type="s3",
            remote_path=path,
            options=options,
            secret_options=secret_options,
        )

    def explain_failure(self, request: MountRequest, failure: MountFailed) -> MountFailed:
        config = request.config
        assert isinstance(config, S3Config)
        what = f"mounting bucket {config.bucket!r} at {config.endpoint}"
        if config.mounter == "rclone":
            return explain_rclone_failure(failure, what)
        # Timestamps in the mounter's log ("...21:30:38.403Z") must not read as HTTP codes.
        text = _TIMESTAMP.sub(" ", failure.message.lower())
        if "nosuchbucket" in text or "bucket not found" in text or _HTTP_404.search(text):
            return MountFailed(
                Reason.NOT_FOUND,
                f"{what}: the bucket does not exist; create it or fix s3Config.bucket "
                f"({failure.message})",
            )
        denied = ("invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied",
                  "access denied", "forbidden", "invalid credentials")  # fmt: skip
        if any(s in text for s in denied) or _HTTP_401_403.search(text):
            return MountFailed(
                Reason.ACCESS_DENIED,
                f"{what}: the credentials were refused; check {KEY_ACCESS} and {KEY_SECRET} "
                f"in the StorageProviderClass's Secret ({failure.message})",
            )
        unreachable = ("couldn't connect", "could not connect", "couldnt_connect",
                       "unable to connect", "timed out", "timeout", "resolve host",
                       "connection refused")  # fmt: skip
        if any(s in text for s in unreachable):
            return MountFailed(
                Reason.UNREACHABLE,
                f"{what}: the endpoint cannot be reached; check s3Config.endpoint and the "
                f"network ({failure.message})",
            )
        return failure


def _normal_endpoint(value: object) -> str | None:
    """An endpoint as compared and stored: without trailing slashes (None if not a string)."""
    return value.rstrip("/") if isinstance(value, str) and value else None


# --------------------------------------------------------------------------- claim API schema

#: The OpenAPI v3 schema of ``s3Config`` in the DynamicVolumeClaim CRD: the one place its API
#: rules are written. The CRD carries exactly this (tests/unit/providers/test_schemas.py);
#: :meth:`parse_config` enforces the same rules (and more: the class's policy), and the
#: shared table in tests/cases holds both to the same good and bad values.
CONFIG_SCHEMA: Final[Mapping[str, Any]] = {
    "type": "object",
    "description": (
        "An S3 (or S3-compatible) bucket. Credentials come from the StorageProviderClass's Secret."
    ),
    "required": ["bucket"],
    "properties": {
        "bucket": {
            "type": "string",
            "description": (
                "The bucket: 3-63 lowercase letters, digits, '.' and '-', a letter or digit at "
                "both ends, no '..', not an IP address, not starting with xn-- or sthree-, not "
                "ending with -s3alias or --ol-s3."
            ),
            "minLength": 3,
            "maxLength": 63,
            "x-kubernetes-validations": [
                cel_rule(
                    "self.matches(r'^[a-z0-9][a-z0-9.-]*[a-z0-9]$')",
                    (
                        "bucket name may contain only lowercase letters, digits, '.' and '-' "
                        "and must start and end with a lowercase letter or digit"
                    ),
                ),
                cel_rule(
                    "!self.contains('..')", "bucket name must not contain two adjacent periods"
                ),
                cel_rule(
                    "!self.matches(r'^[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+$')",
                    "bucket name must not be formatted as an IP address",
                ),
                cel_rule(
                    "!self.startsWith('xn--') && !self.startsWith('sthree-')",
                    "bucket name must not start with the reserved prefixes 'xn--' or 'sthree-'",
                ),
                cel_rule(
                    "!self.endsWith('-s3alias') && !self.endsWith('--ol-s3')",
                    ("bucket name must not end with the reserved suffixes '-s3alias' or '--ol-s3'"),
                ),
            ],
        },
        "endpoint": {
            "type": "string",
            "description": (
                "The S3 endpoint URL, http:// or https://, with a host and without credentials, "
                "query or fragment, e.g. https://s3.example.com. Defaults to the provider's "
                "(AWS) endpoint."
            ),
            "maxLength": 2048,
            "x-kubernetes-validations": [
                cel_rule(
                    "self.startsWith('http://') || self.startsWith('https://')",
                    "endpoint must be an http:// or https:// URL",
                ),
                cel_rule(
                    "!self.matches(r'^[A-Za-z][-A-Za-z0-9+.]*://[^/?#]*@')",
                    (
                        "endpoint must not contain credentials (user:password@); put them in "
                        "the Secret of the StorageProviderClass"
                    ),
                ),
                cel_rule(
                    "!self.contains('?') && !self.contains('#')",
                    "endpoint must not have a query string or fragment",
                ),
                cel_rule(
                    "!self.matches(r'[\\s\\x00-\\x1f\\x7f-\\x9f]')",
                    "endpoint must not contain spaces or control characters",
                ),
                cel_rule(
                    "isURL(self) && url(self).getHostname() != ''",
                    "endpoint must be a URL naming a host, e.g. https://s3.example.com",
                ),
                cel_rule(
                    "self.matches(r'^https?://[^/?#]*(/([A-Za-z0-9._~-]|%[0-9A-Fa-f]{2})*)*$')",
                    (
                        "endpoint must have a path of letters, digits, '/', '-', '.', '_', '~' "
                        "and %-escapes only (no ',', '=', ';', quotes or backslashes, which a "
                        "mounter could read as options)"
                    ),
                ),
                cel_rule(
                    "!self.matches(r'^https?://[^/?#]*:(/.*)?$')",
                    "endpoint must give a port after ':' or leave the ':' out",
                ),
                cel_rule(
                    "!self.matches(r'^https?://\\[[^\\]]*%')",
                    "endpoint must name a host; IPv6 zone identifiers ('%') are not allowed",
                ),
                cel_rule(
                    (
                        "!self.matches(r'^https?://([^/?#:\\[\\]]*\\.)?([0-9]+|0[xX][0-9A-Fa-f]*)"
                        "(:[^/?#]*)?([/?#].*)?$') "
                        "|| "
                        "self.matches(r'^https?://((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(:[^/?#]*)?([/?#].*)?$')"
                    ),
                    (
                        "endpoint must write an IP address as a plain dotted quad such as "
                        "192.0.2.10 (decimal, octal, hexadecimal and shortened IPv4 forms are "
                        "refused)"
                    ),
                ),
            ],
        },
        "region": {
            "type": "string",
            "description": (
                "The bucket's region: lowercase letters, digits and '-', e.g. eu-west-1 "
                "(optional; default us-east-1)."
            ),
            "maxLength": MAX_REGION,
            "pattern": REGION_PATTERN,
        },
        "prefix": {
            "type": "string",
            "description": (
                "Mount only this key prefix of the bucket (a relative path such as team/data; "
                "no leading '/', no '..')."
            ),
            "maxLength": 1024,
            "x-kubernetes-validations": [
                cel_rule(
                    (
                        "!self.startsWith('/') && !self.matches(r'(^|/)\\.\\.(/|$)') && "
                        "!self.matches(r'[\\x00-\\x1f\\x7f-\\x9f]')"
                    ),
                    (
                        "prefix must be relative to the bucket, without '..' components or "
                        "control characters"
                    ),
                ),
            ],
        },
        "pathStyle": {
            "type": "boolean",
            "description": (
                "Use path-style requests (https://host/bucket) instead of virtual-hosted style."
            ),
        },
    },
}


@hookimpl
def dynvol_register_providers(registry: ProviderRegistry) -> None:
    """Register the built-in ``s3`` provider."""
    registry.register(S3Provider())
