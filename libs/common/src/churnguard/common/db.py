"""PostgreSQL plumbing shared by every churnguard service.

Rules this module encodes:

* **One schema per service.** Each service connects with ``search_path`` set to its own
  schema (``ingest``, ``scoring``, ...) and owns the tables in it; no service reads another
  service's tables (data moves between services as Kafka events). Models are declared
  *unqualified* on a service's own metadata::

      class Base(DeclarativeBase):
          metadata = metadata_for()

  so the engine's ``search_path`` places them, which lets the tests run the same models
  and migrations inside a throwaway schema (``t_1a2b3c4d``).
* **The boundary commits, never a repository.** A request or message handler opens a
  session (``async with sessions() as session, session.begin(): ...``), passes it to the
  repositories it needs, and the transaction commits or rolls back once, at that boundary.
  Repositories only add, query and flush. That keeps "one message, one transaction", so a
  handler that fails halfway leaves nothing behind and the message can be retried.
* **Migrations are Alembic, one history per service**, in
  ``<service package>/migrations``. The env.py of every service is the same two lines::

      from churnguard.common.db import run_alembic_env
      run_alembic_env()

  and revision files take their schema from :func:`migration_schema`, so the same history
  upgrades the production schema and a test's throwaway schema. The version table
  (``alembic_version``) lives inside the service's schema, so services never share it.
  Services upgrade at startup with :func:`run_migrations_async` (or the blocking
  :func:`run_migrations`); no ``alembic.ini`` is needed.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from alembic import command, context
from alembic.config import Config
from sqlalchemy import Connection, MetaData, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.schema import CreateSchema

__all__ = [
    "NAMING_CONVENTION",
    "create_engine",
    "ensure_schema",
    "metadata_for",
    "migration_schema",
    "run_alembic_env",
    "run_migrations",
    "run_migrations_async",
    "session_factory",
    "validate_schema_name",
]

# Deterministic constraint names: Alembic can only drop or alter what it can name, and
# PostgreSQL's generated names differ between autogenerate and hand-written migrations.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Keys in alembic's Config.attributes that run_migrations and run_alembic_env share.
_ATTR_SCHEMA = "churnguard.schema"
_ATTR_URL = "churnguard.url"
_ATTR_CONNECTION = "connection"  # the name the Alembic cookbook uses for a shared connection

_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def validate_schema_name(schema: str) -> str:
    """Accept only plain lower-case identifiers.

    The schema ends up in ``search_path`` (a setting string, not a bound parameter), so an
    unquoted-safe name avoids both quoting surprises and injection.
    """
    if not _SCHEMA_RE.fullmatch(schema) or schema.startswith("pg_"):
        raise ValueError(
            f"schema name {schema!r} must match [a-z_][a-z0-9_]* (max 63) and not start with pg_"
        )
    return schema


def create_engine(
    url: str,
    *,
    schema: str,
    pool_size: int = 5,
    application_name: str = "churnguard",
    **kwargs: Any,
) -> AsyncEngine:
    """An asyncpg engine whose every connection works inside ``schema``.

    ``search_path`` and ``application_name`` go in asyncpg's startup packet
    (``server_settings``), so they hold for every pooled connection from its first
    statement, with no ``SET`` round trip, and survive ``RESET``-style pool cleanup.
    ``application_name`` makes ``pg_stat_activity`` show which service holds a connection.
    ``pool_pre_ping`` lets a service ride out a PostgreSQL restart instead of failing the
    first request after it with a dead pooled connection.
    """
    validate_schema_name(schema)
    connect_args: dict[str, Any] = dict(kwargs.pop("connect_args", {}))
    server_settings = dict(connect_args.get("server_settings", {}))
    server_settings.update({"search_path": schema, "application_name": application_name})
    connect_args["server_settings"] = server_settings
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(
        url,
        pool_size=pool_size,
        connect_args=connect_args,
        **kwargs,
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for request/message handlers.

    ``expire_on_commit=False``: after the boundary commits, handlers still read the objects
    they wrote (to build a response or an outgoing event) without an implicit lazy reload,
    which async SQLAlchemy cannot do.
    """
    return async_sessionmaker(engine, expire_on_commit=False)


def metadata_for(schema: str | None = None) -> MetaData:
    """MetaData for one service's models, with the shared naming convention.

    Leave ``schema`` as ``None`` (the normal case): tables stay unqualified and the
    engine's ``search_path`` puts them in the service's schema, so tests can run the same
    models in a throwaway schema. Pass a schema only to pin tables to it explicitly.
    """
    if schema is not None:
        validate_schema_name(schema)
    return MetaData(schema=schema, naming_convention=NAMING_CONVENTION)


async def ensure_schema(engine: AsyncEngine, schema: str) -> None:
    """``CREATE SCHEMA IF NOT EXISTS``, committed at once (a startup step, not a handler)."""
    validate_schema_name(schema)
    async with engine.begin() as conn:
        await conn.execute(CreateSchema(schema, if_not_exists=True))


# -- Alembic ---------------------------------------------------------------------------


def _alembic_config(script_location: Path, schema: str, url: str) -> Config:
    """A Config built in code, so services ship no ``alembic.ini``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    # silences alembic's notice about the legacy default separator; we set no path lists
    cfg.set_main_option("path_separator", "os")
    cfg.attributes[_ATTR_SCHEMA] = schema
    cfg.attributes[_ATTR_URL] = url
    return cfg


async def run_migrations_async(url: str, schema: str, script_location: Path) -> None:
    """``alembic upgrade head`` for one service's schema, from async code.

    Follows Alembic's cookbook for asyncio: one async connection, and the synchronous
    Alembic API runs on it through ``run_sync``. The whole upgrade is a single transaction
    (PostgreSQL has transactional DDL): it applies completely or not at all.
    """
    validate_schema_name(schema)
    cfg = _alembic_config(script_location, schema, url)
    engine = create_engine(url, schema=schema, pool_size=1, application_name="alembic")
    try:
        async with engine.begin() as conn:

            def upgrade(sync_conn: Connection) -> None:
                cfg.attributes[_ATTR_CONNECTION] = sync_conn
                command.upgrade(cfg, "head")

            await conn.run_sync(upgrade)
    finally:
        await engine.dispose()


def run_migrations(url: str, schema: str, script_location: Path) -> None:
    """Blocking ``alembic upgrade head`` (for CLIs and sync callers).

    It runs its own event loop, so async code must ``await run_migrations_async(...)`` or
    ``await asyncio.to_thread(run_migrations, ...)`` instead.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(run_migrations_async(url, schema, script_location))
        return
    raise RuntimeError(
        "run_migrations() blocks; from async code use await run_migrations_async(...)"
    )


def migration_schema() -> str:
    """The schema the running migration targets (call it inside a revision's upgrade)."""
    schema = context.config.attributes.get(_ATTR_SCHEMA)
    if not isinstance(schema, str):
        raise RuntimeError("no schema: migrations must run through churnguard.common.db")
    return schema


def _lock_and_create_schema(connection: Connection, schema: str) -> None:
    """Serialize concurrent upgrades of one schema (two replicas starting at once).

    The transaction-scoped advisory lock is released by the commit that ends the upgrade;
    the second replica then finds the schema at head and does nothing.
    """
    connection.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": schema})
    connection.execute(CreateSchema(schema, if_not_exists=True))


def run_alembic_env(target_metadata: MetaData | None = None) -> None:
    """The body of every service's ``migrations/env.py``.

    The schema and URL come from ``run_migrations`` (via ``Config.attributes``) or, for the
    ``alembic`` command line, from ``-x schema=... -x url=...``. With a connection handed in
    by :func:`run_migrations_async` the caller's transaction is used and the caller
    commits; otherwise this opens its own connection and commits once at the end.
    ``target_metadata`` is only needed for ``alembic revision --autogenerate``.
    """
    cfg = context.config
    x_args = context.get_x_argument(as_dictionary=True)
    schema = validate_schema_name(
        str(cfg.attributes.get(_ATTR_SCHEMA) or x_args.get("schema") or "")
    )
    cfg.attributes[_ATTR_SCHEMA] = schema  # migration_schema() reads it from here
    opts: dict[str, Any] = {
        "target_metadata": target_metadata,
        "version_table_schema": schema,
        "include_schemas": False,
    }

    if context.is_offline_mode():
        url = _env_url(cfg, x_args)
        context.configure(url=url, literal_binds=True, **opts)
        with context.begin_transaction():
            context.execute(CreateSchema(schema, if_not_exists=True))
            context.run_migrations()
        return

    def migrate(connection: Connection) -> None:
        _lock_and_create_schema(connection, schema)
        context.configure(connection=connection, **opts)
        with context.begin_transaction():
            context.run_migrations()

    shared = cfg.attributes.get(_ATTR_CONNECTION)
    if isinstance(shared, Connection):
        migrate(shared)
        return

    async def migrate_own_connection() -> None:
        engine = create_engine(
            _env_url(cfg, x_args), schema=schema, pool_size=1, application_name="alembic"
        )
        try:
            async with engine.begin() as conn:
                await conn.run_sync(migrate)
        finally:
            await engine.dispose()

    asyncio.run(migrate_own_connection())


def _env_url(cfg: Config, x_args: dict[str, str]) -> str:
    url = (
        cfg.attributes.get(_ATTR_URL) or x_args.get("url") or cfg.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise RuntimeError("no database URL: pass -x url=postgresql+asyncpg://...")
    return str(url)
