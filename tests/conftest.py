from __future__ import annotations

from collections import Counter

import pytest

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.postgres",
    "tests.fixtures.services",
]

_SERVER_OF: dict[str, list[str]] = {}
"""nodeid → the real servers the test used (from its fixture closure)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        servers = []
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "kafka" in callspec.params:
            servers.append(f"kafka:{callspec.params['kafka']}")
        if "postgres_server" in getattr(item, "fixturenames", ()):
            servers.append("postgres")
        _SERVER_OF[item.nodeid] = servers


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which real servers the integration tests ran against, and how they fared."""
    counts: Counter[tuple[str, str]] = Counter()
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            if outcome == "passed" and report.when != "call":
                continue
            for server in _SERVER_OF.get(report.nodeid, []):
                counts[(server, outcome)] += 1
    if not counts:
        return
    terminalreporter.section("real servers")
    labels = {
        "kafka:tansu": "Tansu (embedded)",
        "kafka:apache": "Apache Kafka 3.9.2",
        "postgres": "PostgreSQL 18",
    }
    for server in sorted({s for s, _ in counts}):
        line = ", ".join(f"{n} {o}" for (s, o), n in sorted(counts.items()) if s == server)
        terminalreporter.write_line(f"{labels.get(server, server):<22} {line}")
