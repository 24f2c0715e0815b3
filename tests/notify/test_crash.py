"""SIGKILL between the provider call and everything after it (the attempt's record, the
outcome, the offset), then a restart that replays the topic: nothing is sent twice.

The kill point is deterministic: ``CHURNGUARD_NOTIFY_FAULT=after_provider_call`` (honoured
only with CHURNGUARD_ENV=test) makes the process SIGKILL itself right after a provider
call returns, before its result is written. Each killed run uses its own consumer group
and the restarted process yet another, so it reads every command again from the start of
the topic: each is redelivered as well as in doubt. Counts are taken at the servers.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from churnguard.common.topics import Topic
from churnguard.devstack.process import wait_until
from tests.notify.conftest import (
    ALERTS,
    PAYMENT_VARIABLES,
    RISK_VARIABLES,
    NotifyEnv,
    first_outcome,
    notification,
    payment_retry,
    statuses,
)

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def own_processes(notify_env: NotifyEnv) -> Iterator[None]:
    """Each test's notify processes are its own: a process left running would claim the
    next test's commands (every group reads every command; the first claim wins)."""
    yield
    for proc in notify_env.processes:
        proc.stop()


async def killed_during(notify_env: NotifyEnv, topic: Topic, command: object) -> None:
    _, proc = await asyncio.to_thread(
        notify_env.start,
        CHURNGUARD_NOTIFY_FAULT="after_provider_call",
        CHURNGUARD_NOTIFY_GROUP_ID=f"crash-{uuid.uuid4().hex[:6]}",
    )
    await notify_env.send(topic, command)
    await asyncio.to_thread(
        wait_until, lambda: not proc.alive(), timeout=30, what="notify to kill itself"
    )
    assert proc.popen is not None
    assert proc.popen.returncode == -9, proc.log_tail()


async def test_sigkill_after_the_provider_call_sends_nothing_twice(notify_env: NotifyEnv) -> None:
    email = notification("email", "payment_failed", "crash@acme.test", PAYMENT_VARIABLES)
    slack = notification("slack", "risk_alert", ALERTS, RISK_VARIABLES)
    charge = payment_retry("in_crash_1")

    await killed_during(notify_env, Topic.NOTIFICATIONS, email)
    assert len(notify_env.smtp.to("crash@acme.test")) == 1
    await killed_during(notify_env, Topic.NOTIFICATIONS, slack)
    slack_copies = [
        m
        for m in notify_env.slack.messages
        if m["metadata"]["event_payload"]["action_id"] == slack.id
    ]
    assert len(slack_copies) == 1
    await killed_during(notify_env, Topic.PAYMENT_RETRIES, charge)
    assert notify_env.stripe.charges[charge.id] == 1
    # each killed process left its attempt "sending"; the next live process took the
    # earlier ones over at once (the dead one's advisory lock was gone with it)
    in_flight = await notify_env.query("SELECT command_id FROM deliveries WHERE state = 'sending'")
    assert [r.command_id for r in in_flight] == [charge.id]

    # restart: a new group replays both topics from the beginning
    await asyncio.to_thread(
        notify_env.start, CHURNGUARD_NOTIFY_GROUP_ID=f"after-{uuid.uuid4().hex[:6]}"
    )
    events = await notify_env.outcomes(
        lambda ev: all(statuses(ev, c.id) for c in (email, slack, charge))
    )
    # Slack was looked up (message metadata) and Stripe answered the repeated key with
    # the first result; SMTP cannot be asked, so the email is reported, not resent
    assert statuses(events, slack.id) == ["delivered"]
    assert statuses(events, charge.id) == ["payment_succeeded"]
    assert statuses(events, email.id) == ["failed"]
    email_outcome = first_outcome(events, email.id)
    assert "in doubt" in email_outcome["data"]["detail"]

    assert len(notify_env.smtp.to("crash@acme.test")) == 1
    assert (
        len(
            [
                m
                for m in notify_env.slack.messages
                if m["metadata"]["event_payload"]["action_id"] == slack.id
            ]
        )
        == 1
    )
    assert notify_env.stripe.charges[charge.id] == 1
    assert notify_env.stripe.calls[charge.id] == 2, "resent with the same key, replayed"
    attempts = await notify_env.query(
        "SELECT d.command_id, array_agg(a.status ORDER BY a.attempt) AS statuses "
        "FROM deliveries d JOIN delivery_attempts a ON a.delivery_id = d.id GROUP BY 1"
    )
    by_command = {r.command_id: r.statuses for r in attempts}
    assert by_command[email.id] == ["in_doubt", "in_doubt"]
    assert by_command[slack.id] == ["in_doubt", "delivered"]
    assert by_command[charge.id] == ["in_doubt", "payment_succeeded"]


async def test_sigterm_lets_the_call_in_flight_finish_and_record(notify_env: NotifyEnv) -> None:
    _, proc = await asyncio.to_thread(
        notify_env.start, CHURNGUARD_NOTIFY_GROUP_ID=f"stop-{uuid.uuid4().hex[:6]}"
    )
    notify_env.slack.slow_next(2.0)
    cmd = notification("slack", "risk_alert", ALERTS, RISK_VARIABLES)
    await notify_env.send(Topic.NOTIFICATIONS, cmd)
    await asyncio.to_thread(
        wait_until,
        lambda: any(
            r["body"].get("metadata", {}).get("event_payload", {}).get("action_id") == cmd.id
            for r in notify_env.slack.requests
        ),
        timeout=30,
        what="the post to reach Slack",
    )
    await asyncio.to_thread(proc.stop)  # SIGTERM while Slack takes 2 s to answer
    assert proc.popen is not None
    # uvicorn re-raises SIGTERM once it has shut down in order
    assert proc.popen.returncode in (0, -15), proc.log_tail()
    assert "Application shutdown complete" in proc.log_tail()
    (row,) = await notify_env.query(
        "SELECT state, status, in_doubt FROM deliveries WHERE command_id = :id", id=cmd.id
    )
    assert (row.state, row.status, row.in_doubt) == ("done", "delivered", False)
    events = await notify_env.outcomes(lambda ev: statuses(ev, cmd.id))
    assert statuses(events, cmd.id) == ["delivered"]


async def test_two_replicas_share_the_work_and_deliver_each_command_once(
    notify_env: NotifyEnv,
) -> None:
    group = f"pair-{uuid.uuid4().hex[:6]}"
    await asyncio.to_thread(notify_env.start, CHURNGUARD_NOTIFY_GROUP_ID=group)
    await asyncio.to_thread(notify_env.start, CHURNGUARD_NOTIFY_GROUP_ID=group)
    emails = [
        notification(
            "email", "payment_failed", f"pair{n}@acme.test", PAYMENT_VARIABLES, account=f"a{n}"
        )
        for n in range(20)
    ]
    alerts = [
        notification("slack", "risk_alert", ALERTS, RISK_VARIABLES, account=f"a{n}")
        for n in range(20)
    ]
    await notify_env.send(Topic.NOTIFICATIONS, *emails, *alerts)
    events = await notify_env.outcomes(lambda ev: all(statuses(ev, c.id) for c in emails + alerts))
    assert all(statuses(events, c.id) == ["delivered"] for c in emails + alerts)
    assert all(len(notify_env.smtp.to(f"pair{n}@acme.test")) == 1 for n in range(20))
    ids = {c.id for c in alerts}
    posted = [
        m["metadata"]["event_payload"]["action_id"]
        for m in notify_env.slack.messages
        if m["metadata"]["event_payload"]["action_id"] in ids
    ]
    assert sorted(posted) == sorted(ids)
    instances = await notify_env.query(
        "SELECT count(DISTINCT a.instance) AS n FROM delivery_attempts a "
        "JOIN deliveries d ON d.id = a.delivery_id WHERE d.command_id = ANY(:ids)",
        ids=[c.id for c in emails + alerts],
    )
    assert instances[0].n == 2, "both replicas delivered some"
