from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from churnguard.common.settings import ServiceSettings


class IngestSettings(ServiceSettings):
    """Ingest's own settings (env prefix ``CHURNGUARD_INGEST_``)."""

    model_config = SettingsConfigDict(env_prefix="CHURNGUARD_INGEST_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8081, ge=1, le=65535)
    publish_timeout_s: float = Field(
        default=10.0, gt=0, description="Give up (503) if Kafka has not acknowledged by then"
    )
    db_schema: str = Field(default="ingest", description="PostgreSQL schema of ingest's tables")
    auth_cache_ttl_s: float = Field(
        default=5.0,
        ge=0,
        description="How long a write key check is cached (a revoke takes effect within it)",
    )
    user_accounts_ttl_s: float = Field(
        default=60.0,
        ge=0,
        description="How long a worker trusts the account it knows for a Segment user before "
        "asking PostgreSQL again (another worker may have learned a newer one)",
    )
    user_accounts_flush_s: float = Field(
        default=0.5,
        gt=0,
        description="How often learned user accounts are written to PostgreSQL (a group "
        "call's is written before its 2xx)",
    )
    stripe_webhook_secret: SecretStr = Field(
        default=SecretStr("dev-stripe-webhook-secret"),
        description="Stripe webhook signing secret(s); several, comma separated, during rotation",
    )
    stripe_tolerance_s: int = Field(default=300, ge=1, description="Max age of a webhook signature")
    retry_after_s: int = Field(default=2, ge=1, description="Retry-After of a 503")

    @property
    def stripe_secrets(self) -> list[str]:
        raw = self.stripe_webhook_secret.get_secret_value()
        return [part.strip() for part in raw.split(",") if part.strip()]
