"""The webhook server's HTTP side over real TLS connections on 127.0.0.1: keep-alive,
certificate renewal for new connections, what it answers to requests that are too
large, too slow, malformed, misrouted, and that one bad client does not hold up the others.

What the apiserver makes of its answers: test_webhooks.py and test_serving_cert.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest

from dynvol_controllers import DevCerts, ensure_dev_certs
from dynvol_controllers.admission import AdmissionDecision, mutate_pod
from dynvol_controllers.certificates import renew_serving_cert
from dynvol_controllers.webhooks import MUTATE_PODS_PATH, WebhookServer
from dynvol_core import constants as c
from dynvol_kube import http
from dynvol_kube.serving import Bounds

pytestmark = pytest.mark.integration

QUICK = Bounds(body=64 * 1024, request_seconds=1.0, idle_seconds=1.0, close_grace=5.0)


@attrs.define
class Served:
    server: WebhookServer
    certs: DevCerts
    #: Set to hold every review until it is set again (a review under way).
    gate: asyncio.Event

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certs.ca_cert))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return ensure_dev_certs(tmp_path_factory.mktemp("webhook-certs"))


@contextlib.asynccontextmanager
async def _serve(certs: DevCerts, bounds: Bounds) -> AsyncIterator[Served]:
    gate = asyncio.Event()
    gate.set()

    async def decide(request: Mapping[str, Any]) -> AdmissionDecision:
        await gate.wait()
        return mutate_pod(request["object"])

    server = WebhookServer(
        port=0, cert_file=str(certs.cert), key_file=str(certs.key),
        handlers={MUTATE_PODS_PATH: decide}, bounds=bounds,
    )  # fmt: skip
    await server.start()
    try:
        yield Served(server, certs, gate)
    finally:
        gate.set()
        await server.close()


@pytest.fixture
async def served(certs: DevCerts) -> AsyncIterator[Served]:
    async with _serve(certs, QUICK) as each:
        yield each


def _review(uid: str, annotated: bool = True) -> dict[str, Any]:
    annotations = {c.ANNOTATION_STORAGE_PROVIDER_CLASS: "s3-sample"} if annotated else {}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": uid, "namespace": "ns", "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/a:1"}]},
    }
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid, "operation": "CREATE", "namespace": "ns",
            "kind": {"group": "", "version": "v1", "kind": "Pod"}, "object": pod,
        },
    }  # fmt: skip


def _post(
    body: bytes, *, path: str = MUTATE_PODS_PATH, extra: str = "", version: str = "1.1"
) -> bytes:
    head = (
        f"POST {path} HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


@attrs.define
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def answer(self, method: str = "POST") -> tuple[int, dict[str, str], bytes]:
        async with asyncio.timeout(10):
            start, headers = await http.read_head(self.reader)
            version, status, _ = http.parse_status_line(start)
            body = http.Body(
                self.reader, method=method, version=version, status=status, headers=headers
            )
            return status, headers, await body.read()

    async def closed(self) -> bool:
        """Whether the server closed the connection (without sending anything more)."""
        async with asyncio.timeout(10):
            try:
                return await self.reader.read() == b""
            except (ConnectionError, ssl.SSLError):
                return True

    def certificate(self) -> bytes:
        der = self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert isinstance(der, bytes)
        return der


@contextlib.asynccontextmanager
async def _connect(served: Served) -> AsyncIterator[Conn]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", served.server.port, ssl=served.context()
    )
    try:
        yield Conn(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError, TimeoutError):
            async with asyncio.timeout(5):
                await writer.wait_closed()


async def _mutated(conn: Conn, uid: str) -> dict[str, Any]:
    await conn.send(_post(json.dumps(_review(uid)).encode()))
    status, headers, body = await conn.answer()
    assert status == 200, body
    assert headers["content-type"].startswith("application/json")
    response = json.loads(body)["response"]
    assert response["uid"] == uid
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    return dict(headers)


async def test_reviews_share_one_kept_alive_connection(served: Served) -> None:
    async with _connect(served) as conn:
        headers = await _mutated(conn, "first")
        assert "connection" not in headers
        await _mutated(conn, "second")
        # Pipelined: both requests written before either answer is read.
        await conn.send(_post(json.dumps(_review("third")).encode()) * 2)
        for _ in range(2):
            status, _, body = await conn.answer()
            assert status == 200
            assert json.loads(body)["response"]["uid"] == "third"
        # An idle connection is closed after idle_seconds, without an answer.
        assert await conn.closed()
    assert served.server.reviews == 4


async def test_connection_close_and_http_1_0_are_answered_then_closed(served: Served) -> None:
    for raw in (
        _post(json.dumps(_review("a")).encode(), extra="Connection: close\r\n"),
        _post(json.dumps(_review("b")).encode(), version="1.0"),
    ):
        async with _connect(served) as conn:
            await conn.send(raw)
            status, headers, _ = await conn.answer()
            assert status == 200
            assert headers["connection"] == "close"
            assert await conn.closed()


async def test_chunked_bodies_expect_continue_and_healthz(served: Served) -> None:
    body = json.dumps(_review("chunked")).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:]))
    async with _connect(served) as conn:
        await conn.send(
            f"POST {MUTATE_PODS_PATH} HTTP/1.1\r\nHost: x\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
            + chunks
            + b"0\r\n\r\n"
        )
        status, _, answer = await conn.answer()
        assert status == 200
        assert json.loads(answer)["response"]["uid"] == "chunked"

        await conn.send(_post(body, extra="Expect: 100-continue\r\n")[: -len(body)])
        async with asyncio.timeout(10):
            interim, _ = await http.read_head(conn.reader)
        assert http.parse_status_line(interim)[1] == 100
        await conn.send(body)
        status, _, answer = await conn.answer()
        assert status == 200
        assert json.loads(answer)["response"]["uid"] == "chunked"

        await conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await conn.answer())[::2] == (200, b"ok")
        await conn.send(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, answer = await conn.answer("HEAD")
        assert (status, headers["content-length"], answer) == (200, "2", b"")


async def test_a_renewed_certificate_serves_new_connections(
    tmp_path: Path, certs: DevCerts
) -> None:
    own = DevCerts(tmp_path, tmp_path / "ca.crt", tmp_path / "tls.crt", tmp_path / "tls.key")
    for name in ("ca.crt", "ca.key", "tls.crt", "tls.key"):
        (tmp_path / name).write_bytes((certs.dir / name).read_bytes())
    async with _serve(own, attrs.evolve(QUICK, idle_seconds=30)) as served:
        async with _connect(served) as before:
            await _mutated(before, "before")
            old = before.certificate()
            renew_serving_cert(own)
            new = ssl.PEM_cert_to_DER_cert(own.cert.read_text())
            assert new != old
            async with _connect(served) as after:
                await _mutated(after, "after")
                assert after.certificate() == new
            # The connection made before keeps its certificate and goes on answering.
            await _mutated(before, "still")
            assert before.certificate() == old
        assert served.server.certificate.reloads == 1


_GOOD = json.dumps(_review("ok")).encode()


@pytest.mark.parametrize(
    ("raw", "status", "closes"),
    [
        (_post(b"{not json"), 400, False),
        (_post(b'{"kind": "AdmissionReview"}'), 400, False),
        (_post(b'{"request": 3}'), 400, False),
        (_post(_GOOD, path="/nothing-here"), 404, False),
        (b"GET /mutate-pods HTTP/1.1\r\nHost: x\r\n\r\n", 405, False),
        (_post(b"x" * (64 * 1024 + 1)), 413, True),
        (_post(b"", extra="Content-Length: 99999999\r\n"), 400, True),  # two lengths
        (_post(_GOOD, extra="Transfer-Encoding: chunked\r\n"), 400, True),
        (_post(_GOOD, extra="Content-Encoding: gzip\r\n"), 415, True),
        (b"POST /mutate-pods\r\n\r\n", 400, True),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, True),
        (_post(_GOOD, extra="Bad Header\r\n"), 400, True),
        (_post(_GOOD, extra="X-Big: " + "a" * 9000 + "\r\n"), 431, True),
    ],
)
async def test_a_bad_request_gets_a_clear_status(
    served: Served, raw: bytes, status: int, closes: bool
) -> None:
    async with _connect(served) as conn:
        await conn.send(raw)
        answered, headers, body = await conn.answer()
        assert answered == status, body
        assert body.endswith(b"\n"), body
        assert body.count(b"\n") == 1, body
        if status == 405:
            assert headers["allow"] == "POST"
        if closes:
            assert headers["connection"] == "close"
            assert await conn.closed()
        else:
            await _mutated(conn, "after-an-error")
    async with _connect(served) as conn:
        await _mutated(conn, "next")


async def test_a_chunked_body_beyond_the_limit_is_413(served: Served) -> None:
    chunk = b"%x\r\n%s\r\n" % (32 * 1024, b"x" * 32 * 1024)
    async with _connect(served) as conn:
        await conn.send(
            f"POST {MUTATE_PODS_PATH} HTTP/1.1\r\nHost: x\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
            + chunk * 3
        )
        assert (await conn.answer())[0] == 413
        assert await conn.closed()


async def test_a_request_that_does_not_arrive_in_time_is_408(served: Served) -> None:
    async with (
        _connect(served) as silent,
        _connect(served) as slow_head,
        _connect(served) as slow_body,
    ):
        await slow_head.send(b"POST /mutate-pods HTTP/1.1\r\nHost:")
        await slow_body.send(_post(_GOOD)[:-10])
        for conn in (silent, slow_head, slow_body):
            status, headers, body = await conn.answer()
            assert status == 408, body
            assert headers["connection"] == "close"
            assert await conn.closed()
    assert served.server.reviews == 0


async def test_slow_and_vanishing_clients_do_not_hold_up_the_others(certs: DevCerts) -> None:
    slow_bounds = attrs.evolve(QUICK, request_seconds=30, idle_seconds=30)
    async with _serve(certs, slow_bounds) as served:
        async with _connect(served) as slow, _connect(served) as gone:
            await slow.send(b"POST /mutate-pods HTTP/1.1\r\nHo")
            await gone.send(_post(_GOOD)[:-100])
            gone.writer.close()
            for i in range(3):
                async with _connect(served) as other:
                    await _mutated(other, f"other-{i}")
            # The slow one is still waited for, and finishes.
            await slow.send(_post(_GOOD)[len(b"POST /mutate-pods HTTP/1.1\r\nHo") :])
            assert (await slow.answer())[0] == 200
        assert served.server.reviews == 4


async def test_close_finishes_answers_under_way_and_leaves_no_task(certs: DevCerts) -> None:
    async with _serve(certs, attrs.evolve(QUICK, idle_seconds=30)) as served:
        async with _connect(served) as idle, _connect(served) as busy, _connect(served) as half:
            await _mutated(idle, "idle")
            served.gate.clear()
            await busy.send(_post(json.dumps(_review("busy")).encode()))
            await half.send(b"POST /mutate-pods HTTP/1.1\r\n")
            async with asyncio.timeout(10):
                while served.server.reviews < 2:  # noqa: ASYNC110 (a counter, not an event)
                    await asyncio.sleep(0.01)
            closing = asyncio.create_task(served.server.close())
            # Connections waiting for a request end at once, without an answer ...
            assert await idle.closed()
            assert await half.closed()
            assert not closing.done()
            # ... the review under way is answered, and its connection closed.
            served.gate.set()
            status, headers, body = await busy.answer()
            assert status == 200, body
            assert json.loads(body)["response"]["uid"] == "busy"
            assert headers["connection"] == "close"
            assert await busy.closed()
            async with asyncio.timeout(10):
                await closing
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", served.server.port)
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert pending == []


async def test_beyond_its_connection_bound_the_longest_waiting_connection_makes_room(
    certs: DevCerts,
) -> None:
    bounds = attrs.evolve(QUICK, request_seconds=30, idle_seconds=30, connections=3)
    async with _serve(certs, bounds) as served:
        async with _connect(served) as kept, _connect(served) as fresh, _connect(served) as mid:
            await _mutated(kept, "kept")  # now waiting for its next request, since longest
            await mid.send(b"POST /mutate-pods HTTP/1.1\r\nHo")  # a request being read
            await _mutated(fresh, "fresh")
            # A fourth connection: the one that has waited longest ends, without an answer;
            # the newcomer is served, and so is the request that was half sent.
            async with _connect(served) as newcomer:
                await _mutated(newcomer, "newcomer")
                assert await kept.closed()
                assert served.server.evicted == 1
                await mid.send(_post(_GOOD)[len(b"POST /mutate-pods HTTP/1.1\r\nHo") :])
                assert (await mid.answer())[0] == 200
                await _mutated(fresh, "fresh-again")
        assert served.server.refused == 0


async def test_when_every_connection_has_a_request_under_way_a_newcomer_gets_503(
    certs: DevCerts,
) -> None:
    bounds = attrs.evolve(QUICK, request_seconds=30, idle_seconds=30, connections=2)
    async with (
        _serve(certs, bounds) as served,
        _connect(served) as first,
        _connect(served) as second,
    ):
        served.gate.clear()  # both reviews wait in the handler
        await first.send(_post(json.dumps(_review("first")).encode()))
        await second.send(_post(json.dumps(_review("second")).encode()))
        async with asyncio.timeout(10):
            while served.server.reviews < 2:  # noqa: ASYNC110 (a counter, not an event)
                await asyncio.sleep(0.01)
        async with _connect(served) as newcomer:
            status, headers, body = await newcomer.answer()
            assert status == 503
            assert headers["retry-after"] == "1"
            assert headers["connection"] == "close"
            assert b"too many connections" in body
            assert await newcomer.closed()
        assert (served.server.refused, served.server.evicted) == (1, 0)
        # Nothing under way was touched; once answered, there is room again.
        served.gate.set()
        for conn, uid in ((first, "first"), (second, "second")):
            status, _, body = await conn.answer()
            assert status == 200
            assert json.loads(body)["response"]["uid"] == uid
        async with _connect(served) as later:
            await _mutated(later, "later")  # the longest-waiting one made room
        assert served.server.evicted == 1
