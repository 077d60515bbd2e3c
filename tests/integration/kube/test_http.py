"""The client's own HTTP/1.1 transport (dynvol_kube.http) over real sockets.

Against the real kube-apiserver: a watch event larger than a chunk, a watch the server ends
(its connection is then used again), ``tls-server-name``. Against a tiny server on 127.0.0.1
whose answers each test writes, for what the apiserver never does: a kept-alive connection
closed under a request (retried only when the method is idempotent), no answer (a timeout),
heads, lines and bodies past their bounds, and the bound on connections.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from dynvol.testing.controlplane import ControlPlane
from dynvol_kube import APIError, Client, Resource
from dynvol_kube import http as http_module
from dynvol_kube.kubeconfig import Endpoint

pytestmark = pytest.mark.integration

CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", namespaced=False)

Handler = Callable[["Loopback", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Loopback:
    """An HTTP server on 127.0.0.1 that runs ``handler`` for each connection (numbered
    from 1), counting connections made and open."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.requests: list[tuple[int, str]] = []  # (connection, request line)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            await self.handler(self, reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError, http_module.ProtocolError):
            pass
        finally:
            self.open_now -= 1
            writer.close()
            self._tasks.discard(task)

    async def request(self, reader: asyncio.StreamReader, number: int) -> str:
        """Read one request (head and body); returns its request line."""
        start, headers = await http_module.read_head(reader)
        if "content-length" in headers:
            await reader.readexactly(int(headers["content-length"]))
        line = start.decode()
        self.requests.append((number, line))
        return line

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


def answer(body: bytes = b"{}", *, status: str = "200 OK", headers: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{headers}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.fixture
async def loopback() -> AsyncIterator[Callable[[Handler], Awaitable[Loopback]]]:
    servers: list[Loopback] = []

    async def make(handler: Handler) -> Loopback:
        server = Loopback(handler)
        await server.start()
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            await server.close()


@contextlib.asynccontextmanager
async def client_of(server: Loopback, **kwargs: Any) -> AsyncIterator[Client]:
    client = await Client.from_endpoint(Endpoint(server=server.url), **kwargs)
    try:
        yield client
    finally:
        await client.close()


# -- against the loopback server -----------------------------------------------------------


async def test_a_kept_alive_connection_closed_under_a_request_is_retried_when_idempotent(
    loopback: Callable[[Handler], Awaitable[Loopback]],
) -> None:
    async def one_answer_per_connection(
        server: Loopback, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await server.request(reader, n)
        writer.write(answer(json.dumps({"connection": n}).encode()))
        await writer.drain()
        # The next request on this connection finds it closed, as when a server drops an
        # idle connection just as the client sends on it.
        await server.request(reader, n)

    server = await loopback(one_answer_per_connection)
    async with client_of(server) as client:
        assert await client.request("GET", "/first") == {"connection": 1}
        assert await client.request("GET", "/second") == {"connection": 2}
        assert await client.request("PUT", "/third", body={}) == {"connection": 3}
        assert server.requests == [
            (1, "GET /first HTTP/1.1"), (1, "GET /second HTTP/1.1"), (2, "GET /second HTTP/1.1"),
            (2, "PUT /third HTTP/1.1"), (3, "PUT /third HTTP/1.1"),
        ]  # fmt: skip
        # A POST is not sent twice: the server may have acted on it.
        with pytest.raises(APIError, match="POST /fourth: the connection closed") as caught:
            await client.request("POST", "/fourth", body={})
        assert caught.value.status is None
        assert server.requests[-1] == (3, "POST /fourth HTTP/1.1")
        assert server.connections == 3
        # The next request opens a new connection.
        assert await client.request("GET", "/fifth") == {"connection": 4}


async def test_a_request_without_an_answer_times_out_and_its_connection_is_dropped(
    loopback: Callable[[Handler], Awaitable[Loopback]],
) -> None:
    async def slow_then_fast(
        server: Loopback, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        while True:
            line = await server.request(reader, n)
            if "/slow" in line:
                await asyncio.sleep(3600)
            writer.write(answer())
            await writer.drain()

    server = await loopback(slow_then_fast)
    async with client_of(server) as client:
        assert await client.request("GET", "/fast") is not None
        with pytest.raises(APIError, match="GET /slow: TimeoutError") as caught:
            await client.request("GET", "/slow", request_timeout=0.3)
        assert isinstance(caught.value.__cause__, TimeoutError)
        assert await client.request("GET", "/fast") == {}
        assert [n for n, _ in server.requests] == [1, 1, 2]


async def test_a_stream_that_stops_sending_times_out(
    loopback: Callable[[Handler], Awaitable[Loopback]],
) -> None:
    async def one_event_then_silence(
        server: Loopback, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await server.request(reader, n)
        event = json.dumps({"type": "ADDED", "object": {"metadata": {"name": "a"}}}) + "\n"
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{len(event):x}\r\n{event}\r\n".encode()
        )
        await writer.drain()
        await asyncio.sleep(3600)

    server = await loopback(one_event_then_silence)
    # A watch waits its timeoutSeconds and 30 s more for the next line; the pool's read
    # timeout is what does it.
    pool = http_module.Pool(server.url)
    try:
        response = await pool.open("GET", "/watch", headers={}, read_timeout=0.3)
        assert json.loads(await response.readline())["type"] == "ADDED"
        with pytest.raises(TimeoutError):
            await response.readline()
        response.close()
        assert pool._open == set()  # the connection in the middle of a body was dropped
    finally:
        await pool.close()


def _chunked_line(size: int) -> bytes:
    line = b"x" * size + b"\n"
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + (
        f"{len(line):x}\r\n".encode() + line + b"\r\n0\r\n\r\n"
    )


#: What the loopback server sends for each path, and what the client's error says.
HOSTILE = {
    "/long-header": (answer(headers="X-Big: " + "a" * 70_000 + "\r\n"), "longer than"),
    "/many-headers": (
        answer(headers="".join(f"X-{i}: v\r\n" for i in range(150))), "more than 100 headers",
    ),
    "/huge-body": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 300000000\r\n\r\n", "a body of 300000000 bytes",
    ),
    "/not-http": (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x status line"),
    "/bad-chunk": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nnope\r\n", "not a chunk size",
    ),
    "/two-lengths": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        "conflicting Content-Length",
    ),
    "/cut-short": (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "before the body's end"),
}  # fmt: skip


async def _hostile(
    server: Loopback, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
) -> None:
    line = await server.request(reader, n)
    path = line.split()[1].partition("?")[0]
    if path.endswith("/configmaps"):  # a watch
        writer.write(_chunked_line(17 * 1024 * 1024))
    elif path == "/fine":
        writer.write(answer())
    else:
        writer.write(HOSTILE[path][0])
    await writer.drain()
    if path != "/fine":
        writer.close()  # as a server does after a broken answer


@pytest.mark.parametrize("path", sorted(HOSTILE))
async def test_a_malformed_or_oversized_answer_is_refused(
    loopback: Callable[[Handler], Awaitable[Loopback]], path: str
) -> None:
    server = await loopback(_hostile)
    async with client_of(server) as client:
        with pytest.raises(APIError, match=HOSTILE[path][1]) as caught:
            await client.request("GET", path)
        assert isinstance(caught.value.__cause__, http_module.ProtocolError)
        # The client goes on, on a new connection.
        assert await client.request("GET", "/fine") == {}
        assert server.connections == 2


async def test_a_watch_line_longer_than_its_bound_is_refused(
    loopback: Callable[[Handler], Awaitable[Loopback]],
) -> None:
    server = await loopback(_hostile)
    async with client_of(server) as client:
        events = client.watch(CONFIGMAPS, namespace="ns", resource_version="1")
        with pytest.raises(APIError, match="a line longer than 16777216 bytes"):
            await anext(events)
        await events.aclose()


async def test_no_more_than_max_connections_are_open(
    loopback: Callable[[Handler], Awaitable[Loopback]],
) -> None:
    async def slow(
        server: Loopback, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        while True:
            await server.request(reader, n)
            await asyncio.sleep(0.1)
            writer.write(answer())
            await writer.drain()

    server = await loopback(slow)
    async with client_of(server, max_connections=2) as client:
        answers = await asyncio.gather(*(client.request("GET", f"/{i}") for i in range(8)))
    assert answers == [{}] * 8
    assert server.connections == 2
    assert server.most_open == 2


# -- against the real apiserver ------------------------------------------------------------


@pytest.fixture
async def admin(control_plane: ControlPlane) -> AsyncIterator[Client]:
    client = await Client.from_kubeconfig(control_plane.kubeconfig)
    try:
        yield client
    finally:
        await client.close()


def _open_connections(client: Client) -> int:
    return len(client._transport._pool._open)  # type: ignore[attr-defined]


async def test_a_watch_event_larger_than_a_chunk_and_the_connection_used_again(
    admin: Client, namespace: str
) -> None:
    listed = await admin.list(CONFIGMAPS, namespace=namespace)
    assert _open_connections(admin) == 1
    big = "y" * (900 * 1024)  # a ConfigMap holds at most 1 MiB
    await admin.create(CONFIGMAPS, {"metadata": {"name": "big"}, "data": {"v": big}},
                       namespace=namespace)  # fmt: skip
    seen = []
    async for kind, obj in admin.watch(
        CONFIGMAPS, namespace=namespace, resource_version=listed["metadata"]["resourceVersion"],
        timeout_seconds=2, bookmarks=False,
    ):  # fmt: skip
        seen.append((kind, obj["metadata"]["name"], len(obj["data"]["v"])))
    # The server ended the watch after 2 s with the last chunk: the generator returned.
    assert seen == [("ADDED", "big", len(big))]
    # Read to its end, the watch's connection went back to the pool and carries the next
    # requests; the pool opened no other.
    for _ in range(3):
        await admin.get(CONFIGMAPS, "big", namespace=namespace)
    assert _open_connections(admin) == 1


@pytest.mark.parametrize(
    ("name", "works"), [("kubernetes.default.svc", True), ("not-in-the-certificate.example", False)]
)
async def test_tls_server_name_is_the_name_verified(
    control_plane: ControlPlane, tmp_path: Path, name: str, works: bool
) -> None:
    config = {
        "clusters": [{"name": "c", "cluster": {
            "server": control_plane.server, "tls-server-name": name,
            "certificate-authority-data": base64.b64encode(control_plane.ca_file.read_bytes())
            .decode(),
        }}],
        "users": [{"name": "u", "user": {"token": control_plane.token}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }  # fmt: skip
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    async with await Client.from_kubeconfig(path) as client:
        if works:
            assert (await client.list(NAMESPACES, limit=1))["kind"] == "NamespaceList"
        else:
            with pytest.raises(APIError, match="certificate verify failed"):
                await client.list(NAMESPACES, limit=1)


async def test_a_name_stays_one_path_segment(admin: Client, namespace: str) -> None:
    await admin.create(CONFIGMAPS, {"metadata": {"name": "real"}}, namespace=namespace)
    # Escaped by Resource.path and kept so by the pool: neither another object, another
    # path nor a query parameter.
    for name in ("real?watch=true", "real/../real", "real#x", "re al"):
        with pytest.raises(APIError) as caught:
            await admin.get(CONFIGMAPS, name, namespace=namespace)
        assert caught.value.status in (400, 404), (name, caught.value)
    assert (await admin.get(CONFIGMAPS, "real", namespace=namespace))["metadata"]["name"] == "real"
