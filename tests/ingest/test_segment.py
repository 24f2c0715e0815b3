"""Segment HTTP Tracking API → churnguard usage CloudEvents (pure: no servers, no Kafka)."""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from churnguard.common.events.base import CloudEvent
from churnguard.common.events.usage import FeatureUsed, Group, Identify, Track, UsageEvent
from churnguard.ingest import segment
from churnguard.ingest.segment import (
    MAX_BATCH_BYTES,
    MAX_EVENT_BYTES,
    NO_ACCOUNT,
    PayloadTooLarge,
    Rejection,
    SegmentError,
    check_batch_size,
    check_event_size,
    decode_body,
    map_batch,
    parse_batch,
    parse_single,
    read_batch,
    to_cloudevent,
)
from churnguard.simulator.http_sink import segment_batch_body, to_segment
from churnguard.simulator.world import SimConfig, World

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(
    p
    for p in ROOT.glob(
        "libs/common/src/churnguard/common/events/examples/churnguard.usage.*/*.json"
    )
    if "seats_changed" not in p.parent.name
)
SEGMENT_TYPES = {
    "churnguard.usage.track",
    "churnguard.usage.identify",
    "churnguard.usage.group",
    "churnguard.usage.feature_used",
}
SOURCE = "/ingest/segment"
RECEIVED = datetime(2026, 1, 15, 12, 0, 0, 250_000, tzinfo=UTC)
USAGE = TypeAdapter(UsageEvent)


def no_account(user_id: str | None, anonymous_id: str | None) -> str | None:
    return None


def convert(message: Mapping[str, Any], **kwargs: Any) -> CloudEvent:
    options: dict[str, Any] = {
        "index": 0,
        "source": SOURCE,
        "received_at": RECEIVED,
        "resolve_account": no_account,
    }
    options.update(kwargs)
    return to_cloudevent(message, **options)


def rejection(message: Mapping[str, Any], **kwargs: Any) -> SegmentError:
    with pytest.raises(SegmentError) as info:
        convert(message, **kwargs)
    return info.value


def track(**fields: Any) -> dict[str, Any]:
    """A minimal valid track message, with ``fields`` replacing (None: removing) keys."""
    message: dict[str, Any] = {
        "type": "track",
        "messageId": str(uuid.uuid4()),
        "timestamp": "2026-01-15T11:59:00.000Z",
        "userId": "u_1",
        "event": "Report Exported",
        "properties": {"format": "csv"},
        "context": {"groupId": "acct_1"},
    }
    for key, value in fields.items():
        if value is None:
            message.pop(key, None)
        else:
            message[key] = value
    return message


# -- round trip through the simulator's wire format -----------------------------------------


def expected_data(original: CloudEvent) -> dict[str, Any]:
    """The original's data as it comes back; the one lossy case is made explicit here."""
    data: dict[str, Any] = original.data.model_dump(by_alias=True)
    if isinstance(original, Track) and data["user_id"] is None and data["anonymous_id"] is None:
        data["anonymous_id"] = f"account:{original.subject}"  # to_segment's placeholder
    return data


def assert_same(got: CloudEvent, original: CloudEvent) -> None:
    assert (got.id, got.type, got.subject, got.time) == (
        original.id,
        original.type,
        original.subject,
        original.time,
    )
    assert got.data.model_dump(by_alias=True) == expected_data(original)
    assert got.source == SOURCE


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_examples_round_trip(path: Path) -> None:
    event = orjson.loads(path.read_bytes())
    original = USAGE.validate_python(event)
    message = orjson.loads(orjson.dumps(to_segment(event)))
    assert_same(convert(message), original)


def test_examples_cover_every_segment_type() -> None:
    assert {orjson.loads(p.read_bytes())["type"] for p in EXAMPLES} == SEGMENT_TYPES


@pytest.fixture(scope="module")
def world_events() -> list[dict[str, Any]]:
    """Usage events of a small world: all track/identify/group, feature_used up to 4000."""
    events: list[dict[str, Any]] = []
    feature_used = 0
    for day in World(SimConfig(accounts=200, days=30, seed=1)).run():
        for line in day.lines:
            event = orjson.loads(line)
            if event["type"] not in SEGMENT_TYPES:
                continue  # seats_changed goes native; billing and feedback elsewhere
            if event["type"] == "churnguard.usage.feature_used":
                feature_used += 1
                if feature_used > 4000:
                    continue
            events.append(event)
    return events


def batches(events: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(events), size):
        yield events[start : start + size]


def test_simulated_world_round_trips_through_batch_requests(
    world_events: list[dict[str, Any]],
) -> None:
    assert len(world_events) > 3000
    assert {e["type"] for e in world_events} == SEGMENT_TYPES
    sent_at = RECEIVED.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    checked = 0
    for chunk in batches(world_events, 100):
        wire = [orjson.dumps(to_segment(event)) for event in chunk]
        body = segment_batch_body(wire, sent_at, "0.0.0")
        # sentAt == receivedAt: the skew correction is zero, so times must be exact
        result = map_batch(
            parse_batch(body), source=SOURCE, received_at=RECEIVED, resolve_account=no_account
        )
        assert result.rejected == []
        assert len(result.accepted) == len(chunk)
        for got, payload, event in zip(result.accepted, result.payloads, chunk, strict=True):
            assert_same(got, USAGE.validate_python(event))
            assert_payload_is(payload, got)
            checked += 1
    assert checked == len(world_events)


def assert_payload_is(payload: bytes, event: CloudEvent) -> None:
    """What ingest publishes decodes to the event it validated, in CloudEvents JSON."""
    assert USAGE.validate_json(payload) == event
    written = orjson.loads(payload)
    canonical = orjson.loads(event.to_json())
    assert datetime.fromisoformat(written.pop("time")) == datetime.fromisoformat(
        canonical.pop("time")
    )
    assert written == canonical  # same attribute names and values, defaults included


def reference(
    messages: list[dict[str, Any]],
    resolve_account: Any = no_account,
    received_at: datetime = RECEIVED,
) -> tuple[list[CloudEvent], list[tuple[int, str | None, str]]]:
    """What a batch must map to: each message through :func:`to_cloudevent` (validated by
    its event model), group calls telling later messages their user's account."""
    learned: dict[str, str] = {}
    accepted: list[CloudEvent] = []
    rejected: list[tuple[int, str | None, str]] = []
    for i, message in enumerate(messages):
        try:
            event = to_cloudevent(
                message,
                index=i,
                source=SOURCE,
                received_at=received_at,
                resolve_account=lambda u, a: learned[u] if u in learned else resolve_account(u, a),
            )
        except SegmentError as exc:
            rejected.append((i, exc.field, exc.reason))
            continue
        if isinstance(event, Group):
            learned[event.data.user_id] = event.subject
        accepted.append(event)
    return accepted, rejected


def assert_maps_like_reference(
    body: dict[str, Any], resolve_account: Any = no_account, received_at: datetime = RECEIVED
) -> None:
    """map_batch of the raw messages (batch fields applied in place) is exactly the
    reference mapping of the merged ones: the same events, written as the models write
    them, and the same rejections."""
    batch = read_batch(orjson.dumps(body))
    result = map_batch(
        batch.messages,
        source=SOURCE,
        received_at=received_at,
        resolve_account=resolve_account,
        sent_at=batch.sent_at,
        context=batch.context,
    )
    expected, rejected = reference(batch.merged(), resolve_account, received_at)
    assert [(r.index, r.field, r.reason) for r in result.rejected] == rejected
    assert result.ids == [e.id for e in expected]
    assert result.subjects == [e.subject for e in expected]
    assert result.types == [e.type for e in expected]
    for payload, event in zip(result.payloads, expected, strict=True):
        assert orjson.loads(payload) == orjson.loads(event.to_json())  # defaults included
    users = {e.data.user_id: e.subject for e in expected if getattr(e.data, "user_id", None)}
    assert result.users == users


ids = st.one_of(
    st.text(min_size=1, max_size=3),
    st.sampled_from(["", "m" * 128, "m" * 129]),
    st.integers(-5, 10**6),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(-5, 5), max_size=1),
)
"""messageId, userId, anonymousId, groupId: strings (also at their limits), the numbers
Segment libraries send, and wrong types."""
accounts = st.one_of(
    st.sampled_from(["acct_1", "acct_2", "a", "acct with spaces", "-acct", "", "a" * 128]),
    st.just("a" * 129),
    st.sampled_from([["acct_1"], {"id": "acct_1"}]),
    ids,
)
times = st.one_of(
    st.datetimes(
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(seconds=-3615))]
        )
    ).map(lambda t: t.isoformat()),
    st.datetimes().map(lambda t: t.isoformat()),  # no zone: UTC
    st.sampled_from(["2026-01-15T11:59:00.000Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"]),
    st.sampled_from(["yesterday", "2026-13-01T00:00:00Z", ""]),
    st.integers(0, 2**40),
    st.none(),
)
counts = st.one_of(
    st.integers(-2, 2_000_000),
    st.sampled_from([1_000_000, 1_000_001, 0]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(1, 1000).map(str),
    st.booleans(),
    st.none(),
)
features = st.one_of(
    st.sampled_from(["dashboards", "reports.export", "Bad Key", "", "x" * 100, "x" * 101]),
    st.text(max_size=6),
    st.integers(-5, 5),
    st.sampled_from([["dashboards"], {"key": "dashboards"}, None, True]),
)
objects = st.one_of(
    st.dictionaries(st.text(max_size=4), st.integers(-5, 5) | st.text(max_size=4), max_size=3),
    st.none(),
    st.sampled_from(["x", 3, ["x"]]),
)


@st.composite
def segment_messages(draw: st.DrawFn) -> dict[str, Any]:
    """Well-formed messages of every call type, some with a field or three changed to
    anything (a value at a limit, a wrong type, nothing at all)."""
    kind = draw(st.sampled_from(["track"] * 4 + ["identify", "group", "page", "screen"]))
    message: dict[str, Any] = {
        "type": kind,
        "messageId": draw(st.uuids().map(str)),
        "userId": draw(st.sampled_from(["u_1", "u_2", "u_3"])),
        "timestamp": "2026-01-15T11:59:00.000Z",
        "context": {"groupId": "acct_1"},
    }
    if kind == "track":
        message["event"], message["properties"] = draw(
            st.sampled_from(
                [
                    ("Feature Used", {"feature": "dashboards", "count": 2}),
                    ("Feature Used", {"feature": "reports.export"}),
                    ("Report Exported", {"format": "csv"}),
                ]
            )
        )
    elif kind == "group":
        message |= {"groupId": "acct_1", "traits": {"plan": "pro"}}
    elif kind == "identify":
        message["traits"] = {"email": "a@b.c"}
    else:
        message |= {"name": "Pricing", "properties": {"path": "/pricing"}}
    changes: dict[str, st.SearchStrategy[Any]] = {
        "type": st.sampled_from(["track", "identify", "group", "alias", "Track", None, 3]),
        "messageId": ids,
        "userId": st.sampled_from(["u_1", "u_2", "u" * 256, "u" * 257]) | ids,
        "anonymousId": st.sampled_from(["anon-1", "a" * 256, "a" * 257]) | ids,
        "timestamp": times,
        "originalTimestamp": times,
        "sentAt": times,
        "context": st.one_of(
            st.fixed_dictionaries({"groupId": accounts}),
            st.fixed_dictionaries({"library": st.just({"name": "x"})}),
            st.just({"groupId": None}),
            objects,
        ),
        "groupId": accounts,
        "traits": objects,
        "properties": st.one_of(
            st.fixed_dictionaries({"feature": features}, optional={"count": counts}),
            st.fixed_dictionaries({"feature": features, "plan": st.just("pro")}),
            objects,
        ),
        "event": st.sampled_from(["Feature Used", "Report Exported", "", "e" * 200, "e" * 201])
        | st.none()
        | st.integers(-5, 5),
        "name": st.sampled_from(["Pricing", None]),
    }
    for key in draw(st.lists(st.sampled_from(sorted(changes)), max_size=3, unique=True)):
        if draw(st.integers(0, 4)) == 0:
            message.pop(key, None)
        else:
            message[key] = draw(changes[key])
    return message


@settings(max_examples=1000, deadline=None)
@given(
    messages=st.lists(segment_messages(), max_size=6),
    sent_at=st.one_of(st.none(), times),
    context=st.one_of(
        st.none(),
        st.fixed_dictionaries({"groupId": accounts}),
        st.just({"library": {"name": "analytics.js"}}),
    ),
    received_at=st.sampled_from(
        [RECEIVED, datetime(2026, 1, 15, 13, 0, tzinfo=timezone(timedelta(hours=1)))]
    ),
)
def test_batches_map_as_each_message_would_alone(
    messages: list[dict[str, Any]],
    sent_at: Any,
    context: dict[str, Any] | None,
    received_at: datetime,
) -> None:
    body: dict[str, Any] = {"batch": messages}
    if sent_at is not None:
        body["sentAt"] = sent_at
    if context is not None:
        body["context"] = context
    known = {"u_1": "acct_known", "u_2": "not an account!"}
    assert_maps_like_reference(body, lambda user, anon: known.get(user or ""), received_at)


def test_the_usual_messages_take_the_quick_path(world_events: list[dict[str, Any]]) -> None:
    """The simulator's messages (and the benchmark's) are mapped without building a model:
    white-box, because the quick path is what makes ingest fast enough (bench/ingest.py)."""
    sent_at = RECEIVED.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    wire = [orjson.dumps(to_segment(event)) for event in world_events[:500]]
    body = orjson.loads(segment_batch_body(wire, sent_at, "0.0.0"))
    quick = segment._QuickMapper(SOURCE, RECEIVED, body["sentAt"], body["context"])
    assert all(quick(m, no_account) is not None for m in body["batch"])
    assert_maps_like_reference(body)


# -- what segment-analytics-python sends ----------------------------------------------------


def python_library_message(type_: str, **fields: Any) -> dict[str, Any]:
    """A message as ``segment.analytics.Client._enqueue`` builds it.

    Its keys are always present (null when not given: ``clean`` keeps None), ``timestamp`` is
    ``isoformat(timespec="milliseconds")`` of an aware datetime, ``messageId`` a uuid4
    string, ``context.library`` names the library, ids are stringified.
    """
    timestamp = fields.pop("timestamp", datetime(2026, 1, 15, 11, 59, 30, 123_000, tzinfo=UTC))
    message: dict[str, Any] = {
        "integrations": fields.pop("integrations", {}),
        "anonymousId": fields.pop("anonymous_id", None),
        "timestamp": timestamp.isoformat(timespec="milliseconds"),
        "context": {
            **fields.pop("context", {}),
            "library": {"name": "analytics-python", "version": "2.3.4"},
        },
        "type": type_,
        "userId": fields.pop("user_id", None),
        "messageId": str(uuid.uuid4()),
    }
    if type_ in ("track", "page", "screen"):
        message["properties"] = fields.pop("properties", {})
    if type_ in ("identify", "group"):
        message["traits"] = fields.pop("traits", {})
    if type_ == "track":
        message["event"] = fields.pop("event")
    if type_ == "group":
        message["groupId"] = fields.pop("group_id")
    if type_ in ("page", "screen"):
        message["category"] = fields.pop("category", None)
        message["name"] = fields.pop("name", None)
    assert not fields, fields
    return message


def python_library_body(messages: list[dict[str, Any]], sent_at: datetime) -> bytes:
    """``segment.analytics.request.post``: json.dumps with its default separators."""
    body = {"batch": messages, "sentAt": sent_at.isoformat(), "writeKey": "wk_test"}
    return json.dumps(body).encode()


def test_python_library_batch_maps() -> None:
    acct = {"groupId": "acct_7f3a91"}
    messages = [
        python_library_message("group", user_id="usr_1", group_id="acct_7f3a91", traits={"n": 1}),
        # no context.groupId: the group call above tells usr_1's account
        python_library_message("identify", user_id="usr_1", traits={"email": "a@b.c"}),
        python_library_message("track", user_id="usr_1", event="Report Exported", context=acct),
        python_library_message(
            "track", user_id="usr_1", event="Feature Used", properties={"feature": "reports.export"}
        ),
        python_library_message("track", anonymous_id="anon-9", event="Signup Started"),
        python_library_message("page", user_id="usr_1", name="Pricing", context=acct),
        python_library_message("screen", user_id=42, name="Home", category="Main", context=acct),
    ]
    messages[-1]["userId"] = "42"  # stringify_id
    sent_at = datetime(2026, 1, 15, 11, 59, 31, tzinfo=UTC)
    received = sent_at + timedelta(milliseconds=40)  # the request was in flight for 40 ms
    accounts = {"anon-9": "acct_anon"}
    result = map_batch(
        parse_batch(python_library_body(messages, sent_at)),
        source=SOURCE,
        received_at=received,
        resolve_account=lambda user, anon: accounts.get(anon or ""),
    )
    assert result.rejected == []
    assert [e.id for e in result.accepted] == [m["messageId"] for m in messages]
    group, identify, tracked, feature, anonymous, page, screen = result.accepted
    assert isinstance(group, Group)
    assert (group.subject, group.data.user_id, group.data.traits) == (
        "acct_7f3a91",
        "usr_1",
        {"n": 1},
    )
    assert isinstance(identify, Identify)
    assert (identify.subject, identify.data.traits) == ("acct_7f3a91", {"email": "a@b.c"})
    assert isinstance(tracked, Track)
    assert (tracked.data.event, tracked.data.user_id, tracked.data.properties) == (
        "Report Exported",
        "usr_1",
        {},
    )
    assert isinstance(feature, FeatureUsed)
    assert (feature.subject, feature.data.feature, feature.data.count) == (
        "acct_7f3a91",
        "reports.export",
        1,
    )
    assert isinstance(anonymous, Track)
    assert (anonymous.subject, anonymous.data.user_id, anonymous.data.anonymous_id) == (
        "acct_anon",
        None,
        "anon-9",
    )
    assert isinstance(page, Track)
    assert (page.data.event, page.data.properties) == ("Page Viewed", {"name": "Pricing"})
    assert isinstance(screen, Track)
    assert (screen.data.event, screen.data.user_id) == ("Screen Viewed", "42")
    assert screen.data.properties == {"name": "Home", "category": "Main"}
    # skew correction: receivedAt - (sentAt - timestamp) = timestamp + 40 ms
    when = datetime(2026, 1, 15, 11, 59, 30, 163_000, tzinfo=UTC)
    assert {e.time for e in result.accepted} == {when}
    assert {e.source for e in result.accepted} == {SOURCE}


def test_python_library_single_call_without_sent_at() -> None:
    """sync_mode posts ``batch=[msg]``; a hand-rolled client may post one call to /v1/track."""
    message = python_library_message(
        "track", user_id="usr_1", event="Report Exported", context={"groupId": "acct_1"}
    )
    event = convert(parse_single("track", json.dumps(message).encode()), index=None)
    assert event.time == datetime(2026, 1, 15, 11, 59, 30, 123_000, tzinfo=UTC)  # as sent


# -- limits -----------------------------------------------------------------------------------


def padded(size: int) -> dict[str, Any]:
    """A valid track message whose compact JSON is exactly ``size`` bytes."""
    message = track(messageId="m-pad", properties={"pad": ""})
    message["properties"]["pad"] = "x" * (size - len(orjson.dumps(message)))
    assert len(orjson.dumps(message)) == size
    return message


def test_event_limit_on_single_call() -> None:
    assert parse_single("track", orjson.dumps(padded(MAX_EVENT_BYTES)))["type"] == "track"
    with pytest.raises(PayloadTooLarge) as info:
        parse_single("track", orjson.dumps(padded(MAX_EVENT_BYTES + 1)))
    assert info.value.status == 413
    assert str(MAX_EVENT_BYTES) in info.value.reason


def test_event_limit_in_batch_names_the_message() -> None:
    ok = {"batch": [track(), padded(MAX_EVENT_BYTES)]}
    assert len(parse_batch(orjson.dumps(ok))) == 2
    big = {"batch": [track(), padded(MAX_EVENT_BYTES + 1)]}
    with pytest.raises(PayloadTooLarge) as info:
        parse_batch(orjson.dumps(big))
    assert (info.value.index, info.value.field) == (1, "batch[1]")
    check_event_size(padded(MAX_EVENT_BYTES))
    with pytest.raises(PayloadTooLarge):
        check_event_size(padded(MAX_EVENT_BYTES + 1), index=3)


def test_batch_limit() -> None:
    body = orjson.dumps({"batch": [track()]})
    exact = body + b" " * (MAX_BATCH_BYTES - len(body))
    assert len(parse_batch(exact)) == 1
    with pytest.raises(PayloadTooLarge) as info:
        parse_batch(exact + b" ")
    assert info.value.status == 413
    with pytest.raises(PayloadTooLarge):
        check_batch_size(b"x" * (500 * 1024 + 1))


def test_gzip_body_is_decoded_within_the_limit() -> None:
    body = orjson.dumps({"batch": [track()]})
    assert decode_body(gzip.compress(body), "gzip") == body
    assert decode_body(body, None) == body
    assert decode_body(gzip.compress(body[:10]) + gzip.compress(body[10:]), "gzip") == body
    bomb = gzip.compress(b" " * (MAX_BATCH_BYTES + 1))
    with pytest.raises(PayloadTooLarge):
        decode_body(bomb, "gzip")
    with pytest.raises(SegmentError, match="gzip"):
        decode_body(b"not gzip", "gzip")
    with pytest.raises(SegmentError, match="truncated"):
        decode_body(gzip.compress(body)[:-8], "gzip")
    with pytest.raises(SegmentError, match="Content-Encoding"):
        decode_body(body, "br")


# -- request structure --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "must be a JSON object, not an array"),
        (b'"batch"', None, "not a string"),
        (b"{}", "batch", "missing 'batch'"),
        (b'{"batch": {"type": "track"}}', "batch", "must be an array"),
        (b'{"batch": null}', "batch", "not null"),
        (b'{"batch": [{"type": "track"}, 7]}', "batch[1]", "must be a JSON object, not a number"),
        (b'{"batch": [], "context": []}', "context", "must be an object"),
    ],
)
def test_bad_batch_requests(body: bytes, field: str | None, reason: str) -> None:
    with pytest.raises(SegmentError) as info:
        parse_batch(body)
    assert info.value.status == 400
    assert info.value.field == field
    assert reason in info.value.reason


def test_a_message_that_is_not_an_object_is_rejected_by_index() -> None:
    result = map_batch(
        [7, track(messageId="ok"), ["x"]],  # type: ignore[list-item]
        source=SOURCE,
        received_at=RECEIVED,
        resolve_account=no_account,
        sent_at="2026-01-15T12:00:00Z",
    )
    assert result.ids == ["ok"]
    assert [(r.index, r.field) for r in result.rejected] == [(0, "batch[0]"), (2, "batch[2]")]


def test_batch_fields_apply_to_every_message() -> None:
    own = track(context={"groupId": "acct_own"}, sentAt="2026-01-15T12:00:00Z")
    body = {
        "batch": [track(context=None), own],
        "sentAt": "2026-01-15T11:00:00Z",
        "context": {"groupId": "acct_env", "library": {"name": "x"}},
    }
    first, second = parse_batch(orjson.dumps(body))
    assert first["sentAt"] == "2026-01-15T11:00:00Z"
    assert first["context"] == {"groupId": "acct_env", "library": {"name": "x"}}
    assert second["sentAt"] == "2026-01-15T12:00:00Z"
    assert second["context"] == {"groupId": "acct_own", "library": {"name": "x"}}
    assert parse_batch(b'{"batch": []}') == []


def test_single_call_type_comes_from_the_path() -> None:
    body = orjson.dumps(track(type=None))
    assert parse_single("track", body)["type"] == "track"
    assert parse_single("page", orjson.dumps({"messageId": "m"}))["type"] == "page"
    with pytest.raises(SegmentError) as info:
        parse_single("identify", body.replace(b'"userId"', b'"type":"track","userId"'))
    assert info.value.field == "type"
    with pytest.raises(SegmentError, match="unknown call"):
        parse_single("batch", body)
    with pytest.raises(SegmentError, match="not valid JSON"):
        parse_single("track", b"")


# -- message errors -----------------------------------------------------------------------------


def test_missing_message_id_is_rejected() -> None:
    for message in (
        track(messageId=None),
        track(messageId=""),
        track(messageId=None) | {"messageId": None},
    ):
        error = rejection(message)
        assert (error.index, error.field) == (0, "batch[0].messageId")
        assert "idempotency key" in error.reason


def test_no_account_is_rejected() -> None:
    error = rejection(track(context={"library": {"name": "analytics.js"}}))
    assert (error.field, error.reason) == ("batch[0].context.groupId", NO_ACCOUNT)
    assert str(error) == f"batch[0].context.groupId: {NO_ACCOUNT}"
    assert rejection(track(context=None), index=None).field == "context.groupId"


def test_resolver_is_asked_when_context_has_no_group_id() -> None:
    calls: list[tuple[str | None, str | None]] = []

    def resolve(user_id: str | None, anonymous_id: str | None) -> str | None:
        calls.append((user_id, anonymous_id))
        return "acct_remembered"

    event = convert(track(context={}, anonymousId="anon-1"), resolve_account=resolve)
    assert event.subject == "acct_remembered"
    assert calls == [("u_1", "anon-1")]
    # context.groupId wins: the resolver is not asked
    assert convert(track(), resolve_account=resolve).subject == "acct_1"
    assert len(calls) == 1


def test_group_calls_earlier_in_a_batch_resolve_later_messages() -> None:
    group = {
        "type": "group",
        "messageId": "g-1",
        "userId": "u_1",
        "groupId": "acct_9",
        "timestamp": "2026-01-15T11:00:00Z",
    }
    result = map_batch(
        [track(context=None), group, track(context=None), track(context=None, userId="u_2")],
        source=SOURCE,
        received_at=RECEIVED,
        resolve_account=no_account,
    )
    assert [e.subject for e in result.accepted] == ["acct_9", "acct_9"]
    assert [(r.index, r.field) for r in result.rejected] == [
        (0, "batch[0].context.groupId"),
        (3, "batch[3].context.groupId"),
    ]


@pytest.mark.parametrize(
    ("timestamp", "reason"),
    [
        ("yesterday", "not an ISO-8601 date"),
        ("2026-13-01T00:00:00Z", "not an ISO-8601 date"),
        (1736942400, "not a number"),
    ],
)
def test_bad_timestamp_is_rejected(timestamp: object, reason: str) -> None:
    error = rejection(track(timestamp=timestamp), index=2)
    assert error.field == "batch[2].timestamp"
    assert reason in error.reason
    bad_sent_at = rejection(track(sentAt="soon"), index=2)
    assert bad_sent_at.field == "batch[2].sentAt"


def test_alias_is_unsupported() -> None:
    alias = {"type": "alias", "messageId": "a-1", "previousId": "anon-1", "userId": "u_1"}
    error = rejection(alias)
    assert error.field == "batch[0].type"
    assert "alias is not supported" in error.reason
    assert "unsupported or missing type" in rejection(track(type="boom")).reason
    assert rejection(track(type=None)).field == "batch[0].type"


def test_partial_batch_accepts_the_valid_messages() -> None:
    messages = [
        track(messageId="ok-0"),
        track(messageId="bad-1", event="Feature Used", properties={"feature": "Not A Key!"}),
        track(messageId="ok-2", event="Feature Used", properties={"feature": "dashboards"}),
        track(messageId="bad-3", context={"groupId": "acct with spaces"}),
        track(messageId="ok-4", context=None, userId="u_1"),
    ]
    result = map_batch(
        messages,
        source=SOURCE,
        received_at=RECEIVED,
        resolve_account=lambda user, anon: "acct_1" if user == "u_1" else None,
    )
    assert [e.id for e in result.accepted] == ["ok-0", "ok-2", "ok-4"]
    assert [type(e) for e in result.accepted] == [Track, FeatureUsed, Track]
    assert [(r.index, r.field) for r in result.rejected] == [
        (1, "batch[1].properties.feature"),
        (3, "batch[3].context.groupId"),
    ]
    assert all(isinstance(r, Rejection) and "pattern" in r.reason for r in result.rejected)


def test_clock_skew_correction() -> None:
    # The client's clock is 1 h fast: it stamped 13:00 for what happened at 12:00:00 real
    # time and sent it at (its) 13:00:30; we received it at 12:00:30.250 real time.
    message = track(timestamp="2026-01-15T13:00:00Z", sentAt="2026-01-15T13:00:30Z")
    received = datetime(2026, 1, 15, 12, 0, 30, 250_000, tzinfo=UTC)
    event = convert(message, received_at=received)
    assert event.time == datetime(2026, 1, 15, 12, 0, 0, 250_000, tzinfo=UTC)
    # RudderStack sends originalTimestamp; with no sentAt it is taken as is
    rudder = track(timestamp=None, originalTimestamp="2026-01-15T11:00:00+01:00")
    assert convert(rudder).time == datetime(2026, 1, 15, 10, 0, tzinfo=UTC)
    # neither: the time of receipt
    assert convert(track(timestamp=None)).time == RECEIVED
    # a time without zone is UTC
    assert convert(track(timestamp="2026-01-15T09:30:00")).time == datetime(
        2026, 1, 15, 9, 30, tzinfo=UTC
    )
    # a correction that leaves the calendar is the timestamp's error, not a crash
    far = rejection(track(timestamp="0001-01-01T00:00:00Z", sentAt="9999-12-31T00:00:00Z"))
    assert far.field == "batch[0].timestamp"
    assert "out of range" in far.reason


# -- mapping details ----------------------------------------------------------------------------


def test_feature_used_mapping() -> None:
    three = convert(
        track(event="Feature Used", properties={"feature": "reports.export", "count": 3})
    )
    assert isinstance(three, FeatureUsed)
    assert three.data.count == 3
    zero = rejection(track(event="Feature Used", properties={"feature": "x", "count": 0}))
    assert zero.field == "batch[0].properties.count"
    # other properties, or no userId: an ordinary track, nothing dropped
    extra = convert(track(event="Feature Used", properties={"feature": "x", "plan": "pro"}))
    assert isinstance(extra, Track)
    assert extra.data.properties == {"feature": "x", "plan": "pro"}
    anonymous = convert(
        track(event="Feature Used", userId=None, anonymousId="a-1", properties={"feature": "x"})
    )
    assert isinstance(anonymous, Track)


@pytest.mark.parametrize("feature", [["dashboards"], {"key": "dashboards"}, None, 3])
def test_a_feature_key_that_is_not_a_string_is_the_field_s_error(feature: object) -> None:
    message = track(event="Feature Used", properties={"feature": feature})
    result = map_batch([message], source=SOURCE, received_at=RECEIVED, resolve_account=no_account)
    assert result.ids == []
    assert [(r.index, r.field) for r in result.rejected] == [(0, "batch[0].properties.feature")]


def test_page_mapping_takes_page_context() -> None:
    page = {
        "type": "page",
        "messageId": "p-1",
        "anonymousId": "anon-1",
        "name": "Pricing",
        "category": "Docs",
        "properties": {"title": "Own title"},
        "context": {
            "groupId": "acct_1",
            "page": {"url": "https://x.io/pricing", "path": "/pricing", "title": "Ctx title"},
        },
        "timestamp": "2026-01-15T11:00:00Z",
    }
    event = convert(page)
    assert isinstance(event, Track)
    assert (event.data.event, event.data.anonymous_id, event.data.user_id) == (
        "Page Viewed",
        "anon-1",
        None,
    )
    assert event.data.properties == {
        "title": "Own title",
        "name": "Pricing",
        "category": "Docs",
        "url": "https://x.io/pricing",
        "path": "/pricing",
    }


def test_group_and_identify_rules() -> None:
    group = {"type": "group", "messageId": "g", "userId": "u_1", "groupId": "acct_2"}
    assert convert(group).subject == "acct_2"
    mismatch = rejection({**group, "context": {"groupId": "acct_3"}})
    assert mismatch.field == "batch[0].context.groupId"
    assert rejection({**group, "groupId": None}).field == "batch[0].groupId"
    identify = {"type": "identify", "messageId": "i", "anonymousId": "a", "traits": {}}
    assert rejection({**identify, "context": {"groupId": "acct_1"}}).field == "batch[0].userId"
    assert rejection({**group, "traits": ["x"]}).field == "batch[0].traits"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"userId": None}, "batch[0].userId"),  # neither userId nor anonymousId
        ({"userId": {"id": 1}}, "batch[0].userId"),
        ({"event": ""}, "batch[0].event"),
        ({"event": None}, "batch[0].event"),
        ({"properties": "x"}, "batch[0].properties"),
        ({"context": "acct_1"}, "batch[0].context"),
        ({"context": {"groupId": ["acct_1"]}}, "batch[0].context.groupId"),
        ({"messageId": "m" * 129}, "batch[0].messageId"),
        ({"anonymousId": "a" * 257}, "batch[0].anonymousId"),
    ],
)
def test_invalid_fields_name_the_segment_field(fields: dict[str, Any], field: str) -> None:
    assert rejection(track(**fields)).field == field
