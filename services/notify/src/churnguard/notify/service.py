"""Notify assembled: channels, dispatcher, intake consumer, outbox publisher, instance.

:class:`NotifyService` is started by the web app's lifespan and runs its loops as tasks;
if any of them stops (the dead-letter breaker tripped, PostgreSQL or Kafka gone for
good, the liveness connection lost) the service stops the process, so the supervisor
or orchestrator restarts it instead of leaving a process that answers HTTP but delivers
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from importlib import resources
from pathlib import Path
from typing import Any

from churnguard.common.db import create_engine, run_migrations_async, session_factory
from churnguard.common.kafka import DeadLetterBreaker, make_producer
from churnguard.common.topics import Topic
from churnguard.notify.channels.base import Channel
from churnguard.notify.channels.email import EmailChannel
from churnguard.notify.channels.payments import (
    PaymentAdapter,
    PaymentChannel,
    StripeAdapter,
    WebhookPaymentAdapter,
)
from churnguard.notify.channels.slack import SlackChannel
from churnguard.notify.channels.webhook import WebhookChannel
from churnguard.notify.dispatcher import Dispatcher
from churnguard.notify.instance import Instance
from churnguard.notify.intake import Intake, IntakeLoop, inbox_channel
from churnguard.notify.outbox import OutboxPublisher
from churnguard.notify.repository import SuppressionRepository
from churnguard.notify.settings import NotifySettings

log = logging.getLogger(__name__)


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


class NotifyService:
    def __init__(self, settings: NotifySettings) -> None:
        self.settings = settings
        platform = settings.platform
        self.engine = create_engine(
            platform.database_url.get_secret_value(),
            schema=settings.db_schema,
            application_name="churnguard-notify",
            pool_size=settings.concurrency * 2 + 4,
            # no ping per checkout (a round trip per transaction): a lost PostgreSQL ends
            # the process anyway, through the liveness connection (Instance.watch)
            pool_pre_ping=False,
        )
        self.sessions = session_factory(self.engine)
        self.producer = make_producer(
            platform.kafka_bootstrap,
            client_id="churnguard-notify",
            idempotent=platform.kafka_idempotent_producer,
            linger_ms=2,
        )
        self.instance = Instance(
            platform.database_url.get_secret_value(),
            settings.db_schema,
            inbox_channel(settings.db_schema),
        )
        self.outbox = OutboxPublisher(self.sessions, self.producer, platform.topic_prefix)
        self.channels = self._channels()
        self.dispatcher: Dispatcher | None = None
        self.consumer: IntakeLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.started = False

    def _channels(self) -> dict[str, Channel]:
        s = self.settings
        timeout = s.provider_timeout_s

        async def is_unsubscribed(address: str) -> bool:
            async with self.sessions() as session:
                return await SuppressionRepository(session).is_unsubscribed(address)

        adapter: PaymentAdapter = (
            StripeAdapter(_secret(s.stripe_api_key), s.stripe_api_base, timeout)
            if s.payment_adapter == "stripe"
            else WebhookPaymentAdapter(
                s.payment_webhook_url, s.webhook_signing_secret.get_secret_value(), timeout
            )
        )
        channels: list[Channel] = [
            SlackChannel(
                bot_token=_secret(s.slack_bot_token),
                api_url=s.slack_api_url,
                webhooks=s.slack_webhooks,
                default_channel=s.slack_default_channel,
                timeout_s=timeout,
            ),
            EmailChannel(
                host=s.smtp_host,
                port=s.smtp_port,
                security=s.smtp_security,
                username=s.smtp_username,
                password=_secret(s.smtp_password),
                sender=s.smtp_from,
                message_id_domain=s.smtp_message_id_domain,
                public_url=s.public_url,
                unsubscribe_secret=s.unsubscribe_secret.get_secret_value(),
                is_unsubscribed=is_unsubscribed,
                timeout_s=timeout,
                ca_file=s.smtp_ca_file,
            ),
            WebhookChannel(s.webhook_targets, s.webhook_signing_secret.get_secret_value(), timeout),
            PaymentChannel(adapter),
        ]
        return {c.lane: c for c in channels}

    async def start(self) -> None:
        s = self.settings
        platform = s.platform
        # its own schema at start-up (as churnguard.common.db intends; serialized by an
        # advisory lock, so replicas starting together are safe): docker-compose's one-shot
        # setup runs from another service's image, which does not hold notify's migrations
        await run_migrations_async(
            platform.database_url.get_secret_value(),
            s.db_schema,
            Path(str(resources.files("churnguard.notify") / "migrations")),
        )
        await self.instance.start()
        await self.producer.start()
        self.dispatcher = Dispatcher(
            sessions=self.sessions,
            channels=self.channels,
            settings=s,
            instance=self.instance.key,
            wake_outbox=self.outbox.wake,
        )
        intake = Intake(
            sessions=self.sessions,
            dispatcher=self.dispatcher,
            instance=self.instance.key,
            prefix=platform.topic_prefix,
            lease_s=s.lease_s,
            schema=s.db_schema,
            wake_outbox=self.outbox.wake,
        )
        self.consumer = IntakeLoop(
            intake=intake,
            name="churnguard-notify",
            bootstrap=platform.kafka_bootstrap,
            topics=[
                Topic.NOTIFICATIONS.name_in(platform.topic_prefix),
                Topic.PAYMENT_RETRIES.name_in(platform.topic_prefix),
            ],
            group_id=s.group_id,
            dead_letter_topic=lambda topic: topic + ".dlq",
            producer=self.producer,
            breaker=DeadLetterBreaker(platform.dead_letter_max_ratio, platform.dead_letter_window),
        )
        for name, coro in (
            ("dispatcher", self.dispatcher.run()),
            ("outbox", self.outbox.run()),
            ("consumer", self.consumer.run()),
            ("liveness", self.instance.watch()),
        ):
            task = asyncio.create_task(coro, name=f"notify-{name}")
            task.add_done_callback(self._stopped)
            self._tasks.append(task)
        self.started = True
        log.info(
            "notify started",
            extra={
                "instance": self.instance.key,
                "guarantee": "at most one provider effect per command id; outcomes at least "
                "once with deterministic ids",
                "channels": {lane: ch.in_doubt_policy for lane, ch in self.channels.items()},
                "fault": s.fault_point,
            },
        )

    def _stopped(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        log.critical("%s stopped: %r; stopping notify", task.get_name(), exc, exc_info=exc)
        # SIGTERM lets uvicorn shut down in order; the supervisor restarts the process
        os.kill(os.getpid(), signal.SIGTERM)

    async def stop(self) -> None:
        if self.consumer is not None:
            self.consumer.stop()
        for task in self._tasks:
            task.remove_done_callback(self._stopped)
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.dispatcher is not None:
            left = await self.dispatcher.drain(self.settings.provider_timeout_s + 5)
            if left:
                log.warning("stopped with %d attempts unfinished: they are in doubt", left)
        with contextlib.suppress(Exception):
            await self.outbox.publish_once()  # what finished before the stop, out now
        for channel in self.channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
        with contextlib.suppress(Exception):
            await self.producer.stop()
        await self.instance.close()
        await self.engine.dispose()
