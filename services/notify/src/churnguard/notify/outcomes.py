"""Outcome events and dead letters, as outbox rows.

Each outcome's id is derived from (action id, status), so writing "delivered" for a
command twice (a replay, an in-doubt resolution) gives one id: the outbox refuses the
second row, and a consumer that sees a republished record can drop it by id.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from churnguard.common.events.derived import (
    ActionKind,
    ActionOutcome,
    ActionOutcomeData,
    NotificationChannel,
    NotificationRequested,
    OutcomeStatus,
    PaymentRetryRequested,
)
from churnguard.common.kafka import dead_letter_headers
from churnguard.common.topics import Topic

OUTCOME_NAMESPACE = uuid.UUID("5b0c8e0e-9d3f-4c1e-9d4e-6e6f74696679")
SOURCE = "/notify"
CONSUMER = "churnguard-notify"


def outcome_id(action_id: str, status: str) -> str:
    return str(uuid.uuid5(OUTCOME_NAMESPACE, f"{action_id}\x00{status}"))


def outcome(
    *,
    action_id: str,
    account_id: str,
    action: ActionKind,
    channel: NotificationChannel | None,
    status: OutcomeStatus,
    detail: str | None = None,
    decline_code: str | None = None,
) -> ActionOutcome:
    return ActionOutcome(
        id=outcome_id(action_id, status),
        source=SOURCE,
        time=datetime.now(UTC),
        subject=account_id,
        data=ActionOutcomeData(
            action_id=action_id,
            action=action,
            channel=channel if action == "notification" else None,
            status=status,
            detail=detail[:2000] if detail else None,
            decline_code=decline_code if status == "payment_failed" else None,
        ),
    )


def for_command(
    command: NotificationRequested | PaymentRetryRequested,
    status: OutcomeStatus,
    detail: str | None = None,
    decline_code: str | None = None,
) -> ActionOutcome:
    if isinstance(command, NotificationRequested):
        return outcome(
            action_id=command.id,
            account_id=command.subject,
            action="notification",
            channel=command.data.channel,
            status=status,
            detail=detail,
        )
    return outcome(
        action_id=command.id,
        account_id=command.subject,
        action="payment_retry",
        channel=None,
        status=status,
        detail=detail,
        decline_code=decline_code,
    )


@dataclass(frozen=True)
class OutboxRow:
    dedupe_key: str
    topic: str
    """A :class:`Topic` member's name (the prefix is applied when publishing)."""
    dead_letter: bool
    key: bytes | None
    value: bytes
    headers: list[tuple[str, str]]

    def values(self) -> dict[str, Any]:
        return {
            "dedupe_key": self.dedupe_key,
            "topic": self.topic,
            "dead_letter": int(self.dead_letter),
            "key": self.key,
            "value": self.value,
            "headers": [list(h) for h in self.headers],
        }


def outcome_row(event: ActionOutcome) -> OutboxRow:
    return OutboxRow(
        event.id, Topic.OUTCOMES.name, False, event.subject.encode(), event.to_json(), []
    )


def dead_letter_row(
    command: NotificationRequested | PaymentRetryRequested,
    *,
    source_topic: str | None,
    partition: int | None,
    offset: int | None,
    reason: str,
    error: str,
) -> OutboxRow:
    """The command, for its topic's dead-letter twin, with the churnguard.dlq.* headers."""
    topic = (
        Topic.NOTIFICATIONS
        if isinstance(command, NotificationRequested)
        else (Topic.PAYMENT_RETRIES)
    )
    headers = dead_letter_headers(
        topic=source_topic or topic.topic,
        partition=-1 if partition is None else partition,
        offset=-1 if offset is None else offset,
        headers=None,
        reason=reason,
        consumer=CONSUMER,
        error=error,
    )
    return OutboxRow(
        f"dlq:{command.id}",
        topic.name,
        True,
        command.subject.encode(),
        command.to_json(),
        [(k, v.decode()) for k, v in headers],
    )
