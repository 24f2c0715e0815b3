"""Configuration: one pydantic-settings class per service, one shared base.

Shared infrastructure settings are read from ``CHURNGUARD_*`` (:class:`PlatformSettings`);
each service's own settings from ``CHURNGUARD_<SERVICE>_*`` in a subclass of
:class:`ServiceSettings`, which carries the platform settings as ``.platform``.

Secrets are ``SecretStr`` (never printed, never logged). Outside ``dev`` and ``test``
a service refuses to start when a secret is empty or still a known placeholder, so a
production deployment cannot run on the demo's credentials.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

Environment = Literal["dev", "test", "prod"]

PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "changethis", "secret", "password", "placeholder", "dev", "test"}
)


class InsecureSecretError(ValueError):
    pass


def _refuse_placeholders(settings: BaseSettings, env: Environment) -> None:
    if env in ("dev", "test"):
        return
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            if secret.strip().lower() in PLACEHOLDER_SECRETS or secret.startswith("dev-"):
                prefix = settings.model_config.get("env_prefix", "")
                raise InsecureSecretError(
                    f"{prefix}{name.upper()}: a real secret is required when "
                    f"CHURNGUARD_ENV={env} (got a placeholder)"
                )


class PlatformSettings(BaseSettings):
    """Settings every service shares (env prefix ``CHURNGUARD_``)."""

    model_config = SettingsConfigDict(env_prefix="CHURNGUARD_", extra="ignore")

    env: Environment = "dev"
    kafka_bootstrap: str = Field(
        default="127.0.0.1:9092", description="Kafka bootstrap servers, comma separated"
    )
    kafka_idempotent_producer: bool = Field(
        default=True,
        description="Idempotent producers (exactly-once per partition); off for brokers "
        "without InitProducerId, such as the embedded Tansu",
    )
    topic_prefix: str = Field(default="", description="Prefix for every topic name")
    database_url: SecretStr = Field(
        default=SecretStr("postgresql+asyncpg://postgres@127.0.0.1:5433/postgres"),
        description="SQLAlchemy URL of the PostgreSQL server (each service uses its own schema)",
    )
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    dead_letter_max_ratio: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="A consumer stops when more than this share of its recent records dead-letter",
    )
    dead_letter_window: int = Field(
        default=200, ge=1, description="Recent records the dead-letter ratio is computed over"
    )

    @model_validator(mode="after")
    def _no_placeholders(self) -> Self:
        if self.env not in ("dev", "test"):
            password = make_url(self.database_url.get_secret_value()).password
            if not password or password.lower() in PLACEHOLDER_SECRETS:
                raise InsecureSecretError(
                    "CHURNGUARD_DATABASE_URL: a real password is required when "
                    f"CHURNGUARD_ENV={self.env}"
                )
        return self


class ServiceSettings(BaseSettings):
    """Base for one service's settings; subclasses set ``env_prefix`` and add fields."""

    model_config = SettingsConfigDict(env_prefix="CHURNGUARD_SERVICE_", extra="ignore")

    platform: PlatformSettings = Field(default_factory=PlatformSettings, exclude=True)

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> Self:
        _refuse_placeholders(self, self.platform.env)
        return self
