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

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final

import attrs

from dynvol_core.constants import PROVIDER_RCLONE
from dynvol_core.errors import FieldError, InvalidObject
from dynvol_core.models import FrozenMap
from dynvol_core.validation import check_rclone_type, check_s3_prefix
from dynvol_providers.base import (
    CommandSpec,
    Credentials,
    DaemonSpec,
    FileSpec,
    FuseProvider,
    MountFailed,
    MountRequest,
    Reason,
)
from dynvol_providers.hookspecs import hookimpl

if TYPE_CHECKING:
    from dynvol_providers.registry import ProviderRegistry

__all__ = ["RcloneConfig", "RcloneProvider", "rclone_daemon_spec"]

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
_ENV_BLOCKLIST: Final = ("AWS_CA_BUNDLE",)


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
    prefix = f"RCLONE_CONFIG_{REMOTE.upper()}_"
    env = {f"{prefix}TYPE": remote_type}
    env.update({f"{prefix}{k.upper()}": v for k, v in options.items()})
    env.update({f"{prefix}{k.upper()}": v for k, v in secret_options.items()})
    config_file = request.work_dir / "rclone.conf"
    cache_dir = request.work_dir / "cache"
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

    def parse_config(self, values: Mapping[str, Any], *, parameters: Mapping[str, str]) -> Any:
        errors: list[FieldError] = []
        unknown = sorted(set(values) - {"type", "remotePath", "parameters"})
        errors += [
            FieldError(k, "unknown field; rcloneConfig has type, remotePath and parameters")
            for k in unknown
        ]
        remote_type = values.get("type")
        if remote_type in (None, ""):
            errors.append(FieldError("type", "is required (the rclone backend, e.g. webdav)"))
        else:
            errors += check_rclone_type(remote_type, "type")
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
        for key, value in raw_options.items():
            where = f"parameters[{key}]"
            if not isinstance(key, str) or not _OPTION.fullmatch(key) or key in _RESERVED:
                errors.append(
                    FieldError(
                        where, "must be an rclone option name in snake_case (e.g. url, vendor)"
                    )
                )
                continue
            if _SECRET_OPTION.search(key):
                errors.append(
                    FieldError(
                        where,
                        "is a secret: put it in the StorageProviderClass's Secret, not in "
                        "the claim, where everyone who can read the claim would see it",
                    )
                )
                continue
            text = _option_value(value)
            if text is None or "\n" in text or "\x00" in text:
                errors.append(FieldError(where, "must be a string, number or boolean"))
                continue
            options[key] = text
        if errors:
            raise InvalidObject(errors)
        assert isinstance(remote_type, str)
        assert isinstance(path, str)
        return RcloneConfig(type=remote_type, path=path, options=options)

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


@hookimpl
def dynvol_register_providers(registry: ProviderRegistry) -> None:
    """Register the built-in ``rclone`` provider."""
    registry.register(RcloneProvider())
