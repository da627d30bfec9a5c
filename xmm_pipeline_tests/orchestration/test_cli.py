"""`dagster job execute -m xmm_pipeline.definitions -j retrain` and the demo command, as a user runs them."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, DagsterInstance, DagsterRunStatus

from xmm_pipeline_tests.orchestration.conftest import (
    N_DETECTIONS,
    REPO_ROOT,
    SEED,
    TEST_MODEL,
    clone_pipeline,
)

pytestmark = pytest.mark.slow
DAGSTER = Path(sys.executable).parent / "dagster"


def run_config(data: Path) -> dict:
    """Resources below a copied pipeline folder; steps in one process (each step in its own process
    would re-import torch per step, slow on a 2-core machine)."""
    return {
        "execution": {"config": {"in_process": {}}},
        "resources": {
            "storage": {"config": {"root": str(data)}},
            "archive": {
                "config": {"root": str(data / "archive"), "n_detections": N_DETECTIONS, "seed": SEED}
            },
            "model": {"config": TEST_MODEL},
            "compute": {"config": {"device": "cpu", "torch_threads": 1}},
        },
    }


def test_dagster_job_execute_retrain(dr14_pipeline: Path, tmp_path: Path):
    data = clone_pipeline(dr14_pipeline / "data", tmp_path / "data")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy2(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    config = tmp_path / "run_config.yaml"
    config.write_text(yaml.safe_dump(run_config(data)))
    embeddings = data / "latent" / "embeddings.parquet"
    before = embeddings.stat().st_mtime_ns
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [
            str(DAGSTER),
            "job",
            "execute",
            "-m",
            "xmm_pipeline.definitions",
            "-j",
            "retrain",
            "-c",
            str(config),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    with DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert [(r.job_name, r.status) for r in runs] == [("retrain", DagsterRunStatus.SUCCESS)]
        assert len(instance.fetch_materializations(AssetKey("vae_model"), limit=10).records) == 1
        assert len(instance.fetch_materializations(AssetKey("latent_map"), limit=10).records) == 1
    assert embeddings.stat().st_mtime_ns > before
    assert (data / "model" / "validation.json").exists()


def test_demo_prepares_a_project_local_dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from xmm_pipeline.cli.demo import prepare_dagster_home, summary

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home = prepare_dagster_home(tmp_path / "dagster_home")
    assert os.environ["DAGSTER_HOME"] == str(home)
    assert (home / "dagster.yaml").read_text() == (REPO_ROOT / "dagster.yaml").read_text()
    text = summary(tmp_path / "data", home, 61.0, True)
    assert "dagster dev -h 127.0.0.1" in text and str(tmp_path / "data") in text
