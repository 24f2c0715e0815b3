"""Local servers that speak Slack's, SMTP's and Stripe's protocols, for tests and the demo.

Each keeps what it received (in memory, and under a folder when given one), can be told
to fail the next calls the way the real service does (429 with ``Retry-After``, 5xx,
SMTP 4xx/5xx, Stripe's documented error bodies), and counts what a person would count:
messages in a channel, emails in a mailbox, charges per idempotency key.

* :class:`SlackStandIn`: ``POST /api/chat.postMessage`` and ``/api/conversations.history``
  (bot token), ``POST /hooks/<channel>`` (incoming webhooks). Block Kit payloads are
  checked against Slack's documented limits (:func:`block_kit_problems`) and refused with
  ``invalid_blocks`` as Slack does.
* :class:`SmtpSink`: an aiosmtpd server (optional AUTH, optional STARTTLS) that keeps
  every message and refuses addresses at ``bounce.invalid`` with 550.
* :class:`StripeStandIn`: ``POST /v1/invoices/{id}/pay`` with Stripe's idempotency
  (a repeated ``Idempotency-Key`` replays the first answer with ``Idempotent-Replayed``),
  402 ``card_error`` with ``decline_code``, 404 ``resource_missing``, 429, 500.

:class:`ServerThread` runs an aiohttp application on its own event loop in a thread, so
a test that blocks (waiting for a process to start) does not stall the servers.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import itertools
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiohttp import web

# -- Block Kit ------------------------------------------------------------------------------

BLOCK_TYPES = frozenset(
    {
        "section",
        "header",
        "divider",
        "context",
        "actions",
        "image",
        "rich_text",
        "input",
        "file",
        "video",
        "markdown",
    }
)
MAX_BLOCKS = 50


def _text_problems(obj: Any, where: str, limit: int, *, plain_only: bool = False) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where}: must be a text object"]
    problems = []
    kind = obj.get("type")
    if kind not in ("plain_text", "mrkdwn") or (plain_only and kind != "plain_text"):
        problems.append(
            f"{where}.type: {kind!r} (expected "
            f"{'plain_text' if plain_only else 'plain_text or mrkdwn'})"
        )
    text = obj.get("text")
    if not isinstance(text, str) or not text:
        problems.append(f"{where}.text: must be a non-empty string")
    elif len(text) > limit:
        problems.append(f"{where}.text: {len(text)} characters, at most {limit}")
    if "emoji" in obj and kind != "plain_text":
        problems.append(f"{where}.emoji: only for plain_text")
    if "verbatim" in obj and kind != "mrkdwn":
        problems.append(f"{where}.verbatim: only for mrkdwn")
    extra = set(obj) - {"type", "text", "emoji", "verbatim"}
    if extra:
        problems.append(f"{where}: unknown fields {sorted(extra)}")
    return problems


def _element_problems(el: Any, where: str) -> list[str]:
    if not isinstance(el, dict):
        return [f"{where}: must be an object"]
    if el.get("type") != "button":
        return []  # other interactive elements are not used by churnguard
    problems = _text_problems(el.get("text"), f"{where}.text", 75, plain_only=True)
    for key, limit in (("action_id", 255), ("url", 3000), ("value", 2000)):
        if key in el and (not isinstance(el[key], str) or len(el[key]) > limit):
            problems.append(f"{where}.{key}: a string of at most {limit} characters")
    if "style" in el and el["style"] not in ("primary", "danger"):
        problems.append(f"{where}.style: {el['style']!r} (primary or danger)")
    return problems


def block_kit_problems(blocks: Any) -> list[str]:
    """Everything that breaks Slack's documented Block Kit rules (empty list: valid).

    Limits from api.slack.com/reference/block-kit/blocks: at most 50 blocks per message;
    ``block_id`` at most 255 characters and unique; header: plain_text, 150 characters;
    section: text (3000) and/or up to 10 fields (2000 each); context: 1-10 elements;
    actions: 1-25 elements; button text plain_text of 75 characters.
    """
    if not isinstance(blocks, list):
        return ["blocks: must be an array"]
    problems: list[str] = []
    if len(blocks) > MAX_BLOCKS:
        problems.append(f"blocks: {len(blocks)} blocks, at most {MAX_BLOCKS}")
    ids: set[str] = set()
    for i, block in enumerate(blocks):
        where = f"blocks[{i}]"
        if not isinstance(block, dict):
            problems.append(f"{where}: must be an object")
            continue
        kind = block.get("type")
        if kind not in BLOCK_TYPES:
            problems.append(f"{where}.type: unknown block type {kind!r}")
            continue
        block_id = block.get("block_id")
        if block_id is not None:
            if not isinstance(block_id, str) or len(block_id) > 255:
                problems.append(f"{where}.block_id: a string of at most 255 characters")
            elif block_id in ids:
                problems.append(f"{where}.block_id: {block_id!r} repeated")
            else:
                ids.add(block_id)
        if kind == "header":
            problems += _text_problems(block.get("text"), f"{where}.text", 150, plain_only=True)
        elif kind == "section":
            if "text" not in block and "fields" not in block:
                problems.append(f"{where}: a section needs text or fields")
            if "text" in block:
                problems += _text_problems(block["text"], f"{where}.text", 3000)
            fields = block.get("fields", [])
            if not isinstance(fields, list) or len(fields) > 10:
                problems.append(f"{where}.fields: an array of at most 10")
            else:
                for j, f in enumerate(fields):
                    problems += _text_problems(f, f"{where}.fields[{j}]", 2000)
        elif kind == "context":
            elements = block.get("elements")
            if not isinstance(elements, list) or not 1 <= len(elements) <= 10:
                problems.append(f"{where}.elements: 1 to 10 elements")
            else:
                for j, el in enumerate(elements):
                    if isinstance(el, dict) and el.get("type") == "image":
                        continue
                    problems += _text_problems(el, f"{where}.elements[{j}]", 3000)
        elif kind == "actions":
            elements = block.get("elements")
            if not isinstance(elements, list) or not 1 <= len(elements) <= 25:
                problems.append(f"{where}.elements: 1 to 25 elements")
            else:
                for j, el in enumerate(elements):
                    problems += _element_problems(el, f"{where}.elements[{j}]")
        elif kind == "divider" and set(block) - {"type", "block_id"}:
            problems.append(f"{where}: a divider has no fields but type and block_id")
    return problems


# -- running aiohttp apps -------------------------------------------------------------------


class ServerThread:
    """An aiohttp application on 127.0.0.1, on its own event loop in a daemon thread."""

    def __init__(self, app: web.Application, port: int = 0, host: str = "127.0.0.1") -> None:
        self.app = app
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="standin")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._runner = web.AppRunner(self.app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port)
            await site.start()
            self.port = int(self._runner.addresses[0][1])
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("stand-in server did not start")
        return self

    def stop(self) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


@dataclass
class ScriptedFailure:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


def _append_jsonl(path: Path | None, record: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")


# -- Slack ----------------------------------------------------------------------------------


class SlackStandIn:
    """Slack's Web API (the two methods notify uses) and incoming webhooks."""

    def __init__(
        self,
        token: str = "xoxb-test-token",
        channels: dict[str, str] | None = None,
        folder: Path | None = None,
        any_channel: bool = False,
    ) -> None:
        self.token = token
        self.any_channel = any_channel
        """Every channel exists (the dev mailbox); otherwise unknown ones are not found."""
        # channel id -> name; names (#name) resolve to their id, like Slack does for posting
        self.channels = channels if channels is not None else {"C0CSALERTS": "cs-alerts"}
        self.log = folder / "slack.jsonl" if folder else None
        self.messages: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        """Every request as received (also the refused ones), with its arrival time."""
        self._failures: list[ScriptedFailure] = []
        self._drops = 0
        self._delays: list[float] = []
        self._ts = itertools.count(1)
        self.app = web.Application()
        self.app.router.add_post("/api/chat.postMessage", self._post_message)
        self.app.router.add_post("/api/conversations.history", self._history)
        self.app.router.add_get("/api/conversations.history", self._history)
        self.app.router.add_post("/hooks/{channel}", self._webhook)

    def fail_next(self, times: int = 1, *, status: int = 429, retry_after: int = 1) -> None:
        body = {"ok": False, "error": "ratelimited" if status == 429 else "internal_error"}
        headers = {"Retry-After": str(retry_after)} if status == 429 else {}
        self._failures += [ScriptedFailure(status, body, headers)] * times

    def slow_next(self, seconds: float, times: int = 1) -> None:
        """Answer the next posts only after ``seconds`` (a slow Slack)."""
        self._delays += [seconds] * times

    def drop_after_posting_next(self, times: int = 1) -> None:
        """Post the next messages, then drop the connection before answering: the
        sender cannot know whether the message went out (a timeout after Slack took it)."""
        self._drops += times

    def in_channel(self, channel: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["channel"] == self._channel_id(channel)]

    def _channel_id(self, channel: str) -> str | None:
        if channel in self.channels:
            return channel
        name = channel.lstrip("#")
        for cid, cname in self.channels.items():
            if cname == name:
                return cid
        if channel.startswith(("U", "W")):  # a DM to a user opens a D channel
            return "D" + channel[1:]
        if self.any_channel and channel:
            self.channels["C" + name.upper().replace("-", "")[:10]] = name
            return self._channel_id(channel)
        return None

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if request.content_type == "application/json":
            data = await request.json()
            return data if isinstance(data, dict) else {}
        form = await request.post()
        out: dict[str, Any] = dict(form)
        for key in ("blocks", "metadata"):
            if isinstance(out.get(key), str):
                out[key] = json.loads(out[key])
        return out

    def _next_failure(self) -> ScriptedFailure | None:
        return self._failures.pop(0) if self._failures else None

    def _store(self, channel_id: str, body: dict[str, Any], via: str) -> dict[str, Any]:
        message = {
            "channel": channel_id,
            "ts": f"{time.time():.0f}.{next(self._ts):06d}",
            "text": body.get("text"),
            "blocks": body.get("blocks"),
            "metadata": body.get("metadata"),
            "via": via,
            "received_at": time.time(),
        }
        self.messages.append(message)
        _append_jsonl(self.log, message)
        return message

    async def _post_message(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self.requests.append({"at": time.monotonic(), "path": request.path, "body": body})
        if self._delays:
            await asyncio.sleep(self._delays.pop(0))
        if (failure := self._next_failure()) is not None:
            return web.json_response(failure.body, status=failure.status, headers=failure.headers)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"ok": False, "error": "invalid_auth"})
        channel_id = self._channel_id(str(body.get("channel", "")))
        if channel_id is None:
            return web.json_response({"ok": False, "error": "channel_not_found"})
        if not body.get("text") and not body.get("blocks"):
            return web.json_response({"ok": False, "error": "no_text"})
        if "blocks" in body and (problems := block_kit_problems(body["blocks"])):
            return web.json_response({"ok": False, "error": "invalid_blocks", "errors": problems})
        message = self._store(channel_id, body, "chat.postMessage")
        if self._drops:
            self._drops -= 1
            if request.transport is not None:
                request.transport.close()
            raise web.HTTPServiceUnavailable()  # never reaches the client: the socket is gone
        return web.json_response(
            {"ok": True, "channel": channel_id, "ts": message["ts"], "message": message}
        )

    async def _history(self, request: web.Request) -> web.Response:
        body = dict(request.query) if request.method == "GET" else await self._body(request)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"ok": False, "error": "invalid_auth"})
        channel = str(body.get("channel", ""))
        if self._channel_id(channel) is None and not channel.startswith("D"):
            return web.json_response({"ok": False, "error": "channel_not_found"})
        oldest = float(body.get("oldest") or 0)
        found = [m for m in self.messages if m["channel"] == channel and float(m["ts"]) >= oldest]
        return web.json_response({"ok": True, "messages": list(reversed(found)), "has_more": False})

    async def _webhook(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self.requests.append({"at": time.monotonic(), "path": request.path, "body": body})
        if (failure := self._next_failure()) is not None:
            return web.Response(
                text=failure.body["error"], status=failure.status, headers=failure.headers
            )
        channel_id = self._channel_id(request.match_info["channel"])
        if channel_id is None:
            return web.Response(text="channel_not_found", status=404)
        if "blocks" in body and block_kit_problems(body["blocks"]):
            return web.Response(text="invalid_blocks", status=400)
        self._store(channel_id, body, "webhook")
        return web.Response(text="ok")


# -- SMTP -----------------------------------------------------------------------------------


class SmtpSink:
    """An SMTP server that keeps every message; ``bounce.invalid`` addresses get 550.

    ``fail_next(n, code=451)`` answers the next n RCPT commands with a temporary failure.
    """

    BOUNCE_DOMAIN = "bounce.invalid"

    def __init__(
        self,
        port: int = 0,
        *,
        folder: Path | None = None,
        username: str | None = None,
        password: str | None = None,
        tls_context: Any = None,
        implicit_tls_context: Any = None,
    ) -> None:
        """``tls_context``: offer (and require) STARTTLS; ``implicit_tls_context``: TLS from
        the first byte (port 465 style)."""
        from aiosmtpd.controller import Controller

        self.folder = folder / "emails" if folder else None
        self.messages: list[EmailMessage] = []
        self.encrypted: list[bool] = []
        """Per message: whether its session ran over TLS."""
        self._failures: list[int] = []
        self.username = username
        self.password = password
        sink = self

        class Handler:
            async def handle_RCPT(
                self, server: Any, session: Any, envelope: Any, address: str, options: Any
            ) -> str:
                if sink._failures:
                    code = sink._failures.pop(0)
                    return f"{code} 4.3.0 try again later"
                if address.lower().endswith("@" + SmtpSink.BOUNCE_DOMAIN):
                    return "550 5.1.1 no such user"
                envelope.rcpt_tos.append(address)
                return "250 OK"

            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                message = email.message_from_bytes(envelope.content, policy=email.policy.default)
                assert isinstance(message, EmailMessage)
                sink.messages.append(message)
                transport = getattr(server, "transport", None)
                ssl_object = transport.get_extra_info("ssl_object") if transport else None
                sink.encrypted.append(session.ssl is not None or ssl_object is not None)
                if sink.folder is not None:
                    sink.folder.mkdir(parents=True, exist_ok=True)
                    name = f"{time.time():.6f}-{len(sink.messages)}.eml"
                    (sink.folder / name).write_bytes(envelope.content)
                return "250 2.0.0 queued as " + str(len(sink.messages))

        def authenticate(
            server: Any, session: Any, envelope: Any, mechanism: str, auth: Any
        ) -> Any:
            from aiosmtpd.smtp import AuthResult

            ok = auth.login.decode() == self.username and auth.password.decode() == self.password
            return AuthResult(success=ok)

        kwargs: dict[str, Any] = {}
        self.tls = tls_context is not None or implicit_tls_context is not None
        if username is not None:
            kwargs.update(
                authenticator=authenticate,
                auth_required=True,
                # aiosmtpd only counts STARTTLS as TLS; an implicit-TLS socket is one anyway
                auth_require_tls=tls_context is not None,
            )
        if tls_context is not None:
            kwargs.update(tls_context=tls_context, require_starttls=True)
        self.controller = Controller(
            Handler(),
            hostname="127.0.0.1",
            port=port or _free_port(),
            ssl_context=implicit_tls_context,
            **kwargs,
        )

    @property
    def port(self) -> int:
        return int(self.controller.port)

    def fail_next(self, times: int = 1, code: int = 451) -> None:
        self._failures += [code] * times

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages if str(m["To"]).lower() == address.lower()]

    def start(self) -> SmtpSink:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()


def _free_port() -> int:
    from churnguard.devstack.process import free_port

    return free_port()


# -- Stripe ---------------------------------------------------------------------------------


class StripeStandIn:
    """``POST /v1/invoices/{id}/pay`` as Stripe answers it, idempotency included.

    Invoices are open unless told otherwise; ``decline(invoice, code)`` makes the card
    decline (402 ``card_error``); ids starting ``in_missing`` do not exist (404).
    ``charges`` counts the charges Stripe would have made per idempotency key (a replayed
    key charges nothing); ``calls`` counts requests per key.
    """

    def __init__(
        self,
        api_key: str = "sk_test_standin",
        folder: Path | None = None,
        decline_suffix: str | None = None,
    ) -> None:
        self.api_key = api_key
        self.decline_suffix = decline_suffix
        self.log = folder / "stripe.jsonl" if folder else None
        self.declines: dict[str, str] = {}
        self.paid: set[str] = set()
        self.calls: Counter[str] = Counter()
        self.charges: Counter[str] = Counter()
        self.invoice_charges: Counter[str] = Counter()
        self._answers: dict[str, tuple[int, dict[str, Any]]] = {}
        self._failures: list[ScriptedFailure] = []
        self.app = web.Application()
        self.app.router.add_post("/v1/invoices/{invoice}/pay", self._pay)

    def decline(self, invoice_id: str, decline_code: str = "insufficient_funds") -> None:
        self.declines[invoice_id] = decline_code

    def fail_next(self, times: int = 1, status: int = 500) -> None:
        if status == 429:
            body = {
                "error": {
                    "type": "invalid_request_error",
                    "code": "rate_limit",
                    "message": "Too many requests hit the API too quickly.",
                }
            }
        else:
            body = {"error": {"type": "api_error", "message": "An unknown error occurred"}}
        self._failures += [ScriptedFailure(status, body)] * times

    async def _pay(self, request: web.Request) -> web.Response:
        invoice = request.match_info["invoice"]
        key = request.headers.get("Idempotency-Key", "")
        self.calls[key] += 1
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response(
                {"error": {"type": "invalid_request_error", "message": "Invalid API Key provided"}},
                status=401,
            )
        if key and key in self._answers:
            status, body = self._answers[key]
            return web.json_response(body, status=status, headers={"Idempotent-Replayed": "true"})
        if self._failures:  # a 500 is not stored under the key: Stripe lets it be retried
            f = self._failures.pop(0)
            return web.json_response(f.body, status=f.status, headers=f.headers)
        status, body = self._charge(invoice)
        if key:
            self._answers[key] = (status, body)
            self.charges[key] += 1
        self.invoice_charges[invoice] += 1
        _append_jsonl(
            self.log, {"invoice": invoice, "idempotency_key": key, "status": status, "body": body}
        )
        return web.json_response(
            body, status=status, headers={"Request-Id": f"req_{len(self.calls)}"}
        )

    def _charge(self, invoice: str) -> tuple[int, dict[str, Any]]:
        if invoice.startswith("in_missing"):
            return 404, {
                "error": {
                    "type": "invalid_request_error",
                    "code": "resource_missing",
                    "param": "invoice",
                    "message": f"No such invoice: '{invoice}'",
                }
            }
        if self.decline_suffix and invoice.endswith(self.decline_suffix):
            self.declines.setdefault(invoice, "insufficient_funds")
        if invoice in self.declines:
            code = self.declines[invoice]
            return 402, {
                "error": {
                    "type": "card_error",
                    "code": "card_declined",
                    "decline_code": code,
                    "message": "Your card was declined.",
                    "charge": f"ch_{invoice}",
                }
            }
        self.paid.add(invoice)
        return 200, {
            "id": invoice,
            "object": "invoice",
            "status": "paid",
            "paid": True,
            "amount_remaining": 0,
            "currency": "usd",
        }
