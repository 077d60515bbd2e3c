"""The node plugin process: CSI server and kubelet registration server, and their lifecycle.

:class:`NodePlugin` follows grpclib's lifecycle conventions: ``await start()``, ``close()``
(begins a graceful shutdown), ``await wait_closed()``, or ``async with``. :func:`serve` runs
one until a signal: the first SIGTERM (or SIGINT) drains (new operations are refused with
UNAVAILABLE, those under way finish, then the sockets close), the second exits at once.

Start-up order: directories, the xvols root made an rshared mount, state recovered from
the records, then the CSI socket, then the registration socket (so kubelet only learns
about the plugin once it can answer). Shutdown runs in reverse.

Neighbours: ``identity``, ``node``, ``registration``, ``volumes``; ``dynvol.commands.node``
builds the :class:`NodePluginConfig` from the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import attrs
from grpclib.server import Server

from dynvol_core.errors import InvalidPath
from dynvol_core.paths import XvolsLayout
from dynvol_csi.guards import PublishGuard
from dynvol_csi.identity import IdentityService, plugin_version
from dynvol_csi.metrics import CsiMetrics, instrument, probe_socket
from dynvol_csi.mounting import ensure_rshared_mount
from dynvol_csi.node import NodeService
from dynvol_csi.registration import RegistrationService, registration_socket
from dynvol_csi.state import VolumeStore
from dynvol_csi.volumes import VolumeManager
from dynvol_kube import Metrics

__all__ = ["NodePlugin", "NodePluginConfig", "parse_endpoint", "serve"]

log = logging.getLogger(__name__)

_UNIX_SCHEME = "unix://"
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


def parse_endpoint(endpoint: str) -> PurePosixPath:
    """The socket path of a CSI endpoint: ``unix:///path/csi.sock`` or ``/path/csi.sock``.

    :raises InvalidPath: for another scheme or a relative path.
    """
    path = endpoint[len(_UNIX_SCHEME) :] if endpoint.startswith(_UNIX_SCHEME) else endpoint
    if not path.startswith("/") or ".." in path.split("/") or "\0" in path:
        raise InvalidPath(
            f"CSI endpoint {endpoint!r} must be a UNIX socket given as unix:///absolute/path"
        )
    return PurePosixPath(path)


@attrs.frozen(kw_only=True)
class NodePluginConfig:
    """What a node plugin needs to know about its node."""

    #: The CSI socket path (also what kubelet is told to dial).
    endpoint: PurePosixPath
    node_id: str
    #: The node root: holds ``xvols/`` and ``state/``.
    root: PurePosixPath
    kubelet_dir: PurePosixPath
    #: kubelet's plugin registry; None disables registration (tests, benchmarks).
    registration_dir: PurePosixPath | None


@attrs.define
class NodePlugin:
    """The CSI Identity and Node servers and the registration server of one node.

    ``guard`` is asked before every publish whether the pod may have the volume (see
    :mod:`dynvol_csi.guards`); the process shell chooses it (:mod:`dynvol.commands.node`).
    With the process's ``metrics``, every CSI call is counted and timed, and the plugin's
    health checks (it answers Probe on its own socket) are registered while it serves.
    """

    config: NodePluginConfig
    guard: PublishGuard
    metrics: Metrics | None = None
    _csi_metrics: CsiMetrics | None = attrs.field(default=None, init=False)
    _unregister: list[Callable[[], None]] = attrs.field(factory=list, init=False)
    _volumes: VolumeManager = attrs.field(init=False)
    _servers: list[tuple[Server, PurePosixPath]] = attrs.field(factory=list, init=False)
    _ready: bool = attrs.field(default=False, init=False)
    _shutdown: asyncio.Task[None] | None = attrs.field(default=None, init=False)
    _close_requested: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)

    def __attrs_post_init__(self) -> None:
        layout = XvolsLayout(self.config.root)
        self._volumes = VolumeManager(layout, VolumeStore(layout))
        if self.metrics is not None:
            self._csi_metrics = CsiMetrics(self.metrics.registry)
            self._csi_metrics.count_published(self._volumes)

    @property
    def volumes(self) -> VolumeManager:
        """The volume manager (for inspection)."""
        return self._volumes

    async def start(self) -> None:
        """Prepare the host, recover the state and start serving."""
        layout = self._volumes.layout
        await asyncio.to_thread(self._prepare_host, layout)
        await asyncio.to_thread(self._volumes.recover)

        csi_server = Server(
            [
                IdentityService(ready=lambda: self._ready),
                NodeService(
                    volumes=self._volumes,
                    node_id=self.config.node_id,
                    kubelet_dir=self.config.kubelet_dir,
                    guard=self.guard,
                ),
            ]
        )
        if self._csi_metrics is not None:
            instrument(csi_server, self._csi_metrics)
        await self._listen(csi_server, self.config.endpoint)
        if self.config.registration_dir is not None:
            reg_server = Server([RegistrationService(endpoint=self.config.endpoint)])
            await self._listen(reg_server, registration_socket(self.config.registration_dir))
        self._ready = True
        if self.metrics is not None:
            endpoint, health = self.config.endpoint, self.metrics.health

            async def answers() -> str | None:
                return await probe_socket(endpoint, need_ready=False)

            async def ready() -> str | None:
                return await probe_socket(endpoint, need_ready=True)

            self._unregister = [
                health.add_liveness("csi socket", answers),
                health.add_readiness("csi ready", ready),
            ]
        log.info(
            "dynvol CSI node plugin %s serving node %s on %s",
            plugin_version(),
            self.config.node_id,
            self.config.endpoint,
        )

    def close(self) -> None:
        """Begin a graceful shutdown; :meth:`wait_closed` waits for it to end."""
        if self._shutdown is None:
            self._ready = False
            self._stop_checks()
            self._shutdown = asyncio.ensure_future(self._drain_and_stop())
            self._close_requested.set()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has finished (returns only after close was called)."""
        await self._close_requested.wait()
        assert self._shutdown is not None
        await asyncio.shield(self._shutdown)

    async def __aenter__(self) -> NodePlugin:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    def _stop_checks(self) -> None:
        for unregister in self._unregister:
            unregister()
        self._unregister = []

    def abort(self) -> None:
        """Stop serving at once, without waiting for operations under way."""
        self._ready = False
        self._stop_checks()
        for server, path in self._servers:
            server.close()
            _remove_socket(path)
        self._servers.clear()

    @staticmethod
    def _prepare_host(layout: XvolsLayout) -> None:
        Path(layout.xvols_dir).mkdir(parents=True, exist_ok=True, mode=0o755)
        Path(layout.volumes_state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        if ensure_rshared_mount(layout.xvols_dir):
            log.info("bound %s onto itself", layout.xvols_dir)
        log.info("%s is an rshared mount", layout.xvols_dir)

    async def _listen(self, server: Server, path: PurePosixPath) -> None:
        if len(os.fsencode(str(path))) > _SUN_PATH_MAX:
            raise InvalidPath(
                f"socket path {path} is longer than {_SUN_PATH_MAX} bytes, the limit of a "
                "UNIX socket address; choose a shorter directory"
            )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        _remove_socket(path)
        await server.start(path=str(path))
        os.chmod(path, 0o660)  # kubelet runs as root; nobody else has business here
        self._servers.append((server, path))

    async def _drain_and_stop(self) -> None:
        log.info("draining: waiting for operations under way")
        await self._volumes.drain()
        # Reverse order of start: registration first, so kubelet stops using us.
        for server, path in reversed(self._servers):
            server.close()
            await server.wait_closed()
            _remove_socket(path)
        self._servers.clear()
        self._volumes.store.close()
        log.info("node plugin stopped")


def _remove_socket(path: PurePosixPath) -> None:
    """Remove a (stale) socket file; refuse to remove anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidPath(f"{path} exists and is not a socket; refusing to replace it")
    os.unlink(path)


async def serve(config: NodePluginConfig, guard: PublishGuard) -> int:
    """Run a node plugin until signalled; returns the process exit status.

    First SIGTERM/SIGINT: drain and exit 0. Second: exit at once with 1 (operations under
    way in worker threads still finish before the process ends, and the records cover a
    harder kill).
    """
    loop = asyncio.get_running_loop()
    plugin = NodePlugin(config, guard)
    main = asyncio.current_task()
    assert main is not None
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        name = signal.Signals(signum).name
        if signals_seen == 1:
            log.info("%s: shutting down gracefully (send it again to exit at once)", name)
            plugin.close()
        else:
            log.warning("%s again: exiting without waiting", name)
            main.cancel()

    handled = (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await plugin.start()
        await plugin.wait_closed()
        return 0
    except asyncio.CancelledError:
        if signals_seen < 2:
            raise
        # Our own cancellation (second signal) ends here; anyone else's propagates.
        main.uncancel()
        return 1
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        with contextlib.suppress(Exception):
            plugin.abort()
