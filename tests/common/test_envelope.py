"""Partition envelopes: placement, encoding and the errors a consumer gets for bad records."""

from __future__ import annotations

import ctypes
import re

import orjson
import pytest
from aiokafka.partitioner import murmur2

from churnguard.common import envelope
from churnguard.common.topics import Topic
from tests.fixtures.events import feature_used

# Kafka's own test vectors for murmur2 (clients UtilsTest.testMurmur2), as signed 32-bit ints
KAFKA_MURMUR2_VECTORS = {
    "21": -973932308,
    "foobar": -790332482,
    "a-little-bit-long-string": -985981536,
    "a-little-bit-longer-string": -1486304829,
    "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    "abc": 479470107,
}


@pytest.mark.parametrize(("key", "expected"), KAFKA_MURMUR2_VECTORS.items())
def test_murmur2_matches_kafka(key: str, expected: int) -> None:
    assert ctypes.c_int32(murmur2(key.encode())).value == expected


def test_partition_is_java_default_partitioner() -> None:
    # Java: Utils.toPositive(Utils.murmur2(keyBytes)) % numPartitions
    for key, signed in KAFKA_MURMUR2_VECTORS.items():
        assert envelope.partition_for(key, 12) == (signed & 0x7FFFFFFF) % 12


def test_round_trip_keeps_order_and_content() -> None:
    events = [feature_used("acct_1", i) for i in range(5)]
    raw = envelope.encode(events)
    assert orjson.loads(raw)[0]["schemaversion"] == 1
    assert Topic.USAGE.codec.decode(raw) == events
    assert envelope.record_key(events) == b"acct_1"


def test_multi_account_envelope_has_no_single_key() -> None:
    events = [feature_used("acct_1", 1), feature_used("acct_2", 2)]
    assert envelope.record_key(events) is None
    assert [e.subject for e in Topic.USAGE.codec.decode(envelope.encode(events))] == [
        "acct_1",
        "acct_2",
    ]


def test_single_cloudevent_object_is_a_one_event_envelope() -> None:
    event = feature_used("acct_9", 3)
    assert Topic.USAGE.codec.decode(event.to_json()) == [event]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "tombstone"),
        (b"not json", "not JSON"),
        (b"[]", "no events"),
        (b"42", "JSON array"),
        (b"[1]", "events[0]: expected a JSON object"),
    ],
)
def test_unreadable_records_say_why(value: bytes | None, reason: str) -> None:
    with pytest.raises(envelope.InvalidEnvelope, match=re.escape(reason)):
        Topic.USAGE.codec.decode(value)


def test_invalid_event_names_its_index_and_field() -> None:
    good = orjson.loads(feature_used("acct_1", 1).to_json())
    bad = dict(good, data={"user_id": "u1"})
    with pytest.raises(envelope.InvalidEnvelope) as info:
        Topic.USAGE.codec.decode(orjson.dumps([good, bad]))
    assert info.value.reason.startswith("events[1]: data.feature: Field required")
