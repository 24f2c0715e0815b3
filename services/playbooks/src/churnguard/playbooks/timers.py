"""The timer loop: delayed and deferred messages, dunning retries, schedules.

Timers are rows in PostgreSQL, so they survive any restart. The loop looks for due ones
every ``timer_interval_s`` and fires them account by account, in a transaction that takes
the account's lock, then its due timers (``FOR UPDATE SKIP LOCKED``: two replicas never
fire one twice), records everything the firings cause (commands into the outbox
included) and marks them fired, all or nothing. A crash before the commit leaves the
timers pending and they fire again with the same command ids; after the commit the
outbox owns the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from churnguard.common.logs import bind_event
from churnguard.playbooks import playbooks_metrics as pm
from churnguard.playbooks.commands import Command
from churnguard.playbooks.decisions import DecisionEngine, Result
from churnguard.playbooks.repository import PlaybooksRepository

log = logging.getLogger(__name__)

BATCH = 200


class TimerLoop:
    def __init__(
        self,
        engine: AsyncEngine,
        decisions: DecisionEngine,
        publish: Callable[[Sequence[Command]], Awaitable[None]],
        interval_s: float,
    ) -> None:
        self.engine = engine
        self.decisions = decisions
        self.publish = publish
        self.interval_s = interval_s
        self._stopping = asyncio.Event()
        self.fired = 0

    async def fire_due(self, now: datetime | None = None) -> int:
        """Fire the timers due at ``now`` (default: the wall clock); how many fired.

        One transaction per account: its lock, then its due timers (``SKIP LOCKED``), their
        effects, marked fired, one commit. Holding one account's lock at a time, the loop
        can wait for a consumer's batch but never be part of a lock cycle with it.
        """
        now = now or datetime.now(UTC)
        async with self.engine.connect() as conn:
            accounts = await PlaybooksRepository(conn).accounts_with_due_timers(now, BATCH)
        fired = 0
        for account_id in accounts:
            result = Result()
            async with self.engine.begin() as conn:
                repo = PlaybooksRepository(conn)
                await repo.lock(account_id)
                due = await repo.claim_due_timers(account_id, now)
                for timer in due:
                    with bind_event(f"timer-{timer['timer_id']}", account_id):
                        effects = await self.decisions.fire_timer(repo, timer, now)
                    result.commands += effects.commands
                    result.decisions += effects.decisions
                await repo.finish_timers([t["timer_id"] for t in due], datetime.now(UTC))
            fired_at = datetime.now(UTC)
            for timer in due:
                pm.TIMERS_FIRED.labels(timer["kind"]).inc()
                pm.TIMER_LAG.labels(timer["kind"]).observe(
                    max((fired_at - timer["due_at"]).total_seconds(), 0.0)
                )
            for d in result.decisions:
                pm.DECISIONS.labels(d.playbook, d.outcome, d.reason_class).inc()
            await self.publish(result.commands)
            fired += len(due)
        self.fired += fired
        return fired

    async def report(self) -> None:
        async with self.engine.connect() as conn:
            rows = await PlaybooksRepository(conn).pending_timers()
        now = datetime.now(UTC)
        oldest = 0.0
        for kind in ("message", "dunning_retry", "dunning_final", "schedule"):
            pm.TIMERS_PENDING.labels(kind).set(0)
        for row in rows:
            pm.TIMERS_PENDING.labels(row["kind"]).set(row["count"])
            oldest = max(oldest, (now - row["min"]).total_seconds())
        pm.TIMERS_OVERDUE_SECONDS.set(oldest)

    async def run(self) -> None:
        reported = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            fired = await self.fire_due()
            if loop.time() - reported > 5:
                await self.report()
                reported = loop.time()
            if not fired:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.interval_s)

    def stop(self) -> None:
        self._stopping.set()
