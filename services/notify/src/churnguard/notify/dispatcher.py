"""Delivery: per-channel lanes of workers, a scheduler over PostgreSQL, one attempt at a time.

The order of one attempt, and why each step is where it is:

1. **Lease** (intake or scheduler): ``deliveries.locked_by`` = this process. A slow Slack
   never holds up email: each channel has its own queue and workers.
2. **Claim before send**: one transaction marks the delivery ``sending`` and inserts the
   attempt row (status ``sending``), and commits, before the provider is called.
3. **Provider call**, with the provider's idempotency key where it has one.
4. **Record after send**: one transaction completes the attempt row (status, response,
   latency), finishes or reschedules the delivery, and writes the outcome (and a dead
   letter, if retries ran out) to the outbox. The outbox publisher then sends them to
   Kafka.

A crash between 3 and 4 leaves the delivery ``sending`` under a dead instance; the
scheduler of any live process (a restarted one within a second) marks it *in doubt* and
the channel decides (:meth:`Channel.resolve_in_doubt`): resend where the provider
deduplicates (Stripe, webhooks), look it up where it can (Slack with a bot token),
otherwise do not send again and report ``failed``.

Retries are rows, not sleeps: a transient failure sets ``due_at`` (exponential backoff
with jitter, at least ``Retry-After``) and releases the lease, so a restart or another
replica picks it up when due. Payment retries wait for ``scheduled_for`` the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from churnguard.common.events.derived import (
    NotificationRequested,
    OutcomeStatus,
    PaymentRetryRequested,
)
from churnguard.common.logs import bind_event
from churnguard.notify import metrics
from churnguard.notify.channels.base import (
    Channel,
    Deferred,
    DeliveryError,
    InDoubt,
    Job,
    PermanentError,
    Sent,
    Suppressed,
    TransientError,
)
from churnguard.notify.outcomes import dead_letter_row, for_command, outcome_row
from churnguard.notify.repository import DeliveryRepository, DeliveryRow
from churnguard.notify.settings import NotifySettings
from churnguard.notify.templates import TemplateError, validate

log = logging.getLogger(__name__)

Command = NotificationRequested | PaymentRetryRequested
_COMMAND: TypeAdapter[Command] = TypeAdapter(Command)
_RNG = random.Random()


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, so retries of
    many commands that failed together spread out but none comes back almost at once."""
    ceiling = min(max_s, base_s * 2 ** (attempt - 1))
    jitter = (rng or _RNG).uniform(0, ceiling / 2)
    return float(ceiling / 2 + jitter)


def lane_of(command: Command) -> str:
    return command.data.channel if isinstance(command, NotificationRequested) else "payment_retry"


class Lane:
    """One channel's queue and workers; higher priority first, then first come."""

    def __init__(self, channel: Channel, concurrency: int) -> None:
        self.channel = channel
        self.concurrency = concurrency
        self.queue: asyncio.PriorityQueue[tuple[int, int, int]] = asyncio.PriorityQueue()
        self.pending: set[int] = set()
        self._seq = itertools.count()

    def put(self, delivery_id: int, priority: int) -> None:
        if delivery_id in self.pending:
            return
        self.pending.add(delivery_id)
        self.queue.put_nowait((-priority, next(self._seq), delivery_id))
        metrics.QUEUED.labels(self.channel.lane).set(len(self.pending))


class Dispatcher:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        channels: dict[str, Channel],
        settings: NotifySettings,
        instance: int,
        wake_outbox: Callable[[], None],
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.instance = instance
        self.wake_outbox = wake_outbox
        self.lanes = {lane: Lane(ch, settings.concurrency) for lane, ch in channels.items()}
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self.fault = settings.fault_point

    # -- feeding --------------------------------------------------------------------------

    def submit(self, delivery_id: int, lane: str, priority: int) -> None:
        """Hand a delivery leased to this process to its lane's workers."""
        self.lanes[lane].put(delivery_id, priority)

    def wake(self) -> None:
        self._wake.set()

    def queued(self) -> int:
        return sum(len(lane.pending) for lane in self.lanes.values())

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self._worker(lane), name=f"notify-{lane.channel.lane}-{i}")
            for lane in self.lanes.values()
            for i in range(lane.concurrency)
        ]
        tasks.append(asyncio.create_task(self._schedule(), name="notify-scheduler"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a scheduler or worker that died takes the service down
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self, timeout_s: float) -> int:
        """Wait for the attempts in flight (after :meth:`run` was cancelled) to record their
        results; returns how many were still running at the timeout (and are cancelled:
        those are left in doubt for the next process)."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout_s)
        left = list(self._in_flight)
        for task in left:
            task.cancel()
        return len(left)

    async def _schedule(self) -> None:
        """Find what is due (retries, scheduled payments, leases of dead instances) and
        attempts interrupted by a crash, every ``poll_interval_s`` or when woken."""
        while True:
            room = max(0, 2000 - self.queued())
            async with self.sessions() as session, session.begin():
                repo = DeliveryRepository(session, self.instance)
                recovered = await repo.recover_in_doubt(self.settings.lease_s, 100)
                due = await repo.lease_due(self.settings.lease_s, room) if room else []
            for row in recovered:
                log.warning(
                    "attempt interrupted in a process that stopped; resolving",
                    extra={"delivery_id": row.id, "channel": row.channel},
                )
            for row in [*recovered, *due]:
                if row.channel in self.lanes:
                    self.submit(row.id, row.channel, row.priority)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval_s)

    async def _worker(self, lane: Lane) -> None:
        while True:
            _, _, delivery_id = await lane.queue.get()
            # an attempt is its own task, shielded: stopping the workers never cuts a
            # provider call off from its record (which would leave it in doubt)
            attempt = asyncio.create_task(self.attempt(lane.channel, delivery_id))
            self._in_flight.add(attempt)
            attempt.add_done_callback(self._in_flight.discard)
            try:
                await asyncio.shield(attempt)
            except Exception:
                # the row stays leased (queued or sending); the lease expiry or a restart
                # brings it back, in doubt if it was sending
                log.exception("delivery attempt crashed", extra={"delivery_id": delivery_id})
            finally:
                lane.pending.discard(delivery_id)
                metrics.QUEUED.labels(lane.channel.lane).set(len(lane.pending))

    # -- one attempt ----------------------------------------------------------------------

    async def attempt(self, channel: Channel, delivery_id: int) -> None:
        # one transaction loads the delivery, runs the local checks and, when it is to be
        # sent, marks it sending with its attempt row: claim before send
        async with self.sessions() as session, session.begin():
            repo = DeliveryRepository(session, self.instance)
            row = await repo.load(delivery_id)
            if row is None:
                return  # finished meanwhile, or leased by another live instance
            command = _COMMAND.validate_python(row.command)
            with bind_event(command.id, command.subject):
                claimed = None if row.in_doubt else await self._claim(channel, row, command, repo)
        with bind_event(command.id, command.subject):
            if row.in_doubt:
                await self._resolve(channel, row, command)
            elif claimed is not None:
                await self._send(channel, row, command, *claimed)

    async def _claim(
        self, channel: Channel, row: DeliveryRow, command: Command, repo: DeliveryRepository
    ) -> tuple[Job, int] | None:
        """Local checks, then ``sending`` + the attempt row; None if not to be sent now."""
        lane = channel.lane
        try:
            variables = (
                validate(command.data.template, command.data.channel, command.data.variables)
                if isinstance(command, NotificationRequested)
                else None
            )
        except TemplateError as exc:  # the catalogue changed between intake and now
            await self._finish(row, command, "failed", exc.reason, "permanent", repo)
            return None
        job = Job(row.id, command, variables, row.attempts + 1, row.last_started_at)
        try:
            gate = await channel.before_send(job)
        except DeliveryError as exc:
            await self._finish(row, command, "failed", exc.reason, "permanent", repo)
            return None
        if isinstance(gate, Suppressed):
            await self._finish(row, command, "suppressed", gate.reason, "suppressed", repo)
            return None
        if isinstance(gate, Deferred):
            metrics.DEFERRALS.labels(lane).inc()
            await repo.reschedule(row.id, gate.delay_s, "deferred: target rate limited")
            return None
        attempt = await repo.start_attempt(row.id, lane, self.settings.lease_s)
        return None if attempt is None else (job, attempt)

    async def _resolve(self, channel: Channel, row: DeliveryRow, command: Command) -> None:
        """An attempt interrupted during its provider call: ask the channel what to do."""
        lane = channel.lane
        variables = (
            validate(command.data.template, command.data.channel, command.data.variables)
            if isinstance(command, NotificationRequested)
            else None
        )
        job = Job(row.id, command, variables, row.attempts + 1, row.last_started_at)
        resolution = await channel.resolve_in_doubt(job)
        metrics.IN_DOUBT.labels(lane, resolution.value).inc()
        log.warning(
            "in-doubt attempt resolved: %s",
            resolution.value,
            extra={"channel": lane, "policy": channel.in_doubt_policy},
        )
        if resolution is InDoubt.DELIVERED:
            await self._finish(
                row, command, "delivered", "confirmed after an interrupted attempt", "delivered"
            )
        elif resolution is InDoubt.UNKNOWN:
            await self._finish(
                row,
                command,
                "failed",
                "in doubt: the process stopped during the provider call, whose result "
                "cannot be looked up; not sent again so that it is never sent twice",
                "in_doubt",
            )
        else:
            async with self.sessions() as session, session.begin():
                await DeliveryRepository(session, self.instance).clear_in_doubt(row.id)
            await self.attempt(channel, row.id)

    async def _send(
        self, channel: Channel, row: DeliveryRow, command: Command, job: Job, attempt: int
    ) -> None:
        lane = channel.lane
        started = time.perf_counter()
        result: Sent | DeliveryError
        try:
            result = await asyncio.wait_for(channel.send(job), self.settings.provider_timeout_s + 5)
        except DeliveryError as exc:
            result = exc
        except TimeoutError:
            result = TransientError(
                f"{lane}: no answer within {self.settings.provider_timeout_s} s", ambiguous=True
            )
        except Exception as exc:  # a bug or an unexpected library error: retry, then give up
            log.exception("unexpected error from %s", lane)
            result = TransientError(f"{lane}: {type(exc).__name__}: {exc}")
        latency = time.perf_counter() - started
        metrics.SEND_SECONDS.labels(lane).observe(latency)

        if self.fault == "after_provider_call":
            # test hook (CHURNGUARD_ENV=test only): die where a crash hurts most
            log.critical("fault injection: SIGKILL after the provider call")
            os.kill(os.getpid(), signal.SIGKILL)

        await self._record(row, command, attempt, result, latency * 1000)

    async def _record(
        self,
        row: DeliveryRow,
        command: Command,
        attempt: int,
        result: Sent | DeliveryError,
        latency_ms: float,
    ) -> None:
        lane = lane_of(command)
        async with self.sessions() as session, session.begin():
            repo = DeliveryRepository(session, self.instance)
            if isinstance(result, Sent):
                await repo.finish_sent(
                    row.id,
                    attempt,
                    result.status,
                    result.response,
                    latency_ms,
                    result.detail,
                    outcome_row(
                        for_command(command, result.status, result.detail, result.decline_code)
                    ),
                )
                final: str = result.status
            elif isinstance(result, PermanentError) or attempt >= self.settings.max_attempts:
                exhausted = not isinstance(result, PermanentError)
                detail = (
                    f"gave up after {attempt} attempts: {result.reason}"
                    if exhausted
                    else result.reason
                )
                await repo.finish_attempt(
                    row.id,
                    attempt,
                    "transient" if exhausted else "permanent",
                    result.response,
                    latency_ms,
                )
                await repo.finish(row.id, "failed", detail)
                rows = [outcome_row(for_command(command, "failed", detail))]
                if exhausted:
                    rows.append(
                        dead_letter_row(
                            command,
                            source_topic=row.source_topic,
                            partition=row.source_partition,
                            offset=row.source_offset,
                            reason=detail,
                            error="RetriesExhausted",
                        )
                    )
                    metrics.DEAD_LETTERS.labels(lane, "retries_exhausted").inc()
                await repo.add_outbox(rows)
                final = "failed"
            else:
                assert isinstance(result, TransientError)
                delay = backoff_s(
                    attempt, self.settings.backoff_base_s, self.settings.backoff_max_s
                )
                if result.retry_after_s is not None:
                    delay = max(delay, result.retry_after_s)
                await repo.finish_attempt(row.id, attempt, "transient", result.response, latency_ms)
                await repo.reschedule(
                    row.id,
                    delay,
                    f"retry {attempt + 1} in {delay:.1f} s: {result.reason}",
                    in_doubt=result.ambiguous,
                )
                metrics.RETRIES.labels(lane).inc()
                final = "retry"
        metrics.SENDS.labels(lane, final).inc()
        if final != "retry":
            metrics.DELIVERY_SECONDS.labels(lane).observe(
                (datetime.now(UTC) - command.time).total_seconds()
            )
            self.wake_outbox()
        log.info(
            "attempt %d: %s",
            attempt,
            final,
            extra={
                "channel": lane,
                "detail": getattr(result, "reason", None) or getattr(result, "detail", None),
            },
        )

    async def _finish(
        self,
        row: DeliveryRow,
        command: Command,
        status: OutcomeStatus,
        detail: str | None,
        attempt_status: str,
        repo: DeliveryRepository | None = None,
    ) -> None:
        """End a delivery without a provider call (suppressed, resolved in doubt, invalid)."""
        if repo is None:
            async with self.sessions() as session, session.begin():
                await self._finish(
                    row,
                    command,
                    status,
                    detail,
                    attempt_status,
                    DeliveryRepository(session, self.instance),
                )
            return
        lane = lane_of(command)
        await repo.record_local_attempt(row.id, lane, attempt_status, detail or "")
        await repo.finish(row.id, status, detail)
        await repo.add_outbox([outcome_row(for_command(command, status, detail))])
        metrics.SENDS.labels(lane, status).inc()
        self.wake_outbox()


def command_values(command: Command, **extra: Any) -> dict[str, Any]:
    """The columns of a new ``deliveries`` row for a command."""
    if isinstance(command, NotificationRequested):
        action, template, recipient, priority = (
            "notification",
            command.data.template,
            command.data.recipient,
            command.data.priority,
        )
    else:
        action, template, recipient, priority = (
            "payment_retry",
            None,
            command.data.invoice_id,
            0,
        )
    return {
        "command_id": command.id,
        "action": action,
        "channel": lane_of(command),
        "account_id": command.subject,
        "template": template,
        "recipient": recipient,
        "priority": priority,
        "command": command.model_dump(mode="json", by_alias=True, exclude_none=True),
        "command_time": command.time,
        # every row names every column: a multi-row INSERT needs the same keys in each
        "state": "queued",
        "status": None,
        "detail": None,
        "attempts": 0,
        "locked_by": None,
        "locked_until": None,
        "finished_at": None,
        "source_topic": None,
        "source_partition": None,
        "source_offset": None,
        **extra,
    }
