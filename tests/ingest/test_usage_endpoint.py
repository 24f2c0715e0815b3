"""The ingest slice: one usage event in, one acknowledged envelope on events.usage."""

from __future__ import annotations

import gzip
from pathlib import Path

import httpx
import orjson
import pytest

from churnguard.common import envelope
from churnguard.common.topics import Topic
from tests.fixtures.kafka import KafkaBroker, end_offsets, read_topic
from tests.fixtures.services import RunningService

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "libs/common/src/churnguard/common/events/examples"


def usage_event(account: str, event_id: str, **data: object) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "/tests/app",
        "type": "churnguard.usage.feature_used",
        "time": "2026-11-20T09:30:00Z",
        "subject": account,
        "schemaversion": 1,
        "data": {"user_id": "u_42", "feature": "dashboards", **data},
    }


async def test_event_is_acknowledged_on_its_account_partition(
    kafka: KafkaBroker, kafka_topics: str, ingest_service: RunningService
) -> None:
    topic = Topic.USAGE.name_in(kafka_topics)
    body = usage_event("acct_7f3a91", "evt-1")
    async with httpx.AsyncClient(base_url=ingest_service.url, auth=ingest_service.auth) as client:
        response = await client.post("/v1/events/usage", json=body)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["partition"] == envelope.partition_for("acct_7f3a91", 4)

    (record,) = await read_topic(kafka.bootstrap, topic, 1)
    assert record.partition == accepted["partition"]
    assert record.offset == accepted["offset"]
    assert record.key == b"acct_7f3a91"
    assert dict(record.headers)["content-type"] == envelope.CONTENT_TYPE.encode()
    (event,) = envelope.unpack(record.value)
    assert event["id"] == "evt-1"
    assert event["data"] == {"user_id": "u_42", "feature": "dashboards", "count": 1}


async def test_malformed_event_gets_422_naming_the_field_and_publishes_nothing(
    kafka: KafkaBroker, kafka_topics: str, ingest_service: RunningService
) -> None:
    topic = Topic.USAGE.name_in(kafka_topics)
    body = usage_event("acct_7f3a91", "evt-2")
    del body["data"]["feature"]  # type: ignore[attr-defined]
    async with httpx.AsyncClient(base_url=ingest_service.url, auth=ingest_service.auth) as client:
        response = await client.post("/v1/events/usage", json=body)
        naive = await client.post(
            "/v1/events/usage", json=usage_event("acct_1", "evt-3") | {"time": "2026-11-20T09:30"}
        )
    assert response.status_code == 422
    locs = [err["loc"] for err in response.json()["detail"]]
    assert ["body", "churnguard.usage.feature_used", "data", "feature"] in locs
    assert naive.status_code == 422
    assert "time" in orjson.dumps(naive.json()["detail"]).decode()
    assert sum((await end_offsets(kafka.bootstrap, topic)).values()) == 0


def example(kind: str) -> dict[str, object]:
    folder = EXAMPLES / kind
    return dict(orjson.loads(sorted(folder.glob("*.json"))[0].read_bytes()))


async def test_every_event_endpoint_needs_a_live_write_key(
    kafka: KafkaBroker, kafka_topics: str, ingest_service: RunningService
) -> None:
    body = usage_event("acct_7f3a91", "evt-auth")
    async with httpx.AsyncClient(base_url=ingest_service.url) as client:
        for path in ("/v1/events/usage", "/v1/events/billing/batch", "/v1/events/feedback"):
            missing = await client.post(path, json=body)
            wrong = await client.post(path, json=body, auth=("cg_live_" + "x" * 32, ""))
            assert (missing.status_code, wrong.status_code) == (401, 401), path
            assert "WWW-Authenticate" in missing.headers
            assert "cg_live_xxx" not in wrong.text
    assert (
        sum((await end_offsets(kafka.bootstrap, Topic.USAGE.name_in(kafka_topics))).values()) == 0
    )


async def test_billing_and_feedback_events_go_to_their_topics(
    kafka: KafkaBroker, kafka_topics: str, ingest_service: RunningService
) -> None:
    async with httpx.AsyncClient(base_url=ingest_service.url, auth=ingest_service.auth) as client:
        billing = await client.post(
            "/v1/events/billing", json=example("churnguard.billing.invoice_payment_failed")
        )
        feedback = await client.post(
            "/v1/events/feedback", json=example("churnguard.feedback.nps_submitted")
        )
    assert (billing.status_code, feedback.status_code) == (202, 202), billing.text + feedback.text
    assert billing.json()["topic"] == Topic.BILLING.name_in(kafka_topics)
    (record,) = await read_topic(kafka.bootstrap, Topic.FEEDBACK.name_in(kafka_topics), 1)
    assert envelope.unpack(record.value)[0]["type"] == "churnguard.feedback.nps_submitted"


async def test_batch_accepts_the_valid_events_and_reports_each_invalid_one(
    kafka: KafkaBroker, kafka_topics: str, ingest_service: RunningService
) -> None:
    events = [usage_event(f"acct_{i}", f"evt-b{i}") for i in range(5)]
    del events[1]["subject"]
    events[3]["data"] = {"user_id": "u1", "feature": "Not A Key!"}
    async with httpx.AsyncClient(base_url=ingest_service.url, auth=ingest_service.auth) as client:
        response = await client.post("/v1/events/usage/batch", json={"events": events})
        again = await client.post("/v1/events/usage/batch", json={"events": [events[0]]})
    assert response.status_code == 202, response.text
    result = response.json()
    assert [a["id"] for a in result["accepted"]] == ["evt-b0", "evt-b2", "evt-b4"]
    assert [(r["index"], r["field"]) for r in result["rejected"]] == [
        (1, "subject"),
        (3, "data.feature"),
    ]
    assert again.json()["accepted"][0]["duplicate"] is True
    records = await read_topic(kafka.bootstrap, Topic.USAGE.name_in(kafka_topics), 1)
    ids = sorted(e["id"] for r in records for e in envelope.unpack(r.value))
    assert ids == ["evt-b0", "evt-b2", "evt-b4"]


async def test_gzip_bodies_are_accepted_and_oversize_ones_refused(
    kafka: KafkaBroker, kafka_topics: str, ingest_service: RunningService
) -> None:
    body = orjson.dumps(usage_event("acct_gz", "evt-gz"))
    huge = orjson.dumps(usage_event("acct_gz", "evt-huge", blob="x" * 40_000))
    bomb = gzip.compress(orjson.dumps({"events": [], "pad": "0" * 5_000_000}))
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=ingest_service.url, auth=ingest_service.auth) as client:
        zipped = await client.post(
            "/v1/events/usage",
            content=gzip.compress(body),
            headers=headers | {"content-encoding": "gzip"},
        )
        too_big = await client.post("/v1/events/usage", content=huge, headers=headers)
        inflated = await client.post(
            "/v1/events/usage/batch", content=bomb, headers=headers | {"content-encoding": "gzip"}
        )
    assert zipped.status_code == 202, zipped.text
    assert too_big.status_code == 413
    assert "32,768 bytes" in too_big.json()["detail"]
    assert inflated.status_code == 413
    assert "decompressed" in inflated.json()["detail"]
