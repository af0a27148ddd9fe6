"""Structured logging: one line per event, as key=value text or JSON.

Callers pass fields with `extra={"fields": {...}}` through :func:`event`; the
formatters render them. Values are never key material or tokens: callers pass
identifiers (volume_id, pod, spiffe_id), durations and error text only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``2026-11-27T06:55:22Z info event=publish volume_id=csi-1 duration_ms=4.1``"""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        parts = [stamp, record.levelname.lower(), f"event={_quote(record.getMessage())}"]
        parts += [f"{k}={_quote(v)}" for k, v in _fields(record).items()]
        if record.exc_info:
            parts.append("exc=" + _quote(self.formatException(record.exc_info)))
        return " ".join(parts)


class JSONFormatter(logging.Formatter):
    """One JSON object per line with the klog/zap keys log pipelines expect first: ``ts``
    (unix seconds), ``level`` and ``msg`` (the event name), then ``logger``, ``event`` (the
    same name, kept for existing queries) and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "msg": message,
            "logger": record.name,
            "event": message,
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger once, writing to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def event(logger: logging.Logger, level: int, name: str, **fields: Any) -> None:
    """Log one event with fields, e.g. ``event(log, INFO, "publish", volume_id=v)``."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"fields": fields})


def bug(logger: logging.Logger, name: str, exc: BaseException, **fields: Any) -> None:
    """Log an unexpected exception (a bug) as an error event with its traceback; expected
    failures use :func:`event` and stay one line."""
    logger.error(name, exc_info=(type(exc), exc, exc.__traceback__), extra={"fields": fields})
