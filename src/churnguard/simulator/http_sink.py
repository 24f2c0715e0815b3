"""Replay a simulated world's events into ingest over HTTP, the way real producers would.

The simulator produces canonical churnguard events (CloudEvents 1.0 structured JSON, as in
``libs/common/src/churnguard/common/events/examples``). :class:`HttpReplay` sends each one
to ingest in the wire format of the system that would really produce it: product apps
speak the Segment HTTP API, the billing system sends Stripe webhooks, survey tools and the
help desk use churnguard's native endpoints. Ingest's Segment and Stripe endpoints are
written against this module, so **this docstring is the contract**; the pure functions
:func:`to_segment`, :func:`to_stripe` and :func:`stripe_signature` implement it.

Endpoints
=========

CloudEvent ``type`` (``churnguard.`` omitted) → request:

* ``usage.track``, ``usage.feature_used``, ``usage.identify``, ``usage.group`` →
  ``POST /v1/batch`` (Segment batch API)
* ``usage.seats_changed`` → ``POST /v1/events/usage`` (native)
* ``feedback.nps_submitted``, ``feedback.csat_submitted``, ``feedback.ticket_opened``,
  ``feedback.ticket_closed`` → ``POST /v1/events/feedback`` (native)
* ``billing.*`` → ``POST /v1/webhooks/stripe`` (Stripe webhook)

Any other type is not sent; it counts as rejected (a bug in the caller).

Authentication. Segment and native requests carry HTTP Basic auth with the write key as
user name and an empty password (``Authorization: Basic base64("<write_key>:")``), as
Segment's libraries do. Stripe webhooks carry no Basic auth, only ``Stripe-Signature``.

Segment batches (``POST /v1/batch``)
====================================

Body ``{"batch": [message, ...], "sentAt": "<ISO-8601 UTC, ms>", "context": {"library":
{"name": "churnguard-simulator", "version": "<churnguard version>"}}}``, ``Content-Type:
application/json``. A body larger than 1024 bytes is gzip-compressed and sent with
``Content-Encoding: gzip`` (smaller bodies are sent plain). A batch holds at most
``batch_size`` messages and at most 500,000 bytes of uncompressed JSON (Segment's 500 KB);
a message whose JSON exceeds 32 KiB (Segment's per-message limit) is not sent and counts
as rejected. ``sentAt`` is the (real) time of the request and is refreshed on a retry.

Every message has ``type``, ``messageId`` = the CloudEvent ``id`` (ingest's idempotency
key and the CloudEvent ``id`` it publishes), ``timestamp`` = the CloudEvent ``time``
verbatim, and ``context.groupId`` = the account id (the CloudEvent ``subject``). Keys
whose value would be null are omitted.

* ``usage.track`` → ``{"type": "track", "event": data.event, "userId": data.user_id,
  "anonymousId": data.anonymous_id, "properties": data.properties}``. Segment requires
  ``userId`` or ``anonymousId``; a track event with neither gets ``anonymousId =
  "account:<account id>"``.
* ``usage.feature_used`` → ``{"type": "track", "event": "Feature Used", "userId":
  data.user_id, "properties": {"feature": data.feature, "count": data.count}}`` (count
  defaults to 1). Ingest's inverse: a ``track`` whose ``event`` is exactly ``"Feature
  Used"`` and whose ``properties`` are exactly ``feature`` (a valid feature key) and
  ``count`` becomes ``usage.feature_used``; any other ``track`` becomes ``usage.track``.
* ``usage.identify`` → ``{"type": "identify", "userId": data.user_id, "traits":
  data.traits}``.
* ``usage.group`` → ``{"type": "group", "userId": data.user_id, "groupId": <account id>,
  "traits": data.traits}``.

The account of a message is ``context.groupId`` (for ``group`` also its ``groupId``; the
two are equal).

Native events (``/v1/events/usage``, ``/v1/events/feedback``)
=============================================================

The body is the CloudEvent itself (the JSON the simulator produced, unchanged), one event
per request, ``Content-Type: application/json``, never compressed.

Stripe webhooks (``POST /v1/webhooks/stripe``)
==============================================

The body is a Stripe ``Event``::

    {"id": "evt_…", "object": "event", "api_version": "2024-06-20", "created": <unix s>,
     "data": {"object": {…}, "previous_attributes": {…}},   # previous_attributes: updates only
     "livemode": false, "pending_webhooks": 1,
     "request": {"id": null, "idempotency_key": null}, "type": "<stripe type>"}

serialised as Stripe does (pretty-printed, two-space indent, UTF-8), with ``Content-Type:
application/json; charset=utf-8`` and ``Stripe-Signature: t=<unix>,v1=<hex>`` where hex is
``HMAC-SHA256(key=secret, msg=f"{t}.{body}")`` over the exact body bytes and ``t`` is the
real time of the delivery (recomputed on every retry; Stripe's libraries reject a ``t``
older than 5 minutes). ``created`` is the CloudEvent ``time`` in whole seconds (floor): it
is when the billing system says the thing happened, and becomes ingest's CloudEvent
``time``, as with Stripe test clocks whose events carry simulated times. The body is a
pure function of the CloudEvent, so a replay re-sends byte-identical bodies.

Ids. The Stripe event id is the CloudEvent id when that already looks like one
(``evt_`` followed by letters and digits), else ``"evt_" + sha256(cloudevent_id)[:24]``
(hex); ingest dedupes on it. The customer is ``customer_id(account) = "cus_" +
sha256(account_id)[:14]``; the hash is one-way, so ingest maps a customer back to its
account with ``metadata.account_id``, which every top-level ``data.object`` and every
per-customer nested object (charge, payment intent, refund, subscription item) carries
(catalogue objects, i.e. prices, do not). Derived ids (``h(x)`` = first 24 hex chars of
sha256 of the UTF-8 string ``x``): charge of an invoice attempt ``"ch_" +
h("charge:<invoice_id>:<attempt_count>")``; payment intent ``"pi_" +
h("pi:<invoice_id>")``; a refund without ``refund_id`` ``"re_" + h("re:<cloudevent id>")``;
subscription item ``"si_" + h("si:<subscription_id>:<price id>")``; product ``"prod_" +
h("prod:<plan>")``.

Types and objects:

* ``billing.invoice_created`` → ``invoice.created``; an ``invoice`` with ``status
  "draft"``, ``amount_due``, ``amount_paid`` 0, ``amount_remaining`` = ``amount_due``,
  ``attempt_count`` 0, ``billing_reason``, ``due_date`` = unix(``due_at``) or null and
  ``collection_method`` ``"send_invoice"`` when there is a due date, else
  ``"charge_automatically"``.
* ``billing.invoice_paid`` → ``invoice.paid``; ``status "paid"``, ``paid`` true,
  ``amount_paid`` = ``amount_due`` = data.amount_paid, ``attempt_count``, ``charge`` (id
  of the successful attempt's charge), ``status_transitions.paid_at``.
* ``billing.invoice_payment_failed`` → ``invoice.payment_failed``; ``status "open"``,
  ``amount_due``, ``attempt_count``, ``next_payment_attempt`` (unix or null),
  ``last_finalization_error`` null, and, **expanded** (Stripe sends ids; ingest cannot call
  back), ``charge``: a failed ``charge`` object with ``failure_code "card_declined"`` and
  **the decline code in** ``charge.outcome.reason`` (``outcome.type "issuer_declined"``),
  and ``payment_intent``: a ``payment_intent`` whose ``last_payment_error`` has ``code
  "card_declined"`` and the same ``decline_code``. Ingest reads ``charge.outcome.reason``,
  falls back to ``payment_intent.last_payment_error.decline_code``, then to
  ``charge.failure_code``. ``decline_kind`` is not on the wire: ingest derives it with
  :func:`churnguard.common.events.billing.decline_kind` (the simulator's kinds agree with it).
* ``billing.charge_refunded`` → ``charge.refunded``; a ``charge`` (``id`` = charge_id,
  ``invoice``, ``refunded`` true, ``amount`` = ``amount_captured`` = ``amount_refunded`` =
  data.amount) with its ``refunds`` list **expanded**: ``refunds.data[0]`` is this refund
  (``id``, ``amount``, ``reason``). Ingest takes the amount, refund id and reason from
  ``refunds.data[0]``. Stripe's ``reason`` is an enum (``duplicate``, ``fraudulent``,
  ``requested_by_customer``): another reason goes to ``refund.metadata.reason``
  (``reason`` null), so ingest's reason is ``reason or metadata.reason``.
* ``billing.subscription_created`` → ``customer.subscription.created``;
  ``billing.subscription_updated`` → ``customer.subscription.updated``;
  ``billing.subscription_cancelled`` → ``customer.subscription.deleted`` when the
  subscription ends at once (``status "canceled"``, or ``effective_at`` not after
  ``time``), with ``canceled_at`` = ``created`` and ``ended_at`` = unix(``effective_at``).
  A cancellation scheduled for the period end (``status`` not ``canceled`` and
  ``effective_at`` after ``time``) is, as in Stripe, ``customer.subscription.updated``
  with ``cancel_at_period_end`` true, ``cancel_at`` = ``current_period_end`` =
  unix(``effective_at``), ``canceled_at`` = ``created`` and ``previous_attributes``
  ``{"cancel_at_period_end": false, "cancel_at": null, "canceled_at": null,
  "cancellation_details": {all null}}``; ingest books that as the cancellation (Stripe
  sends ``customer.subscription.deleted`` again when it takes effect; the simulator does
  not, and ingest must not count a second churn for it).

  ``cancellation_details.reason`` is ``"payment_failed"`` for an involuntary cancellation,
  ``"cancellation_requested"`` for a voluntary one. The free-text ``reason`` is split into
  Stripe's ``feedback`` enum and ``comment``: ``"too_expensive"`` → feedback only;
  ``"too_expensive: budget cut"`` → feedback ``too_expensive``, comment ``budget cut``;
  text not starting with a feedback value → comment only; ``"payment_failed"`` on an
  involuntary cancellation → neither. Ingest's inverse: ``feedback + ": " + comment``,
  or whichever of the two is set, else ``"payment_failed"`` when involuntary, else null.

  The subscription object: ``id``, ``customer``, ``status``, ``currency``, ``items.data[]``
  (``price {id, lookup_key, unit_amount, unit_amount_decimal, currency, product,
  recurring {interval, interval_count 1, usage_type "licensed"}}``, ``quantity``),
  ``current_period_start``/``end`` (the trial for a trialing subscription; otherwise the
  event time plus one interval), ``trial_start``/``trial_end``, ``cancel_at_period_end``,
  ``cancel_at``, ``canceled_at``, ``ended_at``, ``cancellation_details {reason, feedback,
  comment}``, ``metadata``. ``created``/``start_date`` are the event time (the
  CloudEvent does not say when the subscription began).

  **Plan.** ``items.data[0]`` is the seat item: its ``quantity`` is ``data.quantity``; its
  price's ``id`` is ``data.plan`` when the plan is a Stripe price id (``price_…``), else
  ``lookup_key`` is ``data.plan`` and ``id`` is ``"price_" +
  h("price:<plan>:<currency>:<interval>:<unit_amount>")``. Ingest: ``plan =
  price.lookup_key or price.id``, ``interval = price.recurring.interval``.

  **MRR.** With ``k = 12`` for ``interval "year"`` and ``1`` for ``"month"``, the
  subscription's amount per interval is ``k * mrr`` cents, split over the items as
  ``unit_amount = (k * mrr) // quantity`` for the seat item (0 when ``quantity`` is 0) and,
  only when that leaves a remainder ``r = k * mrr - unit_amount * quantity``, a second
  item with ``unit_amount = r`` and ``quantity`` 1 (a flat fee, price lookup key
  ``churnguard_simulator_remainder``). Ingest normalises back with::

      mrr = sum(item.price.unit_amount * item.quantity for item in items.data) // k

  which is exact: the sum is ``k * mrr`` by construction. So an annual plan's per-seat
  ``unit_amount`` is 12 times the monthly per-seat price, and the examples (25 seats at 4900
  monthly; 10 seats, annual, mrr 24500 → unit_amount 29400) need no remainder item.

  ``previous_attributes`` of a ``customer.subscription.updated`` holds, as Stripe's does,
  the old values of what changed: ``status`` when ``previous_status`` differs, and
  ``items`` (the whole previous list, built from ``previous_mrr``, ``previous_plan`` or
  ``plan``, ``previous_quantity`` or ``quantity``) when the MRR, plan or quantity changed.
  Ingest: ``previous_mrr`` = the formula over ``previous_attributes.items`` when present,
  else ``mrr``; ``previous_quantity`` = the previous seat item's quantity and
  ``previous_plan`` = its plan when that differs from ``plan`` (both null without
  ``previous_attributes.items``); ``previous_status`` = ``previous_attributes.status``.

Not on the Segment or Stripe wire: the CloudEvent ``source`` and ``schemaversion`` (ingest
sets its own ``source``) and ``decline_kind`` (derived, see above).

Times: unix seconds (floor) wherever Stripe uses timestamps; ISO strings only in Segment.

Delivery
========

Fast mode (``speed=None``) sends as fast as ingest accepts. Real-time mode sends each
event at ``real_start + (event_time - sim_start) / speed`` (``speed`` = simulated seconds
per real second), where ``sim_start`` is the time of the first event not before
``paced_from``; events dated before ``paced_from`` (history, such as the subscriptions of
customers who signed up before the simulated period) are sent at once. Events are spread
over ``max_in_flight`` lanes by account (crc32 of the account id), each lane sending one
request at a time: one account's events reach ingest in stream order, across endpoints and
through retries, and at most ``max_in_flight`` requests are in flight. A lane collects
consecutive Segment messages into one batch until it is full, the lane has nothing more
queued, or a native or Stripe event of the lane comes next (batches grow by themselves
while a lane waits for a response; a replay of usage events alone sends full batches).

Responses: 2xx is success. 429, 408, 5xx and connection errors/timeouts are retried, up
to 5 tries in all, after ``Retry-After`` (seconds or an HTTP date) when given, else an
exponential backoff (0.5 s, 1 s, 2 s, … with jitter); after the last try the events count
as failed. Any other status (a 4xx: the mapping is wrong) is not retried: its events count
as rejected and the first response bodies are kept in :attr:`ReplayStats.rejected_samples`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import gzip
import hashlib
import hmac
import importlib.metadata
import logging
import random
import re
import time
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Final, Literal

import httpx
import orjson

log = logging.getLogger(__name__)

SEGMENT_BATCH_PATH: Final = "/v1/batch"
USAGE_PATH: Final = "/v1/events/usage"
FEEDBACK_PATH: Final = "/v1/events/feedback"
STRIPE_PATH: Final = "/v1/webhooks/stripe"

STRIPE_API_VERSION: Final = "2024-06-20"
LIBRARY_NAME: Final = "churnguard-simulator"
MAX_MESSAGE_BYTES: Final = 32 * 1024
"""Segment's per-message limit (32 KB), on the message's JSON."""
MAX_BATCH_BYTES: Final = 500_000
"""Segment's per-batch limit (500 KB), on the uncompressed body."""
GZIP_MIN_BYTES: Final = 1024
"""Segment bodies larger than this are gzip-compressed."""
MAX_REJECTED_SAMPLES: Final = 5
REMAINDER_LOOKUP_KEY: Final = "churnguard_simulator_remainder"

Route = Literal["segment", "usage", "feedback", "stripe"]
ProgressCallback = Callable[[int, datetime], None]

_SEGMENT_TYPES: Final = frozenset(
    {
        "churnguard.usage.track",
        "churnguard.usage.feature_used",
        "churnguard.usage.identify",
        "churnguard.usage.group",
    }
)
_NATIVE_USAGE_TYPES: Final = frozenset({"churnguard.usage.seats_changed"})
_FEEDBACK_TYPES: Final = frozenset(
    {
        "churnguard.feedback.nps_submitted",
        "churnguard.feedback.csat_submitted",
        "churnguard.feedback.ticket_opened",
        "churnguard.feedback.ticket_closed",
    }
)
_STRIPE_TYPES: Final[Mapping[str, str]] = {
    "churnguard.billing.invoice_created": "invoice.created",
    "churnguard.billing.invoice_paid": "invoice.paid",
    "churnguard.billing.invoice_payment_failed": "invoice.payment_failed",
    "churnguard.billing.subscription_created": "customer.subscription.created",
    "churnguard.billing.subscription_updated": "customer.subscription.updated",
    "churnguard.billing.subscription_cancelled": "customer.subscription.deleted",
    "churnguard.billing.charge_refunded": "charge.refunded",
}
_ROUTE_PATHS: Final[Mapping[Route, str]] = {
    "segment": SEGMENT_BATCH_PATH,
    "usage": USAGE_PATH,
    "feedback": FEEDBACK_PATH,
    "stripe": STRIPE_PATH,
}
STRIPE_CANCELLATION_FEEDBACK: Final = frozenset(
    {
        "customer_service",
        "low_quality",
        "missing_features",
        "other",
        "switched_service",
        "too_complex",
        "too_expensive",
        "unused",
    }
)
"""Stripe's ``cancellation_details.feedback`` values."""
STRIPE_REFUND_REASONS: Final = frozenset({"duplicate", "fraudulent", "requested_by_customer"})
_STRIPE_EVENT_ID = re.compile(r"^evt_[0-9A-Za-z]{1,250}$")


class UnsupportedEvent(ValueError):
    """The event's type has no wire mapping (not a usage, billing or feedback event)."""


# -- ids and small helpers ---------------------------------------------------------------


def _h(value: str, n: int = 24) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:n]


def customer_id(account_id: str) -> str:
    """The Stripe customer id of an account: ``"cus_" + sha256(account_id)[:14]``."""
    return "cus_" + _h(account_id, 14)


def stripe_event_id(cloudevent_id: str) -> str:
    """The Stripe event id of a CloudEvent: its id if already ``evt_…``, else a hash of it."""
    if _STRIPE_EVENT_ID.match(cloudevent_id):
        return cloudevent_id
    return "evt_" + _h(cloudevent_id)


def _charge_id(invoice_id: str, attempt: int) -> str:
    return "ch_" + _h(f"charge:{invoice_id}:{attempt}")


def _payment_intent_id(invoice_id: str) -> str:
    return "pi_" + _h(f"pi:{invoice_id}")


def _unix(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() // 1)


def _parse_time(iso: str) -> datetime:
    parsed = datetime.fromisoformat(iso)
    if parsed.tzinfo is None:
        raise ValueError(f"event time without a time zone: {iso!r}")
    return parsed


def _add_months(ts: int, months: int) -> int:
    moment = datetime.fromtimestamp(ts, UTC)
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    for day in (moment.day, 30, 29, 28):
        with contextlib.suppress(ValueError):
            return int(moment.replace(year=year, month=month, day=day).timestamp())
    raise AssertionError("unreachable")


def _iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def route_of(event: Mapping[str, Any]) -> Route:
    """Which endpoint an event goes to; :class:`UnsupportedEvent` for other types."""
    type_ = event.get("type")
    if type_ in _SEGMENT_TYPES:
        return "segment"
    if type_ in _NATIVE_USAGE_TYPES:
        return "usage"
    if type_ in _FEEDBACK_TYPES:
        return "feedback"
    if type_ in _STRIPE_TYPES:
        return "stripe"
    raise UnsupportedEvent(f"no wire mapping for event type {type_!r}")


def endpoint_of(event: Mapping[str, Any]) -> str:
    """The path an event is sent to (see the table in the module docstring)."""
    return _ROUTE_PATHS[route_of(event)]


# -- Segment -------------------------------------------------------------------------------


def to_segment(event: Mapping[str, Any]) -> dict[str, Any]:
    """The Segment message (``track``, ``identify`` or ``group``) of a usage CloudEvent."""
    type_ = event["type"]
    data: Mapping[str, Any] = event["data"]
    account = event["subject"]
    message: dict[str, Any]
    if type_ == "churnguard.usage.track":
        message = {"type": "track", "event": data["event"]}
        user_id, anonymous_id = data.get("user_id"), data.get("anonymous_id")
        if user_id is None and anonymous_id is None:
            anonymous_id = f"account:{account}"
        if user_id is not None:
            message["userId"] = user_id
        if anonymous_id is not None:
            message["anonymousId"] = anonymous_id
        message["properties"] = dict(data.get("properties") or {})
    elif type_ == "churnguard.usage.feature_used":
        message = {
            "type": "track",
            "event": "Feature Used",
            "userId": data["user_id"],
            "properties": {"feature": data["feature"], "count": data.get("count", 1)},
        }
    elif type_ == "churnguard.usage.identify":
        message = {"type": "identify", "userId": data["user_id"], "traits": data.get("traits", {})}
    elif type_ == "churnguard.usage.group":
        message = {
            "type": "group",
            "userId": data["user_id"],
            "groupId": account,
            "traits": data.get("traits", {}),
        }
    else:
        raise UnsupportedEvent(f"{type_!r} is not sent as a Segment message")
    message["messageId"] = event["id"]
    message["timestamp"] = event["time"]
    message["context"] = {"groupId": account}
    return message


def segment_batch_body(messages: Iterable[bytes], sent_at: str, version: str) -> bytes:
    """The ``/v1/batch`` body around already-serialised messages."""
    head, tail = _segment_envelope(sent_at, version)
    return head + b",".join(messages) + tail


def _segment_envelope(sent_at: str, version: str) -> tuple[bytes, bytes]:
    tail = orjson.dumps(
        {"sentAt": sent_at, "context": {"library": {"name": LIBRARY_NAME, "version": version}}}
    )
    return b'{"batch":[', b"]," + tail[1:]


# -- Stripe --------------------------------------------------------------------------------


def stripe_signature(secret: str, payload: bytes, t: int) -> str:
    """The ``Stripe-Signature`` header value: ``t=<t>,v1=<hex HMAC-SHA256(secret, "t.body")>``."""
    signed = str(t).encode() + b"." + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def stripe_prices(mrr: int, quantity: int, interval: str) -> list[tuple[int, int]]:
    """``(unit_amount, quantity)`` per subscription item so that the MRR round-trips exactly.

    ``sum(unit_amount * quantity) == k * mrr`` with ``k`` = 12 for yearly, 1 for monthly.
    """
    total = mrr * _months(interval)
    unit = total // quantity if quantity > 0 else 0
    remainder = total - unit * quantity
    items = [(unit, quantity)]
    if remainder:
        items.append((remainder, 1))
    return items


def _months(interval: str) -> int:
    if interval == "year":
        return 12
    if interval == "month":
        return 1
    raise ValueError(f"unsupported billing interval {interval!r}")


def stripe_event_type(event: Mapping[str, Any]) -> str:
    """The Stripe event type an event is sent as (scheduled cancellations are updates)."""
    type_ = event["type"]
    if type_ not in _STRIPE_TYPES:
        raise UnsupportedEvent(f"{type_!r} is not sent as a Stripe webhook")
    if type_ == "churnguard.billing.subscription_cancelled" and _cancel_is_scheduled(event):
        return "customer.subscription.updated"
    return _STRIPE_TYPES[type_]


def _cancel_is_scheduled(event: Mapping[str, Any]) -> bool:
    data = event["data"]
    return bool(data["status"] != "canceled" and _unix(data["effective_at"]) > _unix(event["time"]))


def to_stripe(event: Mapping[str, Any]) -> dict[str, Any]:
    """The Stripe ``Event`` of a billing CloudEvent (a pure function of the event).

    There is no ``now``: Stripe's ``created`` is the CloudEvent ``time``, and the delivery
    time only enters the signature (:func:`stripe_signature`).
    """
    stripe_type = stripe_event_type(event)
    type_ = event["type"]
    data: Mapping[str, Any] = event["data"]
    created = _unix(event["time"])
    account = event["subject"]
    body: dict[str, Any]
    previous: dict[str, Any] | None = None
    if type_.startswith("churnguard.billing.invoice_"):
        body = _invoice(type_, data, account, created)
    elif type_ == "churnguard.billing.charge_refunded":
        body = _refunded_charge(event["id"], data, account, created)
    else:
        body, previous = _subscription_event(type_, event, created)
    event_data: dict[str, Any] = {"object": body}
    if previous is not None:
        event_data["previous_attributes"] = previous
    return {
        "id": stripe_event_id(event["id"]),
        "object": "event",
        "api_version": STRIPE_API_VERSION,
        "created": created,
        "data": event_data,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": stripe_type,
    }


def stripe_body(event: Mapping[str, Any]) -> bytes:
    """The exact bytes of the webhook body (Stripe's pretty-printed JSON)."""
    return orjson.dumps(to_stripe(event), option=orjson.OPT_INDENT_2)


def _invoice(type_: str, data: Mapping[str, Any], account: str, created: int) -> dict[str, Any]:
    invoice_id: str = data["invoice_id"]
    currency = data["currency"]
    customer = customer_id(account)
    metadata = {"account_id": account}
    subscription = data.get("subscription_id")
    invoice: dict[str, Any] = {
        "id": invoice_id,
        "object": "invoice",
        "customer": customer,
        "subscription": subscription,
        "currency": currency,
        "created": created,
        "period_start": created,
        "period_end": created,
        "livemode": False,
        "last_finalization_error": None,
    }
    if type_ == "churnguard.billing.invoice_created":
        due_at = data.get("due_at")
        invoice |= {
            "status": "draft",
            "billing_reason": data.get("billing_reason"),
            "collection_method": "send_invoice" if due_at else "charge_automatically",
            "due_date": _unix(due_at) if due_at else None,
            "amount_due": data["amount_due"],
            "amount_paid": 0,
            "amount_remaining": data["amount_due"],
            "attempt_count": 0,
            "attempted": False,
            "paid": False,
            "next_payment_attempt": None,
            "charge": None,
            "payment_intent": None,
        }
    elif type_ == "churnguard.billing.invoice_paid":
        attempts = int(data.get("attempt_count", 1))
        invoice |= {
            "status": "paid",
            "billing_reason": "subscription_cycle" if subscription else "manual",
            "collection_method": "charge_automatically",
            "due_date": None,
            "amount_due": data["amount_paid"],
            "amount_paid": data["amount_paid"],
            "amount_remaining": 0,
            "attempt_count": attempts,
            "attempted": True,
            "paid": True,
            "next_payment_attempt": None,
            "charge": _charge_id(invoice_id, attempts),
            "payment_intent": _payment_intent_id(invoice_id),
            "status_transitions": {
                "finalized_at": None,
                "marked_uncollectible_at": None,
                "paid_at": created,
                "voided_at": None,
            },
        }
    elif type_ == "churnguard.billing.invoice_payment_failed":
        attempts = int(data["attempt_count"])
        code: str = data["decline_code"]
        charge_id = _charge_id(invoice_id, attempts)
        intent_id = _payment_intent_id(invoice_id)
        next_attempt = data.get("next_payment_attempt")
        message = "Your card was declined."
        invoice |= {
            "status": "open",
            "billing_reason": "subscription_cycle" if subscription else "manual",
            "collection_method": "charge_automatically",
            "due_date": None,
            "amount_due": data["amount_due"],
            "amount_paid": 0,
            "amount_remaining": data["amount_due"],
            "attempt_count": attempts,
            "attempted": True,
            "paid": False,
            "next_payment_attempt": _unix(next_attempt) if next_attempt else None,
            "charge": {
                "id": charge_id,
                "object": "charge",
                "amount": data["amount_due"],
                "amount_captured": 0,
                "amount_refunded": 0,
                "captured": False,
                "created": created,
                "currency": currency,
                "customer": customer,
                "invoice": invoice_id,
                "payment_intent": intent_id,
                "paid": False,
                "refunded": False,
                "status": "failed",
                "failure_code": "card_declined",
                "failure_message": message,
                "outcome": {
                    "network_status": "declined_by_network",
                    "reason": code,
                    "risk_level": "normal",
                    "seller_message": "The bank declined the payment.",
                    "type": "issuer_declined",
                },
                "livemode": False,
                "metadata": metadata,
            },
            "payment_intent": {
                "id": intent_id,
                "object": "payment_intent",
                "amount": data["amount_due"],
                "currency": currency,
                "customer": customer,
                "invoice": invoice_id,
                "status": "requires_payment_method",
                "last_payment_error": {
                    "type": "card_error",
                    "code": "card_declined",
                    "decline_code": code,
                    "message": message,
                    "charge": charge_id,
                },
                "livemode": False,
                "metadata": metadata,
            },
        }
    else:  # pragma: no cover - guarded by stripe_event_type
        raise UnsupportedEvent(type_)
    invoice["metadata"] = metadata
    return invoice


def _refunded_charge(
    cloudevent_id: str, data: Mapping[str, Any], account: str, created: int
) -> dict[str, Any]:
    charge_id: str = data["charge_id"]
    amount = data["amount"]
    currency = data["currency"]
    metadata = {"account_id": account}
    reason = data.get("reason")
    refund_metadata = dict(metadata)
    if reason is not None and reason not in STRIPE_REFUND_REASONS:
        refund_metadata["reason"] = reason
    refund = {
        "id": data.get("refund_id") or "re_" + _h(f"re:{cloudevent_id}"),
        "object": "refund",
        "amount": amount,
        "charge": charge_id,
        "created": created,
        "currency": currency,
        "reason": reason if reason in STRIPE_REFUND_REASONS else None,
        "status": "succeeded",
        "metadata": refund_metadata,
    }
    return {
        "id": charge_id,
        "object": "charge",
        "amount": amount,
        "amount_captured": amount,
        "amount_refunded": amount,
        "captured": True,
        "created": created,
        "currency": currency,
        "customer": customer_id(account),
        "invoice": data.get("invoice_id"),
        "paid": True,
        "refunded": True,
        "status": "succeeded",
        "refunds": {
            "object": "list",
            "data": [refund],
            "has_more": False,
            "total_count": 1,
            "url": f"/v1/charges/{charge_id}/refunds",
        },
        "livemode": False,
        "metadata": metadata,
    }


def _items(
    subscription_id: str,
    account: str,
    plan: str,
    interval: str,
    quantity: int,
    mrr: int,
    currency: str,
) -> dict[str, Any]:
    product = "prod_" + _h(f"prod:{plan}")
    rows = []
    for i, (unit_amount, qty) in enumerate(stripe_prices(mrr, quantity, interval)):
        if i == 0:
            lookup_key = None if plan.startswith("price_") else plan
            price_id = (
                plan
                if lookup_key is None
                else ("price_" + _h(f"price:{plan}:{currency}:{interval}:{unit_amount}"))
            )
        else:
            lookup_key = REMAINDER_LOOKUP_KEY
            price_id = "price_" + _h(f"price:{lookup_key}:{currency}:{interval}:{unit_amount}")
        rows.append(
            {
                "id": "si_" + _h(f"si:{subscription_id}:{price_id}"),
                "object": "subscription_item",
                "price": {
                    "id": price_id,
                    "object": "price",
                    "active": True,
                    "billing_scheme": "per_unit",
                    "currency": currency,
                    "lookup_key": lookup_key,
                    "product": product,
                    "recurring": {
                        "interval": interval,
                        "interval_count": 1,
                        "usage_type": "licensed",
                    },
                    "type": "recurring",
                    "unit_amount": unit_amount,
                    "unit_amount_decimal": str(unit_amount),
                },
                "quantity": qty,
                "subscription": subscription_id,
                "metadata": {"account_id": account},
            }
        )
    return {
        "object": "list",
        "data": rows,
        "has_more": False,
        "total_count": len(rows),
        "url": f"/v1/subscription_items?subscription={subscription_id}",
    }


def _split_reason(reason: str | None, cancellation: str) -> tuple[str | None, str | None]:
    """Free-text reason → Stripe's ``(feedback, comment)`` (see the module docstring)."""
    if reason is None or (cancellation == "involuntary" and reason == "payment_failed"):
        return None, None
    if reason in STRIPE_CANCELLATION_FEEDBACK:
        return reason, None
    head, sep, tail = reason.partition(": ")
    if sep and tail and head in STRIPE_CANCELLATION_FEEDBACK:
        return head, tail
    return None, reason


def _subscription_event(
    type_: str, event: Mapping[str, Any], created: int
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    data: Mapping[str, Any] = event["data"]
    account: str = event["subject"]
    sub_id: str = data["subscription_id"]
    interval: str = data["interval"]
    currency: str = data["currency"]
    months = _months(interval)
    trial_end = data.get("trial_end")
    status: str = data["status"]
    period_start = created
    period_end = _add_months(created, months)
    if trial_end and status == "trialing":
        period_end = _unix(trial_end)
    sub: dict[str, Any] = {
        "id": sub_id,
        "object": "subscription",
        "customer": customer_id(account),
        "status": status,
        "currency": currency,
        "created": created,
        "start_date": created,
        "billing_cycle_anchor": created,
        "collection_method": "charge_automatically",
        "items": _items(
            sub_id, account, data["plan"], interval, data["quantity"], data["mrr"], currency
        ),
        "current_period_start": period_start,
        "current_period_end": period_end,
        "trial_start": created if trial_end else None,
        "trial_end": _unix(trial_end) if trial_end else None,
        "cancel_at_period_end": False,
        "cancel_at": None,
        "canceled_at": None,
        "ended_at": None,
        "cancellation_details": {"reason": None, "feedback": None, "comment": None},
        "livemode": False,
        "metadata": {"account_id": account},
    }
    previous: dict[str, Any] | None = None
    if type_ == "churnguard.billing.subscription_updated":
        previous = {}
        previous_status = data.get("previous_status")
        if previous_status is not None and previous_status != status:
            previous["status"] = previous_status
        previous_plan = data.get("previous_plan") or data["plan"]
        previous_quantity = data.get("previous_quantity")
        if previous_quantity is None:
            previous_quantity = data["quantity"]
        previous_mrr = data.get("previous_mrr", data["mrr"])
        if (previous_plan, previous_quantity, previous_mrr) != (
            data["plan"],
            data["quantity"],
            data["mrr"],
        ):
            previous["items"] = _items(
                sub_id, account, previous_plan, interval, previous_quantity, previous_mrr, currency
            )
    elif type_ == "churnguard.billing.subscription_cancelled":
        feedback, comment = _split_reason(data.get("reason"), data["cancellation"])
        sub["cancellation_details"] = {
            "reason": "payment_failed"
            if data["cancellation"] == "involuntary"
            else "cancellation_requested",
            "feedback": feedback,
            "comment": comment,
        }
        effective = _unix(data["effective_at"])
        sub["canceled_at"] = created
        if _cancel_is_scheduled(event):
            sub["cancel_at_period_end"] = True
            sub["cancel_at"] = effective
            sub["current_period_end"] = effective
            sub["current_period_start"] = min(created, _add_months(effective, -months))
            previous = {
                "cancel_at_period_end": False,
                "cancel_at": None,
                "canceled_at": None,
                "cancellation_details": {"reason": None, "feedback": None, "comment": None},
            }
        else:
            sub["ended_at"] = effective
    return sub, previous


# -- delivery ------------------------------------------------------------------------------


@dataclass
class ReplayStats:
    """What a replay did. Event counts are CloudEvents; a Segment batch counts its messages."""

    sent_events: int = 0
    """Events ingest accepted (2xx)."""
    http_requests: int = 0
    """Requests made, retries included."""
    by_endpoint: dict[str, int] = field(default_factory=dict)
    """Accepted events per endpoint path."""
    requests_by_endpoint: dict[str, int] = field(default_factory=dict)
    """Requests per endpoint path, retries included."""
    rejected: int = 0
    """Events not delivered because of a mapping error: a 4xx (not 429/408), an oversized
    Segment message or an unsupported event. Never retried."""
    rejected_samples: list[str] = field(default_factory=list)
    """The first few rejections: ``"<path> <status>: <response body>"`` or the local reason."""
    failed: int = 0
    """Events given up after the last retry (429, 5xx, connection errors)."""
    retried: int = 0
    """Retries made (requests sent again)."""
    elapsed_s: float = 0.0
    events_per_s: float = 0.0
    max_lag_s: float = 0.0
    """Real-time mode: how far behind its due time an event was sent, at worst."""

    def add_rejected(self, n: int, sample: str) -> None:
        self.rejected += n
        if len(self.rejected_samples) < MAX_REJECTED_SAMPLES:
            self.rejected_samples.append(sample[:1000])


@dataclass
class _Clock:
    """The replay's simulated clock, for progress reports."""

    sim_start: datetime | None = None
    real_start: float = 0.0
    last: datetime | None = None
    """Time of the last event handed to a lane."""
    waiting_for: datetime | None = None
    """Real-time mode: the event being waited for, while waiting."""

    def now(self, speed: float | None) -> datetime | None:
        if speed is None or self.sim_start is None or self.waiting_for is None:
            return self.last
        running = self.sim_start + timedelta(seconds=(time.monotonic() - self.real_start) * speed)
        now = min(running, self.waiting_for)
        return now if self.last is None else max(now, self.last)


@dataclass
class _Lane:
    queue: asyncio.Queue[Mapping[str, Any] | None]
    batch: list[bytes] = field(default_factory=list)
    batch_bytes: int = 0


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _library_version() -> str:
    try:
        return importlib.metadata.version("churnguard")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


async def _aiter(
    events: AsyncIterable[Mapping[str, Any]] | Iterable[Mapping[str, Any]],
) -> AsyncIterator[Mapping[str, Any]]:
    if isinstance(events, AsyncIterable):
        async for event in events:
            yield event
    else:
        for event in events:
            yield event


class HttpReplay:
    """Sends a time-ordered stream of canonical events to ingest (see the module docstring).

    ``speed=None`` sends as fast as ingest accepts; otherwise ``speed`` simulated seconds
    pass per real second (8640: a simulated day every 10 s), from the first event dated at
    or after ``paced_from`` on; events dated before it are sent at once.
    """

    def __init__(
        self,
        base_url: str,
        *,
        write_key: str,
        stripe_secret: str,
        speed: float | None,
        batch_size: int = 100,
        max_in_flight: int = 4,
        timeout_s: float = 30,
        max_tries: int = 5,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        on_progress: ProgressCallback | None = None,
        progress_interval_s: float = 0.25,
        paced_from: datetime | None = None,
    ) -> None:
        if speed is not None and speed <= 0:
            raise ValueError("speed must be positive, or None for as fast as possible")
        if batch_size < 1 or max_in_flight < 1 or max_tries < 1:
            raise ValueError("batch_size, max_in_flight and max_tries must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.write_key = write_key
        self.stripe_secret = stripe_secret
        self.speed = speed
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.max_tries = max_tries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.on_progress = on_progress
        self.progress_interval_s = progress_interval_s
        self.paced_from = paced_from
        self._basic = "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()
        self._version = _library_version()
        self._user_agent = f"{LIBRARY_NAME}/{self._version}"
        self._envelope_bytes = sum(
            len(part) for part in _segment_envelope(_iso_now(), self._version)
        )

    async def replay(
        self,
        events: AsyncIterable[Mapping[str, Any]] | Iterable[Mapping[str, Any]],
        *,
        on_progress: ProgressCallback | None = None,
    ) -> ReplayStats:
        """Send every event; returns when all were answered (or given up). Never raises for
        HTTP trouble: look at the returned :class:`ReplayStats`."""
        stats = ReplayStats()
        progress = on_progress or self.on_progress
        started = time.monotonic()
        clock = _Clock()
        lanes = [
            _Lane(asyncio.Queue(maxsize=max(16, 2 * self.batch_size)))
            for _ in range(self.max_in_flight)
        ]
        limits = httpx.Limits(
            max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight
        )
        async with httpx.AsyncClient(
            base_url=self.base_url,
            timeout=self.timeout_s,
            limits=limits,
            headers={"User-Agent": self._user_agent},
        ) as client:
            workers = [asyncio.create_task(self._run_lane(lane, client, stats)) for lane in lanes]
            ticker = (
                asyncio.create_task(self._tick(progress, stats, clock))
                if progress is not None
                else None
            )
            try:
                await self._dispatch(events, lanes, workers, stats, clock)
                for lane in lanes:
                    await self._put(lane, None, workers)
                await asyncio.gather(*workers)
            finally:
                for task in workers:
                    task.cancel()
                if ticker is not None:
                    ticker.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                if ticker is not None:
                    await asyncio.gather(ticker, return_exceptions=True)
        stats.elapsed_s = time.monotonic() - started
        stats.events_per_s = stats.sent_events / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
        if progress is not None and clock.last is not None:
            progress(stats.sent_events, clock.last)
        return stats

    async def _dispatch(
        self,
        events: AsyncIterable[Mapping[str, Any]] | Iterable[Mapping[str, Any]],
        lanes: list[_Lane],
        workers: list[asyncio.Task[None]],
        stats: ReplayStats,
        clock: _Clock,
    ) -> None:
        async for event in _aiter(events):
            try:
                at = _parse_time(event["time"])
                account = str(event["subject"])
            except (KeyError, TypeError, ValueError) as exc:
                stats.add_rejected(1, f"event {event.get('id')!r} not replayable: {exc}")
                continue
            if self.speed is not None and (self.paced_from is None or at >= self.paced_from):
                if clock.sim_start is None:
                    clock.sim_start, clock.real_start = at, time.monotonic()
                due = clock.real_start + (at - clock.sim_start).total_seconds() / self.speed
                delay = due - time.monotonic()
                if delay > 0:
                    clock.waiting_for = at
                    await asyncio.sleep(delay)
                    clock.waiting_for = None
                else:
                    stats.max_lag_s = max(stats.max_lag_s, -delay)
            clock.last = at
            lane = lanes[zlib.crc32(account.encode()) % len(lanes)]
            await self._put(lane, event, workers)

    @staticmethod
    async def _put(
        lane: _Lane, item: Mapping[str, Any] | None, workers: list[asyncio.Task[None]]
    ) -> None:
        if not lane.queue.full():
            lane.queue.put_nowait(item)
            return
        put = asyncio.ensure_future(lane.queue.put(item))
        done, _ = await asyncio.wait({put, *workers}, return_when=asyncio.FIRST_COMPLETED)
        if put not in done:
            put.cancel()
            for task in done:
                task.result()  # re-raises the lane's crash
            raise RuntimeError("a replay lane stopped early")

    async def _tick(
        self,
        progress: ProgressCallback,
        stats: ReplayStats,
        clock: _Clock,
    ) -> None:
        while True:
            await asyncio.sleep(self.progress_interval_s)
            now = clock.now(self.speed)
            if now is not None:
                try:
                    progress(stats.sent_events, now)
                except Exception:
                    log.exception("progress callback failed")

    async def _run_lane(self, lane: _Lane, client: httpx.AsyncClient, stats: ReplayStats) -> None:
        while True:
            if lane.batch and lane.queue.empty():
                await self._flush(lane, client, stats)
            event = await lane.queue.get()
            if event is None:
                break
            try:
                route = route_of(event)
                if route == "segment":
                    message = orjson.dumps(to_segment(event))
                elif route == "stripe":
                    payload = stripe_body(event)
                else:
                    payload = orjson.dumps(event)
            except Exception as exc:
                stats.add_rejected(1, f"event {event.get('id')!r} not mapped: {exc!r}")
                continue
            if route == "segment":
                if len(message) > MAX_MESSAGE_BYTES:
                    stats.add_rejected(
                        1,
                        f"event {event['id']!r}: Segment message of {len(message)} bytes "
                        f"exceeds {MAX_MESSAGE_BYTES}",
                    )
                    continue
                size = self._envelope_bytes + lane.batch_bytes + len(lane.batch) + len(message)
                if lane.batch and size > MAX_BATCH_BYTES:
                    await self._flush(lane, client, stats)
                lane.batch.append(message)
                lane.batch_bytes += len(message)
                if len(lane.batch) >= self.batch_size:
                    await self._flush(lane, client, stats)
                continue
            if lane.batch:
                await self._flush(lane, client, stats)
            if route == "stripe":
                build = functools.partial(self._stripe_request, payload)
            else:
                build = functools.partial(self._native_request, payload)
            await self._post(client, stats, _ROUTE_PATHS[route], 1, build)
        if lane.batch:
            await self._flush(lane, client, stats)

    def _native_request(self, payload: bytes) -> tuple[bytes, dict[str, str]]:
        return payload, {"Authorization": self._basic, "Content-Type": "application/json"}

    def _stripe_request(self, payload: bytes) -> tuple[bytes, dict[str, str]]:
        return payload, {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            "Stripe-Signature": stripe_signature(self.stripe_secret, payload, int(time.time())),
        }

    async def _flush(self, lane: _Lane, client: httpx.AsyncClient, stats: ReplayStats) -> None:
        messages, lane.batch, lane.batch_bytes = lane.batch, [], 0

        def request() -> tuple[bytes, dict[str, str]]:
            body = segment_batch_body(messages, _iso_now(), self._version)
            headers = {"Authorization": self._basic, "Content-Type": "application/json"}
            if len(body) > GZIP_MIN_BYTES:
                body = gzip.compress(body, compresslevel=6)
                headers["Content-Encoding"] = "gzip"
            return body, headers

        await self._post(client, stats, SEGMENT_BATCH_PATH, len(messages), request)

    async def _post(
        self,
        client: httpx.AsyncClient,
        stats: ReplayStats,
        path: str,
        n_events: int,
        build: Callable[[], tuple[bytes, dict[str, str]]],
    ) -> None:
        for attempt in range(1, self.max_tries + 1):
            body, headers = build()
            stats.http_requests += 1
            stats.requests_by_endpoint[path] = stats.requests_by_endpoint.get(path, 0) + 1
            retry_after: float | None = None
            try:
                response = await client.post(path, content=body, headers=headers)
            except httpx.TransportError as exc:
                why = f"{type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if 200 <= status < 300:
                    stats.sent_events += n_events
                    stats.by_endpoint[path] = stats.by_endpoint.get(path, 0) + n_events
                    return
                if status not in (408, 429) and status < 500:
                    stats.add_rejected(n_events, f"{path} {status}: {response.text}")
                    log.warning("%s answered %s (not retried): %.500s", path, status, response.text)
                    return
                why = f"HTTP {status}"
                retry_after = _retry_after(response)
            if attempt == self.max_tries:
                stats.failed += n_events
                log.error("%s failed after %d tries (%s)", path, attempt, why)
                return
            stats.retried += 1
            if retry_after is None:
                backoff = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
                retry_after = backoff * random.uniform(0.5, 1.0)
            log.info("%s: %s, retry %d in %.2fs", path, why, attempt, retry_after)
            await asyncio.sleep(min(retry_after, self.backoff_max_s * 4))


__all__ = [
    "FEEDBACK_PATH",
    "SEGMENT_BATCH_PATH",
    "STRIPE_API_VERSION",
    "STRIPE_PATH",
    "USAGE_PATH",
    "HttpReplay",
    "ReplayStats",
    "UnsupportedEvent",
    "customer_id",
    "endpoint_of",
    "route_of",
    "stripe_body",
    "stripe_event_id",
    "stripe_event_type",
    "stripe_prices",
    "stripe_signature",
    "to_segment",
    "to_stripe",
]
