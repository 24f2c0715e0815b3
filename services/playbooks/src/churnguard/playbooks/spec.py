"""The playbook file format: pydantic models of the YAML, and the compiled playbooks.

One file holds one playbook. The models check shapes and types (unknown keys are
errors, so a typo never passes silently); :mod:`churnguard.playbooks.loader` adds the
checks that need the catalogue (signal types, fields, templates, recipients) and turns
every error into file, line and field.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from churnguard.common.events.billing import DECLINE_CODE_KINDS
from churnguard.playbooks.catalogue import CUSTOMER_CHANNELS
from churnguard.playbooks.conditions import Condition

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(w|d|h|m|s)")
_UNITS: Final = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(value: Any) -> timedelta:
    """``"90s"``, ``"15m"``, ``"2h"``, ``"3d"``, ``"1w"``, ``"1d12h"``, or 0."""
    if isinstance(value, timedelta):
        return value
    if value == 0 and not isinstance(value, bool):
        return timedelta(0)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"a duration is a string with a unit such as '90s', '15m', '2h', '3d' or '1w', "
            f"not {value!r}"
        )
    text = value.strip().lower().replace(" ", "")
    pos, seconds = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError(
            f"{value!r} is not a duration (use a number and a unit: s, m, h, d, w; e.g. '3d')"
        )
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    if seconds == 0:
        return "0"
    for unit in ("d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", min_length=1, max_length=100)]
MessageChannel = Literal["slack", "email", "in_app", "csm_task", "webhook"]
Audience = Literal["customer", "internal"]
FinalState = Literal["cancel", "downgrade", "keep_flagged"]

SOFT_DECLINE_CODES: Final = frozenset(c for c, k in DECLINE_CODE_KINDS.items() if k == "soft")


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TriggerSpec(Spec):
    signal: str | None = Field(default=None, description="A signal type, e.g. usage_dropped")
    renewal_in_days: int | None = Field(
        default=None, ge=1, le=365, description="A schedule: this many days before renewal"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> TriggerSpec:
        if (self.signal is None) == (self.renewal_in_days is None):
            raise ValueError("a trigger names exactly one of signal or renewal_in_days")
        return self


class MessageSpec(Spec):
    """One message: the channel, template and recipient (``to``: a keyword or a literal)."""

    type: MessageChannel
    template: str = Field(min_length=1, max_length=200)
    to: str = Field(min_length=1, max_length=320)
    fallback: str | None = Field(
        default=None,
        min_length=1,
        max_length=320,
        description="A literal recipient for when the keyword in `to` finds nobody",
    )
    delay: Duration = timedelta(0)
    audience: Audience | None = Field(
        default=None, description="Default: customer for email and in_app, internal otherwise"
    )
    transactional: bool = Field(
        default=False,
        description="Bypasses the contact budget (still counted): payment and security mail",
    )
    max_recipients: int = Field(default=3, ge=1, le=50)
    variables: dict[str, Any] = Field(default_factory=dict)
    if_: list[Any] = Field(
        default_factory=list,
        alias="if",
        description="Conditions checked when the action runs (after its delay)",
    )

    @property
    def effective_audience(self) -> Audience:
        if self.audience is not None:
            return self.audience
        return "customer" if self.type in CUSTOMER_CHANNELS else "internal"


class DunningMessageSpec(Spec):
    type: Literal["email", "in_app"] = "email"
    template: str = Field(min_length=1, max_length=200)
    to: str = Field(default="admins", min_length=1, max_length=320)
    fallback: str | None = Field(default=None, min_length=1, max_length=320)
    max_recipients: int = Field(default=3, ge=1, le=50)


class TimingSpec(Spec):
    avoid_weekends: bool = True
    paydays: list[Annotated[int, Field(ge=1, le=31)]] = Field(default_factory=lambda: [1, 15])
    payday_window_days: int = Field(
        default=2, ge=0, le=7, description="Move a retry forward to a payday this close"
    )
    local_hour: int = Field(default=10, ge=0, le=23, description="Retry at this local hour")


class DunningSpec(Spec):
    """The retry schedule of failed payments: soft declines are retried, hard ones never."""

    type: Literal["dunning"]
    retry_schedule: dict[str, list[Duration]] = Field(
        description="Per decline code (and `default`): delays after the failure, one per retry"
    )
    max_attempts: int = Field(default=4, ge=1, le=10)
    window: Duration = Field(default=timedelta(days=14), description="Give up after this long")
    timing: TimingSpec = Field(default_factory=TimingSpec)
    notice: DunningMessageSpec | None = Field(
        default=None, description="Tells the customer a payment failed and will be retried"
    )
    card_update: DunningMessageSpec = Field(
        description="Asks for a new card: hard declines (never retried) go straight to it"
    )
    final_state: FinalState = Field(
        description="What happens when retries run out: cancel, downgrade or keep_flagged"
    )
    final_state_webhook: str = Field(
        default="billing",
        min_length=1,
        max_length=320,
        description="Webhook that carries out the final state in the billing system",
    )
    final_notice: DunningMessageSpec | None = None

    @model_validator(mode="after")
    def _schedule(self) -> DunningSpec:
        if "default" not in self.retry_schedule:
            raise ValueError("retry_schedule needs a `default` entry for other soft declines")
        for code, delays in self.retry_schedule.items():
            if code != "default" and code not in SOFT_DECLINE_CODES:
                hard = DECLINE_CODE_KINDS.get(code) == "hard"
                raise ValueError(
                    f"retry_schedule.{code}: "
                    + (
                        "a hard decline is never retried (it gets the card_update message)"
                        if hard
                        else "unknown decline code; soft codes are "
                        + ", ".join(sorted(SOFT_DECLINE_CODES))
                    )
                )
            if not delays:
                raise ValueError(f"retry_schedule.{code}: at least one delay")
            if any(b <= a for a, b in itertools.pairwise(delays)):
                raise ValueError(f"retry_schedule.{code}: delays must increase")
            if delays[-1] > self.window:
                raise ValueError(
                    f"retry_schedule.{code}: the last delay is beyond window "
                    f"({format_duration(self.window)})"
                )
        return self

    def delays_for(self, decline_code: str | None) -> list[timedelta]:
        delays = self.retry_schedule.get(decline_code or "", self.retry_schedule["default"])
        return delays[: self.max_attempts]


class PlaybookSpec(Spec):
    name: Slug
    description: str = Field(default="", max_length=2000)
    enabled: bool = True
    trigger: TriggerSpec
    conditions: list[Any] = Field(default_factory=list)
    actions: list[dict[str, Any]] = Field(min_length=1, max_length=20)
    cooldown: Duration = Field(
        default=timedelta(0), description="Per account: no second firing within this long"
    )
    priority: int = Field(default=50, ge=0, le=1000, description="Higher is decided first")
    holdout_percent: float = Field(
        default=0.0, ge=0.0, le=50.0, description="Share of accounts held out (logged only)"
    )
    dedupe_by: list[str] = Field(
        default_factory=list,
        max_length=5,
        description="Fields whose values identify one underlying change: fire once per value",
    )
    suppress_while_dunning: bool = Field(
        default=False, description="Upsell: stay silent while a payment of the account fails"
    )
    respect_quiet_hours: bool = True


Action = MessageSpec | DunningSpec


@dataclass(frozen=True)
class Playbook:
    """A validated playbook, ready to decide."""

    spec: PlaybookSpec
    conditions: Condition
    actions: tuple[Action, ...]
    action_conditions: tuple[Condition, ...]
    """Per action: its ``if`` conditions (ALWAYS when none)."""
    source: str
    """The file it came from."""
    version: str
    """Hash of the file's content: which version of the playbook decided."""
    variable_refs: tuple[dict[str, str], ...] = field(default=())
    """Per action: template variable → the field it takes its value from (``$field``)."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def signal(self) -> str | None:
        return self.spec.trigger.signal

    @property
    def renewal_in_days(self) -> int | None:
        return self.spec.trigger.renewal_in_days

    @property
    def is_dunning(self) -> bool:
        return any(isinstance(a, DunningSpec) for a in self.actions)
