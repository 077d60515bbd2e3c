"""Health checks and the one small HTTP server per process: ``/metrics``, ``/healthz``, ``/readyz``.

Beside the pipeline, not in it: the runtime's parts register checks on the process's
:class:`Health` (a :class:`~.processing.Controller` that stops making progress fails
liveness; an :class:`~.watching.Informer` that has not synced fails readiness), and the
services add their own (the CSI plugin answers its own Probe; the controller is the leader
or a standby). :class:`StatusServer` serves them with the process's metrics registry
(:mod:`.metrics`), on :mod:`.serving`'s small HTTP server. Liveness means "restart me":
only a part that is stuck, not one that waits for the apiserver, fails it. Readiness
means "send me work".

A check is a coroutine function returning None when healthy, or a short sentence saying
what is wrong; a check that raises or takes longer than its timeout counts as failing.
Answers are plain text, one line per check, as kube-apiserver's ``/healthz?verbose``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import attrs
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from . import http, serving

__all__ = ["Check", "Health", "Progress", "StatusServer", "parse_address"]

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[str | None]]
"""A health check: None when healthy, else what is wrong."""

#: Seconds one check may take before it counts as failing.
CHECK_TIMEOUT = 5.0


@attrs.define(eq=False)
class _Registered:
    name: str
    check: Check


@attrs.define(eq=False)
class Health:
    """The liveness and readiness checks of one process."""

    timeout: float = CHECK_TIMEOUT
    _live: list[_Registered] = attrs.field(factory=list, init=False)
    _ready: list[_Registered] = attrs.field(factory=list, init=False)

    def add_liveness(self, name: str, check: Check) -> Callable[[], None]:
        """Register a liveness check; returns a function that removes it again."""
        return self._add(self._live, name, check)

    def add_readiness(self, name: str, check: Check) -> Callable[[], None]:
        """Register a readiness check; returns a function that removes it again."""
        return self._add(self._ready, name, check)

    @staticmethod
    def _add(checks: list[_Registered], name: str, check: Check) -> Callable[[], None]:
        entry = _Registered(name, check)
        checks.append(entry)

        def remove() -> None:
            if entry in checks:
                checks.remove(entry)

        return remove

    async def liveness(self) -> list[tuple[str, str | None]]:
        """Each liveness check's name and problem (None when healthy)."""
        return await self._run(self._live)

    async def readiness(self) -> list[tuple[str, str | None]]:
        """Each readiness check's name and problem; liveness failures count too."""
        return await self._run([*self._live, *self._ready])

    async def _run(self, checks: list[_Registered]) -> list[tuple[str, str | None]]:
        entries = list(checks)
        results = await asyncio.gather(*(self._one(e) for e in entries))
        return [(e.name, problem) for e, problem in zip(entries, results, strict=True)]

    async def _one(self, entry: _Registered) -> str | None:
        try:
            return await asyncio.wait_for(entry.check(), timeout=self.timeout)
        except TimeoutError:
            return f"no answer within {self.timeout:g}s"
        except Exception as exc:
            return f"the check failed: {exc or type(exc).__name__}"


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` of ``--metrics-address`` (``[::1]:9090`` for IPv6; port 0 picks one).

    :raises ValueError: naming the flag and the accepted form.
    """
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(
            f"--metrics-address {text!r}: use HOST:PORT, e.g. 127.0.0.1:9090 or 0.0.0.0:9090"
        )
    return host, int(port_text)


#: Seconds a client has to send its request (the kubelet's probes send theirs at once).
REQUEST_SECONDS = 10.0
#: Bounds on a request: a probe or a scrape sends a short line and a few headers.
_REQUEST_LIMITS = http.Limits(status_line=4096, header_line=4096, headers=50, header_bytes=16384)

_TEXT = "text/plain; charset=utf-8"


@attrs.define(eq=False)
class StatusServer:
    """Serve ``/metrics`` (``registry``), ``/healthz``, ``/livez`` and ``/readyz`` (``health``).

    ``port`` 0 picks a free port; :attr:`port` holds the one bound after :meth:`start`.
    On :class:`~.serving.Server`: ``GET`` and ``HEAD`` only, one request per connection
    (``Connection: close``), a bounded request line and headers that must arrive within
    ``request_seconds``.
    """

    registry: CollectorRegistry
    health: Health
    host: str = "127.0.0.1"
    port: int = 0
    request_seconds: float = REQUEST_SECONDS
    _server: serving.Server | None = attrs.field(default=None, init=False)

    async def start(self) -> None:
        """Bind and serve."""
        if self._server is not None:
            return
        liveness: serving.Handler = self._liveness
        routes: serving.Routes = {
            "/metrics": {"GET": self._metrics},
            "/healthz": {"GET": liveness},
            "/livez": {"GET": liveness},
            "/readyz": {"GET": self._readiness},
        }
        bounds = serving.Bounds(
            head=_REQUEST_LIMITS, body=1024, request_seconds=self.request_seconds
        )
        server = serving.Server(
            routes, host=self.host, port=self.port, bounds=bounds, keep_alive=False
        )
        await server.start()
        self._server = server
        self.port = server.port
        log.info("serving /metrics, /healthz and /readyz on %s", self.url)

    async def close(self) -> None:
        """Stop serving (answers under way get a few seconds to be sent)."""
        if self._server is None:
            return
        server, self._server = self._server, None
        await server.close()

    async def __aenter__(self) -> StatusServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """The server's base URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def _metrics(self, _: serving.Request) -> serving.Reply:
        body = await asyncio.to_thread(generate_latest, self.registry)
        return serving.Reply(200, body, CONTENT_TYPE_LATEST)

    async def _liveness(self, _: serving.Request) -> serving.Reply:
        return _answer(await self.health.liveness())

    async def _readiness(self, _: serving.Request) -> serving.Reply:
        return _answer(await self.health.readiness())


def _answer(results: list[tuple[str, str | None]]) -> serving.Reply:
    lines = [f"[-]{name}: {problem}" if problem else f"[+]{name} ok" for name, problem in results]
    failed = [name for name, problem in results if problem]
    lines.append(f"{'failed: ' + ', '.join(failed) if failed else 'ok'}")
    return serving.Reply(503 if failed else 200, ("\n".join(lines) + "\n").encode(), _TEXT)


@attrs.define(eq=False)
class Progress:
    """Whether a loop is making progress: work under way for too long means stuck.

    The loop calls :meth:`began` and :meth:`ended` around each unit of work (a reconcile);
    :meth:`problem` reports the oldest unit still under way after ``stall_after`` seconds.
    Waiting for work is not a stall.
    """

    name: str
    stall_after: float = 300.0
    _started: dict[int, float] = attrs.field(factory=dict, init=False)
    _next: int = attrs.field(default=0, init=False)
    last_ended: float = attrs.field(factory=time.monotonic, init=False)

    def began(self) -> int:
        """A unit of work began; returns its token for :meth:`ended`."""
        self._next += 1
        self._started[self._next] = time.monotonic()
        return self._next

    def ended(self, token: int) -> None:
        """The unit of work ``token`` ended (whatever its result)."""
        self._started.pop(token, None)
        self.last_ended = time.monotonic()

    async def problem(self) -> str | None:
        """A :data:`Check`: the stalled work, if any."""
        if not self._started:
            return None
        oldest = time.monotonic() - min(self._started.values())
        if oldest <= self.stall_after:
            return None
        return (
            f"a unit of work has been under way for {oldest:.1f}s (more than {self.stall_after:g}s)"
        )
