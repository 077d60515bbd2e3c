"""The HTTP/1.1 parser of the client's own transport (dynvol_kube.http), in memory: status
and header lines, chunk sizes, and bodies framed by chunks, ``Content-Length`` or the end of
the connection, read whole and line by line, within their bounds.

Against real servers (the apiserver, and a tiny loopback server for malformed answers):
tests/integration/kube/test_http.py.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynvol_kube import http

SMALL = http.Limits(
    status_line=64, header_line=64, headers=4, header_bytes=128, chunk_line=32, line=100, body=300
)


def _reader(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=1024)
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def _chunked(pieces: list[bytes], extension: bool = False) -> bytes:
    out = b""
    for piece in pieces:
        if piece:
            out += f"{len(piece):x}".encode() + (b";name=value" if extension else b"") + b"\r\n"
            out += piece + b"\r\n"
    return out + b"0\r\n\r\n"


def _body(data: bytes, headers: dict[str, str], limits: http.Limits = http.DEFAULT_LIMITS, *,
          status: int = 200, method: str = "GET", version: str = "HTTP/1.1",
          eof: bool = True) -> http.Body:  # fmt: skip
    return http.Body(
        _reader(data, eof=eof), method=method, version=version, status=status, headers=headers,
        limits=limits,
    )  # fmt: skip


async def _lines(body: http.Body) -> list[bytes]:
    lines = []
    while line := await body.readline():
        lines.append(line)
    return lines


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# -- lines of the head ---------------------------------------------------------------------


def test_a_status_line() -> None:
    assert http.parse_status_line(b"HTTP/1.1 200 OK") == ("HTTP/1.1", 200, "OK")
    assert http.parse_status_line(b"HTTP/1.0 404 Not Found") == ("HTTP/1.0", 404, "Not Found")
    assert http.parse_status_line(b"HTTP/1.1 204") == ("HTTP/1.1", 204, "")


@pytest.mark.parametrize(
    "line",
    [b"", b"HTTP/2 200 OK", b"ICY 200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 2000 OK",
     b"HTTP/1.1 600 What", b"HTTP/1.1 +20 OK", b"HTTP/1.1  200 OK"],
)  # fmt: skip
def test_a_status_line_that_is_not_http_1(line: bytes) -> None:
    with pytest.raises(http.ProtocolError):
        http.parse_status_line(line)


def test_a_request_line() -> None:
    assert http.parse_request_line(b"POST /mutate-pods?timeout=5s HTTP/1.1") == (
        "POST", "/mutate-pods?timeout=5s", "HTTP/1.1",
    )  # fmt: skip
    assert http.parse_request_line(b"GET /healthz HTTP/1.0") == ("GET", "/healthz", "HTTP/1.0")


@pytest.mark.parametrize(
    "line",
    [b"", b"GET /healthz", b"GET /healthz HTTP/2", b"get / HTTP/1.1", b"GET  / HTTP/1.1",
     b"G3T / HTTP/1.1", b"GET /a\x01b HTTP/1.1", b"GET / HTTP/1.1 extra",
     b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],
)  # fmt: skip
def test_a_request_line_that_is_refused(line: bytes) -> None:
    with pytest.raises(http.ProtocolError):
        http.parse_request_line(line)


def test_a_header_line() -> None:
    assert http.parse_header_line(b"Content-Type: application/json") == (
        "content-type", "application/json",
    )  # fmt: skip
    assert http.parse_header_line(b"X-Empty:") == ("x-empty", "")
    assert http.parse_header_line(b"Tab:\t v \t") == ("tab", "v")


@pytest.mark.parametrize(
    "line",
    [b"no colon", b": no name", b" folded: value", b"Bad Name: v", b"Nul: a\x00b",
     b"Escape: \x1b[31m", b"Del: \x7f"],
)  # fmt: skip
def test_a_header_line_that_is_refused(line: bytes) -> None:
    with pytest.raises(http.ProtocolError):
        http.parse_header_line(line)


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_a_chunk_size_round_trips(size: int) -> None:
    assert http.parse_chunk_size(f"{size:x}".encode()) == size
    assert http.parse_chunk_size(f"{size:X};ext=1".encode()) == size


@pytest.mark.parametrize("line", [b"", b"-1", b"0x10", b"g", b"1 2", b"1" * 17, b";ext"])
def test_a_chunk_size_that_is_refused(line: bytes) -> None:
    with pytest.raises(http.ProtocolError):
        http.parse_chunk_size(line)


async def test_a_head_joins_repeated_headers_and_stops_at_the_blank_line() -> None:
    reader = _reader(b"HTTP/1.1 200 OK\r\nA: 1\r\nb: 2\r\nA: 3\r\n\r\nbody")
    start, headers = await http.read_head(reader)
    assert start == b"HTTP/1.1 200 OK"
    assert headers == {"a": "1, 3", "b": "2"}
    assert await reader.read() == b"body"


@pytest.mark.parametrize(
    ("head", "error"),
    [
        (b"HTTP/1.1 200 " + b"x" * 100 + b"\r\n\r\n", http.TooLarge),
        (b"HTTP/1.1 200 OK\r\nA: " + b"x" * 100 + b"\r\n\r\n", http.TooLarge),
        (b"HTTP/1.1 200 OK\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(5)) + b"\r\n",
         http.TooLarge),
        (b"HTTP/1.1 200 OK\r\n" + b"".join(b"H%d: %s\r\n" % (i, b"v" * 40) for i in range(4))
         + b"\r\n", http.TooLarge),
        (b"HTTP/1.1 200 OK\r\nA: 1", http.ProtocolError),
    ],
)  # fmt: skip
async def test_a_head_past_its_bounds_is_refused(head: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        await http.read_head(_reader(head), SMALL)


async def test_a_head_whose_first_bytes_were_read_already() -> None:
    # A server waits for a request's first byte with its idle timeout, then reads the rest.
    start, headers = await http.read_head(_reader(b"ET / HTTP/1.1\r\nA: 1\r\n\r\n"), started=b"G")
    assert (start, headers) == (b"GET / HTTP/1.1", {"a": "1"})
    with pytest.raises(http.TooLarge):
        await http.read_head(_reader(b"x" * 63 + b"\r\n\r\n"), SMALL, started=b"xx")
    # The connection's end after those bytes is a broken request, not a closed connection.
    with pytest.raises(http.ProtocolError):
        await http.read_head(_reader(b""), started=b"G")
    with pytest.raises(ValueError, match="less than a line"):
        await http.read_head(_reader(b""), started=b"\n")


async def test_no_answer_at_all_is_a_connection_error() -> None:
    # A kept-alive connection the server closed reads nothing: the pool retries that case.
    with pytest.raises(ConnectionError):
        await http.read_head(_reader(b""))


# -- bodies --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(
        st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"") + b"\n"), max_size=12
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=10),
    extension=st.booleans(),
)
def test_a_chunked_stream_of_lines_reads_back_whatever_the_chunks(
    lines: list[bytes], cuts: list[int], extension: bool
) -> None:
    data = b"".join(lines)
    wire = _chunked(_split(data, cuts), extension)

    async def main() -> None:
        body = _body(wire + b"HTTP/1.1 next", {"transfer-encoding": "chunked"})
        assert await _lines(body) == lines
        assert body.done
        assert body.keep_alive
        whole = _body(wire, {"transfer-encoding": "chunked"})
        assert await whole.read() == data

    asyncio.run(main())


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=300), close=st.booleans())
def test_a_body_framed_by_its_length_or_by_the_end_of_the_connection(
    data: bytes, close: bool
) -> None:
    async def main() -> None:
        if close:
            body = _body(data, {"connection": "close"})
        else:
            body = _body(data + b"next answer", {"content-length": str(len(data))}, eof=False)
        assert await body.read() == data
        assert body.done
        assert body.keep_alive is not close

    asyncio.run(main())


async def test_the_last_line_may_lack_its_newline() -> None:
    body = _body(_chunked([b"one\ntw", b"o"]), {"transfer-encoding": "chunked"})
    assert await _lines(body) == [b"one\n", b"two"]


@pytest.mark.parametrize(
    ("headers", "status", "method"),
    [({}, 204, "GET"), ({}, 304, "GET"), ({"content-length": "10"}, 200, "HEAD"),
     ({"content-length": "0"}, 200, "GET")],
)  # fmt: skip
async def test_answers_without_a_body(headers: dict[str, str], status: int, method: str) -> None:
    body = _body(b"HTTP/1.1 200 OK\r\n", headers, status=status, method=method, eof=False)
    assert await body.read() == b""
    assert body.done


async def test_http_1_0_and_connection_close_are_not_kept_alive() -> None:
    assert not _body(b"", {"content-length": "0"}, version="HTTP/1.0").keep_alive
    assert not _body(b"", {"content-length": "0", "connection": "Keep-Alive, Close"}).keep_alive
    assert _body(b"", {"content-length": "0", "connection": "keep-alive"}).keep_alive


async def test_a_line_longer_than_its_bound_is_refused() -> None:
    fits = _body(_chunked([b"a" * 99 + b"\n"]), {"transfer-encoding": "chunked"}, SMALL)
    assert await fits.readline() == b"a" * 99 + b"\n"
    # Whether the newline arrives with the long line or never.
    for wire in (_chunked([b"a" * 150 + b"\n"]), _chunked([b"a" * 90, b"a" * 90])):
        body = _body(wire, {"transfer-encoding": "chunked"}, SMALL)
        with pytest.raises(http.TooLarge, match="a line longer than 100 bytes"):
            await body.readline()


async def test_a_body_larger_than_its_bound_is_refused() -> None:
    with pytest.raises(http.TooLarge):
        _body(b"", {"content-length": "301"}, SMALL)
    for data, headers in (
        (_chunked([b"x" * 200, b"x" * 200]), {"transfer-encoding": "chunked"}),
        (b"x" * 400, {}),
    ):
        with pytest.raises(http.TooLarge):
            await _body(data, headers, SMALL).read()


@pytest.mark.parametrize(
    ("wire", "headers"),
    [
        (b"5\r\nabc", {"transfer-encoding": "chunked"}),  # closed in a chunk
        (b"3\r\nabcdef\r\n0\r\n\r\n", {"transfer-encoding": "chunked"}),  # longer than its size
        (b"zz\r\nabc\r\n", {"transfer-encoding": "chunked"}),  # not a size
        (b"3\r\nabc\r\n", {"transfer-encoding": "chunked"}),  # closed before the last chunk
        (b"abc", {"content-length": "5"}),  # closed before the end
        (b"abc", {"content-length": "3, 4"}),
        (b"abc", {"content-length": "-3"}),
        (b"abc", {"transfer-encoding": "gzip, chunked"}),
    ],
)
async def test_a_malformed_body_is_a_protocol_error(wire: bytes, headers: dict[str, str]) -> None:
    with pytest.raises(http.ProtocolError):
        await _body(wire, headers).read()


async def test_trailers_after_the_last_chunk_are_skipped_within_bounds() -> None:
    wire = b"3\r\nabc\r\n0\r\nTrailer: 1\r\n\r\nnext"
    body = _body(wire, {"transfer-encoding": "chunked"}, eof=False)
    assert await body.read() == b"abc"
    many = b"3\r\nabc\r\n0\r\n" + b"T: 1\r\n" * 10 + b"\r\n"
    with pytest.raises(http.TooLarge):
        await _body(many, {"transfer-encoding": "chunked"}, SMALL).read()


async def test_a_read_timeout_bounds_each_wait() -> None:
    body = http.Body(
        _reader(b"3\r\nab", eof=False), method="GET", version="HTTP/1.1", status=200,
        headers={"transfer-encoding": "chunked"}, read_timeout=0.05,
    )  # fmt: skip
    with pytest.raises(TimeoutError):
        await body.read()


# -- requests ------------------------------------------------------------------------------


def test_a_request_target_is_escaped_under_the_servers_prefix() -> None:
    async def main() -> None:
        pool = http.Pool("https://example.invalid:6443/prefix/")
        assert pool.target("/api/v1/namespaces") == "/prefix/api/v1/namespaces"
        # A name with '?', '#' or a space cannot change the query or split the request line.
        assert pool.target("/a b?c#d\n", [("watch", "true"), ("q", "a b&c")]) == (
            "/prefix/a%20b%3Fc%23d%0A?watch=true&q=a+b%26c"
        )
        # What Resource.path escaped stays as it is.
        assert pool.target("/api/v1/namespaces/a%2Fb") == "/prefix/api/v1/namespaces/a%2Fb"
        await pool.close()

    asyncio.run(main())


@pytest.mark.parametrize("url", ["ftp://host", "https://", "host:443", "unix:///var/run/x.sock"])
def test_a_pool_needs_an_http_url(url: str) -> None:
    with pytest.raises(ValueError, match="not an http"):
        http.Pool(url)


def test_a_compressed_body_that_was_not_asked_for_is_refused() -> None:
    async def main() -> None:
        with pytest.raises(http.ProtocolError, match="not asked for"):
            _body(b"\x1f\x8b", {"content-length": "2", "content-encoding": "gzip"})
        identity = _body(b"{}", {"content-length": "2", "content-encoding": "identity"})
        assert await identity.read() == b"{}"

    asyncio.run(main())
