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


IN_PROCESS = REPO_ROOT / "run_config_in_process.yaml"


def run_config(data: Path) -> dict:
    """Resources below a copied pipeline folder; steps in one process (each step in its own process
    would re-import torch per step, slow on a 2-core machine): the README's run_config_in_process.yaml."""
    return {
        **yaml.safe_load(IN_PROCESS.read_text()),
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


def _dagster_job_execute(job: str, home: Path, config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [str(DAGSTER), "job", "execute", "-m", "xmm_pipeline.definitions", "-j", job, "-c", str(config)]
    return subprocess.run([*command, *extra], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_dagster_job_execute_ingest_without_a_range_refuses_in_one_line(dr14_pipeline: Path, tmp_path: Path):
    data = clone_pipeline(dr14_pipeline / "data", tmp_path / "data")
    home = clone_pipeline(dr14_pipeline / "dagster_home", tmp_path / "dagster_home")
    config = tmp_path / "run_config.yaml"
    config.write_text(yaml.safe_dump(run_config(data)))
    with DagsterInstance.from_config(str(home)) as instance:
        known = instance.get_dynamic_partitions("observations")
        materialisations = len(instance.fetch_materializations(AssetKey("detections"), limit=100).records)
    spectra = {p: p.stat().st_mtime_ns for p in (data / "spectra" / "spectra").glob("*.parquet")}

    refused = _dagster_job_execute("ingest", home, config)
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "Cannot access partition_key" not in output
    reasons = [line for line in output.splitlines() if "job `ingest` runs over a range of" in line]
    assert len(reasons) == 1, output[-3000:]
    assert f"{len(known)} known, {known[0]}...{known[-1]}" in reasons[0]
    with DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_runs(limit=1)[0]
        assert (run.job_name, run.status) == ("ingest", DagsterRunStatus.FAILURE)
        records = instance.fetch_materializations(AssetKey("detections"), limit=100).records
        assert len(records) == materialisations  # refused before any step

    tags = reasons[0].split("--tags '")[1].split("'")[0]  # the command the refusal suggests works
    completed = _dagster_job_execute("ingest", home, config, "--tags", tags)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    with DagsterInstance.from_config(str(home)) as instance:
        assert set(instance.get_materialized_partitions(AssetKey("pn_spectra"))) == set(known)
    assert {p: p.stat().st_mtime_ns for p in (data / "spectra" / "spectra").glob("*.parquet")} == spectra


def test_demo_prepares_a_project_local_dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from xmm_pipeline.cli.demo import prepare_dagster_home, summary

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home = prepare_dagster_home(tmp_path / "dagster_home")
    assert os.environ["DAGSTER_HOME"] == str(home)
    assert (home / "dagster.yaml").read_text() == (REPO_ROOT / "dagster.yaml").read_text()
    text = summary(tmp_path / "data", home, 61.0, True)
    assert "dagster dev -h 127.0.0.1" in text and str(tmp_path / "data") in text


def test_demo_workspace_lets_dagster_dev_run_in_its_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The UI command the demo prints runs in DAGSTER_HOME, on the demo's storage root (any --out)."""
    import runpy

    from xmm_pipeline.cli.demo import prepare_dagster_home, ui_command, write_ui_workspace

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home = prepare_dagster_home(tmp_path / "dagster_home")
    data = tmp_path / "elsewhere" / "data"
    write_ui_workspace(home, data)
    assert ui_command(home).startswith(f"cd {home} && DAGSTER_HOME={home} ")
    defs = runpy.run_path(str(home / "definitions.py"))["defs"]
    assert defs.resources["storage"].root == str(data)
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run([str(DAGSTER), "definitions", "validate", "-w", "workspace.yaml"], cwd=home,
                               env=env, capture_output=True, text=True, timeout=300)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    assert "will not be used" not in output and "BetaWarning" not in output
