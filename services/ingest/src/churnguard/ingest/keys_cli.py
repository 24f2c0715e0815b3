"""``churnguard keys``: create, list and revoke the write keys of ingest sources.

Registered on the main CLI with ``app.add_typer(keys, name="keys")``. Every command reads
``CHURNGUARD_DATABASE_URL`` (through :class:`PlatformSettings`), brings the ``ingest``
schema up to date (migrations already applied are skipped), and runs its work in one
transaction that commits when the command succeeds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from churnguard.common.db import create_engine, run_migrations, session_factory
from churnguard.common.settings import PlatformSettings
from churnguard.ingest.sources import (
    AmbiguousSource,
    Source,
    SourceExists,
    SourceNotFound,
    SourceRepository,
)

__all__ = ["keys"]

T = TypeVar("T")

INGEST_SCHEMA = "ingest"

keys = typer.Typer(
    help="Write keys of the sources that send events to ingest.", no_args_is_help=True
)

# Hidden: lets tests point the commands at a throwaway schema instead of ``ingest``.
SchemaOption = Annotated[str, typer.Option("--schema", hidden=True)]


def _migrations() -> Path:
    return Path(str(resources.files("churnguard.ingest") / "migrations"))


def _fail(message: str) -> NoReturn:
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code=1)


def _run(schema: str, work: Callable[[SourceRepository], Awaitable[T]]) -> T:
    """Migrate ``schema`` if needed, then run ``work`` in one committed transaction."""
    url = PlatformSettings().database_url.get_secret_value()

    async def in_transaction() -> T:
        engine = create_engine(url, schema=schema, pool_size=1, application_name="churnguard-keys")
        try:
            async with session_factory(engine)() as session, session.begin():
                return await work(SourceRepository(session))
        finally:
            await engine.dispose()

    try:
        # the same step churnguard.common.setup.migrate takes for ingest, for this schema only
        run_migrations(url, schema, _migrations())
        return asyncio.run(in_transaction())
    except (SourceExists, SourceNotFound, AmbiguousSource) as exc:
        _fail(str(exc))
    except (OSError, SQLAlchemyError) as exc:
        # the class and first line only: never the URL, which may carry a password
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        _fail(f"PostgreSQL failed ({type(exc).__name__}): {first_line}")


def _when(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


@keys.command()
def create(
    name: Annotated[str, typer.Argument(help="A unique name for the source, e.g. 'web-app'.")],
    schema: SchemaOption = INGEST_SCHEMA,
) -> None:
    """Create a source and print its write key (shown this once only)."""

    async def work(repository: SourceRepository) -> tuple[Source, str]:
        return await repository.create(name)

    source, plain_key = _run(schema, work)
    out = Console()
    out.print(f"Created source [bold]{escape(source.name)}[/bold].")
    out.print(
        "[yellow]Copy the write key now: it is not stored and will not be shown again.[/yellow]"
    )
    # no markup, highlighting or wrapping: the key must come out exactly, on one line
    out.print(plain_key, markup=False, highlight=False, soft_wrap=True)


@keys.command("list")
def list_sources(schema: SchemaOption = INGEST_SCHEMA) -> None:
    """List the sources: name, key prefix, created, revoked."""

    async def work(repository: SourceRepository) -> list[Source]:
        return await repository.list()

    sources = _run(schema, work)
    table = Table("name", "prefix", "created", "revoked", title="Sources")
    for source in sources:
        table.add_row(
            escape(source.name),
            escape(source.write_key_prefix or ""),
            _when(source.created_at),
            _when(source.revoked_at) or "-",
        )
    out = Console()
    if sources:
        out.print(table)
    else:
        out.print("No sources yet: create one with `churnguard keys create NAME`.")


@keys.command()
def revoke(
    name_or_prefix: Annotated[str, typer.Argument(help="The source's name or key prefix.")],
    schema: SchemaOption = INGEST_SCHEMA,
) -> None:
    """Revoke a source's write key (again is harmless); it stops working within seconds."""

    async def work(repository: SourceRepository) -> Source:
        return await repository.revoke(name_or_prefix)

    source = _run(schema, work)
    Console().print(
        f"Revoked source [bold]{escape(source.name)}[/bold] "
        f"(key {escape(source.write_key_prefix or '')}…) at {_when(source.revoked_at)}; "
        "ingest replicas refuse it once their key cache expires (5 s by default)."
    )
