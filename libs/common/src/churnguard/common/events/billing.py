"""Billing events (topic ``events.billing``).

Ingest turns the billing system's (Stripe-format) webhooks into these: ``invoice.created``
→ :class:`InvoiceCreated`, ``invoice.paid`` → :class:`InvoicePaid`,
``invoice.payment_failed`` → :class:`InvoicePaymentFailed`, ``customer.subscription.*``
→ :class:`SubscriptionCreated` / :class:`SubscriptionUpdated` /
:class:`SubscriptionCancelled`, ``charge.refunded`` → :class:`ChargeRefunded`.
Scoring reads them for the payment and MRR features and the MRR movements; playbooks
read failed payments to run dunning.

Amounts are :data:`~churnguard.common.events.base.Money` (minor units, never floats).
``mrr`` is always normalised to a month: a yearly plan's MRR is its yearly amount / 12,
rounded to the minor unit. The CloudEvent ``time`` is when the billing system says it
happened (Stripe's ``created`` of the event object), not when ingest received it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field, StringConstraints

from churnguard.common.events.base import CloudEvent, Currency, Money, Payload

BillingId = Annotated[str, StringConstraints(min_length=1, max_length=255)]
"""An id in the billing system (Stripe: ``in_…``, ``sub_…``, ``ch_…``, ``re_…``)."""

DeclineKind = Literal["soft", "hard"]
"""``soft``: the issuer may approve a later attempt, retrying can recover the payment.
``hard``: retrying the same card cannot succeed (lost, stolen, closed, fraud, wrong data);
the customer has to act, so dunning never retries it."""

BillingInterval = Literal["month", "year"]
SubscriptionStatus = Literal[
    "trialing",
    "active",
    "past_due",
    "unpaid",
    "canceled",
    "incomplete",
    "incomplete_expired",
    "paused",
]
"""Stripe's subscription statuses, in Stripe's spelling (``canceled``)."""

Cancellation = Literal["voluntary", "involuntary"]
"""``voluntary``: the customer chose to leave. ``involuntary``: the subscription ended
because payment failed for good (dunning ran out)."""

DECLINE_CODE_KINDS: Mapping[str, DeclineKind] = MappingProxyType(
    {
        # soft: temporary or unspecific; a later attempt may be approved
        "insufficient_funds": "soft",
        "processing_error": "soft",
        "try_again_later": "soft",
        "generic_decline": "soft",
        "issuer_not_available": "soft",
        "reenter_transaction": "soft",
        "approve_with_id": "soft",
        "call_issuer": "soft",
        "card_velocity_exceeded": "soft",
        "withdrawal_count_limit_exceeded": "soft",
        "no_action_taken": "soft",
        "duplicate_transaction": "soft",
        # hard: the card or the credentials are unusable; only the customer can fix it
        "stolen_card": "hard",
        "lost_card": "hard",
        "pickup_card": "hard",
        "fraudulent": "hard",
        "merchant_blacklist": "hard",
        "do_not_honor": "hard",
        "do_not_try_again": "hard",
        "expired_card": "hard",
        "incorrect_number": "hard",
        "invalid_number": "hard",
        "incorrect_cvc": "hard",
        "invalid_cvc": "hard",
        "invalid_expiry_month": "hard",
        "invalid_expiry_year": "hard",
        "invalid_account": "hard",
        "invalid_amount": "hard",
        "card_not_supported": "hard",
        "currency_not_supported": "hard",
        "restricted_card": "hard",
        "security_violation": "hard",
        "service_not_allowed": "hard",
        "transaction_not_allowed": "hard",
        "not_permitted": "hard",
        "new_account_information_available": "hard",
        "revocation_of_authorization": "hard",
        "revocation_of_all_authorizations": "hard",
        "stop_payment_order": "hard",
        "authentication_required": "hard",
        "testmode_decline": "hard",
    }
)
"""Common Stripe decline codes and whether retrying can help. Codes not listed are soft."""


def decline_kind(code: str | None) -> DeclineKind:
    """Classify a decline code (case-insensitive); unknown or missing codes are ``soft``.

    Unknown is soft on purpose: a wrongly retried soft decline costs one declined
    attempt, while a wrongly abandoned one loses a customer who would have paid.
    """
    if not code:
        return "soft"
    return DECLINE_CODE_KINDS.get(code.strip().lower(), "soft")


class InvoiceCreatedData(Payload):
    invoice_id: BillingId
    subscription_id: BillingId | None = None
    amount_due: Money
    currency: Currency
    due_at: AwareDatetime | None = Field(
        default=None, description="Payment due date; none when the card on file is charged"
    )
    billing_reason: str | None = Field(
        default=None,
        max_length=64,
        description="Why it exists (Stripe: subscription_cycle, subscription_create, manual…)",
    )


class InvoiceCreated(CloudEvent):
    """The billing system issued an invoice to the account.

    Produced by ingest; scoring counts open and overdue invoices.
    """

    type: Literal["churnguard.billing.invoice_created"] = "churnguard.billing.invoice_created"
    data: InvoiceCreatedData


class InvoicePaidData(Payload):
    invoice_id: BillingId
    subscription_id: BillingId | None = None
    amount_paid: Money
    currency: Currency
    attempt_count: int = Field(
        default=1, ge=1, description="Payment attempts it took; above 1 means a recovered failure"
    )


class InvoicePaid(CloudEvent):
    """An invoice was paid in full.

    Produced by ingest; scoring clears the account's payment-failure features, playbooks
    stop the invoice's dunning, and a paid invoice after failures counts as recovered.
    """

    type: Literal["churnguard.billing.invoice_paid"] = "churnguard.billing.invoice_paid"
    data: InvoicePaidData


class InvoicePaymentFailedData(Payload):
    invoice_id: BillingId
    subscription_id: BillingId | None = None
    amount_due: Money
    currency: Currency
    attempt_count: int = Field(ge=1, description="Attempts so far, this one included")
    decline_code: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        description="The issuer's decline code (Stripe's decline_code, else its error code)"
    )
    decline_kind: DeclineKind = Field(
        description="soft: retrying may succeed; hard: never retry (see decline_kind())"
    )
    next_payment_attempt: AwareDatetime | None = Field(
        default=None, description="When the billing system will retry by itself, if it will"
    )


class InvoicePaymentFailed(CloudEvent):
    """A payment attempt for an invoice was declined.

    Produced by ingest, which sets ``decline_kind`` with :func:`decline_kind` unless the
    billing system says better. Scoring counts failed payments (involuntary-churn risk);
    playbooks start or continue dunning, and never schedule a retry for a hard decline.
    """

    type: Literal["churnguard.billing.invoice_payment_failed"] = (
        "churnguard.billing.invoice_payment_failed"
    )
    data: InvoicePaymentFailedData


class SubscriptionData(Payload):
    """What every subscription event says about the subscription after the change."""

    subscription_id: BillingId
    plan: Annotated[str, StringConstraints(min_length=1, max_length=255)] = Field(
        description="Plan or price id (Stripe price id or lookup key)"
    )
    interval: BillingInterval
    quantity: int = Field(ge=0, description="Units bought, usually seats")
    mrr: Money = Field(description="Monthly recurring revenue, minor units, normalised to a month")
    currency: Currency
    status: SubscriptionStatus


class SubscriptionCreatedData(SubscriptionData):
    trial_end: AwareDatetime | None = Field(default=None, description="End of the trial, if any")


class SubscriptionCreated(CloudEvent):
    """The account started a subscription (new business, or a return after churn).

    Produced by ingest; scoring books it as a ``new`` or ``reactivation`` MRR movement.
    """

    type: Literal["churnguard.billing.subscription_created"] = (
        "churnguard.billing.subscription_created"
    )
    data: SubscriptionCreatedData


class SubscriptionUpdatedData(SubscriptionData):
    previous_mrr: Money = Field(description="MRR before the change (equal to mrr if unchanged)")
    previous_plan: str | None = Field(default=None, max_length=255)
    previous_quantity: int | None = Field(default=None, ge=0)
    previous_status: SubscriptionStatus | None = None


class SubscriptionUpdated(CloudEvent):
    """A subscription changed: plan, quantity, interval or status (e.g. to ``past_due``).

    Produced by ingest; scoring books an ``expansion`` or ``contraction`` MRR movement when
    ``mrr`` differs from ``previous_mrr`` and uses status changes as risk features.
    """

    type: Literal["churnguard.billing.subscription_updated"] = (
        "churnguard.billing.subscription_updated"
    )
    data: SubscriptionUpdatedData


class SubscriptionCancelledData(SubscriptionData):
    """``mrr`` is the MRR the subscription had until it ended: the revenue that churns."""

    cancellation: Cancellation
    reason: str | None = Field(
        default=None,
        max_length=2000,
        description="Why, if known (Stripe's cancellation_details feedback or comment)",
    )
    effective_at: AwareDatetime = Field(
        description="When the subscription ends and its MRR stops (the period end when "
        "cancelled at period end; the event time when cancelled at once)"
    )


class SubscriptionCancelled(CloudEvent):
    """A subscription was cancelled, by the customer (voluntary) or for non-payment (involuntary).

    ``time`` is when the cancellation was made; ``effective_at`` when it takes effect.
    Produced by ingest; scoring books a ``churn`` MRR movement (the voluntary/involuntary
    split of the dashboard comes from ``cancellation``) and playbooks may start a save or
    win-back flow before ``effective_at``.
    """

    type: Literal["churnguard.billing.subscription_cancelled"] = (
        "churnguard.billing.subscription_cancelled"
    )
    data: SubscriptionCancelledData


class ChargeRefundedData(Payload):
    charge_id: BillingId
    refund_id: BillingId | None = None
    invoice_id: BillingId | None = None
    amount: Money = Field(description="Amount refunded by this refund, minor units")
    currency: Currency
    reason: str | None = Field(
        default=None,
        max_length=255,
        description="Stripe: duplicate, fraudulent, requested_by_customer; or free text",
    )


class ChargeRefunded(CloudEvent):
    """Money was given back to the account for a charge (full or partial refund).

    Produced by ingest; scoring uses refunds as a dissatisfaction signal.
    """

    type: Literal["churnguard.billing.charge_refunded"] = "churnguard.billing.charge_refunded"
    data: ChargeRefundedData


BillingEvent = Annotated[
    InvoiceCreated
    | InvoicePaid
    | InvoicePaymentFailed
    | SubscriptionCreated
    | SubscriptionUpdated
    | SubscriptionCancelled
    | ChargeRefunded,
    Field(discriminator="type"),
]
