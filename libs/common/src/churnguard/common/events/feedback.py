"""Customer-feedback events (topic ``events.feedback``).

Survey tools send NPS and CSAT answers, the help desk sends support tickets; ingest
turns them into these. Scoring reads them for the last NPS/CSAT and the support-ticket
features (count, priority, sentiment of the text); playbooks react to detractors.
The CloudEvent ``subject`` is the account, as everywhere; a ticket's own subject line
is ``data.subject``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from churnguard.common.events.base import CloudEvent, Payload, UserId

NpsBand = Literal["detractor", "passive", "promoter"]
TicketId = Annotated[str, StringConstraints(min_length=1, max_length=255)]
TicketChannel = Literal["email", "web", "chat", "phone", "slack", "in_app", "api", "other"]
TicketPriority = Literal["low", "normal", "high", "urgent"]
Comment = Annotated[str, StringConstraints(max_length=5000)]


def nps_band(score: int) -> NpsBand:
    """The NPS band of a 0-10 score: 0-6 detractor, 7-8 passive, 9-10 promoter."""
    if not 0 <= score <= 10:
        raise ValueError(f"NPS score must be 0..10, not {score}")
    if score <= 6:
        return "detractor"
    if score <= 8:
        return "passive"
    return "promoter"


class NpsSubmittedData(Payload):
    user_id: UserId
    score: int = Field(ge=0, le=10, description="How likely to recommend, 0-10")
    comment: Comment | None = None

    @property
    def band(self) -> NpsBand:
        """``detractor`` (0-6), ``passive`` (7-8) or ``promoter`` (9-10); derived, never sent."""
        return nps_band(self.score)


class NpsSubmitted(CloudEvent):
    """A user of the account answered an NPS survey.

    Produced by ingest (survey tool webhooks or the native endpoint); scoring keeps the
    account's last NPS and its band, playbooks alert the CSM about detractors.
    """

    type: Literal["churnguard.feedback.nps_submitted"] = "churnguard.feedback.nps_submitted"
    data: NpsSubmittedData


class CsatSubmittedData(Payload):
    user_id: UserId | None = None
    score: int = Field(ge=1, le=5, description="Satisfaction, 1 (very unsatisfied) to 5")
    comment: Comment | None = None
    ticket_id: TicketId | None = Field(
        default=None, description="The support ticket rated, when the survey followed one"
    )


class CsatSubmitted(CloudEvent):
    """A user of the account rated their satisfaction (usually after a support interaction).

    Produced by ingest; scoring keeps the account's last CSAT and its trend.
    """

    type: Literal["churnguard.feedback.csat_submitted"] = "churnguard.feedback.csat_submitted"
    data: CsatSubmittedData


class TicketOpenedData(Payload):
    ticket_id: TicketId
    user_id: UserId | None = Field(default=None, description="The requester, when known")
    subject: Annotated[str, StringConstraints(min_length=1, max_length=1000)] = Field(
        description="The ticket's subject line"
    )
    text: Annotated[str, StringConstraints(max_length=50_000)] = Field(
        description="The first message of the ticket (plain text)"
    )
    channel: TicketChannel
    priority: TicketPriority | None = None


class TicketOpened(CloudEvent):
    """A support ticket was opened by or for the account.

    Produced by ingest (help-desk webhooks); scoring counts open tickets and scores the
    sentiment of ``subject`` and ``text``.
    """

    type: Literal["churnguard.feedback.ticket_opened"] = "churnguard.feedback.ticket_opened"
    data: TicketOpenedData


class TicketClosedData(Payload):
    ticket_id: TicketId
    resolution: Annotated[str, StringConstraints(max_length=5000)] | None = Field(
        default=None, description="How it was resolved, as the agent wrote it"
    )
    satisfied: bool | None = Field(
        default=None, description="The requester's verdict, when the help desk asked"
    )


class TicketClosed(CloudEvent):
    """A support ticket was solved or closed.

    Produced by ingest; scoring uses time-to-resolution and ``satisfied``.
    """

    type: Literal["churnguard.feedback.ticket_closed"] = "churnguard.feedback.ticket_closed"
    data: TicketClosedData


FeedbackEvent = Annotated[
    NpsSubmitted | CsatSubmitted | TicketOpened | TicketClosed, Field(discriminator="type")
]
