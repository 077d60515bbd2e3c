"""The status server's HTTP side over a real socket on 127.0.0.1: what it answers to
probes and scrapes, and to requests that are malformed, too large, too slow or not GET.

What the checks themselves report, against the real apiserver: test_health.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from dynvol_kube import Metrics, StatusServer
from dynvol_kube import http as http_module

pytestmark = pytest.mark.integration


@pytest.fixture
async def server() -> AsyncIterator[StatusServer]:
    metrics = Metrics()

    async def failing() -> str | None:
        return "the disk is on fire"

    metrics.health.add_readiness("disk", failing)
    async with StatusServer(metrics.registry, metrics.health, port=0) as status:
        yield status


async def _exchange(server: StatusServer, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(10):
            start, headers = await http_module.read_head(reader)
            body = await reader.read()  # Connection: close: the body ends with it
    finally:
        writer.close()
    _, status, _ = http_module.parse_status_line(start)
    return status, headers, body


def _get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


async def test_probes_and_scrapes(server: StatusServer) -> None:
    status, headers, body = await _exchange(server, _get("/healthz"))
    assert (status, body) == (200, b"ok\n")
    assert headers["connection"] == "close"
    assert headers["content-length"] == str(len(body))
    status, _, body = await _exchange(server, _get("/readyz?verbose"))
    assert status == 503
    assert body == b"[-]disk: the disk is on fire\nfailed: disk\n"
    status, headers, body = await _exchange(server, _get("/metrics"))
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    assert b"# TYPE dynvol_apiserver_requests_total counter" in body
    status, headers, body = await _exchange(server, _get("/metrics", "HEAD"))
    assert (status, body) == (200, b"")
    assert int(headers["content-length"]) > 0


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (_get("/healthz", "POST", "Content-Length: 0\r\n"), 405),
        (_get("/nothing-here"), 404),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS to plain HTTP
        (b"GET /healthz\r\n\r\n", 400),
        (b"get /healthz HTTP/1.1\r\n\r\n", 400),
        (_get("/healthz", extra="X-Big: " + "a" * 5000 + "\r\n"), 431),
        (_get("/healthz", extra="".join(f"X-{i}: v\r\n" for i in range(60))), 431),
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n", 431),
        (_get("/healthz", extra="Bad Header\r\n"), 400),
    ],
)
async def test_a_bad_request_gets_a_clear_status(
    server: StatusServer, raw: bytes, status: int
) -> None:
    answered, _, body = await _exchange(server, raw)
    assert answered == status, body
    # ... and the server goes on answering.
    assert (await _exchange(server, _get("/healthz")))[0] == 200


async def test_a_request_that_does_not_arrive_in_time() -> None:
    metrics = Metrics()
    async with StatusServer(metrics.registry, metrics.health, request_seconds=0.2) as server:
        status, _, body = await _exchange(server, b"GET /healthz HTTP/1.1\r\n")  # no blank line
        assert status == 408, body
        # Nothing at all is a request that did not arrive either.
        status, _, body = await _exchange(server, b"")
        assert status == 408, body


async def test_closing_the_server_ends_idle_connections(server: StatusServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /heal")  # and nothing more
        await writer.drain()
        await asyncio.sleep(0.05)
        async with asyncio.timeout(5):
            await server.close()
            assert await reader.read() == b""  # closed, without an answer
    finally:
        writer.close()
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert pending == []
