"""churnguard.common.db: schema isolation and Alembic migrations per service schema."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, ProgrammingError

import churnguard.ingest
from churnguard.common.db import (
    _alembic_config,
    create_engine,
    ensure_schema,
    metadata_for,
    run_migrations,
    run_migrations_async,
    session_factory,
    validate_schema_name,
)
from tests.fixtures.postgres import PgSchema, PgServer

INGEST_MIGRATIONS = Path(churnguard.ingest.__file__).parent / "migrations"
INGEST_HEAD = "0002"
"""The latest revision of ingest's migrations."""


async def _tables(pg: PgSchema) -> set[str]:
    async with pg.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s"),
            {"s": pg.schema},
        )
        return {r[0] for r in rows}


async def _version(pg: PgSchema) -> str | None:
    async with pg.engine.connect() as conn:
        return (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()


@pytest.mark.parametrize("bad", ["Ingest", "in-gest", "1x", "pg_temp", "x; DROP", "a" * 64])
def test_schema_names_are_plain_identifiers(bad: str) -> None:
    with pytest.raises(ValueError, match="schema name"):
        validate_schema_name(bad)


def test_metadata_uses_the_naming_convention() -> None:
    assert metadata_for().schema is None
    assert metadata_for("ingest").schema == "ingest"
    assert metadata_for().naming_convention["pk"] == "pk_%(table_name)s"


async def test_blocking_run_migrations_refuses_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="run_migrations_async"):
        run_migrations("postgresql+asyncpg://x@127.0.0.1:1/x", "ingest", INGEST_MIGRATIONS)


@pytest.mark.integration
async def test_search_path_isolates_schemas(pg_schema: PgSchema, postgres_server: PgServer) -> None:
    other = f"t_{uuid.uuid4().hex[:8]}"
    engine_b = create_engine(postgres_server.url, schema=other, pool_size=1)
    await ensure_schema(engine_b, other)
    try:
        sessions_a = session_factory(pg_schema.engine)
        async with sessions_a() as session, session.begin():
            await session.execute(text("CREATE TABLE widgets (id int)"))
            await session.execute(text("INSERT INTO widgets VALUES (1)"))

        async with session_factory(engine_b)() as session:
            assert (await session.execute(text("SELECT to_regclass('widgets')"))).scalar() is None
            with pytest.raises(ProgrammingError, match="widgets"):
                await session.execute(text("SELECT * FROM widgets"))

        async with sessions_a() as session:
            assert (await session.execute(text("SELECT count(*) FROM widgets"))).scalar() == 1
            found = await session.execute(text("SELECT to_regclass('widgets')::text"))
            assert found.scalar() == "widgets"  # unqualified: it is on the search_path
            name = await session.execute(text("SELECT current_setting('application_name')"))
            assert name.scalar().startswith("test-")
    finally:
        async with engine_b.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA {other} CASCADE"))
        await engine_b.dispose()


@pytest.mark.integration
async def test_ingest_migrations_apply_once_into_the_schema(pg_schema: PgSchema) -> None:
    await run_migrations_async(pg_schema.url, pg_schema.schema, INGEST_MIGRATIONS)
    assert await _tables(pg_schema) == {"alembic_version", "sources", "user_accounts"}
    assert await _version(pg_schema) == INGEST_HEAD

    async with pg_schema.engine.begin() as conn:
        row = (
            await conn.execute(
                text(
                    "INSERT INTO sources (name, write_key_hash, write_key_prefix) "
                    "VALUES ('web', 'h1', 'cg_12345') RETURNING id, created_at, revoked_at"
                )
            )
        ).one()
    assert isinstance(row.id, uuid.UUID)
    assert row.created_at.tzinfo is not None
    assert row.revoked_at is None

    # a second upgrade is a no-op: nothing recreated, the row is still there
    await run_migrations_async(pg_schema.url, pg_schema.schema, INGEST_MIGRATIONS)
    assert await _version(pg_schema) == INGEST_HEAD
    async with pg_schema.engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM sources"))).scalar() == 1

    with pytest.raises(IntegrityError, match="uq_sources_write_key_hash"):
        async with pg_schema.engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO sources (name, write_key_hash) VALUES ('other', 'h1')")
            )


@pytest.mark.integration
async def test_version_table_lives_in_the_service_schema(pg_schema: PgSchema) -> None:
    await asyncio.to_thread(run_migrations, pg_schema.url, pg_schema.schema, INGEST_MIGRATIONS)
    async with pg_schema.engine.connect() as conn:
        where = await conn.execute(
            text(
                "SELECT table_schema FROM information_schema.tables "
                "WHERE table_name = 'alembic_version' AND table_schema = :s"
            ),
            {"s": pg_schema.schema},
        )
        assert where.scalar() == pg_schema.schema
        qualified = await conn.execute(
            text(f"SELECT version_num FROM {pg_schema.schema}.alembic_version")
        )
        assert qualified.scalar() == INGEST_HEAD


@pytest.mark.integration
async def test_env_opens_its_own_connection_without_one_handed_in(
    pg_schema: PgSchema,
) -> None:
    """The path the ``alembic`` command line takes (no shared connection)."""
    cfg = _alembic_config(INGEST_MIGRATIONS, pg_schema.schema, pg_schema.url)
    await asyncio.to_thread(command.upgrade, cfg, "head")
    assert await _version(pg_schema) == INGEST_HEAD
    await asyncio.to_thread(command.downgrade, cfg, "base")
    assert await _tables(pg_schema) == {"alembic_version"}
