"""A small simulated world, its training set and a model trained on it, built once per run."""

from __future__ import annotations

from pathlib import Path

import pytest

from churnguard.scoring.modeling import TrainedModel, train
from churnguard.scoring.training import TrainingSet, build_training_set
from churnguard.simulator.output import write_world
from churnguard.simulator.world import SimConfig, World


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 accounts x 240 days (~2 s): snapshots on days 60, 90 and 120."""
    folder = tmp_path_factory.mktemp("scoring") / "small-world"
    write_world(World(SimConfig(accounts=300, days=240, seed=11)), folder, parquet=False)
    return folder


@pytest.fixture(scope="session")
def small_training_set(small_world: Path) -> TrainingSet:
    return build_training_set(small_world)


@pytest.fixture(scope="session")
def small_model(small_training_set: TrainingSet) -> TrainedModel:
    return train(*small_training_set.split_by_account())
