"""Notify: commands delivered per second per channel, against the local stand-ins.

One notify process (default settings: 4 workers per channel) on the embedded broker and
PostgreSQL; the Slack, SMTP and Stripe stand-ins run in this process's threads, as a
provider on the same machine would. Each run produces ``COMMANDS[channel]`` commands (one
per record, as playbooks write them) and ends when every one has its final outcome in
``actions.outcomes``; the counts at the servers are checked against it (one message, one
email, one charge per command). A rate is commands / (last outcome - first produce).

notify_<channel>_per_s: that rate, median of REPEATS runs.
notify_<channel>_cpu_us: CPU time (user + system) of the notify process per command:
unlike the rate it hardly depends on what else the machine runs.

:class:`NotifyRig` (stand-ins + a notify process on a given broker and PostgreSQL) and
:func:`deliver` are the pieces a whole-pipeline benchmark reuses.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.harness import merge, report
from churnguard.common.db import run_migrations_async
from churnguard.common.events.derived import (
    NotificationRequested,
    NotificationRequestedData,
    PaymentRetryRequested,
    PaymentRetryRequestedData,
)
from churnguard.common.kafka import ensure_topics
from churnguard.common.setup import installed_migrations
from churnguard.common.topics import Topic, planned_topics
from churnguard.devstack.postgres import EmbeddedPostgres
from churnguard.devstack.process import ManagedProcess, free_port, wait_until
from churnguard.devstack.stack import http_ready
from churnguard.devstack.standins import ServerThread, SlackStandIn, SmtpSink, StripeStandIn
from churnguard.devstack.tansu import TansuBroker

REPEATS = 3
REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"slack": 600, "email": 600, "in_app": 3000, "payment_retry": 600}
SLACK_TOKEN = "xoxb-bench"
STRIPE_KEY = "sk_test_bench"
CHANNEL = "C0BENCH"
VARIABLES: dict[str, dict[str, Any]] = {
    "slack": {
        "account_name": "Acme Corp",
        "arr": 12_000_000,
        "health": 41,
        "previous_health": 72,
        "tier": "at_risk",
        "reasons": [
            {
                "code": "usage_trend_down",
                "description": "Weekly active users fell 38%",
                "impact": 0.21,
            },
        ],
        "console_url": "http://127.0.0.1:8090/accounts/acct",
    },
    "email": {
        "account_name": "Acme Corp",
        "amount": 4900,
        "invoice_id": "in_1",
        "update_payment_url": "https://billing.test/update",
    },
    "in_app": {"account_name": "Acme", "help_url": "https://help.test", "features": ["alerts"]},
}
TEMPLATES = {"slack": "risk_alert", "email": "payment_failed", "in_app": "usage_drop_check_in"}


def command(channel: str, n: int, run: str) -> NotificationRequested | PaymentRetryRequested:
    now = datetime.now(UTC)
    account = f"acct_{n % 500}"
    if channel == "payment_retry":
        return PaymentRetryRequested(
            id=f"bench-{run}-{n}",
            source="/bench",
            time=now,
            subject=account,
            data=PaymentRetryRequestedData(
                invoice_id=f"in_{run}_{n}",
                attempt=1,
                amount=4900,
                currency="usd",
                decline_code="insufficient_funds",
                scheduled_for=now,
                playbook="bench",
                decision_id=f"d-{n}",
            ),
        )
    recipient = {"slack": CHANNEL, "email": f"user{n}@bench.test", "in_app": f"u_{n}"}[channel]
    return NotificationRequested(
        id=f"bench-{run}-{n}",
        source="/bench",
        time=now,
        subject=account,
        data=NotificationRequestedData(
            channel=channel,
            template=TEMPLATES[channel],
            recipient=recipient,  # type: ignore[arg-type]
            playbook="bench",
            decision_id=f"d-{n}",
            priority=0,
            variables=VARIABLES[channel],
        ),
    )


@dataclass
class NotifyRig:
    """Local Slack, SMTP and Stripe stand-ins and one notify process on them."""

    bootstrap: str
    pg_url: str
    home: Path
    prefix: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    slack: SlackStandIn = field(init=False)
    smtp: SmtpSink = field(init=False)
    stripe: StripeStandIn = field(init=False)
    process: ManagedProcess | None = field(default=None, init=False)
    _servers: list[ServerThread] = field(default_factory=list, init=False)

    def start(self) -> NotifyRig:
        self.slack = SlackStandIn(token=SLACK_TOKEN, channels={CHANNEL: "bench"})
        self.stripe = StripeStandIn(api_key=STRIPE_KEY)
        self.smtp = SmtpSink().start()
        slack_server = ServerThread(self.slack.app).start()
        stripe_server = ServerThread(self.stripe.app).start()
        self._servers = [slack_server, stripe_server]
        (location,) = [loc for schema, loc in installed_migrations() if schema == "notify"]
        asyncio.run(run_migrations_async(self.pg_url, "notify", location))
        port = free_port()
        env = (
            dict(os.environ)
            | {
                "CHURNGUARD_ENV": "dev",
                "CHURNGUARD_KAFKA_BOOTSTRAP": self.bootstrap,
                "CHURNGUARD_KAFKA_IDEMPOTENT_PRODUCER": "false",
                "CHURNGUARD_TOPIC_PREFIX": self.prefix,
                "CHURNGUARD_DATABASE_URL": self.pg_url,
                "CHURNGUARD_LOG_LEVEL": "WARNING",
                "CHURNGUARD_NOTIFY_PORT": str(port),
                "CHURNGUARD_NOTIFY_SLACK_BOT_TOKEN": SLACK_TOKEN,
                "CHURNGUARD_NOTIFY_SLACK_API_URL": slack_server.url + "/api/",
                "CHURNGUARD_NOTIFY_SMTP_HOST": "127.0.0.1",
                "CHURNGUARD_NOTIFY_SMTP_PORT": str(self.smtp.port),
                "CHURNGUARD_NOTIFY_SMTP_SECURITY": "none",
                "CHURNGUARD_NOTIFY_STRIPE_API_KEY": STRIPE_KEY,
                "CHURNGUARD_NOTIFY_STRIPE_API_BASE": stripe_server.url,
            }
            | self.extra_env
        )
        self.process = ManagedProcess(
            "notify", [sys.executable, "-m", "churnguard.notify"], self.home / "notify.log", env=env
        )
        self.process.start()
        url = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: http_ready(url + "/readyz"), timeout=90, what="notify", alive=self.process.alive
        )
        return self

    def delivered_at_servers(self, channel: str, run: str) -> int:
        prefix = f"bench-{run}-"
        if channel == "slack":
            return sum(
                1
                for m in self.slack.messages
                if m["metadata"]["event_payload"]["action_id"].startswith(prefix)
            )
        if channel == "email":
            return sum(
                1 for m in self.smtp.messages if str(m["X-Churnguard-Action-Id"]).startswith(prefix)
            )
        if channel == "payment_retry":
            return sum(n for key, n in self.stripe.charges.items() if key.startswith(prefix))
        return -1  # in_app: counted by its outcomes (the inbox row is written with them)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        for server in self._servers:
            server.stop()
        self.smtp.stop()


async def deliver(
    bootstrap: str, prefix: str, channel: str, count: int, run: str
) -> tuple[float, dict[str, int]]:
    """Produce ``count`` commands for ``channel``; seconds until every final outcome is on
    ``actions.outcomes``, and the outcome statuses seen."""
    topic = (Topic.PAYMENT_RETRIES if channel == "payment_retry" else Topic.NOTIFICATIONS).name_in(
        prefix
    )
    commands = [command(channel, n, run) for n in range(count)]
    outcomes = AIOKafkaConsumer(
        Topic.OUTCOMES.name_in(prefix),
        bootstrap_servers=bootstrap,
        auto_offset_reset="latest",
        enable_auto_commit=False,
    )
    await outcomes.start()
    await outcomes.seek_to_end()
    for tp in outcomes.assignment():
        await outcomes.position(tp)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    started = time.perf_counter()
    try:
        await asyncio.gather(
            *[
                await producer.send(topic, value=c.to_json(), key=c.subject.encode())
                for c in commands
            ]
        )
        ids = {c.id for c in commands}
        statuses: dict[str, int] = {}
        finished = 0
        async with asyncio.timeout(300):
            while finished < count:
                for batch in (await outcomes.getmany(timeout_ms=200)).values():
                    for record in batch:
                        for event in Topic.OUTCOMES.codec.decode(record.value):
                            if event.data.action_id in ids:
                                ids.discard(event.data.action_id)
                                finished += 1
                                statuses[event.data.status] = statuses.get(event.data.status, 0) + 1
        return time.perf_counter() - started, statuses
    finally:
        await producer.stop()
        await outcomes.stop()


def run() -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="cg-notify-bench-", dir=REPO / ".dev"))
    broker = TansuBroker(home / "kafka", free_port())
    pg = EmbeddedPostgres(home / "pg", free_port())
    rig: NotifyRig | None = None
    rates: dict[str, list[float]] = {c: [] for c in COMMANDS}
    cpu_us: dict[str, list[float]] = {c: [] for c in COMMANDS}
    try:
        broker.start()
        pg.start()
        asyncio.run(ensure_topics(broker.bootstrap, planned_topics()))
        rig = NotifyRig(broker.bootstrap, pg.url, home).start()
        assert rig.process is not None
        assert rig.process.pid is not None
        server = psutil.Process(rig.process.pid)
        asyncio.run(deliver(broker.bootstrap, "", "in_app", 50, "warmup"))
        for repeat in range(REPEATS):
            for channel, count in COMMANDS.items():
                run_id = f"{repeat}{channel}{uuid.uuid4().hex[:4]}"
                before = sum(server.cpu_times()[:2])
                elapsed, statuses = asyncio.run(
                    deliver(broker.bootstrap, "", channel, count, run_id)
                )
                used = sum(server.cpu_times()[:2]) - before
                good = {"delivered", "payment_succeeded"}
                if sum(n for s, n in statuses.items() if s in good) != count:
                    raise RuntimeError(
                        f"{channel}: outcomes {statuses}, expected {count} delivered"
                    )
                at_servers = rig.delivered_at_servers(channel, run_id)
                if at_servers not in (-1, count):
                    raise RuntimeError(
                        f"{channel}: {at_servers} at the server for {count} commands"
                    )
                rates[channel].append(count / elapsed)
                cpu_us[channel].append(used / count * 1e6)
    finally:
        if rig is not None:
            rig.stop()
        pg.stop()
        broker.stop()
        shutil.rmtree(home, ignore_errors=True)

    def fmt(values: list[float]) -> str:
        return ", ".join(f"{v:,.0f}" for v in values)

    med = {c: statistics.median(v) for c, v in rates.items()}
    cpu = {c: statistics.median(v) for c, v in cpu_us.items()}
    rows = []
    for channel in COMMANDS:
        rows.append((f"notify_{channel}_per_s", med[channel], fmt(rates[channel])))
        rows.append((f"notify_{channel}_cpu_us", cpu[channel], fmt(cpu_us[channel])))
    report(
        "notify (one process, 4 workers per channel, Tansu + PostgreSQL, local stand-ins; "
        "until every final outcome is on actions.outcomes)",
        rows,
        [
            (
                "in_app ÷ slack (provider round trip vs in-transaction delivery)",
                med["in_app"] / med["slack"],
            ),
            ("one core's capacity for Slack, 1e6 ÷ CPU us per command", 1e6 / cpu["slack"]),
        ],
    )
    figures: dict[str, float] = {}
    for channel in COMMANDS:
        figures[f"notify_{channel}_per_s"] = med[channel]
        figures[f"notify_{channel}_cpu_us"] = cpu[channel]
    return figures


if __name__ == "__main__":
    merge(run())
