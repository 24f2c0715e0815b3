"""Playbooks' template catalogue agrees with notify's, which refuses unknown variables.

Two checks: the declarations (every template in playbooks' shipped ``templates.yaml`` is
in notify's catalogue with the same channels and the same required and optional
variable names, and the other way round), and the values (every command the shipped
playbooks produce, on a real PostgreSQL, validates against notify's models and renders on
its channel). Runs where notify is installed (the workspace, which has both services)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from churnguard.common.topics import Topic
from churnguard.devstack.standins import block_kit_problems
from churnguard.playbooks.loader import load_templates
from tests.playbooks import builders as b
from tests.playbooks.conftest import Harness
from tests.playbooks.test_decisions import T0, account, not_held_out

notify_templates = pytest.importorskip("churnguard.notify.templates")
notify_slack = pytest.importorskip("churnguard.notify.channels.slack")


def declared(channels: Any, required: set[str], optional: set[str]) -> dict[str, list[str]]:
    return {
        "channels": sorted(channels),
        "variables": sorted(required),
        "optional": sorted(optional),
    }


def test_every_shipped_template_is_in_notifys_catalogue_with_the_same_variables() -> None:
    ours, errors = load_templates(None)
    assert errors == []
    in_playbooks = {
        name: declared(t.channels, set(t.variables), set(t.optional)) for name, t in ours.items()
    }
    in_notify = {}
    for name, spec in notify_templates.CATALOGUE.items():
        fields = spec.variables.model_fields
        required = {k for k, f in fields.items() if f.is_required()}
        in_notify[name] = declared(spec.channels, required, set(fields) - required)
    assert sorted(set(in_playbooks) - set(in_notify)) == [], "not in notify's catalogue"
    assert sorted(set(in_notify) - set(in_playbooks)) == [], "not in playbooks' templates.yaml"
    assert in_playbooks == in_notify


def rendered(command: Any) -> str:
    """Validate a command's variables as notify does, and render it on its channel."""
    data = command.data
    v = notify_templates.validate(data.template, data.channel, data.variables)
    if data.channel == "slack":
        text, blocks = notify_slack.blocks_for(command, v)
        assert block_kit_problems(blocks) == [], data.template
        return text
    if data.channel == "email":
        email = notify_templates.render_email(data.template, v, unsubscribe_url="https://u.test/x")
        return email.subject
    if data.channel in ("in_app", "csm_task"):
        return str(notify_templates.plain_text(data.template, v).title)
    return str(v.model_dump(mode="json"))


@pytest.mark.integration
async def test_every_command_the_shipped_playbooks_send_is_one_notify_can_deliver(
    harness: Harness,
) -> None:
    """Each shipped playbook fired as the tests of its own behaviour fire it; together
    they use every template of templates.yaml, on the channels notify's models check."""
    h = harness
    accounts = {
        p: not_held_out(p, f"acct_contract_{i}_")
        for i, p in enumerate(
            [
                "high-risk-enterprise",
                "renewal-risk-executive",
                "detractor-nps",
                "onboarding-usage-drop",
                "expansion-owner",
                "milestone-congratulation",
                "renewal-prep",
                "failed-payment-dunning",
            ]
        )
    }
    await account(h, accounts["high-risk-enterprise"])
    await h.signal(b.tier_crossed(accounts["high-risk-enterprise"], T0, to="critical"))
    await account(h, accounts["renewal-risk-executive"], tier="at_risk")
    await h.signal(b.renewal(accounts["renewal-risk-executive"], T0))
    await account(h, accounts["detractor-nps"])
    await h.signal(b.detractor(accounts["detractor-nps"], T0))
    await account(h, accounts["onboarding-usage-drop"], tenure=30, unadopted=["api"])
    await h.signal(b.usage_dropped(accounts["onboarding-usage-drop"], T0))
    await account(h, accounts["expansion-owner"], owner="U0AEBOB")
    await h.signal(b.expansion(accounts["expansion-owner"], T0))
    milestones = accounts["milestone-congratulation"]
    await account(h, milestones)
    await h.signal(
        b.milestone(milestones, T0, "feature_uses.reports", 1000),
        b.milestone(milestones, T0 + timedelta(minutes=1), "customer_years", 1),
        b.milestone(milestones, T0 + timedelta(minutes=2), "first_use.integrations", 1),
    )
    await account(h, accounts["renewal-prep"], days_to_renewal=120)
    dunned = accounts["failed-payment-dunning"]
    await account(h, dunned)
    await h.signal(b.payment_failed(dunned, T0))
    for _ in range(4):  # every retry declined: the case ends in its final state
        (case,) = await h.rows(
            "SELECT next_attempt_at FROM dunning_cases WHERE account_id = :a", a=dunned
        )
        await h.fire_until(case["next_attempt_at"])
        retries = [
            c
            for c in await h.commands(dunned)
            if c.type == "churnguard.actions.payment_retry_requested"
        ]
        await h.feed(
            Topic.OUTCOMES,
            b.outcome(
                dunned,
                retries[-1].data.scheduled_for,
                retries[-1].id,
                "payment_failed",
                "insufficient_funds",
            ),
        )
    await h.fire_until(T0 + timedelta(days=31))  # the renewal-prep schedule

    sent = [c for c in await h.commands() if c.type == "churnguard.actions.notification_requested"]
    shown: dict[tuple[str, str], list[str]] = {}
    for c in sent:
        shown.setdefault((c.data.template, c.data.channel), []).append(rendered(c))
    templates, _ = load_templates(None)
    assert {t for t, _ in shown} == set(templates), "a template no shipped playbook sent"
    assert sorted(shown[("milestone_congratulations", "in_app")]) == [
        "Congratulations on one year with us!",
        "Congratulations on your 1,000th report!",
        "Congratulations on your first integration!",
    ]
    assert shown[("dunning_final_notice", "email")] == [
        f"Your subscription for {dunned} Inc has been cancelled"
    ]
    assert set(shown) == {
        ("risk_alert", "slack"),
        ("renewal_at_risk", "slack"),
        ("detractor_follow_up", "csm_task"),
        ("nps_apology", "email"),
        ("usage_drop_check_in", "in_app"),
        ("expansion_opportunity", "slack"),
        ("milestone_congratulations", "in_app"),
        ("renewal_prep", "csm_task"),
        ("payment_failed", "email"),
        ("dunning_final_state", "webhook"),
        ("dunning_final_notice", "email"),
    }
