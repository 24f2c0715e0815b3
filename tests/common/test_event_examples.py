"""The event contract: every example parses, round-trips and matches its JSON Schema.

Pure unit tests: the models, the committed schemas and examples in
``churnguard/common/events/{schemas,examples}``; no broker, no database.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from pydantic import TypeAdapter, ValidationError

from churnguard.common.events import (
    ALL_EVENT_TYPES,
    ActionOutcome,
    BillingEvent,
    CloudEvent,
    FeedbackEvent,
    InvoicePaymentFailed,
    NpsSubmitted,
    RevenueMovement,
    RiskTierCrossed,
    UnknownEventTypeError,
    decline_kind,
    event_class_for,
    type_name_of,
)
from churnguard.common.events.billing import DECLINE_CODE_KINDS
from churnguard.common.events.feedback import NpsSubmittedData, nps_band
from churnguard.common.events.schemas import (
    EXAMPLES_DIR,
    SCHEMAS_DIR,
    TOPIC_UNIONS,
    check_json_schemas,
    example_files,
    export_json_schemas,
    schema_file_name,
    topic_event_classes,
    topic_example_files,
    topic_schema_file_name,
)

EXAMPLES = example_files()
EXAMPLE_IDS = [f"{p.parent.name}/{p.stem}" for p in EXAMPLES]


@cache
def _schema(file_name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS_DIR / file_name).read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _load(path: Path) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return raw


def _locs(exc: pytest.ExceptionInfo[ValidationError]) -> list[str]:
    return [".".join(str(part) for part in err["loc"]) for err in exc.value.errors()]


# --- examples ------------------------------------------------------------------------


def test_examples_exist() -> None:
    assert EXAMPLES, f"no examples under {EXAMPLES_DIR}"


@pytest.mark.parametrize("cls", ALL_EVENT_TYPES, ids=type_name_of)
def test_every_event_type_has_two_examples(cls: type[CloudEvent]) -> None:
    assert len(example_files(cls)) >= 2, f"{type_name_of(cls)} needs at least 2 examples"


def test_example_folders_are_known_types() -> None:
    for folder in sorted(p for p in EXAMPLES_DIR.iterdir() if p.is_dir()):
        event_class_for(folder.name)  # raises for a folder named after no event type


@pytest.mark.parametrize("path", EXAMPLES, ids=EXAMPLE_IDS)
def test_example_validates_and_round_trips(path: Path) -> None:
    wire = _load(path)
    assert wire["type"] == path.parent.name
    cls = event_class_for(wire["type"])

    event = cls.model_validate_json(path.read_bytes())
    assert type(event) is cls
    assert event.account_id == wire["subject"]

    again = cls.model_validate_json(event.to_json())
    assert again == event
    # the example is exactly what a producer writes: to_json gives the same JSON back
    assert json.loads(event.to_json()) == wire


@pytest.mark.parametrize("path", EXAMPLES, ids=EXAMPLE_IDS)
def test_example_matches_exported_json_schema(path: Path) -> None:
    wire = _load(path)
    cls = event_class_for(wire["type"])
    errors = sorted(_schema(schema_file_name(cls)).iter_errors(wire), key=str)
    assert not errors, [e.message for e in errors]


@pytest.mark.parametrize("topic", sorted(TOPIC_UNIONS))
def test_topic_union_accepts_its_examples_only(topic: str) -> None:
    _, union = TOPIC_UNIONS[topic]
    adapter: TypeAdapter[Any] = TypeAdapter(union)
    validator = _schema(topic_schema_file_name(topic))
    members = set(topic_event_classes(topic))
    assert members, topic
    assert sorted(topic_example_files(topic)) == [
        p for p in EXAMPLES if p.parent.name in {type_name_of(cls) for cls in members}
    ]
    for path in EXAMPLES:
        wire = _load(path)
        cls = event_class_for(wire["type"])
        if cls in members:
            assert type(adapter.validate_json(path.read_bytes())) is cls
            assert validator.is_valid(wire), path.name
        else:
            with pytest.raises(ValidationError):
                adapter.validate_python(wire)
            assert not validator.is_valid(wire), f"{topic} schema accepts {path.name}"


def test_every_event_type_is_on_exactly_one_topic() -> None:
    seen: dict[type[CloudEvent], list[str]] = {}
    for topic in TOPIC_UNIONS:
        for cls in topic_event_classes(topic):
            seen.setdefault(cls, []).append(topic)
    assert {cls: len(topics) for cls, topics in seen.items()} == dict.fromkeys(ALL_EVENT_TYPES, 1)


# --- schemas -------------------------------------------------------------------------


def test_committed_schemas_are_current() -> None:
    stale = check_json_schemas(SCHEMAS_DIR)
    assert not stale, f"stale JSON Schemas {stale}: run python -m churnguard.common.events.schemas"


def test_export_is_deterministic_and_check_finds_drift(tmp_path: Path) -> None:
    written = export_json_schemas(tmp_path)
    assert len(written) == len(ALL_EVENT_TYPES) + len(TOPIC_UNIONS)
    first = {p.name: p.read_bytes() for p in written}
    assert {p.name: p.read_bytes() for p in export_json_schemas(tmp_path)} == first
    assert first == {p.name: p.read_bytes() for p in SCHEMAS_DIR.glob("*.schema.json")}
    assert all(text.endswith(b"}\n") for text in first.values())
    assert check_json_schemas(tmp_path) == []

    tampered = tmp_path / schema_file_name(NpsSubmitted)
    tampered.write_text(tampered.read_text().replace('"maximum": 10', '"maximum": 11'))
    missing = tmp_path / topic_schema_file_name("events.billing")
    missing.unlink()
    assert sorted(check_json_schemas(tmp_path)) == sorted([tampered.name, missing.name])


def test_schema_ids_and_titles() -> None:
    for cls in ALL_EVENT_TYPES:
        schema = _schema(schema_file_name(cls)).schema
        assert schema["$id"] == f"urn:churnguard:schema:{type_name_of(cls)}:v{cls.SCHEMA_VERSION}"
        assert schema["title"] == cls.__name__
        assert {"id", "source", "specversion", "type", "time", "subject", "data"} <= set(
            schema["required"]
        )
        assert "schemaversion" in schema["properties"]


@pytest.mark.parametrize("cls", ALL_EVENT_TYPES, ids=type_name_of)
def test_schema_version_attribute_matches_class(cls: type[CloudEvent]) -> None:
    assert cls.model_fields["schema_version"].default == cls.SCHEMA_VERSION
    assert (cls.__doc__ or "").strip(), f"{cls.__name__} needs a docstring"


# --- registry ------------------------------------------------------------------------


def test_event_class_for() -> None:
    assert event_class_for("churnguard.feedback.nps_submitted") is NpsSubmitted
    assert len({type_name_of(cls) for cls in ALL_EVENT_TYPES}) == len(ALL_EVENT_TYPES)
    assert all(type_name_of(cls).startswith("churnguard.") for cls in ALL_EVENT_TYPES)
    with pytest.raises(UnknownEventTypeError):
        event_class_for("churnguard.billing.invoice_voided")


# --- targeted negatives and domain rules ---------------------------------------------


def _example(cls: type[CloudEvent], index: int = 0) -> dict[str, Any]:
    return _load(example_files(cls)[index])


def test_nps_score_above_ten_is_rejected_naming_data_score() -> None:
    wire = _example(NpsSubmitted)
    wire["data"]["score"] = 11
    with pytest.raises(ValidationError) as exc:
        NpsSubmitted.model_validate(wire)
    assert _locs(exc) == ["data.score"]
    # through the topic union too (its loc starts with the type tag)
    with pytest.raises(ValidationError) as exc:
        TypeAdapter(FeedbackEvent).validate_python(wire)
    assert _locs(exc) == ["churnguard.feedback.nps_submitted.data.score"]
    assert not _schema(schema_file_name(NpsSubmitted)).is_valid(wire)


def test_naive_time_is_rejected_naming_time() -> None:
    wire = _example(InvoicePaymentFailed)
    wire["time"] = datetime(2025, 3, 1, 5, 31, 19).isoformat()  # no offset
    with pytest.raises(ValidationError) as exc:
        TypeAdapter(BillingEvent).validate_python(wire)
    assert [e["loc"][-1] for e in exc.value.errors()] == ["time"]
    assert exc.value.errors()[0]["type"] == "timezone_aware"


def test_unknown_field_in_data_is_rejected() -> None:
    wire = _example(InvoicePaymentFailed)
    wire["data"]["decline_reason"] = "insufficient_funds"
    with pytest.raises(ValidationError) as exc:
        InvoicePaymentFailed.model_validate(wire)
    assert _locs(exc) == ["data.decline_reason"]
    assert exc.value.errors()[0]["type"] == "extra_forbidden"
    assert not _schema(schema_file_name(InvoicePaymentFailed)).is_valid(wire)


def test_unknown_context_attribute_and_wrong_type_are_rejected() -> None:
    wire = _example(NpsSubmitted)
    with pytest.raises(ValidationError):
        NpsSubmitted.model_validate({**wire, "traceparent": "00-abc-def-01"})
    with pytest.raises(ValidationError):
        NpsSubmitted.model_validate({**wire, "type": "churnguard.feedback.csat_submitted"})


def test_decline_kinds() -> None:
    assert decline_kind("stolen_card") == "hard"
    assert decline_kind("insufficient_funds") == "soft"
    assert decline_kind("Expired_Card ") == "hard"
    assert decline_kind("some_new_code") == "soft"
    assert decline_kind(None) == "soft"
    for code in ("insufficient_funds", "processing_error", "try_again_later", "generic_decline"):
        assert DECLINE_CODE_KINDS[code] == "soft"
    for code in (
        "stolen_card",
        "lost_card",
        "do_not_honor",
        "expired_card",
        "pickup_card",
        "fraudulent",
        "incorrect_number",
    ):
        assert DECLINE_CODE_KINDS[code] == "hard"


def test_payment_failed_examples_classify_their_decline_code() -> None:
    for path in example_files(InvoicePaymentFailed):
        data = _load(path)["data"]
        assert data["decline_kind"] == decline_kind(data["decline_code"]), path.name


@pytest.mark.parametrize(
    ("score", "band"),
    [
        (0, "detractor"),
        (6, "detractor"),
        (7, "passive"),
        (8, "passive"),
        (9, "promoter"),
        (10, "promoter"),
    ],
)
def test_nps_band_boundaries(score: int, band: str) -> None:
    assert nps_band(score) == band
    assert NpsSubmittedData(user_id="usr_2841", score=score).band == band


def test_nps_band_is_not_on_the_wire() -> None:
    event = NpsSubmitted.model_validate(_example(NpsSubmitted))
    assert "band" not in json.loads(event.to_json())["data"]
    assert "band" not in NpsSubmitted.model_json_schema()["$defs"]["NpsSubmittedData"]["properties"]


@pytest.mark.parametrize(
    ("kind", "before", "after", "cancellation", "ok"),
    [
        ("new", 0, 49_000, None, True),
        ("reactivation", 0, 49_000, None, True),
        ("expansion", 122_500, 196_000, None, True),
        ("contraction", 445_000, 267_000, None, True),
        ("churn", 58_800, 0, "involuntary", True),
        ("churn", 58_800, 0, None, True),
        ("new", 10_000, 49_000, None, False),  # had MRR already: expansion
        ("expansion", 196_000, 122_500, None, False),  # wrong direction
        ("contraction", 58_800, 0, None, False),  # down to zero is churn
        ("churn", 58_800, 100, None, False),  # churn ends at zero
        ("expansion", 122_500, 196_000, "voluntary", False),  # cancellation only for churn
    ],
)
def test_revenue_movement_invariants(
    kind: str, before: int, after: int, cancellation: str | None, ok: bool
) -> None:
    wire = _example(RevenueMovement)
    data = {
        "kind": kind,
        "mrr_before": before,
        "mrr_after": after,
        "delta": after - before,
        "currency": "usd",
    }
    if cancellation:
        data["cancellation"] = cancellation
    if ok:
        event = RevenueMovement.model_validate({**wire, "data": data})
        assert event.data.delta == after - before
        with pytest.raises(ValidationError):  # delta must be mrr_after - mrr_before
            RevenueMovement.model_validate({**wire, "data": {**data, "delta": before - after}})
    else:
        with pytest.raises(ValidationError):
            RevenueMovement.model_validate({**wire, "data": data})


def test_risk_tier_crossing_must_change_tier() -> None:
    wire = _example(RiskTierCrossed)
    event = RiskTierCrossed.model_validate(wire)
    assert event.data.worsened == (wire["data"]["to_tier"] in ("at_risk", "critical"))
    same = {**wire["data"], "to_tier": wire["data"]["from_tier"]}
    with pytest.raises(ValidationError):
        RiskTierCrossed.model_validate({**wire, "data": same})


def test_action_outcome_status_fits_action() -> None:
    wire = next(
        w
        for w in map(_load, example_files(ActionOutcome))
        if w["data"]["status"] == "payment_failed"
    )
    for patch in (
        {"status": "opened"},  # not an outcome of a payment retry
        {"channel": "email"},  # channel only for notifications
        {"status": "payment_succeeded"},  # decline code only with payment_failed
    ):
        with pytest.raises(ValidationError):
            ActionOutcome.model_validate({**wire, "data": {**wire["data"], **patch}})
