"""`xmm-pipeline demo`: the whole Dagster pipeline on the embedded default (simulated DR14).

Uses a project-local Dagster instance (DAGSTER_HOME=./dagster_home with the project's dagster.yaml,
SQLite storage) and storage root (./data), the same ones `dagster dev` run from the repository root
shows. Re-running finishes quickly: every step finds its work already done.

The terminal gets one line per step and the summary; Dagster's full event log (DEBUG) and Python
warnings go to DAGSTER_HOME/demo.log. Runs of an earlier demo that was killed are failed and their
pool slots freed first (`inprocess.clear_dead_runs`): they would otherwise block this run for ever.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from xmm_pipeline.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
POOLS = ("gpu", "ingest")  # one step at a time each (see dagster.yaml)
LOG_FILE = "demo.log"
LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"


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
    elif project_yaml.exists() and (home / "dagster.yaml").read_bytes() != project_yaml.read_bytes():
        print(f"note: {home / 'dagster.yaml'} differs from the checkout's {project_yaml} and is kept "
              "(delete it to take the checkout's)")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


UI_DEFINITIONS = '''"""Written by `xmm-pipeline demo`: the Definitions on the demo's storage root."""

import warnings

from dagster import BetaWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", BetaWarning)  # backfill_policy, observable_source_asset
    from xmm_pipeline.definitions import build_definitions

defs = build_definitions({root!r})
'''
UI_WORKSPACE = """# Written by `xmm-pipeline demo`: `dagster dev` run in this folder (DAGSTER_HOME=this
# folder) shows the demo's runs and reads its storage root, wherever it is.
load_from:
  - python_file:
      relative_path: definitions.py
      location_name: xmm_pipeline
"""


def write_ui_workspace(home: Path, storage_root: Path) -> None:
    """A workspace in DAGSTER_HOME whose Definitions use this storage root (an absolute path).

    `dagster dev` started in DAGSTER_HOME then finds its instance config in the current folder (no
    "dagster.yaml will not be used" warning, as when started beside the checkout's template) and
    reads the demo's results even when --out is not ./data.
    """
    write_text_atomic(home / "definitions.py", UI_DEFINITIONS.format(root=str(storage_root)))
    write_text_atomic(home / "workspace.yaml", UI_WORKSPACE)


def write_text_atomic(path: Path, text: str) -> None:
    from xmm_pipeline.storage import write_bytes_atomic

    write_bytes_atomic(path, text.encode())


def ui_command(home: Path) -> str:
    venv = Path(sys.executable).parent
    return f"cd {home} && DAGSTER_HOME={home} {venv}/dagster dev -h 127.0.0.1 -p 3000"


def run(args: argparse.Namespace) -> int:
    home = prepare_dagster_home(args.dagster_home)
    storage_root = args.out.expanduser().resolve()
    write_ui_workspace(home, storage_root)
    log_path = home / LOG_FILE
    print(f"xmm-pipeline demo: storage {storage_root}, Dagster instance {home}; full log in {log_path}")
    start = time.perf_counter()
    with log_to_file(log_path) as file_logger:
        from dagster import DagsterInstance, LoggerDefinition

        from xmm_pipeline.definitions import build_definitions
        from xmm_pipeline.orchestration.inprocess import clear_dead_runs, materialise_everything

        defs = build_definitions(storage_root)
        with DagsterInstance.get() as instance:
            for run_id in clear_dead_runs(instance):
                print(f"  cleared run {run_id}: its process no longer exists (failed, pool slots freed)")
            for pool in POOLS:
                instance.event_log_storage.set_concurrency_slots(pool, 1)
            print("reading the archive's catalogue (written first if simulated) ...", flush=True)
            progress = LoggerDefinition(lambda _: file_logger, description="demo.log and one line per step")
            result = materialise_everything(defs, instance, logger_defs={"demo": progress})
    seconds = time.perf_counter() - start
    if not result.success:
        print(f"xmm-pipeline demo: the run failed after {seconds:.0f} s; see {log_path} or the UI (below)")
    print(summary(storage_root, home, seconds, result.success))
    return 0 if result.success else 1


class StepProgress(logging.Handler):
    """One line per finished, failed or skipped step, read from the Dagster events among the records."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.stream = stream
        self.started = time.perf_counter()

    def emit(self, record: logging.LogRecord) -> None:
        line = self.line(record)
        if line is not None:
            elapsed = time.perf_counter() - self.started
            print(f"[{elapsed:6.0f} s] {line}", file=self.stream or sys.stdout, flush=True)

    @staticmethod
    def line(record: logging.LogRecord) -> str | None:
        event = getattr(record, "dagster_event", None)
        meta = getattr(record, "dagster_meta", None) or {}
        if event is None:
            message = str(meta.get("orig_message", ""))
            if meta.get("step_key") and ("Not executing" in message or message.startswith("Skipping step")):
                return f"{meta['step_key']:46s} skipped (an upstream step or a blocking check failed)"
            return None
        if not event.step_key:
            return None
        kind, data = event.event_type_value, event.event_specific_data
        if kind == "STEP_SUCCESS":
            return f"{event.step_key:46s} done in {data.duration_ms / 1000:.1f} s"
        if kind == "STEP_FAILURE":
            return f"{event.step_key:46s} FAILED: {failure_reason(data)}"
        if kind == "STEP_SKIPPED":
            return f"{event.step_key:46s} skipped (an upstream step or a blocking check failed)"
        if kind == "ASSET_CHECK_EVALUATION" and not data.passed:
            return f"{event.step_key:46s} check {data.check_name} did not pass"
        return None


def failure_reason(data) -> str:
    """The first line of what the user's code said, not Dagster's wrapper around it."""
    user = getattr(data, "user_failure_data", None)
    if user is not None and user.description:
        return user.description.strip().splitlines()[0]
    error = data.error
    while error is not None and error.cause is not None and "DagsterUserCodeExecutionError" in error.cls_name:
        error = error.cause
    return error.message.strip().splitlines()[0] if error is not None else "failed"


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[logging.Logger]:
    """A logger for the run (everything to `path`, step lines to stdout); Python warnings to `path` too."""
    path.write_text("", encoding="utf-8")
    # append mode: Dagster closes its loggers' handlers when a run's context ends, and a closed "a"
    # handler reopens on the next record where a "w" one stays closed
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    run_logger = logging.getLogger("xmm_pipeline.demo.run")
    run_logger.setLevel(logging.DEBUG)
    run_logger.propagate = False
    run_logger.handlers = [handler, StepProgress()]
    warnings_logger = logging.getLogger("py.warnings")
    saved = warnings_logger.handlers, warnings_logger.propagate
    warnings_logger.handlers, warnings_logger.propagate = [handler], False
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield run_logger
    finally:
        logging.captureWarnings(False)
        warnings_logger.handlers, warnings_logger.propagate = saved
        run_logger.handlers = []
        handler.close()


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
        f"Full log: {home / LOG_FILE}",
        "Open the Dagster UI (asset graph, runs, metadata, loss curves, maps) on this machine only:",
        f"  {ui_command(home)}",
        "  then browse http://127.0.0.1:3000",
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
        f"  .venv/bin/xmm-pipeline show {detid} --plot show_{detid}.png --latent {latent}",
    ]
