"""The dev stack's local mailbox shows a person what the demo sent: emails (headers, text,
HTML part), Slack messages rendered from their blocks, and charges."""

from __future__ import annotations

import asyncio
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import httpx

from churnguard.devstack.mailbox import SLACK_TOKEN, STRIPE_KEY, Mailbox
from churnguard.devstack.process import free_port


async def test_mailbox_keeps_and_shows_emails_slack_messages_and_charges(tmp_path: Path) -> None:
    http_port, smtp_port = free_port(), free_port()
    mailbox = Mailbox(tmp_path / "mailbox", http_port, smtp_port)
    running = asyncio.create_task(mailbox.run())
    base = f"http://127.0.0.1:{http_port}"
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            for _ in range(100):
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            message = EmailMessage()
            message["From"] = "success@acme.test"
            message["To"] = "sam@acme.test"
            message["Subject"] = "Your payment did not go through"
            message.set_content("Update your card.")
            message.add_alternative("<p>Update your <b>card</b>.</p>", subtype="html")
            await aiosmtplib.send(message, hostname="127.0.0.1", port=smtp_port)
            posted = await client.post(
                "/slack/api/chat.postMessage",
                headers={"Authorization": f"Bearer {SLACK_TOKEN}"},
                json={
                    "channel": "#cs-alerts",
                    "text": "Acme is at risk",
                    "blocks": [
                        {"type": "header", "text": {"type": "plain_text", "text": "Acme at risk"}}
                    ],
                },
            )
            assert posted.json()["ok"] is True
            paid = await client.post(
                "/stripe/v1/invoices/in_1/pay",
                headers={"Authorization": f"Bearer {STRIPE_KEY}", "Idempotency-Key": "k1"},
            )
            assert paid.json()["status"] == "paid"
            page = (await client.get("/")).text
            html_part = (await client.get("/emails/0.html")).text
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert "Your payment did not go through" in page
    assert "Update your card." in page
    assert "<h3>Acme at risk</h3>" in page
    assert "#cs-alerts" in page
    assert "in_1: paid" in page
    assert "<b>card</b>" in html_part
    assert len(list((tmp_path / "mailbox" / "emails").glob("*.eml"))) == 1
    assert (tmp_path / "mailbox" / "slack.jsonl").read_text().count("\n") == 1
