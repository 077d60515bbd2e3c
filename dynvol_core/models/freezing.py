"""Immutable JSON values and API timestamps, shared by every model.

:class:`FrozenMap` and :func:`freeze_json` make the JSON the API returns hashable and
immutable, so models can be attrs-frozen values; :func:`thaw_json` turns them back into
plain data for the wire. Neighbours: :mod:`.fields` (reading JSON objects field by field).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

__all__ = [
    "FrozenMap",
    "format_time",
    "freeze_json",
    "json_map_of",
    "parse_time",
    "str_map_of",
    "thaw_json",
]

K = TypeVar("K")
V = TypeVar("V")


class FrozenMap(Mapping[K, V]):
    """An immutable, hashable mapping (for labels, parameters and free-form config)."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._data: dict[K, V] = dict(data)
        self._hash: int | None = None

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


def freeze_json(value: object) -> object:
    """A deep, hashable copy of a JSON value: objects become FrozenMap, arrays tuples."""
    if isinstance(value, Mapping):
        return FrozenMap((str(k), freeze_json(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return tuple(freeze_json(v) for v in value)
    return value


def thaw_json(value: object) -> Any:
    """The inverse of :func:`freeze_json`: plain dicts and lists, ready to serialise."""
    if isinstance(value, Mapping):
        return {k: thaw_json(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [thaw_json(v) for v in value]
    return value


def str_map_of(value: Mapping[str, str] | Iterable[tuple[str, str]]) -> FrozenMap[str, str]:
    return value if isinstance(value, FrozenMap) else FrozenMap(value)


def json_map_of(value: Mapping[str, object]) -> FrozenMap[str, object]:
    frozen = freeze_json(value)
    assert isinstance(frozen, FrozenMap)
    return frozen


def parse_time(value: str) -> dt.datetime:
    """Parse an RFC 3339 timestamp as the API writes it (``2024-10-18T08:00:00Z``)."""
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no time zone")
    return parsed.astimezone(dt.UTC)


def format_time(value: dt.datetime) -> str:
    """Format a timestamp the way ``metav1.Time`` does: UTC, whole seconds, 'Z'."""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
