"""The latent folder: its layout, and the one run that fills it (embed, index, classes, products).

    <latent>/embeddings.parquet        per detection: ids, mjd, z*, logvar*, deviance_per_dof, model_version
    <latent>/index/index.faiss, index.json   FAISS index over the latent means (detids inside)
    <latent>/classes.parquet           class per detection (truth table, SIMBAD, or unknown)
    <latent>/outliers.parquet          every detection ranked by outlier score
    <latent>/trajectories.parquet      per multi-detection source: path length, largest jump
    <latent>/trajectories.png          the top movers over the latent density map
    <latent>/clusters.parquet          per detection: Gaussian-mixture cluster and its probability
    <latent>/cluster_summary.parquet   per cluster: size, centre, class mix
    <latent>/map_density.png, map_classes.png   the latent maps
    <latent>/manifest.json             inputs fingerprint, model version, where the inputs were

The Dagster assets write the same files under storage root/latent; `latent_embeddings` writes the
manifest too, with the inputs' folders and no fingerprint. The manifest is written last: a run with the
same inputs (same spectra files, model version, class source and PRODUCTS_VERSION) finds it and does no
work; a crashed run leaves no manifest and is redone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from xmm_pipeline.latent.crossmatch import TRUTH_FILE, source_classes
from xmm_pipeline.latent.embed import embed_dataset, latent_matrix, read_embeddings, write_embeddings
from xmm_pipeline.latent.products import (
    MapProjection,
    fit_clusters,
    latent_trajectories,
    outlier_scores,
    plot_latent_classes,
    plot_latent_density,
    plot_trajectories,
)
from xmm_pipeline.latent.search import LatentIndex, build_index, load_index, save_index
from xmm_pipeline.spectra.dataset import RESPONSES_FILE, spectra_files
from xmm_pipeline.storage import sha256_file, sha256_json, write_json_atomic, write_parquet_atomic

N_TOP_MOVERS = 6
PRODUCTS_VERSION = "1"  # bump when the products' arithmetic changes: the next `embed` redoes them


@dataclass(frozen=True)
class LatentLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings.parquet"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def classes(self) -> Path:
        return self.root / "classes.parquet"

    @property
    def outliers(self) -> Path:
        return self.root / "outliers.parquet"

    @property
    def trajectories(self) -> Path:
        return self.root / "trajectories.parquet"

    @property
    def trajectories_plot(self) -> Path:
        return self.root / "trajectories.png"

    @property
    def clusters(self) -> Path:
        return self.root / "clusters.parquet"

    @property
    def cluster_summary(self) -> Path:
        return self.root / "cluster_summary.parquet"

    @property
    def density_map(self) -> Path:
        return self.root / "map_density.png"

    @property
    def class_map(self) -> Path:
        return self.root / "map_classes.png"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def read_manifest(self) -> dict:
        return json.loads(self.manifest.read_text()) if self.manifest.is_file() else {}

    def read_embeddings(self) -> pd.DataFrame:
        return read_embeddings(self.embeddings)

    def load_index(self) -> LatentIndex:
        return load_index(self.index_dir)

    def read_classes(self) -> pd.DataFrame | None:
        return pd.read_parquet(self.classes) if self.classes.is_file() else None


def build_products(
    embeddings: pd.DataFrame,
    classes: pd.DataFrame,
    layout: LatentLayout,
    latent_index: LatentIndex | None = None,
) -> dict[str, Path]:
    """Index, outliers, trajectories, clusters and maps for an embeddings table, written under layout."""
    if latent_index is None:
        latent_index = build_index(latent_matrix(embeddings), embeddings["detid"].to_numpy(),
                                   model_version=str(embeddings["model_version"].iloc[0]))
    written = {"index": save_index(latent_index, layout.index_dir)}
    write_parquet_atomic(layout.classes, classes)
    written["classes"] = layout.classes
    write_parquet_atomic(layout.outliers, outlier_scores(embeddings, latent_index=latent_index))
    written["outliers"] = layout.outliers
    trajectories = latent_trajectories(embeddings)
    write_parquet_atomic(layout.trajectories, trajectories)
    written["trajectories"] = layout.trajectories
    projection = MapProjection.fit(latent_matrix(embeddings))
    if len(trajectories):
        written["trajectories_plot"] = plot_trajectories(
            embeddings, trajectories["srcid"].head(N_TOP_MOVERS).tolist(), layout.trajectories_plot, classes,
            projection)
    if len(embeddings) >= 2:
        clusters = fit_clusters(embeddings, classes)
        write_parquet_atomic(layout.clusters, clusters.assignments)
        write_parquet_atomic(layout.cluster_summary, clusters.summary)
        written |= {"clusters": layout.clusters, "cluster_summary": layout.cluster_summary}
    written["density_map"] = plot_latent_density(embeddings, layout.density_map, projection)
    written["class_map"] = plot_latent_classes(embeddings, classes, layout.class_map, projection)
    return written


def inputs_fingerprint(
    spectra_dir: Path, model_version: str, archive_dir: Path | None, tap_url: str | None, radius_arcsec: float
) -> str:
    """Content hash of everything an embed run reads: spectra files, model version, class source."""
    spectra = [*spectra_files(spectra_dir), Path(spectra_dir) / RESPONSES_FILE]
    truth = archive_dir / TRUTH_FILE if archive_dir is not None else None
    return sha256_json({
        "spectra": {p.name: sha256_file(p) for p in spectra if p.is_file()},
        "model_version": model_version,
        "truth": sha256_file(truth) if truth is not None and truth.is_file() else None,
        "tap_url": tap_url,
        "radius_arcsec": radius_arcsec,
        "products_version": PRODUCTS_VERSION,
    })


@dataclass
class EmbedSummary:
    skipped: bool
    n_detections: int
    model_version: str
    written: dict[str, Path]


def embed_and_build(
    spectra_dir: str | Path,
    model_dir: str | Path,
    latent_dir: str | Path,
    archive_dir: str | Path | None = None,
    tap_url: str | None = None,
    radius_arcsec: float = 5.0,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> EmbedSummary:
    """Encode every spectrum with the model and write all latent products; no work if up to date.
    `progress(done, total)` follows the encoding (see `embed_dataset`)."""
    from xmm_pipeline.model.train import load_artifact
    from xmm_pipeline.spectra.dataset import load_dataset

    spectra_dir, layout = Path(spectra_dir), LatentLayout(Path(latent_dir))
    archive = Path(archive_dir) if archive_dir is not None else None
    artifact = load_artifact(model_dir)
    fingerprint = inputs_fingerprint(spectra_dir, artifact.version, archive, tap_url, radius_arcsec)
    manifest = layout.read_manifest()
    if not force and manifest.get("fingerprint") == fingerprint and layout.embeddings.is_file():
        return EmbedSummary(True, int(manifest["n_detections"]), artifact.version,
                            {k: Path(v) for k, v in manifest["written"].items()})
    embeddings = embed_dataset(artifact, load_dataset(spectra_dir), progress)
    write_embeddings(embeddings, layout.embeddings)
    classes = source_classes(embeddings, archive, tap_url, radius_arcsec)
    written = {"embeddings": layout.embeddings, **build_products(embeddings, classes, layout)}
    write_manifest(layout, spectra_dir, model_dir, archive, artifact.version, len(embeddings), written,
                   fingerprint)
    return EmbedSummary(False, len(embeddings), artifact.version, written)


def write_manifest(
    layout: LatentLayout,
    spectra_dir: str | Path,
    model_dir: str | Path,
    archive_dir: str | Path | None,
    model_version: str,
    n_detections: int,
    written: dict[str, Path],
    fingerprint: str | None = None,
) -> None:
    """Record where the latent folder's inputs are (what `show` and `similar --spectrum` read).

    `fingerprint` is the inputs hash that lets a later `embed` skip its work; None (the Dagster path,
    whose products are separate steps) makes the next `embed` redo everything.
    """
    write_json_atomic(layout.manifest, {
        "fingerprint": fingerprint,
        "model_version": model_version,
        "n_detections": int(n_detections),
        "spectra_dir": str(Path(spectra_dir).resolve()),
        "model_dir": str(Path(model_dir).resolve()),
        "archive_dir": str(Path(archive_dir).resolve()) if archive_dir is not None else None,
        "written": {k: str(v) for k, v in written.items()},
    })
