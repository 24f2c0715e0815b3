"""What a playbook may refer to: signal types, fields, channels, recipients, templates.

The validator checks every playbook against this vocabulary, so a typo in a signal
name, a condition field or a template id is an error when the file is loaded, not a
playbook that silently never fires.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args, get_origin

from pydantic import BaseModel

from churnguard.common.events.base import CloudEvent
from churnguard.common.events.billing import SubscriptionStatus
from churnguard.common.events.derived import (
    RISK_TIERS,
    DetractorNps,
    ExpansionSignal,
    MilestoneReached,
    NotificationChannel,
    PaymentFailedSignal,
    RenewalAtRisk,
    RiskTierCrossed,
    UsageDropped,
)

SIGNAL_PREFIX: Final = "churnguard.signals."

SIGNALS: Final[Mapping[str, type[CloudEvent]]] = {
    cls.model_fields["type"].default.removeprefix(SIGNAL_PREFIX): cls
    for cls in (
        RiskTierCrossed,
        UsageDropped,
        ExpansionSignal,
        MilestoneReached,
        PaymentFailedSignal,
        DetractorNps,
        RenewalAtRisk,
    )
}
"""Signal types by short name (``risk_tier_crossed``), as a playbook's trigger names them."""

CHANNELS: Final[tuple[str, ...]] = get_args(NotificationChannel)
CUSTOMER_CHANNELS: Final = frozenset({"email", "in_app"})
"""Channels that reach the customer; the others reach the team (CSM, owner, systems)."""

LIFECYCLE_STAGES: Final = ("onboarding", "adoption", "mature")
ONBOARDING_DAYS: Final = 90
MATURE_DAYS: Final = 365
ARR_TIERS: Final = ("small", "medium", "large", "strategic")

SCORE_FEATURES: Final[tuple[str, ...]] = (
    "activity_1d",
    "activity_7d",
    "activity_30d",
    "active_users_1d",
    "active_users_7d",
    "active_users_30d",
    "active_days_30d",
    "usage_trend_7d",
    "usage_trend_30d",
    "days_since_active",
    "features_used_30d",
    "sticky_unadopted",
    "seats_purchased",
    "seat_utilisation",
    "tickets_30d",
    "ticket_sentiment_30d",
    "open_tickets",
    "tickets_unresolved_30d",
    "failed_payments_60d",
    "unpaid_invoices",
    "unpaid_hard_declines",
    "last_nps",
    "has_nps",
    "last_csat",
    "has_csat",
    "mrr",
    "mrr_change_90d",
    "billing_annual",
    "days_to_renewal",
    "tenure_days",
)
"""The model features scores carry (``AccountScored.data.features``), as scoring names
them; tests/playbooks checks this list against scoring's FEATURE_NAMES."""

Kind = Literal["number", "string", "enum", "bool", "list"]


@dataclass(frozen=True)
class FieldType:
    """What values a field takes, so conditions can be checked when a playbook loads."""

    kind: Kind
    values: tuple[str, ...] = ()
    """For ``enum``: the allowed values."""
    description: str = ""

    def describe(self) -> str:
        if self.kind == "enum":
            return "one of " + ", ".join(self.values)
        return {"number": "a number", "string": "a string", "bool": "true or false"}.get(
            self.kind, "a list of strings"
        )


NUMBER = FieldType("number")
STRING = FieldType("string")

ACCOUNT_FIELDS: Final[Mapping[str, FieldType]] = {
    "account_id": FieldType("string", description="the account id"),
    "account_name": FieldType("string", description="name from group traits"),
    "plan": FieldType("string", description="plan from group traits or the subscription"),
    "segment": FieldType("string", description="segment from group traits (smb, enterprise…)"),
    "owner": FieldType("string", description="account owner from group traits"),
    "csm": FieldType("string", description="customer success manager from group traits"),
    "timezone": FieldType("string", description="IANA time zone from traits"),
    "mrr": FieldType("number", description="MRR, currency units (revenue.movements)"),
    "arr": FieldType("number", description="ARR = 12 x MRR, currency units"),
    "arr_tier": FieldType("enum", ARR_TIERS, "ARR band (CHURNGUARD_PLAYBOOKS_ARR_TIER_BOUNDS)"),
    "currency": FieldType("string", description="ISO 4217 code, lower case"),
    "subscription_status": FieldType(
        "enum", get_args(SubscriptionStatus), "status of the latest subscription event"
    ),
    "health": FieldType("number", description="health 0-100 (latest score or signal)"),
    "tier": FieldType("enum", RISK_TIERS, "risk tier (latest score or signal)"),
    "churn_probability": FieldType("number", description="churn probability 0-1"),
    "reasons": FieldType("list", description="reason codes of the latest score"),
    "tenure_days": FieldType("number", description="days since the subscription started"),
    "lifecycle_stage": FieldType(
        "enum",
        LIFECYCLE_STAGES,
        f"onboarding (tenure < {ONBOARDING_DAYS} d), adoption (< {MATURE_DAYS} d), mature",
    ),
    "days_to_renewal": FieldType("number", description="days to the next renewal"),
    "in_dunning": FieldType("bool", description="a failed invoice is being dunned"),
    "unadopted_sticky_features": FieldType(
        "list", description="sticky features not used for 90 days (signal or latest score)"
    ),
    "guide_feature": FieldType(
        "string",
        description="the unadopted sticky feature with the highest retention lift",
    ),
}
"""Fields of the account as playbooks know it (from traits, billing, revenue and scores)."""

DERIVED_SIGNAL_FIELDS: Final[Mapping[str, Mapping[str, FieldType]]] = {
    "risk_tier_crossed": {"worsened": FieldType("bool", description="moved to a riskier tier")},
    "renewal_at_risk": {"renewal_date": FieldType("string", description="YYYY-MM-DD")},
}


def _field_type(annotation: Any) -> FieldType | None:
    """The condition type of a pydantic field annotation (None: not usable in conditions)."""
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return _field_type(get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return _field_type(inner[0]) if len(inner) == 1 else None
    if origin is Literal:
        values = get_args(annotation)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return NUMBER
        return FieldType("enum", tuple(str(v) for v in values))
    if origin is list:
        return FieldType("list")
    if annotation is bool:
        return FieldType("bool")
    if annotation in (int, float):
        return NUMBER
    if annotation is str:
        return STRING
    return None


def signal_fields(signal: str) -> dict[str, FieldType]:
    """``signal.<name>`` fields of one signal type, from its data model (and derived ones)."""
    data_model: type[BaseModel] = SIGNALS[signal].model_fields["data"].annotation  # type: ignore[assignment]
    out: dict[str, FieldType] = {}
    for name, info in data_model.model_fields.items():
        if name == "reasons":
            out[name] = FieldType("list", description="reason codes")
            continue
        kind = _field_type(info.annotation)
        if kind is not None:
            out[name] = kind
    out.update(DERIVED_SIGNAL_FIELDS.get(signal, {}))
    return out


def fields_for(signal: str | None) -> dict[str, FieldType]:
    """Every field a playbook with this trigger may name (``None``: a schedule trigger)."""
    out = dict(ACCOUNT_FIELDS)
    out.update({f"features.{name}": NUMBER for name in SCORE_FEATURES})
    if signal is not None:
        out.update({f"signal.{name}": kind for name, kind in signal_fields(signal).items()})
    return out


RECIPIENTS: Final[Mapping[str, str]] = {
    "csm": "the account's CSM (traits csm); Slack user or CSM id",
    "owner": "the account owner (traits owner), else the CSM",
    "admins": "the account's admin users (identify traits role admin/owner; its known users "
    "when none is an admin): their emails for email, their user ids for in_app",
    "contacts": "the account's known users, admins first, up to max_recipients",
    "respondent": "the user the signal is about (detractor_nps user_id), else the admins",
}
"""Recipient keywords of ``to:``; any other value is a literal (a Slack channel such as
``#cs-alerts``, an email address, a webhook name, a CSM queue)."""

MESSAGE_VARIABLES: Final[Mapping[str, str]] = {
    "account_id": "the account id",
    "account_name": "name from traits (else the id)",
    "plan": "plan from traits",
    "segment": "segment from traits",
    "arr": "ARR in the currency's minor unit (notify's convention for money)",
    "mrr": "MRR in the currency's minor unit",
    "currency": "ISO 4217, lower case",
    "health": "health 0-100",
    "previous_health": "health before a tier crossing",
    "tier": "risk tier",
    "previous_tier": "tier before a tier crossing",
    "churn_probability": "churn probability 0-1",
    "reasons": "top reasons: code, description, impact",
    "console_url": "the account in the console (CHURNGUARD_PLAYBOOKS_CONSOLE_URL)",
    "owner": "the account's CSM (notify shows it as the owner of the alert)",
    "csm_name": "the account's CSM",
    "account_owner": "the account owner (traits owner)",
    "days_to_renewal": "days to the renewal",
    "score": "the NPS answer (detractor_nps)",
    "comment": "the NPS comment (detractor_nps)",
    "user_name": "who answered (detractor_nps)",
    "features": "unadopted sticky features, the highest retention lift first",
    "feature": "the unadopted sticky feature with the highest retention lift",
    "help_url": "help for that feature (CHURNGUARD_PLAYBOOKS_HELP_URL/<feature>)",
    "expansion_reason": "why the account looks ready to buy more (expansion_signal)",
    "seats_utilisation": "seats used / bought (expansion_signal)",
    "milestone": "which milestone (milestone_reached)",
    "milestone_value": "the value reached (milestone_reached)",
    "playbook": "the playbook that decided",
    "signal_type": "the trigger",
    "signal_id": "the trigger's id",
}
"""Variables playbooks fills in for a message (those its template declares, when known)."""

DUNNING_VARIABLES: Final[Mapping[str, str]] = {
    "invoice_id": "the failed invoice",
    "amount": "the amount due, minor units",
    "decline_code": "the issuer's decline code",
    "attempts": "retries made",
    "next_retry_at": "when the next retry goes (a notice)",
    "update_payment_url": "where the customer updates the card (_UPDATE_PAYMENT_URL)",
    "final_state": "cancel, downgrade or keep_flagged",
}
"""Variables the dunning action adds for its messages."""


@dataclass(frozen=True)
class Template:
    """A message template notify renders: its channels, the variables it needs and the
    ones it also takes (notify refuses any other, so commands carry only these)."""

    name: str
    channels: tuple[str, ...]
    variables: frozenset[str]
    optional: frozenset[str] = frozenset()
    description: str = ""

    @property
    def accepted(self) -> frozenset[str]:
        return self.variables | self.optional


TemplateCatalogue = Mapping[str, Template]
