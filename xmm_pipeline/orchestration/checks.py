"""Asset checks. Blocking ones stop downstream assets when a bad result must not spread."""

import json
import math

import numpy as np
import pandas as pd
from dagster import AssetCheckResult, AssetCheckSeverity, MetadataValue, asset_check

from xmm_pipeline.archive.catalogue import CANONICAL_COLUMNS
from xmm_pipeline.orchestration.assets_archive import detections, selected_detections
from xmm_pipeline.orchestration.assets_model import VALIDATION_FILE, vae_model
from xmm_pipeline.orchestration.assets_spectra import training_set
from xmm_pipeline.orchestration.resources import StorageResource
from xmm_pipeline.storage import sha256_file

MAX_QUARANTINE_SHARE = 0.05


def schema_problems(frame: pd.DataFrame, expected: dict[str, str]) -> list[str]:
    problems = [f"missing {name}" for name in expected if name not in frame.columns]
    problems += [
        f"{name}: {frame[name].dtype} != {dtype}"
        for name, dtype in expected.items()
        if name in frame.columns and str(frame[name].dtype) != str(pd.Series([], dtype=dtype).dtype)
    ]
    return problems


@asset_check(
    asset=detections, blocking=True, description="Canonical detection schema: every column, every dtype."
)
def detections_schema(storage: StorageResource) -> AssetCheckResult:
    problems = schema_problems(pd.read_parquet(storage.detections_path), CANONICAL_COLUMNS)
    return AssetCheckResult(passed=not problems, metadata={"problems": MetadataValue.json(problems)})


@asset_check(asset=selected_detections, blocking=True, description="The selection rule holds on every row.")
def selection_rule_holds(storage: StorageResource) -> AssetCheckResult:
    from xmm_pipeline.spectra.preprocess import PreprocessConfig

    config = PreprocessConfig()
    selected = pd.read_parquet(storage.selected_path)
    rules = {
        "pn exposure > 0": selected["pn_ontime"].astype("float64") > 0,
        f"SUM_FLAG <= {config.max_sum_flag}": selected["sum_flag"] <= config.max_sum_flag,
        "point-like": (selected["ep_extent"].astype("float64").fillna(0) <= 0)
        | (not config.require_point_like),
        f"pn counts > {config.min_counts:g}": selected["pn_8_cts"].astype("float64") > config.min_counts,
        "one per source and observation": ~selected.duplicated(["obs_id", "srcid"]),
    }
    violations = {rule: int((~holds.fillna(False)).sum()) for rule, holds in rules.items()}
    return AssetCheckResult(
        passed=sum(violations.values()) == 0,
        metadata={"rows": len(selected), "violations": MetadataValue.json(violations)},
    )


@asset_check(asset=training_set, blocking=True, description="No NaN or infinity in any spectrum array.")
def spectra_have_no_nan(storage: StorageResource) -> AssetCheckResult:
    from xmm_pipeline.spectra.dataset import load_dataset

    dataset = load_dataset(storage.training_dir)
    arrays = {
        "counts": dataset.counts,
        "background": dataset.background,
        "area_exposure": dataset.area_exposure,
        "unfolded": dataset.unfolded,
        "rmf": dataset.rmf_matrices,
    }
    bad = {name: int((~np.isfinite(values)).sum()) for name, values in arrays.items()}
    return AssetCheckResult(
        passed=sum(bad.values()) == 0, metadata={"non-finite values": MetadataValue.json(bad)}
    )


@asset_check(
    asset=training_set,
    blocking=True,
    description=f"Detections set aside (quarantine) stay under {MAX_QUARANTINE_SHARE:.0%} of those seen.",
)
def quarantine_share_below_threshold(storage: StorageResource) -> AssetCheckResult:
    path = storage.spectra_dir / "quarantine.parquet"
    quarantined = len(pd.read_parquet(path)) if path.exists() else 0
    spectra = int(json.loads((storage.training_dir / "summary.json").read_text())["spectra"])
    share = quarantined / max(quarantined + spectra, 1)
    return AssetCheckResult(
        passed=share <= MAX_QUARANTINE_SHARE,
        metadata={
            "quarantined": quarantined,
            "spectra": spectra,
            "share": share,
            "threshold": MAX_QUARANTINE_SHARE,
        },
    )


@asset_check(
    asset=vae_model,
    blocking=True,
    description="Validation loss finite, and validation deviance per dof better than the PCA baseline's.",
)
def vae_model_beats_pca(storage: StorageResource) -> AssetCheckResult:
    validation = json.loads((storage.model_dir / VALIDATION_FILE).read_text())
    finite = math.isfinite(validation["val_loss"]) and math.isfinite(validation["vae_deviance_per_dof"])
    better = validation["vae_deviance_per_dof"] < validation["pca_deviance_per_dof"]
    return AssetCheckResult(passed=finite and better, metadata={k: float(v) for k, v in validation.items()})


@asset_check(
    asset=vae_model,
    description="Warns when the spectra changed since the model's training set was taken: the model is "
    "stale relative to the data. Retraining stays a human decision (launch `retrain`).",
)
def model_trained_on_current_data(storage: StorageResource) -> AssetCheckResult:
    from xmm_pipeline.spectra.dataset import SPECTRA_SUBDIR

    live = {p.name: p for p in (storage.spectra_dir / SPECTRA_SUBDIR).glob("*.parquet")}
    trained = {p.name: p for p in (storage.training_dir / SPECTRA_SUBDIR).glob("*.parquet")}
    changed = sorted(
        name
        for name, path in live.items()
        if name not in trained or sha256_file(path) != sha256_file(trained[name])
    )
    withdrawn = sorted(set(trained) - set(live))
    live_detids = (
        pd.read_parquet(storage.spectra_dir / SPECTRA_SUBDIR, columns=["detid"])["detid"] if live else []
    )
    trained_detids = pd.read_parquet(storage.training_dir / "split.parquet", columns=["detid"])["detid"]
    unseen = int((~pd.Series(live_detids).isin(trained_detids)).sum())
    stale = bool(changed or withdrawn)
    return AssetCheckResult(
        passed=not stale,
        severity=AssetCheckSeverity.WARN,
        description=(
            f"model is stale: {len(changed)} observations new or changed and {len(withdrawn)} withdrawn "
            f"since its training set; {unseen} spectra unseen. Launch `retrain` when ready."
        )
        if stale
        else "model trained on the current spectra",
        metadata={
            "observations new or changed": len(changed),
            "observations withdrawn": len(withdrawn),
            "spectra unseen by the model": unseen,
            "changed (first 20)": MetadataValue.json(changed[:20]),
        },
    )
