from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from churnguard.common.settings import ServiceSettings
from churnguard.scoring.engine import BUCKETS
from churnguard.scoring.model import DEFAULT_MODEL_PATH


class ScoringSettings(ServiceSettings):
    """Scoring's own settings (env prefix ``CHURNGUARD_SCORING_``)."""

    model_config = SettingsConfigDict(env_prefix="CHURNGUARD_SCORING_", extra="ignore")

    app_id: str = Field(default="churnguard-scoring", description="Faust app id = consumer group")
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=6066, ge=1, le=65535)
    data_dir: Path = Field(default=Path(".dev/scoring"), description="Faust's local state")
    commit_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="How often dirty state buckets go to the changelog and the records they "
        "cover are acknowledged: a crash replays at most this much; shorter costs more "
        "changelog bytes (every dirty bucket is written whole)",
    )
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
    partitions: int = Field(
        default=4,
        ge=1,
        description="Partitions of the source topics and of Faust's own: at most this many "
        "workers share the load",
    )
    model_path: Path = Field(
        default=DEFAULT_MODEL_PATH,
        description="The ONNX churn model; replaced files are picked up without a restart",
    )
    model_check_interval_s: float = Field(default=5.0, gt=0)
    buckets: int = Field(
        default=BUCKETS,
        ge=1,
        le=4096,
        description="State buckets per partition: one changelog record per dirty bucket per "
        "commit (more buckets: smaller records, more of them). Fixed for the life of an "
        "app id: its changelog is keyed by bucket",
    )
    score_interval_s: float = Field(
        default=1.0, gt=0, description="How often touched accounts are scored"
    )
    score_batch: int = Field(default=500, ge=1, description="Accounts per ONNX call")
    score_budget: float = Field(
        default=0.4,
        gt=0,
        le=1,
        description="Share of each scoring interval spent scoring while events are being "
        "consumed (all of it when none are): accounts touched by "
        "billing, feedback or seats events (and new ones) go first, then the others oldest "
        "first; what is left waits for the next interval, so under load routine usage is "
        "coalesced into fewer scores instead of slowing consumption",
    )
    align_max_wait_s: float = Field(
        default=10.0,
        gt=0,
        description="How long a source topic whose position Kafka has not told may hold the "
        "others back while they are merged into event-time order (one known to be behind "
        "is always waited for; one known to be caught up never)",
    )
    offsets_interval_s: float = Field(
        default=0.5,
        gt=0,
        description="How often the committed offsets of source partitions that have not "
        "delivered yet are read from Kafka for the aligner",
    )
    stream_buffer: int = Field(
        default=64, ge=1, description="Records Faust prefetches per partition (envelopes)"
    )
