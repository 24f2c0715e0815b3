"""The scoring Faust application: the engine (``engine.py``) wired to Kafka.

Processing guarantee: at-least-once, made exact in effect. Faust commits a record's
offset only after the agent finished with it, every ``commit_interval_s``. Just before
each commit (a Faust sensor hook) the dirty state buckets go to the changelog, and the
commit first flushes the producer, so Kafka holds the state of every record whose offset
is committed. After a crash the worker restores the buckets and processes the records
after the last commit again; the revenue movements and signals they make carry the same
deterministic ids as before, which consumers drop as duplicates.

Inputs: ``events.usage``, ``events.billing``, ``events.feedback`` (partition envelopes;
partition *p* of each topic holds the same accounts, so one worker owns all their
events). Outputs: ``accounts.scores`` (compacted, keyed by account), ``accounts.signals``,
``revenue.movements``. Unusable records and events go to the source topic's dead-letter
topic with the reason.

Scaling: one worker per partition at most (``CHURNGUARD_SCORING_PARTITIONS``, the source
topics' partition count); more workers than partitions stand idle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

import faust
import orjson
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from faust.types import TP
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from churnguard.common import envelope, metrics
from churnguard.common.kafka import DeadLetterBreaker, DeadLetterBreakerTripped, DeadLetters
from churnguard.common.topics import Topic
from churnguard.scoring import scoring_metrics as sm
from churnguard.scoring.engine import BUCKETS, Output, ScoringEngine, TimeAligner, bucket_key
from churnguard.scoring.model import ModelWatcher
from churnguard.scoring.settings import ScoringSettings

log = logging.getLogger(__name__)

CONSUMER_NAME = "scoring"
SOURCES = (Topic.USAGE, Topic.BILLING, Topic.FEEDBACK)
OUTPUT_TOPICS = {
    "scores": Topic.SCORES,
    "signals": Topic.SIGNALS,
    "revenue": Topic.REVENUE_MOVEMENTS,
}
HEADERS = [("content-type", b"application/cloudevents+json")]
CHECKPOINT_KEY = b"checkpoint"
CHECKPOINT_VALUE = b"1"


class CommittedOffsets:
    """Where the lanes that have not delivered yet resume: the group's committed offset
    per source partition (the earliest offset where it never committed).

    Highwaters come from the fetch responses (``consumer.highwater``), which carry every
    fetched partition's end. ListOffsets is not used for them: Tansu answers it with the
    base offset of a partition's last record batch + 1, short of the end when the batch
    holds several records."""

    def __init__(self, group_id: str, bootstrap: str) -> None:
        self.group_id = group_id
        self.bootstrap = bootstrap
        self.starts: dict[TP, int] = {}
        self._admin: AIOKafkaAdminClient | None = None

    async def fetch(self, consumer: Any, tps: set[TP]) -> None:
        if self._admin is None:
            admin = AIOKafkaAdminClient(
                bootstrap_servers=self.bootstrap, client_id=f"{self.group_id}-offsets"
            )
            await admin.start()
            self._admin = admin
        wanted = [TopicPartition(tp.topic, tp.partition) for tp in tps]
        committed = await self._admin.list_consumer_group_offsets(self.group_id, partitions=wanted)
        never: set[TP] = set()
        for tp in tps:
            meta = committed.get(TopicPartition(tp.topic, tp.partition))
            if meta is not None and meta.offset >= 0:
                self.starts[tp] = meta.offset
            else:
                never.add(tp)
        if never:  # consumption starts at the earliest offset (auto_offset_reset)
            self.starts.update(await consumer.earliest_offsets(*never))

    def forget(self, partitions: set[int]) -> None:
        for tp in [tp for tp in self.starts if tp.partition in partitions]:
            del self.starts[tp]


def create_app(settings: ScoringSettings | None = None) -> faust.App:
    settings = settings or ScoringSettings()
    platform = settings.platform
    prefix = platform.topic_prefix
    settings.data_dir.mkdir(parents=True, exist_ok=True)

    app = faust.App(
        prefix + settings.app_id,
        broker=[f"kafka://{host}" for host in platform.kafka_bootstrap.split(",")],
        store="memory://",
        datadir=str(settings.data_dir),
        processing_guarantee="at_least_once",
        # offsets are acknowledged at each persist; committing them is cheap, so soon
        broker_commit_interval=min(settings.commit_interval_s, 1.0),
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_session_timeout=settings.session_timeout_s,
        producer_acks=-1,
        producer_compression_type="zstd",
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_in_thread=False,
        consumer_auto_offset_reset="earliest",
        stream_buffer_maxsize=settings.stream_buffer,
        # records are acknowledged only once their state is in the changelog (persist),
        # and the aligner may hold a record for another topic's events: a revocation must
        # not wait for those acknowledgements (it would wait for ever); what is not
        # acknowledged is consumed again by the partition's next owner
        stream_wait_empty=False,
    )
    sources = app.topic(
        *(t.name_in(prefix) for t in SOURCES),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    dead_letter_of = {t.name_in(prefix): t.dead_letter_in(prefix) for t in SOURCES}
    state_table = app.Table(
        "account-state",
        default=None,
        partitions=settings.partitions,
        key_type=bytes,
        value_type=bytes,
    )
    # buckets are opaque bytes: no JSON around them (set before the changelog topic exists)
    state_table.key_serializer = state_table.value_serializer = "raw"
    started = time.monotonic()
    watcher = ModelWatcher(settings.model_path)
    engine = ScoringEngine(watcher, buckets=settings.buckets)
    loaded: set[int] = set()
    ready_at: list[float] = []
    sm.MODEL_VERSION.info({"version": watcher.current.version})

    # -- durability: a record is acknowledged once the state with its events is in Kafka ---

    unacked: list[Any] = []  # consumed records whose events are all applied
    in_flight: list[Any] = []  # delivery futures of outputs sent since the last persist

    async def persist() -> None:
        """Dirty buckets to the changelog, outputs delivered, then the acknowledgements.

        Faust commits only acknowledged offsets, so after a crash every record either is
        in the restored state or is consumed again; a half-applied record is skipped up
        to where each bucket's state got (``PartitionState.restored``)."""
        if stopping():
            return  # what is not acknowledged is consumed again by the next worker
        # one synchronous snapshot: the acknowledgements, the outputs sent so far and the
        # state that made them (state must never claim outputs that did not go out)
        acks = unacked[:]
        unacked.clear()
        outputs = in_flight[:]
        in_flight.clear()
        blobs = list(engine.take_dirty())
        try:
            await asyncio.gather(*outputs)
        except Exception as exc:
            lose_outputs(exc)
            return
        written = [(partition, bucket) for partition, bucket, _ in blobs]
        changelog = state_table.changelog_topic.get_topic_name()
        try:
            futures = []
            for partition, bucket, blob in blobs:
                key = bucket_key(partition, bucket).encode()
                state_table.data[key] = blob
                futures.append(await app.producer.send(changelog, key, blob, partition, None, None))
                sm.STATE_BYTES.observe(len(blob))
            await asyncio.gather(*futures)
            # one record alone in its batch closes each partition's writes: Faust restores a
            # changelog up to its ListOffsets end, which Tansu puts right after the first
            # record of the last batch (the buckets sent together above share batches)
            markers = [
                await app.producer.send(
                    changelog, CHECKPOINT_KEY, CHECKPOINT_VALUE, partition, None, None
                )
                for partition in sorted({p for p, _ in written})
            ]
            await asyncio.gather(*markers)
        except Exception:
            log.exception("state not persisted; retrying at the next interval")
            for partition, bucket in written:  # written again next time
                engine.partition(partition).dirty.add(bucket)
            unacked[:0] = acks
            return
        sm.STATE_WRITES.inc(len(written))
        for record in acks:
            record.ack()

    def load_partition(partition: int) -> None:
        if partition in loaded:
            return
        t0 = time.perf_counter()
        n = 0
        for bucket in range(settings.buckets):
            blob = state_table.data.get(bucket_key(partition, bucket).encode())
            if blob:
                n += engine.load_bucket(partition, blob)
        loaded.add(partition)
        log.info(
            "partition %d: %d accounts restored in %.2f s", partition, n, time.perf_counter() - t0
        )

    def assigned_partitions() -> set[int]:
        name = Topic.USAGE.name_in(prefix)
        return {tp.partition for tp in app.consumer.assignment() if tp.topic == name}

    # -- dead letters ----------------------------------------------------------------------

    dead_letter_topics: dict[str, faust.TopicT] = {}

    async def send_dead_letter(
        topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> Any:
        if topic not in dead_letter_topics:
            dead_letter_topics[topic] = app.topic(
                topic, key_serializer="raw", value_serializer="raw"
            )
        sent = await dead_letter_topics[topic].send(key=key, value=value, headers=headers)
        return await sent  # Faust buffers sends; wait for Kafka's acknowledgement

    dead_letters = DeadLetters(
        CONSUMER_NAME,
        send_dead_letter,
        DeadLetterBreaker(platform.dead_letter_max_ratio, platform.dead_letter_window),
    )

    async def stop_if_tripped() -> None:
        try:
            dead_letters.raise_if_tripped()
        except DeadLetterBreakerTripped:
            # a crashed app leaves the worker process up: stop it the way an operator
            # would; SIGTERM takes Faust's graceful path (flush the producer, commit)
            os.kill(os.getpid(), signal.SIGTERM)

    # -- outputs ---------------------------------------------------------------------------

    outputs_lost: list[BaseException] = []
    """A send that failed: the state that made those outputs must never be persisted (it
    says they went out), so the worker stops and a successor replays them."""

    def stopping() -> bool:
        return bool(app.should_stop) or bool(outputs_lost)

    def lose_outputs(exc: BaseException) -> None:
        if outputs_lost:
            return
        log.error("an output was not delivered (%r): stopping without persisting", exc)
        outputs_lost.append(exc)
        if not app.should_stop:
            os.kill(os.getpid(), signal.SIGTERM)

    async def send_outputs(outputs: list[Output]) -> None:
        producer = app.producer
        for kind, event in outputs:
            try:
                sent = await producer.send(
                    OUTPUT_TOPICS[kind].name_in(prefix),
                    event["subject"].encode(),
                    orjson.dumps(event),
                    None,
                    None,
                    HEADERS,
                )
            except Exception as exc:  # the producer is closing, or Kafka refused
                lose_outputs(exc)
                return
            in_flight.append(sent)
            sm.OUTPUTS.labels(kind, event["type"]).inc()
            if kind == "scores":
                sm.CHURN_PROBABILITY.observe(event["data"]["churn_probability"])

    # -- the agent -------------------------------------------------------------------------

    @app.task
    async def announce() -> None:
        log.info(
            "scoring started: processing_guarantee=at_least_once commit_interval_s=%s "
            "buckets=%d model=%s kafka=%s topics=%s",
            settings.commit_interval_s,
            settings.buckets,
            watcher.current.version,
            platform.kafka_bootstrap,
            [t.name_in(prefix) for t in SOURCES],
        )

    def highwater(topic: str, partition: int) -> int | None:
        try:
            value = app.consumer.highwater(TP(topic, partition))
        except Exception:  # not assigned (any more), or no fetch yet
            return None
        return int(value) if value is not None else None

    committed = CommittedOffsets(app.conf.id, platform.kafka_bootstrap)

    def start(topic: str, partition: int) -> int | None:
        return committed.starts.get(TP(topic, partition))

    aligner = TimeAligner(
        dead_letter_of,
        max_wait_s=settings.align_max_wait_s,
        highwater=highwater,
        start=start,
    )

    @app.timer(interval=settings.offsets_interval_s)
    async def read_committed_offsets() -> None:
        """Where lanes that have not delivered resume: until the aligner knows, it cannot
        tell a lane with records to come from one that has none."""
        if app.rebalancing or stopping():
            return
        names = set(dead_letter_of)
        wanted = {
            tp
            for tp in app.consumer.assignment()
            if tp.topic in names
            and tp not in committed.starts
            and tp.topic in aligner.unpositioned(tp.partition)
        }
        if not wanted:
            return
        try:
            await committed.fetch(app.consumer, wanted)
        except Exception as exc:  # the aligner falls back to waiting max_wait_s
            log.warning("committed offsets not read: %r", exc)
            return
        for partition in list(aligner.lanes):
            await apply_released(partition)

    @app.on_partitions_revoked.connect
    async def on_revoked(app_: Any, revoked: set[TP], **kwargs: Any) -> None:
        """Forget revoked partitions at once: their records that are not acknowledged go to
        the next owner (perhaps this worker again, which then restores the persisted state
        and skips what it holds); keeping the state in memory would apply them twice."""
        names = set(dead_letter_of)
        partitions = {tp.partition for tp in revoked if tp.topic in names}
        for partition in partitions:
            engine.drop_partition(partition)
            aligner.drop_partition(partition)
            loaded.discard(partition)
        unacked[:] = [r for r in unacked if r.message.partition not in partitions]
        committed.forget(partitions)
        if partitions:
            log.info("partitions %s revoked: their state is dropped", sorted(partitions))

    async def apply_released(partition: int) -> None:
        """Apply what the aligner releases for ``partition``; acknowledge finished records."""
        released = aligner.release(partition)
        if released.events:
            origins = [
                (token.message.topic, token.message.offset, position)
                for token, position in zip(released.origins, released.positions, strict=True)
            ]
            outputs, rejected = engine.apply(partition, released.events, origins)
            for bad in rejected:
                await dead_letters.reject(
                    released.origins[bad.index].message,
                    dead_letter_topic=dead_letter_of[released.origins[bad.index].message.topic],
                    reason=bad.reason,
                    error="RejectedEvent",
                    value=orjson.dumps(bad.event),
                )
            if rejected:
                await stop_if_tripped()
            if outputs:
                await send_outputs(outputs)
        unacked.extend(released.finished)

    @app.agent(sources)
    async def process(stream: faust.StreamT[bytes]) -> Any:
        async for event in stream.noack().events():
            message = event.message
            load_partition(message.partition)
            try:
                events = envelope.unpack(event.value)
            except envelope.InvalidEnvelope as exc:
                await dead_letters.reject(
                    message,
                    dead_letter_topic=dead_letter_of[message.topic],
                    reason=exc.reason,
                    error=type(exc).__name__,
                )
                events = []  # acknowledged in order with the rest of its topic
                await stop_if_tripped()
            else:
                dead_letters.accept()
            aligner.add(message.partition, message.topic, message.offset, events, event)
            await apply_released(message.partition)
            metrics.CONSUMER_RECORDS.labels(CONSUMER_NAME, message.topic).inc()
            metrics.CONSUMER_EVENTS.labels(CONSUMER_NAME, message.topic).inc(len(events))
            sm.ENVELOPE_EVENTS.observe(len(events))
            yield len(events)

    @app.timer(interval=settings.commit_interval_s)
    async def persist_state() -> None:
        await persist()

    @app.timer(interval=settings.align_max_wait_s / 2)
    async def release_stalled() -> None:
        """A lane that stopped delivering must not hold the others for ever."""
        if stopping():
            return
        for partition in list(aligner.lanes):
            await apply_released(partition)

    # -- time: scores in micro-batches, day roll-over, model reloads ------------------------

    applied_at_last_tick = [0]

    @app.timer(interval=settings.score_interval_s)
    async def score() -> None:
        if app.rebalancing or stopping():
            return
        assigned = assigned_partitions()
        for partition in list(engine.partitions):
            if partition not in assigned and partition in loaded:
                # revoked: its unacknowledged records go to the next owner (or come back)
                engine.drop_partition(partition)
                aligner.drop_partition(partition)
                loaded.discard(partition)
        for partition in assigned:
            load_partition(partition)
        if assigned and not ready_at:
            ready_at.append(time.monotonic() - started)
            sm.READY_SECONDS.set(ready_at[0])
            log.info("scoring ready in %.2f s: %d accounts", ready_at[0], engine.accounts())
        rolled = engine.roll_days()
        if rolled:
            log.info("day rolled: %d accounts to re-score", rolled)
        # the budget counts time spent scoring, not the agent's turns in between; with no
        # event applied since the last tick there is nothing to make room for
        consuming = engine.events_applied != applied_at_last_tick[0]
        applied_at_last_tick[0] = engine.events_applied
        budget = settings.score_interval_s * (settings.score_budget if consuming else 1.0)
        started_at = time.perf_counter()
        spent = 0.0
        while engine.pending_count() and not stopping():
            t0 = time.perf_counter()
            before = engine.pending_count()
            outputs = engine.score_pending(settings.score_batch)
            done = time.perf_counter()
            spent += done - t0
            sm.SCORED.inc(before - engine.pending_count())
            sm.SCORE_BATCH_SECONDS.observe(done - t0)
            await send_outputs(outputs)
            if spent >= budget or done - started_at >= settings.score_interval_s:
                break  # the rest waits: consuming must go on
            await asyncio.sleep(0)  # let the agent run between batches
        sm.ACCOUNTS.set(engine.accounts())
        sm.PENDING.set(engine.pending_count())

    @app.timer(interval=settings.model_check_interval_s)
    async def reload_model() -> None:
        if watcher.maybe_reload():
            sm.MODEL_VERSION.info({"version": watcher.current.version})
            for ps in engine.partitions.values():  # everyone, under the new model
                ps.pending.update(dict.fromkeys(ps.records))

    # -- HTTP ------------------------------------------------------------------------------

    @app.page("/accounts/{account_id}")
    async def account(web: Any, request: Any, account_id: str) -> Any:
        record = engine.account(account_id)
        if record is None:
            return web.json({"detail": f"unknown account {account_id!r}"}, status=404)
        as_of = int(request.query.get("as_of_ordinal", 0)) or max(
            engine.clock.today(), record.features.max_day
        )
        features = record.features.features(as_of)
        return web.json(
            {
                "account_id": account_id,
                "as_of_ordinal": as_of,
                "features": features.as_dict(),
                "mrr": record.revenue.mrr,
                "tier": record.signals.tier,
                "churn_probability": record.signals.probability,
                "health": record.signals.health,
                "scores_emitted": record.signals.scores,
            }
        )

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        assigned = assigned_partitions()
        ready = not app.rebalancing and bool(assigned) and assigned <= loaded
        body = {
            "status": "ready" if ready else "starting",
            "partitions": sorted(assigned),
            "accounts": engine.accounts(),
            "model_version": watcher.current.version,
        }
        return web.json(body, status=200 if ready else 503)

    @app.page("/metrics")
    async def prometheus_metrics(web: Any, request: Any) -> Any:
        # the exposition content type carries a charset, which aiohttp refuses in
        # content_type: give it as the header itself
        return web.bytes(generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.conf.table_cleanup_interval = 30.0
    return app


__all__ = ["BUCKETS", "create_app"]
