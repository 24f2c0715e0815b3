"""The template catalogue: which templates exist, on which channels, with which variables.

A command names a template and carries ``variables``; notify validates them against the
template's model *before* anything is sent, so a playbook that forgets a variable gets a
``failed`` outcome (and a dead letter) saying which one, instead of a half-rendered
message. Email templates are Jinja2 files shipped in the package (``templates/email/
<id>.subject.txt``, ``.html``, ``.txt``, HTML autoescaped); Slack messages are Block Kit
built in :mod:`churnguard.notify.channels.slack`; in-app messages and CSM tasks use the
title and body of :func:`plain_text`; webhooks receive the validated variables as JSON.

Playbooks declares the templates it may use in its shipped ``templates.yaml``; every one
of them is here with the same channels and variable names
(``tests/playbooks/test_notify_contract.py`` checks both, and that the commands the shipped
playbooks produce validate and render here).

``services/notify/README.md`` lists every template and its variables: keep it in step
(``tests/notify/test_templates.py`` checks that it names every template and variable).
"""

from __future__ import annotations

import re
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
NpsScore = Annotated[int, Field(ge=0, le=10)]
DaysToRenewal = Annotated[int, Field(ge=0, le=366)]
FinalState = Literal["cancel", "downgrade", "keep_flagged"]
"""How a dunning case ends when its retries run out (playbooks' ``final_state``)."""


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
    days_to_renewal: DaysToRenewal
    reasons: list[ReasonCode] = Field(default_factory=list, max_length=10)
    console_url: Url


class DetractorFollowUp(Variables):
    account_name: Text
    score: NpsScore
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


class NpsApology(Variables):
    account_name: Text
    score: NpsScore
    contact_name: Text | None = None
    csm_name: Text | None = Field(
        default=None, description="Who will call: named when it reads as a name (person_name)"
    )


class ExpansionOpportunity(Variables):
    account_name: Text
    expansion_reason: Text = Field(
        description="A code (seats_near_limit), a code with detail (usage_above_plan: ...) "
        "or a sentence, as the expansion signal carries it"
    )
    console_url: Url
    arr: Cents | None = None
    currency: Currency = "usd"
    seats_utilisation: float | None = Field(
        default=None, ge=0.0, allow_inf_nan=False, description="Seats used / seats bought"
    )


class MilestoneCongratulations(Variables):
    account_name: Text
    milestone: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(
        description="feature_uses.<feature>, first_use.<feature>, active_users_30d, "
        "customer_years, or any other name (shown as words)"
    )
    milestone_value: int = Field(ge=1, description="The count or threshold reached")
    contact_name: Text | None = None


class RenewalPrep(Variables):
    account_name: Text
    days_to_renewal: DaysToRenewal
    console_url: Url
    arr: Cents | None = None
    currency: Currency = "usd"
    health: Health | None = None
    tier: RiskTier | None = None


class DunningFinalNotice(Variables):
    account_name: Text
    invoice_id: Text
    final_state: FinalState
    amount: Cents | None = None
    currency: Currency = "usd"


class DunningFinalState(Variables):
    invoice_id: Text
    final_state: FinalState
    attempts: int = Field(ge=0, description="Payment retries made (0 after a hard decline)")
    account_name: Text | None = None
    amount: Cents | None = None
    # no default: a billing system must not be told a currency nobody gave (the webhook
    # carries exactly what playbooks sent; null when it sent none)
    currency: Currency | None = None


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
        _spec(
            "nps_apology",
            "To a detractor: an apology, and a call from the team",
            {"email"},
            NpsApology,
        ),
        _spec(
            "expansion_opportunity",
            "To the account's owner: it looks ready to buy more, and why",
            {"slack", "csm_task"},
            ExpansionOpportunity,
        ),
        _spec(
            "milestone_congratulations",
            "To the customer: congratulations on a milestone (1,000th report, a year with us)",
            {"in_app", "email"},
            MilestoneCongratulations,
        ),
        _spec(
            "renewal_prep",
            "To the CSM: prepare the renewal (usage review, QBR) ahead of the date",
            {"csm_task"},
            RenewalPrep,
        ),
        _spec(
            "dunning_final_notice",
            "To the customer: retries ran out, the subscription is cancelled, downgraded or "
            "on hold",
            {"email"},
            DunningFinalNotice,
        ),
        _spec(
            "dunning_final_state",
            "To the billing system: carry out the final state of a dunning case",
            {"webhook"},
            DunningFinalState,
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


def ordinal(n: int) -> str:
    """``1st``, ``22nd``, ``113th``, ``1,000th``."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n:,}{suffix}"


_NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)


def count(n: int, singular: str, plural: str | None = None) -> str:
    """``one year``, ``two years``, ``25 years``: words up to twelve, as people write them."""
    word = _NUMBER_WORDS[n] if 0 <= n < len(_NUMBER_WORDS) else f"{n:,}"
    return f"{word} {singular if n == 1 else plural or singular + 's'}"


def days_phrase(days: int) -> str:
    return "today" if days == 0 else "tomorrow" if days == 1 else f"in {days} days"


_ACRONYMS = {"api": "API", "sso": "SSO", "csv": "CSV", "crm": "CRM", "pdf": "PDF", "ai": "AI"}


def _words(name: str) -> str:
    """A machine name as words: ``scheduled_reports`` → ``scheduled reports``."""
    parts = name.replace(".", " ").replace("_", " ").replace("-", " ").split()
    return " ".join(_ACRONYMS.get(p.lower(), p) for p in parts)


@dataclass(frozen=True)
class _FeatureWords:
    label: str
    """How a sentence names the feature: "has now used {label} 1,000 times"."""
    noun: str | None
    """One use of it, counted: "your 1,000th {noun}" (None: not a countable thing)."""
    first: str | None
    """Its first use: "your first {first}"."""


# Features whose names do not turn into good words by rule (the rule: a plural name
# is a countable thing, "reports" → "your 1,000th report").
_FEATURES: dict[str, _FeatureWords] = {
    "api": _FeatureWords("the API", "API call", "API call"),
    "sso": _FeatureWords("single sign-on", None, None),
    "mobile_app": _FeatureWords("the mobile app", None, None),
    "integrations": _FeatureWords("integrations", None, "integration"),
    "automations": _FeatureWords("automations", "automation run", "automation"),
}


def _feature_words(feature: str) -> _FeatureWords:
    known = _FEATURES.get(feature)
    if known is not None:
        return known
    label = _words(feature)
    plural = label.endswith("s") and not label.endswith(("ss", "us", "is", "ics"))
    noun = label[:-1] if plural else None
    return _FeatureWords(label, noun, noun)


@dataclass(frozen=True)
class MilestoneWords:
    """A milestone said for people: ``achievement`` follows "Congratulations on" (subject,
    title), ``sentence`` tells what happened (the message's first line)."""

    achievement: str
    sentence: str


def milestone_words(milestone: str, value: int, account_name: str) -> MilestoneWords:
    """Scoring's milestone names (``feature_uses.reports`` 1000, ``first_use.api``,
    ``active_users_30d`` 50, ``customer_years`` 1) as words; any other name reads as a
    new milestone, so a producer's new kind still gets a sensible message."""
    team = f"Your team at {account_name}"
    kind, _, feature = milestone.partition(".")
    if kind == "feature_uses" and feature:
        words = _feature_words(feature)
        if words.noun:
            return MilestoneWords(
                f"your {ordinal(value)} {words.noun}",
                f"{team} has just reached its {ordinal(value)} {words.noun}.",
            )
        return MilestoneWords(
            f"{value:,} uses of {words.label}",
            f"{team} has now used {words.label} {count(value, 'time')}.",
        )
    if kind == "first_use" and feature:
        words = _feature_words(feature)
        return MilestoneWords(
            f"your first {words.first}" if words.first else f"your first use of {words.label}",
            f"{team} has just used {words.label} for the first time.",
        )
    if milestone in ("active_users_30d", "active_users"):
        people = f"{value:,} {'person' if value == 1 else 'people'} at {account_name}"
        return MilestoneWords(
            f"{value:,} active {'user' if value == 1 else 'users'}",
            f"{people} {'was' if value == 1 else 'were'} active in the last 30 days."
            if milestone == "active_users_30d"
            else f"{people} now {'uses' if value == 1 else 'use'} the product.",
        )
    if milestone == "customer_years":
        years = count(value, "year")
        return MilestoneWords(
            f"{years} with us", f"It has been {years} since {account_name} joined us."
        )
    detail = "" if value == 1 else f" ({value:,})"
    return MilestoneWords(
        "a new milestone",
        f"{account_name} has reached a new milestone: {_words(milestone)}{detail}.",
    )


_EXPANSION_REASONS = {
    "seats_near_limit": "its seats are nearly all in use",
    "usage_above_plan": "its usage is above what its plan includes",
}


def expansion_reason_text(reason: str, seats_utilisation: float | None) -> str:
    """Why an account looks ready to buy more, as a clause ("96% of its seats are in use").

    The signal's reason is a code (``seats_near_limit``), a code and a detail
    (``usage_above_plan: 118% of the API quota``) or already a sentence."""
    code, colon, detail = reason.partition(":")
    code, detail = code.strip(), detail.strip()
    if code == "seats_near_limit" and seats_utilisation is not None:
        text = f"{seats_utilisation:.0%} of its seats are in use"
    elif code in _EXPANSION_REASONS:
        text = _EXPANSION_REASONS[code]
    elif code.isidentifier() and code == code.lower():
        text = _words(code)
    else:
        return reason.strip()
    return f"{text} ({detail})" if colon and detail else text


_ID_LIKE = re.compile(r"^(?:[UW][A-Z0-9]{6,}|\S*[_@\d]\S*)$")


def person_name(value: str | None) -> str | None:
    """``value`` if it reads as a person's name, else None.

    Playbooks fills ``csm_name`` from the account's CSM trait, which is often an id (a
    Slack user id such as ``U0CSMANA``, ``csm_ana``, an address): a customer must read
    "someone from our team", never "U0CSMANA will get back to you"."""
    if value is None or _ID_LIKE.match(value.strip()):
        return None
    return value.strip()


def seats_text(seats_utilisation: float) -> str:
    return f"{seats_utilisation:.0%} of seats in use"


_TIER_PHRASE: dict[RiskTier, str] = {
    "healthy": "healthy",
    "watch": "on watch",
    "at_risk": "at risk",
    "critical": "critical",
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
        case ExpansionOpportunity():
            facts = [f"ARR {money(v.arr, v.currency)}"] if v.arr is not None else []
            if v.seats_utilisation is not None and not v.expansion_reason.startswith(
                "seats_near_limit"
            ):
                facts.append(seats_text(v.seats_utilisation))
            return PlainMessage(
                f"Expansion opportunity: {v.account_name}",
                f"{v.account_name} looks ready to buy more: "
                f"{expansion_reason_text(v.expansion_reason, v.seats_utilisation)}."
                + (f" {', '.join(facts)}." if facts else "")
                + " Talk to them about more seats or a larger plan.",
                v.console_url,
            )
        case MilestoneCongratulations():
            words = milestone_words(v.milestone, v.milestone_value, v.account_name)
            return PlainMessage(
                f"Congratulations on {words.achievement}!",
                f"{words.sentence} Thank you for building with us.",
                None,
            )
        case RenewalPrep():
            facts = []
            if v.arr is not None:
                facts.append(f"ARR {money(v.arr, v.currency)}")
            if v.health is not None:
                facts.append(f"health {v.health}")
            if v.tier is not None:
                facts.append(_TIER_PHRASE[v.tier])
            when = days_phrase(v.days_to_renewal)
            return PlainMessage(
                f"Prepare the renewal of {v.account_name}: due {when}",
                f"{v.account_name} renews {when}"
                + (f" ({', '.join(facts)})" if facts else "")
                + ". Before then: review their usage and adoption, book a business review "
                "with their decision makers, and bring open issues and expansion ideas to it.",
                v.console_url,
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
    _env.globals["milestone_words"] = milestone_words
    _env.globals["person_name"] = person_name


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
