"""Stripe webhooks → billing events: signatures and the mapping (pure, no servers).

The strongest check is the round trip: every checked-in billing example and the billing
events of a small simulated world go through the simulator's ``to_stripe`` (the wire
contract) and back through ``map_event``, and must come back as the same event. What the
wire legitimately loses is normalised explicitly in :func:`expected_after_round_trip`;
everything else is compared exactly.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import time
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import stripe
from pydantic import TypeAdapter

from churnguard.common.events.billing import (
    BillingEvent,
    ChargeRefunded,
    InvoicePaymentFailed,
    SubscriptionCancelled,
    SubscriptionUpdated,
    decline_kind,
)
from churnguard.ingest.stripe_webhooks import (
    STRIPE_SOURCE,
    MappedEvent,
    MappingError,
    SignatureError,
    Unhandled,
    map_event,
    verify_signature,
)
from churnguard.simulator.http_sink import (
    stripe_body,
    stripe_event_id,
    stripe_signature,
    to_stripe,
)
from churnguard.simulator.world import SimConfig, World

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "libs/common/src/churnguard/common/events/examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("churnguard.billing.*/*.json"))
SECRET = "whsec_test_0123456789abcdef"
OTHER_SECRET = "whsec_test_rotated_fedcba9876543210"


def load(name: str) -> dict[str, Any]:
    event: dict[str, Any] = orjson.loads((EXAMPLES / name).read_bytes())
    return event


@functools.cache
def world_billing_events() -> tuple[dict[str, Any], ...]:
    world = World(SimConfig(accounts=300, days=90, seed=1))
    events = []
    for day in world.run():
        for line in day.lines:
            event = orjson.loads(line)
            if event["type"].startswith("churnguard.billing."):
                events.append(event)
    return tuple(events)


# -- round trip ----------------------------------------------------------------------------


def _floor_iso(value: str | None) -> str | None:
    """Stripe carries unix seconds: sub-second precision is lost (floor)."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    return datetime.fromtimestamp(int(moment.timestamp() // 1), UTC).isoformat()


def expected_after_round_trip(event: Mapping[str, Any]) -> dict[str, Any]:
    """The event as the contract lets it come back from ``to_stripe`` → ``map_event``.

    Lossy by the contract, and normalised here:

    * ``id`` becomes the Stripe event id (unchanged for ``evt_…`` ids, else a hash);
      ``source`` becomes ``/stripe`` (neither it nor ``schemaversion`` is on the wire).
    * every timestamp (``time``, ``due_at``, ``next_payment_attempt``, ``trial_end``,
      ``effective_at``) is floored to whole seconds (Stripe uses unix seconds).
    * ``subscription_updated``: ``previous_status`` is only sent when it differs from
      ``status``; ``previous_plan`` only comes back when it differs from ``plan``; the
      previous items are only sent when plan, quantity or MRR changed, so without such a
      change ``previous_quantity`` is null, and with one it is the previous seat quantity
      (``previous_quantity`` or ``quantity``).
    * ``subscription_cancelled``: an involuntary cancellation without a reason comes back
      with reason ``"payment_failed"``; an empty reason comes back null.
    * ``charge_refunded``: a refund without ``refund_id`` gets the derived ``re_…`` id.

    ``decline_kind`` is not on the wire either, but is *not* normalised: the contract says
    the simulator's kinds agree with ``decline_kind()``, and the test checks that.
    """
    data = dict(event["data"])
    type_ = event["type"].removeprefix("churnguard.billing.")
    for key in ("due_at", "next_payment_attempt", "trial_end", "effective_at"):
        if data.get(key) is not None:
            data[key] = _floor_iso(data[key])
    if type_ == "subscription_updated":
        if data.get("previous_status") == data["status"]:
            data["previous_status"] = None
        previous_plan = data.get("previous_plan") or data["plan"]
        previous_quantity = data.get("previous_quantity")
        if previous_quantity is None:
            previous_quantity = data["quantity"]
        changed = (previous_plan, previous_quantity, data["previous_mrr"]) != (
            data["plan"],
            data["quantity"],
            data["mrr"],
        )
        data["previous_plan"] = previous_plan if previous_plan != data["plan"] else None
        data["previous_quantity"] = previous_quantity if changed else None
    elif type_ == "subscription_cancelled":
        if not data.get("reason"):
            data["reason"] = "payment_failed" if data["cancellation"] == "involuntary" else None
    elif type_ == "charge_refunded" and data.get("refund_id") is None:
        data["refund_id"] = "re_" + hashlib.sha256(f"re:{event['id']}".encode()).hexdigest()[:24]
    return {
        "id": stripe_event_id(event["id"]),
        "source": STRIPE_SOURCE,
        "type": event["type"],
        "time": _floor_iso(event["time"]),
        "subject": event["subject"],
        "data": {k: v for k, v in data.items() if v is not None},
    }


def round_trip(event: Mapping[str, Any]) -> dict[str, Any]:
    """``to_stripe`` → JSON bytes (as sent) → ``map_event``, dumped like the expected side."""
    wire = orjson.loads(stripe_body(event))
    assert wire == to_stripe(event)
    mapped = map_event(wire)
    assert isinstance(mapped, MappedEvent), mapped
    assert mapped.id == wire["id"]
    assert mapped.account_id == event["subject"]
    dumped = mapped.event.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["time"].endswith("Z") or dumped["time"].endswith("+00:00")
    return {
        "id": dumped["id"],
        "source": dumped["source"],
        "type": dumped["type"],
        "time": datetime.fromisoformat(dumped["time"]).isoformat(),
        "subject": dumped["subject"],
        "data": {
            k: (datetime.fromisoformat(v).isoformat() if k in _TIME_FIELDS else v)
            for k, v in dumped["data"].items()
        },
    }


_BILLING_EVENT: TypeAdapter[Any] = TypeAdapter(BillingEvent)
_TIME_FIELDS = frozenset({"due_at", "next_payment_attempt", "trial_end", "effective_at"})


def _canonical(event: Mapping[str, Any]) -> dict[str, Any]:
    """The original event as dumped by its own model (defaults filled in, like the mapping)."""
    model = _BILLING_EVENT.validate_python(event)
    dumped: dict[str, Any] = model.model_dump(mode="json", by_alias=True, exclude_none=True)
    return dumped


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_billing_example_round_trips(path: Path) -> None:
    event = _canonical(orjson.loads(path.read_bytes()))
    assert round_trip(event) == expected_after_round_trip(event)


def test_examples_cover_every_billing_type() -> None:
    assert len({p.parent.name for p in EXAMPLE_FILES}) == 7


def test_simulated_world_billing_events_round_trip() -> None:
    events = world_billing_events()
    assert len(events) >= 300
    kinds = Counter(e["type"] for e in events)
    assert len(kinds) >= 6, kinds
    mismatches = []
    for raw in events:
        event = _canonical(raw)
        got, want = round_trip(event), expected_after_round_trip(event)
        if got != want:
            mismatches.append((raw["id"], got, want))
    assert not mismatches, f"{len(mismatches)} of {len(events)} differ; first: {mismatches[0]}"


def test_world_exercises_the_interesting_paths() -> None:
    """The world must reach the interesting branches, or its round trip proves less."""
    events = world_billing_events()
    cancellations = Counter(
        (to_stripe(e)["type"], e["data"]["cancellation"])
        for e in events
        if e["type"] == "churnguard.billing.subscription_cancelled"
    )
    assert {stripe_type for stripe_type, _ in cancellations} == {
        "customer.subscription.updated",  # scheduled for the period end
        "customer.subscription.deleted",  # at once
    }
    assert {kind for _, kind in cancellations} == {"voluntary", "involuntary"}
    remainder_items = [
        e
        for e in events
        if e["type"].startswith("churnguard.billing.subscription_")
        and len(to_stripe(e)["data"]["object"]["items"]["data"]) == 2
    ]
    assert remainder_items
    assert any(e["type"].endswith("invoice_payment_failed") for e in events)


def _variant(name: str, **data: Any) -> dict[str, Any]:
    event = load(name)
    event["data"] = {k: v for k, v in (event["data"] | data).items() if v is not None}
    return event


LOSSY_AND_EDGE_CASES = {
    "remainder_item_monthly": _variant(
        "churnguard.billing.subscription_created/growth_monthly.json", mrr=100_001, quantity=3
    ),
    "remainder_item_annual": _variant(
        "churnguard.billing.subscription_created/team_annual_trial.json", mrr=24_501, quantity=7
    ),
    "zero_seats": _variant(
        "churnguard.billing.subscription_created/growth_monthly.json", mrr=0, quantity=0
    ),
    "updated_interval_remainder": _variant(
        "churnguard.billing.subscription_updated/downgrade.json", mrr=267_001, quantity=7
    ),
    "updated_same_plan_given": _variant(
        "churnguard.billing.subscription_updated/seats_added.json",
        previous_plan="price_1NzJq2LkdIwHu7ixA8bC3dEf",
    ),
    "updated_status_only_with_equal_previous": _variant(
        "churnguard.billing.subscription_updated/past_due.json",
        previous_status="past_due",
        previous_quantity=12,
    ),
    "updated_plan_only": _variant(
        "churnguard.billing.subscription_updated/downgrade.json",
        previous_quantity=None,
        previous_mrr=267_000,
    ),
    "involuntary_without_reason": _variant(
        "churnguard.billing.subscription_cancelled/involuntary_dunning_exhausted.json",
        reason=None,
    ),
    "voluntary_feedback_only": _variant(
        "churnguard.billing.subscription_cancelled/voluntary_at_period_end.json",
        reason="too_expensive",
    ),
    "voluntary_comment_only": _variant(
        "churnguard.billing.subscription_cancelled/voluntary_at_period_end.json",
        reason="moving to a competitor: cheaper",
    ),
    "cancel_now_but_active": _variant(
        "churnguard.billing.subscription_cancelled/voluntary_at_period_end.json",
        effective_at="2025-03-12T17:58:06Z",
    ),
    "refund_without_id_custom_reason": _variant(
        "churnguard.billing.charge_refunded/duplicate.json",
        refund_id=None,
        reason="goodwill credit after outage",
    ),
    "invoice_subsecond_due": _variant(
        "churnguard.billing.invoice_created/manual_net30.json", due_at="2025-03-22T23:59:59.999Z"
    ),
    "non_stripe_event_id": {
        **load("churnguard.billing.invoice_paid/first_attempt.json"),
        "id": "pay-7f3a91-0001",
        "time": "2025-03-01T07:02:40.750+01:00",
    },
}


@pytest.mark.parametrize("event", LOSSY_AND_EDGE_CASES.values(), ids=LOSSY_AND_EDGE_CASES.keys())
def test_edge_cases_round_trip(event: dict[str, Any]) -> None:
    canonical = _canonical(event)
    assert round_trip(canonical) == expected_after_round_trip(canonical)


def test_remainder_item_is_on_the_wire() -> None:
    wire = to_stripe(LOSSY_AND_EDGE_CASES["remainder_item_annual"])
    items = wire["data"]["object"]["items"]["data"]
    assert len(items) == 2
    assert sum(i["price"]["unit_amount"] * i["quantity"] for i in items) == 12 * 24_501


def test_redelivery_keeps_the_id() -> None:
    event = load("churnguard.billing.invoice_paid/first_attempt.json")
    first, second = map_event(to_stripe(event)), map_event(to_stripe(event))
    assert isinstance(first, MappedEvent)
    assert isinstance(second, MappedEvent)
    assert first.id == second.id == "evt_1QyZ5rLkdIwHu7ixW1dF6gHj"
    assert first.event == second.event
    assert first.event.source == STRIPE_SOURCE
    assert first.event.time == datetime(2025, 3, 1, 7, 2, 40, tzinfo=UTC)


# -- mapping: beyond the simulator -------------------------------------------------------


def stripe_of(name: str) -> dict[str, Any]:
    return to_stripe(load(name))


def _strip_account_ids(value: Any) -> None:
    if isinstance(value, dict):
        metadata = value.get("metadata")
        if isinstance(metadata, dict):
            metadata.pop("account_id", None)
        for child in value.values():
            _strip_account_ids(child)
    elif isinstance(value, list):
        for child in value:
            _strip_account_ids(child)


def test_unknown_type_is_unhandled() -> None:
    result = map_event({"id": "evt_1", "type": "customer.created", "data": {"object": {}}})
    assert result == Unhandled("customer.created", "evt_1")


@pytest.mark.parametrize(
    "name",
    [
        "churnguard.billing.invoice_payment_failed/insufficient_funds.json",
        "churnguard.billing.charge_refunded/duplicate.json",
        "churnguard.billing.subscription_updated/seats_added.json",
    ],
)
def test_missing_account_id_names_the_path(name: str) -> None:
    wire = stripe_of(name)
    _strip_account_ids(wire)
    with pytest.raises(MappingError) as caught:
        map_event(wire)
    assert caught.value.reason.startswith("data.object.metadata.account_id: missing")


def test_invalid_account_id_names_its_path() -> None:
    wire = stripe_of("churnguard.billing.invoice_paid/first_attempt.json")
    wire["data"]["object"]["metadata"]["account_id"] = "bad account id!"
    with pytest.raises(MappingError, match=r"^data\.object\.metadata\.account_id: "):
        map_event(wire)


def test_account_id_from_subscription_details_of_a_real_stripe_invoice() -> None:
    wire = stripe_of("churnguard.billing.invoice_created/subscription_cycle.json")
    _strip_account_ids(wire)
    wire["data"]["object"]["subscription_details"] = {"metadata": {"account_id": "acct_real"}}
    mapped = map_event(wire)
    assert isinstance(mapped, MappedEvent)
    assert mapped.account_id == "acct_real"


def test_account_id_from_expanded_customer() -> None:
    wire = stripe_of("churnguard.billing.charge_refunded/duplicate.json")
    _strip_account_ids(wire)
    wire["data"]["object"]["customer"] = {"id": "cus_1", "metadata": {"account_id": "acct_c"}}
    mapped = map_event(wire)
    assert isinstance(mapped, MappedEvent)
    assert mapped.account_id == "acct_c"


def _with_interval(wire: dict[str, Any], interval: str, count: int = 1) -> dict[str, Any]:
    for item in wire["data"]["object"]["items"]["data"]:
        item["price"]["recurring"]["interval"] = interval
        item["price"]["recurring"]["interval_count"] = count
    return wire


def test_week_interval_is_rejected_with_the_path() -> None:
    wire = _with_interval(
        stripe_of("churnguard.billing.subscription_created/growth_monthly.json"), "week"
    )
    with pytest.raises(MappingError) as caught:
        map_event(wire)
    reason = caught.value.reason
    assert reason.startswith("data.object.items.data[0].price.recurring.interval: 'week'")
    assert "month and year" in reason


def test_quarterly_interval_count_is_rejected() -> None:
    wire = _with_interval(
        stripe_of("churnguard.billing.subscription_created/growth_monthly.json"), "month", 3
    )
    with pytest.raises(MappingError, match=r"interval_count: 3 is not supported"):
        map_event(wire)


def test_week_interval_in_previous_items_is_rejected() -> None:
    wire = stripe_of("churnguard.billing.subscription_updated/seats_added.json")
    for item in wire["data"]["previous_attributes"]["items"]["data"]:
        item["price"]["recurring"]["interval"] = "week"
    with pytest.raises(MappingError, match=r"^data\.previous_attributes\.items\.data\[0\]"):
        map_event(wire)


def test_real_stripe_failed_invoice_with_bare_ids_is_an_unknown_soft_decline() -> None:
    wire = stripe_of("churnguard.billing.invoice_payment_failed/expired_card.json")
    obj = wire["data"]["object"]
    obj["charge"], obj["payment_intent"] = obj["charge"]["id"], obj["payment_intent"]["id"]
    mapped = map_event(wire)
    assert isinstance(mapped, MappedEvent)
    assert isinstance(mapped.event, InvoicePaymentFailed)
    assert mapped.event.data.decline_code == "unknown"
    assert mapped.event.data.decline_kind == "soft"


def test_decline_code_is_preferred_over_outcome_reason() -> None:
    wire = stripe_of("churnguard.billing.invoice_payment_failed/expired_card.json")
    wire["data"]["object"]["charge"]["outcome"]["reason"] = "generic_decline"
    mapped = map_event(wire)
    assert isinstance(mapped, MappedEvent)
    assert isinstance(mapped.event, InvoicePaymentFailed)
    assert mapped.event.data.decline_code == "expired_card"
    assert mapped.event.data.decline_kind == decline_kind("expired_card") == "hard"
    del wire["data"]["object"]["payment_intent"]["last_payment_error"]["decline_code"]
    fallback = map_event(wire)
    assert isinstance(fallback, MappedEvent)
    assert isinstance(fallback.event, InvoicePaymentFailed)
    assert fallback.event.data.decline_code == "generic_decline"


def test_deleted_after_a_scheduled_cancellation_is_not_a_second_churn() -> None:
    scheduled = stripe_of("churnguard.billing.subscription_cancelled/voluntary_at_period_end.json")
    assert scheduled["type"] == "customer.subscription.updated"
    booked = map_event(scheduled)
    assert isinstance(booked, MappedEvent)
    assert isinstance(booked.event, SubscriptionCancelled)
    assert booked.event.data.effective_at == datetime(2026, 2, 17, 9, 44, 17, tzinfo=UTC)
    ended = copy.deepcopy(scheduled)
    ended["id"], ended["type"] = "evt_ended", "customer.subscription.deleted"
    ended["data"].pop("previous_attributes")
    ended["data"]["object"] |= {"status": "canceled", "ended_at": ended["created"] + 10}
    result = map_event(ended)
    assert isinstance(result, Unhandled)
    assert "scheduled" in result.reason


def test_other_update_of_a_cancelling_subscription_is_an_update() -> None:
    wire = stripe_of("churnguard.billing.subscription_updated/seats_added.json")
    wire["data"]["object"] |= {"cancel_at_period_end": True, "cancel_at": 1_800_000_000}
    mapped = map_event(wire)
    assert isinstance(mapped, MappedEvent)
    assert isinstance(mapped.event, SubscriptionUpdated)
    assert mapped.event.data.previous_quantity == 25


def test_cancel_at_period_end_without_previous_attributes_is_a_cancellation() -> None:
    wire = stripe_of("churnguard.billing.subscription_created/growth_monthly.json")
    wire["type"] = "customer.subscription.updated"
    wire["data"]["object"] |= {
        "cancel_at_period_end": True,
        "cancellation_details": {"reason": "cancellation_requested", "feedback": "unused"},
    }
    mapped = map_event(wire)
    assert isinstance(mapped, MappedEvent)
    assert isinstance(mapped.event, SubscriptionCancelled)
    data = mapped.event.data
    assert (data.cancellation, data.reason, data.mrr) == ("voluntary", "unused", 122_500)
    end = wire["data"]["object"]["current_period_end"]
    assert data.effective_at == datetime.fromtimestamp(end, UTC)


def test_refund_list_not_expanded_uses_amount_refunded() -> None:
    wire = stripe_of("churnguard.billing.charge_refunded/partial_seat_credit.json")
    del wire["data"]["object"]["refunds"]
    mapped = map_event(wire)
    assert isinstance(mapped, MappedEvent)
    assert isinstance(mapped.event, ChargeRefunded)
    assert (mapped.event.data.amount, mapped.event.data.refund_id) == (14_700, None)


def test_model_validation_errors_name_the_stripe_field() -> None:
    wire = stripe_of("churnguard.billing.invoice_paid/first_attempt.json")
    wire["data"]["object"]["currency"] = "USD"
    with pytest.raises(MappingError, match=r"^data\.object\.currency: "):
        map_event(wire)
    wire = stripe_of("churnguard.billing.subscription_updated/past_due.json")
    wire["data"]["object"]["status"] = "exploded"
    with pytest.raises(MappingError, match=r"^data\.object\.status: "):
        map_event(wire)


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda w: w.pop("created"), "created: missing"),
        (lambda w: w["data"].pop("object"), "data.object: missing"),
        (lambda w: w["data"]["object"].pop("amount_paid"), "data.object.amount_paid: missing"),
        (lambda w: w["data"]["object"].update(amount_paid="12"), "data.object.amount_paid: "),
        (lambda w: w["data"]["object"].update(object="charge"), "data.object.object: "),
    ],
)
def test_malformed_events_name_the_path(mutate: Any, path: str) -> None:
    wire = stripe_of("churnguard.billing.invoice_paid/first_attempt.json")
    mutate(wire)
    with pytest.raises(MappingError) as caught:
        map_event(wire)
    assert caught.value.reason.startswith(path)


# -- signatures ----------------------------------------------------------------------------

PAYLOAD = stripe_body(load("churnguard.billing.invoice_paid/first_attempt.json"))
T = 1_741_000_000


def signed(secret: str = SECRET, t: int = T, payload: bytes = PAYLOAD) -> str:
    """The header as Stripe's own library computes it."""
    header: str = stripe.WebhookSignature.generate_signature_header(
        payload.decode(), secret, timestamp=t
    )
    return header


def test_stripe_library_and_simulator_sign_alike() -> None:
    assert signed() == stripe_signature(SECRET, PAYLOAD, T)


def test_valid_signature() -> None:
    verify_signature(PAYLOAD, signed(), [SECRET], now=T + 5)


def test_wrong_secret() -> None:
    with pytest.raises(SignatureError, match=r"no v1 signature .* matches"):
        verify_signature(PAYLOAD, signed(OTHER_SECRET), [SECRET], now=T)


def test_tampered_body() -> None:
    with pytest.raises(SignatureError, match="no v1 signature"):
        verify_signature(PAYLOAD + b" ", signed(), [SECRET], now=T)


def test_rotated_secrets_second_matches() -> None:
    verify_signature(PAYLOAD, signed(OTHER_SECRET), [SECRET, OTHER_SECRET], now=T)


def test_multiple_v1_one_valid() -> None:
    good = signed().split("v1=")[1]
    header = f"t={T},v1={'0' * 64},v1={good},v0={'f' * 64}"
    verify_signature(PAYLOAD, header, [SECRET], now=T)


def test_only_v0_is_refused() -> None:
    good = signed().split("v1=")[1]
    with pytest.raises(SignatureError, match="no v1= signature"):
        verify_signature(PAYLOAD, f"t={T},v0={good}", [SECRET], now=T)


def test_timestamp_301_s_old_is_refused_naming_the_age() -> None:
    verify_signature(PAYLOAD, signed(), [SECRET], now=T + 300)
    with pytest.raises(SignatureError) as caught:
        verify_signature(PAYLOAD, signed(), [SECRET], now=T + 301)
    assert "301 s old" in caught.value.reason
    assert "by 1 s" in caught.value.reason


def test_timestamp_far_in_the_future_is_refused() -> None:
    with pytest.raises(SignatureError, match="in the future"):
        verify_signature(PAYLOAD, signed(), [SECRET], now=T - 301)


@pytest.mark.parametrize("header", [None, "", "  "])
def test_missing_header(header: str | None) -> None:
    with pytest.raises(SignatureError, match="header missing"):
        verify_signature(PAYLOAD, header, [SECRET], now=T)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("garbage", "no t= timestamp"),
        ("v1=abc,v1=def", "no t= timestamp"),
        ("t=soon,v1=abc", "is not unix seconds"),
        (f"t={T}", "no v1= signature"),
        (f"t={T},t={T},v1=abc", "more than one t="),
        (f"t={T},v1=\u00e9\u00e9", "no v1 signature"),
    ],
)
def test_garbage_header(header: str, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason):
        verify_signature(PAYLOAD, header, [SECRET], now=T)


def test_no_secret_configured_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="no Stripe webhook secret"):
        verify_signature(PAYLOAD, signed(), [], now=T)


def test_accepted_by_us_is_accepted_by_stripe_and_maps_the_same() -> None:
    now = int(time.time())
    header = stripe_signature(SECRET, PAYLOAD, now)
    verify_signature(PAYLOAD, header, [OTHER_SECRET, SECRET])
    event = stripe.Webhook.construct_event(PAYLOAD, header, SECRET)
    assert event.id == "evt_1QyZ5rLkdIwHu7ixW1dF6gHj"
    assert event.type == "invoice.paid"
    mapped = map_event(orjson.loads(PAYLOAD))
    assert isinstance(mapped, MappedEvent)
    assert mapped.id == event.id


@pytest.mark.parametrize(
    ("secret", "age"), [(OTHER_SECRET, 0), (SECRET, 301)], ids=["wrong_secret", "too_old"]
)
def test_refused_by_us_is_refused_by_stripe(secret: str, age: int) -> None:
    now = int(time.time())
    header = stripe_signature(secret, PAYLOAD, now - age)
    with pytest.raises(SignatureError):
        verify_signature(PAYLOAD, header, [SECRET], now=now)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(PAYLOAD, header, SECRET)
