"""The DMP's only door to the Kubernetes API (the one module importing kubernetes_asyncio).

Everything above this module speaks plain dicts and dynvol's own errors (:class:`APIError`,
:class:`APINotFound`, :class:`APIConflict`, :class:`APIGone`), with the client's exception
chained, so the client library can be swapped or upgraded by touching this file only.

Neighbours: :mod:`dynvol_dmp.watching` (list+watch on top of :meth:`KubeApi.list_mounts`
and :meth:`KubeApi.watch_mounts`), :mod:`dynvol_dmp.agent` (status, finalizers, Events).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import attrs
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from dynvol_core import constants as c

_MERGE_PATCH = "application/merge-patch+json"


class APIError(Exception):
    """A request to the API server failed."""

    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class APINotFound(APIError):
    """404: the object is gone."""


class APIConflict(APIError):
    """409: the object changed since it was read (or already exists)."""


class APIGone(APIError):
    """410: the watch's resourceVersion is too old; list again."""


def _translate(exc: ApiException, what: str) -> APIError:
    status = int(exc.status or 0)
    reason = exc.reason or ""
    try:
        body = json.loads(exc.body) if exc.body else {}
        reason = body.get("message", reason)
    except (ValueError, TypeError, AttributeError):
        pass
    kind: type[APIError] = {404: APINotFound, 409: APIConflict, 410: APIGone}.get(status, APIError)
    return kind(f"{what}: {status} {reason}", status=status)


@attrs.define
class KubeApi:
    """The requests the DMP makes, over one shared ApiClient."""

    api_client: Any

    @classmethod
    async def connect(cls, kubeconfig: str | None) -> KubeApi:
        """From ``kubeconfig``, or from the in-cluster service account when None."""
        configuration = client.Configuration()
        if kubeconfig:
            await config.load_kube_config(
                config_file=kubeconfig, client_configuration=configuration
            )
        else:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return cls(api_client=client.ApiClient(configuration=configuration))

    async def close(self) -> None:
        await self.api_client.close()

    @property
    def _custom(self) -> Any:
        return client.CustomObjectsApi(self.api_client)

    async def list_mounts(self, label_selector: str) -> tuple[list[dict[str, Any]], str]:
        """Every DynamicVolumeMount matching ``label_selector`` and the list's version."""
        try:
            result = await self._custom.list_cluster_custom_object(
                c.GROUP, c.VERSION, c.PLURAL_MOUNT, label_selector=label_selector
            )
        except ApiException as exc:
            raise _translate(exc, "list DynamicVolumeMounts") from exc
        except aiohttp.ClientError as exc:
            raise APIError(f"list DynamicVolumeMounts: {exc}") from exc
        return list(result.get("items", [])), str(result["metadata"]["resourceVersion"])

    async def watch_mounts(
        self, label_selector: str, resource_version: str, *, timeout_seconds: int = 300
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Events (type, object) after ``resource_version``; ends when the server ends the
        watch. :raises APIGone: the version expired (list again)."""
        stream = watch.Watch()
        try:
            async with stream.stream(
                self._custom.list_cluster_custom_object,
                c.GROUP,
                c.VERSION,
                c.PLURAL_MOUNT,
                label_selector=label_selector,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_seconds,
            ) as events:
                async for event in events:
                    kind = event["type"]
                    obj = event["object"]
                    if kind == "ERROR":
                        code = int(obj.get("code", 0)) if isinstance(obj, dict) else 0
                        message = obj.get("message", "") if isinstance(obj, dict) else str(obj)
                        if code == 410:
                            raise APIGone(f"watch DynamicVolumeMounts: {message}", status=410)
                        raise APIError(f"watch DynamicVolumeMounts: {message}", status=code)
                    yield kind, obj
        except ApiException as exc:
            raise _translate(exc, "watch DynamicVolumeMounts") from exc
        except aiohttp.ClientError as exc:
            raise APIError(f"watch DynamicVolumeMounts: {exc}") from exc
        finally:
            stream.stop()

    async def patch_mount_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge ``status`` into the DynamicVolumeMount's status subresource."""
        try:
            result: dict[str, Any] = await self._custom.patch_namespaced_custom_object_status(
                c.GROUP, c.VERSION, namespace, c.PLURAL_MOUNT, name,
                {"status": dict(status)}, _content_type=_MERGE_PATCH,
            )  # fmt: skip
        except ApiException as exc:
            raise _translate(exc, f"update status of {namespace}/{name}") from exc
        return result

    async def set_mount_finalizers(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> dict[str, Any]:
        """Replace the finalizers, if the object is still at ``resource_version``.

        :raises APIConflict: it changed meanwhile (read it again and retry).
        """
        body = {"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}}
        try:
            result: dict[str, Any] = await self._custom.patch_namespaced_custom_object(
                c.GROUP, c.VERSION, namespace, c.PLURAL_MOUNT, name, body,
                _content_type=_MERGE_PATCH,
            )  # fmt: skip
        except ApiException as exc:
            raise _translate(exc, f"update finalizers of {namespace}/{name}") from exc
        return result

    async def get_class(self, name: str) -> dict[str, Any]:
        """The StorageProviderClass ``name``. :raises APINotFound:"""
        try:
            result: dict[str, Any] = await self._custom.get_cluster_custom_object(
                c.GROUP, c.VERSION, c.PLURAL_CLASS, name
            )
        except ApiException as exc:
            raise _translate(exc, f"get StorageProviderClass {name}") from exc
        return result

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        """The Pod ``namespace/name`` as a plain dict. :raises APINotFound:"""
        try:
            pod = await client.CoreV1Api(self.api_client).read_namespaced_pod(name, namespace)
        except ApiException as exc:
            raise _translate(exc, f"get Pod {namespace}/{name}") from exc
        except aiohttp.ClientError as exc:
            raise APIError(f"get Pod {namespace}/{name}: {exc}") from exc
        result: dict[str, Any] = self.api_client.sanitize_for_serialization(pod)
        result.setdefault("apiVersion", "v1")
        result.setdefault("kind", "Pod")
        return result

    async def get_claim(self, namespace: str, name: str) -> dict[str, Any]:
        """The DynamicVolumeClaim ``namespace/name``. :raises APINotFound:"""
        try:
            result: dict[str, Any] = await self._custom.get_namespaced_custom_object(
                c.GROUP, c.VERSION, namespace, c.PLURAL_CLAIM, name
            )
        except ApiException as exc:
            raise _translate(exc, f"get DynamicVolumeClaim {namespace}/{name}") from exc
        except aiohttp.ClientError as exc:
            raise APIError(f"get DynamicVolumeClaim {namespace}/{name}: {exc}") from exc
        return result

    async def record_event(
        self,
        *,
        involved: Mapping[str, Any],
        reason: str,
        message: str,
        type_: str = "Normal",
        component: str,
    ) -> None:
        """Create a core/v1 Event about ``involved`` (a full object dict)."""
        meta = involved.get("metadata", {})
        namespace = meta.get("namespace", "default")
        now = dt.datetime.now(dt.UTC)
        body: Any = {
            "metadata": {"generateName": f"{meta.get('name', 'dvm')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion", c.API_VERSION),
                "kind": involved.get("kind", c.KIND_MOUNT),
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": component},
            "firstTimestamp": now.isoformat().replace("+00:00", "Z"),
            "lastTimestamp": now.isoformat().replace("+00:00", "Z"),
            "count": 1,
        }
        try:
            await client.CoreV1Api(self.api_client).create_namespaced_event(namespace, body)
        except ApiException as exc:
            raise _translate(exc, f"record Event {reason}") from exc
