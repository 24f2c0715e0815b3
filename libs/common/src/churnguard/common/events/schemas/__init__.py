"""JSON Schemas of the event contract, exported from the pydantic models.

One file per event type, ``<type>.v<schema_version>.schema.json``, and one per topic,
``<topic>.schema.json`` (the topic's discriminated union, self-contained), for
consumers outside Python. The committed copies live in :data:`SCHEMAS_DIR`, the
directory of this package (a package rather than a ``schemas.py`` beside a ``schemas/``
data folder, which type checkers would take for a namespace package); a test fails
when they drift from the models. Regenerate them with::

    python -m churnguard.common.events.schemas          # write
    python -m churnguard.common.events.schemas --check  # list stale files, exit 1 if any

The schemas are ``model_json_schema(by_alias=True)`` (validation mode) with ``$schema``,
``$id`` and ``title`` set, and with the CloudEvents REQUIRED attributes ``specversion``
and ``type`` marked required (the models default them, but every producer writes them
and the topic unions need ``type`` to pick the model). Output is deterministic: sorted
keys, two-space indent, trailing newline.

Schema files of types or versions that no longer exist are neither reported nor
deleted: an old version's schema may be kept on purpose, for the records still in Kafka.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from pydantic import TypeAdapter

from churnguard.common.events import (
    ALL_EVENT_TYPES,
    BillingEvent,
    FeedbackEvent,
    NotificationEvent,
    OutcomeEvent,
    PaymentRetryEvent,
    RevenueMovementEvent,
    ScoreEvent,
    SignalEvent,
    UsageEvent,
    event_class_for,
    type_name_of,
)
from churnguard.common.events.base import CloudEvent
from churnguard.common.topics import Topic

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
ID_PREFIX = "urn:churnguard:schema:"

SCHEMAS_DIR = Path(__file__).resolve().parent
"""Where the committed schemas live: beside this module, so they ship with the package."""
EXAMPLES_DIR = SCHEMAS_DIR.parent / "examples"
"""Example payloads: ``examples/<type>/<name>.json``, exactly as on the wire."""

SCHEMA_DIR = SCHEMAS_DIR
"""Alias of :data:`SCHEMAS_DIR`."""

_UNION_NAMES: tuple[tuple[str, Any], ...] = (
    ("UsageEvent", UsageEvent),
    ("BillingEvent", BillingEvent),
    ("FeedbackEvent", FeedbackEvent),
    ("ScoreEvent", ScoreEvent),
    ("SignalEvent", SignalEvent),
    ("RevenueMovementEvent", RevenueMovementEvent),
    ("NotificationEvent", NotificationEvent),
    ("PaymentRetryEvent", PaymentRetryEvent),
    ("OutcomeEvent", OutcomeEvent),
)


def _union_name(topic: str, union: Any) -> str:
    return next((name for name, known in _UNION_NAMES if known is union), topic)


TOPIC_UNIONS: dict[str, tuple[str, Any]] = {
    t.topic: (_union_name(t.topic, t.spec.value), t.spec.value) for t in Topic
}
"""Topic → (name, union or single event class) of its events, from the topic registry."""

_CLOUDEVENTS_REQUIRED = ("specversion", "type")


def topic_event_classes(topic: str) -> tuple[type[CloudEvent], ...]:
    """The event classes a topic carries (the members of its union)."""
    _, union = TOPIC_UNIONS[topic]
    if isinstance(union, type):
        return (union,)
    inner = get_args(union)[0]  # Annotated[X | Y, Field(discriminator=...)] → X | Y
    members = get_args(inner) or (inner,)
    return tuple(cls for cls in members if isinstance(cls, type) and issubclass(cls, CloudEvent))


def schema_file_name(cls: type[CloudEvent]) -> str:
    return f"{type_name_of(cls)}.v{cls.SCHEMA_VERSION}.schema.json"


def topic_schema_file_name(topic: str) -> str:
    return f"{topic}.schema.json"


def _require_context_attributes(schema: dict[str, Any]) -> None:
    """Mark specversion and type required in every event (not data) object schema."""
    objects = [schema, *schema.get("$defs", {}).values()]
    for obj in objects:
        properties = obj.get("properties", {})
        if "specversion" in properties and "type" in properties:
            obj["required"] = sorted({*obj.get("required", ()), *_CLOUDEVENTS_REQUIRED})


def event_json_schema(cls: type[CloudEvent]) -> dict[str, Any]:
    """The JSON Schema of one event type, as exported."""
    schema = cls.model_json_schema(by_alias=True)
    _require_context_attributes(schema)
    schema["$schema"] = JSON_SCHEMA_DIALECT
    schema["$id"] = f"{ID_PREFIX}{type_name_of(cls)}:v{cls.SCHEMA_VERSION}"
    schema["title"] = cls.__name__
    return schema


def topic_json_schema(topic: str) -> dict[str, Any]:
    """The JSON Schema of everything a topic carries (its discriminated union)."""
    name, union = TOPIC_UNIONS[topic]
    schema: dict[str, Any] = TypeAdapter(union).json_schema(by_alias=True)
    _require_context_attributes(schema)
    schema["$schema"] = JSON_SCHEMA_DIALECT
    schema["$id"] = f"{ID_PREFIX}topic:{topic}"
    schema["title"] = name
    schema["description"] = f"Any event of the churnguard topic {topic}."
    return schema


def render(schema: dict[str, Any]) -> str:
    """Deterministic JSON text of a schema."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def expected_files() -> dict[str, str]:
    """File name → content of every schema file the models define."""
    files = {schema_file_name(cls): render(event_json_schema(cls)) for cls in ALL_EVENT_TYPES}
    for topic in TOPIC_UNIONS:
        files[topic_schema_file_name(topic)] = render(topic_json_schema(topic))
    return files


def export_json_schemas(out_dir: Path) -> list[Path]:
    """Write every event type's and every topic's schema into ``out_dir``; return the paths.

    Files whose content is already right are left untouched (but still returned).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, text in expected_files().items():
        path = out_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def check_json_schemas(out_dir: Path) -> list[str]:
    """Names of the schema files in ``out_dir`` that are missing or differ from the models."""
    problems: list[str] = []
    for name, text in expected_files().items():
        path = out_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            problems.append(name)
    return problems


def example_files(cls: type[CloudEvent] | None = None) -> list[Path]:
    """The example payload files of one event type, or of all types, sorted."""
    pattern = f"{type_name_of(cls)}/*.json" if cls is not None else "*/*.json"
    return sorted(EXAMPLES_DIR.glob(pattern))


def topic_example_files(topic: str) -> list[Path]:
    """The example payload files of every event type a topic carries.

    Consumers test their handlers against these for every topic they read.
    """
    return [path for cls in topic_event_classes(topic) for path in example_files(cls)]


def load_example(path: Path) -> CloudEvent:
    """Parse an example file with the model of its ``type``."""
    raw = path.read_bytes()
    type_name = json.loads(raw)["type"]
    return event_class_for(type_name).model_validate_json(raw)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m churnguard.common.events.schemas",
        description="Export or check the JSON Schemas of the churnguard events.",
    )
    parser.add_argument("--check", action="store_true", help="only report stale files")
    parser.add_argument("--out", type=Path, default=SCHEMAS_DIR, help="schema directory")
    args = parser.parse_args(argv)
    if args.check:
        stale = check_json_schemas(args.out)
        for name in stale:
            print(f"stale or missing: {name}", file=sys.stderr)
        return 1 if stale else 0
    for path in export_json_schemas(args.out):
        print(path.name)
    return 0
