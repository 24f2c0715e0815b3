"""The signed-webhook payment adapter against a real HTTP receiver that checks the
signature and answers as a billing system would."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from churnguard.devstack.standins import ServerThread
from churnguard.notify.channels.base import PermanentError
from churnguard.notify.channels.payments import WebhookPaymentAdapter
from tests.notify.conftest import WEBHOOK_SECRET, WebhookReceiver, payment_retry


@pytest.fixture
def receiver() -> Iterator[tuple[WebhookReceiver, str]]:
    hooks = WebhookReceiver()
    server = ServerThread(hooks.app).start()
    yield hooks, server.url
    server.stop()


async def test_charge_succeeds_or_declines_with_the_code(
    receiver: tuple[WebhookReceiver, str],
) -> None:
    hooks, url = receiver
    adapter = WebhookPaymentAdapter(f"{url}/billing", WEBHOOK_SECRET, timeout_s=5)
    paid = payment_retry("in_ok_7", scheduled_for=datetime.now(UTC))
    declined = payment_retry("in_decline_7")
    try:
        ok = await adapter.pay(paid)
        no = await adapter.pay(declined)
    finally:
        await adapter.close()
    assert ok.status == "payment_succeeded"
    assert no.status == "payment_failed"
    assert no.decline_code == "expired_card"
    assert hooks.bad_signatures == 0
    assert [r["key"] for r in hooks.received] == [paid.id, declined.id]
    body = hooks.received[0]["payload"]
    assert body["type"] == "churnguard.payment_retry"
    assert body["invoice_id"] == "in_ok_7"
    assert body["amount"] == 4900


async def test_a_wrong_secret_is_refused_by_the_receiver(
    receiver: tuple[WebhookReceiver, str],
) -> None:
    hooks, url = receiver
    adapter = WebhookPaymentAdapter(f"{url}/billing", "not-the-secret", timeout_s=5)
    try:
        with pytest.raises(PermanentError, match="unexpected answer 400"):
            await adapter.pay(payment_retry("in_ok_8"))
    finally:
        await adapter.close()
    assert hooks.bad_signatures == 1
