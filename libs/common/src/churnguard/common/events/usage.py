"""Product-usage events (topic ``events.usage``).

Ingest maps Segment-spec calls onto these: ``track`` → :class:`Track`, ``identify`` →
:class:`Identify`, ``group`` → :class:`Group`. :class:`FeatureUsed` and
:class:`SeatsChanged` are the typed native forms that product apps send when they know
what happened, and what scoring's features are made of.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from churnguard.common.events.base import CloudEvent, Payload, UserId

EventName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
FeatureKey = Annotated[
    str, StringConstraints(min_length=1, max_length=100, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
]
Traits = dict[str, Any]


class TrackData(Payload):
    user_id: UserId | None = None
    anonymous_id: str | None = Field(default=None, max_length=256)
    event: EventName
    properties: Traits = Field(default_factory=dict)


class Track(CloudEvent):
    """A user did something in the product (Segment ``track``)."""

    type: Literal["churnguard.usage.track"] = "churnguard.usage.track"
    data: TrackData


class IdentifyData(Payload):
    user_id: UserId
    traits: Traits = Field(default_factory=dict)


class Identify(CloudEvent):
    """Who a user is (Segment ``identify``): email, name, role, created_at."""

    type: Literal["churnguard.usage.identify"] = "churnguard.usage.identify"
    data: IdentifyData


class GroupData(Payload):
    user_id: UserId
    traits: Traits = Field(default_factory=dict)


class Group(CloudEvent):
    """A user belongs to the account in ``subject`` (Segment ``group``); traits describe it."""

    type: Literal["churnguard.usage.group"] = "churnguard.usage.group"
    data: GroupData


class FeatureUsedData(Payload):
    user_id: UserId
    feature: FeatureKey
    count: int = Field(default=1, ge=1, le=1_000_000, description="Uses folded into one event")


class FeatureUsed(CloudEvent):
    """A user used a product feature (the unit of adoption and activity)."""

    type: Literal["churnguard.usage.feature_used"] = "churnguard.usage.feature_used"
    data: FeatureUsedData


class SeatsChangedData(Payload):
    seats_purchased: int = Field(ge=0)
    seats_used: int = Field(ge=0)


class SeatsChanged(CloudEvent):
    """Seats bought and seats assigned changed (seat utilisation feature)."""

    type: Literal["churnguard.usage.seats_changed"] = "churnguard.usage.seats_changed"
    data: SeatsChangedData


UsageEvent = Annotated[
    Track | Identify | Group | FeatureUsed | SeatsChanged, Field(discriminator="type")
]
