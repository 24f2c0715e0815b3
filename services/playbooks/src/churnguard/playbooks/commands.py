"""Commands: their ids, their recipients and their payloads (pure).

Ids derive from the decision, never from a clock or a random source, so a decision that
is taken again (a redelivered signal, a timer fired twice across a crash) yields the
same ids, which notify delivers at most once:

* decision ``dec_<hash(signal id, playbook)>``;
* message ``<decision>.<action index>.<recipient index>``;
* dunning ``<case>.retry.<attempt>``, ``<case>.notice.<n>``, ``<case>.card.<after
  attempt>.<n>``, ``<case>.final.<n>`` (a case's id is the id of the decision that
  opened it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from churnguard.common.events.derived import (
    DecisionLogged,
    DecisionLoggedData,
    NotificationRequested,
    NotificationRequestedData,
    PaymentRetryRequested,
    PaymentRetryRequestedData,
)
from churnguard.common.topics import Topic

SOURCE: Final = "/playbooks"
ADMIN_ROLES: Final = frozenset({"admin", "owner", "billing", "billing_admin"})


def decision_id(signal_id: str, playbook: str) -> str:
    digest = hashlib.sha256(f"{signal_id}\x00{playbook}".encode()).hexdigest()
    return f"dec_{digest[:24]}"


@dataclass(frozen=True)
class Contact:
    user_id: str
    email: str | None
    role: str | None

    @property
    def is_admin(self) -> bool:
        return (self.role or "").lower() in ADMIN_ROLES


def resolve_recipients(
    to: str,
    channel: str,
    *,
    csm: str | None,
    owner: str | None,
    contacts: Sequence[Contact],
    respondent: str | None,
    fallback: str | None,
    limit: int,
) -> list[str]:
    """Who ``to`` means for this account on ``channel`` (see catalogue.RECIPIENTS)."""

    def address(c: Contact) -> str | None:
        return c.email if channel == "email" else c.user_id

    def users(selected: Sequence[Contact]) -> list[str]:
        return [a for a in (address(c) for c in selected) if a]

    # traits often lack a role: an account with no admin known is reached through the
    # users it has (admins first whenever there are some)
    admins = [c for c in contacts if c.is_admin] or list(contacts)
    match to:
        case "csm":
            found = [csm] if csm else []
        case "owner":
            found = [owner] if owner else ([csm] if csm else [])
        case "admins":
            found = users(admins)
        case "contacts":
            found = users(admins + [c for c in contacts if c not in admins])
        case "respondent":
            who = [c for c in contacts if c.user_id == respondent]
            if channel == "in_app" and respondent and not who:
                found = [respondent]
            else:
                found = users(who) or users(admins)
        case literal:
            found = [literal]
    if not found and fallback:
        found = [fallback]
    unique = list(dict.fromkeys(found))
    return unique[:limit]


@dataclass(frozen=True)
class Command:
    """One command bound for Kafka, as kept in the outbox until Kafka acknowledged it."""

    command_id: str
    topic: Topic
    account_id: str
    value: bytes
    decision_id: str
    received_at: datetime | None


def notification(
    *,
    command_id: str,
    account_id: str,
    at: datetime,
    channel: str,
    template: str,
    recipient: str,
    playbook: str,
    decision: str,
    priority: int,
    variables: Mapping[str, Any],
    received_at: datetime | None,
) -> Command:
    event = NotificationRequested(
        id=command_id,
        source=SOURCE,
        time=at,
        subject=account_id,
        data=NotificationRequestedData(
            channel=channel,  # validated by the loader
            template=template,
            recipient=recipient,
            playbook=playbook,
            decision_id=decision,
            priority=priority,
            variables=dict(variables),
        ),
    )
    return Command(
        command_id, Topic.NOTIFICATIONS, account_id, event.to_json(), decision, received_at
    )


def payment_retry(
    *,
    command_id: str,
    account_id: str,
    at: datetime,
    invoice_id: str,
    attempt: int,
    amount: int,
    currency: str,
    decline_code: str,
    playbook: str,
    decision: str,
    received_at: datetime | None,
) -> Command:
    event = PaymentRetryRequested(
        id=command_id,
        source=SOURCE,
        time=at,
        subject=account_id,
        data=PaymentRetryRequestedData(
            invoice_id=invoice_id,
            attempt=attempt,
            amount=amount,
            currency=currency,
            decline_code=decline_code,
            scheduled_for=at,
            playbook=playbook,
            decision_id=decision,
        ),
    )
    return Command(
        command_id, Topic.PAYMENT_RETRIES, account_id, event.to_json(), decision, received_at
    )


SUPPRESSION_REASONS: Final = {
    "cooldown": "cooldown",
    "budget": "contact_budget",
    "holdout": "holdout",
    "dedupe": "duplicate",
    "dunning": "dunning",
    "quiet_hours": "quiet_hours",
}
"""The decision log's reason classes as ``DecisionLogged`` names them."""


def decision_logged(
    *,
    decision: str,
    account_id: str,
    at: datetime,
    playbook: str,
    trigger_type: str,
    trigger_id: str,
    outcome: str,
    reason_class: str,
    reason: str | None,
    holdout: bool,
    commands: Sequence[str],
    priority: int,
) -> Command:
    """The decision for ``playbooks.decisions`` (its id is the decision's: published once)."""
    status = outcome if outcome in ("fired", "suppressed", "failed") else "failed"
    why = None if status == "fired" else SUPPRESSION_REASONS.get(reason_class, "other")
    event = DecisionLogged(
        id=decision,
        source=SOURCE,
        time=at,
        subject=account_id,
        data=DecisionLoggedData(
            decision_id=decision,
            playbook=playbook,
            trigger_type=trigger_type,
            trigger_id=trigger_id,
            status=status,
            reason=why,
            detail=None if reason is None else reason[:2000],
            holdout=holdout,
            commands=list(commands)[:50] if status == "fired" else [],
            priority=priority,
        ),
    )
    return Command(decision, Topic.DECISIONS, account_id, event.to_json(), decision, None)
