"""``churnguard model train`` and ``churnguard model evaluate`` on a small simulated world."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from churnguard.cli.main import app
from churnguard.scoring.model import META_EVALUATION, ChurnModel
from churnguard.scoring.modeling import TrainedModel


def test_train_without_a_test_world_holds_out_accounts(small_world: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "churn.onnx"
    result = CliRunner().invoke(
        app, ["model", "train", "--train", str(small_world), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    model = ChurnModel.load(out)
    evaluation = json.loads(model.metadata[META_EVALUATION])
    assert "other 25% of accounts" in evaluation["data"]
    text = " ".join(result.output.split())
    for label in ("ROC AUC", "PR AUC", "Brier", "top decile", "rules baseline"):
        assert label in text
    assert f"{evaluation['model']['roc_auc']:.3f}" in text
    assert f"{evaluation['rules_baseline']['brier']:.3f}" in text
    assert model.version in text
    assert not list(out.parent.glob("*.tmp"))


def test_evaluate_prints_model_and_rules_figures(
    small_world: Path, small_model: TrainedModel, tmp_path: Path
) -> None:
    path = tmp_path / "small.onnx"
    path.write_bytes(small_model.onnx)
    result = CliRunner().invoke(
        app, ["model", "evaluate", "--model", str(path), "--data", str(small_world)]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert small_model.version in text
    assert "ROC AUC" in text
    assert "rules baseline" in text
    assert "853 rows" in text  # every snapshot of the world, not the held-out part only


def test_evaluate_refuses_an_unusable_model(small_world: Path, tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"nope")
    result = CliRunner().invoke(
        app, ["model", "evaluate", "--model", str(path), "--data", str(small_world)]
    )
    assert result.exit_code == 1
    assert "not a loadable ONNX file" in " ".join(result.output.split())
