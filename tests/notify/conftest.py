"""Notify against real servers: the test's broker, PostgreSQL, and local Slack, SMTP and
Stripe stand-ins that speak those protocols.

``notify_env`` (one per module: notify processes are slow to join a consumer group, so a
module's tests share topics, schema, servers and, where they can, one process) gives the
pieces; ``NotifyEnv.start(**env)`` runs a ``churnguard-notify`` process on them.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from churnguard.common.db import create_engine, ensure_schema, run_migrations_async
from churnguard.common.events.derived import (
    NotificationRequested,
    NotificationRequestedData,
    PaymentRetryRequested,
    PaymentRetryRequestedData,
)
from churnguard.common.kafka import ensure_topics
from churnguard.common.topics import Topic, planned_topics
from churnguard.devstack.process import ManagedProcess, free_port, wait_until
from churnguard.devstack.stack import http_ready
from churnguard.devstack.standins import ServerThread, SlackStandIn, SmtpSink, StripeStandIn
from churnguard.notify.signing import BadSignature, verify_webhook
from tests.fixtures.kafka import KafkaBroker
from tests.fixtures.postgres import PgServer
from tests.fixtures.services import service_env

SLACK_TOKEN = "xoxb-test-token"
STRIPE_KEY = "sk_test_standin"
INBOX_KEY = "test-inbox-key"
WEBHOOK_SECRET = "test-webhook-secret"
SMTP_USER, SMTP_PASSWORD = "notify", "smtp-password"
ALERTS = "C0CSALERTS"


class WebhookReceiver:
    """A billing system / integration endpoint that checks notify's signatures."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.app = web.Application()
        self.app.router.add_post("/{name}", self._receive)

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify_webhook(WEBHOOK_SECRET, request.headers.get("Churnguard-Signature"), body)
        except BadSignature:
            self.bad_signatures += 1
            return web.json_response({"error": "bad signature"}, status=400)
        payload = orjson.loads(body)
        self.received.append(
            {
                "name": request.match_info["name"],
                "key": request.headers.get("Idempotency-Key"),
                "payload": payload,
            }
        )
        if request.match_info["name"] == "billing":
            if payload["invoice_id"].startswith("in_decline"):
                return web.json_response(
                    {"status": "failed", "decline_code": "expired_card"}, status=402
                )
            return web.json_response({"status": "succeeded"})
        return web.json_response({"ok": True})


@dataclass
class NotifyEnv:
    kafka: KafkaBroker
    prefix: str
    pg_url: str
    schema: str
    engine: AsyncEngine
    slack: SlackStandIn
    smtp: SmtpSink
    stripe: StripeStandIn
    hooks: WebhookReceiver
    servers: dict[str, ServerThread]
    folder: Path
    processes: list[ManagedProcess] = field(default_factory=list)
    producer: AIOKafkaProducer | None = None

    def env(self, port: int, **extra: str) -> dict[str, str]:
        hooks = self.servers["hooks"].url
        own = {
            "CHURNGUARD_DATABASE_URL": self.pg_url,
            "CHURNGUARD_NOTIFY_DB_SCHEMA": self.schema,
            "CHURNGUARD_NOTIFY_PORT": str(port),
            "CHURNGUARD_NOTIFY_GROUP_ID": f"{self.prefix}notify",
            "CHURNGUARD_NOTIFY_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "CHURNGUARD_NOTIFY_INBOX_API_KEY": INBOX_KEY,
            "CHURNGUARD_NOTIFY_SLACK_BOT_TOKEN": SLACK_TOKEN,
            "CHURNGUARD_NOTIFY_SLACK_API_URL": self.servers["slack"].url + "/api/",
            "CHURNGUARD_NOTIFY_SLACK_DEFAULT_CHANNEL": ALERTS,
            "CHURNGUARD_NOTIFY_SMTP_HOST": "127.0.0.1",
            "CHURNGUARD_NOTIFY_SMTP_PORT": str(self.smtp.port),
            "CHURNGUARD_NOTIFY_SMTP_SECURITY": "none",
            "CHURNGUARD_NOTIFY_SMTP_USERNAME": SMTP_USER,
            "CHURNGUARD_NOTIFY_SMTP_PASSWORD": SMTP_PASSWORD,
            "CHURNGUARD_NOTIFY_SMTP_FROM": "Acme Success <success@acme.test>",
            "CHURNGUARD_NOTIFY_STRIPE_API_KEY": STRIPE_KEY,
            "CHURNGUARD_NOTIFY_STRIPE_API_BASE": self.servers["stripe"].url,
            "CHURNGUARD_NOTIFY_WEBHOOK_URLS": f"crm={hooks}/crm",
            "CHURNGUARD_NOTIFY_WEBHOOK_SIGNING_SECRET": WEBHOOK_SECRET,
            "CHURNGUARD_NOTIFY_BACKOFF_BASE_S": "0.2",
            "CHURNGUARD_NOTIFY_BACKOFF_MAX_S": "1",
            "CHURNGUARD_NOTIFY_MAX_ATTEMPTS": "3",
            "CHURNGUARD_NOTIFY_POLL_INTERVAL_S": "0.1",
            "CHURNGUARD_LOG_LEVEL": "INFO",
        }
        return service_env(self.kafka, self.prefix, **(own | extra))

    def start(self, *, wait: bool = True, **extra: str) -> tuple[str, ManagedProcess]:
        port = free_port()
        proc = ManagedProcess(
            name="notify",
            argv=[sys.executable, "-m", "churnguard.notify"],
            log_path=self.folder / f"notify-{len(self.processes)}.log",
            env=self.env(port, **extra),
        )
        proc.start()
        self.processes.append(proc)
        url = f"http://127.0.0.1:{port}"
        if wait:
            try:
                wait_until(
                    lambda: http_ready(url + "/readyz"),
                    timeout=60,
                    interval=0.1,
                    what="notify",
                    alive=proc.alive,
                )
            except Exception:
                raise RuntimeError(f"notify did not start:\n{proc.log_tail()}") from None
        return url, proc

    async def send(self, topic: Topic, *events: Any, envelope: bool = False) -> None:
        assert self.producer is not None
        name = topic.name_in(self.prefix)
        if envelope:
            value = b"[" + b",".join(e.to_json() for e in events) + b"]"
            await self.producer.send_and_wait(name, value=value, key=events[0].subject.encode())
            return
        for e in events:
            await self.producer.send_and_wait(name, value=e.to_json(), key=e.subject.encode())

    async def outcomes(self, until: Any, timeout: float = 30) -> list[dict[str, Any]]:
        """Every outcome event so far, read until ``until(events)`` holds."""
        return await read_until(
            self.kafka.bootstrap, Topic.OUTCOMES.name_in(self.prefix), until, timeout
        )

    async def dead_letters(self, topic: Topic, until: Any, timeout: float = 30) -> list[Any]:
        return await read_records_until(
            self.kafka.bootstrap, topic.dead_letter_in(self.prefix), until, timeout
        )

    async def query(self, sql: str, **params: Any) -> list[Any]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(text(sql), params)).all())


async def read_records_until(bootstrap: str, topic: str, until: Any, timeout: float) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            while not until(records):
                for batch in (await consumer.getmany(timeout_ms=100)).values():
                    records.extend(batch)
    except TimeoutError:
        raise AssertionError(f"{topic}: condition not met; {len(records)} records") from None
    finally:
        await consumer.stop()
    return records


async def read_until(
    bootstrap: str, topic: str, until: Any, timeout: float
) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []

    def done(records: list[Any]) -> bool:
        events.clear()
        for r in records:
            for e in Topic.OUTCOMES.codec.decode(r.value):
                events.append(e.model_dump(mode="json"))
        return bool(until(events))

    await read_records_until(bootstrap, topic, done, timeout)
    return events


def statuses(events: list[dict[str, Any]], action_id: str) -> list[str]:
    """The statuses of one command's outcomes, as a consumer sees them: by outcome id.

    Outcomes are published at least once (a process killed between Kafka's ack and
    marking its outbox row repeats the record), with deterministic ids, so a consumer
    drops a repeated id; a second *id* for the same status would be a real duplicate.
    """
    seen: dict[str, str] = {}
    for e in events:
        if e["data"]["action_id"] == action_id:
            seen.setdefault(e["id"], e["data"]["status"])
    return list(seen.values())


def first_outcome(events: list[dict[str, Any]], action_id: str) -> dict[str, Any]:
    """The first outcome event of a command (a repeat of the same record may follow)."""
    return next(e for e in events if e["data"]["action_id"] == action_id)


def notification(
    channel: str,
    template: str,
    recipient: str,
    variables: dict[str, Any],
    *,
    account: str = "acct_1",
    id: str | None = None,
    priority: int = 0,
) -> NotificationRequested:
    return NotificationRequested(
        id=id or f"cmd-{uuid.uuid4().hex[:12]}",
        source="/playbooks",
        time=datetime.now(UTC),
        subject=account,
        data=NotificationRequestedData(
            channel=channel,  # type: ignore[arg-type]
            template=template,
            recipient=recipient,
            playbook="test-playbook",
            decision_id=f"dec-{uuid.uuid4().hex[:8]}",
            priority=priority,
            variables=variables,
        ),
    )


def payment_retry(
    invoice: str,
    *,
    account: str = "acct_1",
    scheduled_for: datetime | None = None,
    id: str | None = None,
) -> PaymentRetryRequested:
    now = datetime.now(UTC)
    return PaymentRetryRequested(
        id=id or f"pay-{uuid.uuid4().hex[:12]}",
        source="/playbooks",
        time=now,
        subject=account,
        data=PaymentRetryRequestedData(
            invoice_id=invoice,
            attempt=1,
            amount=4900,
            currency="usd",
            decline_code="insufficient_funds",
            scheduled_for=scheduled_for or now,
            playbook="dunning",
            decision_id=f"dec-{uuid.uuid4().hex[:8]}",
        ),
    )


RISK_VARIABLES: dict[str, Any] = {
    "account_name": "Acme Corp",
    "arr": 12_000_000,
    "currency": "usd",
    "health": 41,
    "previous_health": 72,
    "tier": "at_risk",
    "previous_tier": "watch",
    "reasons": [
        {"code": "usage_trend_down", "description": "Weekly active users fell 38%", "impact": 0.21},
        {"code": "seats_unused", "description": "Only 9 of 40 seats used", "impact": 0.08},
    ],
    "console_url": "http://127.0.0.1:8090/accounts/acct_1",
    "owner": "Dana (CSM)",
}
PAYMENT_VARIABLES: dict[str, Any] = {
    "account_name": "Acme Corp",
    "contact_name": "Sam",
    "amount": 4900,
    "currency": "usd",
    "invoice_id": "in_123",
    "update_payment_url": "https://billing.acme.test/update",
}


@pytest.fixture(scope="module")
def notify_servers(
    kafka: KafkaBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Fresh servers per module and broker: counts at the servers are per test run."""
    folder = tmp_path_factory.mktemp("notify")
    slack = SlackStandIn(token=SLACK_TOKEN)
    stripe = StripeStandIn(api_key=STRIPE_KEY)
    hooks = WebhookReceiver()
    smtp = SmtpSink(username=SMTP_USER, password=SMTP_PASSWORD).start()
    servers = {
        "slack": ServerThread(slack.app).start(),
        "stripe": ServerThread(stripe.app).start(),
        "hooks": ServerThread(hooks.app).start(),
    }
    yield {
        "slack": slack,
        "stripe": stripe,
        "hooks": hooks,
        "smtp": smtp,
        "servers": servers,
        "folder": folder,
    }
    for server in servers.values():
        server.stop()
    smtp.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def notify_env(
    kafka: KafkaBroker, postgres_server: PgServer, notify_servers: dict[str, Any]
) -> AsyncIterator[NotifyEnv]:
    prefix = f"t{uuid.uuid4().hex[:8]}."
    await asyncio.wait_for(ensure_topics(kafka.bootstrap, planned_topics(prefix)), 60)
    schema = f"t_{uuid.uuid4().hex[:8]}"
    engine = create_engine(postgres_server.url, schema=schema, pool_size=2)
    await ensure_schema(engine, schema)
    await run_migrations_async(
        postgres_server.url, schema, Path(str(resources.files("churnguard.notify") / "migrations"))
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    env = NotifyEnv(
        kafka=kafka,
        prefix=prefix,
        pg_url=postgres_server.url,
        schema=schema,
        engine=engine,
        slack=notify_servers["slack"],
        smtp=notify_servers["smtp"],
        stripe=notify_servers["stripe"],
        hooks=notify_servers["hooks"],
        servers=notify_servers["servers"],
        folder=notify_servers["folder"],
        producer=producer,
    )
    yield env
    for proc in env.processes:
        proc.stop()
    await producer.stop()
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    await engine.dispose()
