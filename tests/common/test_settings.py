from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsConfigDict

from churnguard.common.settings import PlatformSettings, ServiceSettings


class WebhookSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CHURNGUARD_HOOK_")
    signing_secret: SecretStr = SecretStr("changeme")


def test_placeholder_secret_is_fine_in_dev(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHURNGUARD_ENV", "dev")
    assert WebhookSettings().signing_secret.get_secret_value() == "changeme"


def test_placeholder_secret_refused_in_prod_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHURNGUARD_ENV", "prod")
    monkeypatch.setenv("CHURNGUARD_DATABASE_URL", "postgresql+asyncpg://cg:s3cr3t-Value@db/cg")
    with pytest.raises(ValidationError, match="CHURNGUARD_HOOK_SIGNING_SECRET: a real secret"):
        WebhookSettings()
    monkeypatch.setenv("CHURNGUARD_HOOK_SIGNING_SECRET", "whsec_9f8e7d6c5b4a")
    assert WebhookSettings().signing_secret.get_secret_value() == "whsec_9f8e7d6c5b4a"


def test_database_without_password_refused_in_prod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHURNGUARD_ENV", "prod")
    monkeypatch.setenv("CHURNGUARD_DATABASE_URL", "postgresql+asyncpg://postgres@db/cg")
    with pytest.raises(ValidationError, match="CHURNGUARD_DATABASE_URL: a real password"):
        PlatformSettings()


def test_secrets_never_show_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHURNGUARD_HOOK_SIGNING_SECRET", "whsec_topsecret")
    assert "whsec_topsecret" not in repr(WebhookSettings())
