from __future__ import annotations

import logging
from collections.abc import Iterator

import orjson
import pytest

from churnguard.common.logs import bind_event, configure_logging


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_bound_event_and_extras(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("ingest", "INFO", "json")
    log = logging.getLogger("churnguard.test")
    with bind_event("evt-1", "acct_7f3a91"):
        log.warning("published %d events", 3, extra={"topic": "events.usage"})
    log.info("outside")
    first, second = (orjson.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["msg"] == "published 3 events"
    assert first["level"] == "warning"
    assert first["service"] == "ingest"
    assert (first["event_id"], first["account_id"], first["topic"]) == (
        "evt-1",
        "acct_7f3a91",
        "events.usage",
    )
    assert "event_id" not in second
    assert "account_id" not in second


def test_exceptions_are_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("scoring", "INFO", "json")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("churnguard.test").exception("failed")
    (line,) = capsys.readouterr().err.splitlines()
    record = orjson.loads(line)
    assert record["msg"] == "failed"
    assert "ValueError: boom" in record["exc"]
