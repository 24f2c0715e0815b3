"""The ingest slice: one usage event in, one acknowledged envelope on events.usage."""

from __future__ import annotations

import httpx
import orjson
import pytest

from churnguard.common import envelope
from churnguard.common.topics import Topic
from tests.fixtures.kafka import KafkaBroker, end_offsets, read_topic
from tests.fixtures.services import RunningService

pytestmark = pytest.mark.integration


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
    async with httpx.AsyncClient(base_url=ingest_service.url) as client:
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
    async with httpx.AsyncClient(base_url=ingest_service.url) as client:
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
