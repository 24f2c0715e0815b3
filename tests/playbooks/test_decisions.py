"""The decision engine on PostgreSQL: each guard rail, the decision log, and dunning."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from churnguard.common.topics import Topic
from churnguard.playbooks.commands import decision_id
from churnguard.playbooks.guardrails import in_holdout
from tests.playbooks import builders as b
from tests.playbooks.conftest import Harness, make_harness

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)  # a Monday, 14:00 UTC


def not_held_out(playbook: str, prefix: str) -> str:
    """An account id with this prefix that the playbook does not hold out."""
    return next(f"{prefix}{i}" for i in range(1000) if not in_holdout(playbook, f"{prefix}{i}", 10))


def held_out(playbook: str, prefix: str, percent: float) -> str:
    return next(
        f"{prefix}{i}" for i in range(10_000) if in_holdout(playbook, f"{prefix}{i}", percent)
    )


async def account(
    h: Harness,
    acct: str,
    *,
    at: datetime = T0,
    segment: str = "enterprise",
    csm: str | None = "U0CSMANA",
    owner: str | None = None,
    tenure: float = 400,
    mrr: int = 6000_00,
    tz: str | None = None,
    tier: str = "healthy",
    unadopted: list[str] | None = None,
    days_to_renewal: float = 200,
) -> None:
    traits: dict[str, Any] = {"name": f"{acct} Inc", "plan": "business", "segment": segment}
    if csm:
        traits["csm"] = csm
    if owner:
        traits["owner"] = owner
    if tz:
        traits["timezone"] = tz
    t = at - timedelta(hours=2)
    await h.feed(
        Topic.USAGE,
        b.group(acct, t, **traits),
        b.identify(acct, t, "u_admin", f"admin@{acct}.test", "admin"),
        b.identify(acct, t, "u_member", f"member@{acct}.test", "member"),
    )
    await h.feed(Topic.REVENUE_MOVEMENTS, b.revenue(acct, t, mrr))
    await h.feed(
        Topic.SCORES,
        b.score(
            acct,
            t,
            tier=tier,
            features={"tenure_days": tenure, "days_to_renewal": days_to_renewal, "mrr": mrr / 100},
            unadopted=unadopted,
        ),
    )


async def test_high_risk_enterprise_alerts_the_csm_with_reasons_and_a_link(
    harness: Harness,
) -> None:
    acct = not_held_out("high-risk-enterprise", "acct_ent")
    await account(harness, acct)
    result = await harness.signal(b.tier_crossed(acct, T0, to="critical"))
    assert [(d.playbook, d.outcome) for d in result.decisions] == [
        ("high-risk-enterprise", "fired")
    ]
    (command,) = await harness.commands(acct)
    assert command.type == "churnguard.actions.notification_requested"
    assert command.id == f"{decision_id(f'sig-{acct}-tier-0', 'high-risk-enterprise')}.0.0"
    data = command.data
    assert (data.channel, data.recipient, data.template) == ("slack", "U0CSMANA", "risk_alert")
    # exactly the variables notify's risk_alert takes: it refuses any other
    assert data.variables == {
        "account_name": f"{acct} Inc",
        "arr": 72_000_00,
        "currency": "usd",
        "health": 40,
        "previous_health": 70,
        "tier": "critical",
        "previous_tier": "watch",
        "reasons": [r.model_dump(mode="json") for r in b.REASONS],
        "console_url": f"http://127.0.0.1:8080/accounts/{acct}",
        "owner": "U0CSMANA",
    }
    assert data.priority == 80


async def test_it_stays_silent_where_it_should(harness: Harness) -> None:
    smb = not_held_out("high-risk-enterprise", "acct_smb")
    await account(harness, smb, segment="smb", mrr=300_00)
    improving = not_held_out("high-risk-enterprise", "acct_up")
    await account(harness, improving)
    result = await harness.signal(
        b.tier_crossed(smb, T0, to="critical"),
        b.tier_crossed(improving, T0, to="at_risk", frm="critical"),
    )
    assert {d.outcome for d in result.decisions} == {"not_matched"}
    assert await harness.commands() == []
    (log,) = await harness.decisions_of(smb)
    assert log["reason"].startswith("none of: segment == 'enterprise' (was 'smb')")
    assert log["detail"]["facts"]["arr_tier"] == "small"
    (log,) = await harness.decisions_of(improving)
    assert log["reason"] == "signal.worsened == True (was False)"


async def test_a_redelivered_signal_yields_nothing_new(harness: Harness) -> None:
    acct = not_held_out("high-risk-enterprise", "acct_redo")
    await account(harness, acct)
    signal = b.tier_crossed(acct, T0, to="critical")
    first = await harness.signal(signal)
    again = await harness.signal(signal)
    # the Slack alert and the decision's event for playbooks.decisions
    assert [c.topic for c in first.commands] == [Topic.NOTIFICATIONS, Topic.DECISIONS]
    assert again.commands == []
    assert again.decisions == []
    assert again.duplicates == 1
    assert len(await harness.rows("SELECT * FROM outbox")) == 2
    assert len(await harness.decisions_of(acct)) == 1
    (logged,) = await harness.commands(acct, Topic.DECISIONS)
    did = decision_id(signal.id, "high-risk-enterprise")
    assert (logged.id, logged.data.status, logged.data.commands) == (did, "fired", [f"{did}.0.0"])


async def test_cooldown_per_account_and_playbook(harness: Harness) -> None:
    acct = not_held_out("high-risk-enterprise", "acct_cool")
    await account(harness, acct)
    await harness.signal(
        b.tier_crossed(acct, T0, to="at_risk", n=1),
        b.tier_crossed(acct, T0 + timedelta(days=3), to="critical", frm="at_risk", n=2),
        b.tier_crossed(acct, T0 + timedelta(days=8), to="critical", frm="at_risk", n=3),
    )
    log = await harness.decisions_of(acct)
    assert [r["outcome"] for r in log] == ["fired", "suppressed", "fired"]
    assert log[1]["reason"].startswith("cooldown: fired at 2026-03-02T14:00:00+00:00, 7d cool-down")
    assert len(await harness.commands(acct)) == 2


async def test_customer_budget_across_playbooks_and_internal_apart(harness: Harness) -> None:
    acct = "acct_budget"
    await account(harness, acct, tenure=30, unadopted=["api"])
    playbooks = ["milestone-congratulation", "onboarding-usage-drop", "detractor-nps"]
    assert not any(in_holdout(p, acct, 10) for p in playbooks)
    t = T0
    await harness.signal(
        b.milestone(acct, t, "feature_uses.reports", 1000),
        b.usage_dropped(acct, t + timedelta(minutes=1)),
        b.milestone(acct, t + timedelta(minutes=2), "active_users", 25),
        b.detractor(acct, t + timedelta(minutes=3)),  # a CSM task (internal) and an email
        b.milestone(acct, t + timedelta(days=8), "active_users", 50),  # a week later: room again
    )
    log = await harness.decisions_of(acct)
    assert [(r["playbook"], r["outcome"]) for r in log] == [
        ("milestone-congratulation", "fired"),
        ("onboarding-usage-drop", "fired"),
        ("milestone-congratulation", "fired"),
        ("detractor-nps", "fired"),
        ("milestone-congratulation", "fired"),
    ]
    nps_actions = await harness.rows(
        "SELECT channel, status, reason FROM decision_actions WHERE decision_id = :d "
        "ORDER BY action_index",
        d=log[3]["decision_id"],
    )
    assert nps_actions[0]["status"] == "sent"  # CSM task: the internal budget is apart
    assert nps_actions[1]["status"] == "suppressed"
    assert nps_actions[1]["reason"] == "budget: 3 customer touches in 7d (limit 3)"
    channels = [c.data.channel for c in await harness.commands(acct)]
    assert channels == ["in_app", "in_app", "in_app", "csm_task", "in_app"]


async def test_holdout_accounts_are_logged_not_contacted(harness: Harness) -> None:
    acct = held_out("high-risk-enterprise", "acct_hold", 5)
    await account(harness, acct)
    await harness.signal(b.tier_crossed(acct, T0, to="critical"))
    (log,) = await harness.decisions_of(acct)
    assert (log["outcome"], log["holdout"]) == ("suppressed", True)
    assert log["reason"] == "holdout: in the 5% held out of high-risk-enterprise"
    actions = await harness.rows(
        "SELECT status FROM decision_actions WHERE decision_id = :d", d=log["decision_id"]
    )
    assert actions == [{"status": "held_out"}]
    assert await harness.commands(acct) == []
    (logged,) = await harness.commands(acct, Topic.DECISIONS)
    assert (logged.data.status, logged.data.reason, logged.data.holdout) == (
        "suppressed",
        "holdout",
        True,
    )


async def test_quiet_hours_defer_email_to_the_morning_in_the_accounts_zone(migrated: Any) -> None:
    h = make_harness(migrated, quiet_hours="20:00-08:00")
    acct = not_held_out("detractor-nps", "acct_quiet")
    await account(h, acct, tz="America/New_York")
    night = datetime(2026, 3, 3, 2, 0, tzinfo=UTC)  # 21:00 in New York
    await h.signal(b.detractor(acct, night))
    assert [c.data.channel for c in await h.commands(acct)] == ["csm_task"]  # Slack/tasks: now
    (log,) = await h.decisions_of(acct)
    assert log["outcome"] == "fired"
    email = (
        await h.rows(
            "SELECT * FROM decision_actions WHERE decision_id = :d AND action_index = 1",
            d=log["decision_id"],
        )
    )[0]
    morning = datetime(2026, 3, 3, 13, 0, tzinfo=UTC)  # 08:00 in New York
    assert (email["status"], email["due_at"]) == ("deferred", morning)
    assert await h.fire_until(morning - timedelta(seconds=1)) == 0
    assert await h.fire_until(morning) == 1
    commands = await h.commands(acct)
    assert [(c.data.channel, c.data.recipient) for c in commands] == [
        ("csm_task", "U0CSMANA"),
        ("email", f"member@{acct}.test"),
    ]
    assert commands[1].time == morning
    email = (
        await h.rows(
            "SELECT status FROM decision_actions WHERE decision_id = :d AND action_index = 1",
            d=log["decision_id"],
        )
    )[0]
    assert email["status"] == "sent"


async def test_dedupe_one_congratulation_per_milestone(harness: Harness) -> None:
    acct = not_held_out("milestone-congratulation", "acct_mile")
    await account(harness, acct)
    await harness.signal(
        b.milestone(acct, T0, "feature_uses.reports", 1000, n=1),
        b.milestone(acct, T0 + timedelta(hours=1), "feature_uses.reports", 1000, n=2),
    )
    outcomes = [(r["outcome"], r["reason"]) for r in await harness.decisions_of(acct)]
    assert outcomes == [
        ("fired", None),
        (
            "suppressed",
            "dedupe: already decided for signal.milestone='feature_uses.reports', "
            "signal.value=1000",
        ),
    ]


async def test_expansion_is_suppressed_while_dunning(harness: Harness) -> None:
    acct = not_held_out("expansion-owner", "acct_upsell")
    await account(harness, acct, owner="U0AEBOB")
    await harness.signal(b.payment_failed(acct, T0), b.expansion(acct, T0 + timedelta(hours=1)))
    await harness.feed(Topic.BILLING, b.invoice_paid(acct, T0 + timedelta(days=1)))
    await harness.signal(b.expansion(acct, T0 + timedelta(days=2), n=2))
    log = [(r["playbook"], r["outcome"], r["reason"]) for r in await harness.decisions_of(acct)]
    assert log[1] == (
        "expansion-owner",
        "suppressed",
        "dunning: a payment of the account is failing (upsell suppressed)",
    )
    assert log[2][:2] == ("expansion-owner", "fired")
    slack = [c for c in await harness.commands(acct) if c.data.channel == "slack"]
    assert [c.data.recipient for c in slack] == ["U0AEBOB"]


async def test_schedule_trigger_renewal_in_90_days(harness: Harness) -> None:
    acct = "acct_renew"
    await account(harness, acct, days_to_renewal=120)
    # another account renewing the same day has its own decision
    await account(harness, "acct_renew_too", days_to_renewal=120, csm="U0CSMBEN")
    scored = T0 - timedelta(hours=2)
    due = scored + timedelta(days=30)
    (timer,) = await harness.rows("SELECT kind, due_at FROM timers WHERE account_id = :a", a=acct)
    assert timer == {"kind": "schedule", "due_at": due}
    # a later score of the same renewal adds no second timer
    await harness.feed(
        Topic.SCORES,
        b.score(
            acct, T0 + timedelta(days=1), n=2, features={"tenure_days": 401, "days_to_renewal": 119}
        ),
    )
    assert len(await harness.rows("SELECT * FROM timers WHERE account_id = :a", a=acct)) == 1
    await harness.fire_until(due)
    (task,) = await harness.commands(acct)
    assert (task.data.channel, task.data.template, task.data.recipient) == (
        "csm_task",
        "renewal_prep",
        "U0CSMANA",
    )
    assert task.data.variables["days_to_renewal"] == 90


async def test_a_failed_delivery_gives_the_touch_back(harness: Harness) -> None:
    acct = not_held_out("milestone-congratulation", "acct_bounce")
    await account(harness, acct)
    await harness.signal(b.milestone(acct, T0))
    (command,) = await harness.commands(acct)
    await harness.feed(Topic.OUTCOMES, b.outcome(acct, T0, command.id, "failed", channel="in_app"))
    (touch,) = await harness.rows("SELECT voided FROM contact_ledger WHERE account_id = :a", a=acct)
    assert touch["voided"] is True
    (action,) = await harness.rows("SELECT delivery FROM decision_actions")
    assert action["delivery"] == "failed"


# -- dunning ------------------------------------------------------------------------------


async def messages(h: Harness, acct: str) -> list[Any]:
    return [
        c for c in await h.commands(acct) if c.type == "churnguard.actions.notification_requested"
    ]


async def retries(h: Harness, acct: str) -> list[Any]:
    return [
        c for c in await h.commands(acct) if c.type == "churnguard.actions.payment_retry_requested"
    ]


async def test_dunning_retries_a_soft_decline_until_it_runs_out(harness: Harness) -> None:
    acct = "acct_dun"
    await account(harness, acct)
    await harness.signal(b.payment_failed(acct, T0))
    (case,) = await harness.rows("SELECT * FROM dunning_cases")
    assert case["status"] == "retrying"
    notice = [c for c in await messages(harness, acct) if ".notice." in c.id]
    assert [c.data.recipient for c in notice] == [f"admin@{acct}.test"]
    for attempt in range(1, 5):
        (case,) = await harness.rows("SELECT next_attempt_at FROM dunning_cases")
        await harness.fire_until(case["next_attempt_at"])
        sent = await retries(harness, acct)
        assert [r.data.attempt for r in sent] == list(range(1, attempt + 1))
        latest = sent[-1]
        assert latest.data.scheduled_for.weekday() < 5
        await harness.feed(
            Topic.OUTCOMES,
            b.outcome(
                acct, latest.data.scheduled_for, latest.id, "payment_failed", "insufficient_funds"
            ),
        )
    (case,) = await harness.rows("SELECT * FROM dunning_cases")
    assert (case["status"], case["attempts"]) == ("cancel", 4)
    final = [c for c in await messages(harness, acct) if c.data.template == "dunning_final_state"]
    assert [(c.data.channel, c.data.recipient, c.data.variables["final_state"]) for c in final] == [
        ("webhook", "billing", "cancel")
    ]
    times = [r.data.scheduled_for for r in await retries(harness, acct)]
    assert times == sorted(times)
    assert times[-1] - T0 <= timedelta(days=14)
    assert await harness.fire_until(T0 + timedelta(days=30)) == 0  # the final timer was cancelled


async def test_a_paid_invoice_cancels_the_pending_retries(harness: Harness) -> None:
    acct = "acct_paid"
    await account(harness, acct)
    await harness.signal(b.payment_failed(acct, T0))
    await harness.fire_until(T0 + timedelta(days=3))
    (first,) = await retries(harness, acct)
    await harness.feed(
        Topic.OUTCOMES,
        b.outcome(acct, first.data.scheduled_for, first.id, "payment_failed", "insufficient_funds"),
    )
    await harness.feed(Topic.BILLING, b.invoice_paid(acct, T0 + timedelta(days=3, hours=1)))
    assert await harness.fire_until(T0 + timedelta(days=30)) == 0
    assert len(await retries(harness, acct)) == 1
    (case,) = await harness.rows("SELECT status FROM dunning_cases")
    assert case["status"] == "recovered"
    pending = await harness.rows(
        "SELECT cancel_reason FROM timers WHERE fired_at IS NULL AND kind LIKE 'dunning%'"
    )
    assert {t["cancel_reason"] for t in pending} == {"recovered: invoice paid"}


async def test_a_hard_decline_is_never_retried(harness: Harness) -> None:
    acct = "acct_hard"
    await account(harness, acct)
    await harness.signal(b.payment_failed(acct, T0, code="expired_card", kind="hard"))
    assert await harness.fire_until(T0 + timedelta(days=13)) == 0
    assert await retries(harness, acct) == []
    (email,) = await harness.commands(acct)
    assert (email.data.channel, email.data.template) == ("email", "payment_failed")
    assert "next_retry_at" not in email.data.variables  # a hard decline is never retried
    assert email.data.variables["update_payment_url"] == "http://127.0.0.1:8080/billing"
    await harness.fire_until(T0 + timedelta(days=15))
    (case,) = await harness.rows("SELECT status FROM dunning_cases")
    assert case["status"] == "cancel"


async def test_a_hard_decline_on_a_retry_stops_the_schedule(harness: Harness) -> None:
    acct = "acct_turns_hard"
    await account(harness, acct)
    await harness.signal(b.payment_failed(acct, T0))
    await harness.fire_until(T0 + timedelta(days=3))
    (first,) = await retries(harness, acct)
    await harness.feed(
        Topic.OUTCOMES,
        b.outcome(acct, first.data.scheduled_for, first.id, "payment_failed", "stolen_card"),
    )
    await harness.fire_until(T0 + timedelta(days=13))
    assert len(await retries(harness, acct)) == 1
    sent = [(c.id.split(".")[1], c.data.template) for c in await messages(harness, acct)]
    assert sent == [("notice", "payment_failed"), ("card", "payment_failed")]


async def test_a_second_failure_of_the_same_invoice_is_the_same_dunning(harness: Harness) -> None:
    acct = "acct_twice"
    await account(harness, acct)
    await harness.signal(
        b.payment_failed(acct, T0, n=1),
        b.payment_failed(acct, T0 + timedelta(days=3), attempt=2, n=2),
    )
    log = await harness.decisions_of(acct)
    assert [r["outcome"] for r in log] == ["fired", "suppressed"]
    assert log[1]["reason"].startswith("dedupe: dunning of invoice in_1 is open")
    assert len(await harness.rows("SELECT * FROM dunning_cases")) == 1


async def test_the_window_end_waits_for_the_outcome_of_a_retry_in_flight(
    harness: Harness,
) -> None:
    """A replayed history (or a slow notify) reaches the window's end with retry 1 sent and
    its outcome not back: the case waits for it instead of cancelling under it."""
    acct = "acct_inflight"
    await account(harness, acct)
    await harness.signal(b.payment_failed(acct, T0))
    late = T0 + timedelta(days=16)
    await harness.fire_until(late)  # retry 1 and the window's end, both due
    (first,) = await retries(harness, acct)
    (case,) = await harness.rows("SELECT status FROM dunning_cases")
    assert case["status"] == "retrying"
    await harness.feed(
        Topic.OUTCOMES, b.outcome(acct, late, first.id, "payment_failed", "insufficient_funds")
    )
    await harness.fire_until(late + timedelta(hours=1))
    assert [r.data.attempt for r in await retries(harness, acct)] == [1, 2]
    # retry 2's outcome never comes: a day later the case concludes, saying why
    await harness.fire_until(late + timedelta(days=2))
    (case,) = await harness.rows("SELECT status FROM dunning_cases")
    assert case["status"] == "cancel"
    (final,) = [
        c for c in await messages(harness, acct) if c.data.template == "dunning_final_state"
    ]
    # the window's end (day 15) came while retry 1 was out; it waited a day past the moment
    # it fired (day 16), found retry 2 without an outcome, and concluded
    assert final.time == T0 + timedelta(days=17)
