"""The CloudEvents 1.0 shape every churnguard event shares.

Every event is a CloudEvent in *structured* JSON form: the context attributes
(``specversion``, ``id``, ``source``, ``type``, ``time``, ``subject``) sit beside
``data``, which holds the type-specific payload. ``subject`` is always the account id,
which is also what places the event on its Kafka partition, so one account's events
stay in order. ``id`` is the idempotency key end to end.

``schemaversion`` is a CloudEvents extension attribute (extension names must be
lower-case alphanumerics, hence no underscore); in Python it is ``schema_version``.
A type's schema version changes only with an incompatible change of its ``data``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

AccountId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]*$"),
]
"""The customer account (Segment's ``groupId``, Stripe's customer id mapped to an account)."""

UserId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
EventId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Money = Annotated[int, Field(ge=0, description="An amount in the currency's minor unit (cents)")]
Currency = Annotated[str, StringConstraints(pattern=r"^[a-z]{3}$")]
"""ISO 4217 code in lower case, as Stripe writes it."""

TYPE_PREFIX = "churnguard."


class Payload(BaseModel):
    """Base of every ``data`` model: unknown fields are an error, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CloudEvent(BaseModel):
    """Context attributes of a churnguard event (CloudEvents 1.0, structured JSON mode).

    Subclasses pin ``type`` to one ``Literal`` and ``data`` to one :class:`Payload`; the
    ``type`` literal is the discriminator of each topic's union of event models.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    SCHEMA_VERSION: ClassVar[int] = 1

    specversion: Literal["1.0"] = "1.0"
    id: EventId = Field(description="Unique per source; the idempotency key end to end")
    source: Annotated[str, StringConstraints(min_length=1, max_length=512)] = Field(
        description="URI-reference of the producer, e.g. /ingest/segment or /scoring"
    )
    type: str
    time: AwareDatetime = Field(description="When it happened (event time), with a time zone")
    subject: AccountId = Field(description="The account id; also the Kafka record key")
    datacontenttype: Literal["application/json"] = "application/json"
    schema_version: int = Field(default=1, ge=1, alias="schemaversion")
    data: Any

    @property
    def account_id(self) -> str:
        return self.subject

    def to_json(self) -> bytes:
        """Structured-mode JSON with the CloudEvents attribute names (aliases)."""
        # the model's serializer itself: what model_dump_json calls, without its ~1 us of
        # argument handling per call (ingest writes every native event with this)
        return self.__pydantic_serializer__.to_json(self, by_alias=True, exclude_none=True)
