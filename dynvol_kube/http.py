"""A small HTTP/1.1 client on asyncio streams: how :class:`~.client.Client` reaches the apiserver.

Why not aiohttp: every service process started with it imported about 150 modules (yarl,
multidict, email, http, ...), some 16 MiB of resident memory and 0.2 s of CPU, for a
client that only ever talks JSON to one server. This module does what that needs and no
more: one :class:`Pool` of keep-alive connections per server (TLS with the kubeconfig's
CA and client certificate, bounded in number), requests with a deadline, bodies framed by
``Content-Length``, chunks, or the end of the connection, read whole or line by line (a
watch is a chunked stream of JSON lines). It never asks for compression.

The server is trusted to be the apiserver, but what it sends is bounded all the same
(:class:`Limits`): the status line, each header line, the number and total size of
headers, a chunk-size line, a line of a stream and a whole body. Going past one is a
:class:`ProtocolError`, and the connection is dropped. Header values are never logged (one
of them is the bearer token).

Neighbours: :mod:`.client` builds requests and maps answers to the project's errors;
:mod:`.serving` reads requests with :func:`read_head` and :class:`Body` (the status
endpoint and the admission webhooks).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Mapping
from urllib.parse import quote, urlencode, urlsplit

import attrs

__all__ = [
    "Answer",
    "Body",
    "HTTPError",
    "Limits",
    "Pool",
    "ProtocolError",
    "Response",
    "StatusError",
    "TooLarge",
    "parse_chunk_size",
    "parse_header_line",
    "parse_request_line",
    "parse_status_line",
    "read_head",
]

#: Methods that may be sent again after a kept-alive connection turned out to be closed.
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})

#: Bytes read from the socket at a time.
_READ_SIZE = 64 * 1024
#: Interim (1xx) answers skipped before the real one.
_MAX_INTERIM = 5
# Characters a path may carry as they are (RFC 3986 pchar and "/", and "%": the path comes
# escaped already, as Resource.path escapes names); the rest are escaped.
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_HEX = frozenset(b"0123456789abcdefABCDEF")


class HTTPError(Exception):
    """A request failed: the connection, TLS, or an answer that is not HTTP/1.1 as it should be."""


class ProtocolError(HTTPError):
    """The peer sent something malformed or larger than :class:`Limits` allow."""


class TooLarge(ProtocolError):
    """The peer sent a line, a head or a body larger than :class:`Limits` allow."""


class StatusError(HTTPError):
    """An answer whose status is not 2xx (chained under the project's ``APIError``)."""

    def __init__(self, status: int, reason: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status} {reason}".strip())
        self.status = status
        self.reason = reason
        #: The answer's headers (names in lower case): ``retry-after`` for a 429 or 503.
        self.headers: Mapping[str, str] = dict(headers or {})


@attrs.frozen(kw_only=True)
class Limits:
    """Bounds on what a peer may send."""

    status_line: int = 8 * 1024
    header_line: int = 16 * 1024
    headers: int = 100
    header_bytes: int = 64 * 1024
    chunk_line: int = 1024
    #: A line of a stream; the apiserver refuses objects above 3 MiB, so one watch event
    #: (the object and its envelope) is far below this.
    line: int = 16 * 1024 * 1024
    #: A whole body read at once (a page of a list; callers page with ``limit``).
    body: int = 256 * 1024 * 1024


DEFAULT_LIMITS = Limits()


# -- parsing (pure) ------------------------------------------------------------------------


def parse_status_line(line: bytes) -> tuple[str, int, str]:
    """``(version, status, reason)`` of ``HTTP/1.1 200 OK`` (line ending removed)."""
    version, _, rest = line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise ProtocolError(f"not an HTTP/1.x status line: {_shown(line)}")
    if len(code) != 3 or not code.isdigit() or not 100 <= int(code) <= 599:
        raise ProtocolError(f"not an HTTP status code: {_shown(code)}")
    return version.decode(), int(code), reason.decode("latin-1").strip()


def parse_request_line(line: bytes) -> tuple[str, str, str]:
    """``(method, target, version)`` of ``GET /path HTTP/1.1`` (line ending removed)."""
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1]:
        raise ProtocolError(f"not an HTTP/1.x request line: {_shown(line)}")
    method, target = parts[0].decode("latin-1"), parts[1].decode("latin-1")
    if not method.isalpha() or not method.isupper():
        raise ProtocolError(f"not an HTTP method: {method[:20]!r}")
    if any(ch <= " " or ch == "\x7f" for ch in target):
        raise ProtocolError(f"a control character in the request target: {_shown(parts[1])}")
    return method, target, parts[2].decode()


def parse_header_line(line: bytes) -> tuple[str, str]:
    """``(name in lower case, value)`` of ``Name: value`` (line ending removed)."""
    name, sep, value = line.partition(b":")
    if not sep or not name or not all(byte in _TOKEN for byte in name):
        # A line that starts with white space (an obsolete folded header) lands here too.
        raise ProtocolError(f"not a header line: {_shown(line)}")
    if any((byte < 0x20 and byte != 0x09) or byte == 0x7F for byte in value):
        raise ProtocolError(f"header {name.decode()!r} has a control character")
    return name.decode().lower(), value.strip(b" \t").decode("latin-1")


def parse_chunk_size(line: bytes) -> int:
    """The size in a chunk-size line (``1a3f``, maybe ``;extension``; line ending removed)."""
    size = line.partition(b";")[0].strip(b" \t")
    if not size or len(size) > 16 or not all(byte in _HEX for byte in size):
        raise ProtocolError(f"not a chunk size: {_shown(line)}")
    return int(size, 16)


def _shown(data: bytes) -> str:
    """A short, printable excerpt of what a peer sent, for an error message."""
    return repr(data[:80])


async def _read_line(
    reader: asyncio.StreamReader, limit: int, what: str, *, first: bool = False
) -> bytes:
    """One line without its ending, at most ``limit`` bytes long. The connection's end
    before the ``first`` line of an answer is a :class:`ConnectionResetError` (a kept-alive
    connection the server had closed); anywhere else it is a :class:`ProtocolError`."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError as exc:
        raise TooLarge(f"{what} is longer than {limit} bytes") from exc
    except asyncio.IncompleteReadError as exc:
        if first and not exc.partial:
            raise ConnectionResetError(f"the connection closed before {what}") from exc
        raise ProtocolError(f"the connection closed in the middle of {what}") from exc
    if len(line) > limit + 2:
        raise TooLarge(f"{what} is longer than {limit} bytes")
    return line.rstrip(b"\r\n")


async def read_head(
    reader: asyncio.StreamReader, limits: Limits = DEFAULT_LIMITS, *, started: bytes = b""
) -> tuple[bytes, dict[str, str]]:
    """The first line and the headers of a message (header names in lower case; repeated
    headers joined with ``", "``), bounded by ``limits``. The reader's own limit must be
    at least as large as each line limit. ``started`` is the start of the first line when
    the caller read it already (a server waits for a request's first byte with one
    timeout, and for the rest of it with another)."""
    if b"\n" in started:
        raise ValueError("started must be less than a line")
    start = started + await _read_line(
        reader, limits.status_line, "the first line", first=not started
    )
    if len(start) > limits.status_line:
        raise TooLarge(f"the first line is longer than {limits.status_line} bytes")
    headers: dict[str, str] = {}
    total = 0
    while True:
        line = await _read_line(reader, limits.header_line, "a header line")
        if not line:
            return start, headers
        total += len(line)
        if len(headers) >= limits.headers or total > limits.header_bytes:
            raise TooLarge(
                f"more than {limits.headers} headers or {limits.header_bytes} bytes of them"
            )
        name, value = parse_header_line(line)
        headers[name] = f"{headers[name]}, {value}" if name in headers else value


def _tokens(value: str) -> set[str]:
    return {part.strip().lower() for part in value.split(",")}


# -- connections ---------------------------------------------------------------------------


@attrs.define(eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0
    reused: bool = False

    def usable(self, now: float, idle_seconds: float) -> bool:
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and now - self.idle_since < idle_seconds
        )

    def close(self) -> None:
        self.writer.close()


@attrs.frozen
class Answer:
    """A whole answer: status, reason, headers (names in lower case) and body."""

    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes

    def error(self) -> StatusError | None:
        """The error of a status that is not 2xx, else None."""
        if 200 <= self.status <= 299:
            return None
        return StatusError(self.status, self.reason, self.headers)


class Body:
    """The body of an answer, read from ``reader`` as it arrives, whole (:meth:`read`) or
    line by line (:meth:`readline`), framed as ``headers`` say (``Content-Length``,
    chunks, or the end of the connection). ``read_timeout`` bounds each wait for more."""

    def __init__(
        self, reader: asyncio.StreamReader, *, method: str, version: str, status: int,
        headers: Mapping[str, str], limits: Limits = DEFAULT_LIMITS,
        read_timeout: float | None = None,
    ) -> None:  # fmt: skip
        self.read_timeout = read_timeout
        self._reader: asyncio.StreamReader | None = reader
        self._limits = limits
        self._buffer = bytearray()
        self._scanned = 0
        self._chunked = False
        self._chunk_left = 0
        self._length: int | None = None  # bytes of body left; None: until the end
        self._done = False
        if headers.get("content-encoding", "identity").strip().lower() != "identity":
            # Never asked for (no Accept-Encoding is sent): not decoded, so refused.
            raise ProtocolError(
                f"a body in {headers['content-encoding']!r}, which was not asked for"
            )
        connection = _tokens(headers.get("connection", ""))
        self._keep_alive = version == "HTTP/1.1" and "close" not in connection
        if method == "HEAD" or status in (204, 304):
            self._done = True
        elif "transfer-encoding" in headers:
            codings = [c for c in _tokens(headers["transfer-encoding"]) if c]
            if codings != ["chunked"]:
                raise ProtocolError(
                    f"unsupported Transfer-Encoding {headers['transfer-encoding']!r}"
                )
            self._chunked = True
        elif "content-length" in headers:
            self._length = _content_length(headers["content-length"])
            if self._length > self._limits.body:
                raise TooLarge(f"a body of {self._length} bytes (more than {self._limits.body})")
            self._done = self._length == 0
        else:
            self._keep_alive = False  # the body ends with the connection

    @property
    def done(self) -> bool:
        """Whether the body was read to its end."""
        return self._done

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request once the body is read."""
        return self._keep_alive

    async def read(self) -> bytes:
        """The rest of the body."""
        while await self._fill():
            if len(self._buffer) > self._limits.body:
                raise TooLarge(f"a body larger than {self._limits.body} bytes")
        data = bytes(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        return data

    async def readline(self) -> bytes:
        """The next line of the body with its ``\\n``; the last one may lack it; ``b""`` at
        the end. A line longer than :attr:`Limits.line` is a :class:`ProtocolError`."""
        while True:
            found = self._buffer.find(b"\n", self._scanned)
            if found >= self._limits.line:
                raise TooLarge(f"a line longer than {self._limits.line} bytes")
            if found >= 0:
                line = bytes(self._buffer[: found + 1])
                del self._buffer[: found + 1]
                self._scanned = 0
                return line
            self._scanned = len(self._buffer)
            if len(self._buffer) > self._limits.line:
                raise TooLarge(f"a line longer than {self._limits.line} bytes")
            if not await self._fill():
                line = bytes(self._buffer)
                self._buffer.clear()
                self._scanned = 0
                return line

    async def _fill(self) -> bool:
        """Read more of the body into the buffer; False at its end."""
        if self._done:
            return False
        if self._reader is None:
            raise HTTPError("the response was closed")
        if self.read_timeout is None:
            return await self._fill_from(self._reader)
        async with asyncio.timeout(self.read_timeout):
            return await self._fill_from(self._reader)

    async def _fill_from(self, reader: asyncio.StreamReader) -> bool:
        if self._chunked:
            if self._chunk_left == 0:
                size = parse_chunk_size(
                    await _read_line(reader, self._limits.chunk_line, "a chunk size")
                )
                if size == 0:
                    await read_head_trailers(reader, self._limits)
                    self._done = True
                    return False
                self._chunk_left = size
            data = await reader.read(min(self._chunk_left, _READ_SIZE))
            if not data:
                raise ProtocolError("the connection closed in the middle of a chunk")
            self._chunk_left -= len(data)
            if self._chunk_left == 0:
                try:
                    ending = await reader.readexactly(2)
                except asyncio.IncompleteReadError as exc:
                    raise ProtocolError("the connection closed at the end of a chunk") from exc
                if ending != b"\r\n":
                    raise ProtocolError("a chunk is longer than its size")
            self._buffer += data
            return True
        if self._length is None:
            data = await reader.read(_READ_SIZE)
            if not data:
                self._done = True
                return False
            self._buffer += data
            return True
        data = await reader.read(min(self._length, _READ_SIZE))
        if not data:
            raise ProtocolError(f"the connection closed {self._length} bytes before the body's end")
        self._length -= len(data)
        self._done = self._length == 0
        self._buffer += data
        return True


class Response(Body):
    """An answer of a :class:`Pool`, its body read as it arrives. :meth:`close` (or
    ``async with``) gives the connection back to the pool when the body was read to its
    end, and drops it otherwise."""

    def __init__(
        self, pool: Pool, conn: _Connection, *, method: str, version: str, status: int,
        reason: str, headers: dict[str, str], read_timeout: float | None,
    ) -> None:  # fmt: skip
        super().__init__(
            conn.reader, method=method, version=version, status=status, headers=headers,
            limits=pool.limits, read_timeout=read_timeout,
        )  # fmt: skip
        self.status = status
        self.reason = reason
        self.headers = headers
        self._pool = pool
        self._conn: _Connection | None = conn

    def error(self) -> StatusError | None:
        """The error of a status that is not 2xx, else None."""
        if 200 <= self.status <= 299:
            return None
        return StatusError(self.status, self.reason, self.headers)

    def close(self) -> None:
        """Give the connection back (body read to its end) or drop it; idempotent."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._reader = None
        self._pool._release(conn, keep=self.done and self.keep_alive)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


async def read_head_trailers(reader: asyncio.StreamReader, limits: Limits) -> None:
    """Skip the trailer section after the last chunk (bounded like headers)."""
    total = 0
    for _ in range(limits.headers + 1):
        line = await _read_line(reader, limits.header_line, "a trailer line")
        if not line:
            return
        total += len(line)
        if total > limits.header_bytes:
            break
    raise TooLarge(f"more than {limits.headers} trailers or {limits.header_bytes} bytes")


def _content_length(value: str) -> int:
    # Repeated headers arrive joined with ", "; equal repeats are allowed (RFC 9110 8.6).
    values = {part.strip() for part in value.split(",")}
    if len(values) != 1:
        raise ProtocolError(f"conflicting Content-Length {value!r}")
    (text,) = values
    if not text.isdigit() or len(text) > 18:
        raise ProtocolError(f"not a Content-Length: {value!r}")
    return int(text)


class Pool:
    """Keep-alive connections to one server (``http(s)://host[:port][/prefix]``).

    At most ``max_connections`` requests are under way at once (a further one waits for a
    place); a watch holds its connection until it is closed. A connection idle for
    ``idle_seconds`` is not used again: servers drop idle connections, and a request sent
    just as one does fails (the 15 s default is aiohttp's, which the services used before,
    and well inside the apiserver's own idle timeout). A request that fails because a
    kept-alive connection turned out to be closed is sent once more on a new connection
    when its method is idempotent.
    """

    def __init__(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        max_connections: int = 100,
        idle_seconds: float = 15.0,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.limits = limits
        self.idle_seconds = idle_seconds
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        self._server_hostname = server_hostname if self._ssl is not None else None
        shown = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if parts.scheme == "https" else 80
        self._host_header = shown if self.port == default else f"{shown}:{self.port}"
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._closed = False

    def target(self, path: str, query: list[tuple[str, str]] | None = None) -> str:
        """The request target of ``path`` and ``query`` under the URL's prefix. Escapes
        left in ``path`` are kept; a character that may not be in a path (a space, ``?``,
        ``#``, a control character) is escaped."""
        target = quote(self.prefix + path, safe=_PATH_SAFE)
        if query:
            target += "?" + urlencode(query)
        return target

    async def request(
        self, method: str, target: str, *, headers: Mapping[str, str], body: bytes | None = None,
        within: float,
    ) -> Answer:  # fmt: skip
        """Send a request and read the whole answer, all within ``within`` seconds."""
        async with asyncio.timeout(within):
            response = await self.open(method, target, headers=headers, body=body)
            try:
                data = await response.read()
            finally:
                response.close()
        return Answer(response.status, response.reason, response.headers, data)

    async def open(
        self, method: str, target: str, *, headers: Mapping[str, str], body: bytes | None = None,
        read_timeout: float | None = None,
    ) -> Response:  # fmt: skip
        """Send a request and read the answer's head; the caller reads the body and closes
        the :class:`Response`. ``read_timeout`` bounds each wait for more of the body."""
        head = self._head(method, target, headers, body)
        await self._slots.acquire()
        try:
            for attempt in range(2):
                conn = await self._connection(fresh=attempt > 0)
                try:
                    conn.writer.write(head)
                    if body:
                        conn.writer.write(body)
                    await conn.writer.drain()
                    version, status, reason, answer = await self._answer_head(conn.reader)
                except (ConnectionError, ssl.SSLError, ProtocolError, OSError) as exc:
                    self._drop(conn)
                    retry = (
                        conn.reused
                        and method in IDEMPOTENT
                        and isinstance(exc, ConnectionError)
                        and attempt == 0
                    )
                    if not retry:
                        raise
                    continue
                except BaseException:
                    self._drop(conn)  # a timeout or a cancellation mid-request
                    raise
                try:
                    return Response(
                        self, conn, method=method, version=version, status=status,
                        reason=reason, headers=answer, read_timeout=read_timeout,
                    )  # fmt: skip
                except BaseException:
                    self._drop(conn)
                    raise
            raise AssertionError("unreachable")  # pragma: no cover
        except BaseException:
            self._slots.release()
            raise

    def _head(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes | None
    ) -> bytes:
        if not method or not all(byte in _TOKEN for byte in method.encode()):
            raise ValueError(f"not an HTTP method: {method!r}")
        if not target.startswith("/") or any(ch <= " " or ch == "\x7f" for ch in target):
            raise ValueError("the request target has a space or a control character")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host_header}"]
        for name, value in headers.items():
            if not name or not all(byte in _TOKEN for byte in name.encode("latin-1", "replace")):
                raise ValueError(f"not a header name: {name!r}")
            if any(ch in value for ch in "\r\n\0"):
                # Never show the value: it may be a token.
                raise ValueError(f"header {name!r} has a line break or a NUL")
            if name.lower() not in ("host", "content-length", "transfer-encoding", "connection"):
                lines.append(f"{name}: {value}")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _answer_head(
        self, reader: asyncio.StreamReader
    ) -> tuple[str, int, str, dict[str, str]]:
        for _ in range(_MAX_INTERIM + 1):
            start, headers = await read_head(reader, self.limits)
            version, status, reason = parse_status_line(start)
            if not 100 <= status <= 199:
                return version, status, reason, headers
        raise ProtocolError(f"more than {_MAX_INTERIM} interim answers")

    async def _connection(self, *, fresh: bool) -> _Connection:
        if self._closed:
            raise HTTPError("the connection pool is closed")
        now = time.monotonic()
        while self._idle and not fresh:
            conn = self._idle.pop()
            if conn.usable(now, self.idle_seconds):
                conn.reused = True
                return conn
            self._drop(conn)
        limit = max(self.limits.status_line, self.limits.header_line, self.limits.chunk_line)
        reader, writer = await asyncio.open_connection(
            self.host, self.port, ssl=self._ssl, server_hostname=self._server_hostname,
            limit=limit + 2,
        )  # fmt: skip
        conn = _Connection(reader, writer)
        self._open.add(conn)
        return conn

    def _drop(self, conn: _Connection) -> None:
        self._open.discard(conn)
        conn.close()

    def _release(self, conn: _Connection, *, keep: bool) -> None:
        self._slots.release()
        if keep and not self._closed and not conn.reader.at_eof():
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            self._drop(conn)

    async def close(self) -> None:
        """Close every connection, idle or in use; the pool takes no more requests."""
        self._closed = True
        conns = list(self._open)
        self._idle.clear()
        self._open.clear()
        for conn in conns:
            conn.close()
        if conns:
            await asyncio.gather(*(_wait_closed(conn) for conn in conns))


async def _wait_closed(conn: _Connection) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.writer.wait_closed(), 1.0)
