"""Training and evaluating the churn model (``churnguard model train`` / ``evaluate``).

Needs the ``train`` extra (scikit-learn, skl2onnx, onnx), imported lazily so the service,
which only scores, never loads them.

The model: a gradient-boosted tree ensemble (scikit-learn's GradientBoostingClassifier;
skl2onnx cannot convert the histogram variant of current scikit-learn), calibrated with
isotonic regression over 3 folds so its output reads as a probability, exported to ONNX
with the metadata :mod:`churnguard.scoring.model` checks. The figures in the artifact are
measured by running the exported ONNX file itself on the held-out rows, beside the rules
baseline (:mod:`.health_rules`) on the same rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from churnguard.scoring import health_rules
from churnguard.scoring.evaluation import Figures, figures
from churnguard.scoring.features import FEATURE_NAMES
from churnguard.scoring.model import (
    INPUT_NAME,
    META_EVALUATION,
    META_FEATURES,
    META_HORIZON,
    META_REFERENCE,
    META_RULES_RATES,
    META_TRAINED_ON,
    META_VERSION,
    ChurnModel,
)
from churnguard.scoring.training import TrainingSet

GBM_PARAMS: dict[str, Any] = {
    "n_estimators": 150,
    "max_depth": 3,
    "learning_rate": 0.05,
    "subsample": 0.8,
    "min_samples_leaf": 40,
    "random_state": 0,
}
CALIBRATION_FOLDS = 3
CALIBRATION_ENSEMBLE = False
"""One ensemble fitted on all rows, calibrated on cross-validated predictions, rather than
one per fold averaged: a third of the trees to evaluate, and the worker runs the model 17
times for each account whose reasons it explains."""


@dataclass(frozen=True)
class Evaluation:
    """The model and the rules baseline on the same rows."""

    data: str
    rows: int
    positives: int
    model: Figures
    rules_baseline: Figures

    def as_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "rows": self.rows,
            "positives": self.positives,
            "model": self.model.as_dict(),
            "rules_baseline": self.rules_baseline.as_dict(),
        }


@dataclass(frozen=True)
class TrainedModel:
    onnx: bytes
    version: str
    trained_on: str
    evaluation: Evaluation
    metadata: dict[str, str] = field(default_factory=dict)


def evaluate(model: ChurnModel, data: TrainingSet) -> Evaluation:
    """The model's figures and the rules baseline's on ``data`` (rules probabilities from
    the band rates stored in the artifact, i.e. learnt on its training rows)."""
    if not model.rules_band_rates:
        raise ValueError(f"model {model.source} carries no rules baseline band rates")
    scores = health_rules.health_scores(data.features)
    return Evaluation(
        data=data.describe(),
        rows=len(data),
        positives=data.positives,
        model=figures(model.predict(data.features), data.labels),
        rules_baseline=figures(
            health_rules.probabilities(scores, model.rules_band_rates), data.labels
        ),
    )


def train(train_set: TrainingSet, test_set: TrainingSet) -> TrainedModel:
    """Fit, calibrate, export, and evaluate the exported artifact on ``test_set``."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import GradientBoostingClassifier

    if train_set.positives < 2 * CALIBRATION_FOLDS or test_set.positives == 0:
        raise ValueError(
            f"too few cancellations to train and test: {train_set.positives} in the training "
            f"rows, {test_set.positives} in the test rows"
        )
    x, y = train_set.features, train_set.labels
    classifier = CalibratedClassifierCV(
        GradientBoostingClassifier(**GBM_PARAMS),
        method="isotonic",
        cv=CALIBRATION_FOLDS,
        ensemble=CALIBRATION_ENSEMBLE,
    )
    classifier.fit(x, y)

    digest = hashlib.sha256()
    digest.update(
        json.dumps([FEATURE_NAMES, GBM_PARAMS, CALIBRATION_FOLDS, CALIBRATION_ENSEMBLE]).encode()
    )
    digest.update(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    version = f"gbm-{digest.hexdigest()[:12]}"
    trained_on = f"train: {train_set.describe()}; test: {test_set.describe()}"
    rates = health_rules.band_rates(health_rules.health_scores(x), y)
    metadata = {
        META_FEATURES: json.dumps(list(FEATURE_NAMES)),
        META_VERSION: version,
        META_TRAINED_ON: trained_on,
        META_REFERENCE: json.dumps([round(float(v), 6) for v in np.median(x, axis=0)]),
        META_RULES_RATES: json.dumps([round(r, 6) for r in rates]),
        META_HORIZON: str(train_set.horizon_days),
    }
    blob = _to_onnx(classifier, metadata)
    evaluation = evaluate(ChurnModel(blob, source=version), test_set)
    metadata[META_EVALUATION] = json.dumps(evaluation.as_dict())
    blob = _to_onnx(classifier, metadata)
    return TrainedModel(blob, version, trained_on, evaluation, metadata)


def _to_onnx(classifier: Any, metadata: dict[str, str]) -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    onnx_model = convert_sklearn(
        classifier,
        initial_types=[(INPUT_NAME, FloatTensorType([None, len(FEATURE_NAMES)]))],
        options={id(classifier): {"zipmap": False}},
    )
    onnx_model.graph.name = "churnguard_churn_model"  # skl2onnx names it with a random UUID
    onnx_model.doc_string = (
        "churnguard churn model: P(account decides to cancel within the horizon) from "
        "churnguard.scoring.features.FEATURE_NAMES"
    )
    del onnx_model.metadata_props[:]
    for key, value in sorted(metadata.items()):
        prop = onnx_model.metadata_props.add()
        prop.key, prop.value = key, value
    blob: bytes = onnx_model.SerializeToString()
    return blob
