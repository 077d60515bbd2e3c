"""Recording core/v1 Events about objects, deduplicated and aggregated.

Part of the act stage: reconcilers call :meth:`EventRecorder.record` (never awaited, never
failing the reconcile); a background task writes the Events. A repeat of the same
(object, type, reason, message) within the aggregation window bumps ``count`` and
``lastTimestamp`` of the existing Event instead of creating another, as kubelet and
client-go's recorder do. Reasons are stable CamelCase words shared with conditions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import logging
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any

import attrs

from .client import Client
from .errors import APIError, APINotFound
from .lifecycle import stop_task
from .resources import EVENTS

__all__ = ["NORMAL", "WARNING", "EventRecorder"]

log = logging.getLogger(__name__)

NORMAL = "Normal"
WARNING = "Warning"

_REASON = re.compile(r"^[A-Z][A-Za-z0-9]*$")
_MAX_MESSAGE = 1024


def now_rfc3339() -> str:
    """The current time as Kubernetes serialises ``metav1.Time``."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def object_reference(obj: Mapping[str, Any]) -> dict[str, str]:
    """The ``involvedObject`` reference of an object."""
    meta = obj.get("metadata", {})
    ref = {
        "apiVersion": obj.get("apiVersion", ""),
        "kind": obj.get("kind", ""),
        "name": meta.get("name", ""),
        "uid": meta.get("uid", ""),
    }
    if meta.get("namespace"):
        ref["namespace"] = meta["namespace"]
    if meta.get("resourceVersion"):
        ref["resourceVersion"] = meta["resourceVersion"]
    return ref


@attrs.define
class _Seen:
    namespace: str
    name: str
    count: int
    stamp: float


@attrs.define(eq=False)
class EventRecorder:
    """Write Events for ``component`` (e.g. ``dynvol-controller``) from ``host``.

    Events about cluster-scoped objects go to ``default_namespace``, as client-go does.
    """

    client: Client
    component: str
    host: str = ""
    default_namespace: str = "default"
    window: float = 600.0
    cache_size: int = 4096
    queue_size: int = 1000
    _queue: asyncio.Queue[tuple[dict[str, str], str, str, str]] = attrs.field(init=False)
    _seen: collections.OrderedDict[tuple[str, str, str, str], _Seen] = attrs.field(
        init=False, factory=collections.OrderedDict
    )
    _task: asyncio.Task[None] | None = attrs.field(default=None, init=False)
    written: int = attrs.field(default=0, init=False)
    dropped: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self._queue = asyncio.Queue(self.queue_size)

    async def start(self) -> None:
        """Start the writer task."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"events {self.component}")

    async def close(self) -> None:
        """Write what is queued (briefly), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout=2)
        await stop_task(self._task)
        self._task = None

    async def flush(self) -> None:
        """Wait until every queued Event has been written (for tests and shutdown)."""
        await self._queue.join()

    def record(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """Queue an Event about ``obj``; drops it (and counts) when the queue is full."""
        if type_ not in (NORMAL, WARNING):
            raise ValueError(f"event type must be Normal or Warning, not {type_!r}")
        if not _REASON.match(reason):
            raise ValueError(f"event reason must be CamelCase, not {reason!r}")
        ref = object_reference(obj)
        if not ref["uid"]:
            return
        try:
            self._queue.put_nowait((ref, type_, reason, message[:_MAX_MESSAGE]))
        except asyncio.QueueFull:
            self.dropped += 1

    async def _run(self) -> None:
        while True:
            ref, type_, reason, message = await self._queue.get()
            try:
                await self._write(ref, type_, reason, message)
            except asyncio.CancelledError:
                raise
            except APIError as exc:
                # Events are best effort: never fail or retry a reconcile for them.
                log.debug(
                    "event %s on %s/%s not written: %s",
                    reason,
                    ref.get("namespace"),
                    ref["name"],
                    exc,
                )
            finally:
                self._queue.task_done()

    def _written(self, type_: str, reason: str) -> None:
        self.written += 1
        if self.client.metrics is not None:
            self.client.metrics.events.labels(type_, reason).inc()

    async def _write(self, ref: dict[str, str], type_: str, reason: str, message: str) -> None:
        key = (ref["uid"], type_, reason, message)
        stamp = now_rfc3339()
        seen = self._seen.get(key)
        if seen is not None and time.monotonic() - seen.stamp < self.window:
            seen.count += 1
            seen.stamp = time.monotonic()
            self._seen.move_to_end(key)
            try:
                await self.client.patch(
                    EVENTS,
                    seen.name,
                    {"count": seen.count, "lastTimestamp": stamp},
                    namespace=seen.namespace,
                )
                self._written(type_, reason)
                return
            except APINotFound:
                pass  # expired or deleted: write a new one
        namespace = ref.get("namespace") or self.default_namespace
        name = f"{ref['name']}.{secrets.token_hex(8)}"
        # resourceVersion in the reference would make the aggregate point at one revision.
        involved = {k: v for k, v in ref.items() if k != "resourceVersion"}
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": type_,
            "count": 1,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "source": {"component": self.component, **({"host": self.host} if self.host else {})},
            "reportingComponent": self.component,
            "reportingInstance": self.host or self.component,
        }
        await self.client.create(EVENTS, body, namespace=namespace)
        self._written(type_, reason)
        self._seen[key] = _Seen(namespace, name, 1, time.monotonic())
        self._seen.move_to_end(key)
        while len(self._seen) > self.cache_size:
            self._seen.popitem(last=False)
