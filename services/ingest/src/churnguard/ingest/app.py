"""The ingest HTTP application.

Every endpoint that accepts events answers 2xx only after Kafka acknowledged them
(acks=all); when Kafka does not answer in time the caller gets 503 and should retry
with the same event ids, which are the idempotency keys downstream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Response, status
from fastapi.responses import ORJSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from churnguard.common import metrics
from churnguard.common.events.usage import UsageEvent
from churnguard.common.kafka import make_producer
from churnguard.common.logs import bind_event
from churnguard.common.topics import Topic
from churnguard.ingest.publisher import EnvelopePublisher, PublishFailed
from churnguard.ingest.settings import IngestSettings

log = logging.getLogger(__name__)


class Accepted(BaseModel):
    id: str
    topic: str
    partition: int
    offset: int


def create_app(settings: IngestSettings | None = None) -> FastAPI:
    settings = settings or IngestSettings()
    platform = settings.platform

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        producer = make_producer(
            platform.kafka_bootstrap,
            client_id="churnguard-ingest",
            idempotent=platform.kafka_idempotent_producer,
        )
        await producer.start()
        app.state.publisher = EnvelopePublisher(
            producer, platform.topic_prefix, settings.publish_timeout_s
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

    app = FastAPI(
        title="churnguard ingest",
        version="0.1.0",
        description="Accepts product, billing and feedback events and publishes them to Kafka. "
        "A 2xx means Kafka acknowledged the event (acks=all).",
        default_response_class=ORJSONResponse,
        lifespan=lifespan,
    )

    @app.post(
        "/v1/events/usage",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=Accepted,
        summary="Publish one usage event (native CloudEvents JSON)",
        responses={
            422: {"description": "Invalid event; the error names the field"},
            503: {"description": "Kafka did not acknowledge; retry with the same id"},
        },
    )
    async def publish_usage(event: UsageEvent) -> Accepted:
        started = time.perf_counter()
        publisher: EnvelopePublisher = app.state.publisher
        with bind_event(event.id, event.subject):
            try:
                (published,) = await publisher.publish(Topic.USAGE, [event])
            except PublishFailed as exc:
                log.error("publish failed: %s", exc)
                raise HTTPException(
                    status.HTTP_503_SERVICE_UNAVAILABLE,
                    str(exc),
                    headers={"Retry-After": str(settings.retry_after_s)},
                ) from exc
        metrics.INGEST_EVENTS.labels(Topic.USAGE.topic, event.type).inc()
        metrics.INGEST_PUBLISH_SECONDS.labels(Topic.USAGE.topic).observe(
            time.perf_counter() - started
        )
        return Accepted(
            id=event.id,
            topic=published.topic,
            partition=published.partition,
            offset=published.offset,
        )

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> dict[str, str]:
        publisher: EnvelopePublisher | None = getattr(app.state, "publisher", None)
        if publisher is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "producer not started")
        return {"status": "ready"}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
