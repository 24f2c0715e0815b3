from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from churnguard.common.settings import ServiceSettings

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
"""The playbooks that ship with churnguard (used unless CHURNGUARD_PLAYBOOKS_DIR is set)."""

DEFAULT_LIFT_PATH = SHIPPED_DIR / "feature_lift.json"


class PlaybooksSettings(ServiceSettings):
    """Playbooks' own settings (env prefix ``CHURNGUARD_PLAYBOOKS_``)."""

    model_config = SettingsConfigDict(env_prefix="CHURNGUARD_PLAYBOOKS_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8082, ge=1, le=65535)
    db_schema: str = Field(default="playbooks", description="PostgreSQL schema of its tables")
    dir: Path = Field(
        default=SHIPPED_DIR,
        description="Folder of playbook YAML files (and an optional templates.yaml)",
    )
    reload_interval_s: float = Field(
        default=2.0, gt=0, description="How often the folder is checked for changes"
    )
    group_id: str = Field(
        default="churnguard-playbooks",
        description="Consumer group of the decision consumer; the state consumer uses "
        "<group_id>-state",
    )
    console_url: str = Field(
        default="http://127.0.0.1:8080",
        description="Base URL of the console; commands link to <console_url>/accounts/<id>",
    )
    help_url: str = Field(
        default="http://127.0.0.1:8080/help",
        description="Base of the product's help pages; a guide links to <help_url>/<feature>",
    )
    update_payment_url: str = Field(
        default="http://127.0.0.1:8080/billing",
        description="Where customers update their payment method (dunning messages)",
    )
    customer_budget: int = Field(
        default=3, ge=0, description="Customer-facing touches allowed per account per window"
    )
    customer_budget_days: int = Field(default=7, ge=1)
    internal_budget: int = Field(
        default=10,
        ge=0,
        description="CSM-facing touches (Slack, CSM tasks, webhooks) allowed per account per "
        "window, counted apart from the customer's",
    )
    internal_budget_days: int = Field(default=7, ge=1)
    quiet_hours: str = Field(
        default="20:00-08:00",
        description="Local time window (in the account's time zone) in which customer "
        "messages on quiet channels are deferred to its end; empty turns it off",
    )
    quiet_channels: str = Field(
        default="email", description="Channels that respect quiet hours, comma separated"
    )
    default_timezone: str = Field(
        default="UTC", description="Time zone of accounts whose traits do not name one"
    )
    arr_tier_bounds: str = Field(
        default="10000,50000,250000",
        description="Lower ARR bounds (currency units) of the medium, large and strategic "
        "tiers (below the first: small), for arr_tier conditions",
    )
    lift_path: Path = Field(
        default=DEFAULT_LIFT_PATH,
        description="Retention lift of the sticky features (churnguard playbooks lift), which "
        "orders the in-app guides",
    )
    fetch_max_wait_ms: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="Longest a fetch may wait for records: bounds the signal-to-command "
        "latency on brokers that hold fetches that long (Tansu)",
    )
    timer_interval_s: float = Field(
        default=0.5, gt=0, description="How often due timers are looked for"
    )
    outbox_sweep_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="How often commands left unsent (after a crash or a Kafka outage) are sent",
    )

    @field_validator("quiet_hours")
    @classmethod
    def _quiet_hours(cls, value: str) -> str:
        from churnguard.playbooks.guardrails import QuietHours

        if value.strip():
            QuietHours.parse(value)
        return value.strip()

    @field_validator("default_timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from churnguard.playbooks.guardrails import zone

        zone(value)
        return value

    @field_validator("arr_tier_bounds")
    @classmethod
    def _arr_tier_bounds(cls, value: str) -> str:
        from churnguard.playbooks.facts import ArrTiers

        ArrTiers.parse(value)
        return value

    @property
    def quiet_channel_set(self) -> frozenset[str]:
        return frozenset(c.strip() for c in self.quiet_channels.split(",") if c.strip())
