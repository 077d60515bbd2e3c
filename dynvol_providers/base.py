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
import inspect
import re
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath
from typing import Any, ClassVar, Final, Protocol, runtime_checkable

import attrs

from dynvol_core.errors import DynvolError, FieldError, InvalidObject
from dynvol_core.models import GENERIC_CONFIG_BLOCK, ConnectionPolicy

__all__ = [
    "CommandMountProvider",
    "CommandResult",
    "CommandSpec",
    "ConnectionPolicy",
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
    "cel_rule",
    "check_command_spec",
    "check_option_value",
    "config_block_of",
    "config_error",
    "config_schema_of",
    "join_mount_options",
    "parse_provider_config",
    "qualify_config_errors",
    "split_mount_options",
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

    def parse_config(
        self,
        values: Mapping[str, Any],
        *,
        parameters: Mapping[str, str],
        connection: ConnectionPolicy | None = None,
    ) -> Any:
        """Validate the claim's config block and the class's parameters.

        :param values: the claim's provider config (e.g. ``s3Config``), as plain data.
        :param parameters: the StorageProviderClass's ``spec.parameters``.
        :param connection: the class's ``spec.connection``: where the class lets its
            credentials go. ``None`` only where the class is not known yet (admission of a
            claim that does not pin a class); the DMP always passes the class's policy,
            and a provider enforces it on every host, server or URL a claim names.
            Providers written before this parameter existed are called without it (see
            :func:`parse_provider_config`).
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


class FuseProvider(abc.ABC):
    """Base for providers whose mounter is a foreground FUSE daemon.

    Subclasses implement :meth:`daemon_spec` (pure, unit-testable) and may refine
    :meth:`explain_failure` to turn the mounter's output into an actionable message.
    """

    name: ClassVar[str]
    #: The claim field this provider's config comes in: ``<name>Config`` for a provider
    #: the claim API has a typed block for, ``config`` for every other one.
    config_block: ClassVar[str] = GENERIC_CONFIG_BLOCK

    def config_schema(self) -> Mapping[str, Any] | None:
        """See :func:`config_schema_of`; None: no published schema (the default)."""
        return None

    @abc.abstractmethod
    def parse_config(
        self,
        values: Mapping[str, Any],
        *,
        parameters: Mapping[str, str],
        connection: ConnectionPolicy | None = None,
    ) -> Any:
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
        spec = _invalid_as_failure(self.daemon_spec, request)
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
    #: The claim field this provider's config comes in: ``<name>Config`` for a provider
    #: the claim API has a typed block for, ``config`` for every other one.
    config_block: ClassVar[str] = GENERIC_CONFIG_BLOCK

    def config_schema(self) -> Mapping[str, Any] | None:
        """See :func:`config_schema_of`; None: no published schema (the default)."""
        return None

    @abc.abstractmethod
    def parse_config(
        self,
        values: Mapping[str, Any],
        *,
        parameters: Mapping[str, str],
        connection: ConnectionPolicy | None = None,
    ) -> Any:
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
        spec = _invalid_as_failure(self.mount_command, request)
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


def _invalid_as_failure(build: Any, request: MountRequest) -> Any:
    """Call a pure spec builder and check what it built (:func:`check_command_spec`); a
    value either refuses becomes a non-retryable MountFailed."""
    try:
        spec = build(request)
        commands = [spec.command, spec.preflight] if isinstance(spec, DaemonSpec) else [spec]
        errors = [e for c in commands if c is not None for e in check_command_spec(c)]
        if errors:
            raise InvalidObject(errors)
    except InvalidObject as exc:
        raise MountFailed(
            Reason.INVALID_CONFIG, f"refusing to mount {request.name}: {exc}", retryable=False
        ) from None
    return spec


_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_command_spec(spec: CommandSpec) -> list[FieldError]:
    """What no provider's command may contain, whatever it was built from.

    The host runs every command a provider describes; this is the last check before it does
    (used by :class:`FuseProvider` and :class:`CommandMountProvider`): no NUL or other
    control character in an argument, no ``-o`` value with an empty option (``a,,b``, a
    trailing ``,``), environment names of letters, digits and '_', no NUL in an environment
    value. Messages never show values (they may be secrets).
    """
    errors: list[FieldError] = []
    after_o = False
    for index, arg in enumerate(spec.argv):
        if _CONTROL.search(arg):
            errors.append(FieldError(f"argv[{index}]", "contains a control character"))
        elif after_o and any(not o for o in arg.split(",")):
            errors.append(FieldError(f"argv[{index}]", "has an empty mount option"))
        after_o = arg == "-o"
    for name, value in spec.env.items():
        if not _ENV_NAME.fullmatch(name):
            errors.append(FieldError("env", f"{name!r} is not an environment variable name"))
        elif "\x00" in value:
            errors.append(FieldError(f"env[{name}]", "contains NUL"))
    return errors


def config_block_of(provider: Provider) -> str:
    """The claim field that carries ``provider``'s config (``s3Config``, ..., ``config``).

    A provider may say so with a ``config_block`` attribute; one that does not (most
    third-party ones) takes ``config``. The name follows the core's rule
    (:func:`dynvol_core.models.config_block_for`), which the registry enforces.
    """
    block = getattr(provider, "config_block", None)
    return block if isinstance(block, str) and block else GENERIC_CONFIG_BLOCK


def config_schema_of(provider: Provider) -> Mapping[str, Any] | None:
    """The OpenAPI v3 schema (with CEL ``x-kubernetes-validations``) of the provider's block.

    Optional: a provider publishes one with a ``config_schema()`` method. A built-in
    provider's schema is the one place its block's API rules are written; the claim CRD
    carries exactly it (a test checks), so ``kubectl explain`` and the apiserver see the
    same rules as :meth:`Provider.parse_config`, which stays the authority (the webhook,
    the node plugin and the DMP ask it). :raises TypeError: the method returns something
    that is not a mapping.
    """
    method = getattr(provider, "config_schema", None)
    if method is None:
        return None
    schema = method()
    if schema is not None and not isinstance(schema, Mapping):
        raise TypeError(f"{provider!r}.config_schema() must return a mapping or None")
    return schema


def cel_rule(rule: str, message: str) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry of a config schema."""
    return {"rule": rule, "message": message}


def parse_provider_config(
    provider: Provider,
    values: Mapping[str, Any],
    *,
    parameters: Mapping[str, str],
    connection: ConnectionPolicy | None = None,
) -> Any:
    """Call ``provider.parse_config``, passing ``connection`` if the provider takes it.

    A third-party provider written before ``connection`` existed is called without it; it
    cannot enforce the class's connection policy, which ``docs/providers.md`` tells its
    authors to do.
    """
    try:
        accepts = "connection" in inspect.signature(provider.parse_config).parameters
    except (TypeError, ValueError):
        accepts = False
    if accepts:
        return provider.parse_config(values, parameters=parameters, connection=connection)
    return provider.parse_config(values, parameters=parameters)


def qualify_config_errors(
    exc: InvalidObject, *, block: str, class_name: str | None = None
) -> InvalidObject:
    """``exc`` from ``parse_config`` with full field paths, for users to act on.

    Claim fields (relative to the block, e.g. ``endpoint``, ``parameters[url]``) become
    ``spec.<block>.<path>``; class fields (``parameters.<key>``, ``connection.<...>``)
    become ``spec.<path>`` with the class named in the message.
    """
    qualified: list[FieldError] = []
    for error in exc.errors:
        if error.path.startswith(("parameters.", "connection.")):
            where = f"StorageProviderClass {class_name!r}" if class_name else "the class"
            qualified.append(FieldError(f"spec.{error.path}", f"{error.message} (in {where})"))
        else:
            qualified.append(FieldError(f"spec.{block}.{error.path}", error.message))
    return InvalidObject(qualified, kind=exc.kind, name=exc.name)


# --------------------------------------------------------------------------- mount options

#: An option name as s3fs, libfuse and mount(8) spell them.
_OPTION_KEY: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Characters no option value may hold. libfuse and libmount split on ',', libfuse takes '\'
#: as an escape, libmount honours double quotes; whitespace and control characters end or
#: break an option in fstab-style parsers and in logs.
_UNSAFE_VALUE: Final = re.compile(r"""[,\\"'\s\x00-\x1f\x7f-\x9f]""")
MAX_OPTION_VALUE: Final = 4096


def check_option_value(value: object, path: str) -> list[FieldError]:
    """Errors naming ``path`` if ``value`` cannot travel inside a ``-o`` option string.

    Refused: ',' (the separator), '\\' (libfuse's escape), quotes (libmount's), whitespace,
    NUL and other control characters, the empty string, and more than
    :data:`MAX_OPTION_VALUE` characters. '=' is fine in a value: the option's name is split
    off at the first '='.
    """
    if not isinstance(value, str):
        return [FieldError(path, f"must be a string, not {type(value).__name__}")]
    if not value:
        return [FieldError(path, "must not be empty")]
    if len(value) > MAX_OPTION_VALUE:
        return [FieldError(path, f"must be at most {MAX_OPTION_VALUE} characters")]
    bad = _UNSAFE_VALUE.search(value)
    if bad:
        return [
            FieldError(
                path,
                f"must not contain {bad.group()!r}: commas, backslashes, quotes, spaces and "
                "control characters would let the value set other mount options",
            )
        ]
    return []


def join_mount_options(
    options: Iterable[str | tuple[str, str]], *, fields: Mapping[str, str] | None = None
) -> str:
    """A ``-o`` option string that means exactly ``options``, or :class:`InvalidObject`.

    Each option is a flag (``"allow_other"``) or a ``(name, value)`` pair. Names must be
    lowercase words (``[a-z][a-z0-9_]*``); values pass :func:`check_option_value`; no name
    may appear twice (later ones would silently win). ``fields`` maps an option name to the
    claim field its value came from, so an error names that field (default
    ``options[<name>]``). The result splits back (:func:`split_mount_options`) into exactly
    the options given, which this function checks before returning.
    """
    fields = fields or {}
    errors: list[FieldError] = []
    parts: list[str] = []
    seen: set[str] = set()
    expected: list[tuple[str, str | None]] = []
    for option in options:
        key, value = (option, None) if isinstance(option, str) else option
        where = fields.get(key, f"options[{key}]")
        if not isinstance(key, str) or not _OPTION_KEY.fullmatch(key):
            errors.append(FieldError(where, f"{key!r} is not a mount option name"))
            continue
        if key in seen:
            errors.append(FieldError(where, f"option {key!r} is given twice"))
            continue
        seen.add(key)
        if value is None:
            parts.append(key)
        else:
            bad = check_option_value(value, where)
            if bad:
                errors += bad
                continue
            parts.append(f"{key}={value}")
        expected.append((key, value))
    if errors:
        raise InvalidObject(errors)
    text = ",".join(parts)
    if split_mount_options(text) != expected:  # pragma: no cover - defence in depth
        raise InvalidObject((FieldError("options", "mount options do not round-trip"),))
    return text


def split_mount_options(text: str) -> list[tuple[str, str | None]]:
    """Split an option string as libfuse does: on unescaped ',', then at the first '='.

    A backslash escapes the next character (as in libfuse's ``fuse_opt_parse``); this is
    the reading the mounter applies, used to check what an option string really says.
    """
    options: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            options.append("".join(current))
            current = []
        else:
            current.append(char)
    options.append("".join(current))
    result: list[tuple[str, str | None]] = []
    for option in options:
        if not option:
            continue
        key, eq, value = option.partition("=")
        result.append((key, value if eq else None))
    return result
