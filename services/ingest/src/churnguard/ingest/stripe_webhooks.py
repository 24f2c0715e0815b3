"""Stripe webhooks → churnguard billing events (pure functions, no I/O).

The wire contract is the module docstring of :mod:`churnguard.simulator.http_sink`
(section "Stripe webhooks"); real Stripe sends the same shapes, so everything here also
accepts real Stripe payloads. Two entry points:

* :func:`verify_signature` checks the ``Stripe-Signature`` header (``t=<unix>,v1=<hex>``,
  HMAC-SHA256 over ``b"<t>." + body`` with the endpoint secret) against one or more
  secrets (several during a secret rotation) and the timestamp tolerance. Raises
  :class:`SignatureError` whose ``reason`` says exactly what failed.
* :func:`map_event` turns a parsed Stripe ``Event`` into a :class:`MappedEvent` holding one
  billing CloudEvent model (:mod:`churnguard.common.events.billing`), or an
  :class:`Unhandled` for types churnguard does not model (the caller acknowledges and counts
  those; they are not errors). Malformed payloads raise :class:`MappingError` whose
  ``reason`` starts with the Stripe field path, e.g. ``data.object.metadata.account_id:
  missing``.

CloudEvent attributes: ``id`` is the Stripe event id (the idempotency key: a redelivered
webhook carries the same id), ``source`` is :data:`STRIPE_SOURCE`, ``time`` is the event's
``created`` (UTC), ``subject`` is the account id.

Account id. Stripe customers are mapped to accounts through ``metadata.account_id``,
looked up on ``data.object`` first, then on the subscription or customer metadata the
payload carries (``subscription_details.metadata``, ``parent.subscription_details.metadata``,
an expanded ``subscription`` or ``customer``), then on the per-customer nested objects
(expanded ``charge``/``payment_intent``, ``refunds.data[0]``, ``items.data[0]``,
``lines.data[0]``). None of them → :class:`MappingError` naming
``data.object.metadata.account_id``.

Type mapping:

* ``invoice.created`` / ``invoice.paid`` / ``invoice.payment_failed`` →
  :class:`InvoiceCreated` / :class:`InvoicePaid` / :class:`InvoicePaymentFailed`.
  ``attempt_count`` below 1 (Stripe says 0 for invoices paid out of band) becomes 1, the
  model's minimum. The decline code is the first of
  ``payment_intent.last_payment_error.decline_code``, ``charge.outcome.reason``,
  ``charge.failure_code``, ``payment_intent.last_payment_error.code`` (``charge`` and
  ``payment_intent`` expanded); real Stripe sends bare ids there, and then the code is
  :data:`UNKNOWN_DECLINE_CODE` (a failed payment is still worth booking, and an unknown code
  is a *soft* decline, see :func:`~churnguard.common.events.billing.decline_kind`).
* ``charge.refunded`` → :class:`ChargeRefunded`, amount/id/reason from the expanded
  ``refunds.data[0]`` (``reason or metadata.reason``); without an expanded refund list
  (real Stripe since API 2022-11-15) the amount is the charge's ``amount_refunded`` and the
  refund id and reason are unknown.
* ``customer.subscription.created`` → :class:`SubscriptionCreated`.
* ``customer.subscription.updated`` → :class:`SubscriptionCancelled` when it *schedules* a
  cancellation: ``cancel_at_period_end`` (or ``cancel_at``) is set now and
  ``previous_attributes`` says it was not, or there are no ``previous_attributes`` at all;
  ``effective_at`` is ``current_period_end`` (else ``cancel_at``, else the first item's
  ``current_period_end``, as in API versions from 2025-03-31). Any other update, including
  one of a subscription whose cancellation was scheduled earlier, →
  :class:`SubscriptionUpdated`.
* ``customer.subscription.deleted`` → :class:`SubscriptionCancelled` effective at
  ``ended_at`` (else ``canceled_at``, else ``created``), except when the subscription had
  ``cancel_at_period_end`` or ``cancel_at`` set: that deletion is a scheduled cancellation
  taking effect, already booked as churn when it was scheduled, so it is :class:`Unhandled`
  (with a reason) and no second churn is counted.
* Any other type → :class:`Unhandled`.

Subscriptions. ``plan`` is ``items.data[0].price.lookup_key or .id``, ``quantity`` that
item's quantity, ``interval`` its ``price.recurring.interval``, and
``mrr = sum(unit_amount * quantity over items.data) // k`` with ``k`` = 12 for ``year`` and
1 for ``month``: exactly the inverse of the simulator's split (which adds a remainder item
when needed). Metered items (``usage_type "metered"``) add nothing to MRR; a price without
``unit_amount`` uses ``unit_amount_decimal``. Other intervals (``week``, ``day``) and
``interval_count`` other than 1 (e.g. quarterly) are **rejected** with a
:class:`MappingError`: the models only know ``month`` and ``year``, and normalising a weekly
plan to ``interval "month"`` would state a billing interval the customer does not have.
``cancellation`` is ``involuntary`` iff ``cancellation_details.reason == "payment_failed"``;
the free-text ``reason`` is ``feedback + ": " + comment`` (or whichever is set), else
``"payment_failed"`` when involuntary, else none. For updates, ``previous_mrr`` is the MRR
of ``previous_attributes.items`` (normalised by their own interval) or ``mrr``,
``previous_quantity`` the previous seat item's quantity (or legacy
``previous_attributes.quantity``), ``previous_plan`` the previous seat item's plan when it
differs from ``plan``, ``previous_status`` ``previous_attributes.status``.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from pydantic import BaseModel, ValidationError

from churnguard.common.events.billing import (
    ChargeRefunded,
    InvoiceCreated,
    InvoicePaid,
    InvoicePaymentFailed,
    SubscriptionCancelled,
    SubscriptionCreated,
    SubscriptionUpdated,
    decline_kind,
)

STRIPE_SOURCE: Final = "/stripe"
"""The CloudEvent ``source`` of every event mapped from a Stripe webhook."""
DEFAULT_TOLERANCE_S: Final = 300
"""Stripe's libraries' default: a signature older than 5 minutes is refused."""
UNKNOWN_DECLINE_CODE: Final = "unknown"
"""Decline code of a failed payment whose charge/payment intent are not expanded."""
MAX_CANCELLATION_REASON: Final = 2000
MAX_REFUND_REASON: Final = 255

BillingEventModel = (
    InvoiceCreated
    | InvoicePaid
    | InvoicePaymentFailed
    | SubscriptionCreated
    | SubscriptionUpdated
    | SubscriptionCancelled
    | ChargeRefunded
)
"""Any churnguard billing CloudEvent model."""

_MONTHS: Final[Mapping[str, int]] = {"month": 1, "year": 12}
_OBJECT = "data.object"


class SignatureError(Exception):
    """The ``Stripe-Signature`` header does not authenticate the body; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MappingError(ValueError):
    """The Stripe event cannot be mapped; ``reason`` starts with the offending field path."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class MappedEvent:
    """A Stripe event mapped to a churnguard billing CloudEvent."""

    event: BillingEventModel
    stripe_type: str

    @property
    def id(self) -> str:
        """The CloudEvent id, i.e. the Stripe event id (the idempotency key)."""
        return self.event.id

    @property
    def account_id(self) -> str:
        return self.event.subject


@dataclass(frozen=True, slots=True)
class Unhandled:
    """A well-formed Stripe event churnguard does not book; acknowledge it and count it."""

    stripe_type: str
    stripe_id: str | None = None
    reason: str = "no churnguard billing event for this Stripe event type"


# -- signatures -------------------------------------------------------------------------


def verify_signature(
    payload: bytes,
    header: str | None,
    secrets: Sequence[str],
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Check a ``Stripe-Signature`` header over the exact body bytes; raise if it fails.

    The header is ``t=<unix>,v1=<hex>[,v1=<hex>…][,v0=…]``; the body is accepted when any
    ``v1`` equals ``HMAC-SHA256(secret, b"<t>." + payload)`` for any of ``secrets``
    (several during a rotation), compared in constant time, and ``t`` is within
    ``tolerance_s`` seconds of ``now``. Unlike Stripe's libraries, a timestamp more than
    ``tolerance_s`` in the *future* is refused too. The signature is checked before the
    timestamp, so "outside tolerance" is only ever said of an authentic request.
    Other schemes (``v0``, test-mode schemes) are ignored. An empty ``secrets`` is a
    configuration error (:class:`ValueError`).
    """
    usable = [s for s in secrets if s]
    if not usable:
        raise ValueError("no Stripe webhook secret configured")
    if header is None or not header.strip():
        raise SignatureError("Stripe-Signature header missing")
    timestamps: list[str] = []
    signatures: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            timestamps.append(value.strip())
        elif key == "v1":
            signatures.append(value.strip())
    if not timestamps:
        raise SignatureError("Stripe-Signature header has no t= timestamp")
    if len(timestamps) > 1:
        raise SignatureError("Stripe-Signature header has more than one t= timestamp")
    if not timestamps[0].isascii() or not timestamps[0].isdigit():
        raise SignatureError(f"Stripe-Signature t={timestamps[0][:32]!r} is not unix seconds")
    t = int(timestamps[0])
    if not signatures:
        raise SignatureError("Stripe-Signature header has no v1= signature")
    signed = str(t).encode() + b"." + payload
    expected = [
        hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest().encode() for secret in usable
    ]
    matched = False
    for signature in signatures:
        candidate = signature.encode("ascii", "replace")
        for digest in expected:  # no early exit: timing does not tell which one matched
            matched |= hmac.compare_digest(digest, candidate)
    if not matched:
        raise SignatureError(
            f"no v1 signature in Stripe-Signature matches the body with any of the "
            f"{len(usable)} configured secret(s)"
        )
    age = (time.time() if now is None else now) - t
    if age > tolerance_s:
        raise SignatureError(
            f"Stripe-Signature timestamp t={t} is {age:.0f} s old, more than the "
            f"{tolerance_s} s tolerance (by {age - tolerance_s:.0f} s)"
        )
    if -age > tolerance_s:
        raise SignatureError(
            f"Stripe-Signature timestamp t={t} is {-age:.0f} s in the future, more than the "
            f"{tolerance_s} s tolerance (by {-age - tolerance_s:.0f} s)"
        )


# -- field access --------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _fail(path: str, problem: str) -> MappingError:
    return MappingError(f"{path}: {problem}")


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(path, "missing" if value is None else f"expected an object, got {value!r:.60}")
    return value


def _opt_mapping(parent: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = parent.get(key)
    return value if isinstance(value, Mapping) else None


def _opt_str(parent: Mapping[str, Any], key: str, path: str) -> str | None:
    value = parent.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(_join(path, key), f"expected a string, got {value!r:.60}")
    return value or None


def _str(parent: Mapping[str, Any], key: str, path: str) -> str:
    value = _opt_str(parent, key, path)
    if value is None:
        raise _fail(_join(path, key), "missing")
    return value


def _opt_int(parent: Mapping[str, Any], key: str, path: str) -> int | None:
    value = parent.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(_join(path, key), f"expected an integer, got {value!r:.60}")
    return value


def _int(parent: Mapping[str, Any], key: str, path: str) -> int:
    value = _opt_int(parent, key, path)
    if value is None:
        raise _fail(_join(path, key), "missing")
    return value


def _opt_time(parent: Mapping[str, Any], key: str, path: str) -> datetime | None:
    value = _opt_int(parent, key, path)
    if value is None:
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise _fail(_join(path, key), f"unix time {value} out of range") from None


def _id_of(parent: Mapping[str, Any], key: str, path: str) -> str | None:
    """An id that Stripe sends either bare or as an expanded object."""
    value = parent.get(key)
    if isinstance(value, Mapping):
        return _opt_str(value, "id", _join(path, key))
    return _opt_str(parent, key, path)


def _list_data(parent: Mapping[str, Any], key: str, path: str) -> list[Mapping[str, Any]]:
    """The ``data`` rows of a Stripe list object (each must be an object)."""
    listing = _mapping(parent.get(key), _join(path, key))
    rows = listing.get("data")
    if not isinstance(rows, list):
        raise _fail(f"{path}.{key}.data", "expected a list")
    return [_mapping(row, f"{path}.{key}.data[{i}]") for i, row in enumerate(rows)]


def _first_row(parent: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    listing = _opt_mapping(parent, key)
    rows = listing.get("data") if listing is not None else None
    if isinstance(rows, list) and rows and isinstance(rows[0], Mapping):
        return rows[0]
    return None


# -- account id ----------------------------------------------------------------------------


def _account_id(obj: Mapping[str, Any]) -> tuple[str, str]:
    """``(account id, path it came from)``; see the module docstring for the search order."""
    candidates: list[tuple[str, Mapping[str, Any] | None]] = [(_OBJECT, obj)]
    details = _opt_mapping(obj, "subscription_details")
    candidates.append((f"{_OBJECT}.subscription_details", details))
    parent = _opt_mapping(obj, "parent")
    parent_details = _opt_mapping(parent, "subscription_details") if parent else None
    candidates.append((f"{_OBJECT}.parent.subscription_details", parent_details))
    for key in ("subscription", "customer", "charge", "payment_intent"):
        candidates.append((f"{_OBJECT}.{key}", _opt_mapping(obj, key)))
    for key in ("refunds", "items", "lines"):
        candidates.append((f"{_OBJECT}.{key}.data[0]", _first_row(obj, key)))
    for where, holder in candidates:
        metadata = _opt_mapping(holder, "metadata") if holder is not None else None
        if metadata is None or metadata.get("account_id") is None:
            continue
        path = f"{where}.metadata"
        value = metadata["account_id"]
        if not isinstance(value, str) or not value.strip():
            raise _fail(f"{path}.account_id", f"expected a non-empty string, got {value!r:.60}")
        return value.strip(), f"{path}.account_id"
    raise _fail(
        f"{_OBJECT}.metadata.account_id",
        "missing (also not on the subscription, customer or nested objects' metadata); "
        "the Stripe customer cannot be mapped to a churnguard account",
    )


# -- subscriptions -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Items:
    plan: str
    quantity: int
    interval: str
    mrr: int


def _items(parent: Mapping[str, Any], path: str) -> _Items:
    """Plan, seat quantity, interval and monthly MRR of a subscription's ``items``."""
    rows = _list_data(parent, "items", path)
    if not rows:
        raise _fail(f"{path}.items.data", "empty: a subscription has at least one item")
    interval: str | None = None
    total = Decimal(0)
    seat_quantity = 0
    for i, item in enumerate(rows):
        item_path = f"{path}.items.data[{i}]"
        price = _mapping(item.get("price"), f"{item_path}.price")
        price_path = f"{item_path}.price"
        recurring = _mapping(price.get("recurring"), f"{price_path}.recurring")
        recurring_path = f"{price_path}.recurring"
        item_interval = _str(recurring, "interval", recurring_path)
        if item_interval not in _MONTHS:
            raise _fail(
                f"{recurring_path}.interval",
                f"{item_interval!r} is not supported: churnguard models month and year plans only",
            )
        count = _opt_int(recurring, "interval_count", recurring_path)
        if count not in (None, 1):
            raise _fail(
                f"{recurring_path}.interval_count",
                f"{count} is not supported: churnguard models plans billed every 1 month "
                "or every 1 year only",
            )
        if interval is None:
            interval = item_interval
        elif item_interval != interval:
            raise _fail(
                f"{recurring_path}.interval",
                f"{item_interval!r} differs from the first item's {interval!r}",
            )
        metered = recurring.get("usage_type") == "metered"
        quantity = _opt_int(item, "quantity", item_path)
        if quantity is None:
            if not metered:
                raise _fail(f"{item_path}.quantity", "missing")
            quantity = 0
        if quantity < 0:
            raise _fail(f"{item_path}.quantity", f"negative ({quantity})")
        if i == 0:
            seat_quantity = quantity
        if not metered:
            total += _unit_amount(price, price_path) * quantity
    assert interval is not None
    seat_price = _mapping(rows[0].get("price"), f"{path}.items.data[0].price")
    seat_path = f"{path}.items.data[0].price"
    plan = _opt_str(seat_price, "lookup_key", seat_path) or _str(seat_price, "id", seat_path)
    return _Items(
        plan=plan, quantity=seat_quantity, interval=interval, mrr=int(total // _MONTHS[interval])
    )


def _unit_amount(price: Mapping[str, Any], path: str) -> Decimal:
    amount = _opt_int(price, "unit_amount", path)
    if amount is not None:
        return Decimal(amount)
    decimal = _opt_str(price, "unit_amount_decimal", path)
    if decimal is None:
        raise _fail(f"{path}.unit_amount", "missing (tiered prices are not supported)")
    try:
        value = Decimal(decimal)
    except InvalidOperation:
        raise _fail(f"{path}.unit_amount_decimal", f"not a number: {decimal!r:.60}") from None
    if not value.is_finite():
        raise _fail(f"{path}.unit_amount_decimal", f"not a number: {decimal!r:.60}")
    return value


def _subscription_data(obj: Mapping[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    items = _items(obj, _OBJECT)
    currency = _opt_str(obj, "currency", _OBJECT)
    if currency is None:
        price_path = f"{_OBJECT}.items.data[0].price"
        price = _mapping(_list_data(obj, "items", _OBJECT)[0].get("price"), price_path)
        currency = _str(price, "currency", price_path)
    paths |= {
        "subscription_id": f"{_OBJECT}.id",
        "plan": f"{_OBJECT}.items.data[0].price.lookup_key",
        "interval": f"{_OBJECT}.items.data[0].price.recurring.interval",
        "quantity": f"{_OBJECT}.items.data[0].quantity",
        "mrr": f"{_OBJECT}.items.data[].price.unit_amount",
        "currency": f"{_OBJECT}.currency",
        "status": f"{_OBJECT}.status",
    }
    return {
        "subscription_id": _str(obj, "id", _OBJECT),
        "plan": items.plan,
        "interval": items.interval,
        "quantity": items.quantity,
        "mrr": items.mrr,
        "currency": currency,
        "status": _str(obj, "status", _OBJECT),
    }


def _cancellation(obj: Mapping[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    path = f"{_OBJECT}.cancellation_details"
    details = _opt_mapping(obj, "cancellation_details") or {}
    involuntary = details.get("reason") == "payment_failed"
    feedback = _opt_str(details, "feedback", path)
    comment = _opt_str(details, "comment", path)
    if feedback and comment:
        reason: str | None = f"{feedback}: {comment}"
    else:
        reason = feedback or comment or ("payment_failed" if involuntary else None)
    paths |= {"cancellation": f"{path}.reason", "reason": f"{path}.comment"}
    return {
        "cancellation": "involuntary" if involuntary else "voluntary",
        "reason": reason[:MAX_CANCELLATION_REASON] if reason is not None else None,
    }


def _is_scheduled_cancellation(obj: Mapping[str, Any], previous: Mapping[str, Any] | None) -> bool:
    """Whether a ``customer.subscription.updated`` schedules a cancellation (now)."""
    at_period_end = obj.get("cancel_at_period_end") is True
    at_date = obj.get("cancel_at") is not None
    if not (at_period_end or at_date):
        return False
    if not previous:  # no record of what changed: the cancellation is what it says
        return True
    if at_period_end and "cancel_at_period_end" in previous:
        return previous["cancel_at_period_end"] is not True
    return at_date and "cancel_at" in previous and previous["cancel_at"] is None


def _scheduled_end(obj: Mapping[str, Any]) -> tuple[datetime, str]:
    for key in ("current_period_end", "cancel_at"):
        value = _opt_time(obj, key, _OBJECT)
        if value is not None:
            return value, f"{_OBJECT}.{key}"
    first = _first_row(obj, "items")
    if first is not None:
        value = _opt_time(first, "current_period_end", f"{_OBJECT}.items.data[0]")
        if value is not None:
            return value, f"{_OBJECT}.items.data[0].current_period_end"
    raise _fail(f"{_OBJECT}.current_period_end", "missing (needed for a scheduled cancellation)")


def _subscription_created(obj: Mapping[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    data = _subscription_data(obj, paths)
    data["trial_end"] = _opt_time(obj, "trial_end", _OBJECT)
    paths["trial_end"] = f"{_OBJECT}.trial_end"
    return data


def _subscription_updated(
    obj: Mapping[str, Any], previous: Mapping[str, Any], paths: dict[str, str]
) -> dict[str, Any]:
    data = _subscription_data(obj, paths)
    prev_path = "data.previous_attributes"
    previous_mrr = data["mrr"]
    previous_plan: str | None = None
    previous_quantity = _opt_int(previous, "quantity", prev_path)
    if previous.get("items") is not None:
        before = _items(previous, prev_path)
        previous_mrr = before.mrr
        previous_quantity = before.quantity
        previous_plan = before.plan if before.plan != data["plan"] else None
    paths |= {
        "previous_mrr": f"{prev_path}.items",
        "previous_plan": f"{prev_path}.items.data[0].price.lookup_key",
        "previous_quantity": f"{prev_path}.items.data[0].quantity",
        "previous_status": f"{prev_path}.status",
    }
    return data | {
        "previous_mrr": previous_mrr,
        "previous_plan": previous_plan,
        "previous_quantity": previous_quantity,
        "previous_status": _opt_str(previous, "status", prev_path),
    }


# -- invoices and charges ------------------------------------------------------------------


def _invoice_subscription(obj: Mapping[str, Any]) -> str | None:
    subscription = _id_of(obj, "subscription", _OBJECT)
    if subscription is None:
        parent = _opt_mapping(obj, "parent")
        details = _opt_mapping(parent, "subscription_details") if parent else None
        if details is not None:
            subscription = _id_of(details, "subscription", f"{_OBJECT}.parent.subscription_details")
    return subscription


def _invoice_common(obj: Mapping[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    paths |= {
        "invoice_id": f"{_OBJECT}.id",
        "subscription_id": f"{_OBJECT}.subscription",
        "currency": f"{_OBJECT}.currency",
    }
    return {
        "invoice_id": _str(obj, "id", _OBJECT),
        "subscription_id": _invoice_subscription(obj),
        "currency": _str(obj, "currency", _OBJECT),
    }


def _attempts(obj: Mapping[str, Any], paths: dict[str, str]) -> int:
    paths["attempt_count"] = f"{_OBJECT}.attempt_count"
    return max(1, _opt_int(obj, "attempt_count", _OBJECT) or 1)


def _invoice_created(obj: Mapping[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    data = _invoice_common(obj, paths)
    paths |= {
        "amount_due": f"{_OBJECT}.amount_due",
        "due_at": f"{_OBJECT}.due_date",
        "billing_reason": f"{_OBJECT}.billing_reason",
    }
    return data | {
        "amount_due": _int(obj, "amount_due", _OBJECT),
        "due_at": _opt_time(obj, "due_date", _OBJECT),
        "billing_reason": _opt_str(obj, "billing_reason", _OBJECT),
    }


def _invoice_paid(obj: Mapping[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    data = _invoice_common(obj, paths)
    paths["amount_paid"] = f"{_OBJECT}.amount_paid"
    return data | {
        "amount_paid": _int(obj, "amount_paid", _OBJECT),
        "attempt_count": _attempts(obj, paths),
    }


def _decline_code(obj: Mapping[str, Any]) -> tuple[str, str]:
    """``(code, path)``: see the module docstring for the order."""
    charge = _opt_mapping(obj, "charge") or {}
    intent = _opt_mapping(obj, "payment_intent") or {}
    error = _opt_mapping(intent, "last_payment_error") or {}
    outcome = _opt_mapping(charge, "outcome") or {}
    error_path = f"{_OBJECT}.payment_intent.last_payment_error"
    for holder, key, path in (
        (error, "decline_code", error_path),
        (outcome, "reason", f"{_OBJECT}.charge.outcome"),
        (charge, "failure_code", f"{_OBJECT}.charge"),
        (error, "code", error_path),
    ):
        code = _opt_str(holder, key, path)
        if code:
            return code, _join(path, key)
    return UNKNOWN_DECLINE_CODE, f"{_OBJECT}.charge"


def _invoice_payment_failed(obj: Mapping[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    data = _invoice_common(obj, paths)
    code, code_path = _decline_code(obj)
    paths |= {
        "amount_due": f"{_OBJECT}.amount_due",
        "decline_code": code_path,
        "decline_kind": code_path,
        "next_payment_attempt": f"{_OBJECT}.next_payment_attempt",
    }
    return data | {
        "amount_due": _int(obj, "amount_due", _OBJECT),
        "attempt_count": _attempts(obj, paths),
        "decline_code": code,
        "decline_kind": decline_kind(code),
        "next_payment_attempt": _opt_time(obj, "next_payment_attempt", _OBJECT),
    }


def _charge_refunded(obj: Mapping[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    refund = _first_row(obj, "refunds")
    paths |= {
        "charge_id": f"{_OBJECT}.id",
        "invoice_id": f"{_OBJECT}.invoice",
        "currency": f"{_OBJECT}.currency",
    }
    data: dict[str, Any] = {
        "charge_id": _str(obj, "id", _OBJECT),
        "invoice_id": _id_of(obj, "invoice", _OBJECT),
        "currency": _str(obj, "currency", _OBJECT),
    }
    if refund is None:
        paths["amount"] = f"{_OBJECT}.amount_refunded"
        return data | {"amount": _int(obj, "amount_refunded", _OBJECT)}
    path = f"{_OBJECT}.refunds.data[0]"
    metadata = _opt_mapping(refund, "metadata") or {}
    reason = _opt_str(refund, "reason", path) or _opt_str(metadata, "reason", f"{path}.metadata")
    paths |= {
        "refund_id": f"{path}.id",
        "amount": f"{path}.amount",
        "reason": f"{path}.reason",
    }
    return data | {
        "refund_id": _opt_str(refund, "id", path),
        "amount": _int(refund, "amount", path),
        "reason": reason[:MAX_REFUND_REASON] if reason is not None else None,
    }


# -- map_event -----------------------------------------------------------------------------

_Builder = Callable[[Mapping[str, Any], dict[str, str]], dict[str, Any]]
_SIMPLE: Final[Mapping[str, tuple[str, type[BaseModel], _Builder]]] = {
    "invoice.created": ("invoice", InvoiceCreated, _invoice_created),
    "invoice.paid": ("invoice", InvoicePaid, _invoice_paid),
    "invoice.payment_failed": ("invoice", InvoicePaymentFailed, _invoice_payment_failed),
    "charge.refunded": ("charge", ChargeRefunded, _charge_refunded),
    "customer.subscription.created": ("subscription", SubscriptionCreated, _subscription_created),
}
HANDLED_TYPES: Final = frozenset(
    {*_SIMPLE, "customer.subscription.updated", "customer.subscription.deleted"}
)
"""Stripe event types :func:`map_event` maps; any other type is :class:`Unhandled`."""


def map_event(stripe_event: Mapping[str, Any]) -> MappedEvent | Unhandled:
    """Map a parsed Stripe ``Event`` to a churnguard billing CloudEvent (see module docstring).

    Returns :class:`Unhandled` for event types churnguard does not book; raises
    :class:`MappingError` (reason starting with the Stripe field path) for a payload that
    does not have what the mapping needs.
    """
    event = _mapping(stripe_event, "event")
    stripe_type = _str(event, "type", "")
    event_id = _str(event, "id", "")
    if stripe_type not in HANDLED_TYPES:
        return Unhandled(stripe_type, event_id)
    created = _opt_time(event, "created", "")
    if created is None:
        raise _fail("created", "missing")
    payload = _mapping(event.get("data"), "data")
    obj = _mapping(payload.get("object"), _OBJECT)
    previous = _opt_mapping(payload, "previous_attributes")

    paths: dict[str, str] = {}
    model: type[BaseModel]
    if stripe_type in _SIMPLE:
        kind, model, build = _SIMPLE[stripe_type]
        _expect_object(obj, kind)
        account, account_path = _account_id(obj)
        data = build(obj, paths)
    else:
        _expect_object(obj, "subscription")
        if stripe_type == "customer.subscription.updated":
            account, account_path = _account_id(obj)
            if _is_scheduled_cancellation(obj, previous):
                model = SubscriptionCancelled
                data = _subscription_data(obj, paths) | _cancellation(obj, paths)
                data["effective_at"], paths["effective_at"] = _scheduled_end(obj)
            else:
                model = SubscriptionUpdated
                data = _subscription_updated(obj, previous or {}, paths)
        else:  # customer.subscription.deleted
            if obj.get("cancel_at_period_end") is True or obj.get("cancel_at") is not None:
                return Unhandled(
                    stripe_type,
                    event_id,
                    "a scheduled cancellation taking effect: its churn was booked when the "
                    "cancellation was scheduled (customer.subscription.updated)",
                )
            account, account_path = _account_id(obj)
            model = SubscriptionCancelled
            data = _subscription_data(obj, paths) | _cancellation(obj, paths)
            effective, effective_path = created, "created"
            for key in ("ended_at", "canceled_at"):
                value = _opt_time(obj, key, _OBJECT)
                if value is not None:
                    effective, effective_path = value, f"{_OBJECT}.{key}"
                    break
            data["effective_at"], paths["effective_at"] = effective, effective_path

    paths |= {"id": "id", "time": "created", "subject": account_path}
    try:
        mapped = model.model_validate(
            {
                "id": event_id,
                "source": STRIPE_SOURCE,
                "time": created,
                "subject": account,
                "data": {k: v for k, v in data.items() if v is not None},
            }
        )
    except ValidationError as exc:
        raise _from_validation(exc, paths) from None
    assert isinstance(mapped, BillingEventModel)
    return MappedEvent(mapped, stripe_type)


def _expect_object(obj: Mapping[str, Any], kind: str) -> None:
    actual = obj.get("object")
    if actual is not None and actual != kind:
        raise _fail(f"{_OBJECT}.object", f"expected {kind!r}, got {actual!r:.60}")


def _from_validation(exc: ValidationError, paths: Mapping[str, str]) -> MappingError:
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        if loc[:1] == ["data"] and len(loc) > 1:
            path = paths.get(loc[1], ".".join(loc))
        else:
            path = paths.get(loc[0], ".".join(loc)) if loc else "event"
        problems.append(f"{path}: {error['msg']} (churnguard field {'.'.join(loc)})")
    return MappingError("; ".join(problems))


__all__ = [
    "DEFAULT_TOLERANCE_S",
    "HANDLED_TYPES",
    "STRIPE_SOURCE",
    "UNKNOWN_DECLINE_CODE",
    "BillingEventModel",
    "MappedEvent",
    "MappingError",
    "SignatureError",
    "Unhandled",
    "map_event",
    "verify_signature",
]
