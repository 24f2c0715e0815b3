"""Ingest driven by what real senders use: the official Segment library, signed Stripe webhooks."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import httpx
import orjson
import pytest
from segment.analytics.client import Client as SegmentClient
from segment.analytics.request import APIError

from churnguard.common import envelope
from churnguard.common.topics import Topic
from churnguard.simulator.http_sink import stripe_signature, to_stripe
from tests.fixtures.kafka import KafkaBroker, end_offsets, read_events, read_topic
from tests.fixtures.services import RunningService, ServiceFactory

pytestmark = pytest.mark.integration

STRIPE_SECRET = "whsec_test_1f2e3d4c5b6a"


def send_with_segment_library(url: str, write_key: str) -> list[str]:
    """What a product backend does: the unmodified Segment client, pointed at ingest."""
    errors: list[str] = []
    client = SegmentClient(
        write_key, host=url, sync_mode=True, on_error=lambda e, _: errors.append(repr(e))
    )
    try:
        calls(client)
    except APIError as exc:  # sync mode raises what the server refused
        errors.append(f"{exc.status}: {exc.message}")
    return errors


def calls(client: SegmentClient) -> None:
    client.group("u_17", "acct_segment_1", traits={"plan": "growth"})
    client.identify("u_17", {"email": "ada@example.com"}, context={"groupId": "acct_segment_1"})
    client.track(
        "u_17", "Report Exported", {"format": "csv"}, context={"groupId": "acct_segment_1"}
    )
    client.track("u_17", "Feature Used", {"feature": "dashboards", "count": 3})  # account learned
    client.page("u_17", "Docs", "Getting started", context={"groupId": "acct_segment_1"})
    client.flush()


async def test_the_official_segment_library_lands_events_on_the_usage_topic(
    kafka: KafkaBroker, kafka_topics: str, ingest_service: RunningService
) -> None:
    errors = await asyncio.to_thread(
        send_with_segment_library, ingest_service.url, ingest_service.write_key
    )
    assert errors == []
    records, events = await read_events(kafka.bootstrap, Topic.USAGE.name_in(kafka_topics), 5)
    assert [e["type"] for e in events] == [
        "churnguard.usage.group",
        "churnguard.usage.identify",
        "churnguard.usage.track",
        "churnguard.usage.feature_used",
        "churnguard.usage.track",
    ]
    assert {e["subject"] for e in events} == {"acct_segment_1"}
    assert all(r.key == b"acct_segment_1" for r in records)
    assert events[3]["data"] == {"user_id": "u_17", "feature": "dashboards", "count": 3}
    assert events[4]["data"]["event"] == "Page Viewed"


async def test_segment_wrong_key_is_refused(
    kafka: KafkaBroker, kafka_topics: str, ingest_service: RunningService
) -> None:
    errors = await asyncio.to_thread(send_with_segment_library, ingest_service.url, "cg_live_nope")
    assert errors == ["401: malformed write key: expected 'cg_live_' followed by 32 characters"]
    assert (
        sum((await end_offsets(kafka.bootstrap, Topic.USAGE.name_in(kafka_topics))).values()) == 0
    )


def billing_event() -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": "fail_test_1",
        "source": "/billing",
        "type": "churnguard.billing.invoice_payment_failed",
        "time": "2026-11-20T09:30:00Z",
        "subject": "acct_stripe_1",
        "schemaversion": 1,
        "data": {
            "invoice_id": "in_1Qx",
            "subscription_id": "sub_1Qx",
            "amount_due": 12000,
            "currency": "usd",
            "attempt_count": 1,
            "decline_code": "insufficient_funds",
            "decline_kind": "soft",
            "next_payment_attempt": None,
        },
    }


async def test_signed_stripe_webhooks_are_booked_and_bad_signatures_refused(
    kafka: KafkaBroker, kafka_topics: str, start_ingest: ServiceFactory
) -> None:
    ingest = start_ingest(CHURNGUARD_INGEST_STRIPE_WEBHOOK_SECRET=f"whsec_old_9a8b,{STRIPE_SECRET}")
    payload = orjson.dumps(to_stripe(billing_event()))
    now = int(time.time())
    url = f"{ingest.url}/v1/webhooks/stripe"
    async with httpx.AsyncClient() as client:

        async def post(secret: str, t: int) -> httpx.Response:
            header = f"t={t},v1={stripe_signature(secret, payload, t)}"
            return await client.post(url, content=payload, headers={"Stripe-Signature": header})

        good = await post(STRIPE_SECRET, now)
        redelivered = await post(STRIPE_SECRET, now)
        wrong = await post("whsec_attacker", now)
        stale = await post(STRIPE_SECRET, now - 301)
        unknown = orjson.dumps(
            {
                "id": "evt_x",
                "object": "event",
                "type": "customer.created",
                "created": now,
                "data": {"object": {}},
            }
        )
        t = int(time.time())
        other = await client.post(
            url,
            content=unknown,
            headers={"Stripe-Signature": f"t={t},v1={stripe_signature(STRIPE_SECRET, unknown, t)}"},
        )
    assert good.status_code == 200, good.text
    assert good.json()["handled"] is True
    assert redelivered.json()["duplicate"] is True
    assert (wrong.status_code, stale.status_code) == (401, 401)
    assert "more than the 300 s tolerance" in stale.json()["detail"]
    assert other.status_code == 200
    assert other.json()["handled"] is False
    (record,) = await read_topic(kafka.bootstrap, Topic.BILLING.name_in(kafka_topics), 1)
    (event,) = envelope.unpack(record.value)
    assert event["subject"] == "acct_stripe_1"
    assert event["data"]["decline_code"] == "insufficient_funds"
    assert datetime.fromisoformat(event["time"]) == datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
