"""Structured logs: one JSON object per line on stderr, for the service's own events and uvicorn's."""

from __future__ import annotations

import json
import logging
import sys
import time

logger = logging.getLogger("pbnds.service")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(time.time(), 3), "level": record.levelname.lower(), "logger": record.name,
                "event": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def event(name: str, level: int = logging.INFO, exc_info: bool = False, **fields) -> None:
    """Log one event; fields (job id, status, timings...) become keys of the JSON line."""
    logger.log(level, name, extra={"fields": fields}, exc_info=exc_info)
