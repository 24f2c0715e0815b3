"""The template catalogue: every template renders on every channel it declares, bad
variables are refused by name, Slack layouts keep Slack's limits, and the README lists
every template and variable (playbooks are written from it)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from churnguard.common.events.derived import NotificationRequested, NotificationRequestedData
from churnguard.devstack.standins import block_kit_problems
from churnguard.notify.channels.slack import blocks_for
from churnguard.notify.templates import (
    CATALOGUE,
    TemplateError,
    email_templates,
    expansion_reason_text,
    milestone_words,
    money,
    ordinal,
    person_name,
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
    "nps_apology": {"account_name": "Acme", "score": 3, "contact_name": "Pat", "csm_name": "Ana"},
    "expansion_opportunity": {
        "account_name": "Acme",
        "expansion_reason": "seats_near_limit",
        "seats_utilisation": 0.955,
        "arr": 7_200_000,
        "console_url": "https://console.test/a",
    },
    "milestone_congratulations": {
        "account_name": "Acme",
        "milestone": "feature_uses.reports",
        "milestone_value": 1000,
        "contact_name": "Dana",
    },
    "renewal_prep": {
        "account_name": "Acme",
        "days_to_renewal": 90,
        "arr": 7_200_000,
        "health": 64,
        "tier": "watch",
        "console_url": "https://console.test/a",
    },
    "dunning_final_notice": {
        "account_name": "Acme",
        "invoice_id": "in_1",
        "final_state": "cancel",
        "amount": 4900,
        "currency": "usd",
    },
    "dunning_final_state": {
        "invoice_id": "in_1",
        "final_state": "cancel",
        "attempts": 4,
        "account_name": "Acme",
        "amount": 4900,
        "currency": "usd",
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
    else:  # webhook: the validated variables as JSON, which read back as the same
        sent = orjson.loads(orjson.dumps(v.model_dump(mode="json")))
        assert set(EXAMPLES[template]) <= set(sent)
        assert validate(template, channel, sent) == v  # type: ignore[arg-type]


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
        ("nps_apology", "email", {**EXAMPLES["nps_apology"], "score": 11}, "score"),
        ("nps_apology", "in_app", EXAMPLES["nps_apology"], "not sent on in_app"),
        (
            "milestone_congratulations",
            "in_app",
            {**EXAMPLES["milestone_congratulations"], "milestone_value": 0},
            "milestone_value",
        ),
        (
            "dunning_final_state",
            "webhook",
            {**EXAMPLES["dunning_final_state"], "final_state": "delete"},
            "final_state",
        ),
        (
            "dunning_final_state",
            "webhook",
            {k: v for k, v in EXAMPLES["dunning_final_state"].items() if k != "attempts"},
            "attempts",
        ),
        (
            "expansion_opportunity",
            "slack",
            {**EXAMPLES["expansion_opportunity"], "seats_utilisation": -0.1},
            "seats_utilisation",
        ),
        (
            "renewal_prep",
            "csm_task",
            {**EXAMPLES["renewal_prep"], "days_to_renewal": 400},
            "days_to_renewal",
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


# -- the templates playbooks' shipped playbooks use ---------------------------------------


def render(template: str, **changes: Any) -> Any:
    v = validate(template, "email", {**EXAMPLES[template], **changes})
    return render_email(template, v, unsubscribe_url="https://n.test/u?token=t")


def test_ordinals() -> None:
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111, 1000)] == [
        "1st",
        "2nd",
        "3rd",
        "4th",
        "11th",
        "12th",
        "13th",
        "21st",
        "22nd",
        "101st",
        "111th",
        "1,000th",
    ]


@pytest.mark.parametrize(
    ("milestone", "value", "achievement", "sentence"),
    [
        (
            "feature_uses.reports",
            1000,
            "your 1,000th report",
            "Your team at Acme has just reached its 1,000th report.",
        ),
        (
            "feature_uses.scheduled_reports",
            100,
            "your 100th scheduled report",
            "Your team at Acme has just reached its 100th scheduled report.",
        ),
        (
            "feature_uses.api",
            10_000,
            "your 10,000th API call",
            "Your team at Acme has just reached its 10,000th API call.",
        ),
        (
            "feature_uses.integrations",
            100,
            "100 uses of integrations",
            "Your team at Acme has now used integrations 100 times.",
        ),
        (
            "feature_uses.mobile_app",
            1000,
            "1,000 uses of the mobile app",
            "Your team at Acme has now used the mobile app 1,000 times.",
        ),
        (
            "first_use.integrations",
            1,
            "your first integration",
            "Your team at Acme has just used integrations for the first time.",
        ),
        (
            "first_use.api",
            1,
            "your first API call",
            "Your team at Acme has just used the API for the first time.",
        ),
        (
            "active_users_30d",
            50,
            "50 active users",
            "50 people at Acme were active in the last 30 days.",
        ),
        ("customer_years", 1, "one year with us", "It has been one year since Acme joined us."),
        (
            "customer_years",
            3,
            "three years with us",
            "It has been three years since Acme joined us.",
        ),
        ("customer_years", 15, "15 years with us", "It has been 15 years since Acme joined us."),
        (
            "first_integration_connected",
            1,
            "a new milestone",
            "Acme has reached a new milestone: first integration connected.",
        ),
        ("logins", 500, "a new milestone", "Acme has reached a new milestone: logins (500)."),
    ],
)
def test_milestones_read_as_people_say_them(
    milestone: str, value: int, achievement: str, sentence: str
) -> None:
    words = milestone_words(milestone, value, "Acme")
    assert (words.achievement, words.sentence) == (achievement, sentence)


def test_milestone_email_and_in_app_message() -> None:
    rendered = render("milestone_congratulations", account_name="Acme <Labs>")
    assert rendered.subject == "Congratulations on your 1,000th report, Dana"
    assert "Hi Dana," in rendered.text
    assert "Your team at Acme <Labs> has just reached its 1,000th report." in rendered.text
    assert "Your team at Acme &lt;Labs&gt; has just reached its 1,000th report." in rendered.html
    assert "<title>Congratulations on your 1,000th report</title>" in rendered.html
    years = render(
        "milestone_congratulations",
        milestone="customer_years",
        milestone_value=1,
        contact_name=None,
    )
    assert years.subject == "Congratulations on one year with us"
    assert years.text.startswith("Hi there,\n\nIt has been one year since Acme joined us.")
    v = validate(
        "milestone_congratulations",
        "in_app",
        {"account_name": "Acme", "milestone": "first_use.api", "milestone_value": 1},
    )
    message = plain_text("milestone_congratulations", v)
    assert message.title == "Congratulations on your first API call!"
    assert message.body.startswith("Your team at Acme has just used the API for the first time.")
    assert message.link is None


def test_nps_apology_names_the_score_and_who_will_call() -> None:
    rendered = render("nps_apology")
    assert rendered.subject == "Pat, we're sorry we let you down"
    for part in (rendered.text, rendered.html):
        assert "Hi Pat," in part
        assert "3 out of 10" in part
        assert "Ana, who looks after Acme, will get in touch in the next few days" in part
    anonymous = render("nps_apology", contact_name=None, csm_name=None)
    assert anonymous.subject == "We're sorry we let you down"
    assert "Someone from our customer success team will get in touch" in anonymous.text


@pytest.mark.parametrize("csm", ["U0CSMANA", "csm_ana", "ana@acme.test"])
def test_a_csm_id_is_never_shown_to_a_customer_as_a_name(csm: str) -> None:
    """Playbooks fills csm_name from the CSM trait, often a Slack id or an internal id."""
    assert person_name(csm) is None
    rendered = render("nps_apology", csm_name=csm)
    assert csm not in rendered.text
    assert csm not in rendered.html
    assert "Someone from our customer success team" in rendered.text
    v = validate(
        "usage_drop_check_in", "email", {**EXAMPLES["usage_drop_check_in"], "csm_name": csm}
    )
    check_in = render_email("usage_drop_check_in", v, unsubscribe_url="https://u.test")
    assert csm not in check_in.text
    assert "Reply to this email" not in check_in.text
    assert person_name("Seán O'Brien") == "Seán O'Brien"


@pytest.mark.parametrize(
    ("final_state", "subject", "says"),
    [
        (
            "cancel",
            "Your subscription for Acme has been cancelled",
            "the subscription for Acme has been cancelled",
        ),
        (
            "downgrade",
            "Your subscription for Acme has been downgraded",
            "the subscription for Acme has been moved to a lower plan",
        ),
        (
            "keep_flagged",
            "Action needed: invoice in_1 is still unpaid",
            "Your subscription stays active for now",
        ),
    ],
)
def test_dunning_final_notice_says_what_happened(final_state: str, subject: str, says: str) -> None:
    rendered = render("dunning_final_notice", final_state=final_state)
    assert rendered.subject == subject
    assert "we have not been able to collect $49 for invoice in_1 of Acme" in rendered.text
    assert says in rendered.text
    assert (
        says.replace("cancelled", "<strong>cancelled</strong>").replace(
            "moved to a lower plan", "<strong>moved to a lower plan</strong>"
        )
        in rendered.html
    )
    others = {"cancel", "downgrade", "keep_flagged"} - {final_state}
    for other in others:  # one state's text only
        other_text = render("dunning_final_notice", final_state=other).text
        assert says not in other_text


def test_dunning_final_notice_without_an_amount() -> None:
    rendered = render("dunning_final_notice", amount=None, currency="eur")
    assert "we have not been able to collect payment for invoice in_1 of Acme" in rendered.text
    assert render("dunning_final_notice", amount=98050, currency="eur").text.count("€980.50") == 1


def test_dunning_final_state_webhook_carries_what_was_given() -> None:
    v = validate(
        "dunning_final_state",
        "webhook",
        {"invoice_id": "in_9", "final_state": "downgrade", "attempts": 0},
    )
    assert v.model_dump(mode="json") == {
        "invoice_id": "in_9",
        "final_state": "downgrade",
        "attempts": 0,
        "account_name": None,
        "amount": None,
        "currency": None,  # never a guessed currency for a billing system
    }


@pytest.mark.parametrize(
    ("reason", "seats", "text"),
    [
        ("seats_near_limit", 0.955, "96% of its seats are in use"),
        ("seats_near_limit", None, "its seats are nearly all in use"),
        (
            "usage_above_plan: 118% of the monthly API call quota",
            None,
            "its usage is above what its plan includes (118% of the monthly API call quota)",
        ),
        ("api_quota_nearly_used", None, "API quota nearly used"),
        ("Bought three add-ons this month", None, "Bought three add-ons this month"),
    ],
)
def test_expansion_reasons_read_as_a_clause(reason: str, seats: float | None, text: str) -> None:
    assert expansion_reason_text(reason, seats) == text


def test_expansion_opportunity_in_slack_and_as_a_task() -> None:
    variables = {**EXAMPLES["expansion_opportunity"], "account_name": "Acme <Labs> & Co"}
    v = validate("expansion_opportunity", "slack", variables)
    text, blocks = blocks_for(command("expansion_opportunity", "slack", variables), v)
    assert block_kit_problems(blocks) == []
    assert [b["type"] for b in blocks] == ["header", "section", "actions", "context"]
    assert blocks[0]["text"]["text"] == "Expansion opportunity: Acme <Labs> & Co"
    section = blocks[1]
    assert section["text"]["text"] == (
        ":chart_with_upwards_trend: *Acme &lt;Labs&gt; &amp; Co* looks ready to buy more: "
        "96% of its seats are in use."
    )
    assert [f["text"] for f in section["fields"]] == ["*ARR*\n$72,000", "*Seats in use*\n96%"]
    assert blocks[2]["elements"][0]["url"] == "https://console.test/a"
    assert text == (
        "Expansion opportunity: Acme <Labs> & Co looks ready to buy more: "
        "96% of its seats are in use (ARR $72,000)"
    )
    bare = {"account_name": "Acme", "expansion_reason": "x" * 500, "console_url": "https://c.t/a"}
    _, blocks = blocks_for(
        command("expansion_opportunity", "slack", bare),
        validate("expansion_opportunity", "slack", {**bare, "account_name": "A" * 500}),
    )
    assert block_kit_problems(blocks) == []
    assert "fields" not in blocks[1]  # nothing to show: no empty fields array
    task = plain_text(
        "expansion_opportunity",
        validate("expansion_opportunity", "csm_task", EXAMPLES["expansion_opportunity"]),
    )
    assert task.title == "Expansion opportunity: Acme"
    assert task.body.startswith(
        "Acme looks ready to buy more: 96% of its seats are in use. ARR $72,000."
    )
    assert task.link == "https://console.test/a"


def test_renewal_prep_task() -> None:
    task = plain_text(
        "renewal_prep", validate("renewal_prep", "csm_task", EXAMPLES["renewal_prep"])
    )
    assert task.title == "Prepare the renewal of Acme: due in 90 days"
    assert task.body.startswith("Acme renews in 90 days (ARR $72,000, health 64, on watch).")
    assert "business review" in task.body
    assert task.link == "https://console.test/a"
    bare = {"account_name": "Acme", "days_to_renewal": 1, "console_url": "https://c.test/a"}
    task = plain_text("renewal_prep", validate("renewal_prep", "csm_task", bare))
    assert task.title == "Prepare the renewal of Acme: due tomorrow"
    assert task.body.startswith("Acme renews tomorrow. Before then:")
