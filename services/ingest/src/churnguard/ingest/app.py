"""The ingest HTTP application.

Every endpoint that accepts events answers 2xx only after Kafka acknowledged them
(acks=all); when Kafka does not answer in time the caller gets 503 with ``Retry-After``
and should retry with the same event ids, which are the idempotency keys downstream.
Every event endpoint needs a source's write key (HTTP Basic with the key as user name, as
Segment's libraries send it, or ``Bearer``); without one it answers 401 and publishes
nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.responses import ORJSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from sqlalchemy import text

from churnguard.common import metrics
from churnguard.common.db import create_engine, session_factory
from churnguard.common.events.base import CloudEvent
from churnguard.common.events.usage import Group
from churnguard.common.kafka import make_producer
from churnguard.common.logs import bind_event
from churnguard.common.topics import Topic
from churnguard.ingest import segment, stripe_webhooks
from churnguard.ingest.limits import RequestBodyLimits
from churnguard.ingest.publisher import (
    EnvelopePublisher,
    InvalidEvent,
    Published,
    PublishFailed,
)
from churnguard.ingest.settings import IngestSettings
from churnguard.ingest.sources import Source, Unauthorized, WriteKeyAuthenticator
from churnguard.ingest.user_accounts import AccountsUnavailable, UserAccounts

log = logging.getLogger(__name__)

NATIVE_TOPICS = {"usage": Topic.USAGE, "billing": Topic.BILLING, "feedback": Topic.FEEDBACK}
SINGLE_EVENT_LIMIT = 32 * 1024
BATCH_LIMIT = 500 * 1024
MAX_BATCH_EVENTS = 10_000
DEFAULT_LIMIT = 1024 * 1024
GROUP_TYPE = Group.model_fields["type"].default
MappedT = TypeVar("MappedT")


def body_limit(path: str) -> int:
    """Segment's documented limits: 32 KB per event, 500 KB per batch."""
    if path.endswith("/batch") or path == "/v1/b":
        return BATCH_LIMIT
    if path.startswith("/v1/webhooks/"):
        return DEFAULT_LIMIT
    return SINGLE_EVENT_LIMIT


class Accepted(BaseModel):
    id: str
    topic: str
    partition: int
    offset: int
    duplicate: bool = Field(
        default=False, description="Already published within the dedupe window: not produced again"
    )


class Rejection(BaseModel):
    index: int
    field: str
    reason: str


class BatchAccepted(BaseModel):
    accepted: list[Accepted]
    rejected: list[Rejection]


class SegmentAccepted(BaseModel):
    success: bool = True
    accepted: int
    rejected: list[Rejection]


async def source(request: Request) -> Source:
    """The source whose write key authenticates the request, or 401."""
    authenticator: WriteKeyAuthenticator = request.app.state.authenticator
    try:
        return await authenticator.authenticate(request.headers.get("authorization"))
    except Unauthorized as exc:
        metrics.INGEST_REJECTED.labels(request.url.path, "unauthorized").inc()
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            exc.reason,
            headers={"WWW-Authenticate": exc.www_authenticate},
        ) from None


Authenticated = Annotated[Source, Depends(source)]


def create_app(settings: IngestSettings | None = None) -> FastAPI:
    settings = settings or IngestSettings()
    platform = settings.platform

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        producer = make_producer(
            platform.kafka_bootstrap,
            client_id="churnguard-ingest",
            idempotent=platform.kafka_idempotent_producer,
            # the publisher lingers for envelopes already; a producer linger on top only
            # adds latency (single-event p50 10.6 ms with 5 ms here)
            linger_ms=0,
        )
        engine = create_engine(
            platform.database_url.get_secret_value(),
            schema=settings.db_schema,
            application_name="churnguard-ingest",
        )
        await producer.start()
        app.state.engine = engine
        app.state.publisher = EnvelopePublisher(
            producer, platform.topic_prefix, settings.publish_timeout_s
        )
        app.state.user_accounts = UserAccounts(
            session_factory(engine),
            ttl_s=settings.user_accounts_ttl_s,
            flush_interval_s=settings.user_accounts_flush_s,
        )
        await app.state.user_accounts.start()
        app.state.authenticator = WriteKeyAuthenticator(
            session_factory(engine), settings.auth_cache_ttl_s
        )
        log.info(
            "ingest ready",
            extra={"kafka": platform.kafka_bootstrap, "acks": "all", "port": settings.port},
        )
        try:
            yield
        finally:
            await app.state.publisher.flush_all()
            await producer.stop()
            await app.state.user_accounts.stop()
            await engine.dispose()

    app = FastAPI(
        title="churnguard ingest",
        version="0.1.0",
        description="Accepts product, billing and feedback events and publishes them to Kafka. "
        "A 2xx means Kafka acknowledged the event (acks=all); a 503 means retry later with the "
        "same ids. Authenticate with a source's write key: HTTP Basic with the key as user "
        "name (as Segment libraries do) or `Authorization: Bearer <key>`.",
        default_response_class=ORJSONResponse,
        lifespan=lifespan,
    )
    app.add_middleware(RequestBodyLimits, limit_for=body_limit)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        # Segment's libraries read {"code", "message"} from an error; FastAPI clients "detail"
        message = exc.detail if isinstance(exc.detail, str) else orjson.dumps(exc.detail).decode()
        return ORJSONResponse(
            {"detail": exc.detail, "code": HTTPStatus(exc.status_code).phrase, "message": message},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    async def publish(
        topic: Topic, events: Sequence[CloudEvent], payloads: Sequence[bytes] | None = None
    ) -> list[Published]:
        publisher: EnvelopePublisher = app.state.publisher
        return await publishing(
            topic,
            publisher.publish(topic, events, payloads),
            Counter(event.type for event in events),
        )

    async def publishing(
        topic: Topic, sent: Awaitable[list[Published]], types: Counter[str]
    ) -> list[Published]:
        """Await a publish; its errors as HTTP errors, its success in the metrics."""
        started = time.perf_counter()
        try:
            published = await sent
        except InvalidEvent as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from None
        except PublishFailed as exc:
            log.error("publish failed: %s", exc, extra={"topic": topic.topic})
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                str(exc),
                headers={"Retry-After": str(settings.retry_after_s)},
            ) from exc
        for event_type, count in types.items():
            metrics.INGEST_EVENTS.labels(topic.topic, event_type).inc(count)
        metrics.INGEST_PUBLISH_SECONDS.labels(topic.topic).observe(time.perf_counter() - started)
        return published

    def accepted(event: CloudEvent, published: Published) -> Accepted:
        return Accepted(
            id=event.id,
            topic=published.topic,
            partition=published.partition,
            offset=published.offset,
            duplicate=published.duplicate,
        )

    def single_endpoint(topic: Topic) -> Callable[..., Awaitable[Accepted]]:
        async def publish_one(event: Any, src: Authenticated) -> Accepted:
            with bind_event(event.id, event.subject):
                (published,) = await publish(topic, [event])
            return accepted(event, published)

        # FastAPI reads the body model from the annotation: one topic's union per route
        publish_one.__annotations__["event"] = topic.spec.value
        return publish_one

    def batch_endpoint(topic: Topic) -> Callable[..., Awaitable[Response]]:
        many = TypeAdapter(list[topic.spec.value])  # type: ignore[name-defined]

        async def publish_batch(request: Request, src: Authenticated) -> Response:
            try:
                body = orjson.loads(await request.body())
            except orjson.JSONDecodeError as exc:
                raise HTTPException(status.HTTP_400_BAD_REQUEST, f"body: not JSON: {exc}") from None
            items = body.get("events") if isinstance(body, dict) else None
            if not isinstance(items, list):
                raise HTTPException(
                    status.HTTP_400_BAD_REQUEST,
                    'body: must be {"events": [event, ...]}, with events an array',
                )
            if len(items) > MAX_BATCH_EVENTS:
                raise HTTPException(
                    status.HTTP_400_BAD_REQUEST,
                    f"body: events: {len(items)} events, at most {MAX_BATCH_EVENTS} per batch",
                )
            good: list[CloudEvent]
            rejected: list[Rejection] = []
            try:
                good = many.validate_python(items)  # the whole batch in one call
            except ValidationError:
                good = []  # tell which: one by one
                for index, item in enumerate(items):
                    try:
                        good.append(topic.adapter.validate_python(item))
                    except ValidationError as exc:
                        first = exc.errors()[0]
                        loc = [str(p) for p in first["loc"] if not str(p).startswith("churnguard.")]
                        field = ".".join(loc) or "(event)"
                        rejected.append(Rejection(index=index, field=field, reason=first["msg"]))
            if rejected:
                metrics.INGEST_REJECTED.labels(request.url.path, "invalid").inc(len(rejected))
            if not good:
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_ENTITY,
                    [r.model_dump() for r in rejected] or "no events",
                )
            published = await publish(topic, good)
            # written directly: 500 response models cost as much as validating the batch
            accepted = [
                {
                    "id": e.id,
                    "topic": p.topic,
                    "partition": p.partition,
                    "offset": p.offset,
                    "duplicate": p.duplicate,
                }
                for e, p in zip(good, published, strict=True)
            ]
            return ORJSONResponse(
                {"accepted": accepted, "rejected": [r.model_dump() for r in rejected]},
                status_code=status.HTTP_202_ACCEPTED,
            )

        return publish_batch

    for area, topic in NATIVE_TOPICS.items():
        app.post(
            f"/v1/events/{area}",
            status_code=status.HTTP_202_ACCEPTED,
            response_model=Accepted,
            summary=f"Publish one {area} event (native CloudEvents JSON)",
            tags=["native"],
            responses={
                401: {"description": "No, unknown or revoked write key"},
                413: {"description": "Larger than 32 KB"},
                422: {"description": "Invalid event; the error names the field"},
                503: {"description": "Kafka did not acknowledge; retry with the same id"},
            },
        )(single_endpoint(topic))
        app.post(
            f"/v1/events/{area}/batch",
            status_code=status.HTTP_202_ACCEPTED,
            response_model=BatchAccepted,
            summary=f"Publish {area} events: valid ones are accepted, each invalid one reported",
            tags=["native"],
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["events"],
                                "properties": {
                                    "events": {"type": "array", "maxItems": MAX_BATCH_EVENTS}
                                },
                            }
                        }
                    },
                }
            },
        )(batch_endpoint(topic))

    # ---- Segment spec -------------------------------------------------------------------

    def unavailable(exc: AccountsUnavailable | TimeoutError) -> HTTPException:
        log.error("user accounts: %s", exc or "PostgreSQL did not answer in time")
        return HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "user accounts are not available (PostgreSQL): retry later with the same ids",
            headers={"Retry-After": str(settings.retry_after_s)},
        )

    async def map_segment(
        mapping: Callable[[segment.AccountResolver], MappedT],
        unresolved: Callable[[MappedT], bool],
    ) -> MappedT:
        """``mapping(resolver)``, with the users it could not resolve from the cache looked
        up in PostgreSQL, once for the request, and mapped again if that told any."""
        users: UserAccounts = app.state.user_accounts
        asked: set[str] = set()

        def resolve(user_id: str | None, anonymous_id: str | None) -> str | None:
            account = users.resolve(user_id, anonymous_id)
            if account is None and user_id:
                asked.add(user_id)
            return account

        mapped = mapping(resolve)
        if asked and unresolved(mapped):
            try:
                async with asyncio.timeout(settings.publish_timeout_s):
                    found = await users.load(asked)
            except (AccountsUnavailable, TimeoutError) as exc:
                raise unavailable(exc) from None
            if found:
                mapped = mapping(lambda user_id, _: found.get(user_id) if user_id else None)
        return mapped

    async def remember(learned: dict[str, str], durable: bool) -> None:
        """Remember the accounts the accepted events named; ``durable``: a group call's is
        in PostgreSQL before the caller hears of it."""
        users: UserAccounts = app.state.user_accounts
        for user, account in learned.items():
            users.remember(user, account)
        if durable:
            # shielded: a write that outlasts the caller still finishes (or requeues)
            writing = asyncio.ensure_future(users.flush())
            writing.add_done_callback(lambda done: done.cancelled() or done.exception())
            try:
                await asyncio.wait_for(asyncio.shield(writing), settings.publish_timeout_s)
            except (AccountsUnavailable, TimeoutError) as exc:
                raise unavailable(exc) from None

    async def segment_batch(request: Request, src: Authenticated) -> SegmentAccepted:
        try:
            batch = segment.read_batch(await request.body())
        except segment.SegmentError as exc:
            metrics.INGEST_REJECTED.labels(request.url.path, "invalid").inc()
            raise HTTPException(exc.status, str(exc)) from None
        received_at = datetime.now(UTC)
        result = await map_segment(
            lambda resolve: segment.map_batch(
                batch.messages,
                source=f"/segment/{src.name}",
                received_at=received_at,
                resolve_account=resolve,
                sent_at=batch.sent_at,
                context=batch.context,
            ),
            lambda result: any(r.reason == segment.NO_ACCOUNT for r in result.rejected),
        )
        if result.rejected:
            metrics.INGEST_REJECTED.labels(request.url.path, "invalid").inc(len(result.rejected))
        rejected = [
            Rejection(index=r.index, field=r.field or "(message)", reason=r.reason)
            for r in result.rejected
        ]
        if not result.ids:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST,
                {"accepted": 0, "rejected": [r.model_dump() for r in rejected]},
            )
        publisher: EnvelopePublisher = app.state.publisher
        types = Counter(result.types)
        await publishing(
            Topic.USAGE,
            publisher.publish_json(Topic.USAGE, result.ids, result.subjects, result.payloads),
            types,
        )
        await remember(result.users, durable=GROUP_TYPE in types)
        return SegmentAccepted(accepted=len(result.ids), rejected=rejected)

    for path in ("/v1/batch", "/v1/b", "/v1/import"):
        app.post(
            path,
            response_model=SegmentAccepted,
            summary="Segment batch: track, identify, group, page, screen messages",
            tags=["segment"],
            include_in_schema=path == "/v1/batch",
        )(segment_batch)

    def segment_single(kind: str) -> Callable[..., Awaitable[SegmentAccepted]]:
        async def one(request: Request, src: Authenticated) -> SegmentAccepted:
            try:
                message = segment.parse_single(kind, await request.body())
            except segment.SegmentError as exc:
                metrics.INGEST_REJECTED.labels(request.url.path, "invalid").inc()
                raise HTTPException(exc.status, str(exc)) from None
            received_at = datetime.now(UTC)

            def mapping(resolve: segment.AccountResolver) -> CloudEvent | segment.SegmentError:
                try:
                    return segment.to_cloudevent(
                        message,
                        index=None,
                        source=f"/segment/{src.name}",
                        received_at=received_at,
                        resolve_account=resolve,
                    )
                except segment.SegmentError as exc:
                    return exc

            event = await map_segment(
                mapping,
                lambda got: (
                    isinstance(got, segment.SegmentError) and got.reason == segment.NO_ACCOUNT
                ),
            )
            if isinstance(event, segment.SegmentError):
                metrics.INGEST_REJECTED.labels(request.url.path, "invalid").inc()
                raise HTTPException(event.status, str(event))
            with bind_event(event.id, event.subject):
                await publish(Topic.USAGE, [event])
            user = getattr(event.data, "user_id", None)
            await remember({user: event.subject} if user else {}, durable=kind == "group")
            return SegmentAccepted(accepted=1, rejected=[])

        return one

    for kind in ("track", "identify", "group", "page", "screen"):
        app.post(
            f"/v1/{kind}",
            response_model=SegmentAccepted,
            summary=f"Segment {kind} call",
            tags=["segment"],
        )(segment_single(kind))

    # ---- Stripe-format webhooks ---------------------------------------------------------

    @app.post(
        "/v1/webhooks/stripe",
        summary="Stripe-format webhook (authenticated by its Stripe-Signature, not a write key)",
        tags=["webhooks"],
        responses={
            400: {"description": "Signed, but not a billing event churnguard can read"},
            401: {"description": "Signature missing, wrong, or outside the tolerance"},
        },
    )
    async def stripe_webhook(request: Request) -> dict[str, Any]:
        payload = await request.body()
        try:
            stripe_webhooks.verify_signature(
                payload,
                request.headers.get("stripe-signature"),
                settings.stripe_secrets,
                tolerance_s=settings.stripe_tolerance_s,
            )
        except stripe_webhooks.SignatureError as exc:
            metrics.INGEST_REJECTED.labels(request.url.path, "signature").inc()
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, exc.reason) from None
        try:
            mapped = stripe_webhooks.map_event(orjson.loads(payload))
        except (orjson.JSONDecodeError, stripe_webhooks.MappingError) as exc:
            metrics.INGEST_REJECTED.labels(request.url.path, "invalid").inc()
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
        if isinstance(mapped, stripe_webhooks.Unhandled):
            metrics.INGEST_WEBHOOKS_UNHANDLED.labels("stripe", mapped.stripe_type).inc()
            return {"received": True, "handled": False, "reason": mapped.reason}
        with bind_event(mapped.id, mapped.account_id):
            (published,) = await publish(Topic.BILLING, [mapped.event])
        return {
            "received": True,
            "handled": True,
            "id": mapped.id,
            "duplicate": published.duplicate,
        }

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        """Ready when Kafka and PostgreSQL both answer."""
        problems = []
        publisher: EnvelopePublisher | None = getattr(app.state, "publisher", None)
        if publisher is None:
            problems.append("producer not started")
        else:
            try:
                await publisher.producer.client.fetch_all_metadata()
            except Exception as exc:
                problems.append(f"kafka: {type(exc).__name__}")
        try:
            async with app.state.engine.connect() as conn:
                await conn.execute(text("select 1"))
        except Exception as exc:
            problems.append(f"postgres: {type(exc).__name__}")
        if problems:
            return ORJSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return ORJSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
