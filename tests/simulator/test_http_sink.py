"""The simulator's HTTP replay against a strict local receiver of each wire format.

The receiver (FastAPI under uvicorn, in a thread) checks what a real counterpart would:
Basic auth with the write key for Segment and native calls, Segment's batch fields and
limits, gzip bodies, the native events against the churnguard models, and Stripe
signatures with the real ``stripe`` library. The helpers ``subscription_from_stripe`` and
``mrr_from_items`` below are the inverse mapping ingest will implement, written from the
contract in ``churnguard.simulator.http_sink``'s docstring.
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
import pytest
import stripe
import uvicorn
from fastapi import FastAPI, Request, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from churnguard.common.events.billing import decline_kind
from churnguard.common.events.feedback import FeedbackEvent
from churnguard.common.events.schemas import example_files
from churnguard.common.events.usage import UsageEvent
from churnguard.devstack.process import free_port, wait_until
from churnguard.simulator.http_sink import (
    FEEDBACK_PATH,
    SEGMENT_BATCH_PATH,
    STRIPE_PATH,
    USAGE_PATH,
    HttpReplay,
    ReplayStats,
    customer_id,
    endpoint_of,
    stripe_event_id,
    stripe_prices,
    stripe_signature,
    to_segment,
    to_stripe,
)

WRITE_KEY = "wk_sim_3f9c2a"
STRIPE_SECRET = "whsec_test_6b1d0e8f4a2c47d9b3e5f1a7c9d2e4b6"
WRONG_SECRET = "whsec_test_not_the_endpoint_secret"
SEGMENT_BATCH_LIMIT = 500 * 1000  # Segment: 500 KB per batch request
SEGMENT_MESSAGE_LIMIT = 32 * 1024  # Segment: 32 KB per message

Event = dict[str, Any]


# -- the receiver ------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SegmentLibrary(_Strict):
    name: Literal["churnguard-simulator"]
    version: str = Field(min_length=1)


class SegmentBatchContext(_Strict):
    library: SegmentLibrary


class SegmentMessage(_Strict):
    """Segment's spec fields of track / identify / group (no others)."""

    type: Literal["track", "identify", "group"]
    messageId: str = Field(min_length=1)
    timestamp: AwareDatetime
    userId: str | None = None
    anonymousId: str | None = None
    event: str | None = None
    properties: dict[str, Any] | None = None
    traits: dict[str, Any] | None = None
    groupId: str | None = None
    context: dict[str, Any]
    integrations: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _per_type(self) -> SegmentMessage:
        if self.userId is None and self.anonymousId is None:
            raise ValueError("userId or anonymousId is required")
        present = {
            name
            for name in ("event", "properties", "traits", "groupId")
            if getattr(self, name) is not None
        }
        required = {
            "track": {"event", "properties"},
            "identify": {"traits"},
            "group": {"groupId", "traits"},
        }[self.type]
        if present != required:
            raise ValueError(f"{self.type} needs exactly {sorted(required)}, has {sorted(present)}")
        return self


class SegmentBatch(_Strict):
    batch: list[SegmentMessage] = Field(min_length=1)
    sentAt: AwareDatetime
    context: SegmentBatchContext
    integrations: dict[str, Any] | None = None


@dataclass
class Received:
    path: str
    ids: list[str]
    body: Any
    size: int
    """Uncompressed body size."""
    gzipped: bool


@dataclass
class Recorder:
    """What the receiver accepted, in arrival order, and every attempt it saw."""

    received: list[Received] = field(default_factory=list)
    attempts: list[tuple[str, list[str], int]] = field(default_factory=list)
    plans: dict[str, deque[tuple[int, dict[str, str], str]]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def plan(self, path: str, *responses: tuple[int, dict[str, str], str]) -> None:
        self.plans.setdefault(path, deque()).extend(responses)

    def ids_at(self, path: str) -> list[str]:
        return [i for r in self.received if r.path == path for i in r.ids]

    def bodies_at(self, path: str) -> list[Any]:
        return [r.body for r in self.received if r.path == path]

    def segment_messages(self) -> list[dict[str, Any]]:
        return [m for body in self.bodies_at(SEGMENT_BATCH_PATH) for m in body["batch"]]


_USAGE = TypeAdapter(UsageEvent)
_FEEDBACK = TypeAdapter(FeedbackEvent)
_BASIC = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()


def _ids(path: str, body: Any) -> list[str]:
    try:
        if path == SEGMENT_BATCH_PATH:
            return [str(m.get("messageId")) for m in body["batch"]]
        return [str(body["id"])]
    except (KeyError, TypeError):
        return []


def make_receiver(rec: Recorder) -> FastAPI:
    app = FastAPI()

    async def handle(request: Request, path: str) -> Response:
        raw = await request.body()
        gzipped = request.headers.get("content-encoding") == "gzip"
        if gzipped:
            raw = gzip.decompress(raw)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        ids = _ids(path, body)

        def refuse(status: int, why: str) -> Response:
            with rec.lock:
                rec.attempts.append((path, ids, status))
                rec.violations.append(f"{path}: {why}")
            return Response(why, status_code=status)

        with rec.lock:
            plan = rec.plans.get(path)
            planned = plan.popleft() if plan else None
        if planned is not None:
            status, headers, text = planned
            with rec.lock:
                rec.attempts.append((path, ids, status))
            return Response(text, status_code=status, headers=headers)

        if not request.headers.get("content-type", "").startswith("application/json"):
            return refuse(415, "content-type is not application/json")
        if body is None:
            return refuse(400, "body is not JSON")
        if path == STRIPE_PATH:
            if "authorization" in request.headers:
                return refuse(400, "Stripe sends no Authorization header")
            sig = request.headers.get("stripe-signature")
            try:
                stripe.Webhook.construct_event(raw, sig, STRIPE_SECRET)
            except stripe.SignatureVerificationError as exc:
                return refuse(400, f"bad signature: {exc}")
            try:
                stripe.Webhook.construct_event(raw, sig, WRONG_SECRET)
            except stripe.SignatureVerificationError:
                pass
            else:
                return refuse(400, "signature also verified with the wrong secret")
        else:
            if request.headers.get("authorization") != _BASIC:
                return refuse(401, "Basic auth is not the write key with an empty password")
            if path == SEGMENT_BATCH_PATH:
                if len(raw) > SEGMENT_BATCH_LIMIT:
                    return refuse(400, f"batch of {len(raw)} bytes")
                for message in body.get("batch", []):
                    if len(orjson.dumps(message)) > SEGMENT_MESSAGE_LIMIT:
                        return refuse(400, "message over 32 KB")
                try:
                    SegmentBatch.model_validate(body)
                except ValueError as exc:
                    return refuse(400, str(exc))
            else:
                adapter = _USAGE if path == USAGE_PATH else _FEEDBACK
                try:
                    adapter.validate_json(raw)
                except ValueError as exc:
                    return refuse(422, str(exc))
        with rec.lock:
            rec.attempts.append((path, ids, 200))
            rec.received.append(Received(path, ids, body, len(raw), gzipped))
        return Response('{"success":true}', status_code=200, media_type="application/json")

    def endpoint_for(path: str) -> Any:
        async def endpoint(request: Request) -> Response:
            return await handle(request, path)

        return endpoint

    for path in (SEGMENT_BATCH_PATH, USAGE_PATH, FEEDBACK_PATH, STRIPE_PATH):
        app.add_api_route(path, endpoint_for(path), methods=["POST"])
    return app


@dataclass
class Receiver:
    url: str
    recorder: Recorder


@pytest.fixture(scope="module")
def receiver_server() -> Iterator[Receiver]:
    rec = Recorder()
    port = free_port()
    config = uvicorn.Config(
        make_receiver(rec), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="receiver", daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=15, what="receiver", alive=thread.is_alive)
    yield Receiver(f"http://127.0.0.1:{port}", rec)
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def receiver(receiver_server: Receiver) -> Receiver:
    """The module's receiver with a fresh recorder."""
    rec = receiver_server.recorder
    with rec.lock:
        rec.received.clear()
        rec.attempts.clear()
        rec.plans.clear()
        rec.violations.clear()
    return receiver_server


def replayer(url: str, **kwargs: Any) -> HttpReplay:
    options: dict[str, Any] = {"speed": None, "backoff_base_s": 0.01} | kwargs
    return HttpReplay(url, write_key=WRITE_KEY, stripe_secret=STRIPE_SECRET, **options)


def assert_clean(stats: ReplayStats, rec: Recorder, sent: int) -> None:
    assert rec.violations == []
    assert stats.rejected_samples == []
    assert (stats.sent_events, stats.rejected, stats.failed) == (sent, 0, 0)


# -- the events --------------------------------------------------------------------------


def wire_id(event: Event) -> str:
    """The id an event travels under: the Stripe event id for billing, else its own."""
    return stripe_event_id(event["id"]) if endpoint_of(event) == STRIPE_PATH else event["id"]


def _when(event: Event) -> datetime:
    return datetime.fromisoformat(event["time"])


def example_events() -> list[Event]:
    """Every checked-in usage, billing and feedback example, in time order."""
    events = [
        json.loads(path.read_bytes())
        for path in example_files()
        if path.parent.name.split(".")[1] in ("usage", "billing", "feedback")
    ]
    return sorted(events, key=_when)


EXAMPLES = example_events()
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def track(event_id: str, account: str, at: datetime, **properties: Any) -> Event:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "/simulator/app",
        "type": "churnguard.usage.track",
        "time": _iso(at),
        "subject": account,
        "schemaversion": 1,
        "data": {"user_id": f"{account}_u1", "event": "Report Viewed", "properties": properties},
    }


def nps(event_id: str, account: str, at: datetime, score: int = 8) -> Event:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "/simulator/surveys",
        "type": "churnguard.feedback.nps_submitted",
        "time": _iso(at),
        "subject": account,
        "schemaversion": 1,
        "data": {"user_id": f"{account}_u1", "score": score},
    }


def seats(event_id: str, account: str, at: datetime) -> Event:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "/simulator/app",
        "type": "churnguard.usage.seats_changed",
        "time": _iso(at),
        "subject": account,
        "schemaversion": 1,
        "data": {"seats_purchased": 10, "seats_used": 7},
    }


def paid(event_id: str, account: str, at: datetime) -> Event:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "/simulator/billing",
        "type": "churnguard.billing.invoice_paid",
        "time": _iso(at),
        "subject": account,
        "schemaversion": 1,
        "data": {
            "invoice_id": f"in_{event_id}",
            "subscription_id": f"sub_{account}",
            "amount_paid": 4900,
            "currency": "usd",
            "attempt_count": 1,
        },
    }


def subscription_event(kind: str, event_id: str, account: str, **data: Any) -> Event:
    base = {
        "subscription_id": f"sub_{account}",
        "plan": "team",
        "interval": "month",
        "quantity": 3,
        "mrr": 1000,
        "currency": "usd",
        "status": "active",
    }
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "/simulator/billing",
        "type": f"churnguard.billing.subscription_{kind}",
        "time": _iso(T0),
        "subject": account,
        "schemaversion": 1,
        "data": base | data,
    }


# -- the inverse mapping ingest will implement (from the contract) ---------------------


def mrr_from_items(items: dict[str, Any]) -> int:
    """Ingest's normalisation: sum(unit_amount * quantity) per interval, to a month."""
    rows = items["data"]
    interval = rows[0]["price"]["recurring"]["interval"]
    assert all(r["price"]["recurring"]["interval"] == interval for r in rows)
    assert all(r["price"]["recurring"]["interval_count"] == 1 for r in rows)
    months = {"month": 1, "year": 12}[interval]
    total = sum(r["price"]["unit_amount"] * r["quantity"] for r in rows)
    assert total % months == 0, "the contract promises an exact division"
    return total // months


def _ts(value: int | None) -> str | None:
    return None if value is None else _iso(datetime.fromtimestamp(value, UTC))


def _plan(items: dict[str, Any]) -> str:
    price = items["data"][0]["price"]
    return str(price["lookup_key"] or price["id"])


def subscription_from_stripe(stripe_event: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A ``customer.subscription.*`` webhook → (churnguard type, data), per the contract."""
    sub = stripe_event["data"]["object"]
    previous = stripe_event["data"].get("previous_attributes", {})
    items = sub["items"]
    data: dict[str, Any] = {
        "subscription_id": sub["id"],
        "plan": _plan(items),
        "interval": items["data"][0]["price"]["recurring"]["interval"],
        "quantity": items["data"][0]["quantity"],
        "mrr": mrr_from_items(items),
        "currency": sub["currency"],
        "status": sub["status"],
    }
    kind = stripe_event["type"].rsplit(".", 1)[1]
    scheduled = sub["cancel_at_period_end"] and previous.get("cancel_at_period_end") is False
    if kind == "deleted" or scheduled:
        details = sub["cancellation_details"]
        involuntary = details["reason"] in ("payment_failed", "payment_disputed")
        feedback, comment = details["feedback"], details["comment"]
        reason = f"{feedback}: {comment}" if feedback and comment else feedback or comment
        data |= {
            "cancellation": "involuntary" if involuntary else "voluntary",
            "reason": reason or ("payment_failed" if involuntary else None),
            "effective_at": _ts(sub["cancel_at"] if scheduled else sub["ended_at"]),
        }
        return "churnguard.billing.subscription_cancelled", data
    if kind == "created":
        if sub["trial_end"] is not None:
            data["trial_end"] = _ts(sub["trial_end"])
        return "churnguard.billing.subscription_created", data
    data["previous_mrr"] = data["mrr"]
    if "items" in previous:
        data["previous_mrr"] = mrr_from_items(previous["items"])
        data["previous_quantity"] = previous["items"]["data"][0]["quantity"]
        if _plan(previous["items"]) != data["plan"]:
            data["previous_plan"] = _plan(previous["items"])
    if "status" in previous:
        data["previous_status"] = previous["status"]
    return "churnguard.billing.subscription_updated", data


# -- replaying every example -------------------------------------------------------------


@dataclass
class Delivery:
    stats: ReplayStats
    received: list[Received]
    violations: list[str]


@pytest.fixture(scope="module")
async def delivered(receiver_server: Receiver) -> list[Delivery]:
    """Every example replayed twice, in small batches over three lanes."""
    rec = receiver_server.recorder
    runs = []
    for _ in range(2):
        with rec.lock:
            rec.received.clear()
            rec.attempts.clear()
            rec.plans.clear()
            rec.violations.clear()
        stats = await replayer(receiver_server.url, batch_size=3, max_in_flight=3).replay(EXAMPLES)
        runs.append(Delivery(stats, list(rec.received), list(rec.violations)))
    return runs


def _recorder_of(delivery: Delivery) -> Recorder:
    return Recorder(received=delivery.received, violations=delivery.violations)


def stripe_events_by_id(delivery: Delivery) -> dict[str, dict[str, Any]]:
    return {body["id"]: body for body in _recorder_of(delivery).bodies_at(STRIPE_PATH)}


def test_examples_cover_every_usage_billing_and_feedback_type() -> None:
    types = {e["type"] for e in EXAMPLES}
    assert len(types) == 16
    assert {endpoint_of(e) for e in EXAMPLES} == {
        SEGMENT_BATCH_PATH,
        USAGE_PATH,
        FEEDBACK_PATH,
        STRIPE_PATH,
    }


def test_every_example_arrives_exactly_once_at_its_endpoint(delivered: list[Delivery]) -> None:
    run = delivered[0]
    rec = _recorder_of(run)
    assert_clean(run.stats, rec, len(EXAMPLES))
    expected: dict[str, Counter[str]] = {}
    for event in EXAMPLES:
        expected.setdefault(endpoint_of(event), Counter())[wire_id(event)] += 1
    for path, ids in expected.items():
        assert Counter(rec.ids_at(path)) == ids, path
        assert all(n == 1 for n in ids.values())
    assert run.stats.by_endpoint == {path: ids.total() for path, ids in expected.items()}
    assert sum(run.stats.requests_by_endpoint.values()) == run.stats.http_requests
    # Segment bodies above 1 KB come gzipped, smaller ones plain
    for r in rec.received:
        assert r.gzipped == (r.path == SEGMENT_BATCH_PATH and r.size > 1024), r.path


def test_segment_messages_carry_the_event_as_documented(delivered: list[Delivery]) -> None:
    messages = {m["messageId"]: m for m in _recorder_of(delivered[0]).segment_messages()}
    for event in EXAMPLES:
        if endpoint_of(event) != SEGMENT_BATCH_PATH:
            continue
        message, data = messages[event["id"]], event["data"]
        assert message["timestamp"] == event["time"]
        assert message["context"] == {"groupId": event["subject"]}
        assert message["userId"] == data["user_id"]
        kind = event["type"].rsplit(".", 1)[1]
        if kind == "track":
            assert (message["type"], message["event"]) == ("track", data["event"])
            assert message["properties"] == data["properties"]
        elif kind == "feature_used":
            assert (message["type"], message["event"]) == ("track", "Feature Used")
            assert message["properties"] == {"feature": data["feature"], "count": data["count"]}
        elif kind == "identify":
            assert (message["type"], message["traits"]) == ("identify", data["traits"])
        else:
            assert (message["type"], message["groupId"]) == ("group", event["subject"])
            assert message["traits"] == data["traits"]
        assert message == to_segment(event)


def test_native_bodies_are_the_cloudevents_unchanged(delivered: list[Delivery]) -> None:
    rec = _recorder_of(delivered[0])
    by_id = {e["id"]: e for e in EXAMPLES}
    native = rec.bodies_at(USAGE_PATH) + rec.bodies_at(FEEDBACK_PATH)
    assert len(native) == 2 + 9
    for body in native:
        assert body == by_id[body["id"]]


def test_ids_and_bodies_are_the_same_on_a_second_replay(delivered: list[Delivery]) -> None:
    first, second = delivered
    assert_clean(second.stats, _recorder_of(second), len(EXAMPLES))
    assert stripe_events_by_id(first) == stripe_events_by_id(second)
    one, two = _recorder_of(first), _recorder_of(second)
    assert {m["messageId"]: m for m in one.segment_messages()} == {
        m["messageId"]: m for m in two.segment_messages()
    }
    for path in (USAGE_PATH, FEEDBACK_PATH):
        assert sorted(one.ids_at(path)) == sorted(two.ids_at(path))


def test_stripe_types_objects_and_customers(delivered: list[Delivery]) -> None:
    by_id = stripe_events_by_id(delivered[0])
    expected_type = {
        "invoice_created": "invoice.created",
        "invoice_paid": "invoice.paid",
        "invoice_payment_failed": "invoice.payment_failed",
        "subscription_created": "customer.subscription.created",
        "subscription_updated": "customer.subscription.updated",
        "subscription_cancelled": "customer.subscription.deleted",
        "charge_refunded": "charge.refunded",
    }
    for event in EXAMPLES:
        if endpoint_of(event) != STRIPE_PATH:
            continue
        body = by_id[stripe_event_id(event["id"])]
        kind = event["type"].rsplit(".", 1)[1]
        scheduled = kind == "subscription_cancelled" and event["data"]["status"] != "canceled"
        wanted = "customer.subscription.updated" if scheduled else expected_type[kind]
        assert body["type"] == wanted, event["id"]
        assert (body["object"], body["api_version"], body["livemode"]) == (
            "event",
            "2024-06-20",
            False,
        )
        assert body["created"] == int(_when(event).timestamp())
        obj = body["data"]["object"]
        assert obj["metadata"] == {"account_id": event["subject"]}
        assert obj["customer"] == customer_id(event["subject"])
        assert obj["customer"].startswith("cus_")
        assert len(obj["customer"]) == 18
        assert body == to_stripe(event)


def test_subscription_mrr_and_attributes_round_trip(delivered: list[Delivery]) -> None:
    by_id = stripe_events_by_id(delivered[0])
    subscription_events = [e for e in EXAMPLES if ".subscription_" in e["type"]]
    assert len(subscription_events) == 7
    for event in subscription_events:
        body = by_id[stripe_event_id(event["id"])]
        type_, data = subscription_from_stripe(body)
        assert type_ == event["type"]
        expected = dict(event["data"])
        if expected.get("previous_plan") == expected["plan"]:
            del expected["previous_plan"]
        assert data == expected, event["id"]
        # the examples' amounts divide evenly: one seat item, Stripe's plain per-seat price
        (item,) = body["data"]["object"]["items"]["data"]
        months = 12 if event["data"]["interval"] == "year" else 1
        assert item["price"]["unit_amount"] * item["quantity"] == months * event["data"]["mrr"]


def test_decline_codes_are_on_the_expanded_charge(delivered: list[Delivery]) -> None:
    by_id = stripe_events_by_id(delivered[0])
    failures = [e for e in EXAMPLES if e["type"].endswith("invoice_payment_failed")]
    assert len(failures) == 3
    for event in failures:
        invoice = by_id[stripe_event_id(event["id"])]["data"]["object"]
        data = event["data"]
        charge = invoice["charge"]
        assert charge["object"] == "charge"
        assert charge["status"] == "failed"
        assert charge["failure_code"] == "card_declined"
        assert charge["outcome"]["type"] == "issuer_declined"
        assert charge["outcome"]["reason"] == data["decline_code"]
        error = invoice["payment_intent"]["last_payment_error"]
        assert (error["code"], error["decline_code"]) == ("card_declined", data["decline_code"])
        assert decline_kind(charge["outcome"]["reason"]) == data["decline_kind"]
        assert invoice["last_finalization_error"] is None
        assert (invoice["id"], invoice["subscription"]) == (
            data["invoice_id"],
            data.get("subscription_id"),
        )
        assert (invoice["amount_due"], invoice["currency"], invoice["attempt_count"]) == (
            data["amount_due"],
            data["currency"],
            data["attempt_count"],
        )
        assert _ts(invoice["next_payment_attempt"]) == data.get("next_payment_attempt")
        assert charge["metadata"] == {"account_id": event["subject"]}


def test_invoices_and_refunds_round_trip(delivered: list[Delivery]) -> None:
    by_id = stripe_events_by_id(delivered[0])
    for event in EXAMPLES:
        data = event["data"]
        if not event["type"].startswith("churnguard.billing.") or "subscription_" in event["type"]:
            continue
        obj = by_id[stripe_event_id(event["id"])]["data"]["object"]
        if event["type"].endswith("charge_refunded"):
            (refund,) = obj["refunds"]["data"]
            assert (obj["id"], obj["invoice"], obj["refunded"]) == (
                data["charge_id"],
                data.get("invoice_id"),
                True,
            )
            assert (refund["id"], refund["amount"], refund["currency"]) == (
                data["refund_id"],
                data["amount"],
                data["currency"],
            )
            assert (refund["reason"] or refund["metadata"].get("reason")) == data["reason"]
        elif event["type"].endswith("invoice_created"):
            assert (obj["amount_due"], obj["billing_reason"], _ts(obj["due_date"])) == (
                data["amount_due"],
                data["billing_reason"],
                data.get("due_at"),
            )
        elif event["type"].endswith("invoice_paid"):
            assert (obj["status"], obj["amount_paid"], obj["attempt_count"]) == (
                "paid",
                data["amount_paid"],
                data["attempt_count"],
            )


# -- mapping functions on their own ------------------------------------------------------


@pytest.mark.parametrize(
    ("mrr", "quantity", "interval"),
    [
        (122500, 25, "month"),
        (24500, 10, "year"),
        (1000, 3, "month"),  # 1000 / 3 is not a whole number of cents
        (1001, 7, "year"),  # 12 * 1001 / 7 neither
        (999, 0, "month"),  # no seats, a flat price
        (0, 0, "year"),
        (5, 1000, "month"),  # less than a cent per seat
    ],
)
def test_mrr_round_trips_exactly_in_integer_cents(mrr: int, quantity: int, interval: str) -> None:
    event = subscription_event("created", "sub-evt-1", "acct_x", mrr=mrr, quantity=quantity)
    event["data"]["interval"] = interval
    body = to_stripe(event)
    items = body["data"]["object"]["items"]
    assert mrr_from_items(items) == mrr
    assert items["data"][0]["quantity"] == quantity
    assert [(r["price"]["unit_amount"], r["quantity"]) for r in items["data"]] == stripe_prices(
        mrr, quantity, interval
    )
    months = 12 if interval == "year" else 1
    divisible = quantity > 0 and (months * mrr) % quantity == 0
    assert len(items["data"]) == (1 if divisible or months * mrr == 0 else 2)
    for item in items["data"]:
        assert item["price"]["unit_amount_decimal"] == str(item["price"]["unit_amount"])


def test_updates_carry_previous_attributes_and_scheduled_cancellations_are_updates() -> None:
    upgrade = subscription_event(
        "updated",
        "sub-evt-2",
        "acct_y",
        plan="business",
        quantity=4,
        mrr=2000,
        previous_mrr=1000,
        previous_plan="team",
        previous_quantity=3,
    )
    body = to_stripe(upgrade)
    assert subscription_from_stripe(body) == (
        "churnguard.billing.subscription_updated",
        upgrade["data"],
    )
    unchanged = subscription_event("updated", "sub-evt-3", "acct_y", previous_mrr=1000)
    assert "items" not in to_stripe(unchanged)["data"]["previous_attributes"]

    later = _iso(T0 + timedelta(days=20))
    scheduled = subscription_event(
        "cancelled",
        "sub-evt-4",
        "acct_y",
        cancellation="voluntary",
        reason="unused",
        effective_at=later,
    )
    body = to_stripe(scheduled)
    sub = body["data"]["object"]
    assert body["type"] == "customer.subscription.updated"
    assert (sub["cancel_at_period_end"], _ts(sub["cancel_at"]), _ts(sub["canceled_at"])) == (
        True,
        later,
        scheduled["time"],
    )
    assert sub["cancellation_details"] == {
        "reason": "cancellation_requested",
        "feedback": "unused",
        "comment": None,
    }
    assert subscription_from_stripe(body)[1] == scheduled["data"]

    now = subscription_event(
        "cancelled",
        "sub-evt-5",
        "acct_y",
        status="canceled",
        cancellation="involuntary",
        reason="payment_failed",
        effective_at=_iso(T0),
    )
    body = to_stripe(now)
    assert body["type"] == "customer.subscription.deleted"
    assert body["data"]["object"]["cancellation_details"] == {
        "reason": "payment_failed",
        "feedback": None,
        "comment": None,
    }
    assert subscription_from_stripe(body)[1] == now["data"]


def test_stripe_signature_is_verified_by_the_stripe_library() -> None:
    event = paid("pay_1", "acct_sig", T0)
    payload = orjson.dumps(to_stripe(event), option=orjson.OPT_INDENT_2)
    t = int(time.time())
    header = stripe_signature(STRIPE_SECRET, payload, t)
    assert header.startswith(f"t={t},v1=")
    assert len(header.split("v1=")[1]) == 64
    verified = stripe.Webhook.construct_event(payload, header, STRIPE_SECRET)
    assert verified["id"] == stripe_event_id("pay_1")
    assert verified["type"] == "invoice.paid"
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload, header, WRONG_SECRET)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload.replace(b"4900", b"4901"), header, STRIPE_SECRET)


def test_ids_are_deterministic() -> None:
    assert customer_id("acct_7f3a91") == customer_id("acct_7f3a91") != customer_id("acct_7f3a92")
    assert stripe_event_id("evt_1R0xT7LkdIwHu7ixC2vN4bMz") == "evt_1R0xT7LkdIwHu7ixC2vN4bMz"
    hashed = stripe_event_id("fail_00a1")
    assert hashed == stripe_event_id("fail_00a1") != stripe_event_id("fail_00a2")
    assert hashed.startswith("evt_")
    assert len(hashed) == 4 + 24
    assert to_stripe(paid("pay_2", "acct_a", T0)) == to_stripe(paid("pay_2", "acct_a", T0))


# -- delivery behaviour ------------------------------------------------------------------


async def test_429_with_retry_after_is_retried_and_succeeds(receiver: Receiver) -> None:
    rec = receiver.recorder
    rec.plan(SEGMENT_BATCH_PATH, (429, {"Retry-After": "1"}, "slow down"))
    events = [track(f"trk-{i}", f"acct_{i % 3}", T0 + timedelta(seconds=i)) for i in range(6)]
    started = time.monotonic()
    # a backoff far longer than Retry-After: the elapsed time tells which one was used
    stats = await replayer(receiver.url, max_in_flight=1, backoff_base_s=20).replay(events)
    elapsed = time.monotonic() - started
    assert_clean(stats, rec, 6)
    assert stats.retried == 1
    assert sorted(rec.ids_at(SEGMENT_BATCH_PATH)) == sorted(e["id"] for e in events)
    assert [status for _, _, status in rec.attempts] == [429, 200]
    assert 0.9 <= elapsed < 8


async def test_400_is_rejected_and_not_retried(receiver: Receiver) -> None:
    rec = receiver.recorder
    rec.plan(FEEDBACK_PATH, (400, {}, '{"detail": "unknown field data.bogus"}'))
    events = [nps(f"nps-{i}", "acct_same", T0 + timedelta(minutes=i)) for i in range(3)]
    stats = await replayer(receiver.url).replay(events)
    assert (stats.sent_events, stats.rejected, stats.failed, stats.retried) == (2, 1, 0, 0)
    (sample,) = stats.rejected_samples
    assert sample.startswith(f"{FEEDBACK_PATH} 400:")
    assert "data.bogus" in sample
    assert [(ids, status) for _, ids, status in rec.attempts] == [
        (["nps-0"], 400),
        (["nps-1"], 200),
        (["nps-2"], 200),
    ]


async def test_5xx_is_retried_then_counted_as_failed(receiver: Receiver) -> None:
    rec = receiver.recorder
    unavailable = (503, {}, "kafka did not acknowledge")
    rec.plan(STRIPE_PATH, *[unavailable] * 7)  # 5 for the first event, 2 for the second
    events = [paid(f"pay-{i}", "acct_billing", T0 + timedelta(hours=i)) for i in range(3)]
    stats = await replayer(receiver.url).replay(events)
    assert (stats.sent_events, stats.failed, stats.rejected, stats.retried) == (2, 1, 0, 6)
    assert stats.http_requests == 5 + 3 + 1
    attempts = Counter(ids[0] for _, ids, _ in rec.attempts)
    assert attempts == {
        stripe_event_id("pay-0"): 5,
        stripe_event_id("pay-1"): 3,
        stripe_event_id("pay-2"): 1,
    }


async def test_connection_errors_are_retried_then_failed() -> None:
    events = [nps("nps-x", "acct_a", T0), seats("seat-x", "acct_b", T0)]
    stats = await replayer(f"http://127.0.0.1:{free_port()}", timeout_s=2).replay(events)
    assert (stats.sent_events, stats.failed, stats.http_requests, stats.retried) == (0, 2, 10, 8)


async def test_real_time_pacing_sends_in_event_time_order(receiver: Receiver) -> None:
    makers = [track, nps, paid, seats]
    step = timedelta(minutes=10)
    events = [makers[i % 4](f"rt-{i}", f"acct_rt{i}", T0 + i * step) for i in range(12)]
    speed = step.total_seconds() / 0.06  # one event every 60 ms of real time
    progress: list[tuple[int, datetime]] = []
    replay = replayer(receiver.url, speed=speed, progress_interval_s=0.1)
    started = time.monotonic()
    stats = await replay.replay(events, on_progress=lambda n, at: progress.append((n, at)))
    elapsed = time.monotonic() - started
    assert_clean(stats, receiver.recorder, 12)
    arrived = [i for r in receiver.recorder.received for i in r.ids]
    assert arrived == [wire_id(e) for e in events]
    assert 0.5 <= elapsed < 10  # 11 gaps of 60 ms
    assert progress[-1] == (12, _when(events[-1]))
    assert len(progress) <= elapsed / 0.1 + 2
    times = [at for _, at in progress]
    assert times == sorted(times)


async def test_real_time_pacing_sends_history_before_paced_from_at_once(
    receiver: Receiver,
) -> None:
    """A world's opening subscriptions, dated up to two years before day 0, must not hold
    a real-time replay back for (two years / speed)."""
    step = timedelta(minutes=10)
    history = [paid(f"old-{i}", f"acct_h{i}", T0 - timedelta(days=365 - 90 * i)) for i in range(3)]
    paced = [nps(f"now-{i}", "acct_n", T0 + i * step) for i in range(4)]  # one lane: in order
    speed = step.total_seconds() / 0.06
    replay = replayer(receiver.url, speed=speed, paced_from=T0)
    started = time.monotonic()
    stats = await replay.replay(history + paced)
    elapsed = time.monotonic() - started
    assert_clean(stats, receiver.recorder, 7)
    arrived = [i for r in receiver.recorder.received for i in r.ids]
    assert sorted(arrived) == sorted(wire_id(e) for e in history + paced)
    assert [i for i in arrived if i.startswith("now-")] == [wire_id(e) for e in paced]
    assert 0.15 <= elapsed < 10  # 3 gaps of 60 ms; the year of history costs nothing
    assert stats.max_lag_s < 5


async def test_fast_mode_keeps_each_accounts_order_across_endpoints(receiver: Receiver) -> None:
    makers = [track, track, nps, seats, paid, track]
    events = [
        makers[i % len(makers)](f"ord-{i}", f"acct_o{i % 5}", T0 + timedelta(seconds=i))
        for i in range(240)
    ]
    stats = await replayer(receiver.url, batch_size=7, max_in_flight=4).replay(events)
    assert_clean(stats, receiver.recorder, 240)
    by_wire_id = {wire_id(e): e for e in events}
    arrived: dict[str, list[str]] = {}
    for r in receiver.recorder.received:
        for i in r.ids:
            arrived.setdefault(by_wire_id[i]["subject"], []).append(by_wire_id[i]["id"])
    for account, ids in arrived.items():
        assert ids == [e["id"] for e in events if e["subject"] == account]
    assert len(arrived) == 5


async def test_batches_respect_segment_limits(receiver: Receiver) -> None:
    blob = "x" * 20_000
    events = [
        track(f"big-{i}", f"acct_b{i % 2}", T0 + timedelta(seconds=i), blob=blob) for i in range(60)
    ]
    events.insert(10, track("huge", "acct_b0", T0, blob="y" * 40_000))
    events.append({**nps("score", "acct_b0", T0), "type": "churnguard.scores.account_scored"})
    stats = await replayer(receiver.url, max_in_flight=2).replay(events)
    rec = receiver.recorder
    assert rec.violations == []
    assert (stats.sent_events, stats.rejected, stats.failed) == (60, 2, 0)
    assert any("huge" in s and "32768" in s for s in stats.rejected_samples)
    assert any("account_scored" in s for s in stats.rejected_samples)
    batches = [r for r in rec.received if r.path == SEGMENT_BATCH_PATH]
    assert len(batches) >= 3  # 1.2 MB of messages, at most 500 KB a batch
    assert all(r.gzipped and r.size <= SEGMENT_BATCH_LIMIT for r in batches)
    assert sorted(rec.ids_at(SEGMENT_BATCH_PATH)) == sorted(f"big-{i}" for i in range(60))


async def test_async_iterables_are_replayed(receiver: Receiver) -> None:
    async def stream() -> Any:
        for i in range(5):
            yield nps(f"async-{i}", "acct_async", T0 + timedelta(seconds=i))

    stats = await replayer(receiver.url).replay(stream())
    assert_clean(stats, receiver.recorder, 5)
    assert receiver.recorder.ids_at(FEEDBACK_PATH) == [f"async-{i}" for i in range(5)]
