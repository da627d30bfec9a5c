"""Latent domain: embeddings with the current model, the FAISS index, and what astronomers look at."""

import pandas as pd
from dagster import DataVersion, MaterializeResult, MetadataValue, asset

from xmm_pipeline.orchestration.assets_archive import selected_detections
from xmm_pipeline.orchestration.assets_model import vae_model
from xmm_pipeline.orchestration.assets_spectra import pn_spectra
from xmm_pipeline.orchestration.metadata import path_value, png_markdown, table_markdown
from xmm_pipeline.orchestration.resources import ArchiveResource, StorageResource
from xmm_pipeline.orchestration.versions import code_version
from xmm_pipeline.storage import sha256_json, write_parquet_atomic

GROUP = "latent"
PRODUCTS = "xmm_pipeline.latent.products"


def read_current_embeddings(storage: StorageResource) -> pd.DataFrame:
    return storage.latent_layout.read_embeddings()


@asset(
    group_name=GROUP,
    deps=[vae_model, pn_spectra],
    code_version=code_version("xmm_pipeline.latent.embed"),
    description="Latent mean, log-variance and reconstruction deviance of every spectrum, current model.",
)
def latent_embeddings(storage: StorageResource, archive: ArchiveResource) -> MaterializeResult:
    """Also writes the latent folder's manifest (spectra and model folders), as `xmm-pipeline embed` does,
    so that `show` and `similar --spectrum` find their inputs after a Dagster run."""
    from xmm_pipeline.latent.build import write_manifest
    from xmm_pipeline.latent.embed import embed_dataset, write_embeddings
    from xmm_pipeline.model.train import load_artifact
    from xmm_pipeline.spectra.dataset import load_dataset

    artifact = load_artifact(storage.model_dir)
    dataset = load_dataset(storage.spectra_dir)
    layout = storage.latent_layout
    path = layout.embeddings
    previous = set(pd.read_parquet(path, columns=["detid"])["detid"]) if path.exists() else set()
    frame = embed_dataset(artifact, dataset)
    layout.manifest.unlink(missing_ok=True)
    write_embeddings(frame, path)
    write_manifest(layout, storage.spectra_dir, storage.model_dir, archive.root, artifact.version, len(frame),
                   {"embeddings": path})
    return MaterializeResult(
        data_version=DataVersion(sha256_json([artifact.version, frame["detid"].tolist()])[:16]),
        metadata={
            "path": path_value(path),
            "dagster/row_count": len(frame),
            "new detections": int((~frame["detid"].isin(previous)).sum()),
            "model version": artifact.version,
            "median deviance per dof": float(frame["deviance_per_dof"].median()),
        },
    )


@asset(group_name=GROUP, deps=[latent_embeddings], code_version=code_version("xmm_pipeline.latent.search"))
def faiss_index(storage: StorageResource) -> MaterializeResult:
    """FAISS index over the latent means, detection ids inside.

    Exact when small; an IVF index whose recall@10 is checked at build time when large.
    """
    from xmm_pipeline.latent.embed import latent_matrix
    from xmm_pipeline.latent.search import build_index, save_index

    frame = read_current_embeddings(storage)
    index = build_index(
        latent_matrix(frame), frame["detid"].to_numpy(), model_version=str(frame["model_version"].iloc[0])
    )
    path = save_index(index, storage.latent_layout.index_dir)
    return MaterializeResult(
        metadata={
            "path": path_value(path),
            "vectors": index.info.n_vectors,
            "kind": index.info.kind,
            "recall@k": index.info.recall_at_k,
            "build seconds": index.info.build_s,
        }
    )


@asset(group_name=GROUP, deps=[latent_embeddings, faiss_index], code_version=code_version(PRODUCTS))
def outlier_scores(storage: StorageResource) -> MaterializeResult:
    """Every detection ranked by the outlier score (reconstruction deviance and latent sparsity)."""
    from xmm_pipeline.latent.products import outlier_scores as score
    from xmm_pipeline.latent.search import load_index

    frame = score(read_current_embeddings(storage), latent_index=load_index(storage.latent_layout.index_dir))
    path = storage.latent_layout.outliers
    write_parquet_atomic(path, frame)
    return MaterializeResult(
        metadata={"path": path_value(path), "dagster/row_count": len(frame), "top 20": table_markdown(frame)}
    )


@asset(group_name=GROUP, deps=[latent_embeddings], code_version=code_version(PRODUCTS))
def latent_trajectories(storage: StorageResource) -> MaterializeResult:
    """Per source with several detections: its path through latent space, path length, largest jump."""
    from xmm_pipeline.latent.build import N_TOP_MOVERS
    from xmm_pipeline.latent.products import latent_trajectories as trajectories
    from xmm_pipeline.latent.products import plot_trajectories

    embeddings = read_current_embeddings(storage)
    frame = trajectories(embeddings)
    path = storage.latent_layout.trajectories
    write_parquet_atomic(path, frame)
    metadata = {
        "path": path_value(path),
        "dagster/row_count": len(frame),
        "top movers": table_markdown(frame, 10),
    }
    if len(frame):
        figure = plot_trajectories(
            embeddings, frame["srcid"].head(N_TOP_MOVERS).tolist(), storage.latent_layout.trajectories_plot
        )
        metadata["top movers map"] = png_markdown(figure, "trajectories")
    return MaterializeResult(metadata=metadata)


@asset(
    group_name=GROUP,
    deps=[latent_embeddings, selected_detections],
    code_version=code_version("xmm_pipeline.latent.crossmatch"),
    description="A class per embedded detection: simulated truth table, or SIMBAD over TAP (real archive).",
)
def source_classes(storage: StorageResource, archive: ArchiveResource) -> MaterializeResult:
    from xmm_pipeline.latent.crossmatch import classes_for_archive

    embedded = pd.read_parquet(storage.latent_layout.embeddings, columns=["detid"])
    selected = pd.read_parquet(storage.selected_path, columns=["detid", "srcid", "ra", "dec"])
    detections = selected[selected["detid"].isin(embedded["detid"])].reset_index(drop=True)
    frame = classes_for_archive(
        archive.get_archive(),
        detections,
        tap_url=archive.simbad_tap_url,
        radius_arcsec=archive.crossmatch_radius_arcsec,
    )
    path = storage.latent_layout.classes
    write_parquet_atomic(path, frame)
    counts = frame["class"].value_counts().rename_axis("class").reset_index(name="detections")
    return MaterializeResult(
        metadata={
            "path": path_value(path),
            "dagster/row_count": len(frame),
            "classes": table_markdown(counts),
        }
    )


def read_classes(storage: StorageResource) -> pd.DataFrame:
    return pd.read_parquet(storage.latent_layout.classes)


@asset(group_name=GROUP, deps=[latent_embeddings, source_classes], code_version=code_version(PRODUCTS))
def latent_clusters(storage: StorageResource) -> MaterializeResult:
    """Gaussian-mixture clusters in latent space (BIC-chosen count) with their class mix."""
    from xmm_pipeline.latent.products import fit_clusters

    result = fit_clusters(read_current_embeddings(storage), read_classes(storage))
    write_parquet_atomic(storage.latent_layout.clusters, result.assignments)
    write_parquet_atomic(storage.latent_layout.cluster_summary, result.summary)
    return MaterializeResult(
        metadata={
            "path": path_value(storage.latent_layout.clusters),
            "clusters": len(result.summary),
            "summary": table_markdown(result.summary),
        }
    )


@asset(group_name=GROUP, deps=[latent_embeddings, source_classes], code_version=code_version(PRODUCTS))
def latent_map(storage: StorageResource) -> MaterializeResult:
    """The latent density heatmap and the same map coloured by class, as PNG images."""
    from xmm_pipeline.latent.embed import latent_matrix
    from xmm_pipeline.latent.products import MapProjection, plot_latent_classes, plot_latent_density

    embeddings = read_current_embeddings(storage)
    projection = MapProjection.fit(latent_matrix(embeddings))
    density = plot_latent_density(embeddings, storage.latent_layout.density_map, projection)
    classes = plot_latent_classes(
        embeddings, read_classes(storage), storage.latent_layout.class_map, projection
    )
    return MaterializeResult(
        metadata={
            "density map": png_markdown(density, "latent density"),
            "class map": png_markdown(classes, "latent classes"),
            "path": path_value(density.parent),
        }
    )


@asset(
    group_name=GROUP,
    deps=[latent_embeddings, source_classes, outlier_scores, latent_trajectories],
    code_version=code_version("xmm_pipeline.latent.evaluate"),
    description="k-NN classification vs hardness ratios, similarity precision, outlier recall, trajectories.",
)
def evaluation(storage: StorageResource) -> MaterializeResult:
    from xmm_pipeline.latent.evaluate import evaluate_latent_space

    report = evaluate_latent_space(
        read_current_embeddings(storage), read_classes(storage), storage.reports_dir
    )
    return MaterializeResult(
        metadata={"path": path_value(storage.reports_dir), "summary": MetadataValue.md(str(report))}
    )


REEMBED_ASSETS = [
    latent_embeddings,
    faiss_index,
    outlier_scores,
    latent_trajectories,
    source_classes,
    latent_clusters,
    latent_map,
    evaluation,
]
