"""The template catalogue: every template renders on every channel it declares, bad
variables are refused by name, Slack layouts keep Slack's limits, and the README lists
every template and variable (playbooks are written from it)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from churnguard.common.events.derived import NotificationRequested, NotificationRequestedData
from churnguard.devstack.standins import block_kit_problems
from churnguard.notify.channels.slack import blocks_for
from churnguard.notify.templates import (
    CATALOGUE,
    TemplateError,
    email_templates,
    money,
    plain_text,
    render_email,
    validate,
)

README = Path(__file__).resolve().parents[2] / "services" / "notify" / "README.md"
REASON = {"code": "usage_trend_down", "description": "Weekly active users fell 38%", "impact": 0.2}
EXAMPLES: dict[str, dict[str, Any]] = {
    "risk_alert": {
        "account_name": "Acme <Corp> & Co",
        "arr": 12_000_000,
        "health": 41,
        "previous_health": 72,
        "tier": "at_risk",
        "reasons": [REASON],
        "console_url": "https://console.test/accounts/acct_1",
    },
    "renewal_at_risk": {
        "account_name": "Acme",
        "arr": 5_000_000,
        "health": 30,
        "tier": "critical",
        "days_to_renewal": 30,
        "console_url": "https://console.test/a",
    },
    "detractor_follow_up": {
        "account_name": "Acme",
        "score": 3,
        "comment": "Too slow.\nReports time out.",
        "console_url": "https://console.test/a",
    },
    "payment_failed": {
        "account_name": "Acme",
        "amount": 4900,
        "invoice_id": "in_1",
        "update_payment_url": "https://billing.test/u",
        "next_retry_at": "2026-12-04T10:00:00Z",
    },
    "usage_drop_check_in": {
        "account_name": "Acme",
        "help_url": "https://help.test/x",
        "features": ["dashboards", "alerts"],
    },
}


def command(template: str, channel: str, variables: dict[str, Any]) -> NotificationRequested:
    return NotificationRequested(
        id="cmd-1",
        source="/playbooks",
        time=datetime.now(UTC),
        subject="acct_1",
        data=NotificationRequestedData(
            channel=channel,  # type: ignore[arg-type]
            template=template,
            recipient="C1",
            playbook="p",
            decision_id="d",
            priority=0,
            variables=variables,
        ),
    )


def test_every_template_has_an_example_here() -> None:
    assert set(EXAMPLES) == set(CATALOGUE)


@pytest.mark.parametrize(
    ("template", "channel"),
    [(t, c) for t, spec in CATALOGUE.items() for c in sorted(spec.channels)],
)
def test_every_template_renders_on_each_of_its_channels(template: str, channel: str) -> None:
    v = validate(template, channel, EXAMPLES[template])  # type: ignore[arg-type]
    if channel == "slack":
        text, blocks = blocks_for(command(template, channel, EXAMPLES[template]), v)
        assert block_kit_problems(blocks) == []
        assert text
    elif channel == "email":
        rendered = render_email(template, v, unsubscribe_url="https://n.test/u?token=t")
        assert "\n" not in rendered.subject
        assert "https://n.test/u?token=t" in rendered.text
        assert "https://n.test/u?token=t" in rendered.html
    elif channel in ("in_app", "csm_task"):
        message = plain_text(template, v)
        assert message.title
        assert message.body


def test_email_templates_ship_all_three_parts() -> None:
    email = {t for t, spec in CATALOGUE.items() if "email" in spec.channels}
    assert email_templates() == email


def test_html_is_escaped_and_text_is_not() -> None:
    v = validate("risk_alert", "slack", EXAMPLES["risk_alert"])
    _, blocks = blocks_for(command("risk_alert", "slack", EXAMPLES["risk_alert"]), v)
    section = blocks[1]["text"]["text"]
    assert "Acme &lt;Corp&gt; &amp; Co" in section  # Slack's control characters escaped
    v = validate(
        "payment_failed", "email", {**EXAMPLES["payment_failed"], "account_name": "<b>X</b>"}
    )
    rendered = render_email("payment_failed", v, unsubscribe_url="https://u.test")
    assert "&lt;b&gt;X&lt;/b&gt;" in rendered.html
    assert "<b>X</b>" in rendered.text


def test_long_inputs_are_clipped_to_slacks_limits() -> None:
    long = {
        **EXAMPLES["risk_alert"],
        "account_name": "A" * 500,
        "reasons": [{**REASON, "description": "x" * 500}] * 10,
    }
    v = validate("risk_alert", "slack", long)
    _, blocks = blocks_for(command("risk_alert", "slack", long), v)
    assert block_kit_problems(blocks) == []
    assert len(blocks[0]["text"]["text"]) <= 150


@pytest.mark.parametrize(
    ("template", "channel", "variables", "reason"),
    [
        ("nope", "slack", {}, "unknown template 'nope'"),
        ("risk_alert", "email", EXAMPLES["risk_alert"], "not sent on email"),
        ("risk_alert", "slack", {**EXAMPLES["risk_alert"], "health": 101}, "health"),
        ("risk_alert", "slack", {**EXAMPLES["risk_alert"], "helth": 1}, "helth: Extra inputs"),
        ("payment_failed", "email", {**EXAMPLES["payment_failed"], "amount": -1}, "amount"),
        (
            "payment_failed",
            "email",
            {**EXAMPLES["payment_failed"], "update_payment_url": "x"},
            "update_payment_url",
        ),
    ],
)
def test_bad_commands_are_refused_with_the_field(
    template: str, channel: str, variables: dict[str, Any], reason: str
) -> None:
    with pytest.raises(TemplateError, match=re.escape(reason)):
        validate(template, channel, variables)  # type: ignore[arg-type]


def test_block_kit_checker_catches_what_slack_refuses() -> None:
    too_many = [{"type": "divider"}] * 51
    assert block_kit_problems(too_many) == ["blocks: 51 blocks, at most 50"]
    header = [{"type": "header", "text": {"type": "mrkdwn", "text": "x" * 151}}]
    assert len(block_kit_problems(header)) == 2
    assert block_kit_problems([{"type": "section"}]) == [
        "blocks[0]: a section needs text or fields"
    ]
    assert block_kit_problems([{"type": "carousel"}])


def test_money_formats() -> None:
    assert money(12_000_000, "usd") == "$120,000"
    assert money(98050, "eur") == "€980.50"
    assert money(5000, "jpy") == "¥5,000"
    assert money(100, "chf") == "1 CHF"


def test_readme_lists_every_template_and_variable() -> None:
    readme = README.read_text()
    for template, spec in CATALOGUE.items():
        row = f"| `{template}` |"
        assert row in readme, template
        section = readme.split(row, 1)[1].split("\n", 1)[0]
        for name in spec.variables.model_fields:
            assert f"`{name}`" in section, f"{template}.{name} missing from the README"


def test_readme_lists_every_setting() -> None:
    from churnguard.notify.settings import NotifySettings

    section = README.read_text().split("## Settings", 1)[1].split("\n## ", 1)[0]
    for name in NotifySettings.model_fields:
        if name != "platform":
            assert f"`{name.upper()}`" in section, f"CHURNGUARD_NOTIFY_{name.upper()}"
