"""The vocabulary playbooks validate against stays true to the services that produce it."""

from __future__ import annotations

from churnguard.common.events import ALL_EVENT_TYPES, type_name_of
from churnguard.playbooks.catalogue import SCORE_FEATURES, SIGNAL_PREFIX, SIGNALS
from churnguard.scoring.features import FEATURE_NAMES


def test_score_features_are_scorings_feature_names() -> None:
    assert SCORE_FEATURES == FEATURE_NAMES


def test_every_signal_type_is_a_trigger() -> None:
    signal_types = {
        type_name_of(c) for c in ALL_EVENT_TYPES if type_name_of(c).startswith(SIGNAL_PREFIX)
    }
    assert {SIGNAL_PREFIX + name for name in SIGNALS} == signal_types
