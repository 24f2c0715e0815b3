"""The playbooks service as a process, on a real broker and PostgreSQL.

* the shipped playbooks over a simulated stream: each fires where it should and nowhere
  else; held-out accounts are logged and never contacted;
* a burst of signals for one account: the cool-downs and the contact budget hold;
* a SIGKILL in the middle of a dunning schedule: every attempt exactly once;
* a bad edit of a running service's playbooks: refused with file, line and field, the
  last good set keeps deciding; a good edit is picked up; a bad record is dead-lettered.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer
from sqlalchemy import text

from churnguard.common.kafka import make_producer
from churnguard.common.topics import Topic
from churnguard.playbooks.commands import decision_id
from churnguard.playbooks.guardrails import in_holdout
from churnguard.playbooks.settings import SHIPPED_DIR
from tests.fixtures.kafka import KafkaBroker, read_topic
from tests.fixtures.postgres import PgSchema
from tests.fixtures.services import RunningService, ServiceFactory
from tests.playbooks import builders as b
from tests.playbooks.stream import build

pytestmark = pytest.mark.integration


class Kafka:
    """Produce events as their producers would (one per record, keyed by account)."""

    def __init__(self, kafka: KafkaBroker, prefix: str) -> None:
        self.kafka, self.prefix = kafka, prefix
        self.producer = make_producer(
            kafka.bootstrap, client_id="test", idempotent=kafka.idempotent
        )

    async def __aenter__(self) -> Kafka:
        await self.producer.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.producer.stop()

    async def send(self, topic: Topic, *events: Any) -> None:
        for event in events:
            await self.producer.send(
                topic.name_in(self.prefix), event.to_json(), key=event.subject.encode()
            )
        await self.producer.flush()

    async def send_raw(self, topic: Topic, value: bytes, key: bytes) -> None:
        await self.producer.send_and_wait(topic.name_in(self.prefix), value, key=key)


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not after {timeout:.0f} s: {what}")
        await asyncio.sleep(0.1)


async def count(pg: PgSchema, sql: str, **params: Any) -> int:
    async with pg.engine.connect() as conn:
        return int((await conn.execute(text(sql), params)).scalar_one())


async def rows(pg: PgSchema, sql: str, **params: Any) -> list[dict[str, Any]]:
    async with pg.engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(text(sql), params)).mappings()]


async def commands(kafka: KafkaBroker, prefix: str, topic: Topic, n: int) -> list[Any]:
    records = await read_topic(kafka.bootstrap, topic.name_in(prefix), n)
    return [e for r in records for e in topic.codec.decode(r.value)]


async def feed_profiles(k: Kafka, pg: PgSchema, events: list[tuple[Topic, Any]]) -> None:
    """The accounts' traits, revenue and scores, applied before any signal arrives (in
    production they precede signals by days; here the two loops would race)."""
    for topic, event in events:
        await k.send(topic, event)
    scores = sum(1 for t, _ in events if t is Topic.SCORES)
    await until(lambda: _scored(pg, scores), f"{scores} accounts scored in playbooks' profile")


async def _scored(pg: PgSchema, n: int) -> bool:
    return (
        await count(
            pg,
            "SELECT count(*) FROM accounts WHERE scored_at IS NOT NULL "
            "AND mrr IS NOT NULL AND name IS NOT NULL",
        )
        >= n
    )


def metric(service: RunningService, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(service.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_shipped_playbooks_over_a_simulated_stream(
    kafka: KafkaBroker, kafka_topics: str, pg_schema: PgSchema, start_playbooks: ServiceFactory
) -> None:
    service = start_playbooks()
    now = datetime.now(UTC)
    stream = build(now)
    async with Kafka(kafka, kafka_topics) as k:
        await feed_profiles(k, pg_schema, stream.profile)
        await k.send(Topic.SIGNALS, *stream.signals)
        await until(lambda: _decided(pg_schema, stream.decisions), f"{stream.decisions} decisions")
    notifications = await commands(kafka, kafka_topics, Topic.NOTIFICATIONS, len(stream.expected))
    got = {(c.subject, c.data.playbook, c.data.channel, c.data.recipient) for c in notifications}
    assert got == stream.expected
    assert len({c.id for c in notifications}) == len(notifications)
    guides = {
        c.subject: c.data.variables["features"][0]
        for c in notifications
        if c.data.template == "usage_drop_check_in"
    }
    assert guides == {
        a: f for a, f in stream.guides.items() if not in_holdout("onboarding-usage-drop", a, 10)
    }
    # every playbook of the issue fired somewhere in the stream
    assert {p for _, p, _, _ in got} == {
        "high-risk-enterprise",
        "onboarding-usage-drop",
        "detractor-nps",
        "renewal-risk-executive",
        "expansion-owner",
        "failed-payment-dunning",
        "milestone-congratulation",
        "renewal-prep",
    }

    held = await rows(pg_schema, "SELECT account_id, playbook, reason FROM decisions WHERE holdout")
    assert {(r["account_id"], r["playbook"]) for r in held} == stream.held_out
    assert stream.held_out  # the stream has held-out accounts, and none was contacted
    assert not {(a, p) for a, p, _, _ in got} & stream.held_out
    # the decision log goes out too: every decision that passed its conditions, once
    matched = await count(
        pg_schema, "SELECT count(*) FROM decisions WHERE outcome <> 'not_matched'"
    )
    logged = await commands(kafka, kafka_topics, Topic.DECISIONS, matched)
    assert len({e.id for e in logged}) == matched
    assert {(e.subject, e.data.playbook) for e in logged if e.data.reason == "holdout"} == (
        stream.held_out
    )

    # dunning: soft declines wait for their first retry, hard ones never get one
    pending = await rows(
        pg_schema,
        "SELECT account_id FROM timers WHERE kind = 'dunning_retry' "
        "AND fired_at IS NULL AND cancelled_at IS NULL",
    )
    assert {r["account_id"] for r in pending} == stream.soft_failures
    assert await count(pg_schema, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0

    # the decision log explains a silence, through the API
    quiet = next(
        s for s in stream.signals if s.type.endswith("renewal_at_risk") and s.data.window_days != 60
    )
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
        log = (await client.get(f"/accounts/{quiet.subject}/decisions")).json()
    (entry,) = log["decisions"]
    assert entry["outcome"] == "not_matched"
    assert entry["reason"].startswith("signal.window_days == 60")
    assert metric(service, "churnguard_playbooks_decisions_total", outcome="fired") >= len(
        {(a, p) for a, p, _, _ in stream.expected}
    )


async def _decided(pg: PgSchema, n: int) -> bool:
    return await count(pg, "SELECT count(*) FROM decisions") >= n


async def test_a_burst_for_one_account_respects_cooldown_and_budget(
    kafka: KafkaBroker, kafka_topics: str, pg_schema: PgSchema, start_playbooks: ServiceFactory
) -> None:
    start_playbooks()
    acct = next(
        f"acct_burst{i}"
        for i in range(1000)
        if not any(
            in_holdout(p, f"acct_burst{i}", 10)
            for p in (
                "high-risk-enterprise",
                "onboarding-usage-drop",
                "detractor-nps",
                "milestone-congratulation",
            )
        )
    )
    now = datetime.now(UTC) - timedelta(minutes=30)
    t = now - timedelta(hours=1)
    profile = [
        (
            Topic.USAGE,
            b.group(acct, t, name="Burst", plan="business", segment="enterprise", csm="U0CSMX"),
        ),
        (Topic.USAGE, b.identify(acct, t, "u_admin", "admin@burst.test", "admin")),
        (Topic.USAGE, b.identify(acct, t, "u_member", "member@burst.test", "member")),
        (Topic.REVENUE_MOVEMENTS, b.revenue(acct, t, 9000_00)),
        (
            Topic.SCORES,
            b.score(
                acct,
                t,
                tier="watch",
                unadopted=["api", "automations"],
                features={"tenure_days": 40, "days_to_renewal": 300},
            ),
        ),
    ]
    s = [now + timedelta(seconds=i) for i in range(20)]
    burst = [
        b.tier_crossed(acct, s[0], to="at_risk", n=1),
        b.usage_dropped(acct, s[1], n=1),
        b.usage_dropped(acct, s[2], n=2),
        b.milestone(acct, s[3], "feature_uses.reports", 1000),
        b.tier_crossed(acct, s[4], to="critical", frm="at_risk", n=2),
        b.detractor(acct, s[5], n=1),
        b.milestone(acct, s[6], "active_users", 25),
        b.usage_dropped(acct, s[7], n=3),
        b.detractor(acct, s[8], n=2),
        b.milestone(acct, s[9], "feature_uses.reports", 1000, n=2),  # the same milestone again
    ]
    async with Kafka(kafka, kafka_topics) as k:
        await feed_profiles(k, pg_schema, profile)
        await k.send(Topic.SIGNALS, *burst)
        await until(lambda: _decided(pg_schema, len(burst)), "the burst decided")
    log = await rows(
        pg_schema, "SELECT playbook, outcome, reason FROM decisions ORDER BY decided_at"
    )
    assert [(r["playbook"], r["outcome"], (r["reason"] or "").split(":")[0]) for r in log] == [
        ("high-risk-enterprise", "fired", ""),
        ("onboarding-usage-drop", "fired", ""),  # customer touch 1
        ("onboarding-usage-drop", "suppressed", "cooldown"),
        ("milestone-congratulation", "fired", ""),  # customer touch 2
        ("high-risk-enterprise", "suppressed", "cooldown"),
        ("detractor-nps", "fired", ""),  # CSM task (internal) + apology: customer touch 3
        ("milestone-congratulation", "suppressed", "budget"),  # a 4th touch in 7 days
        ("onboarding-usage-drop", "suppressed", "cooldown"),
        ("detractor-nps", "suppressed", "cooldown"),
        ("milestone-congratulation", "suppressed", "dedupe"),
    ]
    sent = await commands(kafka, kafka_topics, Topic.NOTIFICATIONS, 5)
    assert [(c.data.playbook, c.data.channel) for c in sent] == [
        ("high-risk-enterprise", "slack"),
        ("onboarding-usage-drop", "in_app"),
        ("milestone-congratulation", "in_app"),
        ("detractor-nps", "csm_task"),
        ("detractor-nps", "email"),
    ]
    customer = await count(
        pg_schema, "SELECT count(*) FROM contact_ledger WHERE audience = 'customer' AND NOT voided"
    )
    assert customer == 3


DUNNING_FAST = """\
name: fast-dunning
trigger:
  signal: payment_failed
actions:
  - type: dunning
    retry_schedule:
      default: [2s, 4s, 6s, 8s]
    max_attempts: 4
    window: 1m
    card_update:
      template: payment_failed
    final_state: downgrade
"""


async def test_a_killed_service_resumes_dunning_without_losing_or_repeating_an_attempt(
    kafka: KafkaBroker,
    kafka_topics: str,
    pg_schema: PgSchema,
    start_playbooks: ServiceFactory,
    tmp_path: Path,
) -> None:
    """The schedule's timers are in PostgreSQL; SIGKILL after the second retry went out."""
    folder = tmp_path / "playbooks"
    folder.mkdir()
    (folder / "dunning.yaml").write_text(DUNNING_FAST)
    service = start_playbooks(CHURNGUARD_PLAYBOOKS_DIR=str(folder))
    acct = "acct_dunned"
    retries_topic = Topic.PAYMENT_RETRIES.name_in(kafka_topics)
    consumer = AIOKafkaConsumer(
        retries_topic,
        bootstrap_servers=kafka.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen: dict[int, set[str]] = {}
    answered: set[str] = set()
    killed = False
    try:
        async with Kafka(kafka, kafka_topics) as k:
            await k.send(
                Topic.USAGE,
                b.identify(acct, datetime.now(UTC), "u_admin", "admin@dunned.test", "admin"),
            )
            await k.send(Topic.SIGNALS, b.payment_failed(acct, datetime.now(UTC)))

            async def notify_answers() -> bool:
                """What notify's payment adapter would do: charge each id once; declined."""
                nonlocal killed, service
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    for record in batch:
                        (retry,) = Topic.PAYMENT_RETRIES.codec.decode(record.value)
                        seen.setdefault(retry.data.attempt, set()).add(retry.id)
                        if retry.id in answered:
                            continue
                        answered.add(retry.id)
                        await k.send(
                            Topic.OUTCOMES,
                            b.outcome(
                                acct,
                                datetime.now(UTC),
                                retry.id,
                                "payment_failed",
                                "insufficient_funds",
                            ),
                        )
                if len(seen) == 2 and not killed:
                    # retry 2 is answered; retry 3 is a timer in PostgreSQL, due in seconds
                    pid = service.process.pid
                    assert pid is not None
                    os.kill(pid, signal.SIGKILL)
                    service.process.popen.wait(10)  # type: ignore[union-attr]
                    killed = True
                    service = start_playbooks(CHURNGUARD_PLAYBOOKS_DIR=str(folder))
                return (
                    await count(
                        pg_schema, "SELECT count(*) FROM dunning_cases WHERE status = 'downgrade'"
                    )
                    == 1
                )

            await until(notify_answers, "dunning concluded after four declined retries", 120)
    finally:
        await consumer.stop()
    assert killed
    case = decision_id(f"sig-{acct}-pay-in_1-0", "fast-dunning")
    assert seen == {n: {f"{case}.retry.{n}"} for n in (1, 2, 3, 4)}
    attempts = await rows(
        pg_schema, "SELECT attempt, scheduled_for, outcome FROM dunning_attempts ORDER BY attempt"
    )
    assert [(a["attempt"], a["outcome"]) for a in attempts] == [
        (n, "payment_failed") for n in (1, 2, 3, 4)
    ]
    assert [a["scheduled_for"] for a in attempts] == sorted(a["scheduled_for"] for a in attempts)
    final = await commands(kafka, kafka_topics, Topic.NOTIFICATIONS, 1)
    assert [(c.data.template, c.data.variables["final_state"]) for c in final] == [
        ("dunning_final_state", "downgrade")
    ]


async def test_a_bad_edit_is_refused_and_the_last_good_playbooks_keep_deciding(
    kafka: KafkaBroker,
    kafka_topics: str,
    pg_schema: PgSchema,
    start_playbooks: ServiceFactory,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "playbooks"
    shutil.copytree(SHIPPED_DIR, folder)
    service = start_playbooks(
        CHURNGUARD_PLAYBOOKS_DIR=str(folder), CHURNGUARD_PLAYBOOKS_RELOAD_INTERVAL_S="0.2"
    )
    milestone = folder / "milestone-congratulation.yaml"
    good = milestone.read_text()
    milestone.write_text(
        good.replace("template: milestone_congratulations", "template: milestone_congrats")
    )
    line = next(
        i for i, t in enumerate(milestone.read_text().splitlines(), 1) if "milestone_congrats" in t
    )

    def refused() -> bool:
        errors = httpx.get(service.url + "/playbooks", timeout=10).json()["last_reload_errors"]
        return errors == [
            f"{milestone}:{line}: actions[0].template: unknown template 'milestone_congrats' "
            "(did you mean 'milestone_congratulations'?)"
        ]

    async def refused_async() -> bool:
        return refused()

    await until(refused_async, "the bad edit refused")
    assert metric(service, "churnguard_playbooks_reload_errors_total") == 1
    acct = next(
        f"acct_edit{i}"
        for i in range(1000)
        if not in_holdout("milestone-congratulation", f"acct_edit{i}", 10)
    )
    async with Kafka(kafka, kafka_topics) as k:
        await k.send(Topic.USAGE, b.identify(acct, datetime.now(UTC), "u_admin", "a@edit.test"))
        await k.send_raw(
            Topic.SIGNALS, b'{"type": "churnguard.signals.milestone_reached"}', acct.encode()
        )
        await k.send(Topic.SIGNALS, b.milestone(acct, datetime.now(UTC), n=1))
        (first,) = await commands(kafka, kafka_topics, Topic.NOTIFICATIONS, 1)
        assert (first.data.template, first.data.channel) == ("milestone_congratulations", "in_app")

        # a good edit is picked up: the congratulation now goes by email
        milestone.write_text(good.replace("type: in_app", "type: email"))

        async def reloaded() -> bool:
            return metric(service, "churnguard_playbooks_reloads_total", result="ok") == 1

        await until(reloaded, "the good edit loaded")
        await k.send(Topic.SIGNALS, b.milestone(acct, datetime.now(UTC), "active_users", 25))
        second = (await commands(kafka, kafka_topics, Topic.NOTIFICATIONS, 2))[1]
        assert (second.data.channel, second.data.recipient) == ("email", "a@edit.test")

    (dead,) = await read_topic(kafka.bootstrap, Topic.SIGNALS.dead_letter_in(kafka_topics), 1)
    headers = dict(dead.headers)
    assert headers["churnguard.dlq.consumer"] == b"playbooks-decisions"
    assert b"events[0]" in headers["churnguard.dlq.reason"]
