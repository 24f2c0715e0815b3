"""What every delivery channel implements, and the two kinds of failure.

A channel turns one command (a :class:`Job`) into one provider call. It says how its
failures classify (:class:`TransientError`: retry later; :class:`PermanentError`: fail
now with the reason) and what may be done when a process died *during* its provider call
and the result is unknown (:meth:`Channel.resolve_in_doubt`): a provider with an
idempotency key can simply be called again; one without must not be, unless the channel
can look the result up.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from churnguard.common.events.derived import (
    NotificationRequested,
    OutcomeStatus,
    PaymentRetryRequested,
)
from churnguard.notify.templates import Variables

Lane = str
"""A delivery lane: a notification channel name, or ``payment_retry``."""


class DeliveryError(Exception):
    """The provider call did not deliver. ``reason`` is shown in the outcome's detail."""

    def __init__(self, reason: str, *, response: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response if response is not None else reason


class TransientError(DeliveryError):
    """Worth retrying: 5xx, timeouts, connection errors, 429, SMTP 4xx.

    ``ambiguous``: the request may have reached the provider and taken effect (a timeout
    or a dropped connection after it was sent). The retry is then treated like an
    interrupted attempt: the channel's :meth:`Channel.resolve_in_doubt` decides first.
    """

    def __init__(
        self,
        reason: str,
        *,
        response: str | None = None,
        retry_after_s: float | None = None,
        ambiguous: bool = False,
    ) -> None:
        super().__init__(reason, response=response)
        self.retry_after_s = retry_after_s
        self.ambiguous = ambiguous


class PermanentError(DeliveryError):
    """No retry can help: invalid address, channel not found, not configured, hard decline."""


@dataclass(frozen=True)
class Job:
    """One delivery as a worker sees it: the command, its validated variables, its history."""

    delivery_id: int
    command: NotificationRequested | PaymentRetryRequested
    variables: Variables | None
    attempt: int
    """This attempt's number, from 1."""
    started_at: datetime | None = None
    """For in-doubt resolution: when the interrupted attempt started."""

    @property
    def command_id(self) -> str:
        return self.command.id


@dataclass(frozen=True)
class Sent:
    """The provider accepted the call; ``status`` is the outcome it leads to."""

    status: OutcomeStatus = "delivered"
    response: str = ""
    detail: str | None = None
    decline_code: str | None = None


@dataclass(frozen=True)
class Suppressed:
    """Do not send (e.g. the contact unsubscribed): a ``suppressed`` outcome."""

    reason: str


@dataclass(frozen=True)
class Deferred:
    """Not now (e.g. this Slack channel is rate limited): try again in ``delay_s``,
    without spending an attempt."""

    delay_s: float


class InDoubt(enum.Enum):
    """What became of an attempt whose process died during the provider call."""

    DELIVERED = "delivered"
    """The provider holds it (looked up): record it, do not send again."""
    SAFE_TO_SEND = "safe_to_send"
    """Not there, or the provider deduplicates by our key: send (again)."""
    UNKNOWN = "unknown"
    """Cannot tell: do not send again (at most once), report ``failed``."""


class Channel(abc.ABC):
    """One delivery channel (Slack, email, webhook, payment retry)."""

    lane: ClassVar[Lane]
    in_doubt_policy: ClassVar[str]
    """A sentence for logs and the README: what happens to an in-doubt attempt."""

    async def before_send(self, job: Job) -> Suppressed | Deferred | None:
        """Checks that need no provider call (suppression lists, local rate gates)."""
        return None

    @abc.abstractmethod
    async def send(self, job: Job) -> Sent:
        """The provider call; raises :class:`TransientError` or :class:`PermanentError`."""

    async def resolve_in_doubt(self, job: Job) -> InDoubt:
        """By default nothing can be looked up, so nothing is sent twice."""
        return InDoubt.UNKNOWN

    async def close(self) -> None:
        return None
