"""Pure logic of notify: signatures, unsubscribe tokens, backoff, settings."""

from __future__ import annotations

import random

import pytest

from churnguard.common.settings import PlatformSettings
from churnguard.notify.channels.email import message_id
from churnguard.notify.dispatcher import backoff_s
from churnguard.notify.outcomes import outcome_id
from churnguard.notify.settings import NotifySettings
from churnguard.notify.signing import (
    BadSignature,
    read_unsubscribe_token,
    sign_webhook,
    unsubscribe_token,
    verify_webhook,
)


def test_webhook_signature_round_trip_and_tampering() -> None:
    body = b'{"id":"cmd-1"}'
    header = sign_webhook("s3cret", body, timestamp=1_700_000_000)
    verify_webhook("s3cret", header, body, now=1_700_000_010)
    with pytest.raises(BadSignature, match="does not match"):
        verify_webhook("s3cret", header, body + b" ", now=1_700_000_010)
    with pytest.raises(BadSignature, match="tolerance"):
        verify_webhook("s3cret", header, body, now=1_700_001_000)
    with pytest.raises(BadSignature, match="missing"):
        verify_webhook("s3cret", None, body)


def test_unsubscribe_token_names_the_address_and_cannot_be_forged() -> None:
    token = unsubscribe_token("k", "Sam@Acme.test")
    assert read_unsubscribe_token("k", token) == "sam@acme.test"
    with pytest.raises(BadSignature):
        read_unsubscribe_token("other-key", token)
    forged = unsubscribe_token("k", "a@b.c").split(".")[0] + "." + token.split(".")[1]
    with pytest.raises(BadSignature):
        read_unsubscribe_token("k", forged)


def test_deterministic_ids() -> None:
    assert outcome_id("cmd-1", "delivered") == outcome_id("cmd-1", "delivered")
    assert outcome_id("cmd-1", "delivered") != outcome_id("cmd-1", "read")
    assert message_id("cmd-1", "d.test") == message_id("cmd-1", "d.test")
    assert message_id("cmd-1", "d.test").endswith("@d.test>")


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    rng = random.Random(1)
    delays = [backoff_s(n, 2.0, 60.0, rng) for n in range(1, 9)]
    for n, delay in enumerate(delays, start=1):
        ceiling = min(60.0, 2.0 * 2 ** (n - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 60.0
    assert len({round(d, 6) for d in delays}) == len(delays)


def test_prod_refuses_placeholder_secrets_but_allows_unconfigured_channels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    platform = PlatformSettings(
        env="prod", database_url="postgresql+asyncpg://u:real-password@db/x"
    )
    with pytest.raises(ValueError, match="CHURNGUARD_NOTIFY_UNSUBSCRIBE_SECRET"):
        NotifySettings(platform=platform)
    ok = NotifySettings(
        platform=platform,
        unsubscribe_secret="u-" + "x" * 30,
        inbox_api_key="i-" + "x" * 30,
        webhook_signing_secret="w-" + "x" * 30,
    )
    assert ok.slack_bot_token is None
    assert ok.stripe_api_key is None
    assert ok.fault_point is None


def test_fault_hook_only_in_test(monkeypatch: pytest.MonkeyPatch) -> None:
    assert NotifySettings(
        platform=PlatformSettings(env="test"), fault="after_provider_call"
    ).fault_point
    assert (
        NotifySettings(
            platform=PlatformSettings(env="dev"), fault="after_provider_call"
        ).fault_point
        is None
    )


def test_name_maps_are_checked() -> None:
    with pytest.raises(ValueError, match="CHURNGUARD_NOTIFY_WEBHOOK_URLS"):
        NotifySettings(webhook_urls="crm")
    settings = NotifySettings(webhook_urls="crm=https://crm.test/h, billing=https://b.test")
    assert settings.webhook_targets == {"crm": "https://crm.test/h", "billing": "https://b.test"}
