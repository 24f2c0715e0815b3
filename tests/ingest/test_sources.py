"""Sources and write keys against a real PostgreSQL, each test in its own schema."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from typer.testing import CliRunner

import churnguard.ingest
from churnguard.common.db import run_migrations_async, session_factory
from churnguard.ingest.keys_cli import keys
from churnguard.ingest.sources import (
    AmbiguousSource,
    Source,
    SourceExists,
    SourceNotFound,
    SourceRepository,
    Unauthorized,
    WriteKeyAuthenticator,
)
from tests.fixtures.postgres import PgSchema

pytestmark = pytest.mark.integration

MIGRATIONS = Path(churnguard.ingest.__file__).parent / "migrations"
KEY_RE = re.compile(r"cg_live_[A-Za-z0-9_-]{32}")
Sessions = async_sessionmaker[AsyncSession]


@pytest_asyncio.fixture
async def sessions(pg_schema: PgSchema) -> AsyncIterator[Sessions]:
    await run_migrations_async(pg_schema.url, pg_schema.schema, MIGRATIONS)
    yield session_factory(pg_schema.engine)


async def create_source(sessions: Sessions, name: str) -> tuple[Source, str]:
    async with sessions() as session, session.begin():
        return await SourceRepository(session).create(name)


async def revoke_source(sessions: Sessions, name_or_prefix: str) -> Source:
    async with sessions() as session, session.begin():
        return await SourceRepository(session).revoke(name_or_prefix)


async def list_sources(sessions: Sessions) -> list[Source]:
    async with sessions() as session, session.begin():
        return await SourceRepository(session).list()


def basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class CountingSessions:
    """A session factory that counts the sessions (database round trips) it opens."""

    def __init__(self, inner: Sessions) -> None:
        self.inner = inner
        self.opened = 0

    def __call__(self) -> AsyncSession:
        self.opened += 1
        return self.inner()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_created_key_authenticates_with_basic_and_bearer(sessions: Sessions) -> None:
    source, key = await create_source(sessions, "web-app")

    assert KEY_RE.fullmatch(key)
    assert source.name == "web-app"
    assert source.active
    assert source.write_key_prefix == key[:12]
    auth = WriteKeyAuthenticator(sessions, cache_ttl_s=0)
    for header in (basic(key), f"Bearer {key}", f"bearer  {key} ", "basic " + basic(key)[6:]):
        assert await auth.authenticate(header) == source


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing Authorization header"),
        ("  ", "missing Authorization header"),
        ("Digest abc", "malformed Authorization header"),
        ("Basic not*base64", "malformed Authorization header"),
        ("Bearer", "malformed Authorization header"),
        (basic(""), "malformed Authorization header"),
        ("Bearer sk_live_abc", "malformed write key"),
    ],
)
async def test_malformed_headers_are_refused_with_a_reason(
    sessions: Sessions, header: str | None, reason: str
) -> None:
    auth = WriteKeyAuthenticator(sessions)
    with pytest.raises(Unauthorized) as refused:
        await auth.authenticate(header)
    assert refused.value.reason.startswith(reason)


async def test_wrong_keys_are_refused_without_echoing_them(sessions: Sessions) -> None:
    _, key = await create_source(sessions, "web-app")
    auth = WriteKeyAuthenticator(sessions)
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    attempts = [
        (f"Bearer {wrong}", wrong),
        (basic(wrong), wrong),
        (basic(key, "not-empty"), key),  # a password is not part of the scheme
    ]
    for header, presented in attempts:
        with pytest.raises(Unauthorized) as refused:
            await auth.authenticate(header)
        assert presented not in str(refused.value)
        assert presented[8:] not in refused.value.reason
    with pytest.raises(Unauthorized, match="unknown or revoked write key"):
        await auth.authenticate(f"Bearer {wrong}")


async def test_cache_spares_the_database_on_the_hot_path(sessions: Sessions) -> None:
    source, key = await create_source(sessions, "web-app")
    counting, clock = CountingSessions(sessions), FakeClock()
    auth = WriteKeyAuthenticator(counting, cache_ttl_s=5.0, clock=clock)  # type: ignore[arg-type]
    unknown = "cg_live_" + "x" * 32

    for _ in range(3):
        assert await auth.authenticate(f"Bearer {key}") == source
        with pytest.raises(Unauthorized):
            await auth.authenticate(f"Bearer {unknown}")
    assert counting.opened == 2  # one lookup each for the known and the unknown key

    await revoke_source(sessions, "web-app")
    clock.now += 4.9  # within the TTL the cached answer stands (the documented bound)
    assert await auth.authenticate(basic(key)) == source
    assert counting.opened == 2

    clock.now += 0.2  # past the TTL: both are looked up again
    with pytest.raises(Unauthorized, match="unknown or revoked"):
        await auth.authenticate(basic(key))
    with pytest.raises(Unauthorized):
        await auth.authenticate(f"Bearer {unknown}")
    assert counting.opened == 4


async def test_cache_is_bounded(sessions: Sessions) -> None:
    auth = WriteKeyAuthenticator(sessions, max_entries=3)
    for i in range(10):
        with pytest.raises(Unauthorized):
            await auth.authenticate(f"Bearer cg_live_{i:032d}")
    assert len(auth._cache) == 3


async def test_revoked_key_is_refused_once_the_ttl_passes(sessions: Sessions) -> None:
    _, key = await create_source(sessions, "web-app")
    auth = WriteKeyAuthenticator(sessions, cache_ttl_s=0.05)
    await auth.authenticate(f"Bearer {key}")  # now cached as valid

    await revoke_source(sessions, "web-app")
    revoked_at = time.monotonic()
    deadline = revoked_at + 2.0
    reason = None
    while reason is None:
        try:
            await auth.authenticate(f"Bearer {key}")
        except Unauthorized as refused:
            reason = refused.reason
        else:
            assert time.monotonic() < deadline, "revocation not honoured after the TTL"
            await asyncio.sleep(0.01)
    assert reason == "unknown or revoked write key"
    # refused within the TTL plus one lookup, never later
    assert time.monotonic() - revoked_at < 0.05 + 1.0


async def test_duplicate_name_is_refused_by_name(sessions: Sessions) -> None:
    first, _ = await create_source(sessions, "web-app")
    async with sessions() as session, session.begin():
        repository = SourceRepository(session)
        with pytest.raises(SourceExists, match="'web-app'") as exists:
            await repository.create("web-app")
        # ON CONFLICT DO NOTHING: the transaction is still usable after the refusal
        other, _ = await repository.create("backend")
    assert exists.value.name == "web-app"
    assert [s.name for s in await list_sources(sessions)] == ["web-app", "backend"]
    assert first in await list_sources(sessions)
    assert other.name == "backend"


async def test_list_never_exposes_hashes_or_keys(sessions: Sessions) -> None:
    created = [await create_source(sessions, name) for name in ("web-app", "backend", "crm")]
    await revoke_source(sessions, "crm")

    listed = await list_sources(sessions)

    assert [s.name for s in listed] == ["web-app", "backend", "crm"]
    assert [s.active for s in listed] == [True, True, False]
    assert {f.name for f in dataclasses.fields(Source)} == {
        "id",
        "name",
        "write_key_prefix",
        "created_at",
        "revoked_at",
    }
    shown = repr(listed)
    for _, key in created:
        assert key not in shown
        assert hashlib.sha256(key.encode()).hexdigest() not in shown


async def test_stored_row_holds_the_sha256_and_never_the_key(
    sessions: Sessions, pg_schema: PgSchema
) -> None:
    source, key = await create_source(sessions, "web-app")

    async with pg_schema.engine.connect() as conn:
        row = (
            (await conn.execute(text("SELECT * FROM sources WHERE id = :id"), {"id": source.id}))
            .mappings()
            .one()
        )
    assert row["write_key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert row["write_key_prefix"] == key[:12]
    assert all(key not in str(value) for value in row.values())


async def test_revoke_is_idempotent_by_name_or_prefix(sessions: Sessions) -> None:
    source, key = await create_source(sessions, "web-app")

    first = await revoke_source(sessions, "web-app")
    again = await revoke_source(sessions, key[:12])

    assert first.revoked_at is not None
    assert again.revoked_at == first.revoked_at  # the first revocation's time is kept
    assert again.id == source.id
    with pytest.raises(SourceNotFound, match="'nope'"):
        await revoke_source(sessions, "nope")


async def test_revoke_by_an_ambiguous_prefix_is_refused(
    sessions: Sessions, pg_schema: PgSchema
) -> None:
    await create_source(sessions, "a")
    await create_source(sessions, "b")
    async with pg_schema.engine.begin() as conn:
        await conn.execute(text("UPDATE sources SET write_key_prefix = 'cg_live_same'"))

    with pytest.raises(AmbiguousSource, match="a, b"):
        await revoke_source(sessions, "cg_live_same")
    assert all(s.active for s in await list_sources(sessions))


# -- CLI -------------------------------------------------------------------------------


def invoke(pg_schema: PgSchema, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        keys,
        [*args, "--schema", pg_schema.schema],
        env={"CHURNGUARD_DATABASE_URL": pg_schema.url, "CHURNGUARD_ENV": "test"},
    )
    return result.exit_code, result.stdout, result.stderr


async def test_cli_create_list_revoke(pg_schema: PgSchema) -> None:
    # the CLI runs its own event loop (and migrates the schema), so it gets a thread
    def cli(*args: str) -> tuple[int, str, str]:
        return invoke(pg_schema, *args)

    code, out, _ = await asyncio.to_thread(cli, "create", "web-app")
    assert code == 0, out
    assert "will not be shown again" in out
    (key,) = KEY_RE.findall(out)

    sessions = session_factory(pg_schema.engine)
    auth = WriteKeyAuthenticator(sessions, cache_ttl_s=0)
    assert (await auth.authenticate(basic(key))).name == "web-app"

    code, out, err = await asyncio.to_thread(cli, "create", "web-app")
    assert code == 1
    assert "'web-app' already exists" in err

    code, out, _ = await asyncio.to_thread(cli, "list")
    assert code == 0
    assert "web-app" in out
    assert key[:12] in out
    assert key not in out
    assert hashlib.sha256(key.encode()).hexdigest() not in out

    code, out, _ = await asyncio.to_thread(cli, "revoke", key[:12])
    assert code == 0
    assert "Revoked source web-app" in out
    with pytest.raises(Unauthorized):
        await auth.authenticate(basic(key))
    code, _, _ = await asyncio.to_thread(cli, "revoke", "web-app")
    assert code == 0  # again: harmless

    code, _, err = await asyncio.to_thread(cli, "revoke", "nope")
    assert code == 1
    assert "no source with the name or key prefix 'nope'" in err
