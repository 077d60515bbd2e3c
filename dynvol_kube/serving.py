"""A small HTTP/1.1 server on asyncio streams: the admission webhooks' and the status endpoint's.

Why not aiohttp: the same reasons as :mod:`.http` gives for the client side (issue 14 and
15: its packages are about 13 MB of the image and several MiB of every service's memory),
for servers whose clients are the kube-apiserver, the kubelet and Prometheus. This module
does what they need and no more:

* HTTP/1.1 with keep-alive (the apiserver reuses its connections to a webhook): requests
  on one connection are answered one after the other; ``Connection: close`` is honoured,
  an HTTP/1.0 request is answered and its connection closed, and a connection that waits
  longer than :attr:`Bounds.idle_seconds` for its next request is closed without a word.
* Bodies framed by ``Content-Length`` or chunks (:class:`~.http.Body` reads both), at most
  :attr:`Bounds.body` bytes (413 beyond, without reading them); ``Expect: 100-continue``
  is answered. A request with no framing header has no body.
* A request's head and body must arrive within :attr:`Bounds.request_seconds` of its first
  byte, and a new connection's first byte within as long again (408); its head must fit
  :attr:`Bounds.head` (431); a malformed one gets 400 with a one-line reason (so do a
  request with both ``Content-Length`` and ``Transfer-Encoding``, and one with a
  ``Content-Encoding``: 415). Each of these answers closes the connection: what follows
  in it can no longer be told apart from the request's rest.
* Routes map a path (the target without its query) and a method to a handler: an unknown
  path is 404, a method the path does not serve 405 (with ``Allow``); ``HEAD`` is served
  by the ``GET`` handler without the body. A handler that raises is 500.
* TLS when given an :class:`ssl.SSLContext` (its SNI callback may swap the certificate of
  each new connection, as the webhook's ``ServingCertificate`` does).
* At most :attr:`Bounds.connections` connections at once. One beyond that ends the
  connection that has waited longest for its next request (a kept-alive or a new one
  that has sent nothing yet: its client reconnects when it has a request); when every
  connection has a request under way, the newcomer is answered 503 with ``Retry-After``
  and closed. A crowd of idle connections, one client's or many, so never keeps the
  apiserver out, nor runs the process out of file descriptors.
* :meth:`Server.close` stops accepting, ends the connections that wait for a request, gives
  answers under way :attr:`Bounds.close_grace` seconds to be sent (with ``Connection:
  close``), cuts the rest, and leaves no task behind.

Every connection is its own task: a client that sends slowly, or goes away mid-body, only
holds its own. Neighbours: :mod:`.http` parses (``read_head``, ``Body``, ``Limits``);
:mod:`.health` serves ``/metrics`` and the probes with it; ``dynvol_controllers.webhooks``
the admission reviews.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs

from . import http

__all__ = ["Bounds", "Handler", "Reply", "Request", "Routes", "Server"]

log = logging.getLogger(__name__)

TEXT = "text/plain; charset=utf-8"
JSON = "application/json; charset=utf-8"

REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
    415: "Unsupported Media Type", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable",
}  # fmt: skip

#: Empty lines tolerated before a request line (RFC 9112 2.2: a client may send a CRLF
#: after a POST body).
_LEADING_EMPTY_LINES = 2


@attrs.frozen
class Request:
    """A request read whole: method, target, version, headers (names in lower case), body."""

    method: str
    target: str
    version: str
    headers: Mapping[str, str]
    body: bytes = b""

    @property
    def path(self) -> str:
        """The target without its query."""
        return self.target.partition("?")[0]


@attrs.frozen
class Reply:
    """An answer: status, body and its Content-Type, and further headers."""

    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, status: int, message: str) -> Reply:
        """A plain-text answer of one line."""
        return cls(status, (message.rstrip("\n") + "\n").encode())

    @classmethod
    def json(cls, value: Any, status: int = 200) -> Reply:
        """A JSON answer."""
        return cls(status, json.dumps(value).encode(), JSON)


Handler = Callable[[Request], Awaitable[Reply]]
"""Answers a request; raising is a 500 (the exception logged)."""

Routes = Mapping[str, Mapping[str, Handler]]
"""Path -> method -> handler."""


#: A request's line and headers: an admission review's or a probe's are a few hundred bytes.
HEAD_LIMITS = http.Limits(
    status_line=8 * 1024, header_line=8 * 1024, headers=100, header_bytes=64 * 1024
)


_LATE = Reply.text(408, "the request did not arrive in time")
_CROWDED = attrs.evolve(
    Reply.text(503, "too many connections, each with a request under way"),
    headers=(("Retry-After", "1"),),
)
#: How often a crowded server says so in its log, at most (seconds).
_CROWDED_LOG_EVERY = 60.0


@attrs.frozen(kw_only=True)
class Bounds:
    """What a server allows its clients."""

    #: The request line and headers.
    head: http.Limits = HEAD_LIMITS
    #: A request body.
    body: int = 8 * 1024 * 1024
    #: From a request's first byte to the end of its body.
    request_seconds: float = 10.0
    #: A kept-alive connection's wait for its next request (aiohttp's 75 s, which the
    #: webhook server had before).
    idle_seconds: float = 75.0
    #: A new connection's TLS handshake.
    handshake_seconds: float = 10.0
    #: What :meth:`Server.close` gives the answers under way.
    close_grace: float = 5.0
    #: Connections served at once (see the module's docstring for what happens beyond).
    connections: int = 1000


class _Refused(Exception):
    """A request answered by the server itself (4xx); the connection then closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.reply = Reply.text(status, message)


@attrs.define(eq=False)
class _Connection:
    task: asyncio.Task[None] = attrs.field(init=False)
    #: A request is under way (from its first byte until its answer is sent): not to be
    #: ended to make room.
    reading: bool = False
    #: Its handler is running, or its answer is being sent (so ``reading`` too): what
    #: close() waits for.
    busy: bool = False
    #: Since when it has waited for a request (monotonic), while neither.
    waiting_since: float = attrs.field(factory=time.monotonic)


class Server:
    """Serve ``routes`` on ``host:port`` (``port`` 0 picks one; :attr:`port` holds the one
    bound after :meth:`start`), over TLS when ``ssl_context`` is given. ``keep_alive``
    False answers one request per connection."""

    def __init__(
        self,
        routes: Routes,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        bounds: Bounds | None = None,
        keep_alive: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.bounds = bounds or Bounds()
        self.keep_alive = keep_alive
        self._routes = {path: dict(methods) for path, methods in routes.items()}
        self._ssl = ssl_context
        self._server: asyncio.Server | None = None
        #: The streams' own tasks, and how each of their connections is served.
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        self._closing = False
        #: Connections ended to make room for a new one, and new ones refused (503).
        self.evicted = 0
        self.refused = 0
        self._crowded_logged = -_CROWDED_LOG_EVERY

    @property
    def url(self) -> str:
        """The base URL (after :meth:`start`, with the port bound)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self._ssl else 'http'}://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve."""
        if self._server is not None:
            return
        head = self.bounds.head
        self._closing = False
        server = await asyncio.start_server(
            self._connected, self.host, self.port, ssl=self._ssl,
            ssl_handshake_timeout=self.bounds.handshake_seconds if self._ssl else None,
            limit=max(head.status_line, head.header_line, head.chunk_line) + 2,
        )  # fmt: skip
        self._server = server
        self.port = int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop accepting; end idle connections, let answers under way finish within
        :attr:`Bounds.close_grace`, cut the rest."""
        if self._server is None:
            return
        server, self._server = self._server, None
        self._closing = True
        server.close()
        connections = dict(self._connections)
        for conn in connections.values():
            if not conn.busy:
                conn.task.cancel()
        busy = [conn.task for conn in connections.values() if conn.busy]
        if busy:
            await asyncio.wait(busy, timeout=self.bounds.close_grace)
        for conn in connections.values():
            conn.task.cancel()
        if connections:
            await asyncio.wait(list(connections))
        await server.wait_closed()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- one connection ---------------------------------------------------------------------

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The stream's own task only waits for the one that serves the connection: close()
        # cancels that one, and a stream task that ended cancelled would be logged as an
        # error by asyncio (3.11).
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.bounds.connections and not self._make_room():
            self.refused += 1
            self._log_crowded()
            with contextlib.suppress(ConnectionError, OSError):
                await _send(writer, _CROWDED, close=True, with_body=True)
            writer.transport.abort()
            return
        conn = _Connection()
        conn.task = asyncio.create_task(self._serve(reader, writer, conn))
        self._connections[task] = conn
        try:
            await asyncio.wait([conn.task])
        finally:
            del self._connections[task]
            if not conn.task.done():
                conn.task.cancel()  # this task itself was cancelled: the loop is ending
        if not conn.task.cancelled() and (exc := conn.task.exception()) is not None:
            log.error("serving a connection failed", exc_info=exc)

    def _make_room(self) -> bool:
        """End the connection that has waited longest for a request; False if every one
        has a request under way."""
        waiting = [conn for conn in self._connections.values() if not conn.reading]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda conn: conn.waiting_since)
        oldest.reading = True  # not chosen twice while its task ends
        oldest.task.cancel()
        self.evicted += 1
        self._log_crowded()
        return True

    def _log_crowded(self) -> None:
        now = time.monotonic()
        if now - self._crowded_logged >= _CROWDED_LOG_EVERY:
            self._crowded_logged = now
            log.warning(
                "%s: %d connections at once (the bound); %d waiting ones ended to make "
                "room and %d new ones refused so far",
                self.url, self.bounds.connections, self.evicted, self.refused,
            )  # fmt: skip

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Connection
    ) -> None:
        cut = True
        try:
            # The first request must begin within request_seconds, like its rest (408);
            # later ones within idle_seconds of the last answer (closed without a word:
            # a client may be sending a request just then, and would take an answer
            # for its own).
            wait, answered = self.bounds.request_seconds, False
            while not self._closing:
                try:
                    first = await self._first_byte(reader, wait)
                except TimeoutError:
                    if not answered:
                        await _send(writer, _LATE, close=True, with_body=True)
                    break
                if first is None:
                    break
                conn.reading = True
                keep, request, refused = await self._read(reader, writer, first)
                if request is None:
                    if refused is not None:
                        await _send(writer, refused, close=True, with_body=True)
                    break
                conn.busy = True
                reply = await self._answer(request)
                keep = keep and self.keep_alive and not self._closing
                await _send(writer, reply, close=not keep, with_body=request.method != "HEAD")
                conn.reading = conn.busy = False
                conn.waiting_since = time.monotonic()
                if not keep:
                    break
                wait, answered = self.bounds.idle_seconds, True
            cut = False
        except (ConnectionError, OSError):
            pass  # the client went away (ssl.SSLError is an OSError)
        finally:
            if cut:
                writer.transport.abort()
            else:
                writer.close()

    async def _first_byte(self, reader: asyncio.StreamReader, wait: float) -> bytes | None:
        """The first byte of the next request, or None when the client closed.

        :raises TimeoutError: nothing came within ``wait`` seconds.
        """
        for _ in range(_LEADING_EMPTY_LINES * 2 + 1):
            async with asyncio.timeout(wait):
                first = await reader.read(1)
            if first not in (b"\r", b"\n"):
                return first or None
        return None

    async def _read(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes
    ) -> tuple[bool, Request | None, Reply | None]:
        """``(keep-alive, request, None)``, or ``(False, None, refusal or None)``: a
        request the server answers itself, or a client gone mid-request."""
        try:
            async with asyncio.timeout(self.bounds.request_seconds):
                try:
                    start, headers = await http.read_head(reader, self.bounds.head, started=first)
                except http.TooLarge as exc:
                    raise _Refused(431, str(exc)) from exc
                method, target, version = http.parse_request_line(start)
                try:
                    body = await self._body(reader, writer, version, headers)
                except http.TooLarge as exc:
                    raise _Refused(413, str(exc)) from exc
        except TimeoutError:
            return False, None, _LATE
        except (_Refused, http.ProtocolError) as exc:
            if reader.at_eof():
                return False, None, None  # gone mid-request: nobody to answer
            if isinstance(exc, _Refused):
                return False, None, exc.reply
            return False, None, Reply.text(400, str(exc))
        connection = {part.strip().lower() for part in headers.get("connection", "").split(",")}
        keep = version == "HTTP/1.1" and "close" not in connection
        return keep, Request(method, target, version, headers, body), None

    async def _body(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        version: str,
        headers: Mapping[str, str],
    ) -> bytes:
        if "content-length" not in headers and "transfer-encoding" not in headers:
            return b""
        if "content-length" in headers and "transfer-encoding" in headers:
            # Either could frame the body, and a proxy may have picked the other one.
            raise _Refused(400, "both Content-Length and Transfer-Encoding")
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise _Refused(415, f"Content-Encoding {encoding!r} is not accepted")
        limits = attrs.evolve(self.bounds.head, body=self.bounds.body)
        body = http.Body(
            reader, method="POST", version=version, status=200, headers=headers, limits=limits
        )
        if headers.get("expect", "").strip().lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        return await body.read()

    async def _answer(self, request: Request) -> Reply:
        methods = self._routes.get(request.path)
        if methods is None:
            return Reply.text(404, f"not found: {request.path[:200]}")
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            allowed = sorted({*methods, *(["HEAD"] if "GET" in methods else [])})
            reply = Reply.text(405, f"{request.method} is not served here: {', '.join(allowed)}")
            return attrs.evolve(reply, headers=(("Allow", ", ".join(allowed)),))
        try:
            return await handler(request)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("answering %s %s failed", request.method, request.path[:200])
            return Reply.text(500, "internal error")


async def _send(
    writer: asyncio.StreamWriter, reply: Reply, *, close: bool, with_body: bool
) -> None:
    lines = [
        f"HTTP/1.1 {reply.status} {REASONS.get(reply.status, '')}".rstrip(),
        f"Content-Type: {reply.content_type}",
        f"Content-Length: {len(reply.body)}",
        *(f"{name}: {value}" for name, value in reply.headers),
    ]
    if close:
        lines.append("Connection: close")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if with_body:
        writer.write(reply.body)
    await writer.drain()
