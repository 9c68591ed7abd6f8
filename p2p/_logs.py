"""The node's log: one JSON object per line, each with its time, level and event, so that
an operator can filter by level and a program can read what happened without parsing prose."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

LEVELS = ("debug", "info", "warning", "error")


class JsonLines(logging.Formatter):
    """Structured events pass a dict as the message; anything else (a library's warning, a
    traceback of an internal error) is kept as `msg`/`error` in the same shape."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower()}
        if isinstance(record.msg, dict):
            line.update(record.msg)
        else:
            line.update(event="log", logger=record.name, msg=record.getMessage())
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line)


def setup_logging(level: str = "info") -> None:
    """Send every logger's records, as JSON lines, to standard error at `level` and above."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
