"""The scoring worker's state and logic, without Faust (``app.py`` wires it to Kafka).

Per source partition the engine keeps every account's record in a plain dict: its
feature state (:class:`~churnguard.scoring.features.AccountState`), its revenue ledger
(:class:`~churnguard.scoring.revenue.RevenueLedger`) and what its signals remember
(:class:`~churnguard.scoring.signals.SignalState`). Events update records a whole
envelope at a time; nothing is written per event.

Durability is by **buckets** (DESIGN.md, "Throughput: measured facts"): an account
belongs to one of :data:`BUCKETS` buckets of its partition; a touched account marks its
bucket dirty, and at each commit the app writes every dirty bucket, compressed, as one
changelog record of its partition, before Faust commits the offsets (so table writes per
second are bounded by buckets, never by events). After a restart the buckets of the
assigned partitions are read back (:meth:`ScoringEngine.load_bucket`).

Scoring is in micro-batches (:meth:`ScoringEngine.score_pending`): accounts touched since
their last score, and every account of a partition once the day rolls (silent accounts
rise in risk without any new event), are scored together in one ONNX call.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import islice
from typing import Any, Final

import cramjam
import numpy as np
import orjson

from churnguard.scoring.features import (
    AccountState,
    InvalidEventError,
    day_ordinal,
)
from churnguard.scoring.model import ModelWatcher, Score, health_for
from churnguard.scoring.revenue import RevenueLedger
from churnguard.scoring.signals import (
    SignalState,
    event_signals,
    next_tier,
    raw_tier,
    score_signals,
    worth_emitting,
)

BUCKETS: Final = 64
"""Buckets per partition: the unit of changelog writes."""
FUTURE_DAYS: Final = 1
"""Events dated more than this many days after the wall clock are rejected: one bad clock
must not move the stream's time (and make every account look silent)."""
BILLING_PREFIX: Final = "churnguard.billing."

Output = tuple[str, dict[str, Any]]
"""``(kind, event)``: kind is ``scores``, ``signals`` or ``revenue``."""


class RejectedEvent(ValueError):
    """An event the engine cannot use; it goes to the dead-letter topic with the reason."""

    def __init__(self, event: Any, reason: str, index: int = -1) -> None:
        super().__init__(reason)
        self.event = event
        self.reason = reason
        self.index = index
        """Position of the event in the batch given to :meth:`ScoringEngine.apply`."""


def tier_of(record: AccountRecord, probability: float) -> str:
    return next_tier(record.signals.tier, float(probability))


def bucket_of(account: str, buckets: int = BUCKETS) -> int:
    return zlib.crc32(account.encode()) % buckets


@dataclass(slots=True)
class AccountRecord:
    account: str
    bucket: int
    features: AccountState
    revenue: RevenueLedger
    signals: SignalState
    blob: bytes | None = None
    """The record as last encoded for its bucket; None once it changed since."""


Progress = dict[str, tuple[int, int]]
"""Source topic -> (offset, position) of the last event applied from it; position -1 is a
record's last event."""
Origin = tuple[str, int, int]
"""(source topic, record offset, position of the event in the record; -1: its last)."""
_LAST = 1 << 31


def _rank(position: tuple[int, int]) -> tuple[int, int]:
    return position[0], position[1] if position[1] >= 0 else _LAST


def already_applied(progress: Progress, origin: Origin) -> bool:
    done = progress.get(origin[0])
    if done is None:
        return False
    return _rank(origin[1:]) <= _rank(done)


def furthest(a: Progress, b: Progress) -> Progress:
    """Per topic, the later of two progress marks."""
    merged = dict(a)
    for topic, done in b.items():
        known = merged.get(topic)
        if known is None or _rank(done) > _rank(known):
            merged[topic] = done
    return merged


def covers(a: Progress, b: Progress) -> bool:
    """``a`` is at or past ``b`` in every topic of ``b``."""
    return all(t in a and _rank(a[t]) >= _rank(done) for t, done in b.items())


@dataclass
class PartitionState:
    records: dict[str, AccountRecord] = field(default_factory=dict)
    members: dict[int, list[AccountRecord]] = field(default_factory=dict)
    """Bucket → its records (so a persist touches the dirty buckets' records only)."""
    dirty: set[int] = field(default_factory=set)
    pending: dict[str, None] = field(default_factory=dict)
    """Accounts to score, oldest first (an account touched again keeps its place)."""
    urgent: dict[str, None] = field(default_factory=dict)
    """Accounts to score before the others: touched by a billing, feedback or seats event
    (what moves a score most), or new."""
    rescored_day: int = -1
    progress: Progress = field(default_factory=dict)
    """How far this partition's sources have been consumed in this process: every event
    up to it was applied (or skipped as already held). Written with every bucket."""
    restored: dict[int, Progress] = field(default_factory=dict)
    """Per restored bucket, the progress it was written at: events of its accounts at or
    before it are already in its state, and are skipped when consumed again. Kept until
    the consumption passes it, however often the bucket is written meanwhile."""


class StreamClock:
    """Stream time: the latest event day seen, moved on by the wall clock since then.

    In production the two agree; a replay of history runs on the history's days; a
    simulated demo runs on its simulated days. Days only move forward.
    """

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self.wall = wall
        self.max_day = -1
        self._seen_at = wall()

    def observe(self, day: int) -> None:
        if day > self.max_day:
            self.max_day = day
            self._seen_at = self.wall()

    def today(self) -> int:
        if self.max_day < 0:
            return datetime.fromtimestamp(self.wall(), UTC).toordinal()
        return self.max_day + int((self.wall() - self._seen_at) // 86_400)

    def now(self) -> datetime:
        """A timestamp on :meth:`today`, at the wall clock's time of day."""
        wall = datetime.fromtimestamp(self.wall(), UTC)
        day = date.fromordinal(self.today())
        return datetime.combine(day, wall.timetz())


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ScoringEngine:
    def __init__(
        self,
        model: ModelWatcher,
        *,
        buckets: int = BUCKETS,
        clock: StreamClock | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.model = model
        self.buckets = buckets
        self.clock = clock or StreamClock(wall)
        self.wall = wall
        self.partitions: dict[int, PartitionState] = {}
        self.events_applied = 0
        self.replayed_skipped = 0
        """Events consumed again after a restart that a restored bucket already held."""
        self.redelivered_skipped = 0
        """Events delivered twice to this process (a seek back), applied once."""

    # -- events ------------------------------------------------------------------------------

    def partition(self, partition: int) -> PartitionState:
        state = self.partitions.get(partition)
        if state is None:
            state = self.partitions[partition] = PartitionState()
        return state

    def apply(
        self,
        partition: int,
        events: Iterable[dict[str, Any]],
        origins: list[Origin] | None = None,
    ) -> tuple[list[Output], list[RejectedEvent]]:
        """Fold events into their accounts; returns the outputs the events make by
        themselves (revenue movements, payment and NPS signals) and the events that could
        not be used. With ``origins`` (one per event), progress is tracked, and events a
        restored bucket already holds are skipped."""
        ps = self.partition(partition)
        records, dirty, pending, urgent = ps.records, ps.dirty, ps.pending, ps.urgent
        progress, restored = ps.progress, ps.restored
        outputs: list[Output] = []
        rejected: list[RejectedEvent] = []
        latest = datetime.fromtimestamp(self.wall(), UTC).toordinal() + FUTURE_DAYS
        max_day = -1
        for index, event in enumerate(events):
            try:
                account = event["subject"]
                day = day_ordinal(event["time"])
            except (KeyError, TypeError, ValueError) as exc:
                reason = f"unreadable subject or time: {exc!r}"
                rejected.append(RejectedEvent(event, reason, index))
                continue
            if day > latest:
                reason = f"time {event['time']!r} is in the future"
                rejected.append(RejectedEvent(event, reason, index))
                continue
            record = records.get(account)
            if record is None:
                record = records[account] = self._new_record(account)
                ps.members.setdefault(record.bucket, []).append(record)
                urgent[account] = None
            if origins is not None:
                origin = origins[index]
                if already_applied(progress, origin):
                    # delivered again in this process (Faust seeks to the committed offset
                    # after a recovery, and a rebalance may too): applied already
                    self.redelivered_skipped += 1
                    continue
                progress[origin[0]] = origin[1:]
                done = restored.get(record.bucket) if restored else None
                if done is not None and already_applied(done, origin):
                    self.replayed_skipped += 1
                    continue
            try:
                record.features.apply(event)
            except InvalidEventError as exc:
                rejected.append(RejectedEvent(event, str(exc), index))
                record.blob = None  # its watermark may have moved to the event's day
                dirty.add(record.bucket)
                continue
            kind = event.get("type", "")
            if kind.startswith(BILLING_PREFIX):
                try:
                    outputs.extend(("revenue", m) for m in record.revenue.apply(event))
                except (KeyError, TypeError, ValueError) as exc:
                    rejected.append(RejectedEvent(event, f"revenue: {exc}", index))
            if kind in _EVENT_SIGNAL_TYPES:
                outputs.extend(
                    ("signals", s)
                    for s in event_signals(event, record.features, record.signals, day)
                )
            record.signals.pending = True
            if kind in _ROUTINE_TYPES:
                pending[account] = None
            else:
                urgent[account] = None
            record.blob = None
            dirty.add(record.bucket)
            if day > max_day:
                max_day = day
            self.events_applied += 1
        if max_day >= 0:
            self.clock.observe(max_day)
        return outputs, rejected

    def _new_record(self, account: str) -> AccountRecord:
        return AccountRecord(
            account,
            bucket_of(account, self.buckets),
            AccountState(),
            RevenueLedger(account),
            SignalState(),
        )

    # -- scoring -----------------------------------------------------------------------------

    def roll_days(self) -> int:
        """Mark every account of a partition pending once the day rolled; returns how many."""
        today = self.clock.today()
        marked = 0
        for ps in self.partitions.values():
            if ps.rescored_day >= today:
                continue
            ps.rescored_day = today
            for account, record in ps.records.items():
                if record.signals.scored_day < today and account not in ps.pending:
                    ps.pending[account] = None
                    marked += 1
        return marked

    def pending_count(self) -> int:
        return sum(len(ps.pending) + len(ps.urgent) for ps in self.partitions.values())

    def score_pending(self, limit: int = 2_000) -> list[Output]:
        """Score up to ``limit`` pending accounts in one batch, urgent ones first, then the
        others oldest first; returns their events to send.

        An account touched many times while it waits is scored once: under load, scores of
        accounts that only saw routine usage are coalesced over as long as the scoring
        budget needs (the app spends a bounded share of each interval here)."""
        chosen: list[tuple[PartitionState, AccountRecord]] = []
        for queue in ("urgent", "pending"):
            for ps in self.partitions.values():
                waiting: dict[str, None] = getattr(ps, queue)
                if not waiting or len(chosen) >= limit:
                    continue
                taken = list(islice(waiting, limit - len(chosen)))
                for account in taken:
                    del waiting[account]
                    if queue == "urgent":
                        ps.pending.pop(account, None)
                    record = ps.records.get(account)
                    if record is not None:
                        chosen.append((ps, record))
        if not chosen:
            return []
        today = self.clock.today()
        stamp = iso(self.clock.now())
        rows = [r.features.features(max(today, r.features.max_day)) for _, r in chosen]
        model = self.model.current
        exact = np.array([r.values for r in rows], dtype=np.float64)
        matrix = exact.astype(np.float32)
        published = np.round(exact, 6).tolist()  # the features as score events carry them
        probabilities = model.predict(matrix)
        # reasons cost ~16 predictions per account: only for scores that will be published
        # and are not healthy (a healthy account's score carries no reasons)
        explain = [
            i
            for i, ((_, record), p) in enumerate(zip(chosen, probabilities, strict=True))
            if raw_tier(float(p)) != "healthy"
            and worth_emitting(record.signals, float(p), health_for(float(p)), tier_of(record, p))
        ]
        reasons: dict[int, list[Any]] = {}
        if explain:
            for i, found in zip(explain, model.reasons(matrix[explain]), strict=True):
                reasons[i] = found
        outputs: list[Output] = []
        for i, ((ps, record), features) in enumerate(zip(chosen, rows, strict=True)):
            p = float(probabilities[i])
            score = Score(p, health_for(p), raw_tier(p), reasons.get(i, []))
            outputs.extend(
                score_signals(
                    record.account,
                    features,
                    record.features,
                    score,
                    model.version,
                    record.signals,
                    stamp,
                    published[i],
                )
            )
            record.blob = None
            ps.dirty.add(record.bucket)
        return outputs

    # -- durability --------------------------------------------------------------------------

    def take_dirty(self) -> Iterator[tuple[int, int, bytes]]:
        """``(partition, bucket, blob)`` of every dirty bucket; they are clean afterwards.

        Each blob carries its partition's progress: take it (synchronously, all of it)
        right after the acknowledgements it is meant to cover were collected."""
        for partition, ps in self.partitions.items():
            if not ps.dirty:
                continue
            dirty = sorted(ps.dirty)
            ps.dirty.clear()
            for bucket in dirty:
                members = ps.members.get(bucket, [])
                progress = ps.progress
                held = ps.restored.get(bucket)
                if held is not None:
                    # a restored bucket holds its events up to ``held`` even where the
                    # consumption (after the restart) has not got that far yet: written
                    # with less, a second restart would apply them twice
                    if covers(progress, held):
                        del ps.restored[bucket]
                    else:
                        progress = furthest(held, progress)
                yield partition, bucket, encode_bucket(members, progress)

    def load_bucket(self, partition: int, blob: bytes) -> int:
        """Restore a bucket's records (after a restart); returns how many."""
        ps = self.partition(partition)
        n = 0
        progress, records = decode_bucket(blob, self.buckets)
        for record in records:
            known = ps.records.get(record.account)
            ps.records[record.account] = record
            bucket = ps.members.setdefault(record.bucket, [])
            if known is not None:  # loaded twice: replace, do not add
                bucket[:] = [r for r in bucket if r.account != record.account]
            bucket.append(record)
            if record.signals.pending:
                ps.pending[record.account] = None
            self.clock.observe(record.features.max_day)
            n += 1
        if records:
            # ``ps.progress`` is left alone: it says what this process has consumed, and
            # a bucket written before the consumption reaches ``progress`` must not claim
            # events of other buckets it does not hold
            ps.restored[records[0].bucket] = progress
        return n

    def drop_partition(self, partition: int) -> None:
        self.partitions.pop(partition, None)

    def account(self, account: str) -> AccountRecord | None:
        for ps in self.partitions.values():
            if (record := ps.records.get(account)) is not None:
                return record
        return None

    def accounts(self) -> int:
        return sum(len(ps.records) for ps in self.partitions.values())


@dataclass
class Released:
    events: list[dict[str, Any]] = field(default_factory=list)
    origins: list[Any] = field(default_factory=list)
    """The token (consumed record) each event came in."""
    positions: list[int] = field(default_factory=list)
    """Each event's position in its record (-1: its last event)."""
    finished: list[Any] = field(default_factory=list)
    """Tokens all of whose events are in ``events`` or were released before."""


@dataclass
class _Lane:
    """One source topic's events of one partition, not yet released."""

    queue: deque[tuple[tuple[int, str], dict[str, Any] | None, Any, int]] = field(
        default_factory=deque
    )
    """(order key, event, token, position in its record; -1 for a record's last)"""
    last_offset: int = -1
    idle: bool = False


class TimeAligner:
    """Merges one partition's events from several topics into event-time order.

    Kafka keeps order within a topic-partition only; the three source topics of one
    account move at their own pace (in a catch-up, billing's sparse records run months
    ahead of usage's dense ones), and applying them as they come would make most usage
    look late. So, as Kafka Streams does for the partitions of a task, events wait in a
    lane per topic and the earliest head goes first, as long as every lane either has
    events or has read all its partition holds. What a lane has read is the offset after
    its last record, or, before its first one, ``start`` (the committed offset it resumes
    from); what its partition holds is ``highwater``. A lane known to be behind its
    highwater is always waited for, however long: applying the others first would make its
    events late. Only a lane whose position is unknown (Kafka did not say) counts as idle
    after keeping the others waiting for ``max_wait_s``, until it delivers again.

    ``token`` (the consumed record, to acknowledge) is released with the last event of
    its envelope, so an offset is committed only once all its events were applied.
    """

    def __init__(
        self,
        topics: Iterable[str],
        *,
        max_wait_s: float = 0.5,
        highwater: Callable[[str, int], int | None] = lambda topic, partition: None,
        start: Callable[[str, int], int | None] = lambda topic, partition: None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topics = tuple(topics)
        self.max_wait_s = max_wait_s
        self.highwater = highwater
        self.start = start
        self.monotonic = monotonic
        self.lanes: dict[int, dict[str, _Lane]] = {}
        self._stalled_since: dict[int, float] = {}

    def add(
        self, partition: int, topic: str, offset: int, events: list[dict[str, Any]], token: Any
    ) -> None:
        lanes = self.lanes.get(partition)
        if lanes is None:
            lanes = self.lanes[partition] = {t: _Lane() for t in self.topics}
        lane = lanes[topic]
        lane.idle = False
        lane.last_offset = offset
        queue = lane.queue
        last = len(events) - 1
        for i, event in enumerate(events):
            queue.append((_order_key(event), event, token, -1 if i == last else i))
        if not events:
            queue.append(((-1, ""), None, token, -1))

    def pending(self) -> int:
        return sum(len(lane.queue) for lanes in self.lanes.values() for lane in lanes.values())

    def release(self, partition: int) -> Released:
        """The events that may be applied now, in time order, each with its token, and the
        tokens whose last event is among them."""
        released = Released()
        events, origins, tokens = released.events, released.origins, released.finished
        positions = released.positions
        lanes = self.lanes.get(partition)
        if not lanes:
            return released
        while True:
            full = [(lane.queue[0][0], name) for name, lane in lanes.items() if lane.queue]
            if not full:
                break
            behind = False
            waiting: list[str] = []
            for name, lane in lanes.items():
                if lane.queue or self._caught_up(name, partition, lane):
                    continue
                if self._behind(name, partition, lane):
                    behind = True  # its partition holds more: it will come, however slowly
                    break
                if not lane.idle:
                    waiting.append(name)
            if behind:
                break
            if waiting:
                now = self.monotonic()
                since = self._stalled_since.setdefault(partition, now)
                if now - since < self.max_wait_s:
                    break
                for name in waiting:
                    lanes[name].idle = True
            self._stalled_since.pop(partition, None)
            full.sort()
            _, name = full[0]
            queue = lanes[name].queue
            bound = full[1][0] if len(full) > 1 else None
            # a run from the earliest lane, up to the next lane's head
            while queue and (bound is None or queue[0][0] <= bound):
                _, event, token, position = queue.popleft()
                if event is not None:
                    events.append(event)
                    origins.append(token)
                    positions.append(position)
                if position < 0:
                    tokens.append(token)
        return released

    def _position(self, topic: str, partition: int, lane: _Lane) -> int | None:
        """The offset the lane reads next: after its last record, or where it starts."""
        if lane.last_offset >= 0:
            return lane.last_offset + 1
        return self.start(topic, partition)

    def _caught_up(self, topic: str, partition: int, lane: _Lane) -> bool:
        highwater = self.highwater(topic, partition)
        if highwater is None:
            return False
        position = self._position(topic, partition, lane)
        # an empty partition is read to its end from wherever the lane starts
        return highwater == 0 or (position is not None and position >= highwater)

    def _behind(self, topic: str, partition: int, lane: _Lane) -> bool:
        """Known to have more to deliver: its partition holds records past its position."""
        highwater = self.highwater(topic, partition)
        position = self._position(topic, partition, lane)
        return highwater is not None and position is not None and position < highwater

    def unpositioned(self, partition: int) -> list[str]:
        """Topics of ``partition`` whose lane has not delivered yet (their start matters)."""
        lanes = self.lanes.get(partition)
        if lanes is None:
            return list(self.topics)
        return [name for name, lane in lanes.items() if lane.last_offset < 0]

    def drop_partition(self, partition: int) -> None:
        self.lanes.pop(partition, None)
        self._stalled_since.pop(partition, None)


def _order_key(event: dict[str, Any]) -> tuple[int, str]:
    try:
        time_ = event["time"]
        return day_ordinal(time_), time_
    except (KeyError, TypeError, ValueError):
        return -1, ""  # unreadable: released at once, and rejected by apply()


_ROUTINE_TYPES: Final = frozenset(
    {
        "churnguard.usage.feature_used",
        "churnguard.usage.track",
        "churnguard.usage.identify",
        "churnguard.usage.group",
    }
)
"""Events that move a score little each: their accounts wait their turn."""
_EVENT_SIGNAL_TYPES: Final = frozenset(
    {"churnguard.billing.invoice_payment_failed", "churnguard.feedback.nps_submitted"}
)
_HEAD = struct.Struct("<HIII")


def encode_bucket(records: Iterable[AccountRecord], progress: Progress) -> bytes:
    """``[u32 progress JSON]`` then per record ``[u16 account][u32 features][u32 revenue]
    [u32 signals]`` and the bodies; zstd."""
    head = orjson.dumps(progress)
    parts: list[bytes] = [struct.pack("<I", len(head)), head]
    for record in records:
        blob = record.blob
        if blob is None:  # changed since it was last written: encode it again
            account = record.account.encode()
            features = record.features.to_bytes()
            revenue = record.revenue.to_bytes()
            signals = orjson.dumps(record.signals.to_list())
            blob = record.blob = b"".join(
                (
                    _HEAD.pack(len(account), len(features), len(revenue), len(signals)),
                    account,
                    features,
                    revenue,
                    signals,
                )
            )
        parts.append(blob)
    return bytes(cramjam.zstd.compress(b"".join(parts)))


def decode_bucket(blob: bytes, buckets: int = BUCKETS) -> tuple[Progress, list[AccountRecord]]:
    raw = bytes(cramjam.zstd.decompress(blob))
    view = memoryview(raw)
    (size,) = struct.unpack_from("<I", raw, 0)
    progress = {t: (int(o), int(p)) for t, (o, p) in orjson.loads(view[4 : 4 + size]).items()}
    at = 4 + size
    records = []
    while at < len(raw):
        a, f, r, s = _HEAD.unpack_from(raw, at)
        at += _HEAD.size
        account = bytes(view[at : at + a]).decode()
        at += a
        features = AccountState.from_bytes(bytes(view[at : at + f]))
        at += f
        revenue = RevenueLedger.from_bytes(bytes(view[at : at + r]))
        at += r
        signals = SignalState.from_list(orjson.loads(view[at : at + s]))
        at += s
        records.append(
            AccountRecord(account, bucket_of(account, buckets), features, revenue, signals)
        )
    return progress, records


def bucket_key(partition: int, bucket: int) -> str:
    return f"{partition}:{bucket}"
