"""Full pipeline run against the incremental run a new release triggers (Dagster, in process).

Materialises everything on the simulated DR14 archive (the `all` job over every observation), then
switches the archive to DR15 (same seed) and lets the release sensor do its work: `ingest` runs for
the new and re-processed observations, then `reembed`. The model is not retrained. Archive simulation
is timed apart (it stands in for downloading) and excluded from both runs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_incremental.py [--detections 2000] [--seed 0]

Prints one results line: full and incremental wall time, their ratio, and partitions processed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dagster import AssetKey, DagsterInstance

from xmm_pipeline.definitions import build_definitions
from xmm_pipeline.orchestration.inprocess import ingest_release, materialise_everything, tick_release_sensor
from xmm_pipeline.orchestration.resources import ArchiveResource, ComputeResource, ModelSettings


def definitions(data: Path, release: str, args: argparse.Namespace):
    return build_definitions(
        data,
        ArchiveResource(
            root=str(data / "archive"), release=release, n_detections=args.detections, seed=args.seed
        ),
        ModelSettings(max_epochs=args.max_epochs) if args.max_epochs else ModelSettings(),
        ComputeResource(device="cpu", torch_threads=args.threads),
    )


def partitions_in_runs(instance: DagsterInstance, run_ids: set[str]) -> int:
    records = instance.fetch_materializations(AssetKey("pn_spectra"), limit=10_000).records
    return sum(r.run_id in run_ids for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detections", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-epochs", type=int, default=0, help="0: the embedded default")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_incremental_"))
    data = root / "data"
    (root / "dagster_home").mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(__file__).resolve().parents[1] / "dagster.yaml", root / "dagster_home" / "dagster.yaml")
    dr14, dr15 = definitions(data, "DR14", args), definitions(data, "DR15", args)
    with DagsterInstance.from_config(str(root / "dagster_home")) as instance:
        start = time.perf_counter()
        dr14.resources["archive"].get_archive().fetch_catalogue()
        simulate14_s = time.perf_counter() - start

        start = time.perf_counter()
        full = materialise_everything(dr14, instance)
        full_s = time.perf_counter() - start
        assert full.success
        full_partitions = partitions_in_runs(instance, {full.run_id})

        cursor = ingest_release(dr14, instance, None).cursor
        start = time.perf_counter()
        dr15.resources["archive"].get_archive().fetch_catalogue()
        simulate15_s = time.perf_counter() - start

        start = time.perf_counter()
        ingest = ingest_release(dr15, instance, cursor)
        reembed = tick_release_sensor(dr15, instance, ingest.cursor)
        incremental_s = time.perf_counter() - start
        runs = ingest.runs + reembed.runs
        assert runs and all(result.success for _, result in runs)
        incremental_partitions = partitions_in_runs(instance, {result.run_id for _, result in ingest.runs})

    print(
        f"bench_incremental: detections={args.detections} seed={args.seed} "
        f"full_s={full_s:.1f} ({full_partitions} observation partitions, model trained) "
        f"incremental_s={incremental_s:.1f} ({incremental_partitions} partitions in {len(ingest.runs)} "
        f"ingest run(s) + reembed, no retraining) ratio={incremental_s / full_s:.3f} "
        f"(simulation excluded: DR14 {simulate14_s:.1f} s, DR15 {simulate15_s:.1f} s; workdir {root})"
    )


if __name__ == "__main__":
    main()
