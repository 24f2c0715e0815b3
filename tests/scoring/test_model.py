"""The churn model at run time: the shipped artifact, refusals, reasons, reloads, training."""

from __future__ import annotations

import json
import os
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from churnguard.scoring.features import FEATURE_NAMES, AccountState, feature_matrix
from churnguard.scoring.model import (
    DEFAULT_MODEL_PATH,
    META_EVALUATION,
    META_FEATURES,
    META_VERSION,
    TIER_THRESHOLDS,
    ChurnModel,
    FeatureMismatchError,
    ModelError,
    ModelWatcher,
    health_for,
    tier_for,
)
from churnguard.scoring.modeling import TrainedModel, evaluate, train
from churnguard.scoring.reasons import REASON_GROUPS
from churnguard.scoring.training import TrainingSet

D = date(2025, 9, 1)
FIGURES = ("roc_auc", "pr_auc", "brier", "top_decile_lift")


@pytest.fixture(scope="module")
def shipped() -> ChurnModel:
    return ChurnModel.load()


def with_metadata(blob: bytes, **changes: str) -> bytes:
    model = onnx.load_from_string(blob)
    props = {p.key: p.value for p in model.metadata_props} | changes
    del model.metadata_props[:]
    for key, value in props.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    out: bytes = model.SerializeToString()
    return out


def test_the_shipped_model_loads_with_its_contract(shipped: ChurnModel) -> None:
    assert DEFAULT_MODEL_PATH.stat().st_size < 1_000_000
    assert json.loads(shipped.metadata[META_FEATURES]) == list(FEATURE_NAMES)
    assert shipped.version.startswith("gbm-")
    assert shipped.horizon_days == 90
    assert "world-seed1" in shipped.trained_on
    assert "world-seed2" in shipped.trained_on
    assert not any(sep in shipped.trained_on for sep in ("/work", "/home", "/tmp"))
    evaluation = shipped.evaluation
    assert evaluation["positives"] > 100
    model, rules = evaluation["model"], evaluation["rules_baseline"]
    # what the README promises: the model beats the rules baseline on every figure
    assert model["roc_auc"] > rules["roc_auc"]
    assert model["pr_auc"] > rules["pr_auc"]
    assert model["brier"] < rules["brier"]
    assert model["top_decile_lift"] > rules["top_decile_lift"]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (
            [*FEATURE_NAMES[:-1], "support_calls_30d"],
            "needs features this scoring does not compute: support_calls_30d; "
            "it lacks features this scoring computes: tenure_days",
        ),
        (list(FEATURE_NAMES[1:]), "it lacks features this scoring computes: activity_1d"),
        ([FEATURE_NAMES[1], FEATURE_NAMES[0], *FEATURE_NAMES[2:]], "another order"),
    ],
)
def test_a_model_for_other_features_is_refused(names: list[str], message: str) -> None:
    blob = with_metadata(DEFAULT_MODEL_PATH.read_bytes(), **{META_FEATURES: json.dumps(names)})
    with pytest.raises(FeatureMismatchError, match=message):
        ChurnModel(blob, source="other.onnx")


def test_broken_artifacts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a loadable ONNX file"):
        ChurnModel(b"not onnx", source="garbage.onnx")
    model = onnx.load_from_string(DEFAULT_MODEL_PATH.read_bytes())
    del model.metadata_props[:]
    with pytest.raises(ModelError, match="lacks churnguard metadata"):
        ChurnModel(model.SerializeToString())
    with pytest.raises(ModelError, match="cannot read model"):
        ChurnModel.load(tmp_path / "missing.onnx")


def test_predict_in_micro_batches_equals_row_by_row(shipped: ChurnModel) -> None:
    rng = np.random.default_rng(0)
    matrix = np.repeat(shipped.reference[None, :], 5000, axis=0)
    matrix[:, FEATURE_NAMES.index("activity_30d")] = rng.integers(0, 400, 5000)
    matrix[:, FEATURE_NAMES.index("days_since_active")] = rng.integers(0, 40, 5000)
    matrix[:, FEATURE_NAMES.index("unpaid_invoices")] = rng.integers(0, 2, 5000)
    together = shipped.predict(matrix)
    one_by_one = np.array([shipped.predict(row)[0] for row in matrix[::250]])
    assert together.shape == (5000,)
    np.testing.assert_allclose(together[::250], one_by_one)
    assert len(np.unique(together)) > 5


def _event(kind: str, day: date, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": f"churnguard.{kind}", "time": f"{day}T12:00:00Z", "data": data}


def account(*, silent_days: int, failed_payment: bool) -> AccountState:
    """Four users on five features daily for 90 days, then ``silent_days`` of silence."""
    state = AccountState()
    state.apply(
        _event(
            "billing.subscription_updated",
            D - timedelta(days=120),
            {
                "subscription_id": "sub",
                "plan": "growth",
                "interval": "month",
                "quantity": 5,
                "mrr": 150_00,
                "currency": "usd",
                "status": "active",
                "previous_mrr": 150_00,
            },
        )
    )
    for d in range(90 + silent_days, silent_days, -1):
        for user in range(4):
            for feature in ("dashboards", "reports", "alerts", "api", "automations"):
                state.apply(
                    _event(
                        "usage.feature_used",
                        D - timedelta(days=d),
                        {"user_id": f"u{user}", "feature": feature, "count": 2},
                    )
                )
    if failed_payment:
        invoice = {"invoice_id": "in_1", "amount_due": 150_00, "currency": "usd"}
        state.apply(_event("billing.invoice_created", D - timedelta(days=2), invoice))
        state.apply(
            _event(
                "billing.invoice_payment_failed",
                D - timedelta(days=2),
                invoice
                | {
                    "attempt_count": 1,
                    "decline_code": "insufficient_funds",
                    "decline_kind": "soft",
                },
            )
        )
    return state


def test_reasons_name_what_the_features_imply(shipped: ChurnModel) -> None:
    risky = account(silent_days=20, failed_payment=True).features(D)
    fine = account(silent_days=0, failed_payment=False).features(D)
    risky_score, fine_score = shipped.score(feature_matrix([risky, fine]))
    assert risky_score.churn_probability > fine_score.churn_probability + 0.2
    assert risky_score.tier in ("at_risk", "critical")
    assert fine_score.tier == "healthy"
    assert risky_score.health < 50 < fine_score.health

    reasons = {r.code: r for r in risky_score.reasons}
    assert 2 <= len(risky_score.reasons) <= 3  # the top 3 at most, each of weight
    assert "payment_failed" in reasons
    assert reasons["payment_failed"].description == (
        "1 failed payment in 60 days; 1 invoice unpaid"
    )
    usage = {"inactive", "low_activity", "few_active_users", "usage_trend_down"} & set(reasons)
    assert usage, risky_score.reasons
    if "inactive" in reasons:
        assert reasons["inactive"].description == "No product activity for 20 days"
    impacts = [r.impact for r in risky_score.reasons]
    assert impacts == sorted(impacts, reverse=True)
    assert all(i >= 0.005 for i in impacts)
    # the same through reasons()
    assert shipped.reasons(risky.vector(), k=2)[0] == risky_score.reasons[:2]
    # nothing about a healthy account raises its risk much: no payment or usage reason
    assert not {"payment_failed", "inactive"} & {r.code for r in fine_score.reasons}


def test_every_feature_is_in_exactly_one_reason_group() -> None:
    grouped = [f for g in REASON_GROUPS for f in g.features]
    assert sorted(grouped) == sorted(FEATURE_NAMES)
    assert len({g.code for g in REASON_GROUPS}) == len(REASON_GROUPS)


def test_health_and_tier_follow_the_probability() -> None:
    probabilities = np.linspace(0, 1, 101)
    health = [health_for(p) for p in probabilities]
    assert health[0] == 100
    assert health[-1] == 0
    assert health == sorted(health, reverse=True)
    assert [tier_for(p) for p in (0.0, 0.079, 0.08, 0.2, 0.39, 0.4, 1.0)] == [
        "healthy",
        "healthy",
        "watch",
        "at_risk",
        "at_risk",
        "critical",
        "critical",
    ]
    for threshold, _ in TIER_THRESHOLDS:
        assert health_for(threshold) in (75, 50, 25)


def _write(path: Path, blob: bytes, mtime_ns: int) -> None:
    path.write_bytes(blob)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_watcher_swaps_in_a_new_model_and_keeps_the_old_on_a_bad_one(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    original = DEFAULT_MODEL_PATH.read_bytes()
    _write(path, original, 1_000_000_000)
    watcher = ModelWatcher(path)
    first = watcher.current
    assert not watcher.maybe_reload()  # nothing changed

    _write(path, original, 2_000_000_000)  # touched, same content: no reload
    assert not watcher.maybe_reload()
    assert watcher.current is first

    _write(path, with_metadata(original, **{META_VERSION: "gbm-next"}), 3_000_000_000)
    assert watcher.maybe_reload()
    assert watcher.current.version == "gbm-next"

    bad = with_metadata(original, **{META_FEATURES: json.dumps(["activity_1d"])})
    _write(path, bad, 4_000_000_000)
    assert not watcher.maybe_reload()
    assert watcher.current.version == "gbm-next"
    assert watcher.last_error is not None
    assert "lacks features" in watcher.last_error
    _write(path, bad, 5_000_000_000)  # the same bad file again: not even loaded
    assert not watcher.maybe_reload()

    _write(path, b"half a file", 6_000_000_000)
    assert not watcher.maybe_reload()
    path.unlink()
    assert not watcher.maybe_reload()
    assert watcher.current.version == "gbm-next"

    _write(path, original, 7_000_000_000)
    assert watcher.maybe_reload()
    assert watcher.current.version == first.version
    assert watcher.last_error is None


def test_training_a_small_world_writes_its_figures_into_the_artifact(
    small_model: TrainedModel, small_training_set: TrainingSet
) -> None:
    model = ChurnModel(small_model.onnx, source="small")
    assert model.version == small_model.version
    stored = json.loads(model.metadata[META_EVALUATION])
    assert stored == small_model.evaluation.as_dict()
    assert set(stored["model"]) == set(FIGURES) == set(stored["rules_baseline"])
    assert stored["rows"] > 150
    # the stored figures are those of this very artifact on the held-out rows
    _, test = small_training_set.split_by_account()
    assert evaluate(model, test).as_dict() == stored
    assert model.reference.tolist() == pytest.approx(
        np.median(small_training_set.split_by_account()[0].features, axis=0).tolist(), abs=1e-6
    )
    assert "small" in model.trained_on
    assert len(small_model.onnx) < 1_000_000


def test_training_is_reproducible(
    small_model: TrainedModel, small_training_set: TrainingSet
) -> None:
    again = train(*small_training_set.split_by_account())
    assert again.version == small_model.version
    assert again.onnx == small_model.onnx


def test_exported_model_matches_scikit_learn(small_training_set: TrainingSet) -> None:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import GradientBoostingClassifier

    from churnguard.scoring.modeling import CALIBRATION_FOLDS, GBM_PARAMS, _to_onnx

    train_set, test_set = small_training_set.split_by_account()
    classifier = CalibratedClassifierCV(
        GradientBoostingClassifier(**GBM_PARAMS), method="isotonic", cv=CALIBRATION_FOLDS
    ).fit(train_set.features, train_set.labels)
    exported = ChurnModel(
        _to_onnx(
            classifier,
            {
                META_FEATURES: json.dumps(list(FEATURE_NAMES)),
                META_VERSION: "v",
                "churnguard.reference": json.dumps([0.0] * len(FEATURE_NAMES)),
            },
        )
    )
    expected = classifier.predict_proba(test_set.features)[:, 1]
    # float32 in ONNX against float64 in scikit-learn: the isotonic steps of a small
    # training set are steep, so a few rows move by a little more than the rest
    difference = np.abs(exported.predict(test_set.features) - expected)
    assert difference.mean() < 0.002
    assert (difference < 0.01).mean() > 0.98
