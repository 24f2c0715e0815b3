"""Which account a Segment user belongs to, kept in PostgreSQL with a cache in front.

A Segment call without ``context.groupId`` finds its account from the user's earlier
calls: a ``group`` call, or any accepted call that named the account (the last one
wins). :class:`UserAccounts` is what every ingest worker knows of that, and
``user_accounts`` in ingest's schema is what all of them know, so a restarted worker, or
another one, resolves the same users.

The hot path never waits for the database:

* **Resolving** reads the cache only. A user the cache does not know (or has not
  confirmed for ``ttl_s``) resolves to nothing; the endpoint then asks PostgreSQL once
  for all such users of its request (:meth:`UserAccounts.load`) and maps the request
  again, so only requests that name unknown users pay a round trip, and a user who is
  known nowhere is looked up again on the next request (no negative caching: the user's
  ``group`` call may be on its way through another worker).
* **Learning** updates the cache at once and queues a write when the account is new for
  the user. A background task writes what is queued every ``flush_interval_s``, coalesced
  per user, in one statement. A request that carries a ``group`` call waits for that write
  (:meth:`UserAccounts.flush`) before its 2xx, so an acknowledged ``group`` call is
  durable; what other calls teach can be lost to a crash within ``flush_interval_s`` (a
  clean stop writes it), and is relearned from the user's next call that names an account.

Between workers the later learning wins (rows carry ``learned_at``, and an older write
does not replace a newer one); a worker trusts its cached answer for ``ttl_s`` after it
last learned or loaded it, so a move learned by another worker reaches it within that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from datetime import UTC, datetime

from sqlalchemy import DateTime, Text, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from churnguard.ingest.sources import Base

__all__ = ["AccountsUnavailable", "UserAccountRepository", "UserAccounts"]

log = logging.getLogger(__name__)

_WRITE_CHUNK = 5_000
"""Rows per upsert statement (three parameters a row; PostgreSQL allows 32,767)."""


class UserAccountRow(Base):
    """A row of ``user_accounts`` (see migration 0002)."""

    __tablename__ = "user_accounts"

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    account_id: Mapped[str] = mapped_column(Text)
    learned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AccountsUnavailable(RuntimeError):
    """PostgreSQL did not answer a read or write of ``user_accounts``: retry later (503)."""


class UserAccountRepository:
    """Queries on ``user_accounts``. It reads and writes; the caller's boundary commits."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def find(self, user_ids: Collection[str]) -> dict[str, str]:
        """The account of each of ``user_ids`` that has one."""
        if not user_ids:
            return {}
        statement = select(UserAccountRow.user_id, UserAccountRow.account_id).where(
            UserAccountRow.user_id.in_(list(user_ids))
        )
        return {user: account for user, account in await self._session.execute(statement)}

    async def save(self, learned: dict[str, tuple[str, datetime]]) -> None:
        """Upsert ``user -> (account, learned_at)``; a row learned later is kept as it is."""
        rows = [
            {"user_id": user, "account_id": account, "learned_at": at}
            for user, (account, at) in learned.items()
        ]
        for start in range(0, len(rows), _WRITE_CHUNK):
            statement = insert(UserAccountRow).values(rows[start : start + _WRITE_CHUNK])
            statement = statement.on_conflict_do_update(
                index_elements=[UserAccountRow.user_id],
                set_={
                    "account_id": statement.excluded.account_id,
                    "learned_at": statement.excluded.learned_at,
                },
                where=UserAccountRow.learned_at <= statement.excluded.learned_at,
            )
            await self._session.execute(statement)


class UserAccounts:
    """The user → account map of one worker: a bounded cache in front of PostgreSQL.

    See the module docstring for when it reads and writes, and what survives a crash.
    ``resolve`` and ``remember`` are synchronous and never touch the database; ``load``
    and ``flush`` do, and raise :class:`AccountsUnavailable` when it does not answer.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        ttl_s: float = 60.0,
        flush_interval_s: float = 0.5,
        max_users: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self.ttl_s = ttl_s
        self.flush_interval_s = flush_interval_s
        self.max_users = max_users
        self._clock = clock
        # user -> (account, trusted until); least recently learned first
        self._known: OrderedDict[str, tuple[str, float]] = OrderedDict()
        # user -> (account, learned at): learned, not yet written
        self._pending: dict[str, tuple[str, datetime]] = {}
        self._dirty = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._known)

    @property
    def pending(self) -> int:
        """Users learned and not yet written."""
        return len(self._pending)

    def resolve(self, user_id: str | None, anonymous_id: str | None = None) -> str | None:
        """The user's account if this worker knows it (an ``AccountResolver``)."""
        if not user_id:
            return None
        known = self._known.get(user_id)
        if known is None or known[1] < self._clock():
            return None
        return known[0]

    def remember(self, user_id: str, account_id: str) -> None:
        """``user_id`` was seen with ``account_id`` in an accepted event."""
        known = self._known.get(user_id)
        self._keep(user_id, account_id)
        if known is None or known[0] != account_id:
            self._pending[user_id] = (account_id, datetime.now(UTC))
            self._dirty.set()

    def _keep(self, user_id: str, account_id: str) -> None:
        known = self._known
        known[user_id] = (account_id, self._clock() + self.ttl_s)
        known.move_to_end(user_id)
        if len(known) > self.max_users:
            known.popitem(last=False)

    async def load(self, user_ids: Collection[str]) -> dict[str, str]:
        """Ask PostgreSQL for the accounts of ``user_ids``: those it or this worker knows.

        What it returns is for the caller's request now, whatever ``ttl_s``; the cache
        trusts it for ``ttl_s`` from now on.
        """
        try:
            async with self._sessions() as session, session.begin():
                found = await UserAccountRepository(session).find(user_ids)
        except (SQLAlchemyError, OSError) as exc:
            raise AccountsUnavailable(f"user accounts not readable: {exc!r}") from exc
        for user in user_ids:
            if user in self._pending:  # learned here and not written yet: newer than a row
                found[user] = self._pending[user][0]
        for user, account in found.items():
            self._keep(user, account)
        return found

    async def flush(self) -> None:
        """Write everything learned so far; returns once PostgreSQL holds it."""
        async with self._write_lock:  # one write at a time, in the order learned
            if not self._pending:
                return
            batch, self._pending = self._pending, {}
            try:
                async with self._sessions() as session, session.begin():
                    await UserAccountRepository(session).save(batch)
            except BaseException as exc:  # cancelled (a stop) included: nothing is dropped
                for user, value in batch.items():
                    self._pending.setdefault(user, value)  # unless learned again since
                self._dirty.set()
                if isinstance(exc, SQLAlchemyError | OSError):
                    raise AccountsUnavailable(f"user accounts not written: {exc!r}") from exc
                raise

    async def start(self) -> None:
        """Start writing what is learned in the background."""
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_continually(), name="user-accounts")

    async def stop(self) -> None:
        """Stop the background writer and write what is left (a clean stop loses nothing)."""
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        try:
            await self.flush()
        except AccountsUnavailable as exc:
            log.error("%s user accounts lost at stop: %s", len(self._pending), exc)

    async def _write_continually(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.flush_interval_s)  # what arrives meanwhile joins in
            self._dirty.clear()
            try:
                await self.flush()
            except AccountsUnavailable as exc:
                log.warning("%s, %s users wait for the next try", exc, len(self._pending))
