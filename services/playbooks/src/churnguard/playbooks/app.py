"""The playbooks service: consumers, timers, outbox relay and reloader, behind a small API.

Start-up, in order: migrate the schema (advisory-locked, so replicas may start together);
load the playbooks (an invalid folder refuses to start, naming every error); start the
producer; send what a crashed predecessor left in the outbox; then the two consumer
loops, the timer loop and the reloader. Any of them failing stops the process (its
supervisor restarts it) rather than leaving a service that answers ``/healthz`` but has
stopped deciding.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from churnguard.common.db import create_engine, run_migrations_async
from churnguard.common.kafka import ConsumerLoop, DeadLetterBreaker, make_producer
from churnguard.playbooks.consumer import DECISION_TOPICS, STATE_TOPICS, Batch, RecordProcessor
from churnguard.playbooks.decisions import DecisionEngine
from churnguard.playbooks.facts import LiftRanking
from churnguard.playbooks.loader import load_dir
from churnguard.playbooks.outbox import OutboxRelay
from churnguard.playbooks.reloader import PlaybookReloader
from churnguard.playbooks.repository import PlaybooksRepository
from churnguard.playbooks.settings import PlaybooksSettings
from churnguard.playbooks.timers import TimerLoop

log = logging.getLogger(__name__)


def migrations_path() -> Path:
    return Path(str(resources.files("churnguard.playbooks") / "migrations"))


def create_app(settings: PlaybooksSettings | None = None) -> FastAPI:
    settings = settings or PlaybooksSettings()
    platform = settings.platform
    prefix = platform.topic_prefix
    tasks: dict[str, asyncio.Task[None]] = {}

    def supervise(name: str, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name=name)

        def done(t: asyncio.Task[None]) -> None:
            if t.cancelled() or app.state.stopping:
                return
            exc = t.exception()
            log.critical(
                "%s stopped%s; stopping the service so that it is restarted",
                name,
                f": {exc!r}" if exc else "",
                exc_info=exc,
            )
            app.state.failed = name
            os.kill(os.getpid(), signal.SIGTERM)

        task.add_done_callback(done)
        tasks[name] = task

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.stopping = False
        app.state.failed = None
        url = platform.database_url.get_secret_value()
        await run_migrations_async(url, settings.db_schema, migrations_path())
        playbooks = load_dir(settings.dir)  # PlaybookSetInvalid: refuse to start
        reloader = PlaybookReloader(settings.dir, playbooks, settings.reload_interval_s)
        engine = create_engine(
            url, schema=settings.db_schema, pool_size=8, application_name="churnguard-playbooks"
        )
        producer = make_producer(
            platform.kafka_bootstrap,
            client_id="churnguard-playbooks",
            idempotent=platform.kafka_idempotent_producer,
            linger_ms=1,
        )
        await producer.start()
        relay = OutboxRelay(engine, producer, prefix, settings.outbox_sweep_interval_s)
        decisions = DecisionEngine(settings, reloader.get, LiftRanking.load(settings.lift_path))
        loops = []
        batches = []
        for role, suffix, topics in (
            ("decisions", "", DECISION_TOPICS),
            ("state", "-state", STATE_TOPICS),
        ):
            processor = RecordProcessor(engine, decisions, prefix, role=role)
            batch = Batch(engine, relay)
            batches.append(batch)
            loops.append(
                ConsumerLoop(
                    name=f"playbooks{suffix or '-decisions'}",
                    bootstrap=platform.kafka_bootstrap,
                    topics=[t.name_in(prefix) for t in topics],
                    group_id=settings.group_id + suffix,
                    process=processor.processor(batch),
                    dead_letter_topic=lambda name: name + ".dlq",
                    producer=producer,
                    breaker=DeadLetterBreaker(
                        platform.dead_letter_max_ratio, platform.dead_letter_window
                    ),
                    before_commit=batch.commit,
                    consumer_options={"fetch_max_wait_ms": settings.fetch_max_wait_ms},
                    # a batch is one transaction: its size bounds the wait of a signal that
                    # arrives behind it, and 100 amortises the commit well enough
                    max_batch=100,
                )
            )
        timer_loop = TimerLoop(engine, decisions, relay.publish, settings.timer_interval_s)
        app.state.engine = engine
        app.state.producer = producer
        app.state.reloader = reloader
        app.state.loops = loops
        app.state.timers = timer_loop
        # what a crashed predecessor recorded but never sent goes first
        await relay.sweep(grace=timedelta(0))
        supervise("outbox relay", relay.run())
        for loop in loops:
            supervise(loop.name, loop.run())
        supervise("timers", timer_loop.run())
        supervise("reloader", reloader.run())
        log.info(
            "playbooks ready",
            extra={
                "playbooks": [p.name for p in playbooks.playbooks],
                "dir": str(settings.dir),
                "kafka": platform.kafka_bootstrap,
                "guarantee": "effects once per decision key; commands via the outbox, "
                "offsets committed after the commands are in Kafka",
                "port": settings.port,
            },
        )
        try:
            yield
        finally:
            app.state.stopping = True
            for loop in loops:
                loop.stop()
            timer_loop.stop()
            relay.stop()
            reloader.stop()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            for batch in batches:
                await batch.close()
            await producer.stop()
            await engine.dispose()

    app = FastAPI(
        title="churnguard playbooks",
        version="0.1.0",
        description="Decides what to do about each signal; every decision is logged.",
        lifespan=lifespan,
    )

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        """Ready when every loop runs, PostgreSQL answers and Kafka has given metadata."""
        problems = [name for name, task in tasks.items() if task.done()]
        try:
            async with app.state.engine.connect() as conn:
                await conn.execute(text("select 1"))
        except Exception as exc:
            problems.append(f"postgres: {type(exc).__name__}")
        for loop in getattr(app.state, "loops", []):
            if not loop.consumer.assignment():
                problems.append(f"{loop.name}: no partitions assigned yet")
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/playbooks")
    async def playbooks_in_force() -> dict[str, Any]:
        """The playbooks in force, and the errors of the last refused reload (if any)."""
        reloader: PlaybookReloader = app.state.reloader
        current = reloader.current
        return {
            "dir": current.directory,
            "fingerprint": current.fingerprint,
            "playbooks": [
                {
                    "name": p.name,
                    "version": p.version,
                    "source": p.source,
                    "enabled": p.spec.enabled,
                    "trigger": p.spec.trigger.model_dump(exclude_none=True),
                    "priority": p.spec.priority,
                    "holdout_percent": p.spec.holdout_percent,
                }
                for p in current.playbooks
            ],
            "last_reload_errors": reloader.last_errors,
        }

    @app.get("/accounts/{account_id}/decisions")
    async def account_decisions(account_id: str, limit: int = 100) -> dict[str, Any]:
        """The account's decision log, newest first: why each playbook fired or did not."""
        async with app.state.engine.connect() as conn:
            repo = PlaybooksRepository(conn)
            rows = await repo.decisions_of(account_id, min(max(limit, 1), 1000))
            actions = await repo.actions_of([r["decision_id"] for r in rows])
        by_decision: dict[str, list[dict[str, Any]]] = {}
        for a in actions:
            by_decision.setdefault(a["decision_id"], []).append(
                {
                    k: a[k]
                    for k in (
                        "action_index",
                        "channel",
                        "audience",
                        "status",
                        "reason",
                        "command_ids",
                        "due_at",
                        "delivery",
                    )
                }
            )
        return {
            "account_id": account_id,
            "decisions": [
                {
                    **{
                        k: r[k]
                        for k in (
                            "decision_id",
                            "signal_id",
                            "signal_type",
                            "playbook",
                            "playbook_version",
                            "decided_at",
                            "outcome",
                            "reason",
                            "holdout",
                            "detail",
                        )
                    },
                    "actions": by_decision.get(r["decision_id"], []),
                }
                for r in rows
            ],
        }

    return app
