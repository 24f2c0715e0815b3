"""Notify's HTTP side: probes, metrics, the in-app inbox API, unsubscribe, delivery log.

The inbox API is for product apps' backends: ``Authorization: Bearer
<CHURNGUARD_NOTIFY_INBOX_API_KEY>``. Marking a message read or dismissed publishes the
``read`` / ``dismissed`` outcome (once per message and status, however often it is
called). The stream endpoint is server-sent events: each new message as ``event:
message`` with the message id as the SSE ``id``, so a reconnecting client that sends
``Last-Event-ID`` receives what it missed first.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from html import escape
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response, status
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import text

from churnguard.notify import metrics
from churnguard.notify.outcomes import outcome, outcome_row
from churnguard.notify.repository import DeliveryRepository, InboxRepository, SuppressionRepository
from churnguard.notify.service import NotifyService
from churnguard.notify.settings import NotifySettings
from churnguard.notify.signing import BadSignature, read_unsubscribe_token

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0


class InboxMessage(BaseModel):
    id: int
    account_id: str
    user_id: str
    template: str
    title: str
    body: str
    link: str | None
    created_at: datetime
    read_at: datetime | None
    dismissed_at: datetime | None
    action_id: str

    @classmethod
    def of(cls, row: dict[str, Any]) -> InboxMessage:
        return cls(action_id=row["command_id"], **{k: row[k] for k in cls.model_fields if k in row})


class CsmTask(BaseModel):
    id: int
    account_id: str
    assignee: str
    template: str
    title: str
    body: str
    link: str | None
    priority: int
    created_at: datetime
    done_at: datetime | None
    action_id: str

    @classmethod
    def of(cls, row: dict[str, Any]) -> CsmTask:
        return cls(action_id=row["command_id"], **{k: row[k] for k in cls.model_fields if k in row})


def create_app(settings: NotifySettings | None = None) -> FastAPI:
    settings = settings or NotifySettings()
    api_key = settings.inbox_api_key.get_secret_value().encode()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = NotifyService(settings)
        app.state.service = service
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="churnguard notify",
        version="0.1.0",
        description="The in-app inbox API for product apps (Bearer key), unsubscribe links, "
        "and the delivery log of each command.",
        lifespan=lifespan,
    )

    def svc() -> NotifyService:
        service: NotifyService = app.state.service
        return service

    async def authenticated(authorization: Annotated[str | None, Header()] = None) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "inbox API: send Authorization: Bearer <CHURNGUARD_NOTIFY_INBOX_API_KEY>",
                headers={"WWW-Authenticate": 'Bearer realm="churnguard-notify"'},
            )

    Auth = Depends(authenticated)

    def who(user_id: str | None, account_id: str | None) -> None:
        if not user_id and not account_id:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_ENTITY, "user_id or account_id: give at least one"
            )

    # -- probes and metrics -----------------------------------------------------------------

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        """Ready when the consumer runs, this instance holds its liveness lock and
        PostgreSQL and Kafka answer."""
        service = svc()
        problems = []
        if not service.started:
            problems.append("not started")
        if not service.instance.alive:
            problems.append("liveness connection lost")
        try:
            async with service.engine.connect() as conn:
                await conn.execute(text("select 1"))
        except Exception as exc:
            problems.append(f"postgres: {type(exc).__name__}")
        try:
            await service.producer.client.fetch_all_metadata()
        except Exception as exc:
            problems.append(f"kafka: {type(exc).__name__}")
        consumer = service.consumer
        if consumer is None or not consumer.consumer.assignment():
            problems.append("consumer: no partitions assigned yet")
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready", "instance": service.instance.key})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # -- inbox ----------------------------------------------------------------------------

    @app.get("/v1/inbox/messages", dependencies=[Auth], tags=["inbox"])
    async def list_messages(
        user_id: str | None = None,
        account_id: str | None = None,
        unread: bool = True,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
    ) -> list[InboxMessage]:
        """Messages for a user and/or an account, newest first (unread only by default;
        dismissed ones never)."""
        who(user_id, account_id)
        async with svc().sessions() as session:
            rows = await InboxRepository(session).messages(
                user_id=user_id, account_id=account_id, unread_only=unread, limit=limit
            )
        return [InboxMessage.of(r) for r in rows]

    async def mark(message_id: int, column: str, outcome_status: str) -> InboxMessage:
        async with svc().sessions() as session, session.begin():
            row = await InboxRepository(session).mark(message_id, column)
            if row is None:
                raise HTTPException(
                    status.HTTP_404_NOT_FOUND, f"message {message_id}: no such message"
                )
            event = outcome(
                action_id=row["command_id"],
                account_id=row["account_id"],
                action="notification",
                channel="in_app",
                status=outcome_status,  # type: ignore[arg-type]
            )
            await DeliveryRepository(session, svc().instance.key).add_outbox([outcome_row(event)])
        svc().outbox.wake()
        metrics.SENDS.labels("in_app", outcome_status).inc()
        return InboxMessage.of(row)

    @app.post("/v1/inbox/messages/{message_id}/read", dependencies=[Auth], tags=["inbox"])
    async def read(message_id: int) -> InboxMessage:
        """Mark read; publishes the ``read`` outcome once."""
        return await mark(message_id, "read_at", "read")

    @app.post("/v1/inbox/messages/{message_id}/dismiss", dependencies=[Auth], tags=["inbox"])
    async def dismiss(message_id: int) -> InboxMessage:
        """Dismiss (it leaves every listing); publishes the ``dismissed`` outcome once."""
        return await mark(message_id, "dismissed_at", "dismissed")

    @app.get("/v1/inbox/stream", dependencies=[Auth], tags=["inbox"])
    async def stream(
        request: Request,
        user_id: str | None = None,
        account_id: str | None = None,
        last_event_id: Annotated[str | None, Header()] = None,
    ) -> StreamingResponse:
        """Server-sent events: every new message for the user and/or account as it is
        delivered; with ``Last-Event-ID`` the unread ones after that id come first."""
        who(user_id, account_id)
        service = svc()
        subscription = service.instance.subscribe(user_id, account_id)
        try:
            after = int(last_event_id) if last_event_id else None
        except ValueError:
            after = None

        def frame(row: dict[str, Any]) -> bytes:
            data = InboxMessage.of(row).model_dump_json()
            return f"id: {row['id']}\nevent: message\ndata: {data}\n\n".encode()

        async def events() -> AsyncIterator[bytes]:
            metrics.INBOX_STREAMS.inc()
            sent_up_to = after or 0
            try:
                yield b"retry: 3000\n: connected\n\n"
                if after is not None:
                    async with service.sessions() as session:
                        missed = await InboxRepository(session).messages(
                            user_id=user_id,
                            account_id=account_id,
                            unread_only=True,
                            after_id=after,
                            limit=200,
                        )
                    for row in missed:
                        sent_up_to = max(sent_up_to, row["id"])
                        yield frame(row)
                while not await request.is_disconnected():
                    try:
                        message_id = await asyncio.wait_for(subscription.queue.get(), HEARTBEAT_S)
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    if message_id <= sent_up_to:
                        continue
                    async with service.sessions() as session:
                        live = await InboxRepository(session).message(message_id)
                    if live is not None:
                        sent_up_to = message_id
                        yield frame(live)
            finally:
                subscription.close()
                metrics.INBOX_STREAMS.dec()

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    # -- CSM tasks ------------------------------------------------------------------------

    @app.get("/v1/csm-tasks", dependencies=[Auth], tags=["csm tasks"])
    async def list_tasks(
        assignee: str | None = None,
        account_id: str | None = None,
        open: bool = True,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> list[CsmTask]:
        """CSM tasks, highest priority first (open ones by default)."""
        async with svc().sessions() as session:
            rows = await InboxRepository(session).tasks(
                assignee=assignee, account_id=account_id, open_only=open, limit=limit
            )
        return [CsmTask.of(r) for r in rows]

    @app.post("/v1/csm-tasks/{task_id}/done", dependencies=[Auth], tags=["csm tasks"])
    async def task_done(task_id: int) -> CsmTask:
        async with svc().sessions() as session, session.begin():
            row = await InboxRepository(session).complete_task(task_id)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"task {task_id}: no such task")
        return CsmTask.of(row)

    # -- delivery log ---------------------------------------------------------------------

    @app.get("/v1/deliveries/{command_id}", dependencies=[Auth], tags=["deliveries"])
    async def delivery(command_id: str) -> dict[str, Any]:
        """One command's delivery: its state, final status and every attempt."""
        async with svc().sessions() as session:
            repo = DeliveryRepository(session, svc().instance.key)
            found = await repo.delivery(command_id)
            if found is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"{command_id}: no such command")
            found["attempt_log"] = await repo.attempts_of(command_id)
        return found

    # -- unsubscribe (RFC 8058) -----------------------------------------------------------

    def address_of(token: str) -> str:
        try:
            return read_unsubscribe_token(settings.unsubscribe_secret.get_secret_value(), token)
        except BadSignature as exc:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"token: {exc}") from None

    def page(title: str, body: str) -> HTMLResponse:
        return HTMLResponse(
            f"<!doctype html><html lang=en><meta charset=utf-8><title>{escape(title)}</title>"
            "<body style='font-family:sans-serif;max-width:32em;margin:4em auto'>"
            f"<h1>{escape(title)}</h1>{body}</body></html>"
        )

    @app.get("/v1/unsubscribe", response_class=HTMLResponse, tags=["unsubscribe"])
    async def unsubscribe_page(token: str) -> HTMLResponse:
        """A confirmation page: a GET never unsubscribes (mail scanners follow links)."""
        address = address_of(token)
        return page(
            "Unsubscribe",
            f"<p>Stop emails to <b>{escape(address)}</b>?</p>"
            f"<form method=post action='?token={escape(token)}'>"
            "<button type=submit>Unsubscribe</button></form>",
        )

    @app.post("/v1/unsubscribe", response_class=HTMLResponse, tags=["unsubscribe"])
    async def unsubscribe(token: str, request: Request) -> HTMLResponse:
        """One-click (``List-Unsubscribe=One-Click`` body, RFC 8058) or the page's button."""
        address = address_of(token)
        body = (await request.body()).decode(errors="replace")
        via = "one-click" if "List-Unsubscribe=One-Click" in body else "page"
        async with svc().sessions() as session, session.begin():
            new = await SuppressionRepository(session).unsubscribe(address, via)
        log.info("unsubscribed" if new else "already unsubscribed", extra={"via": via})
        return page("Unsubscribed", f"<p>{escape(address)} will get no more emails from us.</p>")

    return app
