"""The decision engine: a signal (or a due timer, or an outcome) in, decision rows and
commands out, inside the caller's transaction.

For each playbook whose trigger matches, in priority order, the checks run in this
order, and the first that stops it is the decision's reason:

1. the decision key (signal id, playbook) exists → a redelivery: nothing at all;
2. conditions → ``not_matched`` (the first failing condition is the reason);
3. ``dedupe_by`` → ``suppressed: dedupe`` (this underlying change was decided already);
4. cool-down → ``suppressed: cooldown``;
5. ``suppress_while_dunning`` and an open dunning case → ``suppressed: dunning``;
6. holdout → ``suppressed: holdout`` (logged, with what would have been sent, and the
   cool-down set as if it had fired, so the two groups are logged alike);
7. each action in order: its ``if``; a delay (a timer); a recipient; quiet hours (a
   timer to their end: deferred, not dropped); the contact budget of its audience.

The decision is ``fired`` when any action went out, was scheduled or deferred;
``suppressed: budget`` or ``failed`` when none could. Every step's reads and writes are
in the one transaction the caller commits, under the account's lock: the state is read
in one query when the lock is taken, the effects (decision and action rows, touches,
cool-downs, dedupe keys, timers, commands) collected in memory and written in one
statement at the end (:meth:`Account.flush`). Decisions that passed their conditions are
also published as ``DecisionLogged`` events (``playbooks.decisions``) from the outbox.

Time: a decision is taken as of its signal's event time (a timer's as of its due time),
not the wall clock, so replaying a stream gives the same decisions, cool-downs and
budgets as living through it. Timers fire when the wall clock reaches their due time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import quote
from zoneinfo import ZoneInfo

from pydantic import TypeAdapter

from churnguard.common.events.base import CloudEvent
from churnguard.common.events.billing import decline_kind
from churnguard.common.events.derived import (
    ActionOutcome,
    DetractorNps,
    DetractorNpsData,
    ExpansionSignalData,
    MilestoneReachedData,
    PaymentFailedSignal,
    RiskTierCrossed,
    SignalEvent,
)
from churnguard.playbooks import dunning
from churnguard.playbooks.catalogue import fields_for
from churnguard.playbooks.commands import (
    Command,
    Contact,
    decision_id,
    decision_logged,
    notification,
    payment_retry,
    resolve_recipients,
)
from churnguard.playbooks.conditions import ALWAYS, Condition, ConditionError, parse
from churnguard.playbooks.facts import (
    AccountProfile,
    ArrTiers,
    LiftRanking,
    build_facts,
    signal_name,
)
from churnguard.playbooks.guardrails import (
    ContactBudget,
    QuietHours,
    cooling_down,
    in_holdout,
    zone_or,
)
from churnguard.playbooks.loader import PlaybookSet
from churnguard.playbooks.repository import AccountState, PlaybooksRepository, Row, Writes
from churnguard.playbooks.settings import PlaybooksSettings
from churnguard.playbooks.spec import (
    DunningMessageSpec,
    DunningSpec,
    MessageSpec,
    Playbook,
    format_duration,
)
from churnguard.playbooks.tables import OPEN_DUNNING

log = logging.getLogger(__name__)

SIGNAL_ADAPTER: Final[TypeAdapter[Any]] = TypeAdapter(SignalEvent)
SCHEDULE_SIGNAL: Final = "schedule.renewal_in_days"
FIRED_STATUSES: Final = frozenset({"sent", "scheduled", "deferred", "dunning"})
OUTCOME_WAIT: Final = timedelta(days=1)
"""How long the window's end waits for the outcome of a retry already requested."""
FINAL_TIMER_GRACE: Final = timedelta(days=1)
"""A soft-decline case still open this long after its window (an outcome never came)
is concluded anyway."""


@dataclass(frozen=True)
class DecisionSummary:
    playbook: str
    outcome: str
    reason: str | None

    @property
    def reason_class(self) -> str:
        """The bounded label of the reason (``budget``, ``cooldown``, ...) for metrics."""
        if self.outcome == "not_matched":
            return "conditions"
        if self.reason is None:
            return ""
        return self.reason.split(":", 1)[0]


@dataclass
class Result:
    """What one boundary (a record, a timer) produced, for after its commit."""

    commands: list[Command] = field(default_factory=list)
    decisions: list[DecisionSummary] = field(default_factory=list)
    duplicates: int = 0
    """Decisions skipped because their key existed (a redelivered signal)."""


@dataclass(frozen=True)
class ActionStatus:
    status: str
    reason: str | None = None
    command_ids: tuple[str, ...] = ()
    due_at: datetime | None = None


@dataclass
class MessageJob:
    """One message action as it runs, now or from a timer (everything it needs to go)."""

    playbook: str
    playbook_version: str
    priority: int
    respect_quiet_hours: bool
    decision_id: str
    action_index: int | None
    id_base: str
    touch_id: str
    action: MessageSpec
    condition: Condition
    variables: dict[str, Any]
    respondent: str | None
    signal_json: str | None
    signal_type: str
    received_at: datetime | None
    """When Kafka received the signal (signal-to-command latency); None from a timer."""

    def payload(self, *, quiet_checked: bool) -> dict[str, Any]:
        return {
            "playbook": self.playbook,
            "playbook_version": self.playbook_version,
            "priority": self.priority,
            "respect_quiet_hours": self.respect_quiet_hours,
            "decision_id": self.decision_id,
            "action_index": self.action_index,
            "id_base": self.id_base,
            "touch_id": self.touch_id,
            "action": self.action.model_dump(mode="json", by_alias=True, exclude={"delay"}),
            "variables": self.variables,
            "respondent": self.respondent,
            "signal": self.signal_json,
            "signal_type": self.signal_type,
            "quiet_checked": quiet_checked,
        }


class Account:
    """The account a boundary decides about: its locked state, profile, and the effects
    the boundary has decided so far (written in one statement by :meth:`flush`)."""

    def __init__(self, repo: PlaybooksRepository, state: AccountState, tz: ZoneInfo) -> None:
        self.repo = repo
        self.state = state
        self.profile = AccountProfile.from_row(state.row, in_dunning=state.in_dunning)
        self.tz = tz
        self.writes = Writes()

    @property
    def id(self) -> str:
        return self.profile.account_id

    async def contacts(self) -> list[Contact]:
        return self.state.contacts

    def last_fired(self, playbook: str) -> datetime | None:
        return self.state.cooldowns.get(playbook)

    def fired(self, playbook: str, at: datetime) -> None:
        last = self.state.cooldowns.get(playbook)
        self.state.cooldowns[playbook] = at if last is None else max(last, at)
        self.writes.cooldowns[(self.id, playbook)] = self.state.cooldowns[playbook]

    def claim_dedupe(self, playbook: str, key: str, decision: str) -> bool:
        if (playbook, key) in self.state.dedupe:
            return False
        self.state.dedupe.add((playbook, key))
        self.writes.dedupe.append(
            {"playbook": playbook, "account_id": self.id, "key": key, "decision_id": decision}
        )
        return True

    def add_timer(
        self, *, dedupe_key: str, kind: str, due_at: datetime, payload: Mapping[str, Any]
    ) -> None:
        self.writes.timers.append(
            {
                "dedupe_key": dedupe_key,
                "kind": kind,
                "account_id": self.id,
                "due_at": due_at,
                "payload": dict(payload),
            }
        )

    async def cancel_timers(
        self, *, case_id: str, kinds: tuple[str, ...] = (), reason: str, at: datetime
    ) -> None:
        """Cancel the case's timers, recorded ones and ones this boundary added."""
        await self.repo.cancel_timers(self.id, case_id=case_id, kinds=kinds, reason=reason, at=at)
        self.writes.timers = [
            t
            for t in self.writes.timers
            if not (t["payload"].get("case_id") == case_id and (not kinds or t["kind"] in kinds))
        ]

    async def flush(self) -> int:
        """Write the boundary's effects; how many decisions were new."""
        writes, self.writes = self.writes, Writes()
        return await self.repo.flush(writes)


def dump_policy(policy: DunningSpec) -> dict[str, Any]:
    """The dunning action as JSON that :class:`DunningSpec` reads back (durations in s)."""

    def convert(value: Any) -> Any:
        if isinstance(value, timedelta):
            return f"{int(value.total_seconds())}s"
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    out: dict[str, Any] = convert(policy.model_dump(mode="python"))
    return out


class DecisionEngine:
    def __init__(
        self,
        settings: PlaybooksSettings,
        playbooks: Callable[[], PlaybookSet],
        lift: LiftRanking,
    ) -> None:
        self.playbooks = playbooks
        self.lift = lift
        self.arr_tiers = ArrTiers.parse(settings.arr_tier_bounds)
        self.budgets = {
            "customer": ContactBudget(
                settings.customer_budget, timedelta(days=settings.customer_budget_days)
            ),
            "internal": ContactBudget(
                settings.internal_budget, timedelta(days=settings.internal_budget_days)
            ),
        }
        self.quiet = QuietHours.parse(settings.quiet_hours) if settings.quiet_hours else None
        self.quiet_channels = settings.quiet_channel_set
        self.default_tz = settings.default_timezone
        self.console_url = settings.console_url.rstrip("/")
        self.help_url = settings.help_url.rstrip("/")
        self.update_payment_url = settings.update_payment_url

    # -- accounts -----------------------------------------------------------------------

    async def _account(
        self, repo: PlaybooksRepository, account_id: str, at: datetime, signal_id: str = ""
    ) -> Account:
        state = await repo.load_account(
            account_id,
            signal_id=signal_id,
            at=at,
            windows={audience: budget.window for audience, budget in self.budgets.items()},
        )
        tz_name = state.row["timezone"] or state.contact_timezone
        return Account(repo, state, zone_or(tz_name, self.default_tz))

    def _facts(self, account: Account, at: datetime, signal: CloudEvent | None) -> dict[str, Any]:
        return build_facts(
            account.profile, at, signal=signal, arr_tiers=self.arr_tiers, lift=self.lift
        )

    # -- signals ------------------------------------------------------------------------

    async def decide_signal(
        self, repo: PlaybooksRepository, signal: CloudEvent, received_at: datetime | None = None
    ) -> Result:
        result = Result()
        playbooks = self.playbooks().for_signal(signal_name(signal))
        if not playbooks:
            return result
        account = await self._account(repo, signal.subject, signal.time, signal.id)
        todo = [p for p in playbooks if p.name not in account.state.decided]
        result.duplicates = len(playbooks) - len(todo)
        if not todo:
            return result
        facts = self._facts(account, signal.time, signal)
        for playbook in todo:
            await self._decide(
                account,
                playbook,
                signal.id,
                signal_name(signal),
                signal.time,
                signal,
                facts,
                result,
                received_at,
            )
        await self._flush(account, result)
        return result

    async def _flush(self, account: Account, result: Result) -> None:
        expected = len(account.writes.decisions)
        result.commands += account.writes.commands
        if await account.flush() != expected:
            # the row lock and the decided check make this impossible unless two writers
            # bypass the lock; never let a second decision's effects commit
            raise RuntimeError(f"decisions of account {account.id} exist already")

    async def _decide(
        self,
        account: Account,
        playbook: Playbook,
        signal_id: str,
        signal_type: str,
        at: datetime,
        signal: CloudEvent | None,
        facts: dict[str, Any],
        result: Result,
        received_at: datetime | None = None,
    ) -> None:
        did = decision_id(signal_id, playbook.name)
        spec = playbook.spec
        detail: dict[str, Any] = {
            "facts": {f: facts.get(f) for f in sorted(playbook.conditions.fields())},
        }
        holdout = False
        statuses: list[tuple[int, str, str, ActionStatus]] = []
        outcome, reason = "fired", None
        before = len(account.writes.commands)
        if not playbook.conditions.holds(facts):
            outcome, reason = "not_matched", playbook.conditions.explain_failure(facts)
        else:
            stop = await self._guard_rails(account, playbook, did, at, facts, detail)
            if stop is not None:
                outcome, reason = "suppressed", stop
            elif in_holdout(playbook.name, account.id, spec.holdout_percent):
                outcome, holdout = "suppressed", True
                reason = f"holdout: in the {spec.holdout_percent:g}% held out of {playbook.name}"
                account.fired(playbook.name, at)
                statuses = [
                    (i, _channel(a), _audience(a), ActionStatus("held_out"))
                    for i, a in enumerate(playbook.actions)
                ]
            else:
                statuses = await self._run_actions(
                    account, playbook, did, at, signal, signal_type, facts, result, received_at
                )
                outcome, reason = _outcome(statuses)
                if outcome == "fired":
                    account.fired(playbook.name, at)
        account.writes.decisions.append(
            {
                "decision_id": did,
                "signal_id": signal_id,
                "signal_type": signal_type,
                "playbook": playbook.name,
                "playbook_version": playbook.version,
                "account_id": account.id,
                "decided_at": at,
                "outcome": outcome,
                "reason": reason,
                "holdout": holdout,
                "detail": detail,
            }
        )
        now = datetime.now(UTC)
        account.writes.actions.extend(
            [
                {
                    "decision_id": did,
                    "action_index": i,
                    "channel": channel,
                    "audience": audience,
                    "status": s.status,
                    "reason": s.reason,
                    "command_ids": list(s.command_ids),
                    "due_at": s.due_at,
                    "updated_at": now,
                }
                for i, channel, audience, s in statuses
            ]
        )
        summary = DecisionSummary(playbook.name, outcome, reason)
        result.decisions.append(summary)
        if outcome != "not_matched":
            # the console's view of the decision log: what fired and what was held back
            account.writes.commands.append(
                decision_logged(
                    decision=did,
                    account_id=account.id,
                    at=at,
                    playbook=playbook.name,
                    trigger_type=signal.type if signal is not None else signal_type,
                    trigger_id=signal_id,
                    outcome=outcome,
                    reason_class=summary.reason_class,
                    reason=reason,
                    holdout=holdout,
                    commands=[c.command_id for c in account.writes.commands[before:]],
                    priority=spec.priority,
                )
            )
        log.info(
            "decision %s %s%s",
            playbook.name,
            outcome,
            f" ({reason})" if reason else "",
            extra={"decision_id": did, "playbook": playbook.name, "outcome": outcome},
        )

    async def _guard_rails(
        self,
        account: Account,
        playbook: Playbook,
        did: str,
        at: datetime,
        facts: Mapping[str, Any],
        detail: dict[str, Any],
    ) -> str | None:
        spec = playbook.spec
        if spec.dedupe_by:
            values = {name: facts.get(name) for name in spec.dedupe_by}
            key = json.dumps([values[name] for name in spec.dedupe_by], default=str)
            detail["dedupe_key"] = values
            if not account.claim_dedupe(playbook.name, key, did):
                shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
                return f"dedupe: already decided for {shown}"
        last = account.last_fired(playbook.name)
        if cooling_down(last, at, spec.cooldown):
            assert last is not None
            return (
                f"cooldown: fired at {last.isoformat()}, {format_duration(spec.cooldown)} "
                f"cool-down until {(last + spec.cooldown).isoformat()}"
            )
        if spec.suppress_while_dunning and facts.get("in_dunning"):
            return "dunning: a payment of the account is failing (upsell suppressed)"
        return None

    async def _run_actions(
        self,
        account: Account,
        playbook: Playbook,
        did: str,
        at: datetime,
        signal: CloudEvent | None,
        signal_type: str,
        facts: dict[str, Any],
        result: Result,
        received_at: datetime | None,
    ) -> list[tuple[int, str, str, ActionStatus]]:
        statuses = []
        signal_json = None if signal is None else signal.to_json().decode()
        for i, action in enumerate(playbook.actions):
            if isinstance(action, DunningSpec):
                assert isinstance(signal, PaymentFailedSignal)  # the loader ensures it
                status = await self._open_dunning(account, playbook, did, action, signal, result)
                statuses.append((i, "payment_retry", "customer", status))
                continue
            job = MessageJob(
                playbook=playbook.name,
                playbook_version=playbook.version,
                priority=playbook.spec.priority,
                respect_quiet_hours=playbook.spec.respect_quiet_hours,
                decision_id=did,
                action_index=i,
                id_base=f"{did}.{i}",
                touch_id=f"{did}.{i}",
                action=action,
                condition=playbook.action_conditions[i],
                variables=self._variables(
                    action.template,
                    self._pool(account, playbook.name, facts, signal, signal_type),
                    facts,
                    action.variables,
                    playbook.variable_refs[i] if playbook.variable_refs else {},
                ),
                respondent=_respondent(signal),
                signal_json=signal_json,
                signal_type=signal_type,
                received_at=received_at,
            )
            if action.delay > timedelta(0):
                due = at + action.delay
                account.add_timer(
                    dedupe_key=f"{job.id_base}.delay",
                    kind="message",
                    due_at=due,
                    payload=job.payload(quiet_checked=False),
                )
                status = ActionStatus(
                    "scheduled", f"delay: {format_duration(action.delay)}", due_at=due
                )
            else:
                status = await self._message(account, job, facts, at, result, quiet_checked=False)
            statuses.append((i, action.type, action.effective_audience, status))
        return statuses

    # -- messages -----------------------------------------------------------------------

    def _pool(
        self,
        account: Account,
        playbook: str,
        facts: Mapping[str, Any],
        signal: CloudEvent | None,
        signal_type: str,
    ) -> dict[str, Any]:
        """What playbooks can tell a message about the account (catalogue.MESSAGE_VARIABLES);
        money in the currency's minor unit, as notify takes it."""
        profile = account.profile
        if isinstance(signal, RiskTierCrossed) and signal.data.reasons:
            reasons = [r.model_dump(mode="json") for r in signal.data.reasons]
        else:
            reasons = list(profile.reasons)
        unadopted = facts.get("unadopted_sticky_features") or []
        guide = facts.get("guide_feature")
        health, renewal = facts.get("health"), facts.get("days_to_renewal")
        pool: dict[str, Any] = {
            "account_id": account.id,
            "account_name": profile.name or account.id,
            "plan": profile.plan,
            "segment": profile.segment,
            "arr": _cents(facts.get("arr")),
            "mrr": _cents(facts.get("mrr")),
            "currency": profile.currency,
            "health": None if health is None else round(health),
            "tier": facts.get("tier"),
            "churn_probability": facts.get("churn_probability"),
            "reasons": reasons,
            "console_url": f"{self.console_url}/accounts/{quote(account.id, safe='')}",
            "owner": profile.csm,
            "csm_name": profile.csm,
            "account_owner": profile.owner,
            "days_to_renewal": None if renewal is None or renewal < 0 else round(renewal),
            "features": self.lift.ordered(unadopted) or None,
            "feature": guide,
            "help_url": f"{self.help_url}/{quote(guide)}" if guide else self.help_url,
            "playbook": playbook,
            "signal_type": signal_type,
            "signal_id": None if signal is None else signal.id,
        }
        data = None if signal is None else signal.data
        if isinstance(signal, RiskTierCrossed):
            pool["previous_health"] = signal.data.previous_health
            pool["previous_tier"] = signal.data.from_tier
        elif isinstance(data, DetractorNpsData):
            pool.update({"score": data.score, "comment": data.comment})
        elif isinstance(data, ExpansionSignalData):
            pool.update(
                {"expansion_reason": data.reason, "seats_utilisation": data.seats_utilisation}
            )
        elif isinstance(data, MilestoneReachedData):
            pool.update({"milestone": data.milestone, "milestone_value": data.value})
        return pool

    def _variables(
        self,
        template: str,
        pool: Mapping[str, Any],
        facts: Mapping[str, Any],
        action_variables: Mapping[str, Any],
        refs: Mapping[str, str],
    ) -> dict[str, Any]:
        """The template's variables, no more (notify refuses unknown ones): the known ones
        of the pool, then the action's own (literals, or ``$field`` facts)."""
        spec = self.playbooks().templates.get(template)
        accepted = spec.accepted if spec is not None else frozenset(pool)
        out = {k: pool[k] for k in accepted if pool.get(k) is not None}
        for name, value in action_variables.items():
            out[name] = facts.get(refs[name]) if name in refs else value
        return out

    async def _message(
        self,
        account: Account,
        job: MessageJob,
        facts: Mapping[str, Any],
        at: datetime,
        result: Result,
        *,
        quiet_checked: bool,
    ) -> ActionStatus:
        action = job.action
        if not job.condition.holds(facts):
            return ActionStatus("skipped", "if: " + job.condition.explain_failure(facts))
        recipients = resolve_recipients(
            action.to,
            action.type,
            csm=account.profile.csm,
            owner=account.profile.owner,
            contacts=await account.contacts() if action.to in _NEEDS_CONTACTS else [],
            respondent=job.respondent,
            fallback=action.fallback,
            limit=action.max_recipients,
        )
        if not recipients:
            return ActionStatus("failed", f"no recipient: the account has no {action.to} known")
        if (
            not quiet_checked
            and job.respect_quiet_hours
            and self.quiet is not None
            and action.type in self.quiet_channels
        ):
            until = self.quiet.deferral(at, account.tz)
            if until is not None:
                account.add_timer(
                    dedupe_key=f"{job.id_base}.quiet",
                    kind="message",
                    due_at=until,
                    payload=job.payload(quiet_checked=True),
                )
                return ActionStatus(
                    "deferred",
                    f"quiet_hours: in {account.tz.key} until {until.isoformat()}",
                    due_at=until,
                )
        audience = action.effective_audience
        budget = self.budgets[audience]
        if not action.transactional:
            used = account.state.touches[audience]
            if not budget.allows(used):
                return ActionStatus(
                    "suppressed",
                    f"budget: {used} {audience} touches in {format_duration(budget.window)} "
                    f"(limit {budget.limit})",
                )
        account.state.touches[audience] += 1
        account.writes.touches.append(
            {
                "touch_id": job.touch_id,
                "account_id": account.id,
                "audience": audience,
                "channel": action.type,
                "playbook": job.playbook,
                "at": at,
                "transactional": action.transactional,
            }
        )
        commands = [
            notification(
                command_id=f"{job.id_base}.{r}",
                account_id=account.id,
                at=at,
                channel=action.type,
                template=action.template,
                recipient=recipient,
                playbook=job.playbook,
                decision=job.decision_id,
                priority=job.priority,
                variables=job.variables,
                received_at=job.received_at,
            )
            for r, recipient in enumerate(recipients)
        ]
        account.writes.commands += commands
        return ActionStatus("sent", None, tuple(c.command_id for c in commands))

    # -- dunning ------------------------------------------------------------------------

    async def _open_dunning(
        self,
        account: Account,
        playbook: Playbook,
        did: str,
        policy: DunningSpec,
        signal: PaymentFailedSignal,
        result: Result,
    ) -> ActionStatus:
        repo, data, at = account.repo, signal.data, signal.time
        hard = data.decline_kind == "hard" or decline_kind(data.decline_code) == "hard"
        if await repo.is_paid(account.id, data.invoice_id):
            return ActionStatus("skipped", f"invoice {data.invoice_id} is paid already")
        case = await repo.case_for_invoice(account.id, data.invoice_id)
        if case is not None:
            if case["status"] == "retrying" and hard:
                await self._to_card_update(account, case, at, signal.id, result)
                return ActionStatus(
                    "dunning",
                    f"hard decline ({data.decline_code}) on invoice {data.invoice_id}: "
                    "pending retries cancelled, card update requested",
                )
            if case["status"] in OPEN_DUNNING:
                return ActionStatus(
                    "suppressed",
                    f"dedupe: dunning of invoice {data.invoice_id} is open (case "
                    f"{case['case_id']}, {case['status']})",
                )
            return ActionStatus(
                "suppressed",
                f"dedupe: dunning of invoice {data.invoice_id} concluded ({case['status']})",
            )
        case_row = {
            "case_id": did,
            "account_id": account.id,
            "invoice_id": data.invoice_id,
            "playbook": playbook.name,
            "policy": dump_policy(policy),
            "status": "awaiting_card_update" if hard else "retrying",
            "decline_code": data.decline_code,
            "decline_kind": "hard" if hard else "soft",
            "amount": data.amount_due,
            "currency": data.currency,
            "failed_at": at,
            "attempts": 0,
            "updated_at": datetime.now(UTC),
        }
        await repo.insert_case(case_row)
        case_row["priority"] = playbook.spec.priority
        if hard:
            account.add_timer(
                dedupe_key=f"{did}.final",
                kind="dunning_final",
                due_at=at + policy.window,
                payload={"case_id": did},
            )
            await self._dunning_message(
                account, case_row, policy, policy.card_update, "card.0", at, result, signal.id
            )
            return ActionStatus(
                "dunning",
                f"hard decline ({data.decline_code}): never retried; card update requested",
            )
        first = await self._schedule_retry(account, case_row, policy, 1, at)
        account.add_timer(
            dedupe_key=f"{did}.final",
            kind="dunning_final",
            due_at=at + policy.window + FINAL_TIMER_GRACE,
            payload={"case_id": did},
        )
        if policy.notice is not None:
            await self._dunning_message(
                account,
                case_row,
                policy,
                policy.notice,
                "notice",
                at,
                result,
                signal.id,
                next_attempt_at=first,
            )
        planned = len(policy.delays_for(data.decline_code))
        return ActionStatus(
            "dunning",
            f"soft decline ({data.decline_code}): retry 1 of {planned} at {first.isoformat()}",
            due_at=first,
        )

    async def _schedule_retry(
        self,
        account: Account,
        case: Mapping[str, Any],
        policy: DunningSpec,
        attempt: int,
        now: datetime,
    ) -> datetime:
        when = dunning.attempt_time(
            policy,
            case_decline_code=case["decline_code"],
            failed_at=case["failed_at"],
            attempt=attempt,
            tz=account.tz,
            previous_attempt_at=case.get("last_attempt_at"),
            now=now,
        )
        account.add_timer(
            dedupe_key=f"{case['case_id']}.retry.{attempt}",
            kind="dunning_retry",
            due_at=when,
            payload={"case_id": case["case_id"], "attempt": attempt},
        )
        await account.repo.update_case(
            case["case_id"], {"next_attempt_at": when, "updated_at": datetime.now(UTC)}
        )
        return when

    async def _dunning_message(
        self,
        account: Account,
        case: Mapping[str, Any],
        policy: DunningSpec,
        message: DunningMessageSpec | MessageSpec,
        suffix: str,
        at: datetime,
        result: Result,
        signal_id: str | None,
        *,
        next_attempt_at: datetime | None = None,
        final_state: str | None = None,
    ) -> ActionStatus:
        spec = (
            message
            if isinstance(message, MessageSpec)
            else MessageSpec(
                type=message.type,
                template=message.template,
                to=message.to,
                fallback=message.fallback,
                max_recipients=message.max_recipients,
                transactional=True,
            )
        )
        facts = self._facts(account, at, None)
        pool = self._pool(account, case["playbook"], facts, None, "payment_failed")
        pool.update(
            {
                "signal_id": signal_id,
                "invoice_id": case["invoice_id"],
                "amount": case["amount"],
                "currency": case["currency"],
                "decline_code": case["decline_code"],
                "attempts": case.get("attempts", 0),
                "next_retry_at": None if next_attempt_at is None else next_attempt_at.isoformat(),
                "update_payment_url": self.update_payment_url,
                "final_state": final_state,
            }
        )
        variables = self._variables(spec.template, pool, facts, {}, {})
        job = MessageJob(
            playbook=case["playbook"],
            playbook_version="",
            priority=int(case.get("priority", 100)),
            respect_quiet_hours=spec.type != "webhook",
            decision_id=case["case_id"],
            action_index=None,
            id_base=f"{case['case_id']}.{suffix}",
            touch_id=f"{case['case_id']}.{suffix}",
            action=spec,
            condition=ALWAYS,
            variables=variables,
            respondent=None,
            signal_json=None,
            signal_type="payment_failed",
            received_at=None,
        )
        return await self._message(account, job, {}, at, result, quiet_checked=False)

    async def _to_card_update(
        self,
        account: Account,
        case: Mapping[str, Any],
        at: datetime,
        signal_id: str | None,
        result: Result,
    ) -> None:
        repo = account.repo
        policy = DunningSpec.model_validate(case["policy"])
        await account.cancel_timers(
            case_id=case["case_id"],
            kinds=("dunning_retry",),
            reason="hard decline: never retried",
            at=at,
        )
        await repo.update_case(
            case["case_id"],
            {
                "status": "awaiting_card_update",
                "next_attempt_at": None,
                "updated_at": datetime.now(UTC),
            },
        )
        await self._dunning_message(
            account,
            {**case, "priority": 100},
            policy,
            policy.card_update,
            f"card.{case['attempts']}",
            at,
            result,
            signal_id,
        )

    async def _conclude(
        self, account: Account, case: Mapping[str, Any], at: datetime, result: Result, why: str
    ) -> None:
        repo = account.repo
        policy = DunningSpec.model_validate(case["policy"])
        await account.cancel_timers(case_id=case["case_id"], reason=why, at=at)
        await repo.update_case(
            case["case_id"],
            {
                "status": policy.final_state,
                "final_state": policy.final_state,
                "concluded_at": at,
                "next_attempt_at": None,
                "updated_at": datetime.now(UTC),
            },
        )
        case = {**case, "priority": 100}
        webhook = MessageSpec(
            type="webhook",
            template="dunning_final_state",
            to=policy.final_state_webhook,
            transactional=True,
        )
        await self._dunning_message(
            account,
            case,
            policy,
            webhook,
            "final",
            at,
            result,
            None,
            final_state=policy.final_state,
        )
        if policy.final_notice is not None:
            await self._dunning_message(
                account,
                case,
                policy,
                policy.final_notice,
                "final_notice",
                at,
                result,
                None,
                final_state=policy.final_state,
            )
        log.info(
            "dunning of invoice %s concluded: %s (%s)",
            case["invoice_id"],
            policy.final_state,
            why,
            extra={"case_id": case["case_id"], "account_id": account.id},
        )

    # -- outcomes and billing -----------------------------------------------------------

    async def on_outcome(self, repo: PlaybooksRepository, outcome: ActionOutcome) -> Result:
        result = Result()
        data = outcome.data
        if not await repo.claim_outcome(outcome.id, data.action_id, data.status, outcome.time):
            result.duplicates = 1
            return result
        if data.action == "payment_retry":
            await self._retry_outcome(repo, outcome, result)
            return result
        parts = data.action_id.split(".")
        if len(parts) == 3 and parts[0].startswith("dec_") and parts[1].isdigit():
            decision, index = parts[0], int(parts[1])
            action = await repo.action(decision, index)
            if action is None:
                return result
            await repo.set_delivery(decision, index, data.status, outcome.time)
            ids = list(action["command_ids"] or [])
            if data.status == "failed" and ids and await repo.failed_commands(ids) == len(ids):
                # nobody got it: it was no touch, so it does not use the budget
                await repo.void_touch(f"{decision}.{index}")
        return result

    async def _retry_outcome(
        self, repo: PlaybooksRepository, outcome: ActionOutcome, result: Result
    ) -> None:
        data = outcome.data
        attempt = await repo.attempt(data.action_id)
        if attempt is None:
            log.warning("outcome of an unknown payment retry %s", data.action_id)
            return
        account = await self._account(repo, outcome.subject, outcome.time)
        if await repo.set_attempt_outcome(
            data.action_id, data.status, data.decline_code, outcome.time
        ):
            await self._retry_step(account, outcome, attempt, result)
            await self._flush(account, result)

    async def _retry_step(
        self, account: Account, outcome: ActionOutcome, attempt: Row, result: Result
    ) -> None:
        repo, data = account.repo, outcome.data
        case = await repo.case(attempt["case_id"])
        if case is None or case["status"] != "retrying":
            return
        at = outcome.time
        if data.status in ("payment_succeeded", "suppressed"):
            await self._recovered(account, case, at, f"retry {attempt['attempt']}: {data.status}")
            return
        policy = DunningSpec.model_validate(case["policy"])
        code = data.decline_code or case["decline_code"]
        step = dunning.next_step(policy, case["decline_code"], case["attempts"], code)
        if step == "retry":
            await self._schedule_retry(account, case, policy, case["attempts"] + 1, at)
        elif step == "card_update":
            await self._to_card_update(account, case, at, None, result)
        else:
            await self._conclude(account, case, at, result, f"{case['attempts']} retries failed")

    async def _recovered(
        self, account: Account, case: Mapping[str, Any], at: datetime, why: str
    ) -> None:
        await account.cancel_timers(case_id=case["case_id"], reason=f"recovered: {why}", at=at)
        await account.repo.update_case(
            case["case_id"],
            {
                "status": "recovered",
                "concluded_at": at,
                "next_attempt_at": None,
                "updated_at": datetime.now(UTC),
            },
        )
        log.info(
            "dunning of invoice %s recovered (%s)",
            case["invoice_id"],
            why,
            extra={"case_id": case["case_id"], "account_id": account.id},
        )

    async def on_invoice_paid(
        self, repo: PlaybooksRepository, account_id: str, invoice_id: str, at: datetime
    ) -> None:
        """A paid invoice ends its dunning: pending retries and messages are cancelled."""
        await repo.mark_paid(account_id, invoice_id, at)
        case = await repo.case_for_invoice(account_id, invoice_id)
        if case is not None and case["status"] in OPEN_DUNNING:
            account = await self._account(repo, account_id, at)
            await self._recovered(account, case, at, "invoice paid")
            await account.flush()

    # -- timers -------------------------------------------------------------------------

    async def fire_timer(
        self, repo: PlaybooksRepository, timer: Row, now: datetime | None = None
    ) -> Result:
        """Fire one due timer; ``now`` is the loop's clock (the wall clock in service)."""
        result = Result()
        payload, due = timer["payload"], timer["due_at"]
        account = await self._account(repo, timer["account_id"], due)
        kind = timer["kind"]
        if kind == "message":
            await self._fire_message(account, payload, due, result)
        elif kind == "dunning_retry":
            await self._fire_retry(account, payload, due, result)
        elif kind == "dunning_final":
            case = await repo.case(payload["case_id"])
            if case is not None and case["status"] in OPEN_DUNNING:
                await self._fire_final(account, case, payload, due, now or due, result)
        elif kind == "schedule":
            await self._fire_schedule(account, payload, due, result)
        else:
            log.error("unknown timer kind %s (timer %s)", kind, timer["timer_id"])
        await self._flush(account, result)
        return result

    async def _fire_message(
        self, account: Account, payload: Mapping[str, Any], due: datetime, result: Result
    ) -> None:
        signal = SIGNAL_ADAPTER.validate_json(payload["signal"]) if payload["signal"] else None
        action = MessageSpec.model_validate(payload["action"])
        signal_type = payload["signal_type"]
        status: ActionStatus
        try:
            known = fields_for(signal_type if signal is not None else None)
            condition = parse(action.if_, known, ("if",)) if action.if_ else ALWAYS
        except ConditionError as exc:
            status = ActionStatus("failed", f"if: {exc.message}")
        else:
            job = MessageJob(
                playbook=payload["playbook"],
                playbook_version=payload["playbook_version"],
                priority=payload["priority"],
                respect_quiet_hours=payload["respect_quiet_hours"],
                decision_id=payload["decision_id"],
                action_index=payload["action_index"],
                id_base=payload["id_base"],
                touch_id=payload["touch_id"],
                action=action,
                condition=condition,
                variables=payload["variables"],
                respondent=payload["respondent"],
                signal_json=payload["signal"],
                signal_type=signal_type,
                received_at=None,
            )
            facts = self._facts(account, due, signal)
            status = await self._message(
                account, job, facts, due, result, quiet_checked=payload["quiet_checked"]
            )
        if payload["action_index"] is not None:
            account.writes.actions.extend(
                [
                    {
                        "decision_id": payload["decision_id"],
                        "action_index": payload["action_index"],
                        "channel": action.type,
                        "audience": action.effective_audience,
                        "status": status.status,
                        "reason": status.reason,
                        "command_ids": list(status.command_ids),
                        "due_at": status.due_at or due,
                        "updated_at": datetime.now(UTC),
                    }
                ]
            )

    async def _fire_final(
        self,
        account: Account,
        case: Mapping[str, Any],
        payload: Mapping[str, Any],
        due: datetime,
        now: datetime,
        result: Result,
    ) -> None:
        """The dunning window ended. A retry still waiting for its outcome gets it first:
        the outcome schedules the next retry or concludes; the window's end only concludes
        when that outcome is OUTCOME_WAIT late (by the wall clock: it waits for notify)."""
        waiting = (
            case["status"] == "retrying"
            and case["attempts"] > 0
            and await account.repo.attempt_outcome(case["case_id"], case["attempts"]) is None
        )
        if waiting and not payload.get("after_wait"):
            account.add_timer(
                dedupe_key=f"{case['case_id']}.final.wait.{case['attempts']}",
                kind="dunning_final",
                due_at=max(due, now) + OUTCOME_WAIT,
                payload={"case_id": case["case_id"], "after_wait": True},
            )
            return
        why = (
            f"no outcome of retry {case['attempts']} within {format_duration(OUTCOME_WAIT)}"
            if waiting
            else "dunning window ended unpaid"
        )
        await self._conclude(account, case, due, result, why)

    async def _fire_retry(
        self, account: Account, payload: Mapping[str, Any], due: datetime, result: Result
    ) -> None:
        repo = account.repo
        case = await repo.case(payload["case_id"])
        attempt = int(payload["attempt"])
        if case is None or case["status"] != "retrying" or case["attempts"] != attempt - 1:
            return
        command_id = f"{case['case_id']}.retry.{attempt}"
        await repo.insert_attempt(
            {
                "command_id": command_id,
                "case_id": case["case_id"],
                "attempt": attempt,
                "scheduled_for": due,
            }
        )
        await repo.update_case(
            case["case_id"],
            {
                "attempts": attempt,
                "last_attempt_at": due,
                "next_attempt_at": None,
                "updated_at": datetime.now(UTC),
            },
        )
        log.info(
            "payment retry %d of invoice %s requested",
            attempt,
            case["invoice_id"],
            extra={"case_id": case["case_id"], "command_id": command_id},
        )
        account.writes.commands.extend(
            [
                payment_retry(
                    command_id=command_id,
                    account_id=account.id,
                    at=due,
                    invoice_id=case["invoice_id"],
                    attempt=attempt,
                    amount=case["amount"],
                    currency=case["currency"],
                    decline_code=case["decline_code"] or "unknown",
                    playbook=case["playbook"],
                    decision=case["case_id"],
                    received_at=None,
                )
            ]
        )

    # -- schedule triggers ----------------------------------------------------------------

    async def schedule_renewals(
        self,
        repo: PlaybooksRepository,
        account_id: str,
        renewal: Any,
        at: datetime,
        days_to_renewal: int,
    ) -> None:
        """Timers for the schedule-triggered playbooks of an account's renewal date.

        A renewal learned less than N days ahead is not scheduled for an N-day playbook:
        its moment has passed (the signal-triggered playbooks cover late discoveries).
        """
        for playbook in self.playbooks().scheduled():
            days = playbook.renewal_in_days
            assert days is not None
            if days_to_renewal < days:
                continue
            await repo.add_timer(
                dedupe_key=f"schedule.{playbook.name}.{account_id}.{renewal.isoformat()}",
                kind="schedule",
                account_id=account_id,
                due_at=at + timedelta(days=days_to_renewal - days),
                payload={"playbook": playbook.name, "renewal_date": renewal.isoformat()},
            )

    async def _fire_schedule(
        self, account: Account, payload: Mapping[str, Any], due: datetime, result: Result
    ) -> None:
        playbook = self.playbooks().get(payload["playbook"])
        if playbook is None or not playbook.spec.enabled or playbook.renewal_in_days is None:
            log.info(
                "scheduled playbook %s is gone or disabled: timer dropped", payload["playbook"]
            )
            return
        renewal = account.profile.renewal_date
        if renewal is None or renewal.isoformat() != payload["renewal_date"]:
            return  # the renewal moved; the new date has its own timer
        signal_id = f"schedule:{playbook.name}:{account.id}:{payload['renewal_date']}"
        if playbook.name in await account.repo.decided_playbooks(signal_id):
            result.duplicates += 1
            return
        facts = self._facts(account, due, None)
        await self._decide(account, playbook, signal_id, SCHEDULE_SIGNAL, due, None, facts, result)


_NEEDS_CONTACTS: Final = frozenset({"admins", "contacts", "respondent"})


def _cents(units: float | None) -> int | None:
    return None if units is None or units < 0 else round(units * 100)


def _respondent(signal: CloudEvent | None) -> str | None:
    return signal.data.user_id if isinstance(signal, DetractorNps) else None


def _channel(action: MessageSpec | DunningSpec) -> str:
    return "payment_retry" if isinstance(action, DunningSpec) else action.type


def _audience(action: MessageSpec | DunningSpec) -> str:
    return "customer" if isinstance(action, DunningSpec) else action.effective_audience


def _outcome(statuses: list[tuple[int, str, str, ActionStatus]]) -> tuple[str, str | None]:
    states = [s for _, _, _, s in statuses]
    if any(s.status in FIRED_STATUSES for s in states):
        return "fired", None
    for wanted in ("suppressed", "failed"):
        first = next((s for s in states if s.status == wanted), None)
        if first is not None:
            return wanted, first.reason
    first_skip = next((s for s in states if s.status == "skipped"), None)
    return "not_matched", None if first_skip is None else first_skip.reason
