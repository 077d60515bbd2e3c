"""Observing the DynamicVolumeMounts assigned to this DMP: list, then watch, relist on 410.

:class:`MountCache` holds the latest version of every assigned object, fed by
:func:`watch_assigned`, which lists and then watches from the list's resourceVersion,
resumes from the last seen version when the server ends a watch, and lists again only when
that version is gone (410) or the connection failed. No polling.

Only changes to what the agent acts on wake a key: the spec, the labels and the deletion.
The agent's own status writes come back as watch events too; if they woke the key, a
failing mount would be retried at once, defeating its backoff.

Neighbours: :mod:`dynvol_dmp.k8s` (the requests), :mod:`dynvol_dmp.queueing` (where keys go).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from dynvol_dmp.k8s import APIError, APIGone, KubeApi

log = logging.getLogger(__name__)

Key = tuple[str, str]


def key_of(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata", {})
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


def intent(obj: dict[str, Any]) -> tuple[object, ...]:
    """The part of a DynamicVolumeMount the agent acts on (not status, not bookkeeping)."""
    meta = obj.get("metadata", {})
    # Not the generation: the API server derives it from spec changes and deletion.
    return (obj.get("spec"), meta.get("deletionTimestamp"), meta.get("labels"))


class MountCache:
    """Latest seen DynamicVolumeMount objects by (namespace, name)."""

    def __init__(self) -> None:
        self._objects: dict[Key, dict[str, Any]] = {}
        # The intent last seen from the list or the watch. Compared with that, not with the
        # cached object: a write's response (see update) may already carry someone else's
        # spec change whose watch event has not arrived yet, and that event must still wake
        # the key.
        self._intents: dict[Key, tuple[object, ...]] = {}
        self.synced = asyncio.Event()

    def get(self, key: Key) -> dict[str, Any] | None:
        return self._objects.get(key)

    def keys(self) -> list[Key]:
        return list(self._objects)

    def replace(self, items: list[dict[str, Any]]) -> set[Key]:
        """Set the content from a list; returns the keys that are new, vanished or changed."""
        fresh = {key_of(obj): obj for obj in items}
        intents = {key: intent(obj) for key, obj in fresh.items()}
        touched = {
            key
            for key in set(self._intents) | set(intents)
            if self._intents.get(key) != intents.get(key)
        }
        self._objects = fresh
        self._intents = intents
        self.synced.set()
        return touched

    def apply(self, kind: str, obj: dict[str, Any]) -> Key | None:
        """Take a watch event; returns its key if the agent must look again, else None."""
        key = key_of(obj)
        if kind == "DELETED":
            self._objects.pop(key, None)
            self._intents.pop(key, None)
            return key
        self._objects[key] = obj
        now = intent(obj)
        if self._intents.get(key) == now:
            return None
        self._intents[key] = now
        return key

    def update(self, obj: dict[str, Any]) -> None:
        """Take a newer version returned by a write (if it is newer than the cached one)."""
        key = key_of(obj)
        old = self._objects.get(key)
        if old is None:
            return
        try:
            newer = int(obj["metadata"]["resourceVersion"]) >= int(
                old["metadata"]["resourceVersion"]
            )
        except (KeyError, ValueError):
            newer = True
        if newer:
            self._objects[key] = obj


async def watch_assigned(
    api: KubeApi,
    label_selector: str,
    cache: MountCache,
    on_change: Callable[[Key], None],
    *,
    retry_delay: float = 1.0,
) -> None:
    """Keep ``cache`` in sync forever, calling ``on_change`` with every touched key."""
    failures = 0
    while True:
        try:
            items, version = await api.list_mounts(label_selector)
            for key in cache.replace(items):
                on_change(key)
            failures = 0
            while True:
                async for kind, obj in api.watch_mounts(label_selector, version):
                    version = str(obj.get("metadata", {}).get("resourceVersion", version))
                    if kind == "BOOKMARK":
                        continue
                    key = cache.apply(kind, obj)
                    if key is not None:
                        on_change(key)
                # The server closed the watch (its timeout): resume from where we were.
        except APIGone:
            log.info("watch expired (410 Gone); listing again")
        except APIError as exc:
            failures += 1
            delay = min(retry_delay * 2 ** min(failures, 6), 30.0)
            log.warning("watching DynamicVolumeMounts failed (%s); retrying in %.0fs", exc, delay)
            await asyncio.sleep(delay)
        except (TimeoutError, OSError) as exc:
            failures += 1
            delay = min(retry_delay * 2 ** min(failures, 6), 30.0)
            log.warning("connection to the API server failed (%s); retrying in %.0fs", exc, delay)
            await asyncio.sleep(delay)
