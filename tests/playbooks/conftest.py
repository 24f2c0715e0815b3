"""A decision engine on a real PostgreSQL schema of the test's own (no Kafka): records go
in through the same code the consumers run, one transaction each; commands are read
back from the outbox table."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest_asyncio
from sqlalchemy import text

from churnguard.common.db import run_migrations_async
from churnguard.common.topics import Topic
from churnguard.playbooks.app import migrations_path
from churnguard.playbooks.commands import Command
from churnguard.playbooks.consumer import DECISION_TOPICS, STATE_TOPICS, RecordProcessor
from churnguard.playbooks.decisions import DecisionEngine, Result
from churnguard.playbooks.facts import LiftRanking
from churnguard.playbooks.loader import PlaybookSet, load_dir
from churnguard.playbooks.repository import PlaybooksRepository
from churnguard.playbooks.settings import DEFAULT_LIFT_PATH, SHIPPED_DIR, PlaybooksSettings
from churnguard.playbooks.timers import TimerLoop
from tests.fixtures.postgres import PgSchema


async def _keep_in_outbox(commands: Sequence[Command]) -> None:
    """Commands stay in the outbox table, where the tests read them."""


@dataclass
class Harness:
    pg: PgSchema
    decisions: DecisionEngine
    processors: dict[str, RecordProcessor]
    timers: TimerLoop
    playbooks: PlaybookSet

    async def feed(self, topic: Topic, *events: Any) -> Result:
        """Each event in its own transaction, through each loop that reads ``topic``."""
        total = Result()
        roles = [
            r
            for r, topics in (("decisions", DECISION_TOPICS), ("state", STATE_TOPICS))
            if topic in topics
        ]
        for event in events:
            for role in roles:
                async with self.pg.engine.begin() as conn:
                    await self.processors[role].apply(
                        PlaybooksRepository(conn), topic, event, None, total
                    )
        return total

    async def signal(self, *events: Any) -> Result:
        return await self.feed(Topic.SIGNALS, *events)

    async def fire_until(self, moment: datetime) -> int:
        """Fire every timer due by ``moment`` (including those that firing creates)."""
        fired = 0
        while n := await self.timers.fire_due(moment):
            fired += n
        return fired

    async def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        async with self.pg.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(text(sql), params)).mappings()]

    async def commands(self, account: str | None = None, topic: Topic | None = None) -> list[Any]:
        """The commands in the outbox (decoded events), oldest first: those for notify, or
        those of ``topic`` (``Topic.DECISIONS``: the decision log's events)."""
        rows = await self.rows(
            "SELECT topic, value FROM outbox WHERE (CAST(:a AS text) IS NULL OR account_id = :a) "
            "ORDER BY created_at, command_id",
            a=account,
        )
        wanted = {topic.name} if topic else {Topic.NOTIFICATIONS.name, Topic.PAYMENT_RETRIES.name}
        return [Topic[r["topic"]].codec.decode(r["value"])[0] for r in rows if r["topic"] in wanted]

    async def decisions_of(self, account: str) -> list[dict[str, Any]]:
        return await self.rows(
            "SELECT * FROM decisions WHERE account_id = :a ORDER BY decided_at, created_at",
            a=account,
        )


def make_harness(pg: PgSchema, directory: Path = SHIPPED_DIR, **settings: Any) -> Harness:
    config = PlaybooksSettings(**settings)
    playbooks = load_dir(directory)
    decisions = DecisionEngine(config, lambda: playbooks, LiftRanking.load(DEFAULT_LIFT_PATH))
    return Harness(
        pg,
        decisions,
        {
            role: RecordProcessor(pg.engine, decisions, "", role=role)
            for role in ("decisions", "state")
        },
        TimerLoop(pg.engine, decisions, _keep_in_outbox, 0.1),
        playbooks,
    )


@pytest_asyncio.fixture
async def migrated(pg_schema: PgSchema) -> AsyncIterator[PgSchema]:
    await run_migrations_async(pg_schema.url, pg_schema.schema, migrations_path())
    yield pg_schema


@pytest_asyncio.fixture
async def harness(migrated: PgSchema) -> Harness:
    """The shipped playbooks; quiet hours off unless a test turns them on."""
    return make_harness(migrated, quiet_hours="")
