"""Payment retries: one adapter interface, a Stripe and a signed-webhook implementation.

The command id is the provider's idempotency key, so a retried or in-doubt charge can be
sent again safely: Stripe answers a repeated ``Idempotency-Key`` with the first result
(24 hours), and webhook receivers must do the same.

Outcomes: ``payment_succeeded`` when the invoice is paid; ``payment_failed`` with the new
decline code when the card is declined (a decline is an answer, not a delivery failure:
it is never retried here, dunning decides what comes next); ``failed`` when the charge
could not be attempted (not found, not configured, retries exhausted).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import orjson
import stripe

from churnguard.common.events.derived import PaymentRetryRequested
from churnguard.notify.channels.base import (
    Channel,
    InDoubt,
    Job,
    PermanentError,
    Sent,
    TransientError,
)
from churnguard.notify.channels.webhook import SignedPoster


class PaymentAdapter(abc.ABC):
    """Charges one invoice once per idempotency key."""

    name: ClassVar[str]

    @abc.abstractmethod
    async def pay(self, command: PaymentRetryRequested) -> Sent:
        """``Sent(payment_succeeded | payment_failed)``, or Transient/PermanentError."""

    async def close(self) -> None:
        return None


def _retry_after(headers: Any) -> float | None:
    try:
        raw = headers.get("retry-after") if headers else None
        return float(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None


class StripeAdapter(PaymentAdapter):
    """``POST /v1/invoices/{id}/pay`` through the ``stripe`` library, keyed by the command id."""

    name: ClassVar[str] = "stripe"

    def __init__(self, api_key: str | None, api_base: str, timeout_s: float) -> None:
        self.api_key = api_key
        self.client = (
            stripe.StripeClient(
                api_key,
                base_addresses={"api": api_base.rstrip("/")},
                http_client=stripe.HTTPXClient(timeout=timeout_s),
                # retries are notify's: scheduled in PostgreSQL, visible as attempts
                max_network_retries=0,
            )
            if api_key
            else None
        )

    async def pay(self, command: PaymentRetryRequested) -> Sent:
        if self.client is None:
            raise PermanentError("stripe: not configured (CHURNGUARD_NOTIFY_STRIPE_API_KEY)")
        invoice_id = command.data.invoice_id
        try:
            invoice = await self.client.v1.invoices.pay_async(
                invoice_id, options={"idempotency_key": command.id}
            )
        except stripe.CardError as exc:
            error = exc.error
            decline = (error.decline_code if error else None) or exc.code or "card_declined"
            return Sent(
                "payment_failed",
                response=f"{exc.http_status} {exc.code} {decline}: {exc.user_message or ''}",
                detail=exc.user_message or str(exc),
                decline_code=decline[:64],
            )
        except (stripe.RateLimitError, stripe.APIConnectionError, stripe.IdempotencyError) as exc:
            # 429, network, or 409 "key in use" (an earlier attempt still running at Stripe)
            raise TransientError(
                f"stripe: {type(exc).__name__}: {exc.user_message or exc}",
                response=f"{exc.http_status} {exc.code}",
                retry_after_s=_retry_after(exc.headers),
            ) from None
        except stripe.APIError as exc:
            raise TransientError(
                f"stripe: {exc.http_status} {exc.user_message or exc}",
                response=f"{exc.http_status} {exc.code}",
            ) from None
        except stripe.StripeError as exc:
            # 400 invalid request, 401/403 auth, 404 no such invoice: no retry helps
            status = exc.http_status or 0
            if status >= 500:
                raise TransientError(f"stripe: {status} {exc}") from None
            raise PermanentError(
                f"stripe: {status} {exc.code or type(exc).__name__}: {exc.user_message or exc}",
                response=f"{status} {exc.code}",
            ) from None
        if invoice.status == "paid":
            return Sent("payment_succeeded", response=f"200 {invoice.id} paid")
        return Sent(
            "payment_failed",
            response=f"200 {invoice.id} {invoice.status}",
            detail=f"invoice is {invoice.status} after the charge",
            decline_code="not_paid",
        )


class WebhookPaymentAdapter(PaymentAdapter):
    """A signed POST to the billing system's own endpoint, which charges and answers.

    Request: JSON ``{id, type: "churnguard.payment_retry", account_id, invoice_id, amount,
    currency, attempt}`` with ``Churnguard-Signature`` and ``Idempotency-Key``. Answer:
    ``200 {"status": "succeeded"}`` or ``200/402 {"status": "failed", "decline_code": …}``.
    """

    name: ClassVar[str] = "webhook"

    def __init__(self, url: str | None, secret: str, timeout_s: float) -> None:
        self.url = url
        self.poster = SignedPoster(secret, timeout_s, "payment webhook")

    async def pay(self, command: PaymentRetryRequested) -> Sent:
        if not self.url:
            raise PermanentError(
                "payment webhook: not configured (CHURNGUARD_NOTIFY_PAYMENT_WEBHOOK_URL)"
            )
        data = command.data
        response = await self.poster.post(
            self.url,
            command.id,
            {
                "id": command.id,
                "type": "churnguard.payment_retry",
                "account_id": command.subject,
                "invoice_id": data.invoice_id,
                "amount": data.amount,
                "currency": data.currency,
                "attempt": data.attempt,
            },
        )
        text = f"{response.status_code} {response.text[:500]}"
        try:
            body = orjson.loads(response.content) if response.content else {}
        except orjson.JSONDecodeError:
            body = {}
        status = body.get("status") if isinstance(body, dict) else None
        if response.status_code in (200, 201) and status == "succeeded":
            return Sent("payment_succeeded", response=text)
        if response.status_code in (200, 201, 402) and status == "failed":
            decline = str(body.get("decline_code") or "declined")[:64]
            return Sent("payment_failed", response=text, detail=text, decline_code=decline)
        raise PermanentError(f"payment webhook: unexpected answer {text}", response=text)

    async def close(self) -> None:
        await self.poster.close()


class PaymentChannel(Channel):
    lane: ClassVar[str] = "payment_retry"
    in_doubt_policy: ClassVar[str] = (
        "charged again with the same idempotency key: the provider answers with the first "
        "result and charges once"
    )

    def __init__(self, adapter: PaymentAdapter) -> None:
        self.adapter = adapter

    async def send(self, job: Job) -> Sent:
        assert isinstance(job.command, PaymentRetryRequested)
        return await self.adapter.pay(job.command)

    async def resolve_in_doubt(self, job: Job) -> InDoubt:
        return InDoubt.SAFE_TO_SEND

    async def close(self) -> None:
        await self.adapter.close()
