"""The dev stack's local mailbox: where the demo's emails, Slack messages and charges land.

One process runs an SMTP catch-all (``CHURNGUARD_DEV_SMTP_PORT``, 1025) and one HTTP
server (``CHURNGUARD_DEV_MAILBOX_PORT``, 8025) with:

* ``/`` a page a person reads: every email (headers, text part, a link to the HTML part),
  every Slack message (rendered from its Block Kit) and every charge, newest first;
* ``/slack/api/…`` and ``/slack/hooks/…`` a Slack stand-in (any channel exists);
* ``/stripe/v1/…`` a Stripe stand-in (every invoice pays, except ids ending ``_decline``);
* ``/readyz`` for the supervisor.

Everything received is also kept under ``<home>/mailbox/`` (``emails/*.eml``,
``slack.jsonl``, ``stripe.jsonl``). Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import logging
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from churnguard.devstack.standins import SlackStandIn, SmtpSink, StripeStandIn

log = logging.getLogger("churnguard.dev.mailbox")

SLACK_TOKEN = "xoxb-dev-mailbox"
STRIPE_KEY = "sk_test_dev_mailbox"

PAGE = """<!doctype html><html lang=en><head><meta charset=utf-8>
<meta http-equiv=refresh content=5><title>churnguard mailbox</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#1f2328}}
section{{border:1px solid #d0d7de;border-radius:6px;padding:1em;margin:1em 0}}
h2{{margin-top:2em}} .meta{{color:#656d76;font-size:.85em}} pre{{white-space:pre-wrap}}
.fields{{display:grid;grid-template-columns:repeat(2,1fr);gap:.5em}}</style></head><body>
<h1>churnguard mailbox</h1>
<p class=meta>What the demo sent: {emails} emails, {slack} Slack messages, {charges} charges.
Kept under {folder}. This page refreshes every 5 s.</p>
<h2>Slack</h2>{slack_html}<h2>Email</h2>{email_html}<h2>Charges</h2>{charge_html}
</body></html>"""


EMOJI = {
    ":red_circle:": "\U0001f534",
    ":large_orange_circle:": "\U0001f7e0",
    ":large_yellow_circle:": "\U0001f7e1",
    ":large_green_circle:": "\U0001f7e2",
    ":rotating_light:": "\U0001f6a8",
}


def _mrkdwn(text: str) -> str:
    # enough of Slack's mrkdwn to read a message: *bold*, _italic_, `code`, emoji
    for code, emoji in EMOJI.items():
        text = text.replace(code, emoji)
    out = html.escape(text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    for mark, tag in (("*", "b"), ("_", "i"), ("`", "code")):
        parts = out.split(mark)
        if len(parts) >= 3:
            out = "".join(
                p if i % 2 == 0 or i == len(parts) - 1 else f"<{tag}>{p}</{tag}>"
                for i, p in enumerate(parts)
            )
    return out.replace("\n", "<br>")


def render_blocks(blocks: list[dict[str, Any]] | None, fallback: str | None) -> str:
    if not blocks:
        return f"<p>{html.escape(fallback or '')}</p>"
    out = []
    for block in blocks:
        kind = block.get("type")
        if kind == "header":
            out.append(f"<h3>{html.escape(block['text']['text'])}</h3>")
        elif kind == "section":
            if "text" in block:
                out.append(f"<p>{_mrkdwn(block['text']['text'])}</p>")
            if block.get("fields"):
                cells = "".join(f"<div>{_mrkdwn(f['text'])}</div>" for f in block["fields"])
                out.append(f"<div class=fields>{cells}</div>")
        elif kind == "actions":
            for el in block.get("elements", []):
                if el.get("url"):
                    label = html.escape(el["text"]["text"])
                    out.append(f"<p><a href='{html.escape(el['url'])}'>{label}</a></p>")
        elif kind == "context":
            texts = " ".join(_mrkdwn(e.get("text", "")) for e in block.get("elements", []))
            out.append(f"<p class=meta>{texts}</p>")
        elif kind == "divider":
            out.append("<hr>")
    return "".join(out)


class Mailbox:
    def __init__(self, folder: Path, http_port: int, smtp_port: int) -> None:
        self.folder = folder
        self.http_port = http_port
        self.smtp_port = smtp_port
        self.slack = SlackStandIn(token=SLACK_TOKEN, channels={}, folder=folder, any_channel=True)
        self.stripe = StripeStandIn(api_key=STRIPE_KEY, folder=folder, decline_suffix="_decline")
        self.smtp = SmtpSink(smtp_port, folder=folder)
        self.app = web.Application()
        self.app.router.add_get("/", self.page)
        self.app.router.add_get("/readyz", self.ready)
        self.app.router.add_get("/emails/{index}.html", self.email_html)
        self.app.add_subapp("/slack/", self.slack.app)
        self.app.add_subapp("/stripe/", self.stripe.app)

    async def ready(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    async def email_html(self, request: web.Request) -> web.Response:
        index = int(request.match_info["index"])
        if not 0 <= index < len(self.smtp.messages):
            raise web.HTTPNotFound()
        part = self.smtp.messages[index].get_body(preferencelist=("html",))
        body = part.get_content() if part is not None else "(no HTML part)"
        return web.Response(text=str(body), content_type="text/html")

    async def page(self, request: web.Request) -> web.Response:
        slack_html = (
            "".join(
                f"<section><div class=meta>"
                f"#{html.escape(self.slack.channels.get(m['channel'], m['channel']))} · "
                f"{datetime.fromtimestamp(m['received_at'], UTC):%Y-%m-%d %H:%M:%S} UTC · "
                f"via {m['via']}</div>{render_blocks(m.get('blocks'), m.get('text'))}</section>"
                for m in reversed(self.slack.messages)
            )
            or "<p class=meta>none yet</p>"
        )
        emails = []
        for index in range(len(self.smtp.messages) - 1, -1, -1):
            msg = self.smtp.messages[index]
            text_part = msg.get_body(preferencelist=("plain",))
            text = text_part.get_content() if text_part is not None else ""
            headers = "".join(
                f"{html.escape(k)}: {html.escape(str(v))}<br>"
                for k, v in msg.items()
                if k
                in (
                    "From",
                    "To",
                    "Date",
                    "Message-ID",
                    "List-Unsubscribe",
                    "List-Unsubscribe-Post",
                    "X-Churnguard-Action-Id",
                )
            )
            emails.append(
                f"<section><h3>{html.escape(str(msg['Subject']))}</h3>"
                f"<div class=meta>{headers}<a href='/emails/{index}.html'>HTML part</a></div>"
                f"<pre>{html.escape(str(text))}</pre></section>"
            )
        charges = "".join(
            f"<li>{html.escape(invoice)}: "
            + (
                f"declined ({html.escape(self.stripe.declines[invoice])})"
                if invoice in self.stripe.declines
                else "paid"
            )
            + (f", {n} charges" if n > 1 else "")
            + "</li>"
            for invoice, n in self.stripe.invoice_charges.items()
        )
        return web.Response(
            text=PAGE.format(
                emails=len(self.smtp.messages),
                slack=len(self.slack.messages),
                charges=sum(self.stripe.invoice_charges.values()),
                folder=html.escape(str(self.folder)),
                slack_html=slack_html,
                email_html="".join(emails) or "<p class=meta>none yet</p>",
                charge_html=f"<ul>{charges}</ul>" if charges else "<p class=meta>none yet</p>",
            ),
            content_type="text/html",
        )

    async def run(self) -> None:
        self.smtp.start()
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.http_port).start()
        log.info("mailbox on http://127.0.0.1:%d, SMTP on %d", self.http_port, self.smtp_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            self.smtp.stop()
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m churnguard.devstack.mailbox")
    parser.add_argument("--home", type=Path, default=Path(".dev"))
    parser.add_argument("--http-port", type=int, default=8025)
    parser.add_argument("--smtp-port", type=int, default=1025)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(Mailbox(args.home / "mailbox", args.http_port, args.smtp_port).run())


if __name__ == "__main__":
    main()
