"""`python -m churnguard.common.setup`, as docker-compose's one-shot setup service runs it."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from churnguard.common.topics import planned_topics
from tests.fixtures.kafka import KafkaBroker
from tests.fixtures.postgres import PgServer
from tests.fixtures.services import service_env

pytestmark = pytest.mark.integration


def run_setup(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "churnguard.common.setup"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_setup_creates_topics_and_schemas_and_is_idempotent(
    kafka: KafkaBroker, topic_prefix: str, postgres_server: PgServer
) -> None:
    env = service_env(kafka, topic_prefix, CHURNGUARD_DATABASE_URL=postgres_server.url)
    runs = [await asyncio.to_thread(run_setup, env) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    expected = {p.name for p in planned_topics(topic_prefix)}
    assert f"{len(expected)} created, 0 already existed" in runs[0].stderr
    assert f"0 created, {len(expected)} already existed" in runs[1].stderr

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        assert expected <= set(await admin.list_topics())
    finally:
        await admin.close()

    conn = await asyncpg.connect(postgres_server.dsn)
    try:
        tables = {
            r["table_name"]
            for r in await conn.fetch(
                "select table_name from information_schema.tables where table_schema = 'ingest'"
            )
        }
    finally:
        await conn.close()
    assert {"sources", "alembic_version"} <= tables
