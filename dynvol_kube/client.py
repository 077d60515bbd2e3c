"""The one module that imports the Kubernetes client library (kubernetes_asyncio).

Every service talks to the apiserver through :class:`Client`,
which speaks plain JSON dictionaries (no generated model classes: they cost memory and CPU
and hide fields the apiserver added) and raises the project errors of :mod:`.errors`, with
the library's own exception chained. Neighbours: :mod:`dynvol_kube.watching` lists
and watches through it; reconcilers act through it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio.client.api_client import ApiClient
from kubernetes_asyncio.client.configuration import Configuration
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import load_incluster_config
from kubernetes_asyncio.config.kube_config import KUBE_CONFIG_DEFAULT_LOCATION, load_kube_config

from .errors import APIError, APIGone, error_for_status
from .metrics import Metrics
from .resources import Resource

__all__ = ["Client", "Patch"]

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT = 30.0
_JSON = "application/json"

Patch = str
"""A patch content type, such as :attr:`Client.MERGE_PATCH`."""


class Client:
    """A small asynchronous client for the kube-apiserver, on top of kubernetes_asyncio.

    Build it with :meth:`from_kubeconfig` (or wrap an existing ``ApiClient``); close it with
    :meth:`close` or ``async with``. ``metrics``, the process's :class:`~.metrics.Metrics`,
    counts every request; the runtime's other parts find it here.
    """

    MERGE_PATCH: Patch = "application/merge-patch+json"

    def __init__(
        self,
        api: Any,
        *,
        owned: bool = True,
        user_agent: str = "dynvol",
        metrics: Metrics | None = None,
    ) -> None:
        self._api = api
        self._owned = owned
        if owned:
            self._api.user_agent = user_agent
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
        """
        config = Configuration()
        config.connection_pool_maxsize = max_connections
        if path is None:
            path = os.environ.get("KUBECONFIG") or None
        if path is None and not _default_kubeconfig_exists():
            load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
        else:
            await load_kube_config(
                config_file=os.fspath(path) if path is not None else None,
                context=context,
                client_configuration=config,
                persist_config=False,
            )
        return cls(ApiClient(configuration=config), user_agent=user_agent, metrics=metrics)

    @classmethod
    def wrap(cls, api: Any, *, metrics: Metrics | None = None) -> Client:
        """A client over an existing ``kubernetes_asyncio`` ``ApiClient`` (not closed by us)."""
        return cls(api, owned=False, metrics=metrics)

    @property
    def host(self) -> str:
        """The apiserver URL."""
        host: str = self._api.configuration.host
        return host

    async def close(self) -> None:
        """Close the connection pool (when this client created it)."""
        if self._owned:
            await self._api.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- raw requests --------------------------------------------------------------------

    async def _headers(self, content_type: str, query: list[tuple[str, str]]) -> dict[str, str]:
        headers = dict(self._api.default_headers)
        headers["Content-Type"] = content_type
        headers["Accept"] = _JSON
        await self._api.update_params_for_auth(headers, query, ["BearerToken"])
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
        """Send one request; returns the decoded JSON body (or text when it is not JSON)."""
        query = _query(params)
        headers = await self._headers(content_type, query)
        self.requests_sent += 1
        started = time.monotonic()
        try:
            response = await self._api.rest_client.request(
                method,
                self.host + path,
                query_params=query,
                headers=headers,
                body=body,
                _preload_content=True,
                _request_timeout=request_timeout,
            )
        except ApiException as exc:
            self._observe(method, path, exc.status, started)
            raise _api_error(method, path, exc.status, exc.reason, exc.body) from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self._observe(method, path, None, started)
            raise APIError(f"{method} {path}: {str(exc) or type(exc).__name__}") from exc
        self._observe(method, path, response.status, started)
        data: bytes = response.data
        if not data:
            return None
        text = data.decode("utf-8")
        ctype = response.getheader("Content-Type", "")
        if "json" in ctype:
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
        timeout = aiohttp.ClientTimeout(
            total=None, connect=_REQUEST_TIMEOUT, sock_read=timeout_seconds + 30
        )
        self.requests_sent += 1
        started = time.monotonic()
        try:
            response = await self._api.rest_client.request(
                "GET",
                self.host + path,
                query_params=query,
                headers=headers,
                _preload_content=False,
                _request_timeout=timeout,
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self._observe("WATCH", path, None, started)
            raise APIError(f"watch {path}: {str(exc) or type(exc).__name__}") from exc
        self._observe("WATCH", path, response.status, started)
        try:
            if response.status != 200:
                body = await response.read()
                original = ApiException(status=response.status, reason=response.reason)
                original.body = body
                raise _api_error("WATCH", path, response.status, response.reason, body) from (
                    original
                )
            while True:
                try:
                    line = await response.content.readline()
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
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
            response.release()
            response.close()


def _default_kubeconfig_exists() -> bool:
    return os.path.exists(os.path.expanduser(KUBE_CONFIG_DEFAULT_LOCATION))


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
