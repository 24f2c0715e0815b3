"""The Segment user → account map survives restarts and is shared by workers (real
PostgreSQL; the service tests also a real broker and real ingest processes)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from churnguard.common.db import create_engine, session_factory
from churnguard.common.topics import Topic
from churnguard.ingest.segment import NO_ACCOUNT
from churnguard.ingest.user_accounts import (
    AccountsUnavailable,
    UserAccountRepository,
    UserAccounts,
)
from tests.fixtures.kafka import KafkaBroker, read_events
from tests.fixtures.services import IngestDatabase, RunningService, ServiceFactory


def track(message_id: str, user: str, account: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "track",
        "messageId": message_id,
        "userId": user,
        "event": "Report Exported",
        "timestamp": "2026-11-20T09:30:00Z",
    }
    if account is not None:
        message["context"] = {"groupId": account}
    return message


def group(message_id: str, user: str, account: str) -> dict[str, Any]:
    return {"type": "group", "messageId": message_id, "userId": user, "groupId": account}


async def post_batch(service: RunningService, *messages: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=service.url, auth=service.auth, timeout=30) as client:
        return await client.post("/v1/batch", json={"batch": list(messages)})


async def stored_account(engine: AsyncEngine, user: str) -> str | None:
    async with engine.connect() as conn:
        row = await conn.execute(
            text("select account_id from user_accounts where user_id = :u"), {"u": user}
        )
        return row.scalar_one_or_none()


async def until_stored(engine: AsyncEngine, user: str, timeout: float = 10.0) -> str:
    async with asyncio.timeout(timeout):
        while (account := await stored_account(engine, user)) is None:  # noqa: ASYNC110 - rows send no events
            await asyncio.sleep(0.05)
    return account


@pytest_asyncio.fixture
async def ingest_engine(ingest_database: IngestDatabase) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(ingest_database.url, schema=ingest_database.schema)
    yield engine
    await engine.dispose()


@pytest.mark.integration
async def test_accounts_survive_a_crash_and_a_restart(
    kafka: KafkaBroker,
    kafka_topics: str,
    start_ingest: ServiceFactory,
    ingest_engine: AsyncEngine,
) -> None:
    # flushes only when told to: what the background writer would do later is not awaited
    slow_writes = {"CHURNGUARD_INGEST_USER_ACCOUNTS_FLUSH_S": "600"}
    first = start_ingest(**slow_writes)
    assert (await post_batch(first, group("g-1", "u_grp", "acct_grp"))).status_code == 200
    assert (await post_batch(first, track("t-1", "u_ctx", "acct_ctx"))).status_code == 200
    # an acknowledged group call is in PostgreSQL already; what a track taught is not yet
    assert await stored_account(ingest_engine, "u_grp") == "acct_grp"
    assert await stored_account(ingest_engine, "u_ctx") is None
    first.process.kill()  # a crash: no clean stop to write the rest

    second = start_ingest(**slow_writes)
    response = await post_batch(second, track("t-2", "u_grp"), track("t-3", "u_ctx"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["accepted"] == 1  # the group call's account survived the crash
    # what only a track taught was lost with the crash, as documented: the caller is told
    assert body["rejected"] == [
        {"index": 1, "field": "batch[1].context.groupId", "reason": NO_ACCOUNT}
    ]
    assert (await post_batch(second, track("t-4", "u_ctx", "acct_ctx"))).status_code == 200
    second.process.stop()  # a clean stop writes what was learned
    assert await stored_account(ingest_engine, "u_ctx") == "acct_ctx"

    third = start_ingest()
    response = await post_batch(third, track("t-5", "u_ctx"), track("t-6", "u_grp"))
    assert response.json() == {"success": True, "accepted": 2, "rejected": []}
    _, events = await read_events(kafka.bootstrap, Topic.USAGE.name_in(kafka_topics), 6)
    subject = {e["id"]: e["subject"] for e in events}
    assert subject == {
        "g-1": "acct_grp",
        "t-1": "acct_ctx",
        "t-2": "acct_grp",
        "t-4": "acct_ctx",
        "t-5": "acct_ctx",
        "t-6": "acct_grp",
    }


@pytest.mark.integration
async def test_a_second_worker_resolves_what_the_first_learned(
    kafka: KafkaBroker,
    kafka_topics: str,
    start_ingest: ServiceFactory,
    ingest_engine: AsyncEngine,
) -> None:
    learner = start_ingest(CHURNGUARD_INGEST_USER_ACCOUNTS_FLUSH_S="0.1")
    # trusts nothing it has cached: asks PostgreSQL for every user without context.groupId
    other = start_ingest(CHURNGUARD_INGEST_USER_ACCOUNTS_TTL_S="0")
    assert (await post_batch(learner, track("a-1", "u_1", "acct_1"))).status_code == 200
    assert await until_stored(ingest_engine, "u_1") == "acct_1"  # the background writer
    assert (await post_batch(other, track("b-1", "u_1"))).json()["accepted"] == 1
    # the user moves, through the first worker: the second follows
    assert (await post_batch(learner, group("a-2", "u_1", "acct_2"))).status_code == 200
    assert (await post_batch(other, track("b-2", "u_1"))).json()["accepted"] == 1
    async with httpx.AsyncClient(base_url=other.url, auth=other.auth, timeout=30) as client:
        single = await client.post("/v1/track", json=track("b-3", "u_1"))
    assert single.status_code == 200, single.text
    _, events = await read_events(kafka.bootstrap, Topic.USAGE.name_in(kafka_topics), 5)
    assert {e["id"]: e["subject"] for e in events} == {
        "a-1": "acct_1",
        "b-1": "acct_1",
        "a-2": "acct_2",
        "b-2": "acct_2",
        "b-3": "acct_2",
    }


# -- the map itself, against PostgreSQL -------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_later_learning_wins_whichever_worker_writes_last(
    ingest_database: IngestDatabase, ingest_engine: AsyncEngine
) -> None:
    sessions = session_factory(ingest_engine)
    at = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
    async with sessions() as session, session.begin():
        await UserAccountRepository(session).save({"u_1": ("acct_new", at)})
    async with sessions() as session, session.begin():  # a slow worker's older learning
        await UserAccountRepository(session).save(
            {"u_1": ("acct_old", at - timedelta(seconds=1)), "u_2": ("acct_2", at)}
        )
    async with sessions() as session, session.begin():
        found = await UserAccountRepository(session).find(["u_1", "u_2", "u_3"])
    assert found == {"u_1": "acct_new", "u_2": "acct_2"}


async def test_cached_answers_are_trusted_for_the_ttl_then_asked_again(
    ingest_engine: AsyncEngine,
) -> None:
    clock = Clock()
    sessions = session_factory(ingest_engine)
    users = UserAccounts(sessions, ttl_s=60, clock=clock)
    users.remember("u_1", "acct_1")
    assert users.resolve("u_1") == "acct_1"
    assert users.resolve(None) is None
    await users.flush()
    async with sessions() as session, session.begin():  # another worker moves the user
        await UserAccountRepository(session).save({"u_1": ("acct_2", datetime.now(UTC))})
    assert users.resolve("u_1") == "acct_1"  # within the TTL: the cache answers
    clock.now += 61
    assert users.resolve("u_1") is None  # not trusted any more: the caller asks PostgreSQL
    assert await users.load(["u_1", "u_unknown"]) == {"u_1": "acct_2"}
    assert users.resolve("u_1") == "acct_2"
    assert users.resolve("u_unknown") is None


async def test_seeing_the_same_account_again_writes_nothing(ingest_engine: AsyncEngine) -> None:
    users = UserAccounts(session_factory(ingest_engine))
    users.remember("u_1", "acct_1")
    assert users.pending == 1
    await users.flush()
    users.remember("u_1", "acct_1")
    assert users.pending == 0
    users.remember("u_1", "acct_2")
    assert users.pending == 1


async def test_the_background_writer_writes_and_a_stop_writes_the_rest(
    ingest_engine: AsyncEngine,
) -> None:
    users = UserAccounts(session_factory(ingest_engine), flush_interval_s=0.05)
    await users.start()
    users.remember("u_1", "acct_1")
    assert await until_stored(ingest_engine, "u_1") == "acct_1"
    users.flush_interval_s = 600  # the next write would come much later...
    users.remember("u_2", "acct_2")
    await users.stop()  # ...but a stop does not wait for it
    assert await stored_account(ingest_engine, "u_2") == "acct_2"


def test_the_cache_is_bounded() -> None:
    users = UserAccounts(
        session_factory(create_engine(unreachable_url(), schema="ingest")), max_users=2
    )
    for n in range(3):
        users.remember(f"u_{n}", f"acct_{n}")
    assert len(users) == 2
    assert users.resolve("u_0") is None  # least recently learned, forgotten first
    assert users.resolve("u_2") == "acct_2"


def unreachable_url() -> str:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"


async def test_postgresql_away_is_unavailable_and_nothing_learned_is_dropped() -> None:
    engine = create_engine(unreachable_url(), schema="ingest")
    try:
        users = UserAccounts(session_factory(engine))
        users.remember("u_1", "acct_1")
        with pytest.raises(AccountsUnavailable):
            await users.flush()
        assert users.pending == 1  # kept for the next try
        assert users.resolve("u_1") == "acct_1"  # and the cache still answers
        with pytest.raises(AccountsUnavailable):
            await users.load(["u_2"])
    finally:
        await engine.dispose()
