"""The provider contract: values a provider builds, the Provider protocol, and the host.

A provider has two halves:

* a **pure** half that parses and validates the claim's config and the class's credentials
  (raising :class:`dynvol_core.errors.InvalidObject` whose field paths name the offending
  key) and describes the process or command that mounts the storage (a :class:`DaemonSpec`
  for a FUSE daemon, a :class:`CommandSpec` for a one-shot ``mount(8)``);
* an **async** half (``mount``, ``unmount``, ``check_health``) that carries out that
  description through a :class:`MountHost`.

The host is owned by the process that runs the provider (the DMP agent, or the
conformance kit in :mod:`dynvol_providers.testing`). It starts every process as its own
child, waits for it (so it is always reaped), and tells its owner when a daemon exits, so
restart policy lives with the owner and providers never fork or reap anything themselves.
:class:`FuseProvider` and :class:`CommandMountProvider` implement the async half for the
two common shapes, leaving only the pure description to write.

Neighbours: :mod:`dynvol_providers.hosting` (the host implementation),
:mod:`dynvol_providers.registry` (how providers are found).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath
from typing import Any, ClassVar, Protocol, runtime_checkable

import attrs

from dynvol_core.errors import DynvolError, FieldError, InvalidObject

__all__ = [
    "CommandMountProvider",
    "CommandResult",
    "CommandSpec",
    "Credentials",
    "DaemonHandle",
    "DaemonSpec",
    "FileSpec",
    "FuseProvider",
    "Health",
    "HealthState",
    "MountFailed",
    "MountHandle",
    "MountHost",
    "MountRequest",
    "Provider",
    "Reason",
    "config_error",
]


class Reason(enum.StrEnum):
    """Stable CamelCase reasons shared by conditions, Events and logs."""

    INVALID_CONFIG = "InvalidConfig"
    INVALID_CREDENTIALS = "InvalidCredentials"
    ACCESS_DENIED = "AccessDenied"
    NOT_FOUND = "StorageNotFound"
    UNREACHABLE = "EndpointUnreachable"
    MOUNTER_MISSING = "MounterNotInstalled"
    MOUNTER_EXITED = "MounterExited"
    MOUNT_TIMEOUT = "MountTimeout"
    MOUNT_FAILED = "MountFailed"


class MountFailed(DynvolError):
    """A mount did not happen; ``message`` tells the user what to check.

    ``retryable`` is False only when retrying cannot help until someone changes the
    claim, the class or its Secret (the owner still retries, but with a long backoff).
    """

    def __init__(self, reason: Reason | str, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.reason = str(reason)
        self.message = message
        self.retryable = retryable


def config_error(path: str, message: str) -> InvalidObject:
    """An :class:`InvalidObject` for one field (a convenience for providers)."""
    return InvalidObject((FieldError(path=path, message=message),))


@attrs.frozen
class Credentials:
    """Secret key/value pairs from the class's Secret; never printed.

    The repr and str show only the keys, so a credential object that ends up in a log or
    an exception message does not leak its values.
    """

    values: Mapping[str, str] = attrs.field(repr=False, factory=dict)

    def __repr__(self) -> str:
        return f"Credentials(keys={sorted(self.values)!r})"

    __str__ = __repr__

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)

    def secret_values(self) -> frozenset[str]:
        """Every non-empty value, for redaction and for the conformance checks."""
        return frozenset(v for v in self.values.values() if v)

    @classmethod
    def from_secret_data(cls, data: Mapping[str, bytes | str]) -> Credentials:
        """Decode Secret data (bytes from files or str from stringData) as UTF-8."""
        decoded: dict[str, str] = {}
        errors: list[FieldError] = []
        for key, raw in data.items():
            try:
                decoded[key] = raw.decode() if isinstance(raw, bytes) else raw
            except UnicodeDecodeError:
                errors.append(FieldError(path=f"data.{key}", message="is not valid UTF-8"))
        if errors:
            raise InvalidObject(tuple(errors))
        return cls(values=decoded)


@attrs.frozen(kw_only=True)
class FileSpec:
    """A file the host writes before starting a command (e.g. a 0600 password file)."""

    path: PurePosixPath
    content: bytes = attrs.field(repr=False)
    mode: int = 0o600


@attrs.frozen(kw_only=True)
class CommandSpec:
    """A process to run. Secrets go in ``env`` or ``files``, never in ``argv``."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    unset_env: tuple[str, ...] = ()
    files: tuple[FileSpec, ...] = ()
    timeout: float = 30.0
    #: Values the host must redact from anything it logs or reports.
    secrets: frozenset[str] = attrs.field(factory=frozenset, repr=False)


@attrs.frozen(kw_only=True)
class DaemonSpec:
    """A long-running mounter (a FUSE daemon in the foreground) and how to tell it is up.

    The host starts ``command``, then waits until ``target`` appears in its mount table
    with ``fs_type`` or the process exits, whichever comes first.
    ``preflight``, when given, runs first and must succeed (used to turn "bucket does not
    exist" into an error before anything is mounted).
    """

    command: CommandSpec
    target: PurePosixPath
    fs_type: str
    ready_timeout: float = 30.0
    preflight: CommandSpec | None = None


@attrs.frozen(kw_only=True)
class CommandResult:
    """What a finished command returned; ``output`` is already redacted."""

    returncode: int
    output: str


@attrs.frozen(kw_only=True)
class DaemonHandle:
    """A daemon the host started; ``pid`` identifies it to its owner."""

    pid: int
    argv: tuple[str, ...]


@attrs.frozen(kw_only=True)
class MountRequest:
    """Everything a provider needs to mount one volume.

    ``work_dir`` is private to this mount (mode 0700, owned by the host); providers put
    their files there. ``name`` identifies the mount in logs (e.g. ``ns/dvm-name``).
    """

    name: str
    target: PurePosixPath
    read_only: bool
    config: Any
    credentials: Credentials
    work_dir: PurePosixPath


@attrs.frozen(kw_only=True)
class MountHandle:
    """A mount a provider made; given back to ``unmount`` and ``check_health``."""

    provider: str
    target: PurePosixPath
    fs_type: str
    daemon: DaemonHandle | None = None


class HealthState(enum.StrEnum):
    HEALTHY = "Healthy"
    #: The mount point answers ENOTCONN (its daemon died) or is gone: repair it.
    STALE = "Stale"
    #: Not mounted at all.
    ABSENT = "Absent"


@attrs.frozen(kw_only=True)
class Health:
    state: HealthState
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.state is HealthState.HEALTHY


@runtime_checkable
class MountHost(Protocol):
    """Runs processes and touches the mount table on behalf of providers.

    Implementations own every process they start: they wait for it (always reaping it),
    redact ``secrets`` from all output they keep, and never log ``env`` values.
    """

    async def start_daemon(self, spec: DaemonSpec) -> DaemonHandle:
        """Start the daemon and return once its mount is up.

        :raises MountFailed: the daemon exited or did not mount in time; nothing is left
            mounted and the daemon is reaped.
        """
        ...

    async def stop_daemon(self, handle: DaemonHandle, *, kill_after: float = 10.0) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL after ``kill_after`` s) and reap it."""
        ...

    async def run(self, spec: CommandSpec) -> CommandResult:
        """Run a command to completion (killed after ``spec.timeout``)."""
        ...

    async def unmount(self, target: PurePosixPath, *, lazy: bool = False) -> None:
        """Unmount ``target`` if mounted; a busy mount falls back to a lazy unmount."""
        ...

    async def probe(self, target: PurePosixPath) -> Health:
        """Whether ``target`` is a working mount point (stat within a time limit)."""
        ...


@runtime_checkable
class Provider(Protocol):
    """A storage backend. Registered through ``dynvol_register_providers``.

    The pure methods are called wherever a claim or class must be validated (the
    webhook, the node plugin, the DMP); the async methods only in the DMP.
    """

    @property
    def name(self) -> str:
        """The value of a claim's ``storageProvider`` that selects this provider."""
        ...

    def parse_config(self, values: Mapping[str, Any], *, parameters: Mapping[str, str]) -> Any:
        """Validate the claim's config block and the class's parameters.

        :param values: the claim's provider config (e.g. ``s3Config``), as plain data.
        :param parameters: the StorageProviderClass's ``spec.parameters``.
        :returns: an immutable config value for :class:`MountRequest`.
        :raises InvalidObject: field paths relative to the block (``bucket``) or
            ``parameters.<key>``.
        """
        ...

    def parse_credentials(self, secret_data: Mapping[str, bytes | str]) -> Credentials:
        """Validate the class's Secret.

        :raises InvalidObject: field paths ``data.<key>``; messages never show values.
        """
        ...

    async def mount(self, request: MountRequest, host: MountHost) -> MountHandle:
        """Mount ``request.target``; on failure leave nothing mounted.

        :raises MountFailed: with a reason and an actionable message.
        """
        ...

    async def unmount(self, handle: MountHandle, host: MountHost) -> None:
        """Unmount and stop whatever :meth:`mount` started. Idempotent."""
        ...

    async def check_health(self, handle: MountHandle, host: MountHost) -> Health:
        """Whether the mount still works (STALE means: unmount lazily and mount again)."""
        ...


def _secrets_of(request: MountRequest) -> frozenset[str]:
    return request.credentials.secret_values()


class FuseProvider(abc.ABC):
    """Base for providers whose mounter is a foreground FUSE daemon.

    Subclasses implement :meth:`daemon_spec` (pure, unit-testable) and may refine
    :meth:`explain_failure` to turn the mounter's output into an actionable message.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def parse_config(self, values: Mapping[str, Any], *, parameters: Mapping[str, str]) -> Any:
        """See :meth:`Provider.parse_config`."""

    @abc.abstractmethod
    def parse_credentials(self, secret_data: Mapping[str, bytes | str]) -> Credentials:
        """See :meth:`Provider.parse_credentials`."""

    @abc.abstractmethod
    def daemon_spec(self, request: MountRequest) -> DaemonSpec:
        """The daemon that mounts ``request`` (pure: no I/O)."""

    def explain_failure(self, request: MountRequest, failure: MountFailed) -> MountFailed:
        """Refine a host failure (whose message holds the mounter's redacted output)."""
        return failure

    async def mount(self, request: MountRequest, host: MountHost) -> MountHandle:
        spec = self.daemon_spec(request)
        try:
            daemon = await host.start_daemon(spec)
        except MountFailed as failure:
            raise self.explain_failure(request, failure) from failure
        return MountHandle(
            provider=self.name, target=spec.target, fs_type=spec.fs_type, daemon=daemon
        )

    async def unmount(self, handle: MountHandle, host: MountHost) -> None:
        await host.unmount(handle.target)
        if handle.daemon is not None:
            # Unmounting makes a FUSE daemon exit by itself; the stop only waits for that.
            await host.stop_daemon(handle.daemon)

    async def check_health(self, handle: MountHandle, host: MountHost) -> Health:
        return await host.probe(handle.target)


class CommandMountProvider(abc.ABC):
    """Base for providers mounted by a command that returns once mounted (``mount -t``)."""

    name: ClassVar[str]

    @abc.abstractmethod
    def parse_config(self, values: Mapping[str, Any], *, parameters: Mapping[str, str]) -> Any:
        """See :meth:`Provider.parse_config`."""

    @abc.abstractmethod
    def parse_credentials(self, secret_data: Mapping[str, bytes | str]) -> Credentials:
        """See :meth:`Provider.parse_credentials`."""

    @abc.abstractmethod
    def mount_command(self, request: MountRequest) -> CommandSpec:
        """The command that mounts ``request`` (pure: no I/O)."""

    @abc.abstractmethod
    def mount_fs_type(self, request: MountRequest) -> str:
        """The file system type the mount shows in mountinfo (e.g. ``nfs4``)."""

    def explain_failure(self, request: MountRequest, result: CommandResult) -> MountFailed:
        """Turn a failed mount command into an actionable error."""
        return MountFailed(
            Reason.MOUNT_FAILED,
            f"{self.name} mount of {request.target} failed (exit {result.returncode}): "
            f"{result.output.strip()[-500:]}",
        )

    async def mount(self, request: MountRequest, host: MountHost) -> MountHandle:
        spec = self.mount_command(request)
        result = await host.run(spec)
        if result.returncode != 0:
            await host.unmount(request.target, lazy=True)
            raise self.explain_failure(request, result)
        return MountHandle(
            provider=self.name, target=request.target, fs_type=self.mount_fs_type(request)
        )

    async def unmount(self, handle: MountHandle, host: MountHost) -> None:
        await host.unmount(handle.target)

    async def check_health(self, handle: MountHandle, host: MountHost) -> Health:
        return await host.probe(handle.target)


def require_keys(
    values: Mapping[str, Any], keys: Iterable[str], *, prefix: str = ""
) -> list[FieldError]:
    """Field errors for every key in ``keys`` missing or empty in ``values``."""
    return [
        FieldError(path=f"{prefix}{key}", message="is required")
        for key in keys
        if values.get(key) in (None, "")
    ]
