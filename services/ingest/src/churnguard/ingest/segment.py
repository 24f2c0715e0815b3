"""The Segment HTTP Tracking API, mapped onto churnguard usage CloudEvents (pure, no I/O).

Ingest accepts what an unmodified Segment (or RudderStack) client sends: ``POST /v1/batch``
(alias ``/v1/b``) with ``{"batch": [message, ...], "sentAt": ..., "context": ...}`` and the
single-call endpoints ``/v1/track``, ``/v1/identify``, ``/v1/group``, ``/v1/page``,
``/v1/screen``, ``/v1/alias`` whose body is one message (its ``type`` implied by the path).
The wire contract of the simulator's producer is the module docstring of
``churnguard.simulator.http_sink``; this module is its inverse.

Request handling, in order (the HTTP layer does the I/O, this module everything else):

1. :func:`decode_body` undoes ``Content-Encoding: gzip`` (bounded, so a gzip bomb stops at
   the limit).
2. :func:`read_batch` / :func:`parse_single` check Segment's size limits
   (:data:`MAX_BATCH_BYTES` per batch request, :data:`MAX_EVENT_BYTES` per message; over
   the limit raises :class:`PayloadTooLarge`, HTTP 413) and the JSON structure (else
   :class:`SegmentError`, HTTP 400). Segment's libraries never send a message over 32 KB
   (they drop it client-side), so one in a batch means a broken client: the request is
   refused naming the message. (:func:`parse_batch` also applies the batch's fields to
   every message, which :func:`map_batch` can do in place.)
3. :func:`map_batch` maps every message as :func:`to_cloudevent` would; a message that does
   not map is reported as a :class:`Rejection` (index, field path, reason) while the valid
   ones are accepted, as the JSON ingest publishes. Well-formed ``track``, ``identify`` and
   ``group`` messages are mapped and checked against the event models' constraints
   without building a model (the throughput of one ingest worker depends on it); every
   other message is validated by its event model, whose errors name the field.

Mapping (Segment message → CloudEvent ``type``, ``churnguard.`` omitted)
=======================================================================

* ``track`` with ``event == "Feature Used"``, a ``userId``, and ``properties`` holding
  ``feature`` and at most ``count`` besides → ``usage.feature_used``: ``user_id`` = userId,
  ``feature`` = properties.feature, ``count`` = properties.count (default 1). An invalid
  feature key or count is rejected (``properties.feature`` / ``properties.count``).
* any other ``track`` → ``usage.track``: ``user_id`` = userId, ``anonymous_id`` =
  anonymousId, ``event``, ``properties``.
* ``page`` → ``usage.track`` with ``event`` "Page Viewed" and ``properties`` = the call's
  properties, plus the call's ``name`` and ``category``, plus ``url``, ``path``,
  ``title``, ``referrer``, ``search`` from ``context.page`` where properties lack them
  (analytics.js puts them in both).
* ``screen`` → ``usage.track`` with ``event`` "Screen Viewed" and ``properties`` plus
  ``name`` and ``category``.
* ``identify`` → ``usage.identify``: ``user_id`` = userId (required), ``traits``.
* ``group`` → ``usage.group``: ``user_id`` = userId (required), ``traits``; the account
  is the call's ``groupId``.
* ``alias`` → rejected (churnguard does not merge user identities); any other ``type``
  → rejected.

Segment's rule that ``track``, ``page`` and ``screen`` need ``userId`` or
``anonymousId`` is enforced (field ``userId``).

Context attributes, for every message:

* ``id`` = ``messageId`` (required: the idempotency key end to end; every Segment library
  sends one). A number is taken as its decimal string, as analytics-python does.
* ``subject`` (the account) = ``context.groupId``; for ``group`` the call's ``groupId``
  (a ``context.groupId`` that differs from it is rejected: which account is meant?);
  otherwise ``resolve_account(userId, anonymousId)``: the caller remembers users'
  accounts from earlier ``group`` calls, and :func:`map_batch` also learns from the
  ``group`` calls earlier in the same batch. Without any: rejected with
  :data:`NO_ACCOUNT`.
* ``time`` (in UTC): ``timestamp``, else ``originalTimestamp`` (RudderStack), else
  ``received_at``.
  When the message (or its batch) carries ``sentAt``, Segment's clock-skew correction
  applies, as its spec documents it: ``timestamp = receivedAt - (sentAt -
  originalTimestamp)``, the client's ``timestamp`` being Segment's ``originalTimestamp``.
  A time without a zone is read as UTC; one whose correction leaves the calendar is
  rejected (field ``timestamp``).
* ``source`` = the caller's (e.g. ``/ingest/segment``).

Batch-level ``sentAt`` and ``context`` apply to every message of the batch (a message's
own keys win), as in Segment's batch API. ``userId``/``anonymousId`` that are null or ``""``
count as absent (analytics-python sends nulls); numbers become strings.

What is lost
============

* Everything of ``context`` but ``groupId`` (and ``page`` for page calls), ``integrations``,
  ``sentAt``, ``receivedAt``, ``writeKey``, and ``anonymousId`` on identify, group and
  Feature Used calls: the CloudEvent data models have no place for them.
* ``time`` after skew correction is the corrected time, so it moves by the request's
  transit time plus the client's clock error (milliseconds for a server-side client).
* Round trip of the simulator's ``to_segment``: exact (id, type, subject, time, data) except
  a ``usage.track`` with neither ``user_id`` nor ``anonymous_id``, which comes back with
  ``anonymous_id = "account:<account>"`` (the sender's placeholder, kept as sent), and a
  ``usage.track`` named "Feature Used" whose properties are just a feature key and count,
  which comes back as ``usage.feature_used`` (the two are the same on the wire).
* A "Feature Used" track that also carries other properties, or no userId, stays a plain
  ``usage.track`` (nothing dropped, but scoring does not count it as feature use).
* Integers beyond 64 bits anywhere in a body make it invalid JSON here (orjson's limit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property, lru_cache
from typing import Annotated, Any, Final, get_args

import orjson
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from churnguard.common.events.base import CloudEvent
from churnguard.common.events.usage import (
    FeatureUsed,
    FeatureUsedData,
    Group,
    GroupData,
    Identify,
    IdentifyData,
    Track,
    TrackData,
)

MAX_EVENT_BYTES: Final = 32 * 1024
"""Segment's limit per message (a single-call request body, or one message of a batch)."""
MAX_BATCH_BYTES: Final = 500 * 1024
"""Segment's limit per batch request (uncompressed body)."""

FEATURE_USED_EVENT: Final = "Feature Used"
PAGE_VIEWED_EVENT: Final = "Page Viewed"
SCREEN_VIEWED_EVENT: Final = "Screen Viewed"
SINGLE_CALLS: Final = frozenset({"track", "identify", "group", "page", "screen", "alias"})
"""Call types that have their own endpoint, ``POST /v1/<type>``."""
NO_ACCOUNT: Final = "no account: set context.groupId or send a group call for this user first"
_PAGE_CONTEXT_KEYS: Final = ("path", "referrer", "search", "title", "url")
_FEATURE_USED_PROPERTIES: Final = frozenset({"feature", "count"})

AccountResolver = Callable[[str | None, str | None], str | None]
"""``(userId, anonymousId) -> account id or None``: accounts learnt from earlier group calls."""
SegmentEvent = Track | Identify | Group | FeatureUsed
_TYPES: Final[dict[type[SegmentEvent], str]] = {
    m: m.model_fields["type"].default for m in (Track, Identify, Group, FeatureUsed)
}
_EVENT: Final = TypeAdapter(Annotated[SegmentEvent, Field(discriminator="type")])


class SegmentError(ValueError):
    """A request or message that does not follow the Segment spec (HTTP 400).

    ``index`` is the message's position in the batch (None for the request itself or a
    single call); ``field`` is the path in Segment's terms, e.g.
    ``batch[3].context.groupId`` (``context.groupId`` for a single call).
    """

    status: int = 400

    def __init__(self, reason: str, index: int | None = None, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.index = index
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason


class PayloadTooLarge(SegmentError):
    """Over one of Segment's size limits (HTTP 413)."""

    status = 413


@dataclass(frozen=True)
class Rejection:
    """One message of a batch that was not accepted."""

    index: int
    field: str | None
    reason: str


@dataclass
class BatchResult:
    """The accepted events of a batch, as parallel lists in message order, and the rest."""

    ids: list[str] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    """The account of each accepted event."""
    types: list[str] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    """The CloudEvents JSON of each accepted event, what ingest publishes."""
    rejected: list[Rejection] = field(default_factory=list)
    users: dict[str, str] = field(default_factory=dict)
    """The account of each user the accepted events name (the last one, for a user with
    several): what the caller remembers for the user's later calls without an account."""

    @cached_property
    def accepted(self) -> list[SegmentEvent]:
        """The accepted events as models, decoded from their payloads."""
        return [_EVENT.validate_json(payload) for payload in self.payloads]


# -- requests -------------------------------------------------------------------------------


def _path(index: int | None, name: str | None) -> str | None:
    """The Segment field path of ``name`` in message ``index`` (None: a single call)."""
    if index is None:
        return name
    return f"batch[{index}]" if not name else f"batch[{index}].{name}"


def check_batch_size(body: bytes) -> None:
    """:class:`PayloadTooLarge` when a batch request's (uncompressed) body is over 500 KB."""
    if len(body) > MAX_BATCH_BYTES:
        raise PayloadTooLarge(
            f"batch request of {len(body)} bytes exceeds Segment's limit of {MAX_BATCH_BYTES}"
        )


def check_event_size(message: bytes | Mapping[str, Any], *, index: int | None = None) -> None:
    """:class:`PayloadTooLarge` when one message is over 32 KB.

    ``bytes`` are measured as sent (a single call's body); a parsed message as its compact
    JSON (what a batch message is at least on the wire).
    """
    size = len(message) if isinstance(message, bytes) else len(orjson.dumps(message))
    if size > MAX_EVENT_BYTES:
        raise PayloadTooLarge(
            f"message of {size} bytes exceeds Segment's limit of {MAX_EVENT_BYTES}",
            index=index,
            field=_path(index, None),
        )


def decode_body(
    body: bytes, content_encoding: str | None, *, limit: int = MAX_BATCH_BYTES
) -> bytes:
    """The body without its ``Content-Encoding`` (none or ``gzip``, as Segment accepts).

    Decompression stops past ``limit`` bytes with :class:`PayloadTooLarge`; a bad or
    truncated gzip stream or another encoding is a :class:`SegmentError`.
    """
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise SegmentError(f"unsupported Content-Encoding {content_encoding!r} (use gzip)")
    out = bytearray()
    rest = body
    try:
        while rest:
            inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            out += inflater.decompress(rest, limit + 1 - len(out))
            if len(out) > limit or inflater.unconsumed_tail:
                raise PayloadTooLarge(f"decompressed body exceeds {limit} bytes")
            if not inflater.eof:
                raise SegmentError("truncated gzip body")
            rest = inflater.unused_data  # a further gzip member, if any
    except zlib.error as exc:
        raise SegmentError(f"body is not valid gzip: {exc}") from exc
    return bytes(out)


def _load_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise SegmentError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise SegmentError(f"{what} must be a JSON object, not {_json_type(value)}")
    return value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


@dataclass(frozen=True)
class BatchRequest:
    """A ``/v1/batch`` body, checked: its messages as sent, and the batch-level fields that
    apply to each of them (a message's own keys win)."""

    messages: list[dict[str, Any]]
    sent_at: object = None
    """The batch's ``sentAt`` (not yet checked: a bad one is the messages' error)."""
    context: dict[str, Any] | None = None

    def merged(self) -> list[dict[str, Any]]:
        """Every message with the batch's ``sentAt`` and ``context`` applied."""
        return [_merge(m, self.sent_at, self.context) for m in self.messages]


def _merge(
    message: Mapping[str, Any], sent_at: object, context: Mapping[str, Any] | None
) -> dict[str, Any]:
    merged = dict(message)
    if sent_at is not None and merged.get("sentAt") is None:
        merged["sentAt"] = sent_at
    if context:
        own = merged.get("context")
        if own is None:
            merged["context"] = dict(context)
        elif isinstance(own, dict):
            merged["context"] = {**context, **own}
        # else: left as is, for to_cloudevent to reject
    return merged


def read_batch(body: bytes) -> BatchRequest:
    """A ``/v1/batch`` body as a :class:`BatchRequest`, its messages not yet merged.

    Raises :class:`PayloadTooLarge` for a body over 500 KB or a message over 32 KB (measured
    before the batch's fields are added), :class:`SegmentError` when the body is not a
    JSON object whose ``batch`` is an array of objects.
    """
    check_batch_size(body)
    envelope = _load_object(body, "body")
    if "batch" not in envelope:
        raise SegmentError("missing 'batch': a batch request is {\"batch\": [...]}", field="batch")
    batch = envelope["batch"]
    if not isinstance(batch, list):
        raise SegmentError(
            f"'batch' must be an array of messages, not {_json_type(batch)}", field="batch"
        )
    context = envelope.get("context")
    if context is not None and not isinstance(context, dict):
        raise SegmentError(f"must be an object, not {_json_type(context)}", field="context")
    for i, message in enumerate(batch):
        if type(message) is not dict:
            raise SegmentError(
                f"a message must be a JSON object, not {_json_type(message)}",
                index=i,
                field=_path(i, None),
            )
        check_event_size(message, index=i)
    return BatchRequest(batch, envelope.get("sentAt"), context)


def parse_batch(body: bytes) -> list[dict[str, Any]]:
    """The messages of a ``/v1/batch`` body, each with the batch's ``sentAt`` and ``context``
    (:func:`read_batch`, then :meth:`BatchRequest.merged`)."""
    return read_batch(body).merged()


def parse_single(kind: str, body: bytes) -> dict[str, Any]:
    """The message of a single-call endpoint ``/v1/<kind>``; its ``type`` is ``kind``.

    A body over 32 KB is :class:`PayloadTooLarge`; a body that is not a JSON object, or
    whose ``type`` names another call, is a :class:`SegmentError`.
    """
    if kind not in SINGLE_CALLS:
        raise SegmentError(f"unknown call {kind!r}: expected one of {sorted(SINGLE_CALLS)}")
    check_event_size(body)
    message = _load_object(body, "body")
    type_ = message.get("type")
    if type_ is None:
        message["type"] = kind
    elif type_ != kind:
        raise SegmentError(f"type {type_!r} does not match the endpoint /v1/{kind}", field="type")
    return message


# -- messages -------------------------------------------------------------------------------


def _parse_time(value: object, name: str, index: int | None) -> datetime:
    if not isinstance(value, str):
        raise SegmentError(
            f"must be an ISO-8601 date string, not {_json_type(value)}",
            index=index,
            field=_path(index, name),
        )
    try:
        return _from_iso(value)
    except ValueError:
        raise SegmentError(
            f"not an ISO-8601 date: {value[:64]!r}", index=index, field=_path(index, name)
        ) from None


@lru_cache(maxsize=1024)
def _from_iso(value: str) -> datetime:
    # cached: a batch's sentAt is the same for all its messages
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def event_time(message: Mapping[str, Any], received_at: datetime, index: int | None) -> datetime:
    """When the message happened, in UTC: its timestamp, corrected for clock skew when
    ``sentAt`` is given (``receivedAt - (sentAt - originalTimestamp)``, Segment's formula)."""
    received_at = _utc(received_at)
    for name in ("timestamp", "originalTimestamp"):
        if message.get(name) is not None:
            original = _parse_time(message[name], name, index)
            break
    else:
        return received_at
    if message.get("sentAt") is None:
        return _utc(original)
    sent_at = _parse_time(message["sentAt"], "sentAt", index)
    try:
        return received_at - (sent_at - original)
    except OverflowError:
        raise SegmentError(
            f"{message[name]!r} is out of range once corrected by sentAt {message['sentAt']!r}",
            index=index,
            field=_path(index, name),
        ) from None


def _utc(value: datetime) -> datetime:
    """UTC, which every published time is in (a naive time is taken as UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value if value.tzinfo is UTC else value.astimezone(UTC)


def _id(message: Mapping[str, Any], name: str, index: int | None) -> str | None:
    """An id field as a string: null and "" are absent, numbers are their decimal string."""
    value = message.get(name)
    if type(value) is str:
        return value or None
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise SegmentError(
        f"must be a string, not {_json_type(value)}", index=index, field=_path(index, name)
    )


def _object(
    message: Mapping[str, Any], name: str, index: int | None, *, prefix: str = ""
) -> dict[str, Any]:
    value = message.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SegmentError(
            f"must be an object, not {_json_type(value)}",
            index=index,
            field=_path(index, prefix + name),
        )
    return value


_DATA_FIELDS: Final[dict[str, dict[str, str]]] = {
    Track.model_fields["type"].default: {
        "user_id": "userId",
        "anonymous_id": "anonymousId",
        "event": "event",
        "properties": "properties",
    },
    FeatureUsed.model_fields["type"].default: {
        "user_id": "userId",
        "feature": "properties.feature",
        "count": "properties.count",
    },
    Identify.model_fields["type"].default: {"user_id": "userId", "traits": "traits"},
    Group.model_fields["type"].default: {"user_id": "userId", "traits": "traits"},
}


def _segment_field(loc: tuple[int | str, ...], event_type: str, account_field: str) -> str | None:
    """The Segment field a pydantic error location of the CloudEvent came from."""
    if not loc:
        return None
    head, rest = str(loc[0]), loc[1:]
    if head == "data" and rest:
        base = _DATA_FIELDS.get(event_type, {}).get(str(rest[0]), str(rest[0]))
        rest = rest[1:]
    else:
        base = {"id": "messageId", "time": "timestamp", "subject": account_field}.get(head, head)
    for part in rest:
        base += f"[{part}]" if isinstance(part, int) else f".{part}"
    return base


def _build(
    model: type[SegmentEvent],
    fields: dict[str, Any],
    *,
    index: int | None,
    account_field: str,
) -> SegmentEvent:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        reason = first["msg"]
        if len(errors) > 1:
            reason += f" (and {len(errors) - 1} more error(s))"
        event_type = model.model_fields["type"].default
        name = _segment_field(tuple(first["loc"]), event_type, account_field)
        raise SegmentError(reason, index=index, field=_path(index, name)) from None


def to_cloudevent(
    message: Mapping[str, Any],
    *,
    index: int | None,
    source: str,
    received_at: datetime,
    resolve_account: AccountResolver,
) -> SegmentEvent:
    """The churnguard usage CloudEvent of one Segment message (mapping: module docstring).

    ``index`` is the message's position in its batch (None for a single call): it prefixes
    the field paths of errors, ``batch[<index>].``. Raises :class:`SegmentError` with the
    reason and the Segment field when the message does not map.
    """
    model, fields, account_field = _fields(
        message,
        index=index,
        source=source,
        received_at=received_at,
        resolve_account=resolve_account,
    )
    return _build(model, fields, index=index, account_field=account_field)


def _fields(
    message: Mapping[str, Any],
    *,
    index: int | None,
    source: str,
    received_at: datetime,
    resolve_account: AccountResolver,
) -> tuple[type[SegmentEvent], dict[str, Any], str]:
    """The event model, its fields as CloudEvents JSON (not yet validated), and which
    Segment field holds the account; raises :class:`SegmentError` as :func:`to_cloudevent`.
    """

    def fail(reason: str, name: str | None) -> SegmentError:
        return SegmentError(reason, index=index, field=_path(index, name))

    if type(message) is not dict and not isinstance(message, Mapping):
        raise fail(f"a message must be a JSON object, not {_json_type(message)}", None)
    kind = message.get("type")
    if kind == "alias":
        raise fail(
            "alias is not supported: churnguard does not merge user identities; "
            "send identify and group calls with the user's final userId",
            "type",
        )
    if kind not in ("track", "page", "screen", "identify", "group"):
        raise fail(
            f"unsupported or missing type {kind!r}: expected track, identify, group, page "
            "or screen",
            "type",
        )
    message_id = _id(message, "messageId", index)
    if message_id is None:
        raise fail("messageId is required: it is the event's idempotency key", "messageId")
    user_id = _id(message, "userId", index)
    anonymous_id = _id(message, "anonymousId", index)
    context = _object(message, "context", index)
    try:
        context_group = _id(context, "groupId", None)
    except SegmentError as exc:
        raise fail(exc.reason, "context.groupId") from None

    account: str | None
    if kind == "group":
        account_field = "groupId"
        account = _id(message, "groupId", index)
        if account is None:
            raise fail("a group call needs a groupId (the account)", "groupId")
        if context_group is not None and context_group != account:
            raise fail(
                f"{context_group!r} differs from the group call's groupId {account!r}",
                "context.groupId",
            )
    else:
        account_field = "context.groupId"
        account = context_group or resolve_account(user_id, anonymous_id)
        if account is None:
            raise fail(NO_ACCOUNT, "context.groupId")

    time = event_time(message, received_at, index)
    fields: dict[str, Any] = {
        "specversion": "1.0",
        "id": message_id,
        "source": source,
        "type": "",  # set below, with data
        "time": time,  # a datetime: pydantic takes it as is, orjson writes it as ISO 8601
        "subject": account,
        "datacontenttype": "application/json",
        "schemaversion": 1,
    }
    model: type[SegmentEvent]
    if kind in ("identify", "group"):
        if user_id is None:
            raise fail(
                f"{kind} without userId is not supported: users are keyed by userId", "userId"
            )
        model = Identify if kind == "identify" else Group
        fields["type"] = _TYPES[model]
        fields["data"] = {"user_id": user_id, "traits": _object(message, "traits", index)}
        return model, fields, account_field

    if user_id is None and anonymous_id is None:
        raise fail("userId or anonymousId is required", "userId")
    properties = _object(message, "properties", index)  # copied below before any change
    event: object = message.get("event")
    if kind in ("page", "screen"):
        properties = dict(properties)
        event = PAGE_VIEWED_EVENT if kind == "page" else SCREEN_VIEWED_EVENT
        for name in ("name", "category"):
            if message.get(name) is not None:
                properties[name] = message[name]
        if kind == "page":
            page = _object(context, "page", index, prefix="context.")
            for key in _PAGE_CONTEXT_KEYS:
                if page.get(key) is not None and key not in properties:
                    properties[key] = page[key]
    elif (
        event == FEATURE_USED_EVENT
        and user_id is not None
        and "feature" in properties
        and properties.keys() <= _FEATURE_USED_PROPERTIES
    ):
        count = properties.get("count")
        fields["type"] = _TYPES[FeatureUsed]
        fields["data"] = {
            "user_id": user_id,
            "feature": properties["feature"],
            "count": 1 if count is None else count,
        }
        return FeatureUsed, fields, account_field
    data: dict[str, Any] = {"event": event, "properties": properties}
    if user_id is not None:
        data["user_id"] = user_id
    if anonymous_id is not None:
        data["anonymous_id"] = anonymous_id
    fields["type"] = _TYPES[Track]
    fields["data"] = data
    return Track, fields, account_field


def map_batch(
    messages: Sequence[Mapping[str, Any]],
    *,
    source: str,
    received_at: datetime,
    resolve_account: AccountResolver,
    sent_at: object = None,
    context: Mapping[str, Any] | None = None,
) -> BatchResult:
    """Map every message; the valid ones are accepted, each other one is a :class:`Rejection`.

    ``sent_at`` and ``context`` are the batch's own (:class:`BatchRequest`), applied to each
    message as :meth:`BatchRequest.merged` would; messages already merged need neither.
    A ``group`` call accepted earlier in the batch tells the account of its user to the
    messages after it (before ``resolve_account`` is asked).

    Each accepted event comes as its JSON (``payloads``), with its id, account and type.
    The common well-formed messages take :class:`_QuickMapper`, which checks them against
    the event models' own constraints without building a model; every other message is
    validated by the event model itself, which also words the error.
    """
    learned: dict[str, str] = {}

    def resolve(user_id: str | None, anonymous_id: str | None) -> str | None:
        if user_id is not None and user_id in learned:
            return learned[user_id]
        return resolve_account(user_id, anonymous_id)

    quick = _QuickMapper(source, received_at, sent_at, context)
    merge = sent_at is not None or bool(context)
    result = BatchResult()
    ids, subjects, types, payloads = result.ids, result.subjects, result.types, result.payloads
    users = result.users
    dumps = orjson.dumps
    utc_z = orjson.OPT_UTC_Z  # times as the event models write them
    for i, message in enumerate(messages):
        fields = quick(message, resolve)
        if fields is None:
            if merge and isinstance(message, Mapping):
                message = _merge(message, sent_at, context)
            try:
                fields = _validated_fields(message, i, source, received_at, resolve)
            except SegmentError as exc:
                result.rejected.append(Rejection(i, exc.field, exc.reason))
                continue
        data = fields["data"]
        subject = fields["subject"]
        event_type = fields["type"]
        if event_type == _GROUP_TYPE:
            learned[data["user_id"]] = subject
        user = data.get("user_id")
        if user is not None:
            users[user] = subject
        ids.append(fields["id"])
        subjects.append(subject)
        types.append(event_type)
        payloads.append(dumps(fields, option=utc_z))
    return result


def _validated_fields(
    message: Mapping[str, Any],
    index: int,
    source: str,
    received_at: datetime,
    resolve: AccountResolver,
) -> dict[str, Any]:
    """The CloudEvent fields of one message, validated by its event model (as
    :func:`to_cloudevent`); :class:`SegmentError` naming the field otherwise."""
    model, fields, account_field = _fields(
        message, index=index, source=source, received_at=received_at, resolve_account=resolve
    )
    event = _build(model, fields, index=index, account_field=account_field)
    if type(event) is FeatureUsed:
        fields["data"]["count"] = event.data.count  # as validated: "3" or 3.0 -> 3
    return fields


class _QuickMapper:
    """:func:`_fields` and the event model's validation together, for the messages
    well-behaved clients send, in a fraction of the time.

    It takes ``track``, ``identify`` and ``group`` messages whose ids are strings and whose
    times parse, applies the batch's ``sentAt`` and ``context`` in place rather than by
    copying every message, and checks every value against the constraints the event
    models declare (:data:`_LIMITS`, read from the models; values with a pattern are
    checked by pydantic itself, once per distinct value). It returns the CloudEvent
    fields of a message that the model would accept unchanged, and None for anything
    else, which the caller then validates with the model (which also words the error).
    For what it accepts it returns exactly what :func:`_fields` would and the model
    accepts as it is (a property test holds the two together).
    """

    def __init__(
        self,
        source: str,
        received_at: datetime,
        sent_at: object,
        context: Mapping[str, Any] | None,
    ) -> None:
        lo, hi = _LIMITS.source
        self.usable = type(source) is str and lo <= len(source) <= hi
        self.source = source
        self.received_at = _utc(received_at)
        self.sent_at = sent_at
        self.sent_at_time: datetime | None = None
        if type(sent_at) is str:
            # a bad one: the messages that need it go the long way, which words the error
            with contextlib.suppress(ValueError):
                self.sent_at_time = _from_iso(sent_at)
        self.group: str | None = None
        if context:
            group = context.get("groupId")
            if group is not None and type(group) is not str:
                self.usable = False  # a number, or an error to word: _fields does both
            else:
                self.group = group or None

    def __call__(
        self, message: Mapping[str, Any], resolve: AccountResolver
    ) -> dict[str, Any] | None:
        if not self.usable or type(message) is not dict:
            return None
        kind = message.get("type")
        message_id = message.get("messageId")
        if type(message_id) is not str or not 0 < len(message_id) <= _LIMITS.id_max:
            return None
        user = message.get("userId")
        if user is not None:
            if type(user) is not str:
                return None
            user = user or None
        anonymous = message.get("anonymousId")
        if anonymous is not None:
            if type(anonymous) is not str:
                return None
            anonymous = anonymous or None
        own = message.get("context")
        group: str | None
        if own is None:
            group = self.group
        elif type(own) is dict:
            if "groupId" in own:
                group = own["groupId"]
                if group is not None:
                    if type(group) is not str:
                        return None
                    group = group or None
            else:
                group = self.group
        else:
            return None
        account: object
        if kind == "track" or kind == "identify":
            account = group or resolve(user, anonymous)
        elif kind == "group":
            account = message.get("groupId")
            if type(account) is not str or not account or (group is not None and group != account):
                return None
        else:
            return None  # page, screen, alias, unknown: _fields
        if account is None or not _ACCOUNTS.valid(account):
            return None

        stamp = message.get("timestamp")
        if stamp is None:
            stamp = message.get("originalTimestamp")
        if stamp is None:
            time = self.received_at
        else:
            if type(stamp) is not str:
                return None
            try:
                time = _from_iso(stamp)
            except ValueError:
                return None
            sent_at = message.get("sentAt")
            sent_at_time: datetime | None
            if sent_at is None:
                sent_at, sent_at_time = self.sent_at, self.sent_at_time
            elif type(sent_at) is str:
                try:
                    sent_at_time = _from_iso(sent_at)
                except ValueError:
                    return None
            else:
                return None
            if sent_at is not None:
                if sent_at_time is None:
                    return None
                try:
                    time = self.received_at - (sent_at_time - time)
                except OverflowError:
                    return None
            elif time.tzinfo is not UTC:
                time = time.astimezone(UTC)

        fields: dict[str, Any] = {
            "specversion": "1.0",
            "id": message_id,
            "source": self.source,
            "type": "",
            "time": time,
            "subject": account,
            "datacontenttype": "application/json",
            "schemaversion": 1,
        }
        limits = _LIMITS
        if kind == "track":
            if user is None:
                if anonymous is None:
                    return None
            elif len(user) > limits.track_user_max:
                return None
            if anonymous is not None and len(anonymous) > limits.anonymous_max:
                return None
            properties = message.get("properties")
            if properties is None:
                properties = {}
            elif type(properties) is not dict:
                return None
            event = message.get("event")
            if (
                event == FEATURE_USED_EVENT
                and user is not None
                and "feature" in properties
                and properties.keys() <= _FEATURE_USED_PROPERTIES
            ):
                count = properties.get("count", 1)
                if count is None:
                    count = 1
                elif type(count) is not int or not limits.count_min <= count <= limits.count_max:
                    return None
                feature = properties["feature"]
                if len(user) > limits.feature_user_max or not _FEATURES.valid(feature):
                    return None
                fields["type"] = _FEATURE_USED_TYPE
                fields["data"] = {"user_id": user, "feature": feature, "count": count}
                return fields
            if type(event) is not str or not limits.event_min <= len(event) <= limits.event_max:
                return None
            data: dict[str, Any] = {"event": event, "properties": properties}
            if user is not None:
                data["user_id"] = user
            if anonymous is not None:
                data["anonymous_id"] = anonymous
            fields["type"] = _TRACK_TYPE
            fields["data"] = data
            return fields
        if user is None or len(user) > limits.traits_user_max:
            return None
        traits = message.get("traits")
        if traits is None:
            traits = {}
        elif type(traits) is not dict:
            return None
        fields["type"] = _GROUP_TYPE if kind == "group" else _IDENTIFY_TYPE
        fields["data"] = {"user_id": user, "traits": traits}
        return fields


def _constraints(model: type[BaseModel], name: str) -> dict[str, Any]:
    """The constraints pydantic applies to one field of a model, by name (``max_length``,
    ``ge``, ``pattern``...), including those of an ``Optional[Annotated[...]]``. Anything
    but plain constraints (a validator, say) raises: the quick path could not honour it."""
    info = model.model_fields[name]
    metadata = list(info.metadata)
    for arg in get_args(info.annotation):
        metadata += getattr(arg, "__metadata__", ())
    found: dict[str, Any] = {}
    for item in metadata:
        values = (
            {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
            if dataclasses.is_dataclass(item) and not isinstance(item, type)
            else {"?": item}
        )
        if not values.keys() <= _CONSTRAINT_NAMES:
            raise TypeError(f"{model.__name__}.{name}: {item!r} is not a plain constraint")
        found.update({k: v for k, v in values.items() if v is not None})
    return found


_CONSTRAINT_NAMES: Final = frozenset(
    {"min_length", "max_length", "pattern", "ge", "gt", "le", "lt", "multiple_of", "strict"}
    | {"strip_whitespace", "to_upper", "to_lower", "ascii_only"}
)


def _length_bounds(model: type[BaseModel], name: str) -> tuple[int, int]:
    """``(min_length, max_length)`` of a string field constrained by its length only."""
    found = _constraints(model, name)
    other = found.keys() - {"min_length", "max_length"}
    if other:  # the quick path would not check them: refuse to start rather than let through
        raise TypeError(f"{model.__name__}.{name} has constraints {sorted(other)}")
    return found.get("min_length", 0), found["max_length"]


def _int_bounds(model: type[BaseModel], name: str) -> tuple[int, int]:
    found = _constraints(model, name)
    if found.keys() != {"ge", "le"}:
        raise TypeError(f"{model.__name__}.{name} has constraints {sorted(found)}")
    return found["ge"], found["le"]


@dataclass(frozen=True)
class _Limits:
    """What the event models allow, read from them (the quick path checks these)."""

    id_max: int = _length_bounds(CloudEvent, "id")[1]
    source: tuple[int, int] = _length_bounds(CloudEvent, "source")
    track_user_max: int = _length_bounds(TrackData, "user_id")[1]
    anonymous_max: int = _length_bounds(TrackData, "anonymous_id")[1]
    event_min: int = _length_bounds(TrackData, "event")[0]
    event_max: int = _length_bounds(TrackData, "event")[1]
    feature_user_max: int = _length_bounds(FeatureUsedData, "user_id")[1]
    count_min: int = _int_bounds(FeatureUsedData, "count")[0]
    count_max: int = _int_bounds(FeatureUsedData, "count")[1]
    traits_user_max: int = min(  # identify and group: the stricter, the model has the last word
        _length_bounds(IdentifyData, "user_id")[1], _length_bounds(GroupData, "user_id")[1]
    )


_LIMITS: Final = _Limits()


class _KnownValid:
    """Values one model field accepts, as pydantic decides, remembered (accounts and
    feature keys repeat: their pattern is checked once per distinct value)."""

    def __init__(self, model: type[BaseModel], name: str, max_values: int = 100_000) -> None:
        self._adapter: TypeAdapter[Any] = TypeAdapter(model.model_fields[name].rebuild_annotation())
        self._valid: set[str] = set()
        self._max_values = max_values

    def valid(self, value: object) -> bool:
        if type(value) is not str:
            return False  # before the lookup: a list or an object is not even hashable
        if value in self._valid:
            return True
        try:
            if self._adapter.validate_python(value, strict=True) != value:
                return False  # the model would change it (say, to lower case): not as sent
        except ValidationError:
            return False
        if len(self._valid) >= self._max_values:
            self._valid.clear()
        self._valid.add(value)
        return True


_ACCOUNTS: Final = _KnownValid(CloudEvent, "subject")
_FEATURES: Final = _KnownValid(FeatureUsedData, "feature")
_TRACK_TYPE: Final = _TYPES[Track]
_FEATURE_USED_TYPE: Final = _TYPES[FeatureUsed]
_IDENTIFY_TYPE: Final = _TYPES[Identify]
_GROUP_TYPE: Final = _TYPES[Group]


__all__ = [
    "FEATURE_USED_EVENT",
    "MAX_BATCH_BYTES",
    "MAX_EVENT_BYTES",
    "NO_ACCOUNT",
    "PAGE_VIEWED_EVENT",
    "SCREEN_VIEWED_EVENT",
    "SINGLE_CALLS",
    "AccountResolver",
    "BatchRequest",
    "BatchResult",
    "PayloadTooLarge",
    "Rejection",
    "SegmentError",
    "SegmentEvent",
    "check_batch_size",
    "check_event_size",
    "decode_body",
    "event_time",
    "map_batch",
    "parse_batch",
    "parse_single",
    "read_batch",
    "to_cloudevent",
]
