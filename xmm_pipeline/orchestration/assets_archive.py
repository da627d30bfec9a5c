"""Archive domain: the catalogue release, the canonical detections, and the selection."""

import json

import pandas as pd
from dagster import (
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    ObserveResult,
    asset,
    observable_source_asset,
)

from xmm_pipeline.archive.catalogue import as_canonical
from xmm_pipeline.orchestration.metadata import counts_markdown, path_value
from xmm_pipeline.orchestration.partitions import (
    MANIFEST_COLUMNS,
    add_observation_partitions,
    observation_manifest,
    tracked_manifest,
)
from xmm_pipeline.orchestration.resources import ArchiveResource, StorageResource
from xmm_pipeline.orchestration.versions import code_version
from xmm_pipeline.storage import sha256_json, write_json_atomic, write_parquet_atomic

GROUP = "archive"


@observable_source_asset(
    group_name=GROUP, description="The archive's catalogue release; data version = fingerprint."
)
def catalogue_release(archive: ArchiveResource) -> ObserveResult:
    fingerprint = archive.get_archive().release_fingerprint()
    return ObserveResult(
        data_version=DataVersion(fingerprint),
        metadata={
            "fingerprint": fingerprint,
            "archive": archive.kind,
            "root": MetadataValue.path(archive.root),
        },
    )


@asset(
    group_name=GROUP,
    deps=[catalogue_release],
    code_version=code_version("xmm_pipeline.archive.catalogue", "xmm_pipeline.orchestration.assets_archive"),
)
def detections(archive: ArchiveResource, storage: StorageResource) -> MaterializeResult:
    """The release's detection catalogue in the canonical schema (one Parquet table).

    Materialised once per release, by the catalogue run the release sensor requests (the partition
    runs after it select `pn_spectra` only). For the XSA a fetch is a full TAP download, so a table
    already written for the same fingerprint is reused (a re-executed or manual run costs no download).
    """
    source = archive.get_archive()
    fingerprint = source.release_fingerprint()
    stamp = storage.catalogue_dir / "detections.json"
    reused = (
        storage.detections_path.exists()
        and stamp.exists()
        and (json.loads(stamp.read_text()).get("fingerprint") == fingerprint)
    )
    if reused:
        catalogue = pd.read_parquet(storage.detections_path)
    else:
        catalogue = as_canonical(source.fetch_catalogue())
        write_parquet_atomic(storage.detections_path, catalogue)
        write_json_atomic(stamp, {"fingerprint": fingerprint, "rows": len(catalogue)})
    return MaterializeResult(
        data_version=DataVersion(fingerprint),
        metadata={
            "path": path_value(storage.detections_path),
            "dagster/row_count": len(catalogue),
            "observations": int(catalogue["obs_id"].nunique()),
            "sources": int(catalogue["srcid"].nunique()),
            "fingerprint": fingerprint,
            "fetched": not reused,
        },
    )


@asset(
    group_name=GROUP,
    deps=[detections],
    code_version=code_version("xmm_pipeline.spectra.preprocess", "xmm_pipeline.orchestration.partitions"),
)
def selected_detections(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
    """Detections passing the selection (pn counts, SUM_FLAG < 3, point-like, spectrum present).

    Also writes the observation manifest (hash of each observation's selected rows, and the run in
    which it last changed: the release sensor plans the partition runs from it) and registers
    observations not seen before as partitions of `pn_spectra`.
    """
    from xmm_pipeline.spectra.preprocess import PreprocessConfig, select_detections

    catalogue = pd.read_parquet(storage.detections_path)
    selected, dropped = select_detections(catalogue, PreprocessConfig())
    path = storage.observations_path
    previous = pd.read_parquet(path) if path.exists() else None
    manifest = tracked_manifest(previous, observation_manifest(selected), context.run.run_id)
    current = manifest[manifest["n_selected"] > 0]
    write_parquet_atomic(storage.selected_path, selected)
    write_parquet_atomic(path, manifest)
    write_json_atomic(
        storage.catalogue_dir / "selection.json", {"selected": len(selected), "dropped": dropped}
    )
    new_partitions = add_observation_partitions(context.instance, list(current["obs_id"]))
    changed = manifest["changed_in"] == context.run.run_id
    return MaterializeResult(
        data_version=DataVersion(sha256_json(current[MANIFEST_COLUMNS].to_dict("list"))[:16]),
        metadata={
            "path": path_value(storage.selected_path),
            "dagster/row_count": len(selected),
            "dropped": int(sum(dropped.values())),
            "drop counts": counts_markdown({str(k): int(v) for k, v in dropped.items()}),
            "observations": len(current),
            "new observation partitions": len(new_partitions),
            "observations changed by this catalogue": int((changed & (manifest["n_selected"] > 0)).sum()),
            "observations withdrawn by this catalogue": int((changed & (manifest["n_selected"] == 0)).sum()),
        },
    )
