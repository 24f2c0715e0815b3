from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from churnguard.common.settings import ServiceSettings


class ScoringSettings(ServiceSettings):
    """Scoring's own settings (env prefix ``CHURNGUARD_SCORING_``)."""

    model_config = SettingsConfigDict(env_prefix="CHURNGUARD_SCORING_", extra="ignore")

    app_id: str = Field(default="churnguard-scoring", description="Faust app id = consumer group")
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=6066, ge=1, le=65535)
    data_dir: Path = Field(default=Path(".dev/scoring"), description="Faust's local state")
    commit_interval_s: float = Field(default=1.0, gt=0)
    rebalance_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Faust broker_rebalance_timeout; a few seconds in tests and the demo "
        "(Tansu makes a group's first join wait this long)",
    )
    session_timeout_s: float = Field(
        default=30.0,
        ge=6.0,
        description="Faust broker_session_timeout; Tansu holds a group's first join for about "
        "half of it, so tests and the demo use 6 s (Apache Kafka's minimum)",
    )
    partitions: int = Field(default=4, ge=1, description="Partitions of Faust's own topics")
