"""Ingest refuses bad requests cleanly: a 4xx with a clear ``detail``, and nothing published.

Property tests (hypothesis) throw malformed JSON, wrong types, unknown fields, oversize
bodies, bad encodings and bad credentials at every endpoint of one running ingest per test
function: hypothesis runs synchronously in a worker thread (``httpx.Client``), so the
service, broker and schema are started once per test, not once per example. After the run,
the end offsets of events.usage, events.billing and events.feedback under the test's prefix
must still sum to 0. A handful of hand-picked cases pin the exact status codes.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from churnguard.common.topics import Topic
from churnguard.ingest import segment
from churnguard.ingest.app import BATCH_LIMIT, DEFAULT_LIMIT, SINGLE_EVENT_LIMIT, body_limit
from churnguard.simulator.http_sink import stripe_signature
from tests.fixtures.kafka import KafkaBroker, end_offsets
from tests.fixtures.services import RunningService

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "libs/common/src/churnguard/common/events/examples"
DEV_STRIPE_SECRET = "dev-stripe-webhook-secret"
"""IngestSettings' default webhook secret; the ``ingest_service`` fixture does not change it."""

NATIVE = {"usage": Topic.USAGE, "billing": Topic.BILLING, "feedback": Topic.FEEDBACK}
SEGMENT_CALLS = ("track", "identify", "group", "page", "screen")
SEGMENT_BATCH_PATHS = ("/v1/batch", "/v1/b", "/v1/import")
STRIPE = "/v1/webhooks/stripe"
NATIVE_SINGLE_PATHS = tuple(f"/v1/events/{area}" for area in NATIVE)
NATIVE_BATCH_PATHS = tuple(f"/v1/events/{area}/batch" for area in NATIVE)
SEGMENT_SINGLE_PATHS = tuple(f"/v1/{kind}" for kind in SEGMENT_CALLS)
KEYED_PATHS = NATIVE_SINGLE_PATHS + NATIVE_BATCH_PATHS + SEGMENT_SINGLE_PATHS + SEGMENT_BATCH_PATHS
"""Every endpoint that needs a write key."""
ALL_PATHS = (*KEYED_PATHS, STRIPE)

EXAMPLES_PER_TEST = 250
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES_PER_TEST,
    deadline=None,
    database=None,  # nothing written into the work tree
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


# -- valid bodies (the mutations start from these) -----------------------------------------


def example(kind: str) -> dict[str, Any]:
    return dict(orjson.loads(sorted((EXAMPLES / kind).glob("*.json"))[0].read_bytes()))


def native_event(area: str) -> dict[str, Any]:
    if area == "usage":
        return {
            "specversion": "1.0",
            "id": "evt-prop-1",
            "source": "/tests/app",
            "type": "churnguard.usage.feature_used",
            "time": "2026-11-20T09:30:00Z",
            "subject": "acct_prop",
            "schemaversion": 1,
            "data": {"user_id": "u_42", "feature": "dashboards", "count": 2},
        }
    if area == "billing":
        return example("churnguard.billing.invoice_paid")
    return example("churnguard.feedback.nps_submitted")


def segment_message(kind: str) -> dict[str, Any]:
    base: dict[str, Any] = {
        "messageId": f"msg-prop-{kind}",
        "userId": "u_42",
        "timestamp": "2026-11-20T09:30:00Z",
        "context": {"groupId": "acct_prop"},
    }
    if kind == "track":
        return base | {"event": "Report Exported", "properties": {"format": "csv"}}
    if kind == "identify":
        return base | {"traits": {"email": "ada@example.com"}}
    if kind == "group":
        return base | {"groupId": "acct_prop", "traits": {"plan": "growth"}}
    return base | {"name": "Docs", "properties": {"path": "/docs"}}


def stripe_event() -> dict[str, Any]:
    return {
        "id": "evt_prop_1",
        "object": "event",
        "type": "invoice.paid",
        "created": 1_790_000_000,
        "data": {"object": {"object": "invoice", "id": "in_1"}},
    }


def valid_body(path: str) -> dict[str, Any]:
    """A body the endpoint accepts (checked offline in :func:`test_the_valid_bodies_are_valid`)."""
    if path in NATIVE_SINGLE_PATHS:
        return native_event(path.rsplit("/", 1)[1])
    if path in NATIVE_BATCH_PATHS:
        return {"events": [native_event(path.split("/")[3])]}
    if path in SEGMENT_SINGLE_PATHS:
        return segment_message(path.rsplit("/", 1)[1])
    if path in SEGMENT_BATCH_PATHS:
        return {"batch": [segment_message("track") | {"type": "track"}]}
    return stripe_event()


def test_the_valid_bodies_are_valid() -> None:
    """The bad-auth property sends these: they must be good, so that only the auth is bad."""
    for area, topic in NATIVE.items():
        topic.adapter.validate_python(native_event(area))
    for kind in SEGMENT_CALLS:
        message = segment.parse_single(kind, orjson.dumps(segment_message(kind)))
        segment.to_cloudevent(
            message,
            index=None,
            source="/segment/test",
            received_at=datetime.now(UTC),
            resolve_account=lambda *_: None,
        )
    for path in SEGMENT_BATCH_PATHS:
        result = segment.map_batch(
            segment.parse_batch(orjson.dumps(valid_body(path))),
            source="/segment/test",
            received_at=datetime.now(UTC),
            resolve_account=lambda *_: None,
        )
        assert result.rejected == []
        assert len(result.accepted) == 1


# -- requests and what every answer must satisfy -------------------------------------------


@dataclass
class Req:
    label: str
    path: str
    body: bytes
    headers: dict[str, str | bytes] = field(default_factory=dict)
    expect: frozenset[int] | None = None
    """The exact statuses allowed (None: any 4xx)."""


def signed(body: bytes, secret: str = DEV_STRIPE_SECRET, at: float | None = None) -> str:
    return stripe_signature(secret, body, int(time.time() if at is None else at))


def check(client: httpx.Client, req: Req, seen: Counter[str]) -> httpx.Response:
    headers = {"content-type": "application/json"} | req.headers
    response = client.post(req.path, content=req.body, headers=headers)
    where = f"{req.label} POST {req.path} ({len(req.body)} bytes): {response.status_code}"
    seen[f"{response.status_code}"] += 1
    assert 400 <= response.status_code < 500, f"{where} {response.text[:500]}"
    if req.expect is not None:
        assert response.status_code in req.expect, f"{where}, expected {set(req.expect)}"
    try:
        payload = response.json()
    except ValueError:
        raise AssertionError(f"{where}: not JSON: {response.text[:200]!r}") from None
    assert isinstance(payload, dict), where
    assert payload.get("detail"), f"{where}: no detail in {payload}"
    if response.status_code == 401 and req.path != STRIPE:
        assert "www-authenticate" in response.headers, where
    return response


async def published(bootstrap: str, prefix: str) -> int:
    total = 0
    for topic in NATIVE.values():
        total += sum((await end_offsets(bootstrap, topic.name_in(prefix))).values())
    return total


async def run_property(service: RunningService, strategy: st.SearchStrategy[Req]) -> Counter[str]:
    """Run hypothesis over ``strategy`` against ``service`` in a worker thread."""
    seen: Counter[str] = Counter()

    def run() -> None:
        with httpx.Client(base_url=service.url, timeout=30.0) as client:

            @PROPERTY_SETTINGS
            @given(strategy)
            def prop(req: Req) -> None:
                check(client, req, seen)

            prop()

    await asyncio.to_thread(run)
    assert seen.total() >= EXAMPLES_PER_TEST // 2, seen
    return seen


def basic(user: str | bytes, password: str = "") -> str:
    raw = user if isinstance(user, bytes) else user.encode()
    return "Basic " + base64.b64encode(raw + b":" + password.encode()).decode()


# -- strategies ----------------------------------------------------------------------------

header_text = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=80
)
"""Visible ASCII: what fits in a header value without a client-side refusal."""
latin1_garbage = st.binary(min_size=1, max_size=80).map(
    lambda b: bytes(c for c in b if c >= 0x80 or 0x21 <= c <= 0x7E) or b"x"
)
"""Header bytes including obs-text (0x80-0xFF), which HTTP allows and Starlette decodes."""
key_chars = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
    min_size=32,
    max_size=32,
)


def bad_authorization(real_key: str) -> st.SearchStrategy[dict[str, str | bytes]]:
    """Authorization headers that must not authenticate (``{}``: no header)."""
    wrong_key = st.builds(lambda s: "cg_live_" + s, key_chars).filter(lambda k: k != real_key)
    near_key = st.sampled_from(
        [
            real_key[:-1],
            real_key + "x",
            real_key.upper(),
            real_key.replace("cg_live_", "cg_test_"),
            real_key[:-1] + ("A" if real_key[-1] != "A" else "B"),
            " " + real_key[8:],
        ]
    )
    values: st.SearchStrategy[str | bytes] = st.one_of(
        st.just(""),
        st.just("Basic"),
        st.just("Bearer"),
        header_text,  # no scheme, or an unknown one
        st.builds(
            lambda s, t: f"{s} {t}", st.sampled_from(["Digest", "Token", "Key"]), header_text
        ),
        st.builds(lambda t: "Basic " + t, header_text),  # not base64
        st.builds(
            lambda b: "Basic " + base64.b64encode(b).decode(), st.binary(min_size=1, max_size=60)
        ),
        st.builds(basic, wrong_key),
        st.builds(basic, near_key),
        st.builds(lambda k, p: basic(k, p), st.one_of(wrong_key, near_key), header_text),
        st.just(basic("", real_key)),  # the real key as the password
        st.just(basic(real_key, "x")),  # the real key, but with a password
        st.builds(lambda k: "Bearer " + k, st.one_of(wrong_key, near_key, header_text)),
        st.builds(lambda b: b"Bearer " + b, latin1_garbage),
        st.builds(lambda b: b"Basic " + b, latin1_garbage),
        st.just("Basic " + real_key),  # the key, not base64'd
        st.just(real_key),  # the key without a scheme
    )
    return st.one_of(st.just({}), values.map(lambda v: {"authorization": v}))


def bad_stripe_signature(body: bytes) -> st.SearchStrategy[dict[str, str | bytes]]:
    now = int(time.time())
    good = signed(body)
    digest = good.split("v1=")[1]
    values: st.SearchStrategy[str | bytes] = st.one_of(
        st.just(""),
        header_text,
        latin1_garbage,
        st.just(f"t={now}"),
        st.just(f"v1={digest}"),
        st.just(f"t=abc,v1={digest}"),
        st.just(f"t={now},t={now},v1={digest}"),
        st.builds(lambda h: f"t={now},v1={h}", st.text("0123456789abcdef", max_size=64)),
        st.builds(lambda s: signed(body, s), header_text.filter(lambda s: s != DEV_STRIPE_SECRET)),
        st.builds(
            lambda d: signed(body, at=time.time() + d),
            st.one_of(st.integers(-(10**6), -400), st.integers(400, 10**6)),
        ),
        st.just(signed(body + b" ")),  # signed another body
        st.just(good.replace("v1=", "v0=")),
    )
    return st.one_of(st.just({}), values.map(lambda v: {"stripe-signature": v}))


@st.composite
def bad_auth_requests(draw: st.DrawFn, real_key: str) -> Req:
    """A valid body with bad credentials: 401, and nothing published."""
    path = draw(st.sampled_from(ALL_PATHS))
    body = orjson.dumps(valid_body(path))
    if path == STRIPE:
        headers = draw(bad_stripe_signature(body))
        return Req("bad signature", path, body, headers, frozenset({401}))
    headers = draw(bad_authorization(real_key))
    if draw(st.booleans()):  # gzip'd bodies reach the auth check as well
        body = gzip.compress(body)
        headers = headers | {"content-encoding": "gzip"}
    return Req("bad auth", path, body, headers, frozenset({401}))


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
not_a_string = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(json_scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), json_scalars, max_size=3),
)
not_an_object = json_values.filter(lambda v: not isinstance(v, dict))
not_a_list = json_values.filter(lambda v: not isinstance(v, list))
not_a_date = st.one_of(
    st.none(),
    st.booleans(),
    st.lists(json_scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), json_scalars, max_size=3),
    st.text(alphabet="abcxyz :/", max_size=20),
)


def wrong_native_event(area: str) -> st.SearchStrategy[dict[str, Any]]:
    """A native event with one field of the wrong type, or with an unknown field."""
    event = native_event(area)
    string_keys = ["specversion", "id", "source", "type", "subject"]
    strategies = [
        st.builds(lambda k, v: event | {k: v}, st.sampled_from(string_keys), not_a_string),
        st.builds(lambda v: event | {"time": v}, not_a_date),
        st.builds(lambda v: event | {"data": v}, not_an_object),
        st.builds(
            lambda k: {k2: v for k2, v in event.items() if k2 != k},
            # specversion is optional (it defaults to "1.0")
            st.sampled_from(["id", "source", "type", "subject", "time", "data"]),
        ),
        st.builds(  # unknown top-level attribute
            lambda k, v: event | {k: v},
            st.text(min_size=1, max_size=12).filter(lambda k: k not in event),
            json_values,
        ),
        st.builds(  # unknown data field
            lambda k, v: event | {"data": event["data"] | {k: v}},
            st.text(min_size=1, max_size=12).filter(lambda k: k not in event["data"]),
            json_values,
        ),
    ]
    if area == "usage":
        strategies += [
            st.builds(
                lambda k, v: event | {"data": event["data"] | {k: v}},
                st.sampled_from(["user_id", "feature"]),
                not_a_string,
            ),
            st.builds(
                lambda v: event | {"data": event["data"] | {"count": v}},
                st.one_of(
                    st.integers(max_value=0),
                    st.integers(min_value=1_000_001),
                    st.floats(allow_nan=False).filter(lambda f: not f.is_integer()),
                    st.text(alphabet="abc", max_size=5),
                    st.lists(st.integers(), max_size=2),
                    st.none(),
                ),
            ),
            st.builds(
                lambda v: event | {"data": event["data"] | {"feature": v}},
                st.text(max_size=20).filter(
                    lambda s: not s or not s[0].isalnum() or s != s.lower()
                ),
            ),
        ]
    return st.one_of(strategies)


def wrong_segment_message(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    message = segment_message(kind)
    others = [k for k in SEGMENT_CALLS if k != kind] + ["alias", "Track", "nope"]
    strategies = [
        st.builds(lambda t: message | {"type": t}, st.sampled_from(others)),
        st.builds(
            lambda v: message | {"context": v}, not_an_object.filter(lambda v: v is not None)
        ),
        st.builds(lambda v: message | {"timestamp": v}, not_a_date.filter(lambda v: v is not None)),
        st.just({k: v for k, v in message.items() if k != "messageId"}),
        # no account anywhere (a group call names its account in groupId: drop that too)
        st.just(
            {k: v for k, v in message.items() if k not in ("context", "groupId")}
            | {"userId": "u_new"}
        ),
    ]
    if kind in ("identify", "group"):
        strategies.append(st.just({k: v for k, v in message.items() if k != "userId"}))
    if kind == "group":
        strategies.append(st.just(message | {"context": {"groupId": "acct_other"}}))
    if kind == "track":
        strategies.append(st.just({k: v for k, v in message.items() if k != "event"}))
    return st.one_of(strategies)


def wrong_types(path: str) -> st.SearchStrategy[Any]:
    """A parsed body of the wrong shape for ``path`` (wrong types, unknown fields)."""
    if path in NATIVE_SINGLE_PATHS:
        return st.one_of(not_an_object, wrong_native_event(path.rsplit("/", 1)[1]))
    if path in NATIVE_BATCH_PATHS:
        area = path.split("/")[3]
        return st.one_of(
            not_an_object,
            st.builds(lambda v: {"events": v}, not_a_list),
            st.builds(lambda v: {"events": v}, st.lists(not_an_object, max_size=4)),
            st.builds(lambda v: {"events": v}, st.lists(wrong_native_event(area), max_size=4)),
            st.dictionaries(st.text(max_size=8).filter(lambda k: k != "events"), json_values),
        )
    if path in SEGMENT_SINGLE_PATHS:
        return st.one_of(not_an_object, wrong_segment_message(path.rsplit("/", 1)[1]))
    if path in SEGMENT_BATCH_PATHS:
        good = segment_message("track") | {"type": "track"}
        return st.one_of(
            not_an_object,
            st.builds(lambda v: {"batch": v}, not_a_list),
            st.builds(
                lambda v, i: {"batch": [good] * i + [v]},
                not_an_object,
                st.integers(0, 2),
            ),
            st.builds(
                lambda v: {"batch": [good], "context": v},
                not_an_object.filter(lambda v: v is not None),
            ),
            st.dictionaries(st.text(max_size=8).filter(lambda k: k != "batch"), json_values),
        )
    # Stripe, signed: not an Event, or a handled type without what it needs
    return st.one_of(
        not_an_object,
        st.builds(
            lambda t, v: stripe_event() | {"type": t, "data": v},
            st.sampled_from(["invoice.paid", "invoice.payment_failed", "charge.refunded"]),
            json_values,
        ),
        st.builds(lambda v: stripe_event() | {"created": v}, not_a_date),
        st.builds(
            lambda v: stripe_event() | {"type": v}, not_a_string.filter(lambda v: v is not None)
        ),
    )


INVALID_UTF8 = [
    b"\xff",
    b"\xfe\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\x80",
]


@st.composite
def malformed_requests(draw: st.DrawFn, real_key: str) -> Req:
    """A request with a good write key (or a good Stripe signature) and a bad body."""
    path = draw(st.sampled_from(ALL_PATHS))
    good = orjson.dumps(valid_body(path))
    headers: dict[str, str | bytes] = {}
    expect: frozenset[int] | None = None
    kind = draw(
        st.sampled_from(
            [
                "truncated JSON",
                "garbage bytes",
                "wrong types",
                "invalid UTF-8",
                "oversize",
                "oversize gzip",
                "unsupported encoding",
                "invalid gzip",
                "truncated gzip",
            ]
        )
    )
    if kind == "truncated JSON":
        body = good[: draw(st.integers(1, len(good) - 1))]
    elif kind == "garbage bytes":
        body = draw(st.binary(max_size=200))
    elif kind == "wrong types":
        body = orjson.dumps(draw(wrong_types(path)))
    elif kind == "invalid UTF-8":
        marker = "\u2603marker\u2603"
        value = valid_body(path)
        if path in NATIVE_SINGLE_PATHS:
            value["subject"] = marker
        elif path in NATIVE_BATCH_PATHS:
            value["events"][0]["subject"] = marker
        elif path in SEGMENT_BATCH_PATHS:
            value["batch"][0]["userId"] = marker
        elif path == STRIPE:
            value["id"] = marker
        else:
            value["userId"] = marker
        bad = draw(st.sampled_from(INVALID_UTF8))
        body = orjson.dumps(value).replace(
            marker.encode(), draw(st.text(max_size=5)).encode() + bad
        )
    elif kind in ("oversize", "oversize gzip"):
        limit = body_limit(path)
        pad = b"x" * (limit + draw(st.integers(1, 20_000)))
        body = b'{"pad":"' + pad + b'"}'
        expect = frozenset({413})
        if kind == "oversize gzip":
            body = gzip.compress(body)
            headers["content-encoding"] = "gzip"
    elif kind == "unsupported encoding":
        encoding = draw(
            st.one_of(
                st.sampled_from(["br", "deflate", "compress", "zstd", "x-gzip", "identity,gzip"]),
                st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12),
            ).filter(lambda e: e not in ("gzip", "identity"))
        )
        body = gzip.compress(good) if draw(st.booleans()) else good
        headers["content-encoding"] = encoding
        expect = frozenset({415})
    elif kind == "invalid gzip":
        body = draw(st.sampled_from([b"", b"\x1f\x8b\x08\x00"])) + draw(st.binary(min_size=1))
        body = body if body[:2] != b"\x1f\x8b" or len(body) > 10 else body + b"\x00" * 10
        headers["content-encoding"] = draw(st.sampled_from(["gzip", "GZIP", "Gzip"]))
    else:  # truncated gzip: cut anywhere, the trailer included
        compressed = gzip.compress(good)
        body = compressed[: draw(st.integers(1, len(compressed) - 1))]
        headers["content-encoding"] = "gzip"
    if path == STRIPE:
        headers["stripe-signature"] = signed(body)
    else:
        headers["authorization"] = basic(real_key)
    return Req(kind, path, body, headers, expect)


# -- the properties ------------------------------------------------------------------------


async def test_bad_credentials_are_refused_everywhere_and_publish_nothing(
    kafka: KafkaBroker, kafka_topics: str, ingest_service: RunningService
) -> None:
    seen = await run_property(ingest_service, bad_auth_requests(ingest_service.write_key))
    assert set(seen) == {"401"}, seen
    assert await published(kafka.bootstrap, kafka_topics) == 0


async def test_malformed_bodies_are_refused_everywhere_and_publish_nothing(
    kafka: KafkaBroker, kafka_topics: str, ingest_service: RunningService
) -> None:
    seen = await run_property(ingest_service, malformed_requests(ingest_service.write_key))
    assert {"400", "413", "415", "422"} <= set(seen), seen
    assert await published(kafka.bootstrap, kafka_topics) == 0


# -- hand-picked cases ---------------------------------------------------------------------


async def test_hand_picked_bad_requests_get_their_exact_status(
    kafka: KafkaBroker, kafka_topics: str, ingest_service: RunningService
) -> None:
    key = ingest_service.write_key
    auth = {"authorization": basic(key)}
    unknown = native_event("usage")
    unknown["data"] = unknown["data"] | {"surprise_field": 1}
    big_batch = {"batch": [segment_message("track") | {"type": "track"}], "pad": "x" * BATCH_LIMIT}
    bomb = gzip.compress(b'{"events": [], "pad": "' + b"0" * 5_000_000 + b'"}')
    track = orjson.dumps(segment_message("track"))
    stripe_body = orjson.dumps(stripe_event())
    cases: list[tuple[Req, Callable[[httpx.Response], None] | None]] = [
        (
            Req("unknown field", "/v1/events/usage", orjson.dumps(unknown), auth, frozenset({422})),
            lambda r: _names(r, "surprise_field"),
        ),
        (
            Req(
                "unknown field, batch",
                "/v1/events/usage/batch",
                orjson.dumps({"events": [unknown]}),
                auth,
                frozenset({422}),
            ),
            lambda r: _names(r, "data.surprise_field"),
        ),
        *(
            (
                Req("segment batch > 500 KB", p, orjson.dumps(big_batch), auth, frozenset({413})),
                None,
            )
            for p in SEGMENT_BATCH_PATHS
        ),
        *(
            (
                Req(
                    "native single > 32 KB",
                    p,
                    orjson.dumps(native_event(p.rsplit("/", 1)[1]) | {"pad": "x" * 33_000}),
                    auth,
                    frozenset({413}),
                ),
                None,
            )
            for p in NATIVE_SINGLE_PATHS
        ),
        (
            Req(
                "segment single > 32 KB",
                "/v1/track",
                orjson.dumps(segment_message("track") | {"pad": "x" * SINGLE_EVENT_LIMIT}),
                auth,
                frozenset({413}),
            ),
            None,
        ),
        *(
            (
                Req("gzip bomb", p, bomb, auth | {"content-encoding": "gzip"}, frozenset({413})),
                None,
            )
            for p in ("/v1/events/usage", "/v1/events/billing/batch", "/v1/batch", "/v1/track")
        ),
        (
            Req(
                "gzip bomb, stripe",
                STRIPE,
                gzip.compress(b"{" + b" " * (DEFAULT_LIMIT + 1) + b"}"),
                {"content-encoding": "gzip"},
                frozenset({413}),
            ),
            None,
        ),
        *(
            (Req("br", p, track, auth | {"content-encoding": "br"}, frozenset({415})), None)
            for p in ("/v1/track", "/v1/events/usage", "/v1/batch", STRIPE)
        ),
        (
            Req(
                "invalid UTF-8",
                "/v1/events/usage",
                orjson.dumps(native_event("usage")).replace(b"acct_prop", b"acct_\xff\xfe"),
                auth,
            ),
            None,
        ),
        (
            Req("invalid UTF-8", "/v1/track", track.replace(b"u_42", b"u_\xc3\x28"), auth),
            None,
        ),
        (
            Req(
                "invalid UTF-8",
                "/v1/events/feedback/batch",
                b'{"events": [{"id": "\xed\xa0\x80"}]}',
                auth,
            ),
            None,
        ),
        (Req("stripe, no signature", STRIPE, stripe_body, {}, frozenset({401})), None),
        (
            Req(
                "stripe, signed not-an-object",
                STRIPE,
                b"[1, 2]",
                {"stripe-signature": signed(b"[1, 2]")},
                frozenset({400}),
            ),
            None,
        ),
        (
            Req(
                "no auth",
                "/v1/events/usage",
                orjson.dumps(native_event("usage")),
                {},
                frozenset({401}),
            ),
            lambda r: None,
        ),
    ]
    seen: Counter[str] = Counter()

    def run() -> None:
        with httpx.Client(base_url=ingest_service.url, timeout=30.0) as client:
            for req, more in cases:
                response = check(client, req, seen)
                if more is not None:
                    more(response)

    await asyncio.to_thread(run)
    assert await published(kafka.bootstrap, kafka_topics) == 0


def _names(response: httpx.Response, field_name: str) -> None:
    text = orjson.dumps(response.json()["detail"]).decode()
    assert field_name in text, text


# -- regressions: the bugs these properties found, fixed ----------------------------------


async def test_gzip_without_its_trailer_is_refused(
    kafka: KafkaBroker, kafka_topics: str, ingest_service: RunningService
) -> None:
    headers = {"authorization": basic(ingest_service.write_key), "content-encoding": "gzip"}
    bodies = {
        "/v1/events/usage": orjson.dumps(native_event("usage")),
        "/v1/track": orjson.dumps(segment_message("track")),
    }
    seen: Counter[str] = Counter()
    with httpx.Client(base_url=ingest_service.url, timeout=30.0) as client:
        for path, body in bodies.items():
            truncated = gzip.compress(body)[:-8]
            await asyncio.to_thread(
                check, client, Req("no gzip trailer", path, truncated, headers), seen
            )
    assert await published(kafka.bootstrap, kafka_topics) == 0


async def test_lone_surrogate_in_a_native_event_is_refused(
    kafka: KafkaBroker, kafka_topics: str, ingest_service: RunningService
) -> None:
    event = native_event("usage") | {
        "type": "churnguard.usage.track",
        "id": "evt-surrogate",
        "data": {"user_id": "u_1", "event": "Exported", "properties": {"name": "@@"}},
    }
    body = orjson.dumps(event).replace(b"@@", b"\\ud800")
    headers = {"authorization": basic(ingest_service.write_key)}
    with httpx.Client(base_url=ingest_service.url, timeout=30.0) as client:
        try:
            await asyncio.to_thread(
                check, client, Req("lone surrogate", "/v1/events/usage", body, headers), Counter()
            )
        finally:
            assert await published(kafka.bootstrap, kafka_topics) == 0


async def test_segment_batch_of_only_invalid_messages_is_a_4xx(
    kafka: KafkaBroker, kafka_topics: str, ingest_service: RunningService
) -> None:
    body = orjson.dumps({"batch": [{"type": "track", "userId": "u_1"}, {"type": "alias"}]})
    headers = {"authorization": basic(ingest_service.write_key)}
    with httpx.Client(base_url=ingest_service.url, timeout=30.0) as client:
        response = await asyncio.to_thread(client.post, "/v1/batch", content=body, headers=headers)
    assert await published(kafka.bootstrap, kafka_topics) == 0
    assert response.status_code == 400, response.text
    assert response.json()["detail"]["accepted"] == 0
    assert [r["index"] for r in response.json()["detail"]["rejected"]] == [0, 1]


async def test_non_ascii_basic_credentials_get_401(
    kafka: KafkaBroker, kafka_topics: str, ingest_service: RunningService
) -> None:
    body = orjson.dumps(native_event("usage"))
    headers: dict[str, str | bytes] = {"authorization": b"Basic \x80"}
    with httpx.Client(base_url=ingest_service.url, timeout=30.0) as client:
        await asyncio.to_thread(
            check,
            client,
            Req("non-ASCII Basic", "/v1/track", body, headers, frozenset({401})),
            Counter(),
        )
    assert await published(kafka.bootstrap, kafka_topics) == 0
