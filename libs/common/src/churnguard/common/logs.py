"""Structured logs: one JSON object per line, with the event and account id when known.

Call :func:`configure_logging` once at start-up. Inside message processing, bind the
current event with :func:`bind_event` so every log line written while handling it
carries ``event_id`` and ``account_id`` without threading them through every call.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson

_event_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("event_id", default=None)
_account_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("account_id", default=None)

_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


@contextlib.contextmanager
def bind_event(event_id: str | None, account_id: str | None) -> Iterator[None]:
    t1 = _event_id.set(event_id)
    t2 = _account_id.set(account_id)
    try:
        yield
    finally:
        _event_id.reset(t1)
        _account_id.reset(t2)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if (event_id := _event_id.get()) is not None:
            out["event_id"] = event_id
        if (account_id := _account_id.get()) is not None:
            out["account_id"] = account_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka logs every rebalance and coordinator hiccup at INFO, httpx every request
    for noisy in ("aiokafka", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
