"""Signed webhooks: the ``webhook`` notification channel and the shared HTTP client.

A notification whose channel is ``webhook`` names a target (``recipient``) from
``CHURNGUARD_NOTIFY_WEBHOOK_URLS``; notify POSTs JSON to it with
``Churnguard-Signature`` (see :mod:`churnguard.notify.signing`) and ``Idempotency-Key``
(the command id). Receivers must treat a repeated ``Idempotency-Key`` as the same
request: an attempt interrupted by a crash is sent again with the same key.

2xx is delivered; 408, 425, 429 (``Retry-After`` kept) and 5xx are transient; any
other 4xx is permanent.
"""

from __future__ import annotations

from typing import Any, ClassVar

import httpx
import orjson

from churnguard.common.events.derived import NotificationRequested
from churnguard.notify.channels.base import (
    Channel,
    InDoubt,
    Job,
    PermanentError,
    Sent,
    TransientError,
)
from churnguard.notify.signing import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, sign_webhook

TRANSIENT_STATUSES = frozenset({408, 425, 429})


def _retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("retry-after")
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


class SignedPoster:
    """POSTs signed JSON and classifies the answer (shared by webhook channel and payments)."""

    def __init__(self, secret: str, timeout_s: float, what: str) -> None:
        self.secret = secret
        self.what = what
        self.client = httpx.AsyncClient(timeout=timeout_s)

    async def post(self, url: str, idempotency_key: str, payload: dict[str, Any]) -> httpx.Response:
        body = orjson.dumps(payload)
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: sign_webhook(self.secret, body),
            IDEMPOTENCY_HEADER: idempotency_key,
            "user-agent": "churnguard-notify/0.1",
        }
        try:
            response = await self.client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise TransientError(f"{self.what}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 500 or response.status_code in TRANSIENT_STATUSES:
            raise TransientError(
                f"{self.what}: HTTP {response.status_code}",
                response=f"{response.status_code} {response.text[:500]}",
                retry_after_s=_retry_after(response),
            )
        return response

    async def close(self) -> None:
        await self.client.aclose()


class WebhookChannel(Channel):
    lane: ClassVar[str] = "webhook"
    in_doubt_policy: ClassVar[str] = (
        "sent again with the same Idempotency-Key, which receivers deduplicate"
    )

    def __init__(self, targets: dict[str, str], secret: str, timeout_s: float) -> None:
        self.targets = targets
        self.poster = SignedPoster(secret, timeout_s, "webhook")

    async def send(self, job: Job) -> Sent:
        command = job.command
        assert isinstance(command, NotificationRequested)
        assert job.variables is not None
        url = self.targets.get(command.data.recipient)
        if url is None:
            raise PermanentError(
                f"webhook: no target {command.data.recipient!r} in CHURNGUARD_NOTIFY_WEBHOOK_URLS"
            )
        payload = {
            "id": command.id,
            "type": "churnguard.notification",
            "time": command.time.isoformat(),
            "account_id": command.subject,
            "template": command.data.template,
            "playbook": command.data.playbook,
            "decision_id": command.data.decision_id,
            "priority": command.data.priority,
            "variables": job.variables.model_dump(mode="json"),
        }
        response = await self.poster.post(url, command.id, payload)
        text = f"{response.status_code} {response.text[:500]}"
        if response.is_success:
            return Sent("delivered", response=text)
        raise PermanentError(f"webhook: HTTP {response.status_code}", response=text)

    async def resolve_in_doubt(self, job: Job) -> InDoubt:
        return InDoubt.SAFE_TO_SEND

    async def close(self) -> None:
        await self.poster.close()
