"""EmbeddedPostgres: start, query, stop; crash recovery; a taken port is named."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from churnguard.devstack.postgres import EmbeddedPostgres, find_pg_bin, pg_major_version
from churnguard.devstack.process import PortInUseError, free_port, port_is_free

ServerFactory = Callable[[Path], EmbeddedPostgres]


@pytest.fixture
def own_server() -> Iterator[ServerFactory]:
    """Servers of this test only (never the shared one), killed if the test leaves them."""
    started: list[EmbeddedPostgres] = []

    def make(data_root: Path) -> EmbeddedPostgres:
        server = EmbeddedPostgres(data_root, free_port())
        started.append(server)
        return server

    yield make
    for server in started:
        server.kill()


async def _fetchval(dsn: str, sql: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def test_binaries_are_found() -> None:
    bin_dir = find_pg_bin()
    assert (bin_dir / "initdb").is_file()
    assert pg_major_version(bin_dir) >= 15


@pytest.mark.integration
async def test_start_query_stop(own_server: ServerFactory, pg_data_root: Path) -> None:
    server = own_server(pg_data_root)
    server.start()
    assert server.alive()
    assert server.data_dir == pg_data_root / f"pg{server.major}"
    assert server.url == f"postgresql+asyncpg://postgres@127.0.0.1:{server.port}/postgres"

    version = await _fetchval(server.dsn, "SELECT version()")
    assert isinstance(version, str)
    assert version.startswith(f"PostgreSQL {server.major}.")
    assert await _fetchval(server.dsn, "SHOW max_connections") == "200"
    assert await _fetchval(server.dsn, "SHOW fsync") == "on"

    server.stop()
    assert not server.alive()
    assert port_is_free(server.host, server.port)
    assert not (server.data_dir / "postmaster.pid").exists()  # a clean shutdown


@pytest.mark.integration
async def test_committed_rows_survive_kill(own_server: ServerFactory, pg_data_root: Path) -> None:
    server = own_server(pg_data_root)
    server.start()
    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute("CREATE TABLE marks (n int)")
        await conn.execute("INSERT INTO marks VALUES (42)")
    finally:
        await conn.close()

    server.kill()
    assert not server.alive()
    # the dead server's postmaster.pid (which still says "ready") must not block a restart
    assert (server.data_dir / "postmaster.pid").exists()

    server.start()
    assert await _fetchval(server.dsn, "SELECT n FROM marks") == 42
    assert "not properly shut down" in server.log_path.read_text()  # recovery really ran
    server.stop()


def test_taken_port_is_named(pg_data_root: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = EmbeddedPostgres(pg_data_root, port)
        with pytest.raises(PortInUseError, match=rf"port {port}\b"):
            server.start()
    assert not server.alive()
    assert not pg_data_root.exists()  # checked before anything was written
