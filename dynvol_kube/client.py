"""The one module that imports the Kubernetes client library (kubernetes_asyncio).

Every service talks to the apiserver through :class:`Client`,
which speaks plain JSON dictionaries (no generated model classes: they cost memory and CPU
and hide fields the apiserver added) and raises the project errors of :mod:`.errors`, with
the HTTP library's own exception chained. Neighbours: :mod:`dynvol_kube.watching` lists
and watches through it; reconcilers act through it.

Two transports carry the requests. The usual one is a connection pool of the client's own
(:mod:`.http`, HTTP/1.1 on asyncio streams), to an :class:`~.kubeconfig.Endpoint` read from
the pod's service account or a kubeconfig with static credentials: neither kubernetes_asyncio
nor aiohttp is imported, which saves every process about 50 MiB and 0.7 s of CPU at start
(the library's package imports all of its generated modules, about 40 MiB; aiohttp some 150
modules of its own, about 11 MiB). A kubeconfig that needs a credential plugin, and an
existing kubernetes_asyncio ``ApiClient`` (:meth:`Client.wrap`), go through the library
(and its aiohttp) instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import attrs

from . import http
from .errors import APIError, APIGone, error_for_status
from .kubeconfig import Endpoint, KubeconfigError, from_kubeconfig_file, in_cluster
from .metrics import Metrics
from .resources import Resource

__all__ = ["Client", "KubeconfigError", "Patch"]

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT = 30.0
#: A 429 (the apiserver's in-flight limit or priority-and-fairness rejected the request:
#: it was not acted on) is retried for any verb, after its Retry-After; these statuses
#: only for reads (a write that timed out may have landed: its caller re-plans instead).
_RETRY_ANY = frozenset({429})
_RETRY_READS = frozenset({500, 502, 503, 504})
#: Retries per request, and the backoff between them (full jitter, capped).
_RETRIES = 3
_RETRY_BASE = 0.5
_RETRY_CAP = 10.0
_JSON = "application/json"
_DEFAULT_KUBECONFIG = "~/.kube/config"

Patch = str
"""A patch content type, such as :attr:`Client.MERGE_PATCH`."""


@attrs.frozen
class _Reply:
    """A whole answer; ``cause`` is the HTTP library's error for a status that is not 2xx."""

    status: int
    reason: str
    content_type: str
    data: bytes
    cause: BaseException | None = None


class _Stream(Protocol):
    """An answer whose body is read line by line (a watch)."""

    status: int
    reason: str

    def error(self) -> BaseException | None: ...

    async def read(self) -> bytes: ...

    async def readline(self) -> bytes: ...

    def close(self) -> None: ...


class _Transport(Protocol):
    """How requests reach the apiserver (a connection pool of our own, or the library's).

    Failures to reach the server are :class:`~.http.HTTPError`, :class:`OSError` or
    :class:`TimeoutError`, whatever the transport.
    """

    @property
    def host(self) -> str: ...

    async def headers(self, query: list[tuple[str, str]]) -> dict[str, str]: ...

    async def send(
        self, method: str, url: str, *, query: list[tuple[str, str]], headers: dict[str, str],
        body: Any, request_timeout: float,
    ) -> _Reply: ...  # fmt: skip

    async def stream(
        self, url: str, *, query: list[tuple[str, str]], headers: dict[str, str],
        connect_timeout: float, read_timeout: float,
    ) -> _Stream: ...  # fmt: skip

    async def close(self) -> None: ...


class _Session:
    """Requests over a connection pool of the client's own (:mod:`.http`), to an
    :class:`Endpoint`."""

    def __init__(self, endpoint: Endpoint, *, user_agent: str, max_connections: int) -> None:
        self.endpoint = endpoint
        self._user_agent = user_agent
        # Watches keep one connection each for their whole life, so the pool is sized by
        # the caller.
        self._pool = http.Pool(
            endpoint.server, ssl_context=endpoint.ssl_context,
            server_hostname=endpoint.server_hostname, max_connections=max_connections,
        )  # fmt: skip

    @property
    def host(self) -> str:
        return self.endpoint.server

    async def headers(self, query: list[tuple[str, str]]) -> dict[str, str]:
        return {"User-Agent": self._user_agent, **self.endpoint.auth_headers()}

    def _target(self, url: str, query: list[tuple[str, str]]) -> str:
        # The client sends ``host + path``; the pool knows the host (and any path prefix).
        return self._pool.target(url.removeprefix(self.endpoint.server), query)

    async def send(
        self, method: str, url: str, *, query: list[tuple[str, str]], headers: dict[str, str],
        body: Any, request_timeout: float,
    ) -> _Reply:  # fmt: skip
        data = None if body is None else json.dumps(body).encode()
        answer = await self._pool.request(
            method, self._target(url, query), headers=headers, body=data, within=request_timeout
        )
        return _Reply(
            answer.status, answer.reason, answer.headers.get("content-type", ""), answer.body,
            answer.error(),
        )  # fmt: skip

    async def stream(
        self, url: str, *, query: list[tuple[str, str]], headers: dict[str, str],
        connect_timeout: float, read_timeout: float,
    ) -> _Stream:  # fmt: skip
        async with asyncio.timeout(connect_timeout):
            return await self._pool.open(
                "GET", self._target(url, query), headers=headers, read_timeout=read_timeout
            )

    async def close(self) -> None:
        await self._pool.close()


class _Library:
    """Requests through a kubernetes_asyncio ``ApiClient`` (its REST client and auth)."""

    def __init__(self, api: Any, *, owned: bool) -> None:
        self._api = api
        self._owned = owned

    @property
    def host(self) -> str:
        host: str = self._api.configuration.host
        return host

    async def headers(self, query: list[tuple[str, str]]) -> dict[str, str]:
        headers = dict(self._api.default_headers)
        await self._api.update_params_for_auth(headers, query, ["BearerToken"])
        return headers

    async def send(
        self, method: str, url: str, *, query: list[tuple[str, str]], headers: dict[str, str],
        body: Any, request_timeout: float,
    ) -> _Reply:  # fmt: skip
        import aiohttp
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            response = await self._api.rest_client.request(
                method, url, query_params=query, headers=headers, body=body,
                _preload_content=True, _request_timeout=request_timeout,
            )  # fmt: skip
        except ApiException as exc:
            body_bytes = exc.body if isinstance(exc.body, bytes) else (exc.body or "").encode()
            return _Reply(exc.status or 0, exc.reason or "", "", body_bytes, exc)
        except aiohttp.ClientError as exc:
            raise http.HTTPError(str(exc) or type(exc).__name__) from exc
        ctype = response.getheader("Content-Type", "") or ""
        return _Reply(response.status, response.reason or "", ctype, response.data or b"")

    async def stream(
        self, url: str, *, query: list[tuple[str, str]], headers: dict[str, str],
        connect_timeout: float, read_timeout: float,
    ) -> _Stream:  # fmt: skip
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
        try:
            response = await self._api.rest_client.request(
                "GET", url, query_params=query, headers=headers, _preload_content=False,
                _request_timeout=timeout,
            )  # fmt: skip
        except aiohttp.ClientError as exc:
            raise http.HTTPError(str(exc) or type(exc).__name__) from exc
        return _LibraryStream(response)

    async def close(self) -> None:
        if self._owned:
            await self._api.close()


class _LibraryStream:
    """The library's aiohttp response as a :class:`_Stream` (its errors as HTTPError)."""

    def __init__(self, response: Any) -> None:
        self._response = response
        self.status: int = response.status
        self.reason: str = response.reason or ""

    def error(self) -> BaseException | None:
        import aiohttp

        if 200 <= self.status <= 299:
            return None
        response = self._response
        return aiohttp.ClientResponseError(
            response.request_info, response.history, status=response.status,
            message=response.reason or "", headers=response.headers,
        )  # fmt: skip

    async def read(self) -> bytes:
        return await self._guarded(self._response.read())

    async def readline(self) -> bytes:
        return await self._guarded(self._response.content.readline())

    @staticmethod
    async def _guarded(pending: Any) -> bytes:
        import aiohttp

        try:
            data: bytes = await pending
        except aiohttp.ClientError as exc:
            raise http.HTTPError(str(exc) or type(exc).__name__) from exc
        return data

    def close(self) -> None:
        self._response.release()
        self._response.close()


class Client:
    """A small asynchronous client for the kube-apiserver.

    Build it with :meth:`from_kubeconfig` (or wrap an existing kubernetes_asyncio
    ``ApiClient`` with :meth:`wrap`); close it with :meth:`close` or ``async with``.
    ``metrics``, the process's :class:`~.metrics.Metrics`, counts every request; the
    runtime's other parts find it here.
    """

    MERGE_PATCH: Patch = "application/merge-patch+json"

    def __init__(self, transport: _Transport, *, metrics: Metrics | None = None) -> None:
        self._transport = transport
        self.requests_sent = 0
        self.metrics = metrics

    @classmethod
    async def from_kubeconfig(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        context: str | None = None,
        user_agent: str = "dynvol",
        max_connections: int = 100,
        metrics: Metrics | None = None,
    ) -> Client:
        """A client from a kubeconfig file, the default one, or the in-cluster service account.

        Without ``path``, ``$KUBECONFIG`` and then ``~/.kube/config`` are tried, and the
        in-cluster configuration is used when neither exists. Every watch holds one of the
        ``max_connections`` connections (HTTP/1.1), so size it above the number of informers.
        Raises :class:`~.kubeconfig.KubeconfigError` when the configuration cannot be used.
        """
        where = await asyncio.to_thread(_resolve, path, context)
        if isinstance(where, str):
            log.debug("%s needs kubernetes_asyncio's kubeconfig loader", where)
            library = await _library_from_kubeconfig(where, context, user_agent, max_connections)
            return cls(library, metrics=metrics)
        return await cls.from_endpoint(
            where, user_agent=user_agent, max_connections=max_connections, metrics=metrics
        )

    @classmethod
    async def from_endpoint(
        cls,
        endpoint: Endpoint,
        *,
        user_agent: str = "dynvol",
        max_connections: int = 100,
        metrics: Metrics | None = None,
    ) -> Client:
        """A client for an :class:`~.kubeconfig.Endpoint` (for example
        :func:`~.kubeconfig.in_cluster` of another service account directory)."""
        session = _Session(endpoint, user_agent=user_agent, max_connections=max_connections)
        return cls(session, metrics=metrics)

    @classmethod
    def wrap(cls, api: Any, *, metrics: Metrics | None = None) -> Client:
        """A client over an existing ``kubernetes_asyncio`` ``ApiClient`` (not closed by us)."""
        return cls(_Library(api, owned=False), metrics=metrics)

    @property
    def host(self) -> str:
        """The apiserver URL."""
        return self._transport.host

    async def close(self) -> None:
        """Close the connection pool (when this client created it)."""
        await self._transport.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- raw requests --------------------------------------------------------------------

    async def _headers(self, content_type: str, query: list[tuple[str, str]]) -> dict[str, str]:
        headers = await self._transport.headers(query)
        headers["Content-Type"] = content_type
        headers["Accept"] = _JSON
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = _JSON,
        request_timeout: float = _REQUEST_TIMEOUT,
    ) -> Any:
        """Send one request; returns the decoded JSON body (or text when it is not JSON).

        A 429 is retried (any verb: the apiserver did not act on it) after its
        ``Retry-After``, and a read's 5xx after a jittered exponential backoff, up to
        ``_RETRIES`` times; then the error is raised, with ``retry_after`` set.
        """
        query = _query(params)
        for attempt in range(_RETRIES + 1):
            try:
                return await self._request_once(
                    method, path, query, body, content_type, request_timeout
                )
            except APIError as exc:
                delay = _retry_delay(method, exc, attempt)
                if delay is None:
                    raise
                log.debug("%s %s: %s; retrying in %.2fs", method, path, exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _request_once(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]],
        body: Any,
        content_type: str,
        request_timeout: float,
    ) -> Any:
        headers = await self._headers(content_type, query)
        self.requests_sent += 1
        started = time.monotonic()
        try:
            reply = await self._transport.send(
                method, self.host + path, query=query, headers=headers, body=body,
                request_timeout=request_timeout,
            )  # fmt: skip
        except (TimeoutError, http.HTTPError, OSError) as exc:
            self._observe(method, path, None, started)
            raise APIError(f"{method} {path}: {str(exc) or type(exc).__name__}") from exc
        self._observe(method, path, reply.status, started)
        if not 200 <= reply.status <= 299:
            error = _api_error(method, path, reply.status, reply.reason, reply.data)
            error.retry_after = _retry_after_of(reply.cause)
            raise error from reply.cause
        if not reply.data:
            return None
        text = reply.data.decode("utf-8")
        if "json" in reply.content_type:
            return json.loads(text)
        return text

    def _observe(self, method: str, path: str, code: int | None, started: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_request(method, path, code, time.monotonic() - started)

    # -- typed helpers ---------------------------------------------------------------------

    async def get(self, resource: Resource, name: str, *, namespace: str | None = None) -> Any:
        """One object (raises :class:`~.errors.APINotFound`)."""
        return await self.request("GET", resource.path(namespace=namespace, name=name))

    async def list(
        self,
        resource: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
        resource_version: str | None = None,
    ) -> Any:
        """One page of a list (``metadata.continue`` says whether there is more)."""
        params: dict[str, Any] = {
            "labelSelector": label_selector,
            "fieldSelector": field_selector,
            "limit": limit,
            "continue": continue_token,
            "resourceVersion": resource_version,
        }
        return await self.request("GET", resource.path(namespace=namespace), params=params)

    async def create(
        self,
        resource: Resource,
        body: Mapping[str, Any],
        *,
        namespace: str | None = None,
        field_manager: str | None = None,
    ) -> Any:
        """Create an object; raises :class:`~.errors.APIConflict` if the name is taken."""
        ns = namespace or body.get("metadata", {}).get("namespace")
        return await self.request(
            "POST",
            resource.path(namespace=ns),
            body=dict(body),
            params={"fieldManager": field_manager},
        )

    async def replace(
        self,
        resource: Resource,
        body: Mapping[str, Any],
        *,
        subresource: str | None = None,
        field_manager: str | None = None,
    ) -> Any:
        """PUT an object (``metadata.resourceVersion`` makes it conditional)."""
        meta = body["metadata"]
        path = resource.path(
            namespace=meta.get("namespace"), name=meta["name"], subresource=subresource
        )
        return await self.request(
            "PUT", path, body=dict(body), params={"fieldManager": field_manager}
        )

    async def patch(
        self,
        resource: Resource,
        name: str,
        patch: Any,
        *,
        namespace: str | None = None,
        subresource: str | None = None,
        content_type: Patch = MERGE_PATCH,
        field_manager: str | None = None,
        force: bool | None = None,
    ) -> Any:
        """Patch an object; merge patch unless told otherwise."""
        path = resource.path(namespace=namespace, name=name, subresource=subresource)
        params = {"fieldManager": field_manager, "force": force}
        return await self.request(
            "PATCH", path, body=patch, content_type=content_type, params=params
        )

    async def delete(
        self,
        resource: Resource,
        name: str,
        *,
        namespace: str | None = None,
        uid: str | None = None,
        resource_version: str | None = None,
        propagation: str | None = "Background",
        grace_seconds: int | None = None,
    ) -> Any:
        """Delete an object, optionally only if it still has ``uid``/``resource_version``."""
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
        preconditions = {}
        if uid:
            preconditions["uid"] = uid
        if resource_version:
            preconditions["resourceVersion"] = resource_version
        if preconditions:
            body["preconditions"] = preconditions
        if propagation:
            body["propagationPolicy"] = propagation
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        return await self.request(
            "DELETE", resource.path(namespace=namespace, name=name), body=body
        )

    async def watch(
        self,
        resource: Resource,
        *,
        resource_version: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: int = 300,
        bookmarks: bool = True,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Yield ``(type, object)`` watch events until the server ends the watch.

        ``type`` is ADDED, MODIFIED, DELETED or BOOKMARK. An expired ``resource_version``
        raises :class:`~.errors.APIGone`; the caller relists.
        """
        params: dict[str, Any] = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true" if bookmarks else None,
            "labelSelector": label_selector,
            "fieldSelector": field_selector,
            "timeoutSeconds": timeout_seconds,
        }
        path = resource.path(namespace=namespace)
        query = _query(params)
        headers = await self._headers(_JSON, query)
        self.requests_sent += 1
        started = time.monotonic()
        try:
            response = await self._transport.stream(
                self.host + path, query=query, headers=headers,
                connect_timeout=_REQUEST_TIMEOUT, read_timeout=timeout_seconds + 30,
            )  # fmt: skip
        except (TimeoutError, http.HTTPError, OSError) as exc:
            self._observe("WATCH", path, None, started)
            raise APIError(f"watch {path}: {str(exc) or type(exc).__name__}") from exc
        self._observe("WATCH", path, response.status, started)
        try:
            if response.status != 200:
                try:
                    body = await response.read()
                except (TimeoutError, http.HTTPError, OSError):
                    body = b""
                raise _api_error("WATCH", path, response.status, response.reason, body) from (
                    response.error()
                )
            while True:
                try:
                    line = await response.readline()
                except (TimeoutError, http.HTTPError, OSError) as exc:
                    raise APIError(f"watch {path}: {str(exc) or type(exc).__name__}") from exc
                if not line:
                    return
                if not line.strip():
                    continue
                event = json.loads(line)
                kind = event.get("type", "")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    code = obj.get("code")
                    message = obj.get("message", "watch error")
                    if code == 410:
                        raise APIGone(
                            f"watch {path}: {message}",
                            status=410,
                            reason=obj.get("reason", "Expired"),
                            details=obj,
                        )
                    raise error_for_status(
                        code,
                        f"watch {path}: {message}",
                        reason=obj.get("reason", ""),
                        details=obj,
                    )
                yield kind, obj
        finally:
            # Our own stream gives its connection back to the pool when the server ended
            # the watch cleanly (the next watch takes it instead of a new TCP and TLS
            # handshake, which, for the hundreds of watchers an overloaded apiserver drops
            # at once, cost it more CPU than the watches); one left midway is dropped.
            response.close()


def _retry_delay(method: str, error: APIError, attempt: int) -> float | None:
    """Seconds to wait before retrying a request that failed with ``error``, or None."""
    if attempt >= _RETRIES or error.status is None:
        return None
    if error.status not in _RETRY_ANY and not (method == "GET" and error.status in _RETRY_READS):
        return None
    if error.retry_after is not None:
        # The server's word, spread a little so that its rejected clients do not all
        # come back in the same instant.
        return min(_RETRY_CAP, error.retry_after) + random.uniform(0, _RETRY_BASE)
    # Full jitter: retries of many clients spread over the whole backoff.
    return random.uniform(0, min(_RETRY_CAP, _RETRY_BASE * 2**attempt))


def _retry_after_of(cause: BaseException | None) -> float | None:
    """The seconds of a ``Retry-After`` header on the HTTP library's error, if any."""
    headers = getattr(cause, "headers", None)
    if not headers:
        return None
    try:
        # Our transport's names are in lower case, the library's as sent.
        value = headers.get("retry-after") or headers.get("Retry-After")
    except AttributeError:
        return None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: not sent by the apiserver


def _resolve(path: str | os.PathLike[str] | None, context: str | None) -> Endpoint | str:
    """The endpoint to use, or the kubeconfig file to hand to the library's loader."""
    if path is None:
        path = os.environ.get("KUBECONFIG") or None
    default = os.path.expanduser(_DEFAULT_KUBECONFIG)
    if path is None and not os.path.exists(default):
        return in_cluster()
    file = os.fspath(path) if path is not None else default
    if os.pathsep in file:
        return file  # several files in $KUBECONFIG: the library's loader merges them
    return from_kubeconfig_file(file, context=context) or file


async def _library_from_kubeconfig(
    file: str, context: str | None, user_agent: str, max_connections: int
) -> _Library:
    """kubernetes_asyncio's loader, for what :mod:`.kubeconfig` does not read (credential
    plugins, auth providers, several merged files); imported only then."""
    try:
        from kubernetes_asyncio.client.api_client import ApiClient
        from kubernetes_asyncio.client.configuration import Configuration
        from kubernetes_asyncio.config.kube_config import load_kube_config
    except ModuleNotFoundError as exc:
        raise KubeconfigError(
            f"{file} needs a credential plugin (exec or auth-provider), several merged "
            "files or another setting that only kubernetes_asyncio's loader reads; install "
            "it with: pip install 'dynvol[kubeconfig-plugins]'"
        ) from exc

    config = Configuration()
    config.connection_pool_maxsize = max_connections
    await load_kube_config(
        config_file=file, context=context, client_configuration=config, persist_config=False
    )
    api = ApiClient(configuration=config)
    api.user_agent = user_agent
    return _Library(api, owned=True)


def _query(params: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    query: list[tuple[str, str]] = []
    for key, value in (params or {}).items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        query.append((key, str(value)))
    return query


def _api_error(
    method: str, path: str, status: int | None, reason: str | None, body: Any
) -> APIError:
    details: dict[str, Any] = {}
    message = reason or "error"
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else (body or "")
    try:
        decoded = json.loads(text) if text else {}
    except ValueError:
        decoded = {}
    if isinstance(decoded, dict) and decoded.get("kind") == "Status":
        details = decoded
        message = decoded.get("message") or message
        reason = decoded.get("reason") or reason
    elif text:
        message = text[:500]
    return error_for_status(
        status, f"{method} {path}: {message}", reason=reason or "", details=details
    )
