"""Informers: observe one resource with list + watch and keep a :class:`~.caching.Store`.

Stage one of the pipeline (observe -> queue -> process -> act). An informer lists the
resource (in pages), then watches from the list's resourceVersion with bookmarks, so a
watch that the server ends is resumed where it stopped; when the resourceVersion has
expired (410 Gone) it lists again and reports the difference as events. A periodic resync
(off unless asked for) replays the cache to the handlers only as a safety net. An informer
made with ``watch=False`` lists only: again every ``relist`` seconds, or sooner when
:meth:`Informer.refresh` asks, for a selection that a watch would make too costly for the
apiserver (one filtered by labels on a custom resource, which its watch cache cannot
index: every change of the resource cluster-wide is handed to every such watcher). Handlers are
synchronous and must be quick: they map the event to keys and add them to a
:class:`~.queueing.WorkQueue` (next stage); they never act.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .caching import IndexFunc, Obj, Store, object_key
from .client import Client
from .errors import APIError, APIGone
from .lifecycle import stop_task
from .resources import Resource

__all__ = ["ChangePredicate", "Event", "Informer", "slim"]

log = logging.getLogger(__name__)

ADDED = "ADDED"
MODIFIED = "MODIFIED"
DELETED = "DELETED"
RESYNC = "RESYNC"

Transform = Callable[[Obj], Obj]


@attrs.frozen
class Event:
    """A change seen by an informer; ``old`` is the cached object it replaced, if any."""

    type: str
    obj: Obj
    old: Obj | None = None


Handler = Callable[[Event], None]


class ChangePredicate:
    """An event filter: pass an event only when ``part`` of its object changed.

    ``part`` picks what a reconciler acts on (say the spec, the labels and the deletion
    timestamp, not the status it writes itself). The part is compared with the one last
    seen *for that key from the informer*, not with the cached object, which a write may
    have replaced already (:meth:`Store.put_if_newer`). Deletions and resyncs always pass.
    """

    def __init__(self, part: Callable[[Obj], object]) -> None:
        self._part = part
        self._seen: dict[str, object] = {}

    def __call__(self, event: Event) -> bool:
        key = object_key(event.obj)
        if event.type == DELETED:
            self._seen.pop(key, None)
            return True
        now = self._part(event.obj)
        if event.type == RESYNC:
            self._seen[key] = now
            return True
        if key in self._seen and self._seen[key] == now:
            return False
        self._seen[key] = now
        return True


def slim(obj: Obj) -> Obj:
    """The default transform: drop ``managedFields`` (large, and never needed here)."""
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
    return obj


@attrs.define(eq=False)
class Informer:
    """List + watch one resource (optionally by namespace/selectors) into a store.

    ``transform`` slims each object before it is cached (client-go's SetTransform);
    ``indexers`` add secondary indexes; ``resync`` (seconds) replays the cache to the
    handlers periodically; ``None`` disables it. ``watch=False`` lists every ``relist``
    seconds instead of watching (the changes between two lists are reported as events);
    its owner keeps the store current with its own writes (:meth:`remember`,
    :meth:`forget`), which a list that has not caught up with them does not undo.
    """

    client: Client
    resource: Resource
    namespace: str | None = attrs.field(default=None, kw_only=True)
    label_selector: str | None = attrs.field(default=None, kw_only=True)
    field_selector: str | None = attrs.field(default=None, kw_only=True)
    transform: Transform = attrs.field(default=slim, kw_only=True)
    indexers: Mapping[str, IndexFunc] = attrs.field(factory=dict, kw_only=True)
    resync: float | None = attrs.field(default=None, kw_only=True)
    page_size: int = attrs.field(default=500, kw_only=True)
    watch_timeout: int = attrs.field(default=300, kw_only=True)
    #: List from the apiserver's watch cache (resourceVersion=0) rather than from etcd.
    from_cache: bool = attrs.field(default=True, kw_only=True)
    #: Whether the process is not ready until this informer synced (with the client's
    #: metrics); the :class:`~.managing.Manager` sets it for the informers it starts. Off
    #: for informers made on demand, which must not hold a whole process back.
    gates_readiness: bool = attrs.field(default=False, kw_only=True)
    #: False: list only, every ``relist`` seconds (jittered) or when :meth:`refresh` asks.
    watch: bool = attrs.field(default=True, kw_only=True)
    relist: float = attrs.field(default=60.0, kw_only=True)
    store: Store = attrs.field(init=False)
    #: Lists made by a ``watch=False`` informer (a watching one counts :attr:`relists`).
    lists: int = attrs.field(default=0, init=False)
    relists: int = attrs.field(default=0, init=False)
    #: How the watches ended: ``closed`` (by the server, normally its timeout), ``gone``
    #: (410: relisted), or ``error <status>`` (retried after a backoff).
    watch_ends: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    _handlers: list[Handler] = attrs.field(factory=list, init=False)
    _synced: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _task: asyncio.Task[None] | None = attrs.field(default=None, init=False)
    _resync_task: asyncio.Task[None] | None = attrs.field(default=None, init=False)
    _rv: str = attrs.field(default="", init=False)
    _refresh: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _unready: Callable[[], None] | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.store = Store(self.indexers)

    async def _synced_check(self) -> str | None:
        return None if self.synced else f"informer {self.name} has not listed yet"

    @property
    def name(self) -> str:
        """A label for logs: the resource and what it is filtered to."""
        parts = [self.resource.plural]
        if self.namespace:
            parts.append(f"ns={self.namespace}")
        if self.label_selector:
            parts.append(f"labels={self.label_selector}")
        if self.field_selector:
            parts.append(f"fields={self.field_selector}")
        return " ".join(parts)

    @property
    def synced(self) -> bool:
        """Whether the first list has been cached."""
        return self._synced.is_set()

    def add_handler(self, handler: Handler) -> None:
        """Call ``handler`` for every change (and, on sync, for every cached object)."""
        self._handlers.append(handler)
        # A handler added late still learns about what is cached.
        for obj in self.store:
            self._call(handler, Event(ADDED, obj))

    async def start(self) -> None:
        """Start listing and watching in the background."""
        if self._task is None:
            metrics = self.client.metrics
            if metrics is not None and self.gates_readiness and self._unready is None:
                # Readiness: a process whose caches are empty must not be sent work yet.
                self._unready = metrics.health.add_readiness(
                    f"informer {self.name}", self._synced_check
                )
            self._task = asyncio.create_task(self._run(), name=f"informer {self.name}")
            if self.resync:
                self._resync_task = asyncio.create_task(
                    self._resync_loop(self.resync), name=f"resync {self.name}"
                )

    def refresh(self) -> None:
        """Ask a ``watch=False`` informer to list again now (requests made before that
        list starts are served by it)."""
        self._refresh.set()

    def remember(self, obj: Obj) -> Obj:
        """Take an object a write returned (transformed like a listed one) unless the
        store has a newer version; returns what is cached. No event is reported."""
        obj = self.transform(obj)
        if obj["metadata"].get("resourceVersion") and object_key(obj) not in self.store:
            self.store.put(obj)
        else:
            self.store.put_if_newer(obj)
        return self.store.get(object_key(obj)) or obj

    def forget(self, key: str) -> None:
        """Drop an object a write found gone (no event is reported)."""
        self.store.remove(key)

    async def wait_synced(self, within: float | None = None) -> None:
        """Wait until the first list is in the store."""
        waiter = asyncio.ensure_future(self._synced.wait())
        task = self._task
        waits: set[asyncio.Future[Any]] = {waiter}
        if task is not None:
            waits.add(task)
        try:
            done, _ = await asyncio.wait(waits, timeout=within, return_when="FIRST_COMPLETED")
        finally:
            waiter.cancel()
        if task is not None and task in done:
            task.result()
            raise RuntimeError(f"informer {self.name} stopped before it synced")
        if not self._synced.is_set():
            raise TimeoutError(f"informer {self.name} did not sync in {within}s")

    async def close(self) -> None:
        """Stop watching (the store keeps its last content; :meth:`start` resumes)."""
        for task in (self._resync_task, self._task):
            await stop_task(task)
        self._task = self._resync_task = None
        if self._unready is not None:
            self._unready()
            self._unready = None

    # -- internals ------------------------------------------------------------------------

    async def _run(self) -> None:
        if not self.watch:
            await self._list_loop()
            return
        failures = 0
        # Started again after close(), it resumes watching where it stopped, as a dropped
        # watch does; a resourceVersion that expired meanwhile (410) makes it relist.
        need_list = not self._rv
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                began = time.monotonic()
                timeout, events = await self._watch()
                lasted = time.monotonic() - began
                self.watch_ends["closed"] += 1
                if lasted < timeout / 2:
                    # The server ended it early: an overloaded apiserver drops the watchers
                    # that fall behind, and all of them at once. Coming back together would
                    # only overload it again; the events meanwhile are replayed from the
                    # resourceVersion. A watch that ended at once without any event is a
                    # failure (client-go's rule), backed off like one.
                    if lasted < 1.0 and not events:
                        failures += 1
                    else:
                        failures = 0
                    await asyncio.sleep(self._early_close_delay(failures))
                else:
                    failures = 0
            except asyncio.CancelledError:
                raise
            except APIGone:
                self.watch_ends["gone"] += 1
                log.info("informer %s: resourceVersion expired; relisting", self.name)
                need_list = True
                self._relisting()
            except (APIError, ValueError) as exc:
                status = exc.status if isinstance(exc, APIError) else type(exc).__name__
                self.watch_ends[f"error {status or 'transport'}"] += 1
                failures += 1
                delay = _failure_backoff(failures)
                log.warning("informer %s: %s; retrying in %.1fs", self.name, exc, delay)
                # After repeated failures the resourceVersion may be stale; start over.
                if failures >= 3 and not need_list:
                    need_list = True
                    self._relisting()
                await asyncio.sleep(delay)

    async def _list_loop(self) -> None:
        """List, wait for the period or a :meth:`refresh`, list again; forever."""
        failures = 0
        while True:
            self._refresh.clear()
            try:
                await self._list()
            except asyncio.CancelledError:
                raise
            except (APIError, ValueError) as exc:
                status = exc.status if isinstance(exc, APIError) else type(exc).__name__
                failures += 1
                delay = _failure_backoff(failures)
                log.warning("informer %s: list: %s (%s); retrying in %.1fs", self.name, exc,
                            status or "transport", delay)  # fmt: skip
                await asyncio.sleep(delay)
                continue
            failures = 0
            self.lists += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh.wait(), self.relist * random.uniform(0.9, 1.1))

    async def _list(self) -> None:
        items: list[Obj] = []
        token: str | None = None
        rv = ""
        while True:
            # resourceVersion=0 lets the apiserver answer from its watch cache instead of
            # reading (and filtering) everything from etcd, as client-go's reflector does;
            # the watch that follows brings the cache up to date. It ignores the page size.
            page = await self.client.list(
                self.resource,
                namespace=self.namespace,
                label_selector=self.label_selector,
                field_selector=self.field_selector,
                limit=None if self.from_cache else self.page_size,
                continue_token=token,
                resource_version="0" if self.from_cache else None,
            )
            for item in page.get("items") or ():
                # Lists omit kind/apiVersion on items; restore them for owners and events.
                item.setdefault("kind", self.resource.kind)
                item.setdefault("apiVersion", self.resource.api_version)
                items.append(self.transform(item))
            meta = page.get("metadata") or {}
            rv = meta.get("resourceVersion", rv)
            token = meta.get("continue") or None
            if not token:
                break
        self._replace(items, rv)
        self._rv = rv
        self._synced.set()
        if self.client.metrics is not None:
            self.client.metrics.informer_synced.labels(self.resource.plural).set(1)

    def _relisting(self) -> None:
        self.relists += 1
        if self.client.metrics is not None:
            self.client.metrics.relists.labels(self.resource.plural).inc()

    def _replace(self, items: list[Obj], listed_rv: str = "") -> None:
        seen = set()
        for obj in items:
            key = object_key(obj)
            seen.add(key)
            if not self.watch and _newer(self.store.get(key), _rv_of(obj)):
                continue  # the owner's own write, which this list does not show yet
            old = self.store.put(obj)
            if old is None:
                self._emit(Event(ADDED, obj))
            elif _rv_of(old) != _rv_of(obj):
                self._emit(Event(MODIFIED, obj, old))
        for key in self.store.key_list():
            if key not in seen:
                if not self.watch and _newer(self.store.get(key), listed_rv):
                    continue  # created after the list's resourceVersion
                gone = self.store.remove(key)
                if gone is not None:
                    self._emit(Event(DELETED, gone, gone))

    @staticmethod
    def _early_close_delay(failures: int) -> float:
        """Seconds before watching again after the server ended a watch early."""
        if failures:
            return _failure_backoff(failures)
        return random.uniform(0.0, 1.0)

    async def _watch(self) -> tuple[int, int]:
        """Watch until the server ends it; the timeout asked for and the events seen."""
        # Spread the server-side timeouts so informers do not all rewatch at once.
        timeout = int(self.watch_timeout * random.uniform(1.0, 1.5))
        events = 0
        async for kind, raw in self.client.watch(
            self.resource,
            resource_version=self._rv,
            namespace=self.namespace,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            timeout_seconds=timeout,
        ):
            events += 1
            rv = raw.get("metadata", {}).get("resourceVersion")
            if kind == "BOOKMARK":
                if rv:
                    self._rv = rv
                continue
            raw.setdefault("kind", self.resource.kind)
            raw.setdefault("apiVersion", self.resource.api_version)
            obj = self.transform(raw)
            if kind in (ADDED, MODIFIED):
                old = self.store.put(obj)
                self._emit(Event(MODIFIED if old is not None else ADDED, obj, old))
            elif kind == DELETED:
                old = self.store.remove(object_key(obj))
                self._emit(Event(DELETED, obj, old))
            if rv:
                self._rv = rv
        return timeout, events

    async def _resync_loop(self, period: float) -> None:
        await self._synced.wait()
        while True:
            await asyncio.sleep(period * random.uniform(0.9, 1.1))
            for obj in self.store:
                self._emit(Event(RESYNC, obj, obj))

    def _emit(self, event: Event) -> None:
        for handler in self._handlers:
            self._call(handler, event)

    def _call(self, handler: Handler, event: Event) -> None:
        try:
            handler(event)
        except Exception:
            # A broken handler must not stop the informer for everyone else.
            log.exception("informer %s: handler %r failed", self.name, handler)


def _failure_backoff(failures: int) -> float:
    """Seconds before trying again after ``failures`` failures in a row: 0.4 s doubling
    to 30 s, jittered by a fifth so that informers do not come back together."""
    return min(30.0, 0.2 * float(2 ** min(failures, 8))) * random.uniform(0.8, 1.2)


def _newer(obj: Obj | None, rv: str) -> bool:
    """Whether ``obj`` is a version later than ``rv`` (False when either is unknown)."""
    if obj is None:
        return False
    try:
        return int(_rv_of(obj)) > int(rv)
    except ValueError:
        return False


def _rv_of(obj: Obj) -> str:
    rv: str = obj.get("metadata", {}).get("resourceVersion", "")
    return rv
