"""Notify's settings (env prefix ``CHURNGUARD_NOTIFY_``).

Every provider is optional: a channel without its settings is *not configured*, and its
commands fail at once with a reason saying which setting is missing (no retries, which
could not help). Optional secrets are ``SecretStr | None``; the secrets notify always
needs (inbox API key, unsubscribe and webhook signing secrets) have dev defaults that
``CHURNGUARD_ENV=prod`` refuses.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from churnguard.common.settings import ServiceSettings

FaultPoint = Literal["after_provider_call"]
SmtpSecurity = Literal["none", "starttls", "tls"]
PaymentAdapterName = Literal["stripe", "webhook"]


def parse_name_map(raw: str, setting: str) -> dict[str, str]:
    """``name=value,name=value`` into a dict; names and values must both be non-empty."""
    out: dict[str, str] = {}
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{setting}: expected name=value pairs, comma separated; got {part!r}")
        out[name.strip()] = value.strip()
    return out


class NotifySettings(ServiceSettings):
    """Notify's own settings (env prefix ``CHURNGUARD_NOTIFY_``)."""

    # an empty variable means "not set": docker-compose passes `${SLACK_BOT_TOKEN:-}` as ""
    model_config = SettingsConfigDict(
        env_prefix="CHURNGUARD_NOTIFY_", extra="ignore", env_ignore_empty=True
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8083, ge=1, le=65535)
    db_schema: str = Field(default="notify", description="PostgreSQL schema of notify's tables")
    group_id: str = Field(default="churnguard-notify", description="Kafka consumer group")
    public_url: str = Field(
        default="http://127.0.0.1:8083",
        description="How recipients reach this service (unsubscribe links in emails)",
    )

    # -- delivery ---------------------------------------------------------------------------
    max_attempts: int = Field(default=6, ge=1, le=50, description="Attempts before dead letter")
    backoff_base_s: float = Field(default=2.0, gt=0, description="First retry delay")
    backoff_max_s: float = Field(default=600.0, gt=0, description="Longest retry delay")
    poll_interval_s: float = Field(
        default=0.5, gt=0, description="How often due retries and scheduled payments are looked for"
    )
    lease_s: float = Field(
        default=300.0,
        gt=0,
        description="A command leased by a live instance is taken over after this long",
    )
    provider_timeout_s: float = Field(default=20.0, gt=0, description="Per provider call")
    concurrency: int = Field(default=4, ge=1, le=64, description="Workers per channel")

    # -- Slack ------------------------------------------------------------------------------
    slack_bot_token: SecretStr | None = Field(
        default=None, description="Bot token (xoxb-…) for chat.postMessage"
    )
    slack_api_url: str = Field(
        default="https://slack.com/api/", description="Slack Web API base URL"
    )
    slack_webhook_urls: SecretStr | None = Field(
        default=None,
        description="Incoming webhooks per channel, `#channel=https://hooks.slack.com/…`, "
        "comma separated; used for channels without a bot token",
    )
    slack_default_channel: str | None = Field(
        default=None, description="Where Slack commands go whose recipient is `default`"
    )

    # -- email ------------------------------------------------------------------------------
    smtp_host: str | None = None
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_security: SmtpSecurity = Field(
        default="starttls", description="none, starttls (port 587) or tls (implicit, port 465)"
    )
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_ca_file: str | None = Field(
        default=None, description="CA bundle to verify the SMTP server with (default: system)"
    )
    smtp_from: str = Field(default="churnguard <noreply@churnguard.local>")
    smtp_message_id_domain: str = Field(
        default="churnguard.local", description="Right-hand side of the Message-ID"
    )
    unsubscribe_secret: SecretStr = Field(
        default=SecretStr("dev-notify-unsubscribe-secret"),
        description="Signs the unsubscribe tokens in List-Unsubscribe links",
    )

    # -- in-app inbox -----------------------------------------------------------------------
    inbox_api_key: SecretStr = Field(
        default=SecretStr("dev-notify-inbox-key"),
        description="Bearer key product apps present to the inbox API",
    )

    # -- webhooks (the webhook channel and the webhook payment adapter) ---------------------
    webhook_urls: str = Field(
        default="", description="Webhook channel targets, `name=https://…`, comma separated"
    )
    webhook_signing_secret: SecretStr = Field(
        default=SecretStr("dev-notify-webhook-secret"),
        description="HMAC-SHA256 key of the Churnguard-Signature header",
    )

    # -- payment retries --------------------------------------------------------------------
    payment_adapter: PaymentAdapterName = "stripe"
    stripe_api_key: SecretStr | None = None
    stripe_api_base: str = Field(default="https://api.stripe.com", description="Stripe API base")
    payment_webhook_url: str | None = Field(
        default=None, description="For payment_adapter=webhook: where charge requests go"
    )

    # -- tests only -------------------------------------------------------------------------
    fault: FaultPoint | None = Field(
        default=None,
        description="Test only (honoured with CHURNGUARD_ENV=test): SIGKILL this process "
        "right after a provider call returns, before its result is recorded",
    )

    @field_validator("webhook_urls")
    @classmethod
    def _webhook_urls_parse(cls, value: str) -> str:
        parse_name_map(value, "CHURNGUARD_NOTIFY_WEBHOOK_URLS")
        return value

    @field_validator("slack_webhook_urls")
    @classmethod
    def _slack_urls_parse(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_name_map(value.get_secret_value(), "CHURNGUARD_NOTIFY_SLACK_WEBHOOK_URLS")
        return value

    @property
    def webhook_targets(self) -> dict[str, str]:
        return parse_name_map(self.webhook_urls, "CHURNGUARD_NOTIFY_WEBHOOK_URLS")

    @property
    def slack_webhooks(self) -> dict[str, str]:
        if self.slack_webhook_urls is None:
            return {}
        return parse_name_map(
            self.slack_webhook_urls.get_secret_value(), "CHURNGUARD_NOTIFY_SLACK_WEBHOOK_URLS"
        )

    @property
    def fault_point(self) -> FaultPoint | None:
        """The fault hook, only ever outside production."""
        return self.fault if self.platform.env == "test" else None
