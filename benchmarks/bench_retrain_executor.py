"""`dagster job execute -j retrain` with a process per step (Dagster's default) against in process.

Builds a small materialised pipeline (the orchestration tests' settings: 600 simulated detections,
300 epochs) once, copies it for each executor, runs the README's command on the copy, and reports the
command's wall time against the time spent inside the steps (their STEP_SUCCESS durations).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_retrain_executor.py [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from dagster import DagsterEventType, DagsterInstance  # noqa: E402

from xmm_pipeline.orchestration.inprocess import materialise_everything  # noqa: E402
from xmm_pipeline_tests.orchestration.conftest import (  # noqa: E402
    N_DETECTIONS,
    SEED,
    TEST_MODEL,
    open_instance,
    pipeline_definitions,
)


def run_config(data: Path, executor: str) -> dict:
    return {
        "execution": {"config": {executor: {}}},
        "resources": {
            "storage": {"config": {"root": str(data)}},
            "archive": {
                "config": {"root": str(data / "archive"), "n_detections": N_DETECTIONS, "seed": SEED}
            },
            "model": {"config": TEST_MODEL},
            "compute": {"config": {"device": "cpu", "torch_threads": 1}},
        },
    }


def time_retrain(root: Path, executor: str) -> tuple[float, float, int]:
    """(wall seconds of the command, seconds inside steps, steps) for one retrain on `root`."""
    config = root / f"{executor}.yaml"
    config.write_text(yaml.safe_dump(run_config(root / "data", executor)))
    env = {**os.environ, "DAGSTER_HOME": str(root / "dagster_home"), "PYTHONPATH": str(REPO_ROOT)}
    dagster = Path(sys.executable).parent / "dagster"
    start = time.perf_counter()
    subprocess.run([str(dagster), "job", "execute", "-m", "xmm_pipeline.definitions", "-j", "retrain",
                    "-c", str(config)], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    with DagsterInstance.from_config(str(root / "dagster_home")) as instance:
        run = instance.get_runs(limit=1)[0]
        durations = [r.dagster_event.event_specific_data.duration_ms / 1000
                     for r in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_SUCCESS)]
    return wall, sum(durations), len(durations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="pipelines folder (default: a new one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_retrain_"))
    base = work / "base"
    if not (base / "data" / "latent").is_dir():
        with open_instance(base) as instance:
            assert materialise_everything(pipeline_definitions(base), instance).success
    for executor in ("multiprocess", "in_process"):
        copy = work / executor
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(base, copy, symlinks=True)
        wall, steps_s, n_steps = time_retrain(copy, executor)
        print(f"retrain {executor:12s} wall {wall:6.1f} s, inside {n_steps} steps {steps_s:6.1f} s")


if __name__ == "__main__":
    main()
