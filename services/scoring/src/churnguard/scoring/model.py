"""The churn model at run time: an ONNX artifact scored with onnxruntime.

An artifact (``churnguard model train``) is one ONNX file: a calibrated gradient-boosted
classifier whose input ``features`` is a float32 matrix in :data:`FEATURE_NAMES` order and
whose output ``probabilities`` holds P(stay), P(cancel within the horizon) per row. Its
``metadata_props`` carry what the service and an operator need to trust it:

=============================  ============================================================
``churnguard.features``        JSON list of feature names, checked against FEATURE_NAMES
``churnguard.model_version``   e.g. ``gbm-3f2a…``; goes into every AccountScored event
``churnguard.trained_on``      what it was trained and evaluated on
``churnguard.evaluation``      JSON: ROC AUC, PR AUC, Brier, top-decile lift of the model
                               and of the rules baseline on the same held-out rows
``churnguard.reference``       JSON list: per-feature reference values (training medians)
``churnguard.rules_band_rates``  JSON list: the rules baseline's churn rate per health band
``churnguard.horizon_days``    the label's horizon
=============================  ============================================================

Only onnxruntime and numpy are needed here; training lives in :mod:`.modeling`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort

from churnguard.common.events.derived import ReasonCode, RiskTier
from churnguard.scoring.features import FEATURE_NAMES
from churnguard.scoring.reasons import GROUP_COLUMNS, REASON_GROUPS

log = logging.getLogger(__name__)

DEFAULT_MODEL_PATH: Final = Path(__file__).resolve().parent / "models" / "default.onnx"
"""The model shipped with the service (``make model`` rebuilds it)."""

INPUT_NAME: Final = "features"
OUTPUT_NAME: Final = "probabilities"
META_FEATURES: Final = "churnguard.features"
META_VERSION: Final = "churnguard.model_version"
META_TRAINED_ON: Final = "churnguard.trained_on"
META_EVALUATION: Final = "churnguard.evaluation"
META_REFERENCE: Final = "churnguard.reference"
META_RULES_RATES: Final = "churnguard.rules_band_rates"
META_HORIZON: Final = "churnguard.horizon_days"

BATCH_ROWS: Final = 2048
"""Rows per onnxruntime call: large enough to amortise the call, small enough for the cache."""
MIN_REASON_IMPACT: Final = 0.005
"""A group must move the probability by at least half a percentage point to be a reason."""

TIER_THRESHOLDS: Final[tuple[tuple[float, RiskTier], ...]] = (
    (0.40, "critical"),
    (0.20, "at_risk"),
    (0.08, "watch"),
)
"""Lowest churn probability (over the model's horizon) of each tier, worst first; below
the last one an account is ``healthy``. 0.08 is about the base rate of the simulated
customer base over 90 days: ``watch`` means riskier than the average account."""

HEALTH_KNOTS: Final[tuple[tuple[float, ...], tuple[float, ...]]] = (
    (0.0, 0.08, 0.20, 0.40, 1.0),
    (100.0, 75.0, 50.0, 25.0, 0.0),
)
"""Health is piecewise linear in the probability, with the tier thresholds at 75/50/25."""


class ModelError(ValueError):
    """An artifact that cannot serve: unreadable, or not made for these features."""


class FeatureMismatchError(ModelError):
    """The artifact's feature list differs from FEATURE_NAMES."""


def tier_for(probability: float) -> RiskTier:
    for threshold, tier in TIER_THRESHOLDS:
        if probability >= threshold:
            return tier
    return "healthy"


def health_for(probability: float) -> int:
    return round(float(np.interp(probability, *HEALTH_KNOTS)))


def check_feature_names(names: Sequence[str], source: str) -> None:
    """Raise FeatureMismatchError naming the missing and extra features (or the order)."""
    if tuple(names) == FEATURE_NAMES:
        return
    missing = [n for n in names if n not in FEATURE_NAMES]
    extra = [n for n in FEATURE_NAMES if n not in names]
    parts = []
    if missing:
        parts.append(f"it needs features this scoring does not compute: {', '.join(missing)}")
    if extra:
        parts.append(f"it lacks features this scoring computes: {', '.join(extra)}")
    if not parts:
        parts.append("same features in another order")
    raise FeatureMismatchError(
        f"model {source} does not match this scoring's FEATURE_NAMES: {'; '.join(parts)}. "
        "Retrain it with `churnguard model train` for this version."
    )


@dataclass(frozen=True)
class Score:
    """One account's score, as an AccountScored event carries it."""

    churn_probability: float
    health: int
    tier: RiskTier
    reasons: list[ReasonCode]


class ChurnModel:
    """A loaded, validated artifact (see the module docstring). Thread-compatible."""

    def __init__(self, blob: bytes, source: str = "<bytes>") -> None:
        self.source = source
        self.sha256 = hashlib.sha256(blob).hexdigest()
        options = ort.SessionOptions()
        # scoring shares a 2-core box with Kafka and the other services: one thread each
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                blob, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"model {source} is not a loadable ONNX file: {exc}") from exc
        meta: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
        self.metadata = meta
        try:
            names = json.loads(meta[META_FEATURES])
            self.version: str = meta[META_VERSION]
            reference = np.asarray(json.loads(meta[META_REFERENCE]), dtype=np.float32)
        except (KeyError, ValueError) as exc:
            raise ModelError(f"model {source} lacks churnguard metadata: {exc}") from exc
        check_feature_names(names, source)
        inputs = {i.name: i.shape for i in self._session.get_inputs()}
        if inputs.get(INPUT_NAME, [None, None])[-1] != len(FEATURE_NAMES):
            raise ModelError(
                f"model {source} takes inputs {inputs}, expected {INPUT_NAME!r} of "
                f"{len(FEATURE_NAMES)} columns"
            )
        if OUTPUT_NAME not in {o.name for o in self._session.get_outputs()}:
            raise ModelError(f"model {source} has no {OUTPUT_NAME!r} output")
        if reference.shape != (len(FEATURE_NAMES),):
            raise ModelError(f"model {source}: reference has {reference.size} values")
        self.reference = reference
        self._reference_values = dict(zip(FEATURE_NAMES, reference.tolist(), strict=True))
        self.trained_on = meta.get(META_TRAINED_ON, "")
        self.horizon_days = int(meta.get(META_HORIZON, "0") or 0)
        self.evaluation: dict[str, Any] = json.loads(meta.get(META_EVALUATION, "{}"))
        self.rules_band_rates: list[float] = json.loads(meta.get(META_RULES_RATES, "[]"))
        probe = self.predict(reference[None, :])
        if not (np.isfinite(probe).all() and 0.0 <= probe[0] <= 1.0):
            raise ModelError(f"model {source} gives {probe[0]} for the reference account")

    @classmethod
    def load(cls, path: Path | str = DEFAULT_MODEL_PATH) -> ChurnModel:
        path = Path(path)
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read model {path}: {exc}") from exc
        return cls(blob, source=str(path))

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        """P(cancel within the horizon) per row of an ``(n, len(FEATURE_NAMES))`` matrix."""
        x = np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1, len(FEATURE_NAMES))
        out = np.empty(len(x), dtype=np.float64)
        for start in range(0, len(x), BATCH_ROWS):
            batch = x[start : start + BATCH_ROWS]
            (probabilities,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: batch})
            out[start : start + len(batch)] = probabilities[:, 1]
        return np.clip(out, 0.0, 1.0)

    def contributions(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``(n,)`` and per-group impacts ``(n, len(REASON_GROUPS))``.

        The impact of a group is the probability minus the probability with the group's
        features set to their reference values: > 0 means the account's values raise its
        risk. All variants go through the model in one batched pass.
        """
        x = np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1, len(FEATURE_NAMES))
        n, groups = len(x), len(GROUP_COLUMNS)
        variants = np.repeat(x[:, None, :], groups + 1, axis=1)
        for g, columns in enumerate(GROUP_COLUMNS, start=1):
            variants[:, g, columns] = self.reference[list(columns)]
        p = self.predict(variants.reshape(-1, len(FEATURE_NAMES))).reshape(n, groups + 1)
        return p[:, 0], p[:, :1] - p[:, 1:]

    def reasons(self, matrix: np.ndarray, k: int = 3) -> list[list[ReasonCode]]:
        """Up to ``k`` reasons per row that raise its churn risk, strongest first.

        A reason is a group of features whose impact is at least MIN_REASON_IMPACT and whose
        values fit its code (see :class:`~churnguard.scoring.reasons.ReasonGroup`). They
        cost one prediction per group and row (~16 rows per account, in one batched call):
        compute them for the accounts whose scores are published, not for every re-score.
        """
        x = np.asarray(matrix, dtype=np.float32).reshape(-1, len(FEATURE_NAMES))
        _, impacts = self.contributions(x)
        return [self._reasons_of(row, impact, k) for row, impact in zip(x, impacts, strict=True)]

    def score(self, matrix: np.ndarray, k: int = 3) -> list[Score]:
        """Probability, health, tier and reasons per row, in one batched pass."""
        x = np.asarray(matrix, dtype=np.float32).reshape(-1, len(FEATURE_NAMES))
        probabilities, impacts = self.contributions(x)
        return [
            Score(
                churn_probability=float(p),
                health=health_for(float(p)),
                tier=tier_for(float(p)),
                reasons=self._reasons_of(row, impact, k),
            )
            for row, p, impact in zip(x, probabilities, impacts, strict=True)
        ]

    def _reasons_of(self, row: np.ndarray, impact: np.ndarray, k: int) -> list[ReasonCode]:
        values = dict(zip(FEATURE_NAMES, row.tolist(), strict=True))
        out: list[ReasonCode] = []
        for g in np.argsort(-impact, kind="stable").tolist():
            group = REASON_GROUPS[g]
            if len(out) == k or impact[g] < MIN_REASON_IMPACT:
                break
            if group.applies(values, self._reference_values):
                out.append(
                    ReasonCode(
                        code=group.code,
                        description=group.describe(values),
                        impact=round(float(impact[g]), 4),
                    )
                )
        return out


class ModelWatcher:
    """Holds the current model and swaps in a new file without a restart.

    ``maybe_reload()`` is cheap when nothing changed (one ``stat``); call it from a timer.
    A changed file (mtime or size) is read and hashed; new content is loaded and validated
    (feature list, metadata, a probe prediction). A file that fails validation is logged
    and ignored until it changes again, and the model in use stays: a bad deploy cannot
    take scoring down. Writers should still replace the file atomically (write, rename).
    """

    def __init__(self, path: Path | str, model: ChurnModel | None = None) -> None:
        self.path = Path(path)
        self.last_error: str | None = None
        self._signature = self._stat()
        self.current = model or ChurnModel.load(self.path)
        self._rejected: str | None = None

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def maybe_reload(self) -> bool:
        """Load the file if it changed and is valid; True when the model was replaced."""
        signature = self._stat()
        if signature is None or signature == self._signature:
            return False
        self._signature = signature
        try:
            blob = self.path.read_bytes()
        except OSError as exc:
            self.last_error = f"cannot read {self.path}: {exc}"
            log.warning("model reload skipped: %s", self.last_error)
            return False
        digest = hashlib.sha256(blob).hexdigest()
        if digest in (self.current.sha256, self._rejected):
            return False
        try:
            model = ChurnModel(blob, source=str(self.path))
        except ModelError as exc:
            self._rejected = digest
            self.last_error = str(exc)
            log.error("new model rejected, keeping %s: %s", self.current.version, exc)
            return False
        log.info("model %s replaced by %s (%s)", self.current.version, model.version, self.path)
        self.current, self.last_error = model, None
        return True
