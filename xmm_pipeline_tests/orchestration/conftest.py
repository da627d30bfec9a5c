"""One small simulated DR14 pipeline, fully materialised once per session; tests that change it work
on a copy (files with their mtimes, and the Dagster instance's SQLite storage)."""

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance, Definitions

from xmm_pipeline.definitions import build_definitions
from xmm_pipeline.orchestration.inprocess import materialise_everything
from xmm_pipeline.orchestration.resources import ArchiveResource, ComputeResource, ModelSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
# Small enough for the whole orchestration suite to stay within its time budget; with this seed DR15
# re-processes a DR14 observation that has selected detections, and adds new ones.
N_DETECTIONS = 600
SEED = 2
# Enough optimisation steps on ~150 training spectra for the VAE to beat the PCA baseline (blocking).
TEST_MODEL = {"max_epochs": 300, "patience": 40, "batch_size": 32, "learning_rate": 3e-4, "seed": 0}


def pipeline_definitions(root: Path, release: str = "DR14") -> Definitions:
    data = root / "data"
    return build_definitions(
        data,
        ArchiveResource(root=str(data / "archive"), release=release, n_detections=N_DETECTIONS, seed=SEED),
        ModelSettings(**TEST_MODEL),
        ComputeResource(device="cpu", torch_threads=1),
    )


@contextlib.contextmanager
def open_instance(root: Path) -> Iterator[DagsterInstance]:
    """The persistent instance of a pipeline folder, configured by the project's dagster.yaml."""
    home = root / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy2(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    with DagsterInstance.from_config(str(home)) as instance:
        yield instance


def clone_pipeline(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
    return target


@pytest.fixture(scope="session")
def dr14_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipeline_dr14")
    with open_instance(root) as instance:
        result = materialise_everything(pipeline_definitions(root), instance)
    assert result.success
    return root
