"""The shared informer cache: objects by key, with secondary indexes.

Filled by :mod:`.watching` (observe); read by reconcilers (process) which never trust the
event that woke them but look the current state up here. Objects are plain JSON
dictionaries, usually slimmed by an informer transform; treat them as read-only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

Obj = dict[str, Any]
IndexFunc = Callable[[Obj], Iterable[str]]

NAMESPACE_INDEX = "namespace"


def object_key(obj: Mapping[str, Any]) -> str:
    """``namespace/name`` for namespaced objects, ``name`` for cluster-scoped ones."""
    meta = obj.get("metadata", {})
    namespace = meta.get("namespace")
    name: str = meta.get("name", "")
    return f"{namespace}/{name}" if namespace else name


def split_key(key: str) -> tuple[str | None, str]:
    """The inverse of :func:`object_key`: ``(namespace or None, name)``."""
    namespace, sep, name = key.rpartition("/")
    return (namespace if sep else None), name


def by_namespace(obj: Obj) -> Iterable[str]:
    """The namespace index (cluster-scoped objects are not in it)."""
    namespace = obj.get("metadata", {}).get("namespace")
    return (namespace,) if namespace else ()


class Store:
    """A keyed object cache with indexes kept in step with every change."""

    def __init__(self, indexers: Mapping[str, IndexFunc] | None = None) -> None:
        self._items: dict[str, Obj] = {}
        self._indexers: dict[str, IndexFunc] = {NAMESPACE_INDEX: by_namespace}
        self._indexers.update(indexers or {})
        self._indexes: dict[str, dict[str, set[str]]] = {name: {} for name in self._indexers}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[Obj]:
        return iter(list(self._items.values()))

    def key_list(self) -> list[str]:
        """Every key, in no particular order."""
        return list(self._items)

    def get(self, key: str) -> Obj | None:
        """The object with this key, if cached."""
        return self._items.get(key)

    def by_index(self, index: str, value: str) -> list[Obj]:
        """Objects whose ``index`` function returned ``value``."""
        keys = self._indexes[index].get(value, ())
        return [self._items[key] for key in keys]

    def put(self, obj: Obj) -> Obj | None:
        """Add or replace an object; returns the one it replaced."""
        key = object_key(obj)
        old = self._items.get(key)
        if old is not None:
            self._unindex(key, old)
        self._items[key] = obj
        for name in self._indexers:
            self._index(name, key, obj)
        return old

    def put_if_newer(self, obj: Obj) -> bool:
        """Take the object a write returned, if cached and not older than the cached one.

        Lets a reconcile read its own write before the watch event for it arrives. The
        informer's events still come from the watch alone.
        """
        key = object_key(obj)
        old = self._items.get(key)
        if old is None:
            return False
        try:
            newer = int(obj["metadata"]["resourceVersion"]) >= int(
                old["metadata"]["resourceVersion"]
            )
        except (KeyError, TypeError, ValueError):
            newer = True
        if newer:
            self.put(obj)
        return newer

    def remove(self, key: str) -> Obj | None:
        """Drop an object; returns it if it was cached."""
        old = self._items.pop(key, None)
        if old is not None:
            self._unindex(key, old)
        return old

    def _index(self, name: str, key: str, obj: Obj) -> None:
        index = self._indexes[name]
        for value in self._indexers[name](obj):
            index.setdefault(value, set()).add(key)

    def _unindex(self, key: str, obj: Obj) -> None:
        for name, func in self._indexers.items():
            index = self._indexes[name]
            for value in func(obj):
                keys = index.get(value)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del index[value]
