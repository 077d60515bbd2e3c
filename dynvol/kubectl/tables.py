"""Tables and ages printed the way kubectl prints them.

Columns are upper-case headers, left-aligned, separated by three spaces; an empty cell
reads ``<none>``. Ages are short and coarse (``45s``, ``3m12s``, ``5h``, ``2d3h``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

__all__ = ["age", "parse_time", "render"]

NONE = "<none>"


def render(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """The table of ``rows`` under ``headers`` (no trailing spaces), newline-terminated."""
    cells = [[str(h).upper() for h in headers]]
    cells += [[NONE if c is None or c == "" else _one_line(str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    # A cell is one line: object fields (messages) may hold newlines and control characters.
    return "".join(ch if ch.isprintable() else " " for ch in text)


def parse_time(value: object) -> dt.datetime | None:
    """An RFC 3339 timestamp of the API (``2026-12-01T12:00:00Z``), or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def age(since: object, now: dt.datetime | None = None) -> str:
    """How long ago ``since`` (a timestamp string or datetime) was, as kubectl shows it."""
    when = since if isinstance(since, dt.datetime) else parse_time(since)
    if when is None:
        return NONE
    now = now or dt.datetime.now(dt.UTC)
    seconds = max(0, int((now - when).total_seconds()))
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if days < 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    return f"{days // 365}y"
