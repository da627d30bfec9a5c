"""`xmm-pipeline demo`: the whole Dagster pipeline on the embedded default (simulated DR14).

Uses a project-local Dagster instance (DAGSTER_HOME=./dagster_home with the project's dagster.yaml,
SQLite storage) and storage root (./data), the same ones `dagster dev` run from the repository root
shows. Re-running finishes quickly: every step finds its work already done.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from xmm_pipeline.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
POOLS = ("gpu", "ingest")  # one step at a time each (see dagster.yaml)


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", type=Path, default=Path("data"), help="storage root (default ./data)")
    parser.add_argument(
        "--dagster-home",
        type=Path,
        default=Path("dagster_home"),
        help="Dagster instance folder (default ./dagster_home)",
    )


def prepare_dagster_home(home: Path) -> Path:
    """Create DAGSTER_HOME with the project's dagster.yaml (kept if the user already edited one)."""
    home = home.expanduser().resolve()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create DAGSTER_HOME {home}: {error.strerror}") from None
    project_yaml = REPO_ROOT / "dagster.yaml"
    if not (home / "dagster.yaml").exists() and project_yaml.exists():
        shutil.copy2(project_yaml, home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def run(args: argparse.Namespace) -> int:
    home = prepare_dagster_home(args.dagster_home)
    storage_root = args.out.expanduser().resolve()

    from dagster import DagsterInstance

    from xmm_pipeline.definitions import build_definitions
    from xmm_pipeline.orchestration.inprocess import materialise_everything

    defs = build_definitions(storage_root)
    with DagsterInstance.get() as instance:
        for pool in POOLS:
            instance.event_log_storage.set_concurrency_slots(pool, 1)
        start = time.perf_counter()
        result = materialise_everything(defs, instance)
        seconds = time.perf_counter() - start
    if not result.success:
        print(f"xmm-pipeline demo: the run failed after {seconds:.0f} s; open the UI (below) to see why")
    print(summary(storage_root, home, seconds, result.success))
    return 0 if result.success else 1


def summary(storage_root: Path, home: Path, seconds: float, success: bool) -> str:
    latent = storage_root / "latent"
    lines = [
        f"{'Done' if success else 'Stopped'} in {seconds / 60:.1f} min. Results under {storage_root}:",
        f"  catalogue + selection  {storage_root / 'catalogue'}",
        f"  238-bin spectra        {storage_root / 'spectra' / 'spectra'} (one Parquet file per observation)",
        f"  model artifact         {storage_root / 'model'}",
        f"  latent embeddings      {latent / 'embeddings.parquet'}",
        f"  FAISS index            {latent / 'index'}",
        f"  outliers, trajectories {latent / 'outliers.parquet'}, {latent / 'trajectories.parquet'}",
        f"  latent maps            {latent / 'map_density.png'}, {latent / 'map_classes.png'}",
        f"  evaluation             {storage_root / 'reports'}",
        "",
        "Open the Dagster UI (asset graph, runs, metadata, loss curves, maps) on this machine only:",
        f"  DAGSTER_HOME={home} .venv/bin/dagster dev -h 127.0.0.1 -p 3000 -w workspace.yaml",
        "  then browse http://127.0.0.1:3000 (run it from the repository root: the UI reads ./data).",
        *try_it(latent),
    ]
    return "\n".join(lines)


def try_it(latent: Path) -> list[str]:
    """Example commands on the demo's own results (the most unusual detection as the query)."""
    outliers = latent / "outliers.parquet"
    if not outliers.exists():
        return []
    import pandas as pd

    detid = int(pd.read_parquet(outliers, columns=["detid"])["detid"].iloc[0])
    return [
        "Try it:",
        f"  .venv/bin/xmm-pipeline outliers -n 20 --latent {latent}",
        f"  .venv/bin/xmm-pipeline similar {detid} -k 10 --latent {latent}",
    ]
