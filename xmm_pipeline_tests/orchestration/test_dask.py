"""The `ingest` and `reembed` jobs on a Dask cluster write the files the in-process run writes.

A `distributed.LocalCluster` with two worker processes on 127.0.0.1 stands in for a real scheduler:
the runs reach it exactly as they would a remote one, through the executor's
`dask: {cluster: {existing: {address: ...}}}` run config and a persistent instance, the job
reconstructed in each worker from `xmm_pipeline.definitions`. The reference is the session's DR14
pipeline, materialised in process. Compared: every spectra file, the responses and quarantine
tables, the selection (exactly); the embeddings, outlier scores, trajectories, classes and clusters
with the same trained model (floats to 1e-5 relative), and the FAISS index size. No training runs on
Dask here (`retrain` is not part of this comparison).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from dagster import DagsterEventType, execute_job
from dagster._core.definitions.reconstruct import ReconstructableRepository

from xmm_pipeline.orchestration.automation import CATALOGUE_ASSETS, partition_range_tags
from xmm_pipeline.orchestration.executors import dask_run_config
from xmm_pipeline_tests.orchestration.conftest import N_DETECTIONS, SEED, TEST_MODEL, open_instance

pytestmark = pytest.mark.slow

SPECTRA_TABLES = ("responses.parquet", "quarantine.parquet")
LATENT_TABLES = (
    "embeddings.parquet",
    "outliers.parquet",
    "trajectories.parquet",
    "classes.parquet",
    "clusters.parquet",
    "cluster_summary.parquet",
)


def run_config(data: Path, archive: Path, address: str) -> dict:
    """The run config of a user pointing the jobs at a scheduler, with this test's resources."""
    return dask_run_config(address) | {
        "resources": {
            "storage": {"config": {"root": str(data)}},
            "archive": {
                "config": {
                    "root": str(archive), "release": "DR14", "n_detections": N_DETECTIONS, "seed": SEED
                }
            },
            "model": {"config": TEST_MODEL},
            "compute": {"config": {"device": "cpu", "torch_threads": 1}},
        }
    }


@dataclass
class DaskRuns:
    reference: Path
    data: Path
    successes: dict[str, bool]
    step_pids: dict[str, set[int]]
    worker_pids: set[int]


def step_pids(instance, run_id: str) -> set[int]:
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_START).records
    return {record.event_log_entry.dagster_event.pid for record in records}


@pytest.fixture(scope="module")
def dask_runs(dr14_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> DaskRuns:
    from distributed import Client, LocalCluster

    reference = dr14_pipeline / "data"
    root = tmp_path_factory.mktemp("dask")
    data = root / "data"
    repository = ReconstructableRepository.for_module("xmm_pipeline.definitions", "defs", os.getcwd())
    ingest, reembed = (repository.get_reconstructable_job(name) for name in ("ingest", "reembed"))
    successes, pids = {}, {}
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster, Client(cluster) as client, open_instance(root) as instance:
        config = run_config(data, reference / "archive", cluster.scheduler_address)
        worker_pids = set(client.run(os.getpid).values())
        catalogue = execute_job(ingest, instance, run_config=config, asset_selection=CATALOGUE_ASSETS)
        successes["catalogue"] = catalogue.success
        keys = instance.get_dynamic_partitions("observations")
        spectra = execute_job(
            ingest, instance, run_config=config, tags=partition_range_tags(keys[0], keys[-1])
        )
        successes["ingest"] = spectra.success
        for folder in ("training", "model"):
            shutil.copytree(reference / folder, data / folder)
        embedded = execute_job(reembed, instance, run_config=config)
        successes["reembed"] = embedded.success
        for name, result in (("ingest", spectra), ("reembed", embedded)):
            pids[name] = step_pids(instance, result.run_id)
    return DaskRuns(reference, data, successes, pids, worker_pids)


def test_both_jobs_succeed_on_the_dask_workers(dask_runs: DaskRuns):
    assert dask_runs.successes == {"catalogue": True, "ingest": True, "reembed": True}
    assert len(dask_runs.worker_pids) == 2
    for name, pids in dask_runs.step_pids.items():
        assert pids and pids <= dask_runs.worker_pids, (name, pids, dask_runs.worker_pids)
        assert os.getpid() not in pids
    assert dask_runs.step_pids["reembed"] == dask_runs.worker_pids, "the latent steps ran on both workers"


def test_ingest_on_dask_writes_the_same_spectra(dask_runs: DaskRuns):
    mine, theirs = dask_runs.data / "spectra", dask_runs.reference / "spectra"
    files = sorted(p.name for p in (theirs / "spectra").glob("*.parquet"))
    assert len(files) > 20
    assert sorted(p.name for p in (mine / "spectra").glob("*.parquet")) == files
    for name in files:
        pd.testing.assert_frame_equal(
            pd.read_parquet(mine / "spectra" / name), pd.read_parquet(theirs / "spectra" / name), obj=name
        )
    for name in SPECTRA_TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(mine / name), pd.read_parquet(theirs / name), obj=name)
    for name in ("selected.parquet", "observations.parquet"):
        columns = ["obs_id", "n_selected", "rows_hash"] if name == "observations.parquet" else None
        pd.testing.assert_frame_equal(
            pd.read_parquet(dask_runs.data / "catalogue" / name, columns=columns),
            pd.read_parquet(dask_runs.reference / "catalogue" / name, columns=columns),
            obj=name,
        )


def test_reembed_on_dask_writes_the_same_latent_products(dask_runs: DaskRuns):
    from xmm_pipeline.latent.search import load_index

    mine, theirs = dask_runs.data / "latent", dask_runs.reference / "latent"
    for name in LATENT_TABLES:
        mine_table, theirs_table = pd.read_parquet(mine / name), pd.read_parquet(theirs / name)
        pd.testing.assert_frame_equal(mine_table, theirs_table, check_exact=False, rtol=1e-5, obj=name)
    assert load_index(mine / "index").info.n_vectors == load_index(theirs / "index").info.n_vectors > 100
