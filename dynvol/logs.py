"""Logging setup of every ``dynvol`` process: ``--log-format text|json`` and ``--log-level``.

JSON lines have stable keys, so that log pipelines can rely on them: ``ts`` (RFC 3339, UTC,
milliseconds), ``level``, ``logger``, ``msg``; then ``namespace``, ``name``, ``node`` and
``reason`` when the call passed them (``log.info(..., extra={"reason": "Mounted"})``;
the object's name is passed as ``object_name``, because a log record's ``name`` is its
logger's), and ``exc`` with the traceback of a logged exception. Any other ``extra`` value
is left out: the keys are a contract, not whatever a caller happened to pass.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import TextIO

__all__ = ["CONTEXT_KEYS", "FORMATS", "JsonFormatter", "configure"]

FORMATS = ("text", "json")
#: JSON key <- the ``extra=`` key a log call passes it as, in the order they appear.
CONTEXT_KEYS = {"namespace": "namespace", "name": "object_name", "node": "node",
                "reason": "reason"}  # fmt: skip

_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, keys as the module docstring says."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, object] = {
            "ts": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, attribute in CONTEXT_KEYS.items():
            value = record.__dict__.get(attribute)
            if value is not None and value != "":
                entry[key] = str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, log_format: str, *, stream: TextIO | None = None) -> None:
    """Send every logger's records to ``stream`` (stderr) at ``level``, as ``log_format``.

    :raises ValueError: for a format other than text or json.
    """
    if log_format not in FORMATS:
        raise ValueError(f"--log-format {log_format!r}: use text or json")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
