"""The template catalogue: which templates exist, on which channels, with which variables.

A command names a template and carries ``variables``; notify validates them against the
template's model *before* anything is sent, so a playbook that forgets a variable gets a
``failed`` outcome (and a dead letter) saying which one, instead of a half-rendered
message. Email templates are Jinja2 files shipped in the package (``templates/email/
<id>.subject.txt``, ``.html``, ``.txt``, HTML autoescaped); Slack messages are Block Kit
built in :mod:`churnguard.notify.channels.slack`; in-app messages and CSM tasks use the
title and body of :data:`TEXTS`; webhooks receive the validated variables as JSON.

``services/notify/README.md`` lists every template and its variables: keep it in step
(``tests/notify/test_templates.py`` checks that it names every template and variable).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import jinja2
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from churnguard.common.envelope import describe_validation_error
from churnguard.common.events.derived import NotificationChannel, ReasonCode, RiskTier

Text = Annotated[str, StringConstraints(min_length=1, max_length=500)]
Url = Annotated[str, StringConstraints(pattern=r"^https?://\S+$", max_length=2000)]
Currency = Annotated[str, StringConstraints(pattern=r"^[a-z]{3}$")]
Cents = Annotated[int, Field(ge=0, description="Minor units of the currency (cents)")]
Health = Annotated[int, Field(ge=0, le=100)]


class Variables(BaseModel):
    """Base of every template's variables: unknown names are an error (typos never pass)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RiskAlert(Variables):
    account_name: Text
    arr: Cents = Field(description="Annual recurring revenue, in the currency's minor unit")
    currency: Currency = "usd"
    health: Health
    previous_health: Health
    tier: RiskTier
    previous_tier: RiskTier | None = None
    reasons: list[ReasonCode] = Field(default_factory=list, max_length=10)
    console_url: Url
    owner: Text | None = Field(default=None, description="The account's CSM, shown if given")


class RenewalAtRiskAlert(Variables):
    account_name: Text
    arr: Cents
    currency: Currency = "usd"
    health: Health
    tier: RiskTier
    days_to_renewal: int = Field(ge=0, le=366)
    reasons: list[ReasonCode] = Field(default_factory=list, max_length=10)
    console_url: Url


class DetractorFollowUp(Variables):
    account_name: Text
    score: int = Field(ge=0, le=10)
    comment: Annotated[str, StringConstraints(max_length=3000)] | None = None
    user_name: Text | None = None
    console_url: Url


class PaymentFailedNotice(Variables):
    account_name: Text
    contact_name: Text | None = None
    amount: Cents
    currency: Currency = "usd"
    invoice_id: Text
    update_payment_url: Url
    next_retry_at: datetime | None = None


class UsageDropCheckIn(Variables):
    account_name: Text
    contact_name: Text | None = None
    features: list[Text] = Field(
        default_factory=list, max_length=5, description="Features worth (re)discovering"
    )
    help_url: Url
    csm_name: Text | None = None


@dataclass(frozen=True)
class TemplateSpec:
    id: str
    description: str
    channels: frozenset[NotificationChannel]
    variables: type[Variables]


def _spec(
    id: str, description: str, channels: set[NotificationChannel], model: type[Variables]
) -> TemplateSpec:
    return TemplateSpec(id, description, frozenset(channels), model)


CATALOGUE: dict[str, TemplateSpec] = {
    spec.id: spec
    for spec in (
        _spec(
            "risk_alert",
            "An account moved to a riskier tier: health and its change, top reasons, link",
            {"slack", "csm_task", "webhook"},
            RiskAlert,
        ),
        _spec(
            "renewal_at_risk",
            "A renewal within 30/60/90 days on an account at risk",
            {"slack", "csm_task", "webhook"},
            RenewalAtRiskAlert,
        ),
        _spec(
            "detractor_follow_up",
            "A user answered NPS 0-6: follow up",
            {"slack", "csm_task", "webhook"},
            DetractorFollowUp,
        ),
        _spec(
            "payment_failed",
            "To the customer: the card was declined, update the payment method",
            {"email", "in_app", "webhook"},
            PaymentFailedNotice,
        ),
        _spec(
            "usage_drop_check_in",
            "To the customer: activity fell, here is what may help",
            {"email", "in_app", "webhook"},
            UsageDropCheckIn,
        ),
    )
}


class TemplateError(ValueError):
    """The command cannot be rendered: unknown template, wrong channel, bad variables."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def validate(template: str, channel: NotificationChannel, variables: dict[str, Any]) -> Variables:
    """The template's variables, validated; :class:`TemplateError` names what is wrong."""
    spec = CATALOGUE.get(template)
    if spec is None:
        raise TemplateError(
            f"template: unknown template {template!r} (known: {', '.join(sorted(CATALOGUE))})"
        )
    if channel not in spec.channels:
        raise TemplateError(
            f"template: {template!r} is not sent on {channel} "
            f"(its channels: {', '.join(sorted(spec.channels))})"
        )
    try:
        return spec.variables.model_validate(variables)
    except ValidationError as exc:
        raise TemplateError(
            f"variables of {template!r}: {describe_validation_error(exc).replace('(root)', '')}"
        ) from None


# -- formatting shared by every channel ------------------------------------------------------

_ZERO_DECIMAL = {"jpy", "krw", "vnd", "clp", "isk", "huf", "twd", "ugx", "xaf", "xof"}


def money(cents: int, currency: str) -> str:
    """``$12,400`` / ``€980.50`` / ``¥5,000``: whole amounts without decimals."""
    symbols = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥", "cad": "CA$", "aud": "A$"}
    major = cents if currency in _ZERO_DECIMAL else cents / 100
    text = f"{major:,.0f}" if float(major).is_integer() else f"{major:,.2f}"
    symbol = symbols.get(currency)
    return f"{symbol}{text}" if symbol else f"{text} {currency.upper()}"


TIER_LABEL: dict[RiskTier, str] = {
    "healthy": "Healthy",
    "watch": "Watch",
    "at_risk": "At risk",
    "critical": "Critical",
}


@dataclass(frozen=True)
class PlainMessage:
    """A title and a body: what an in-app message and a CSM task show."""

    title: str
    body: str
    link: str | None


def plain_text(template: str, v: Variables) -> PlainMessage:
    """Title and body for the in-app inbox and CSM tasks (plain text, no markup)."""
    match v:
        case RiskAlert():
            reasons = "; ".join(r.description for r in v.reasons[:3]) or "no reason given"
            return PlainMessage(
                f"{v.account_name} is now {TIER_LABEL[v.tier].lower()} "
                f"(health {v.previous_health} → {v.health})",
                f"ARR {money(v.arr, v.currency)}. Why: {reasons}.",
                v.console_url,
            )
        case RenewalAtRiskAlert():
            return PlainMessage(
                f"{v.account_name} renews in {v.days_to_renewal} days and is "
                f"{TIER_LABEL[v.tier].lower()}",
                f"ARR {money(v.arr, v.currency)} at stake, health {v.health}.",
                v.console_url,
            )
        case DetractorFollowUp():
            who = v.user_name or "A user"
            return PlainMessage(
                f"{who} at {v.account_name} answered NPS {v.score}",
                f"Comment: {v.comment}" if v.comment else "No comment left.",
                v.console_url,
            )
        case PaymentFailedNotice():
            return PlainMessage(
                "Your last payment did not go through",
                f"We could not charge {money(v.amount, v.currency)} for invoice "
                f"{v.invoice_id}. Please update your payment method to keep "
                f"{v.account_name} running.",
                v.update_payment_url,
            )
        case UsageDropCheckIn():
            tips = ", ".join(v.features)
            return PlainMessage(
                f"Getting the most out of {v.account_name}'s workspace",
                "Teams like yours get the most from: " + tips + "."
                if tips
                else "We have a few ideas that could help your team.",
                v.help_url,
            )
    raise TemplateError(f"template: {template!r} has no plain-text form")  # pragma: no cover


# -- email ---------------------------------------------------------------------------------

_env_html = jinja2.Environment(
    loader=jinja2.PackageLoader("churnguard.notify", "templates/email"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env_text = jinja2.Environment(
    loader=jinja2.PackageLoader("churnguard.notify", "templates/email"),
    autoescape=False,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
for _env in (_env_html, _env_text):
    _env.filters["money"] = money
    _env.globals["tier_label"] = TIER_LABEL


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    html: str
    text: str


EmailKind = Literal["html", "txt"]


def render_email(template: str, v: Variables, *, unsubscribe_url: str) -> RenderedEmail:
    """Subject, HTML and plain-text parts of one email template."""
    context = {**v.model_dump(), "unsubscribe_url": unsubscribe_url}
    subject = _env_text.get_template(f"{template}.subject.txt").render(context)
    return RenderedEmail(
        subject=" ".join(subject.split()),  # one line: a header cannot hold newlines
        html=_env_html.get_template(f"{template}.html").render(context),
        text=_env_text.get_template(f"{template}.txt").render(context),
    )


def email_templates() -> set[str]:
    """Templates that have all three email files (the catalogue test checks the list)."""
    names = set(_env_text.list_templates())
    return {t for t in CATALOGUE if {f"{t}.subject.txt", f"{t}.html", f"{t}.txt"} <= names}
