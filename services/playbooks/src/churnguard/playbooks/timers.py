"""The timer loop: delayed and deferred messages, dunning retries, schedules.

Timers are rows in PostgreSQL, so they survive any restart. The loop looks for due ones
every ``timer_interval_s``; each fires in its own transaction that locks the timer
(``FOR UPDATE SKIP LOCKED``: two replicas never fire one twice), takes the account's
lock, records everything the firing causes (commands into the outbox included) and
marks it fired, all or nothing. A crash before the commit leaves the timer pending and
it fires again with the same command ids; after the commit the outbox owns the rest.
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
        """Fire the timers due at ``now`` (default: the wall clock); how many fired."""
        now = now or datetime.now(UTC)
        async with self.engine.connect() as conn:
            due = await PlaybooksRepository(conn).due_timers(now, BATCH)
        fired = 0
        for item in due:
            async with self.engine.begin() as conn:
                repo = PlaybooksRepository(conn)
                timer = await repo.claim_timer(item["timer_id"])
                if timer is None:
                    continue  # another replica has it, or it was cancelled meanwhile
                with bind_event(f"timer-{timer['timer_id']}", timer["account_id"]):
                    result: Result = await self.decisions.fire_timer(repo, timer)
                await repo.finish_timer(timer["timer_id"], datetime.now(UTC))
            fired += 1
            kind = timer["kind"]
            pm.TIMERS_FIRED.labels(kind).inc()
            pm.TIMER_LAG.labels(kind).observe(
                max((datetime.now(UTC) - timer["due_at"]).total_seconds(), 0.0)
            )
            for d in result.decisions:
                pm.DECISIONS.labels(d.playbook, d.outcome, d.reason_class).inc()
            await self.publish(result.commands)
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
            if fired < BATCH:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.interval_s)

    def stop(self) -> None:
        self._stopping.set()
