"""One notify process, every channel, checked where a user would look: at the servers
(Slack's channel, the SMTP mailbox, Stripe's charges, the webhook receiver), in
``actions.outcomes``, the dead-letter topics and the delivery log."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import pytest_asyncio

from churnguard.common.topics import Topic
from churnguard.devstack.standins import block_kit_problems
from tests.notify.conftest import (
    ALERTS,
    INBOX_KEY,
    PAYMENT_VARIABLES,
    RISK_VARIABLES,
    NotifyEnv,
    first_outcome,
    notification,
    payment_retry,
    statuses,
)

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {INBOX_KEY}"}


async def eventually(condition: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout} s")
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def notify(notify_env: NotifyEnv) -> str:
    url, _ = await asyncio.to_thread(notify_env.start)
    return url


async def test_slack_alert_is_block_kit_and_waits_out_a_429(
    notify_env: NotifyEnv, notify: str
) -> None:
    slack = notify_env.slack
    slack.fail_next(1, status=429, retry_after=1)
    cmd = notification("slack", "risk_alert", ALERTS, RISK_VARIABLES, account="acct_slack")
    await notify_env.send(Topic.NOTIFICATIONS, cmd)

    await eventually(
        lambda: any(
            (m.get("metadata") or {}).get("event_payload", {}).get("action_id") == cmd.id
            for m in slack.messages
        ),
        what="the alert in Slack",
    )
    posts = [
        r
        for r in slack.requests
        if r["body"].get("metadata", {}).get("event_payload", {}).get("action_id") == cmd.id
    ]
    assert len(posts) == 2, "one 429, then one accepted post"
    assert posts[1]["at"] - posts[0]["at"] >= 1.0, "Retry-After: 1 was honoured"
    (message,) = [
        m for m in slack.in_channel(ALERTS) if m["metadata"]["event_payload"]["action_id"] == cmd.id
    ]
    assert block_kit_problems(message["blocks"]) == []
    assert 0 < len(message["blocks"]) <= 50
    shown = str(message["blocks"])
    for expected in (
        "Acme Corp",
        "$120,000",
        "72",
        "41",
        "Weekly active users fell 38%",
        RISK_VARIABLES["console_url"],
        "At risk",
    ):
        assert expected in shown
    assert "Acme Corp" in message["text"]

    events = await notify_env.outcomes(lambda ev: "delivered" in statuses(ev, cmd.id))
    assert statuses(events, cmd.id) == ["delivered"]
    attempts = await notify_env.query(
        "SELECT a.status, a.latency_ms FROM delivery_attempts a JOIN deliveries d "
        "ON d.id = a.delivery_id WHERE d.command_id = :id ORDER BY a.attempt",
        id=cmd.id,
    )
    assert [a.status for a in attempts] == ["transient", "delivered"]
    assert all(a.latency_ms is not None for a in attempts)


async def test_a_lost_answer_from_slack_is_looked_up_not_posted_again(
    notify_env: NotifyEnv, notify: str
) -> None:
    slack = notify_env.slack
    slack.drop_after_posting_next(1)
    cmd = notification("slack", "risk_alert", ALERTS, RISK_VARIABLES)
    await notify_env.send(Topic.NOTIFICATIONS, cmd)
    events = await notify_env.outcomes(lambda ev: statuses(ev, cmd.id))
    assert statuses(events, cmd.id) == ["delivered"]

    def posts() -> list[dict[str, Any]]:
        return [m for m in slack.messages if m["metadata"]["event_payload"]["action_id"] == cmd.id]

    assert len(posts()) == 1
    attempts = await notify_env.query(
        "SELECT a.status FROM delivery_attempts a JOIN deliveries d "
        "ON d.id = a.delivery_id WHERE d.command_id = :id ORDER BY a.attempt",
        id=cmd.id,
    )
    assert [a.status for a in attempts] == ["transient", "delivered"]


async def test_email_has_both_parts_and_the_headers(notify_env: NotifyEnv, notify: str) -> None:
    cmd = notification("email", "payment_failed", "sam@acme.test", PAYMENT_VARIABLES)
    await notify_env.send(Topic.NOTIFICATIONS, cmd)
    await eventually(lambda: notify_env.smtp.to("sam@acme.test"), what="the email")
    (msg,) = notify_env.smtp.to("sam@acme.test")
    assert msg["Subject"] == "Action needed: your payment of $49 did not go through"
    assert msg["From"] == "Acme Success <success@acme.test>"
    assert msg["X-Churnguard-Action-Id"] == cmd.id
    assert msg["Message-ID"].endswith("@churnguard.local>")
    assert msg["List-Unsubscribe"].startswith(f"<{notify}/v1/unsubscribe?token=")
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg.get_content_type() == "multipart/alternative"
    text_part = msg.get_body(preferencelist=("plain",))
    html_part = msg.get_body(preferencelist=("html",))
    assert text_part is not None
    assert html_part is not None
    assert "in_123" in text_part.get_content()
    assert "$49" in text_part.get_content()
    assert "https://billing.acme.test/update" in html_part.get_content()
    events = await notify_env.outcomes(lambda ev: "delivered" in statuses(ev, cmd.id))
    assert statuses(events, cmd.id) == ["delivered"]
    async with httpx.AsyncClient() as client:
        exported = (await client.get(f"{notify}/metrics")).text
    assert 'churnguard_notify_sends_total{channel="email",status="delivered"}' in exported
    assert 'churnguard_notify_send_seconds_count{channel="email"}' in exported


async def test_one_click_unsubscribe_suppresses_the_next_email(
    notify_env: NotifyEnv, notify: str
) -> None:
    first = notification("email", "payment_failed", "lee@acme.test", PAYMENT_VARIABLES)
    await notify_env.send(Topic.NOTIFICATIONS, first)
    await eventually(lambda: notify_env.smtp.to("lee@acme.test"), what="the first email")
    link = notify_env.smtp.to("lee@acme.test")[0]["List-Unsubscribe"].strip("<>")
    async with httpx.AsyncClient() as client:
        page = await client.get(link)
        assert page.status_code == 200
        assert "lee@acme.test" in page.text
        forged = await client.post(
            link.replace("token=", "token=x"), content="List-Unsubscribe=One-Click"
        )
        assert forged.status_code == 400
        done = await client.post(
            link,
            content="List-Unsubscribe=One-Click",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert done.status_code == 200
    second = notification("email", "payment_failed", "Lee@Acme.test", PAYMENT_VARIABLES)
    await notify_env.send(Topic.NOTIFICATIONS, second)
    events = await notify_env.outcomes(lambda ev: statuses(ev, second.id))
    assert statuses(events, second.id) == ["suppressed"]
    assert len(notify_env.smtp.to("lee@acme.test")) == 1


async def test_redelivered_and_replayed_commands_are_no_ops(
    notify_env: NotifyEnv, notify: str
) -> None:
    email = notification("email", "payment_failed", "dup@acme.test", PAYMENT_VARIABLES)
    slack = notification("slack", "risk_alert", "default", RISK_VARIABLES)
    # the same commands three times: alone, again, and inside an envelope
    await notify_env.send(Topic.NOTIFICATIONS, email, slack)
    await notify_env.send(Topic.NOTIFICATIONS, email, slack)
    await notify_env.send(Topic.NOTIFICATIONS, email, slack, envelope=True)
    marker = notification("email", "payment_failed", "after-dup@acme.test", PAYMENT_VARIABLES)
    await notify_env.send(Topic.NOTIFICATIONS, marker)
    await eventually(lambda: notify_env.smtp.to("after-dup@acme.test"), what="the marker email")
    events = await notify_env.outcomes(lambda ev: statuses(ev, slack.id) and statuses(ev, email.id))
    assert len(notify_env.smtp.to("dup@acme.test")) == 1
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
    assert statuses(events, email.id) == ["delivered"]
    assert statuses(events, slack.id) == ["delivered"]


async def test_stripe_gets_one_pay_call_per_idempotency_key(
    notify_env: NotifyEnv, notify: str
) -> None:
    stripe = notify_env.stripe
    ok = payment_retry("in_ok_1")
    declined = payment_retry("in_declined_1")
    stripe.decline("in_declined_1", "insufficient_funds")
    stripe.fail_next(1, status=500)  # the first call fails like Stripe's 500: retried
    await notify_env.send(Topic.PAYMENT_RETRIES, ok)
    await notify_env.send(Topic.PAYMENT_RETRIES, ok)  # redelivered
    await notify_env.send(Topic.PAYMENT_RETRIES, declined)
    events = await notify_env.outcomes(lambda ev: statuses(ev, ok.id) and statuses(ev, declined.id))
    assert statuses(events, ok.id) == ["payment_succeeded"]
    failed = first_outcome(events, declined.id)
    assert failed["data"]["status"] == "payment_failed"
    assert failed["data"]["decline_code"] == "insufficient_funds"
    assert stripe.charges[ok.id] == 1
    assert stripe.charges[declined.id] == 1
    assert stripe.invoice_charges["in_ok_1"] == 1


async def test_payment_waits_for_scheduled_for(notify_env: NotifyEnv, notify: str) -> None:
    due = datetime.now(UTC) + timedelta(seconds=2)
    later = payment_retry("in_later_1", scheduled_for=due)
    await notify_env.send(Topic.PAYMENT_RETRIES, later)
    events = await notify_env.outcomes(lambda ev: statuses(ev, later.id))
    assert statuses(events, later.id) == ["payment_succeeded"]
    (row,) = await notify_env.query(
        "SELECT min(a.started_at) AS at FROM delivery_attempts a JOIN deliveries d "
        "ON d.id = a.delivery_id WHERE d.command_id = :id",
        id=later.id,
    )
    assert row.at >= due


async def test_transient_failures_retry_then_dead_letter(
    notify_env: NotifyEnv, notify: str
) -> None:
    notify_env.smtp.fail_next(3, code=451)  # MAX_ATTEMPTS is 3 in these tests
    cmd = notification("email", "payment_failed", "flaky@acme.test", PAYMENT_VARIABLES)
    await notify_env.send(Topic.NOTIFICATIONS, cmd)
    events = await notify_env.outcomes(lambda ev: statuses(ev, cmd.id))
    outcome = first_outcome(events, cmd.id)
    assert outcome["data"]["status"] == "failed"
    assert "gave up after 3 attempts" in outcome["data"]["detail"]
    assert "451" in outcome["data"]["detail"]
    dead = await notify_env.dead_letters(
        Topic.NOTIFICATIONS, lambda rs: any(cmd.id.encode() in r.value for r in rs)
    )
    (letter,) = [r for r in dead if cmd.id.encode() in r.value]
    headers = dict(letter.headers)
    assert b"451" in headers["churnguard.dlq.reason"]
    assert (
        headers["churnguard.dlq.original-topic"]
        == Topic.NOTIFICATIONS.name_in(notify_env.prefix).encode()
    )
    attempts = await notify_env.query(
        "SELECT a.status FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id "
        "WHERE d.command_id = :id ORDER BY a.attempt",
        id=cmd.id,
    )
    assert [a.status for a in attempts] == ["transient"] * 3
    assert not notify_env.smtp.to("flaky@acme.test")


async def test_permanent_failures_fail_at_once(notify_env: NotifyEnv, notify: str) -> None:
    bounce = notification("email", "payment_failed", "nobody@bounce.invalid", PAYMENT_VARIABLES)
    lost = notification("slack", "risk_alert", "C0NOSUCHCHANNEL", RISK_VARIABLES)
    missing = payment_retry("in_missing_1")
    await notify_env.send(Topic.NOTIFICATIONS, bounce, lost)
    await notify_env.send(Topic.PAYMENT_RETRIES, missing)
    events = await notify_env.outcomes(
        lambda ev: all(statuses(ev, c.id) for c in (bounce, lost, missing))
    )
    details = {e["data"]["action_id"]: e["data"]["detail"] for e in events}
    assert statuses(events, bounce.id) == ["failed"]
    assert "invalid address" in details[bounce.id]
    assert "550" in details[bounce.id]
    assert "channel_not_found" in details[lost.id]
    assert "resource_missing" in details[missing.id]
    for cmd in (bounce, lost, missing):
        (row,) = await notify_env.query(
            "SELECT attempts FROM deliveries WHERE command_id = :id", id=cmd.id
        )
        assert row.attempts == 1


async def test_bad_variables_fail_with_the_field_and_dead_letter(
    notify_env: NotifyEnv, notify: str
) -> None:
    bad = notification("slack", "risk_alert", ALERTS, {**RISK_VARIABLES, "health": 140})
    unknown = notification("email", "no_such_template", "x@acme.test", {})
    await notify_env.send(Topic.NOTIFICATIONS, bad, unknown)
    events = await notify_env.outcomes(lambda ev: statuses(ev, bad.id) and statuses(ev, unknown.id))
    details = {e["data"]["action_id"]: e["data"]["detail"] for e in events}
    assert "health" in details[bad.id]
    assert "less than or equal to 100" in details[bad.id]
    assert "unknown template 'no_such_template'" in details[unknown.id]
    await notify_env.dead_letters(
        Topic.NOTIFICATIONS,
        lambda rs: (
            {bad.id, unknown.id}
            <= {c for r in rs for c in (bad.id, unknown.id) if c.encode() in r.value}
        ),
    )


async def test_in_app_inbox_stream_read_and_dismiss(notify_env: NotifyEnv, notify: str) -> None:
    user = "u_inbox_1"
    async with httpx.AsyncClient(base_url=notify, headers=AUTH, timeout=30) as client:
        assert (
            await client.get(
                "/v1/inbox/messages",
                params={"user_id": user},
                headers={"Authorization": "Bearer nope"},
            )
        ).status_code == 401
        received: list[str] = []

        async def listen() -> None:
            async with client.stream("GET", "/v1/inbox/stream", params={"user_id": user}) as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        received.append(line[6:])
                        return

        listener = asyncio.create_task(listen())
        await asyncio.sleep(0.5)  # the stream is subscribed once its first bytes arrived
        cmd = notification(
            "in_app",
            "usage_drop_check_in",
            user,
            {
                "account_name": "Acme Corp",
                "help_url": "https://help.acme.test/dashboards",
                "features": ["dashboards"],
            },
        )
        await notify_env.send(Topic.NOTIFICATIONS, cmd)
        await asyncio.wait_for(listener, 20)
        assert cmd.id in received[0]
        assert "dashboards" in received[0]

        (message,) = (await client.get("/v1/inbox/messages", params={"user_id": user})).json()
        assert message["action_id"] == cmd.id
        assert message["read_at"] is None
        assert (await client.post(f"/v1/inbox/messages/{message['id']}/read")).status_code == 200
        assert (await client.post(f"/v1/inbox/messages/{message['id']}/read")).status_code == 200
        assert (await client.get("/v1/inbox/messages", params={"user_id": user})).json() == []
        assert (await client.post(f"/v1/inbox/messages/{message['id']}/dismiss")).status_code == 200
        all_messages = (
            await client.get("/v1/inbox/messages", params={"user_id": user, "unread": "false"})
        ).json()
        assert all_messages == []
    events = await notify_env.outcomes(lambda ev: "dismissed" in statuses(ev, cmd.id))
    assert statuses(events, cmd.id) == ["delivered", "read", "dismissed"]


async def test_inbox_stream_replays_what_a_reconnecting_client_missed(
    notify_env: NotifyEnv, notify: str
) -> None:
    user = "u_inbox_2"
    variables = {"account_name": "Acme", "help_url": "https://help.acme.test/x"}
    first = notification("in_app", "usage_drop_check_in", user, variables)
    second = notification("in_app", "usage_drop_check_in", user, variables)
    await notify_env.send(Topic.NOTIFICATIONS, first, second)
    await notify_env.outcomes(lambda ev: statuses(ev, first.id) and statuses(ev, second.id))
    async with httpx.AsyncClient(base_url=notify, headers=AUTH, timeout=30) as client:
        listed = (await client.get("/v1/inbox/messages", params={"user_id": user})).json()
        by_action = {m["action_id"]: m["id"] for m in listed}
        seen: list[str] = []
        async with client.stream(
            "GET",
            "/v1/inbox/stream",
            params={"user_id": user},
            headers={"Last-Event-ID": str(by_action[first.id])},
        ) as stream:
            async for line in stream.aiter_lines():
                if line.startswith("id: "):
                    seen.append(line[4:])
                    break
    assert seen == [str(by_action[second.id])]


async def test_csm_task_and_signed_webhook(notify_env: NotifyEnv, notify: str) -> None:
    task = notification("csm_task", "risk_alert", "csm_dana", RISK_VARIABLES, priority=5)
    hook = notification("webhook", "risk_alert", "crm", RISK_VARIABLES)
    await notify_env.send(Topic.NOTIFICATIONS, task, hook)
    events = await notify_env.outcomes(lambda ev: statuses(ev, task.id) and statuses(ev, hook.id))
    assert statuses(events, task.id) == ["delivered"]
    assert statuses(events, hook.id) == ["delivered"]
    async with httpx.AsyncClient(base_url=notify, headers=AUTH) as client:
        tasks = (await client.get("/v1/csm-tasks", params={"assignee": "csm_dana"})).json()
    assert [t["action_id"] for t in tasks] == [task.id]
    assert "Acme Corp" in tasks[0]["title"]
    (received,) = [r for r in notify_env.hooks.received if r["key"] == hook.id]
    assert received["name"] == "crm"
    assert received["payload"]["variables"]["arr"] == 12_000_000
    assert notify_env.hooks.bad_signatures == 0


async def test_the_templates_of_the_shipped_playbooks_reach_their_servers(
    notify_env: NotifyEnv, notify: str
) -> None:
    """Each of the templates playbooks' shipped playbooks use, on each of its channels,
    as the recipient sees it: the mailbox, the Slack channel, the inbox and task APIs, the
    billing system's webhook."""
    acct = "acct_playbooks"
    milestone = {
        "account_name": "Acme Corp",
        "milestone": "feature_uses.reports",
        "milestone_value": 1000,
        "contact_name": "Dana",
    }
    expansion = {
        "account_name": "Acme Corp",
        "expansion_reason": "seats_near_limit",
        "seats_utilisation": 0.96,
        "arr": 12_000_000,
        "currency": "usd",
        "console_url": "http://127.0.0.1:8090/accounts/acct_playbooks",
    }
    final = {"account_name": "Acme Corp", "invoice_id": "in_final", "final_state": "cancel"}
    commands = {
        "apology": notification(
            "email",
            "nps_apology",
            "pat@acme.test",
            {"account_name": "Acme Corp", "score": 2, "csm_name": "Ana"},
            account=acct,
        ),
        "milestone_email": notification(
            "email", "milestone_congratulations", "dana@acme.test", milestone, account=acct
        ),
        "final_notice": notification(
            "email",
            "dunning_final_notice",
            "billing@acme.test",
            {**final, "amount": 4900, "currency": "usd"},
            account=acct,
        ),
        "milestone_in_app": notification(
            "in_app", "milestone_congratulations", "u_dana", milestone, account=acct
        ),
        "expansion_slack": notification(
            "slack", "expansion_opportunity", ALERTS, expansion, account=acct
        ),
        "expansion_task": notification(
            "csm_task", "expansion_opportunity", "csm_eli", expansion, account=acct
        ),
        "renewal_task": notification(
            "csm_task",
            "renewal_prep",
            "csm_eli",
            {
                "account_name": "Acme Corp",
                "days_to_renewal": 90,
                "arr": 12_000_000,
                "health": 58,
                "tier": "watch",
                "console_url": "http://127.0.0.1:8090/accounts/acct_playbooks",
            },
            account=acct,
        ),
        "final_state": notification(
            "webhook",
            "dunning_final_state",
            "crm",
            {**final, "attempts": 4, "amount": 4900, "currency": "usd"},
            account=acct,
        ),
    }
    await notify_env.send(Topic.NOTIFICATIONS, *commands.values())
    ids = [c.id for c in commands.values()]
    events = await notify_env.outcomes(lambda ev: all(statuses(ev, i) for i in ids))
    assert {name: statuses(events, c.id) for name, c in commands.items()} == {
        name: ["delivered"] for name in commands
    }

    subjects = {
        "pat@acme.test": "We're sorry we let you down",
        "dana@acme.test": "Congratulations on your 1,000th report, Dana",
        "billing@acme.test": "Your subscription for Acme Corp has been cancelled",
    }
    says = {
        "pat@acme.test": "Ana, who looks after Acme Corp, will get in touch",
        "dana@acme.test": "Your team at Acme Corp has just reached its 1,000th report.",
        "billing@acme.test": "we have not been able to collect $49 for invoice in_final",
    }
    for address, subject in subjects.items():
        (msg,) = notify_env.smtp.to(address)
        assert msg["Subject"] == subject
        assert msg["List-Unsubscribe"].startswith(f"<{notify}/v1/unsubscribe?token=")
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        text_part = msg.get_body(preferencelist=("plain",))
        html_part = msg.get_body(preferencelist=("html",))
        assert text_part is not None
        assert html_part is not None
        assert says[address] in text_part.get_content()
        html = html_part.get_content()
        assert says[address] in re.sub(r"<[^>]+>", "", html)  # as a mail client shows it
        assert 'style="color:#6e7781">Unsubscribe</a>' in html  # the shared layout's footer

    (slack,) = [
        m
        for m in notify_env.slack.in_channel(ALERTS)
        if m["metadata"]["event_payload"]["action_id"] == commands["expansion_slack"].id
    ]
    assert block_kit_problems(slack["blocks"]) == []
    shown = str(slack["blocks"])
    for expected in ("Expansion opportunity: Acme Corp", "96% of its seats", "$120,000"):
        assert expected in shown

    async with httpx.AsyncClient(base_url=notify, headers=AUTH) as client:
        inbox = (await client.get("/v1/inbox/messages", params={"user_id": "u_dana"})).json()
        tasks = (await client.get("/v1/csm-tasks", params={"assignee": "csm_eli"})).json()
    assert [m["title"] for m in inbox] == ["Congratulations on your 1,000th report!"]
    assert {t["title"] for t in tasks} == {
        "Expansion opportunity: Acme Corp",
        "Prepare the renewal of Acme Corp: due in 90 days",
    }

    (hook,) = [r for r in notify_env.hooks.received if r["key"] == commands["final_state"].id]
    assert hook["payload"]["template"] == "dunning_final_state"
    assert hook["payload"]["account_id"] == acct
    assert hook["payload"]["variables"] == {
        "invoice_id": "in_final",
        "final_state": "cancel",
        "attempts": 4,
        "account_name": "Acme Corp",
        "amount": 4900,
        "currency": "usd",
    }
    assert notify_env.hooks.bad_signatures == 0
