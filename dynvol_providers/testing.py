"""The provider conformance kit: a pytest suite a provider author runs on their provider.

Subclass :class:`ProviderConformance` in a test module and describe your provider with
two fixtures (or class attributes)::

    from dynvol_providers.testing import ConformanceCase, ProviderConformance

    class TestLocalTmpfs(ProviderConformance):
        provider_name = "tmpfs"            # or: pytest --dynvol-provider tmpfs

        @pytest.fixture
        def dynvol_case(self) -> ConformanceCase:
            return ConformanceCase(
                config={"size": "8Mi"},
                invalid_configs=[({"size": "lots"}, "size")],
            )

The suite checks that the provider is registered through the ``dynvol.providers`` entry
point (not just importable), that config and credential validation raise
:class:`~dynvol_core.errors.InvalidObject` naming the field, that secrets never reach a
command line, a repr, a log record or the mounter's output, and, when the case is
mountable on this machine, a real mount/unmount round trip (read-write and read-only) in
an rshared temporary directory. The round trip needs root (mounting); it is skipped
otherwise, with the reason.

Load ``-p dynvol_providers.testing`` (or list it in ``pytest_plugins`` of your root
conftest) to get the ``--dynvol-provider`` option; the class works without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import subprocess
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import attrs
import pytest

from dynvol_core.errors import InvalidObject
from dynvol_core.models import ConnectionPolicy
from dynvol_core.mountinfo import MountEntry, entries_under, topmost_at
from dynvol_providers.base import (
    CommandMountProvider,
    CommandSpec,
    Credentials,
    FuseProvider,
    MountHandle,
    MountRequest,
    Provider,
    parse_provider_config,
    split_mount_options,
)
from dynvol_providers.hosting import LocalHost, read_mount_table
from dynvol_providers.registry import ProviderRegistry, make_plugin_manager

__all__ = [
    "ConformanceCase",
    "ProviderConformance",
    "command_shape",
    "pytest_addoption",
    "rshared_mount_dir",
]

T = TypeVar("T")


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--dynvol-provider NAME``: the provider a ProviderConformance subclass tests."""
    group = parser.getgroup("dynvol", "dynvol provider conformance")
    group.addoption(
        "--dynvol-provider",
        dest="dynvol_provider",
        default=None,
        help="name of the dynvol provider the conformance suite tests",
    )


@attrs.frozen(kw_only=True)
class ConformanceCase:
    """How to exercise one provider.

    :param config: a valid config block (what a claim's ``<provider>Config`` holds).
    :param parameters: the StorageProviderClass parameters to use.
    :param connection: the class's ``spec.connection`` (e.g. allowing loopback for a test
        server on 127.0.0.1).
    :param secret_data: the class's Secret (values are checked never to leak).
    :param invalid_configs: ``(config, field path)`` pairs that must be refused.
    :param invalid_secrets: ``(secret_data, field path)`` pairs that must be refused.
    :param mountable: False, or a reason string, when this machine cannot mount it.
    :param writable: whether a read-write mount accepts a new file.
    :param check_object: called with the name and content of the file written through the
        mount, to confirm it reached the backend (e.g. a GET on S3); retried for 15 s,
        since mounters with a write cache upload after close(); optional.
    """

    config: Mapping[str, Any]
    parameters: Mapping[str, str] = attrs.field(factory=dict)
    connection: ConnectionPolicy = attrs.field(factory=ConnectionPolicy)
    secret_data: Mapping[str, bytes | str] = attrs.field(factory=dict, repr=False)
    invalid_configs: Sequence[tuple[Mapping[str, Any], str]] = ()
    invalid_secrets: Sequence[tuple[Mapping[str, bytes | str], str]] = ()
    mountable: bool | str = True
    writable: bool = True
    check_object: Callable[[str, bytes], None] | None = None


@contextlib.contextmanager
def rshared_mount_dir(base: Path) -> Iterator[Path]:
    """``base/mnt`` bound onto itself and made rshared; everything under it is lazily
    unmounted (deepest first) and the bind removed on exit, even after a failure."""
    path = base / "mnt"
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "--make-rshared", str(path)], check=True)
        yield path
    finally:
        for entry in sorted(
            entries_under(read_mount_table(), PurePosixPath(path)),
            key=lambda e: len(e.path.parts),
            reverse=True,
        ):
            subprocess.run(["umount", "-l", str(entry.path)], check=False)
        subprocess.run(["umount", "-l", str(path)], check=False)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.paused = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.paused:
            self.lines.append(self.format(record))


class ProviderConformance:
    """The conformance suite; subclass it and provide ``dynvol_case``."""

    #: The provider's name, unless ``--dynvol-provider`` or a fixture override gives it.
    provider_name: str | None = None

    # -- fixtures an author may override --------------------------------------------------

    @pytest.fixture
    def dynvol_provider_name(self, request: pytest.FixtureRequest) -> str:
        name = self.provider_name
        with contextlib.suppress(ValueError):
            name = request.config.getoption("dynvol_provider") or name
        if not name:
            pytest.fail("set provider_name on the class or pass --dynvol-provider NAME")
        return name

    @pytest.fixture
    def dynvol_case(self) -> ConformanceCase:
        pytest.fail("override the dynvol_case fixture to describe your provider")

    @pytest.fixture
    def dynvol_registry(self) -> ProviderRegistry:
        return ProviderRegistry.from_plugin_manager(make_plugin_manager())

    @pytest.fixture
    def dynvol_provider(
        self, dynvol_registry: ProviderRegistry, dynvol_provider_name: str
    ) -> Provider:
        return dynvol_registry.get(dynvol_provider_name)

    @pytest.fixture
    def dynvol_mount_dir(self, tmp_path: Path, dynvol_case: ConformanceCase) -> Iterator[Path]:
        if dynvol_case.mountable is not True:
            pytest.skip(f"not mountable here: {dynvol_case.mountable or 'disabled by the case'}")
        if os.geteuid() != 0:
            pytest.skip("the mount round trip needs root (CAP_SYS_ADMIN)")
        with rshared_mount_dir(tmp_path) as path:
            yield path

    # -- registration -------------------------------------------------------------------

    def test_registered_through_entry_point(self, dynvol_provider_name: str) -> None:
        pm = make_plugin_manager()
        from_entry_points = {id(plugin) for plugin, _dist in pm.list_plugin_distinfo()}
        registry = ProviderRegistry()
        for plugin in pm.get_plugins():
            if id(plugin) not in from_entry_points:
                continue
            hook = getattr(plugin, "dynvol_register_providers", None)
            if hook is not None:
                hook(registry=registry)
        assert dynvol_provider_name in registry, (
            f"no plugin in the 'dynvol.providers' entry point group registers "
            f"{dynvol_provider_name!r}; declare one in your package metadata"
        )

    def test_implements_the_protocol(self, dynvol_provider: Provider) -> None:
        assert isinstance(dynvol_provider, Provider)
        for method in ("mount", "unmount", "check_health"):
            assert asyncio.iscoroutinefunction(getattr(dynvol_provider, method)), method

    # -- validation ---------------------------------------------------------------------

    def test_valid_config_and_credentials_parse(
        self, dynvol_provider: Provider, dynvol_case: ConformanceCase
    ) -> None:
        config = _parse(dynvol_provider, dynvol_case, dynvol_case.config)
        hash(config)  # an immutable value: the DMP keys and compares it
        creds = dynvol_provider.parse_credentials(dynvol_case.secret_data)
        assert isinstance(creds, Credentials)
        for secret in _secrets(dynvol_case):
            assert secret not in repr(config)
            assert secret not in repr(creds)

    def test_invalid_configs_name_the_field(
        self, dynvol_provider: Provider, dynvol_case: ConformanceCase
    ) -> None:
        for values, path in dynvol_case.invalid_configs:
            with pytest.raises(InvalidObject) as info:
                _parse(dynvol_provider, dynvol_case, values)
            assert path in info.value.paths, f"{values!r}: {info.value}"
        with pytest.raises(InvalidObject):
            _parse(dynvol_provider, dynvol_case, {**dynvol_case.config, "noSuchField-dynvol": 1})

    def test_values_cannot_add_mount_options(
        self, dynvol_provider: Provider, dynvol_case: ConformanceCase, tmp_path: Path
    ) -> None:
        """Every string in the config, with a payload appended that tries to add mount
        options (',dev,suid', a newline, an escaped comma, a quoted list), is refused or
        changes no option name, no flag and no environment variable name of the mounter."""
        if not isinstance(dynvol_provider, (FuseProvider, CommandMountProvider)):
            pytest.skip("the provider builds its commands itself")
        baseline = self._shapes(dynvol_provider, dynvol_case, dynvol_case.config, tmp_path)
        variants = list(_with_payloads(dynvol_case.config))
        if not variants:
            pytest.skip("the config has no string values to try")
        for values in variants:
            try:
                shapes = self._shapes(dynvol_provider, dynvol_case, values, tmp_path)
            except InvalidObject:
                continue
            assert shapes == baseline, f"{values!r} changed the mounter's options"

    def test_invalid_secrets_name_the_field_without_values(
        self, dynvol_provider: Provider, dynvol_case: ConformanceCase
    ) -> None:
        for data, path in dynvol_case.invalid_secrets:
            with pytest.raises(InvalidObject) as info:
                dynvol_provider.parse_credentials(data)
            assert path in info.value.paths, str(info.value)
            for value in data.values():
                text = value.decode(errors="replace") if isinstance(value, bytes) else value
                if len(text) >= 4:
                    assert text not in str(info.value)

    def test_secrets_stay_out_of_command_lines(
        self, dynvol_provider: Provider, dynvol_case: ConformanceCase, tmp_path: Path
    ) -> None:
        request = self._request(dynvol_provider, dynvol_case, tmp_path / "t", tmp_path / "w")
        argvs: list[tuple[str, ...]] = []
        if isinstance(dynvol_provider, FuseProvider):
            spec = dynvol_provider.daemon_spec(request)
            argvs.append(spec.command.argv)
            if spec.preflight is not None:
                argvs.append(spec.preflight.argv)
            shown = repr(spec)
        elif isinstance(dynvol_provider, CommandMountProvider):
            command = dynvol_provider.mount_command(request)
            argvs.append(command.argv)
            shown = repr(command)
        else:
            pytest.skip("the provider builds its commands itself; covered by the round trip")
        for secret in _secrets(dynvol_case):
            assert secret not in shown
            for argv in argvs:
                assert not any(secret in arg for arg in argv), "a secret is on the command line"

    def _shapes(
        self, provider: Provider, case: ConformanceCase, values: Mapping[str, Any], tmp: Path
    ) -> list[tuple[object, ...]]:
        request = attrs.evolve(
            self._request(provider, case, tmp / "t", tmp / "w"),
            config=_parse(provider, case, values),
        )
        specs: list[CommandSpec] = []
        if isinstance(provider, FuseProvider):
            daemon = provider.daemon_spec(request)
            specs += [daemon.command] + ([daemon.preflight] if daemon.preflight else [])
        elif isinstance(provider, CommandMountProvider):
            specs.append(provider.mount_command(request))
        return [command_shape(spec) for spec in specs]

    # -- the round trip -------------------------------------------------------------------

    def _request(
        self,
        provider: Provider,
        case: ConformanceCase,
        target: Path,
        work_dir: Path,
        *,
        read_only: bool = False,
    ) -> MountRequest:
        return MountRequest(
            name=f"conformance/{provider.name}",
            target=PurePosixPath(target),
            read_only=read_only,
            config=_parse(provider, case, case.config),
            credentials=provider.parse_credentials(case.secret_data),
            work_dir=PurePosixPath(work_dir),
        )

    async def _round_trip(
        self,
        provider: Provider,
        case: ConformanceCase,
        mount_dir: Path,
        *,
        read_only: bool,
    ) -> None:
        target = mount_dir / ("ro" if read_only else "rw")
        work_dir = mount_dir.parent / "work"
        request = self._request(provider, case, target, work_dir, read_only=read_only)
        await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
        exits: list[int] = []
        host = LocalHost(on_daemon_exit=lambda _handle, status: exits.append(status))
        capture = _LogCapture()
        root = logging.getLogger()
        old_level = root.level
        root.addHandler(capture)
        root.setLevel(logging.DEBUG)
        handle: MountHandle | None = None
        try:
            handle = await provider.mount(request, host)
            entry = _topmost(target)
            assert entry is not None, f"{target} is not a mount point after mount()"
            assert entry.fs_type == handle.fs_type
            assert (await provider.check_health(handle, host)).ok
            probe = target / f"dynvol-conformance-{os.getpid()}.txt"
            if read_only:
                with pytest.raises(OSError, match="Read-only") as info:
                    await asyncio.to_thread(probe.write_bytes, b"x")
                assert info.value.errno == errno.EROFS, info.value
            elif case.writable:
                await asyncio.to_thread(probe.write_bytes, b"written by dynvol conformance\n")
                data = await asyncio.to_thread(probe.read_bytes)
                assert data == b"written by dynvol conformance\n"
                if case.check_object is not None:
                    # The case's own S3 client may log its keys at DEBUG; that is not ours.
                    capture.paused = True
                    await _eventually(case.check_object, probe.name, data)
                    capture.paused = False
                await asyncio.to_thread(probe.unlink)
            await asyncio.to_thread(os.listdir, target)
            daemon_output = host.daemon_output(handle.daemon) if handle.daemon else ""
            for secret in _secrets(case):
                assert secret not in daemon_output, "a secret is in the mounter's output"
            await provider.unmount(handle, host)
            await provider.unmount(handle, host)  # idempotent
            handle = None
            assert _topmost(target) is None, f"{target} is still mounted after unmount()"
            assert host.daemons() == (), "unmount() left a daemon running"
            assert exits == [], "a daemon exited by itself during the round trip"
        finally:
            if handle is not None:
                with contextlib.suppress(Exception):
                    await provider.unmount(handle, host)
            await host.unmount(PurePosixPath(target), lazy=True)
            await host.close()
            root.removeHandler(capture)
            root.setLevel(old_level)
        logged = "\n".join(capture.lines)
        for secret in _secrets(case):
            assert secret not in logged, "a secret was logged"

    def test_mount_round_trip(
        self, dynvol_provider: Provider, dynvol_case: ConformanceCase, dynvol_mount_dir: Path
    ) -> None:
        _run(self._round_trip(dynvol_provider, dynvol_case, dynvol_mount_dir, read_only=False))

    def test_read_only_mount_refuses_writes(
        self, dynvol_provider: Provider, dynvol_case: ConformanceCase, dynvol_mount_dir: Path
    ) -> None:
        _run(self._round_trip(dynvol_provider, dynvol_case, dynvol_mount_dir, read_only=True))


async def _eventually(
    check: Callable[[str, bytes], None], name: str, data: bytes, *, within: float = 15.0
) -> None:
    """Run ``check`` until it passes: mounters with a write cache upload after close()."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            await asyncio.to_thread(check, name, data)
            return
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


def _topmost(target: Path) -> MountEntry | None:
    return topmost_at(read_mount_table(), PurePosixPath(target))


def _secrets(case: ConformanceCase) -> list[str]:
    values = []
    for raw in case.secret_data.values():
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        # Very short values (e.g. "a") would match unrelated text; real secrets are longer.
        if len(text) >= 4:
            values.append(text)
    return values


def _parse(provider: Provider, case: ConformanceCase, values: Mapping[str, Any]) -> Any:
    return parse_provider_config(
        provider, values, parameters=case.parameters, connection=case.connection
    )


#: Appended to config strings by ``test_values_cannot_add_mount_options``.
INJECTION_PAYLOADS = (",dev,suid,allow_other", "\nuse_cache=/tmp", "\\,dev", '",dev"', "'a,b'")


def _with_payloads(values: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Copies of ``values`` with one string (top level, or one level down) made hostile."""
    for key, value in values.items():
        if isinstance(value, str):
            for payload in INJECTION_PAYLOADS:
                yield {**values, key: value + payload}
        elif isinstance(value, Mapping):
            for inner, item in value.items():
                if isinstance(item, str):
                    for payload in INJECTION_PAYLOADS:
                        yield {**values, key: {**value, inner: item + payload}}
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                if isinstance(item, str):
                    for payload in INJECTION_PAYLOADS:
                        changed = list(value)
                        changed[index] = item + payload
                        yield {**values, key: changed}


def command_shape(spec: CommandSpec) -> tuple[object, ...]:
    """What a command's values must never change: the program, its flags, the names of
    the options after each ``-o`` (split as libfuse and libmount split them), how many
    plain arguments it has, and the names of its environment variables."""
    shape: list[object] = []
    after_o = False
    for arg in spec.argv:
        if after_o:
            shape.append(("-o", tuple(key for key, _ in split_mount_options(arg))))
            after_o = False
        elif arg == "-o":
            after_o = True
        elif arg.startswith("-") or not shape:
            shape.append(arg)
        else:
            shape.append("<arg>")
    return (tuple(shape), tuple(sorted(spec.env)), tuple(sorted(spec.unset_env)))
