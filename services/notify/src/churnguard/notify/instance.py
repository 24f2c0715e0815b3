"""This process's identity in PostgreSQL, and the inbox's live feed.

:class:`Instance` holds one dedicated asyncpg connection for the life of the process:

* on it, ``pg_advisory_lock(INSTANCE_LOCK_CLASS, key)``: the lock *is* the liveness of
  this process (see :mod:`churnguard.notify.repository`); if the connection is lost the
  process can no longer prove it is alive, so :meth:`watch` ends it (the supervisor or
  orchestrator restarts it) rather than risk a second sender taking over its work;
* ``LISTEN`` for new inbox messages, fanned out to the server-sent-event streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
from sqlalchemy.engine import make_url

from churnguard.notify.repository import INSTANCE_LOCK_CLASS

log = logging.getLogger(__name__)


def asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Instance:
    def __init__(self, url: str, schema: str, listen_channel: str) -> None:
        self.dsn = asyncpg_dsn(url)
        self.schema = schema
        self.listen_channel = listen_channel
        self.key = secrets.randbelow(2**31 - 2) + 1
        self.conn: asyncpg.Connection[Any] | None = None
        self._subscribers: set[Subscription] = set()

    async def start(self) -> None:
        self.conn = await asyncpg.connect(
            self.dsn,
            server_settings={
                "search_path": self.schema,
                "application_name": f"churnguard-notify-{self.key}",
            },
        )
        await self.conn.execute("SELECT pg_advisory_lock($1, $2)", INSTANCE_LOCK_CLASS, self.key)
        await self.conn.add_listener(self.listen_channel, self._on_notify)
        log.info("instance registered", extra={"instance": self.key})

    @property
    def alive(self) -> bool:
        return self.conn is not None and not self.conn.is_closed()

    async def watch(self, interval_s: float = 2.0) -> None:
        """Raise when the liveness connection is gone (the caller stops the service)."""
        while True:
            await asyncio.sleep(interval_s)
            if not self.alive:
                raise RuntimeError("lost the PostgreSQL connection that proves this instance alive")
            assert self.conn is not None
            try:
                await asyncio.wait_for(self.conn.fetchval("SELECT 1"), 10)
            except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
                raise RuntimeError(f"liveness connection failed: {exc}") from exc

    async def close(self) -> None:
        if self.conn is not None and not self.conn.is_closed():
            await self.conn.close()

    # -- inbox fan-out --------------------------------------------------------------------

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        for sub in list(self._subscribers):
            if sub.matches(message):
                # a stream that fell 10,000 messages behind misses some; its client
                # reconnects with Last-Event-ID and gets them from the table
                with contextlib.suppress(asyncio.QueueFull):
                    sub.queue.put_nowait(int(message["id"]))

    def subscribe(self, user_id: str | None, account_id: str | None) -> Subscription:
        sub = Subscription(user_id, account_id, self._subscribers.discard)
        self._subscribers.add(sub)
        return sub


class Subscription:
    """New inbox message ids for one user and/or account, until closed."""

    def __init__(
        self, user_id: str | None, account_id: str | None, remove: Callable[[Subscription], None]
    ) -> None:
        self.user_id = user_id
        self.account_id = account_id
        self.queue: asyncio.Queue[int] = asyncio.Queue(maxsize=10_000)
        self._remove = remove

    def matches(self, message: dict[str, Any]) -> bool:
        return (self.user_id is None or message.get("user_id") == self.user_id) and (
            self.account_id is None or message.get("account_id") == self.account_id
        )

    def close(self) -> None:
        self._remove(self)
