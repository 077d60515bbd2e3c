"""The ``rclone`` provider: any rclone remote, mounted with ``rclone mount``.

The claim's ``rcloneConfig`` names the backend and its non-secret options::

    rcloneConfig:
      type: webdav
      remotePath: photos/2024    # inside the remote; optional
      parameters: {url: "https://dav.example.com", vendor: other}

Secret options (passwords, keys, tokens) come only from the class's Secret: each key of
the Secret becomes an option (``pass`` -> ``RCLONE_CONFIG_DYNVOL_PASS``; dashes become
underscores). Everything reaches rclone through ``RCLONE_CONFIG_<REMOTE>_<OPTION>``
environment variables, never its command line. Values of options rclone stores obscured
(``pass`` of webdav/sftp...) must be given obscured (``rclone obscure``), as in rclone.conf.

Neighbours: :mod:`dynvol_providers.builtin.s3` mounts S3 with rclone through
:func:`rclone_daemon_spec`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar, Final

import attrs

from dynvol_core.constants import PROVIDER_RCLONE
from dynvol_core.errors import FieldError, InvalidObject
from dynvol_core.models import ConnectionPolicy, FrozenMap
from dynvol_core.validation import check_rclone_type, check_s3_prefix, has_control_chars
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
)
from dynvol_providers.hookspecs import hookimpl

if TYPE_CHECKING:
    from dynvol_providers.registry import ProviderRegistry

__all__ = [
    "CONFIG_SCHEMA",
    "PARAM_ALLOWED_OPTIONS",
    "RcloneConfig",
    "RcloneProvider",
    "is_host_option",
    "is_local_option",
    "pending_uploads",
    "rclone_cache_dir",
    "rclone_daemon_spec",
]

#: The name the remote gets in the environment of its rclone process.
REMOTE: Final = "dynvol"
_OPTION = re.compile(r"[a-z][a-z0-9_]{0,63}")
#: Option names that hold secrets in rclone's backends: a claim must not carry them.
_SECRET_OPTION = re.compile(
    r"(^|_)(pass|password|secret|token|key|key_pem|key_file_pass|client_secret|"
    r"access_key_id|secret_access_key|session_token|sas_url|service_account_credentials|"
    r"account_key|api_key|passphrase|auth)($|_)"
)
#: rclone options a claim may not set through ``options`` (dynvol sets them itself).
_RESERVED = frozenset({"type"})
#: Bounds on ``parameters`` (also in :data:`CONFIG_SCHEMA`).
MAX_PARAMETERS: Final = 64
MAX_PARAMETER_VALUE: Final = 4096
_ENV_BLOCKLIST: Final = ("AWS_CA_BUNDLE",)
#: Class parameter: comma-separated names of options that reach the DMP's own files or run
#: programs (see :func:`is_local_option`) that claims of the class may nevertheless set.
PARAM_ALLOWED_OPTIONS: Final = "rclone-allowed-options"
#: Options that read or write files of the DMP, run programs, or take credentials from the
#: DMP's environment or instance identity. Matched by name or by suffix.
_LOCAL_NAMES: Final = frozenset(
    {
        "ssh", "env_auth", "use_msi", "ask_password", "profile", "ca_cert", "client_cert",
        "client_key", "use_emulator", "use_az", "use_cli", "use_azure_cli", "unix_socket",
        "env_auth_token", "shared_credentials_file",
    }
)  # fmt: skip
_LOCAL_PATTERN = re.compile(
    r"(^|_)(file|files|command|cmd|dir|path_override|socket|program|exec|executable)$|^msi_"
)
#: Options whose value names a host the backend connects to (URLs or bare host names).
_HOST_PATTERN = re.compile(
    r"^(url|host|hostname|endpoint|server|address|proxy)$|_(url|uri|host|endpoint|server|proxy)$"
)
#: scheme://[userinfo@]host[:port][/...]
_URLISH = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://(?P<authority>[^/?#]*)(?P<rest>.*)", re.S)


def is_local_option(name: str) -> bool:
    """Whether rclone option ``name`` reaches the DMP's files, programs or identity."""
    return name in _LOCAL_NAMES or _LOCAL_PATTERN.search(name) is not None


def is_host_option(name: str) -> bool:
    """Whether rclone option ``name`` says where the backend connects (url, host, ...)."""
    return _HOST_PATTERN.search(name) is not None


def _host_of(value: str) -> str | None:
    """The host a URL or ``host[:port]`` value names, or None if it has none or credentials."""
    match = _URLISH.fullmatch(value)
    authority = match["authority"] if match else value
    if "@" in authority or not authority:
        return None
    if authority.startswith("["):
        host, sep, after = authority[1:].partition("]")
        port = after[1:]
        if not sep or (after and not (after.startswith(":") and _valid_port(port))):
            return None
        return host
    host, colon, port = authority.partition(":")
    # An empty port ("host:") is refused like a bad one: it is not a host dynvol can check.
    if colon and not _valid_port(port):
        return None
    return host


def _valid_port(port: str) -> bool:
    return port.isascii() and port.isdigit() and 0 < int(port) < 65536


def allowed_local_options(parameters: Mapping[str, str]) -> tuple[frozenset[str], list[FieldError]]:
    """The option names the class's ``rclone-allowed-options`` parameter lets claims set."""
    raw = parameters.get(PARAM_ALLOWED_OPTIONS, "")
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    errors = [
        FieldError(f"parameters.{PARAM_ALLOWED_OPTIONS}", f"{name!r} is not an rclone option name")
        for name in sorted(names)
        if not _OPTION.fullmatch(name)
    ]
    return names, errors


def _frozen(values: Mapping[str, str]) -> FrozenMap[str, str]:
    return FrozenMap(values)


@attrs.frozen(kw_only=True)
class RcloneConfig:
    """A parsed ``rcloneConfig``."""

    type: str
    path: str = ""
    options: FrozenMap[str, str] = attrs.field(factory=FrozenMap, converter=_frozen)


def _option_value(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return None


def rclone_daemon_spec(
    *,
    request: MountRequest,
    remote_type: str,
    remote_path: str,
    options: Mapping[str, str],
    secret_options: Mapping[str, str],
    extra_args: tuple[str, ...] = (),
) -> DaemonSpec:
    """The ``rclone mount`` of ``REMOTE:remote_path`` at ``request.target`` (pure).

    Options and secrets travel in the environment; rclone gets an empty private config
    file so it never reads one from the image.
    """
    errors = check_rclone_type(remote_type, "type") + check_s3_prefix(remote_path, "remotePath")
    for where, values in (("parameters", options), ("secret", secret_options)):
        for key, value in values.items():
            # One option, one variable: a name outside [a-z0-9_] or "type" could set another
            # remote's or another option's variable; NUL would cut the value short.
            if not _OPTION.fullmatch(key) or key in _RESERVED:
                errors.append(FieldError(f"{where}[{key}]", "is not an rclone option name"))
            elif "\x00" in value:
                errors.append(FieldError(f"{where}[{key}]", "must not contain NUL"))
    if errors:
        raise InvalidObject(errors)
    prefix = f"RCLONE_CONFIG_{REMOTE.upper()}_"
    env = {f"{prefix}TYPE": remote_type}
    env.update({f"{prefix}{k.upper()}": v for k, v in options.items()})
    env.update({f"{prefix}{k.upper()}": v for k, v in secret_options.items()})
    config_file = request.work_dir / "rclone.conf"
    cache_dir = rclone_cache_dir(request)
    remote = f"{REMOTE}:{remote_path}"
    common = ("--config", str(config_file), "--cache-dir", str(cache_dir))
    argv = [
        "rclone", "mount", remote, str(request.target), *common,
        "--allow-other", "--allow-non-empty",
        # Files are written to a local cache and uploaded when closed (at once, not after
        # rclone's default 5 s delay), so ordinary programs that seek or rewrite work.
        "--vfs-cache-mode", "writes", "--vfs-write-back", "0s",
        "--dir-cache-time", "10s",
        "--log-level", "NOTICE",
    ]  # fmt: skip
    if request.read_only:
        argv.append("--read-only")
    argv.extend(extra_args)
    secrets = frozenset(v for v in secret_options.values() if v)
    files = (FileSpec(path=config_file, content=b"", mode=0o600),)
    command = CommandSpec(
        argv=tuple(argv), env=env, unset_env=_ENV_BLOCKLIST, files=files, secrets=secrets
    )
    # Listing the root first turns "no such bucket/directory" and "wrong password" into an
    # error before anything is mounted (rclone mount itself only fails on first access).
    preflight = CommandSpec(
        argv=("rclone", "lsf", "--max-depth", "1", "--low-level-retries", "1",
              "--retries", "1", "--contimeout", "5s", *common, remote),
        env=env, unset_env=_ENV_BLOCKLIST, files=files, secrets=secrets, timeout=30.0,
    )  # fmt: skip
    return DaemonSpec(
        command=command, target=request.target, fs_type="fuse.rclone", preflight=preflight
    )


def rclone_cache_dir(request: MountRequest) -> PurePosixPath:
    """The ``--cache-dir`` of the rclone that mounts ``request``."""
    return request.work_dir / "cache"


def pending_uploads(cache_dir: PurePosixPath) -> int:
    """How many files rclone's VFS write cache in ``cache_dir`` has not uploaded yet.

    rclone uploads a file after it is closed, and an rclone that is unmounted or stopped
    meanwhile does not finish the upload (it resumes it when started again on the same
    cache). Its cache keeps one JSON record per file under ``vfsMeta/``, with ``Dirty``
    true until the file is uploaded; the owner of the mount waits for none to be left.
    """
    count = 0
    for root, _dirs, files in os.walk(os.path.join(str(cache_dir), "vfsMeta")):
        for name in files:
            try:
                with open(os.path.join(root, name), encoding="utf-8") as file:
                    info = json.load(file)
            except (OSError, ValueError):
                continue
            if isinstance(info, dict) and info.get("Dirty") is True:
                count += 1
    return count


def explain_rclone_failure(failure: MountFailed, what: str) -> MountFailed:
    """Map rclone's output to a reason a user can act on."""
    text = failure.message.lower()
    if any(
        s in text
        for s in (
            "401",
            "403",
            "unauthorized",
            "access denied",
            "signature",
            "invalidaccesskeyid",
            "authentication",
            "permission denied",
        )
    ):
        return MountFailed(
            Reason.ACCESS_DENIED,
            f"{what}: the credentials were refused; check the keys in the "
            f"StorageProviderClass's Secret ({failure.message})",
        )
    if any(
        s in text
        for s in ("no such bucket", "nosuchbucket", "directory not found", "not found", "404")
    ):
        return MountFailed(
            Reason.NOT_FOUND,
            f"{what}: the bucket or path does not exist; create it or fix the claim "
            f"({failure.message})",
        )
    if any(
        s in text
        for s in (
            "connection refused",
            "no such host",
            "i/o timeout",
            "timeout",
            "network is unreachable",
            "dial tcp",
        )
    ):
        return MountFailed(
            Reason.UNREACHABLE,
            f"{what}: the endpoint cannot be reached; check its address and the network "
            f"({failure.message})",
        )
    return failure


class RcloneProvider(FuseProvider):
    """Mounts any rclone remote (except ones that reach the local file system)."""

    name: ClassVar[str] = PROVIDER_RCLONE
    config_block: ClassVar[str] = "rcloneConfig"

    def config_schema(self) -> Mapping[str, Any]:
        """The ``rcloneConfig`` schema of the claim CRD (:data:`CONFIG_SCHEMA`)."""
        return CONFIG_SCHEMA

    def parse_config(
        self,
        values: Mapping[str, Any],
        *,
        parameters: Mapping[str, str],
        connection: ConnectionPolicy | None = None,
    ) -> Any:
        errors: list[FieldError] = []
        unknown = sorted(set(values) - {"type", "remotePath", "parameters"})
        errors += [
            FieldError(k, "unknown field; rcloneConfig has type, remotePath and parameters")
            for k in unknown
        ]
        allowed_local, param_errors = allowed_local_options(parameters)
        errors += param_errors
        pinned: Mapping[str, str] = connection.pinned if connection is not None else {}
        remote_type = values.get("type")
        if remote_type in (None, "") and "type" in pinned:
            remote_type = pinned["type"]
        if remote_type in (None, ""):
            errors.append(FieldError("type", "is required (the rclone backend, e.g. webdav)"))
        else:
            errors += check_rclone_type(remote_type, "type")
            if connection is not None:
                errors += connection.pin("type", remote_type, "type")[1]
        path = values.get("remotePath", "")
        if path in (None, ""):
            path = ""
        else:
            errors += check_s3_prefix(path, "remotePath")
        raw_options = values.get("parameters") or {}
        options: dict[str, str] = {}
        if not isinstance(raw_options, Mapping):
            errors.append(
                FieldError("parameters", "must be a map of rclone option names to values")
            )
            raw_options = {}
        if len(raw_options) > MAX_PARAMETERS:
            errors.append(FieldError("parameters", f"must have at most {MAX_PARAMETERS} options"))
            raw_options = {}
        for key, value in raw_options.items():
            where = f"parameters[{key}]"
            if not isinstance(key, str) or not _OPTION.fullmatch(key) or key in _RESERVED:
                errors.append(
                    FieldError(
                        where, "must be an rclone option name in snake_case (e.g. url, vendor)"
                    )
                )
                continue
            local = is_local_option(key)
            if local and key not in allowed_local:
                errors.append(
                    FieldError(
                        where,
                        "reads or writes the mount pod's files, runs a program or uses the "
                        "node's identity; the StorageProviderClass must list it in its "
                        f"{PARAM_ALLOWED_OPTIONS} parameter to allow it",
                    )
                )
                continue
            # A local option the class allows (key_file...) holds a path, not a secret.
            if not local and _SECRET_OPTION.search(key):
                errors.append(
                    FieldError(
                        where,
                        "is a secret: put it in the StorageProviderClass's Secret, not in "
                        "the claim, where everyone who can read the claim would see it",
                    )
                )
                continue
            text = _option_value(value)
            if text is None or has_control_chars(text) or len(text) > MAX_PARAMETER_VALUE:
                errors.append(
                    FieldError(
                        where,
                        "must be a string, number or boolean without control characters, "
                        f"at most {MAX_PARAMETER_VALUE} characters",
                    )
                )
                continue
            options[key] = text
        if connection is not None:
            errors += self._check_connection(connection, options)
            options.update({k: v for k, v in pinned.items() if k != "type"})
        if errors:
            raise InvalidObject(errors)
        assert isinstance(remote_type, str)
        assert isinstance(path, str)
        return RcloneConfig(type=remote_type, path=path, options=options)

    @staticmethod
    def _check_connection(
        connection: ConnectionPolicy, options: Mapping[str, str]
    ) -> list[FieldError]:
        errors: list[FieldError] = []
        for key, value in connection.pinned.items():
            where = f"connection.pinned[{key}]"
            if key != "type" and (not _OPTION.fullmatch(key) or _SECRET_OPTION.search(key)):
                errors.append(
                    FieldError(where, "must be 'type' or a non-secret rclone option name")
                )
            elif has_control_chars(value):
                errors.append(FieldError(where, "must not contain control characters"))
        host_options = 0
        for key, value in options.items():
            where = f"parameters[{key}]"
            if key in connection.pinned:
                errors += connection.pin(key, value, where)[1]
                continue
            if not is_host_option(key):
                continue
            host_options += 1
            host = _host_of(value)
            if host is None:
                errors.append(
                    FieldError(
                        where,
                        f"{value!r} must be a URL or host[:port] naming a host, without "
                        "user:password@",
                    )
                )
            else:
                errors += connection.check_host(host, where)
        if (
            connection.allowed_hosts
            and not host_options
            and not any(is_host_option(k) for k in connection.pinned)
        ):
            errors.append(
                FieldError(
                    "parameters",
                    "the StorageProviderClass allows only some hosts "
                    "(spec.connection.allowedHosts): name the host in an option such as url, "
                    "host or endpoint",
                )
            )
        return errors

    def parse_credentials(self, secret_data: Mapping[str, bytes | str]) -> Credentials:
        creds = Credentials.from_secret_data(secret_data)
        errors = [
            FieldError(f"data.{key}", "must be an rclone option name (letters, digits, '_', '-')")
            for key in creds.values
            if not _OPTION.fullmatch(key.replace("-", "_").lower())
        ]
        if errors:
            raise InvalidObject(errors)
        return creds

    def daemon_spec(self, request: MountRequest) -> DaemonSpec:
        config = request.config
        assert isinstance(config, RcloneConfig)
        secret_options = {
            key.replace("-", "_").lower(): value
            for key, value in request.credentials.values.items()
        }
        return rclone_daemon_spec(
            request=request,
            remote_type=config.type,
            remote_path=config.path,
            options=config.options,
            secret_options=secret_options,
        )

    def explain_failure(self, request: MountRequest, failure: MountFailed) -> MountFailed:
        return explain_rclone_failure(failure, f"rclone mount of {request.name}")


# --------------------------------------------------------------------------- claim API schema

#: The OpenAPI v3 schema of ``rcloneConfig`` in the DynamicVolumeClaim CRD: the one place its API
#: rules are written. The CRD carries exactly this (tests/unit/providers/test_schemas.py);
#: :meth:`parse_config` enforces the same rules (and more: the class's policy), and the
#: shared table in tests/cases holds both to the same good and bad values.
CONFIG_SCHEMA: Final[Mapping[str, Any]] = {
    "type": "object",
    "description": (
        "An rclone remote. Secret options (passwords, keys) come from the "
        "StorageProviderClass's Secret, never from here."
    ),
    "required": ["type"],
    "properties": {
        "type": {
            "type": "string",
            "description": (
                "The rclone backend, e.g. s3, sftp, webdav. Backends that reach the local file "
                "system or wrap other remotes (local, alias, cache, chunker, combine, compress, "
                "crypt, hasher, union) are not allowed."
            ),
            "minLength": 1,
            "maxLength": 32,
            "x-kubernetes-validations": [
                cel_rule(
                    "self.matches(r'^[a-z][a-z0-9]*$')",
                    (
                        "rclone backend type must be lowercase letters or digits, starting with "
                        "a letter (e.g. s3, sftp, webdav)"
                    ),
                ),
                cel_rule(
                    (
                        "!(self in ['local', 'alias', 'cache', 'chunker', 'combine', "
                        "'compress', 'crypt', 'hasher', 'union'])"
                    ),
                    (
                        "this rclone backend type is not allowed: it reaches the node's file "
                        "system or wraps another remote; use a storage backend such as s3, sftp "
                        "or webdav"
                    ),
                ),
            ],
        },
        "remotePath": {
            "type": "string",
            "description": (
                "The path on the remote to mount, e.g. bucket/dir (default the remote's root)."
            ),
            "maxLength": 1024,
            "x-kubernetes-validations": [
                cel_rule(
                    "!self.startsWith('/') && !self.matches(r'(^|/)\\.\\.(/|$)') && "
                    "!self.matches(r'[\\x00-\\x1f\\x7f-\\x9f]')",
                    "remotePath must be relative to the remote's root, without '..' components "
                    "or control characters",
                ),
            ],
        },
        "parameters": {
            "type": "object",
            "description": (
                "Non-secret rclone backend options, e.g. provider, region (names as in rclone's "
                "config file)."
            ),
            "maxProperties": MAX_PARAMETERS,
            "additionalProperties": {
                "type": "string",
                "maxLength": MAX_PARAMETER_VALUE,
            },
            "x-kubernetes-validations": [
                cel_rule(
                    "self.all(k, size(k) <= 64 && k.matches(r'^[a-z][a-z0-9_]*$'))",
                    "rclone option names are lowercase words joined by '_'",
                ),
                cel_rule(
                    "self.all(k, !self[k].matches(r'[\\x00-\\x1f\\x7f-\\x9f]'))",
                    "rclone option values must not contain control characters",
                ),
            ],
        },
    },
}


@hookimpl
def dynvol_register_providers(registry: ProviderRegistry) -> None:
    """Register the built-in ``rclone`` provider."""
    registry.register(RcloneProvider())
