"""Conditions: parsed against the field catalogue, evaluated against facts; unknown values
never match."""

from __future__ import annotations

from typing import Any

import pytest

from churnguard.playbooks.catalogue import fields_for
from churnguard.playbooks.conditions import ConditionError, parse

KNOWN = fields_for("usage_dropped")


def holds(raw: Any, **facts: Any) -> bool:
    return parse(raw, KNOWN).holds(facts)


def test_equality_membership_and_comparisons() -> None:
    assert holds([{"segment": "enterprise"}], segment="enterprise")
    assert not holds([{"segment": "enterprise"}], segment="smb")
    assert holds([{"tier": {"in": ["at_risk", "critical"]}}], tier="critical")
    assert not holds([{"tier": {"not_in": ["at_risk", "critical"]}}], tier="critical")
    assert holds([{"tenure_days": {"lt": 90}}], tenure_days=89.0)
    assert not holds([{"tenure_days": {"lt": 90}}], tenure_days=90.0)
    assert holds([{"arr": {"gte": 50000, "lt": 250000}}], arr=50000.0)
    assert not holds([{"arr": {"gte": 50000, "lt": 250000}}], arr=250000.0)
    assert holds(
        [{"features.seat_utilisation": {"gt": 0.9}}], **{"features.seat_utilisation": 0.95}
    )


def test_lists_and_existence() -> None:
    assert holds([{"unadopted_sticky_features": "api"}], unadopted_sticky_features=["api"])
    assert holds([{"unadopted_sticky_features": {"empty": True}}], unadopted_sticky_features=[])
    assert holds([{"guide_feature": {"exists": True}}], guide_feature="api")
    assert not holds([{"guide_feature": {"exists": True}}], guide_feature=None)
    assert holds([{"csm": {"exists": False}}])


def test_unknown_values_match_nothing_but_exists_false() -> None:
    for raw in (
        [{"tier": "critical"}],
        [{"tier": {"ne": "critical"}}],
        [{"arr": {"lt": 1}}],
        [{"tier": {"not_in": ["healthy"]}}],
    ):
        assert not holds(raw), raw


def test_any_all_not() -> None:
    raw = [
        {"any": [{"segment": "enterprise"}, {"arr_tier": {"in": ["large", "strategic"]}}]},
        {"not": {"plan": "starter"}},
    ]
    assert holds(raw, segment="smb", arr_tier="large", plan="growth")
    assert holds(raw, segment="enterprise", plan="growth")
    assert not holds(raw, segment="smb", arr_tier="small", plan="growth")
    assert not holds(raw, segment="enterprise", plan="starter")


def test_a_failure_is_explained_with_the_value_seen() -> None:
    condition = parse([{"segment": "enterprise"}, {"tier": {"in": ["at_risk", "critical"]}}], KNOWN)
    facts = {"segment": "enterprise", "tier": "watch"}
    assert condition.explain_failure(facts) == "tier in ['at_risk', 'critical'] (was 'watch')"
    assert (
        parse([{"tier": "critical"}], KNOWN).explain_failure({})
        == "tier == 'critical' (was unknown)"
    )
    assert condition.fields() == {"segment", "tier"}


@pytest.mark.parametrize(
    ("raw", "path", "message"),
    [
        ([{"teir": "x"}], ("conditions", 0, "teir"), "unknown field 'teir' (did you mean 'tier'?)"),
        ([{"tier": "criticl"}], ("conditions", 0, "tier"), "tier: 'criticl' is not one of"),
        ([{"arr": "big"}], ("conditions", 0, "arr"), "arr is a number; 'big' is not"),
        ([{"arr": True}], ("conditions", 0, "arr"), "arr is a number; True is not"),
        ([{"tier": {"lt": 1}}], ("conditions", 0, "tier", "lt"), "operator 'lt' does not apply"),
        ([{"tier": {"in": []}}], ("conditions", 0, "tier", "in"), "in takes a non-empty list"),
        ([{"any": {"tier": "x"}}], ("conditions", 0, "any"), "any takes a non-empty list"),
        (["tier"], ("conditions", 0), "a condition is a mapping"),
        (
            [{"signal.drop_ratio": {"gte": "half"}}],
            ("conditions", 0, "signal.drop_ratio", "gte"),
            "signal.drop_ratio is a number",
        ),
        ([{"signal.milestone": "x"}], ("conditions", 0, "signal.milestone"), "unknown field"),
    ],
)
def test_bad_conditions_name_where_and_why(raw: Any, path: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ConditionError) as caught:
        parse(raw, KNOWN)
    assert caught.value.path == path
    assert caught.value.message.startswith(message), caught.value.message


def test_signal_fields_follow_the_trigger() -> None:
    assert "signal.drop_ratio" in fields_for("usage_dropped")
    assert "signal.drop_ratio" not in fields_for("milestone_reached")
    assert fields_for("risk_tier_crossed")["signal.to_tier"].values == (
        "healthy",
        "watch",
        "at_risk",
        "critical",
    )
    assert fields_for("renewal_at_risk")["signal.window_days"].kind == "number"
    assert not any(name.startswith("signal.") for name in fields_for(None))
