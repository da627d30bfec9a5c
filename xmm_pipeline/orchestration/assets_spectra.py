"""Spectra domain: per-observation Parquet spectra (partitioned by obs_id) and the training set."""

import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
from dagster import (
    AssetExecutionContext,
    BackfillPolicy,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
)

from xmm_pipeline.orchestration.assets_archive import selected_detections
from xmm_pipeline.orchestration.metadata import counts_markdown, path_value
from xmm_pipeline.orchestration.partitions import observation_partitions
from xmm_pipeline.orchestration.resources import ArchiveResource, ModelSettings, StorageResource
from xmm_pipeline.orchestration.versions import code_version
from xmm_pipeline.storage import (
    quarantine_frame,
    sha256_file,
    sha256_json,
    write_json_atomic,
    write_parquet_atomic,
)

GROUP = "spectra"
# Observations per run when a backfill or the release sensor covers many partitions: 10^4 new
# observations make 20 runs, not 10^4.
MAX_OBSERVATIONS_PER_RUN = 500
INGEST_TAG = {"xmm/stage": "ingest"}


@asset(
    group_name=GROUP,
    deps=[selected_detections],
    partitions_def=observation_partitions,
    backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=MAX_OBSERVATIONS_PER_RUN),
    op_tags=INGEST_TAG,
    pool="ingest",
    code_version=code_version(
        "xmm_pipeline.spectra.preprocess", "xmm_pipeline.spectra.response", "xmm_pipeline.ogip.read"
    ),
)
def pn_spectra(
    context: AssetExecutionContext, archive: ArchiveResource, storage: StorageResource
) -> MaterializeResult:
    """Unfolded, 238-bin spectra of the selected detections, one Parquet file per observation.

    One run covers many observations (a partition range); an observation whose inputs are unchanged
    since it was last written is skipped by the preprocessing itself, so re-running does no work.
    """
    from xmm_pipeline.spectra.dataset import RESPONSES_FILE
    from xmm_pipeline.spectra.preprocess import (
        PreprocessConfig,
        ResponseCache,
        preprocess_observation,
        reason_category,
        write_responses,
    )

    obs_ids = sorted(context.partition_keys)
    selected = pd.read_parquet(storage.selected_path)
    selected = selected[selected["obs_id"].isin(obs_ids)]
    source = archive.get_archive()
    quarantined = source.fetch_observations(obs_ids)
    config = PreprocessConfig()
    cache = ResponseCache(config.grid)
    written, skipped, rows = 0, 0, 0
    for _, obs_rows in selected.groupby("obs_id", sort=True):
        result = preprocess_observation(obs_rows, source.root, storage.spectra_dir, config, cache)
        written += int(not result.skipped)
        skipped += int(result.skipped)
        rows += result.n_written
        quarantined.extend(result.quarantine)
    removed = remove_withdrawn(storage, sorted(set(obs_ids) - set(selected["obs_id"])))
    if cache.responses() or not (storage.spectra_dir / RESPONSES_FILE).exists():
        write_responses(storage.spectra_dir, cache)
    merged = _merge_quarantine(storage, obs_ids, quarantine_frame(quarantined))
    reasons = Counter(reason_category(r) for r in merged["reason"])
    return MaterializeResult(
        metadata={
            "observations in run": len(obs_ids),
            "observations written": written,
            "observations unchanged (skipped)": skipped,
            "observations withdrawn (no selected detection left)": removed,
            "spectra": rows,
            "quarantined in run": len(quarantined),
            "quarantined by reason (all)": counts_markdown(dict(reasons.most_common())),
            "path": path_value(storage.spectra_dir),
        }
    )


def remove_withdrawn(storage: StorageResource, obs_ids: list[str]) -> int:
    """Delete the spectra of observations that a new release left without a selected detection."""
    from xmm_pipeline.spectra.dataset import SPECTRA_SUBDIR

    removed = 0
    for obs_id in obs_ids:
        path = storage.spectra_dir / SPECTRA_SUBDIR / f"{obs_id}.parquet"
        if path.exists():
            path.unlink()
            removed += 1
    return removed


def _merge_quarantine(storage: StorageResource, obs_ids: list[str], records: pd.DataFrame) -> pd.DataFrame:
    """Replace the quarantine rows of these observations in spectra/quarantine.parquet.

    Runs of `pn_spectra` are serialised by the run-queue limit on the `xmm/stage=ingest` tag
    (dagster.yaml), so this read-modify-write never races.
    """
    path = storage.spectra_dir / "quarantine.parquet"
    previous = pd.read_parquet(path) if path.exists() else records.iloc[0:0]
    merged = pd.concat([previous[~previous["obs_id"].isin(obs_ids)], records], ignore_index=True)
    write_parquet_atomic(path, merged)
    return merged


@asset(
    group_name=GROUP,
    deps=[pn_spectra],
    code_version=code_version("xmm_pipeline.spectra.dataset", "xmm_pipeline.orchestration.assets_spectra"),
)
def training_set(storage: StorageResource, model: ModelSettings) -> MaterializeResult:
    """A frozen snapshot of all spectra and responses, with the train/validation split by srcid.

    The model trains from this snapshot, not from the live spectra folder that each release extends,
    so the model's inputs are exactly known; the split keeps every source on one side.
    """
    from xmm_pipeline.spectra.dataset import RESPONSES_FILE, SPECTRA_SUBDIR, load_dataset

    live = storage.spectra_dir
    snapshot = storage.training_dir
    files = sorted((live / SPECTRA_SUBDIR).glob("*.parquet"))
    staging = snapshot.with_name(snapshot.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / SPECTRA_SUBDIR).mkdir(parents=True)
    for path in files:
        shutil.copy2(path, staging / SPECTRA_SUBDIR / path.name)
    shutil.copy2(live / RESPONSES_FILE, staging / RESPONSES_FILE)
    dataset = load_dataset(staging)
    split = training_split(dataset, model)
    write_parquet_atomic(staging / "split.parquet", split)
    summary = {
        "spectra": len(dataset),
        "sources": int(dataset.meta["srcid"].nunique()),
        "observations": len(files),
        "train": int((split["split"] == "train").sum()),
        "validation": int((split["split"] == "validation").sum()),
        "content_hash": sha256_json(
            [(p.name, sha256_file(p)) for p in sorted((staging / SPECTRA_SUBDIR).iterdir())]
        ),
    }
    write_json_atomic(staging / "summary.json", summary)
    replace_folder(staging, snapshot)
    quarantine = live / "quarantine.parquet"
    n_quarantined = len(pd.read_parquet(quarantine)) if quarantine.exists() else 0
    return MaterializeResult(
        data_version=DataVersion(summary["content_hash"][:16]),
        metadata={
            "path": path_value(snapshot),
            "dagster/row_count": summary["spectra"],
            "sources": summary["sources"],
            "train": summary["train"],
            "validation": summary["validation"],
            "quarantined (all releases)": n_quarantined,
            "energy grid": MetadataValue.text(
                f"{dataset.grid.n_bins} bins, {dataset.grid.e_min_kev}-{dataset.grid.e_max_kev} keV"
            ),
        },
    )


def training_split(dataset, model: ModelSettings) -> pd.DataFrame:
    """The model's own split by source (same function, fraction and seed as the training uses)."""
    from xmm_pipeline.model.train import source_ids, split_by_source

    _, validation_rows = split_by_source(source_ids(dataset), model.val_fraction, model.seed)
    split = pd.DataFrame({"detid": dataset.meta["detid"].astype("int64"), "srcid": source_ids(dataset)})
    split["split"] = "train"
    split.loc[validation_rows, "split"] = "validation"
    return split


def replace_folder(new: Path, target: Path) -> None:
    """Put `new` in place of `target` with renames only: a crash leaves the old or the new one."""
    retired = target.with_name(target.name + ".old")
    shutil.rmtree(retired, ignore_errors=True)
    if target.exists():
        target.rename(retired)
    new.rename(target)
    shutil.rmtree(retired, ignore_errors=True)
