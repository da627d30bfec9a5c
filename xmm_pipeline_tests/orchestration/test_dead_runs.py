"""A run killed mid-step (SIGKILL of its process during training) stays STARTED and keeps its `gpu`
pool slot; `clear_dead_runs` (what `xmm-pipeline demo` does first) fails it and frees the slot, so the
next run completes instead of waiting for ever at "blocked by limit for pool gpu"."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus

from xmm_pipeline.orchestration.inprocess import (
    PROCESS_TAG,
    _process_start,
    clear_dead_runs,
    process_gone,
    process_tags,
)
from xmm_pipeline_tests.orchestration.conftest import REPO_ROOT, clone_pipeline

pytestmark = pytest.mark.slow

# Train `vae_model` alone on a copied pipeline, in this process (in-process executor, like the demo),
# after clearing dead runs; argv: pipeline root, maximum epochs.
TRAIN_SCRIPT = """
import sys
from pathlib import Path
from dagster import materialize
from xmm_pipeline.definitions import ASSET_MODULES, build_definitions
from xmm_pipeline.orchestration.inprocess import clear_dead_runs, process_tags
from xmm_pipeline.orchestration.assets_model import vae_model
from xmm_pipeline.orchestration.resources import ArchiveResource, ComputeResource, ModelSettings
from xmm_pipeline_tests.orchestration.conftest import N_DETECTIONS, SEED, open_instance
from dagster import load_assets_from_modules

root, epochs = Path(sys.argv[1]), int(sys.argv[2])
data = root / "data"
defs = build_definitions(
    data,
    ArchiveResource(root=str(data / "archive"), n_detections=N_DETECTIONS, seed=SEED),
    ModelSettings(max_epochs=epochs, patience=epochs, batch_size=32, seed=0),
    ComputeResource(device="cpu", torch_threads=1),
)
with open_instance(root) as instance:
    print("cleared", " ".join(clear_dead_runs(instance)), flush=True)
    instance.event_log_storage.set_concurrency_slots("gpu", 1)
    result = materialize(load_assets_from_modules(ASSET_MODULES), resources=defs.resources,
                         instance=instance, selection=[vae_model.key], tags=process_tags())
    print("success" if result.success else "failure", flush=True)
"""


def _train(root: Path, epochs: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(root), str(epochs)], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_ids(home: Path) -> set[str]:
    with DagsterInstance.from_config(str(home)) as instance:
        return {run.run_id for run in instance.get_runs()}


def _training_started(home: Path, earlier: set[str]) -> str | None:
    """The id of a new run that has started its `vae_model` step, if any."""
    with DagsterInstance.from_config(str(home)) as instance:
        for run in instance.get_runs():
            if run.run_id in earlier:
                continue
            starts = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.STEP_START).records
            if any(r.event_log_entry.step_key == "vae_model" for r in starts):
                return run.run_id
    return None


def test_a_killed_run_is_cleared_and_the_next_one_completes(dr14_pipeline: Path, tmp_path: Path):
    root = tmp_path / "pipeline"
    clone_pipeline(dr14_pipeline / "data", root / "data")
    home = clone_pipeline(dr14_pipeline / "dagster_home", root / "dagster_home")

    earlier = _run_ids(home)
    doomed = _train(root, epochs=100_000)
    deadline = time.monotonic() + 600
    run_id = None
    while run_id is None and doomed.poll() is None and time.monotonic() < deadline:
        time.sleep(2)
        run_id = _training_started(home, earlier)
    assert run_id is not None, doomed.communicate()[0][-3000:] if doomed.poll() is not None else "timeout"
    time.sleep(3)  # well inside the training loop
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate()
    with DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_run_by_id(run_id)
        assert run.status == DagsterRunStatus.STARTED  # what the killed process left behind
        assert run_id in instance.event_log_storage.get_concurrency_info("gpu").active_run_ids
        assert run.tags[PROCESS_TAG].split(":")[1] == str(doomed.pid)

    nxt = _train(root, epochs=3)
    try:
        output = nxt.communicate(timeout=600)[0]
    except subprocess.TimeoutExpired:
        nxt.kill()
        pytest.fail("the next run never finished: " + nxt.communicate()[0][-3000:])
    assert nxt.returncode == 0 and f"cleared {run_id}" in output and "success" in output, output[-3000:]
    with DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE
        latest = instance.get_runs(limit=1)[0]
        assert latest.run_id != run_id and latest.status == DagsterRunStatus.SUCCESS
        assert not instance.event_log_storage.get_concurrency_info("gpu").active_run_ids
        assert len(instance.fetch_materializations(AssetKey("vae_model"), limit=10).records) == 2


def test_process_gone_tells_a_dead_process_from_a_live_one(tmp_path: Path):
    own = process_tags()[PROCESS_TAG]
    assert not process_gone(own)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    tag = f"{socket.gethostname()}:{child.pid}:{_process_start(child.pid)}"
    assert not process_gone(tag)
    child.kill()
    child.wait()
    assert process_gone(tag)
    assert not process_gone(f"another-host:{child.pid}:")  # another machine's process: never judged
    with DagsterInstance.ephemeral() as instance:
        assert clear_dead_runs(instance) == []
