"""Revenue movements: one account's MRR ledger, fed with its billing events (pure, no I/O).

The scoring worker keeps one :class:`RevenueLedger` per account in its state and calls
:meth:`RevenueLedger.apply` with each billing CloudEvent of the account, as a plain dict
(what :func:`churnguard.common.envelope.unpack` returns). ``apply`` answers with the
:class:`~churnguard.common.events.derived.RevenueMovement` events the billing event causes,
as JSON-able dicts ready for ``revenue.movements``: none for most events, one at most.

Rules (services/scoring/README.md, "Revenue movements", says the same for users):

* **MRR** of the account is the sum over its subscriptions of each one's ``data.mrr`` (already
  normalised to a month, integer minor units) while its status is ``active`` or
  ``past_due``; a subscription that is ``trialing``, ``incomplete``, ``unpaid``, ``paused``
  or cancelled counts 0. The ledger takes each subscription's MRR from the event's own
  state (``data.mrr`` and ``data.status``), never from deltas, so a repeated or reordered
  update cannot add up wrongly.
* **Kinds**, at account level, from the account's MRR before and after the event: ``new``
  when it rises from 0 for the first time ever, ``reactivation`` when it rises from 0 again
  after having been above 0, ``expansion`` / ``contraction`` when it rises / falls and
  stays above 0, ``churn`` when it falls to 0 (with the cancellation's ``voluntary`` or
  ``involuntary``; ``involuntary`` also when a subscription goes ``unpaid``). A second
  subscription (an add-on) is an expansion; ending it while another remains, a
  contraction.
* **Time** of a movement is when it takes effect: the billing event's ``time`` for
  creations and updates (changes apply at once, prorated), and ``data.effective_at`` for
  cancellations. A cancellation at period end is booked when it is made (the billing
  system sends nothing more when it takes effect: see
  :mod:`churnguard.ingest.stripe_webhooks`), dated at the period end. The account's MRR
  at a moment is therefore the sum of the deltas of the movements dated up to it.
  Movements chain in the order they are booked (each one's ``mrr_before`` is the previous
  one's ``mrr_after``), and kinds follow that order: a subscription started while the
  account's only other one is booked to end later is a ``reactivation``, though both run
  for a while. A later change of a subscription whose cancellation is booked is ignored
  (the billing events do not say whether the cancellation was revoked).
* **Currency**: an account has one currency at a time (Stripe bills a customer in one).
  A subscription in another currency while the account has MRR in its currency raises
  :class:`CurrencyMismatch` (the worker dead-letters the event) and changes nothing.

Idempotency and order, two layers:

* the ids of the last :data:`RECENT_EVENT_IDS` subscription events are kept: an event seen
  again (a redelivery after a crash, a webhook retry) yields nothing;
* each subscription keeps the ``time`` of the event its state came from: an older event
  for it (out of order, or a duplicate older than the id window) is stale and yields
  nothing; a creation of a subscription already known and any event of a subscription
  whose cancellation is booked are ignored too. Ties in ``time`` apply in arrival order,
  which is the billing system's order on one partition.

A movement's CloudEvent ``id`` is derived from the causing event's id and the kind
(:func:`movement_id`), so processing the same event from the same state after a crash
yields the same ids, which ``revenue.movements`` consumers dedupe on. Hence the worker's
order: produce the movements, then save the state, then commit the offset. A crash
before the state is saved replays the event from the old state (same movements, same
ids); after it, the event is a duplicate and yields nothing, its movements already sent.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final

import orjson
from pydantic import Field, TypeAdapter

from churnguard.common.events.billing import (
    Cancellation,
    SubscriptionCancelled,
    SubscriptionCreated,
    SubscriptionUpdated,
)
from churnguard.common.events.derived import (
    RevenueMovement,
    RevenueMovementData,
    RevenueMovementKind,
)

MOVEMENT_SOURCE: Final = "/scoring"
"""CloudEvent ``source`` of every movement."""
RECENT_EVENT_IDS: Final = 8
"""Subscription event ids remembered per account for deduplication. Redeliveries come
from the records read since the last commit, in which one account rarely has more than
one or two subscription events; anything older is caught by the per-subscription times."""
COUNTED_STATUSES: Final = frozenset({"active", "past_due"})
"""Subscription statuses whose MRR counts (trials, unpaid and ended subscriptions do not)."""
STATE_VERSION: Final = 1

_SUBSCRIPTION_TYPES: Final = frozenset(
    {
        "churnguard.billing.subscription_created",
        "churnguard.billing.subscription_updated",
        "churnguard.billing.subscription_cancelled",
    }
)
_MAX_ID = 128  # EventId's limit
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

SubscriptionEvent = SubscriptionCreated | SubscriptionUpdated | SubscriptionCancelled
_SUBSCRIPTION_EVENT: TypeAdapter[SubscriptionEvent] = TypeAdapter(
    Annotated[SubscriptionEvent, Field(discriminator="type")]
)


class CurrencyMismatch(ValueError):
    """A subscription's currency differs from the currency the account's MRR is in."""


def movement_id(event_id: str, kind: RevenueMovementKind) -> str:
    """The id of the movement of ``kind`` caused by the event ``event_id``.

    ``mrr_<event id>_<kind>``, readable and traceable to its billing event; when that
    would exceed the 128 characters of an event id, ``mrr_<sha256(event id)>_<kind>``.
    """
    readable = f"mrr_{event_id}_{kind}"
    if len(readable) <= _MAX_ID:
        return readable
    return f"mrr_{hashlib.sha256(event_id.encode()).hexdigest()}_{kind}"


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


@dataclass(slots=True)
class _Subscription:
    mrr: int
    """What it adds to the account's MRR now (0 while not counted)."""
    as_of: int
    """``time`` of the event its state comes from, µs since the epoch."""
    ended: bool
    """Its cancellation is booked; nothing changes it any more."""


class RevenueLedger:
    """One account's subscriptions and MRR; turns its billing events into MRR movements.

    See the module docstring for the rules. State is a few dozen bytes per subscription
    plus the recent event ids: :meth:`to_state` / :meth:`from_state` (a JSON-able dict)
    and :meth:`to_bytes` / :meth:`from_bytes` round-trip it exactly. :meth:`apply` either
    returns its movements and updates the state, or raises and changes nothing.
    """

    __slots__ = ("_recent", "_subscriptions", "account_id", "currency", "had_mrr")

    def __init__(self, account_id: str) -> None:
        self.account_id = account_id
        self.currency: str | None = None
        """The currency of the account's MRR (the last one it had, once it is 0 again)."""
        self.had_mrr = False
        """The account's MRR has been above 0: a rise from 0 is then a reactivation."""
        self._subscriptions: dict[str, _Subscription] = {}
        self._recent: deque[str] = deque(maxlen=RECENT_EVENT_IDS)

    @property
    def mrr(self) -> int:
        """The account's booked MRR: scheduled cancellations are already taken off."""
        return sum(s.mrr for s in self._subscriptions.values())

    def subscription_mrr(self) -> dict[str, int]:
        """What each known subscription adds to the MRR (0 when not counted or ended)."""
        return {sid: s.mrr for sid, s in self._subscriptions.items()}

    def apply(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Book one billing CloudEvent of this account; return the movements it causes.

        Only subscription events can move MRR; invoice and refund events, and any other
        type, return ``[]``. A malformed subscription event raises pydantic's
        ``ValidationError``, an event of another account ``ValueError``, a currency
        clash :class:`CurrencyMismatch`; the state is then unchanged.
        """
        if event.get("type") not in _SUBSCRIPTION_TYPES or event.get("id") in self._recent:
            return []
        parsed = _SUBSCRIPTION_EVENT.validate_python(event)
        if parsed.subject != self.account_id:
            raise ValueError(
                f"event {parsed.id} is for account {parsed.subject}, not {self.account_id}"
            )
        data = parsed.data
        at = _micros(parsed.time)
        known = self._subscriptions.get(data.subscription_id)
        if known is not None and (
            known.ended or at < known.as_of or isinstance(parsed, SubscriptionCreated)
        ):
            self._recent.append(parsed.id)  # stale or repeated: nothing to book
            return []

        cancellation: Cancellation | None = None
        if isinstance(parsed, SubscriptionCancelled):
            mrr, ended, effective = 0, True, parsed.data.effective_at
            cancellation = parsed.data.cancellation
        else:
            mrr = data.mrr if data.status in COUNTED_STATUSES else 0
            ended, effective = False, parsed.time
            if data.status == "unpaid":
                cancellation = "involuntary"
        previous = known.mrr if known is not None else 0
        before = self.mrr
        others = before - previous
        after = others + mrr
        currency = self.currency
        if mrr > 0:
            if others > 0 and data.currency != self.currency:
                raise CurrencyMismatch(
                    f"subscription {data.subscription_id} is in {data.currency}, the MRR of "
                    f"account {self.account_id} in {self.currency}"
                )
            currency = data.currency

        self._subscriptions[data.subscription_id] = _Subscription(mrr, at, ended)
        self._recent.append(parsed.id)
        self.currency = currency
        if after == before:
            return []
        kind = _kind(before, after, self.had_mrr)
        self.had_mrr = self.had_mrr or after > 0
        movement = RevenueMovement(
            id=movement_id(parsed.id, kind),
            source=MOVEMENT_SOURCE,
            time=effective,
            subject=self.account_id,
            data=RevenueMovementData(
                kind=kind,
                mrr_before=before,
                mrr_after=after,
                delta=after - before,
                currency=currency or data.currency,
                cancellation=cancellation if kind == "churn" else None,
                subscription_id=data.subscription_id,
            ),
        )
        return [movement.model_dump(mode="json", by_alias=True, exclude_none=True)]

    # -- state ----------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """The ledger as a JSON-able dict (for a Faust table or a changelog)."""
        return {
            "v": STATE_VERSION,
            "account": self.account_id,
            "currency": self.currency,
            "had_mrr": self.had_mrr,
            "subs": {sid: [s.mrr, s.as_of, s.ended] for sid, s in self._subscriptions.items()},
            "recent": list(self._recent),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RevenueLedger:
        """The ledger :meth:`to_state` described."""
        if state.get("v") != STATE_VERSION:
            raise ValueError(f"unknown revenue ledger state version {state.get('v')!r}")
        ledger = cls(str(state["account"]))
        ledger.currency = state["currency"]
        ledger.had_mrr = bool(state["had_mrr"])
        ledger._subscriptions = {
            str(sid): _Subscription(int(mrr), int(as_of), bool(ended))
            for sid, (mrr, as_of, ended) in state["subs"].items()
        }
        ledger._recent.extend(str(i) for i in state["recent"])
        return ledger

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.to_state())

    @classmethod
    def from_bytes(cls, raw: bytes) -> RevenueLedger:
        state = orjson.loads(raw)
        if not isinstance(state, dict):
            raise ValueError("a revenue ledger state is a JSON object")
        return cls.from_state(state)


def _kind(before: int, after: int, had_mrr: bool) -> RevenueMovementKind:
    if before == 0:
        return "reactivation" if had_mrr else "new"
    if after == 0:
        return "churn"
    return "expansion" if after > before else "contraction"


__all__ = [
    "COUNTED_STATUSES",
    "MOVEMENT_SOURCE",
    "RECENT_EVENT_IDS",
    "CurrencyMismatch",
    "RevenueLedger",
    "movement_id",
]
