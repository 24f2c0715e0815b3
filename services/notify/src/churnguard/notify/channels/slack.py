"""Slack: Block Kit messages through slack-sdk, by bot token or incoming webhook.

Routing: the command's ``recipient`` is a channel (``C0123…`` or ``#name``) or a user id
(``U…``, a DM); ``default`` means ``CHURNGUARD_NOTIFY_SLACK_DEFAULT_CHANNEL``. With a bot
token every recipient goes through ``chat.postMessage``; without one, a recipient that
has an incoming webhook in ``CHURNGUARD_NOTIFY_SLACK_WEBHOOK_URLS`` goes through it.

Rate limits: a 429 carries ``Retry-After``; the attempt is retried no sooner, and every
other message for the same target waits as long (Slack limits per channel), without
spending those messages' attempts.

Slack has no idempotency key. Each message carries the command id in Slack's message
``metadata`` (event type ``churnguard_notification``), so an attempt interrupted by a crash
can be looked up with ``conversations.history`` (bot token and a channel id needed); when
it cannot be looked up, it is not sent again.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any, ClassVar

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from churnguard.common.events.derived import NotificationRequested
from churnguard.notify.channels.base import (
    Channel,
    Deferred,
    InDoubt,
    Job,
    PermanentError,
    Sent,
    TransientError,
)
from churnguard.notify.templates import (
    TIER_LABEL,
    DetractorFollowUp,
    ExpansionOpportunity,
    RenewalAtRiskAlert,
    RiskAlert,
    Variables,
    expansion_reason_text,
    money,
)

METADATA_EVENT_TYPE = "churnguard_notification"

# Slack's documented limits (api.slack.com/reference/block-kit/blocks)
MAX_BLOCKS = 50
HEADER_MAX = 150
SECTION_TEXT_MAX = 3000
FIELD_MAX = 2000
MAX_FIELDS = 10
BUTTON_TEXT_MAX = 75
CONTEXT_MAX_ELEMENTS = 10
FALLBACK_TEXT_MAX = 4000

# error codes of chat.postMessage (and webhook bodies) that no retry can fix
PERMANENT_ERRORS = frozenset(
    {
        "channel_not_found",
        "not_in_channel",
        "is_archived",
        "channel_is_archived",
        "msg_too_long",
        "no_text",
        "invalid_blocks",
        "invalid_blocks_format",
        "invalid_metadata_format",
        "invalid_metadata_schema",
        "too_many_attachments",
        "restricted_action",
        "restricted_action_read_only_channel",
        "restricted_action_thread_only_channel",
        "restricted_action_non_threadable_channel",
        "cannot_reply_to_message",
        "not_authed",
        "invalid_auth",
        "account_inactive",
        "token_revoked",
        "token_expired",
        "no_permission",
        "missing_scope",
        "not_allowed_token_type",
        "ekm_access_denied",
        "user_not_found",
        "invalid_payload",
        "no_service",
        "no_service_id",
        "no_team",
        "team_disabled",
        "action_prohibited",
        "posting_to_general_channel_denied",
        "invalid_token",
    }
)
TRANSIENT_ERRORS = frozenset(
    {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}
)


def escape(text: str) -> str:
    """Slack's three control characters (api.slack.com/reference/surfaces/formatting)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _plain(text: str, limit: int) -> dict[str, Any]:
    return {"type": "plain_text", "text": clip(text, limit), "emoji": True}


def _mrkdwn(text: str, limit: int = SECTION_TEXT_MAX) -> dict[str, Any]:
    return {"type": "mrkdwn", "text": clip(text, limit)}


MINUS = "\u2212"  # the typographic minus, as Slack renders numbers


def _change(now: int, before: int) -> str:
    delta = now - before
    return f"{before} → *{now}* ({'+' if delta > 0 else MINUS if delta < 0 else '±'}{abs(delta)})"


def _reasons_section(reasons: list[Any], limit: int = 3) -> dict[str, Any] | None:
    if not reasons:
        return None
    lines = [
        f"• {escape(r.description)} _({'+' if r.impact >= 0 else MINUS}{abs(r.impact):.0%} risk)_"
        for r in reasons[:limit]
    ]
    return {"type": "section", "text": _mrkdwn("*Why*\n" + "\n".join(lines))}


def _button(url: str) -> dict[str, Any]:
    return {
        "type": "actions",
        "elements": [
            {
                "type": "button",
                "text": _plain("Open in console", BUTTON_TEXT_MAX),
                "url": url,
                "style": "primary",
                "action_id": "open_console",
            }
        ],
    }


def _context(command: NotificationRequested) -> dict[str, Any]:
    return {
        "type": "context",
        "elements": [
            _mrkdwn(
                f"Playbook `{escape(command.data.playbook)}` · account `{escape(command.subject)}`",
                FIELD_MAX,
            )
        ],
    }


def blocks_for(command: NotificationRequested, v: Variables) -> tuple[str, list[dict[str, Any]]]:
    """(fallback text, Block Kit blocks) for one Slack template."""
    blocks: list[dict[str, Any] | None]
    match v:
        case RiskAlert():
            tier = TIER_LABEL[v.tier]
            emoji = {"critical": ":red_circle:", "at_risk": ":large_orange_circle:"}.get(
                v.tier, ":large_yellow_circle:" if v.tier == "watch" else ":large_green_circle:"
            )
            text = (
                f"{v.account_name} is now {tier.lower()}: health {v.previous_health} → "
                f"{v.health}, ARR {money(v.arr, v.currency)}"
            )
            fields = [
                _mrkdwn(f"*ARR*\n{money(v.arr, v.currency)}", FIELD_MAX),
                _mrkdwn(f"*Health*\n{_change(v.health, v.previous_health)}", FIELD_MAX),
                _mrkdwn(
                    f"*Tier*\n{TIER_LABEL[v.previous_tier] + ' → ' if v.previous_tier else ''}"
                    f"*{tier}*",
                    FIELD_MAX,
                ),
            ]
            if v.owner:
                fields.append(_mrkdwn(f"*Owner*\n{escape(v.owner)}", FIELD_MAX))
            blocks = [
                {"type": "header", "text": _plain(f"{v.account_name} is now {tier}", HEADER_MAX)},
                {
                    "type": "section",
                    "text": _mrkdwn(f"{emoji} *{escape(v.account_name)}* moved to *{tier}*."),
                    "fields": fields[:MAX_FIELDS],
                },
                _reasons_section(v.reasons),
                _button(v.console_url),
                _context(command),
            ]
        case RenewalAtRiskAlert():
            text = (
                f"{v.account_name} renews in {v.days_to_renewal} days and is "
                f"{TIER_LABEL[v.tier].lower()} (ARR {money(v.arr, v.currency)})"
            )
            blocks = [
                {
                    "type": "header",
                    "text": _plain(
                        f"Renewal at risk: {v.account_name} in {v.days_to_renewal} days",
                        HEADER_MAX,
                    ),
                },
                {
                    "type": "section",
                    "fields": [
                        _mrkdwn(f"*ARR at stake*\n{money(v.arr, v.currency)}", FIELD_MAX),
                        _mrkdwn(f"*Health*\n{v.health}", FIELD_MAX),
                        _mrkdwn(f"*Tier*\n{TIER_LABEL[v.tier]}", FIELD_MAX),
                        _mrkdwn(f"*Renews in*\n{v.days_to_renewal} days", FIELD_MAX),
                    ],
                },
                _reasons_section(v.reasons),
                _button(v.console_url),
                _context(command),
            ]
        case DetractorFollowUp():
            who = v.user_name or "A user"
            text = f"{who} at {v.account_name} answered NPS {v.score}"
            quote = (
                "\n".join("> " + escape(line) for line in v.comment.splitlines()[:20])
                if v.comment
                else "_No comment left._"
            )
            blocks = [
                {"type": "header", "text": _plain(f"Detractor: {text}", HEADER_MAX)},
                {"type": "section", "text": _mrkdwn(quote)},
                _button(v.console_url),
                _context(command),
            ]
        case ExpansionOpportunity():
            why = expansion_reason_text(v.expansion_reason, v.seats_utilisation)
            arr = money(v.arr, v.currency) if v.arr is not None else None
            text = f"Expansion opportunity: {v.account_name} looks ready to buy more: {why}" + (
                f" (ARR {arr})" if arr else ""
            )
            fields = []
            if arr:
                fields.append(_mrkdwn(f"*ARR*\n{arr}", FIELD_MAX))
            if v.seats_utilisation is not None:
                fields.append(_mrkdwn(f"*Seats in use*\n{v.seats_utilisation:.0%}", FIELD_MAX))
            section: dict[str, Any] = {
                "type": "section",
                "text": _mrkdwn(
                    f":chart_with_upwards_trend: *{escape(v.account_name)}* looks ready to buy "
                    f"more: {escape(why)}."
                ),
            }
            if fields:
                section["fields"] = fields
            blocks = [
                {
                    "type": "header",
                    "text": _plain(f"Expansion opportunity: {v.account_name}", HEADER_MAX),
                },
                section,
                _button(v.console_url),
                _context(command),
            ]
        case _:
            raise PermanentError(f"template {command.data.template!r} has no Slack layout")
    return clip(text, FALLBACK_TEXT_MAX), [b for b in blocks if b is not None][:MAX_BLOCKS]


def _retry_after(headers: Any, default: float = 1.0) -> float:
    raw = headers.get("Retry-After") or headers.get("retry-after") if headers else None
    try:
        return max(float(raw), 0.0) if raw is not None else default
    except ValueError:
        return default


class SlackChannel(Channel):
    lane: ClassVar[str] = "slack"
    in_doubt_policy: ClassVar[str] = (
        "looked up by the command id in the message metadata (conversations.history, bot "
        "token and channel id); sent again only when Slack does not have it; with a "
        "webhook or a channel name: not sent again, outcome failed"
    )

    def __init__(
        self,
        *,
        bot_token: str | None,
        api_url: str,
        webhooks: dict[str, str],
        default_channel: str | None,
        timeout_s: float,
    ) -> None:
        self.bot_token = bot_token
        self.api_url = api_url if api_url.endswith("/") else api_url + "/"
        self.webhooks = webhooks
        self.default_channel = default_channel
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._client: AsyncWebClient | None = None
        self._blocked_until: dict[str, float] = {}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
        return self._session

    def _web(self) -> AsyncWebClient:
        if self._client is None:
            # no retry handlers: retries are notify's (scheduled in PostgreSQL, Retry-After kept)
            self._client = AsyncWebClient(
                token=self.bot_token,
                base_url=self.api_url,
                timeout=int(self.timeout_s),
                session=self._http(),
                retry_handlers=[],
            )
        return self._client

    def target(self, command: NotificationRequested) -> str:
        recipient = command.data.recipient
        if recipient == "default":
            if not self.default_channel:
                raise PermanentError(
                    "slack: recipient 'default' but "
                    "CHURNGUARD_NOTIFY_SLACK_DEFAULT_CHANNEL is unset"
                )
            return self.default_channel
        return recipient

    async def before_send(self, job: Job) -> Deferred | None:
        assert isinstance(job.command, NotificationRequested)
        blocked = self._blocked_until.get(self.target(job.command), 0.0) - time.monotonic()
        return Deferred(blocked) if blocked > 0 else None

    def _rate_limited(self, target: str, retry_after: float, response: str) -> TransientError:
        self._blocked_until[target] = time.monotonic() + retry_after
        return TransientError(
            f"slack: rate limited, retry after {retry_after:g} s",
            response=response,
            retry_after_s=retry_after,
        )

    async def send(self, job: Job) -> Sent:
        command = job.command
        assert isinstance(command, NotificationRequested)
        assert job.variables is not None
        target = self.target(command)
        text, blocks = blocks_for(command, job.variables)
        metadata = {
            "event_type": METADATA_EVENT_TYPE,
            "event_payload": {"action_id": command.id, "account_id": command.subject},
        }
        if self.bot_token:
            return await self._post_message(target, text, blocks, metadata)
        url = self.webhooks.get(target)
        if url is None:
            raise PermanentError(
                f"slack: no bot token (CHURNGUARD_NOTIFY_SLACK_BOT_TOKEN) and no webhook for "
                f"{target!r} in CHURNGUARD_NOTIFY_SLACK_WEBHOOK_URLS"
            )
        return await self._webhook(url, target, text, blocks, metadata)

    async def _post_message(
        self, target: str, text: str, blocks: list[dict[str, Any]], metadata: dict[str, Any]
    ) -> Sent:
        try:
            response = await self._web().chat_postMessage(
                channel=target,
                text=text,
                blocks=blocks,
                metadata=metadata,
                unfurl_links=False,
                unfurl_media=False,
            )
        except SlackApiError as exc:
            status = exc.response.status_code
            error = str(exc.response.get("error", "")) if exc.response.data else ""
            body = f"{status} {error or exc.response.data}"
            if status == 429 or error == "ratelimited":
                raise self._rate_limited(target, _retry_after(exc.response.headers), body) from None
            if error in PERMANENT_ERRORS:
                raise PermanentError(f"slack: {error} ({target})", response=body) from None
            if status >= 500 or error in TRANSIENT_ERRORS:
                raise TransientError(f"slack: {error or status}", response=body) from None
            raise PermanentError(f"slack: {error or status}", response=body) from None
        except aiohttp.ClientConnectorError as exc:  # never reached Slack
            raise TransientError(f"slack: {type(exc).__name__}: {exc}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:  # sent, answer lost: maybe posted
            raise TransientError(f"slack: {type(exc).__name__}: {exc}", ambiguous=True) from None
        ts = response.get("ts")
        channel = response.get("channel")
        return Sent("delivered", response=f"ok channel={channel} ts={ts}")

    async def _webhook(
        self,
        url: str,
        target: str,
        text: str,
        blocks: list[dict[str, Any]],
        metadata: dict[str, Any],
    ) -> Sent:
        client = AsyncWebhookClient(
            url, timeout=int(self.timeout_s), session=self._http(), retry_handlers=[]
        )
        try:
            response = await client.send(
                text=text, blocks=blocks, metadata=metadata, unfurl_links=False, unfurl_media=False
            )
        except aiohttp.ClientConnectorError as exc:
            raise TransientError(f"slack webhook: {type(exc).__name__}: {exc}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(
                f"slack webhook: {type(exc).__name__}: {exc}", ambiguous=True
            ) from None
        body = f"{response.status_code} {response.body}"
        if response.status_code == 200:
            return Sent("delivered", response=body)
        if response.status_code == 429:
            raise self._rate_limited(target, _retry_after(response.headers), body)
        if response.status_code >= 500:
            raise TransientError(f"slack webhook: {response.status_code}", response=body)
        raise PermanentError(
            f"slack webhook: {response.body or response.status_code}", response=body
        )

    async def resolve_in_doubt(self, job: Job) -> InDoubt:
        assert isinstance(job.command, NotificationRequested)
        target = self.target(job.command)
        if not self.bot_token or not target.startswith(("C", "G", "D")):
            return InDoubt.UNKNOWN  # webhooks and channel names cannot be read back
        oldest = (job.started_at or job.command.time) - timedelta(minutes=1)
        try:
            history = await self._web().conversations_history(
                channel=target,
                oldest=f"{oldest.timestamp():.6f}",
                limit=200,
                include_all_metadata=True,
            )
        except (SlackApiError, aiohttp.ClientError, TimeoutError):
            return InDoubt.UNKNOWN
        messages: list[dict[str, Any]] = history.get("messages", []) or []
        for message in messages:
            meta = message.get("metadata") or {}
            payload = meta.get("event_payload") or {}
            if meta.get("event_type") == METADATA_EVENT_TYPE and payload.get("action_id") == (
                job.command.id
            ):
                return InDoubt.DELIVERED
        return InDoubt.SAFE_TO_SEND

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            await asyncio.sleep(0)  # let aiohttp close its connectors
