"""Partition envelopes: many events in one Kafka record.

Ingest groups the events bound for one partition into one record (DESIGN.md,
"Envelopes"). The record value is a CloudEvents *batch*: a JSON array of structured
CloudEvents, with the record header ``content-type: application/cloudevents-batch+json``.
A one-event envelope is the degenerate case. The partition is Kafka's default murmur2
partition of the account id, set explicitly, so every event of one account lands on
one partition in order whichever envelope carries it.

The record key is the account id when every event in the envelope belongs to one
account, and empty otherwise (a multi-account envelope has no single key; its
partition is still exactly the one each account id hashes to).

Third-party consumers unpack envelopes with :func:`unpack` (plain dicts, no churnguard
models needed) or an :class:`EnvelopeCodec` (validated models; each registry topic has
one as ``Topic.X.codec``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Generic, TypeVar

import orjson
from aiokafka.partitioner import murmur2
from pydantic import BaseModel, TypeAdapter, ValidationError

CONTENT_TYPE = "application/cloudevents-batch+json"
CONTENT_TYPE_HEADER = "content-type"
MAX_EVENTS_PER_ENVELOPE = 10_000

M = TypeVar("M")


class InvalidEnvelope(ValueError):
    """A record that cannot be read as an envelope; ``reason`` names what and where."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def partition_for(account_id: str, partitions: int) -> int:
    """Kafka's default partitioner (murmur2 of the key bytes), as the Java client computes it."""
    return int(murmur2(account_id.encode()) & 0x7FFFFFFF) % partitions


def encode(events: Sequence[BaseModel]) -> bytes:
    """Serialise events as one CloudEvents batch (one ``model_dump_json`` per event)."""
    if not events:
        raise ValueError("an envelope holds at least one event")
    return b"[" + b",".join(e.model_dump_json(by_alias=True).encode() for e in events) + b"]"


def encode_raw(events: Iterable[bytes]) -> bytes:
    """Join already-serialised structured CloudEvents into one batch."""
    return b"[" + b",".join(events) + b"]"


def record_key(events: Sequence[Any]) -> bytes | None:
    """The account id when all events share one account, else None (see module docstring)."""
    subjects = {e.subject if not isinstance(e, dict) else e.get("subject") for e in events}
    if len(subjects) == 1:
        (subject,) = subjects
        return str(subject).encode() if subject else None
    return None


def headers() -> list[tuple[str, bytes]]:
    return [(CONTENT_TYPE_HEADER, CONTENT_TYPE.encode())]


def unpack(value: bytes | None) -> list[dict[str, Any]]:
    """The events of an envelope as plain dicts, or InvalidEnvelope saying why not.

    A single structured CloudEvent (a JSON object) is accepted as a one-event envelope,
    so producers that write plain CloudEvents straight to a topic are understood too.
    """
    if value is None:
        raise InvalidEnvelope("record value is empty (tombstone)")
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidEnvelope(f"record value is not JSON: {exc}") from None
    if isinstance(parsed, dict):
        parsed = [parsed]
    if not isinstance(parsed, list):
        raise InvalidEnvelope(
            f"record value must be a JSON array of CloudEvents, got {type(parsed).__name__}"
        )
    if not parsed:
        raise InvalidEnvelope("envelope holds no events")
    if len(parsed) > MAX_EVENTS_PER_ENVELOPE:
        raise InvalidEnvelope(
            f"envelope holds {len(parsed)} events, at most {MAX_EVENTS_PER_ENVELOPE}"
        )
    for index, item in enumerate(parsed):
        if not isinstance(item, dict):
            raise InvalidEnvelope(f"events[{index}]: expected a JSON object")
    return parsed


class EnvelopeCodec(Generic[M]):
    """Validated decoding of one topic's envelopes into its event models.

    The fast path validates the whole JSON array in one ``validate_json`` call (about a
    third faster than parsing and validating event by event); only a record that fails it
    takes the slow path, which says exactly which event and field is wrong, or accepts a
    lone CloudEvent object as a one-event envelope.
    """

    def __init__(self, model: Any) -> None:
        self.item: TypeAdapter[M] = TypeAdapter(model)
        self.batch: TypeAdapter[list[M]] = TypeAdapter(list[model])

    def decode(self, value: bytes | None) -> list[M]:
        """Every event of the record; the first invalid one rejects the whole record.

        The whole record is rejected rather than part of it so that the dead-letter topic
        holds exactly what was received and a replay after a fix restores it in full.
        """
        if value is None:
            raise InvalidEnvelope("record value is empty (tombstone)")
        if value[:1] == b"{":
            # a lone CloudEvent (derived topics hold one event per record): validated as
            # one, not first tried as an array and then parsed a second time
            try:
                return [self.item.validate_json(value)]
            except ValidationError:
                return self._decode_slowly(value)
        try:
            events = self.batch.validate_json(value)
        except ValidationError:
            return self._decode_slowly(value)
        if not events:
            raise InvalidEnvelope("envelope holds no events")
        if len(events) > MAX_EVENTS_PER_ENVELOPE:
            raise InvalidEnvelope(
                f"envelope holds {len(events)} events, at most {MAX_EVENTS_PER_ENVELOPE}"
            )
        return events

    def _decode_slowly(self, value: bytes) -> list[M]:
        out: list[M] = []
        for index, item in enumerate(unpack(value)):
            try:
                out.append(self.item.validate_python(item))
            except ValidationError as exc:
                raise InvalidEnvelope(
                    f"events[{index}]: {describe_validation_error(exc)}"
                ) from None
        return out


def describe_validation_error(exc: ValidationError, limit: int = 3) -> str:
    """``field.path: message`` for the first few errors; the discriminator tag is left out."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = [str(p) for p in err["loc"]]
        # a tagged union puts the tag (e.g. "churnguard.usage.track") first; it is not a field
        if loc and loc[0].startswith("churnguard."):
            loc = loc[1:]
        parts.append(f"{'.'.join(loc) or '(root)'}: {err['msg']}")
    more = exc.error_count() - limit
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
