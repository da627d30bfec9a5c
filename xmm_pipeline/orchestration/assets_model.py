"""Model domain: the VAE with the DeepONet decoder, trained in the `gpu` pool (CPU where none)."""

import math

import numpy as np
from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset
from matplotlib.figure import Figure

from xmm_pipeline.orchestration.assets_spectra import training_set
from xmm_pipeline.orchestration.metadata import figure_markdown, path_value, png_markdown
from xmm_pipeline.orchestration.resources import ComputeResource, ModelSettings, StorageResource
from xmm_pipeline.orchestration.versions import code_version
from xmm_pipeline.storage import write_json_atomic

GROUP = "model"
VALIDATION_FILE = "validation.json"
N_RECONSTRUCTION_PLOTS = 4


@asset(
    group_name=GROUP,
    deps=[training_set],
    pool="gpu",
    code_version=code_version(
        "xmm_pipeline.model.vae", "xmm_pipeline.model.train", "xmm_pipeline.model.baselines"
    ),
    description="The VAE (MLP encoder, DeepONet decoder) on the training set; never retrained automatically.",
)
def vae_model(
    context: AssetExecutionContext, storage: StorageResource, model: ModelSettings, compute: ComputeResource
) -> MaterializeResult:
    from xmm_pipeline.model.train import load_artifact, pick_device, train_model
    from xmm_pipeline.spectra.dataset import load_dataset

    dataset = load_dataset(storage.training_dir)
    result = train_model(
        dataset,
        storage.model_dir,
        model.vae_config(),
        model.train_config(compute),
        preprocessing={"training_set": str(storage.training_dir)},
        on_epoch_end=lambda row: context.log.debug(f"epoch {row}"),
    )
    artifact = load_artifact(result.artifact_dir)
    validation = validation_summary(dataset, artifact, model)
    write_json_atomic(storage.model_dir / VALIDATION_FILE, validation)
    figures = reconstruction_plots(dataset, artifact, model, storage.model_dir / "figures")
    return MaterializeResult(
        data_version=DataVersion(result.version),
        metadata={
            "path": path_value(result.artifact_dir),
            "model version": result.version,
            "parameters": result.n_parameters,
            "best epoch": result.best_epoch,
            "epochs run": len(result.history),
            "device": str(pick_device(compute.device)),
            "validation loss": validation["val_loss"],
            "validation deviance per dof": validation["vae_deviance_per_dof"],
            "PCA baseline deviance per dof": validation["pca_deviance_per_dof"],
            "trained on spectra": len(dataset),
            "loss curve": figure_markdown(loss_curve_figure(result.history), "loss curve"),
            "reconstructions": png_markdown(figures[0], "reconstruction")
            if figures
            else MetadataValue.text("none"),
        },
    )


def validation_rows(dataset, model: ModelSettings) -> np.ndarray:
    from xmm_pipeline.model.train import source_ids, split_by_source

    return split_by_source(source_ids(dataset), model.val_fraction, model.seed)[1]


def validation_summary(dataset, artifact, model: ModelSettings) -> dict[str, float]:
    """Validation loss of the trained model and deviance per dof of the model and the PCA baseline.

    Both are measured on the model's own validation split; the `vae_model_beats_pca` check reads it.
    """
    from xmm_pipeline.model.baselines import pca_baseline_deviance

    history = [row for row in artifact.description.get("history", []) if "val_loss" in row]
    summary = artifact.description.get("history_summary", {})
    val_rows = validation_rows(dataset, model)
    validation = dataset.subset(val_rows)
    train = dataset.subset(np.setdiff1d(np.arange(len(dataset)), val_rows))
    vae = float(np.mean(artifact.deviance_per_dof(validation)))
    pca = float(np.mean(pca_baseline_deviance(train, validation, model.latent_dim)))
    val_loss = summary.get("best_val_loss", history[-1]["val_loss"] if history else math.nan)
    return {
        "val_loss": float(val_loss) if val_loss is not None else math.nan,
        "vae_deviance_per_dof": vae,
        "pca_deviance_per_dof": pca,
        "n_validation": len(val_rows),
    }


def loss_curve_figure(history: list[dict[str, float]]) -> Figure:
    figure = Figure(figsize=(6, 3.6))
    axes = figure.add_subplot(1, 1, 1)
    epochs = [row["epoch"] for row in history]
    axes.plot(epochs, [row["train_loss"] for row in history], label="train")
    evaluated = [row for row in history if "val_loss" in row]
    axes.plot([row["epoch"] for row in evaluated], [row["val_loss"] for row in evaluated], label="validation")
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss per spectrum (Poisson NLL + KL)")
    axes.legend()
    return figure


def reconstruction_plots(dataset, artifact, model: ModelSettings, out_dir) -> list:
    """Folded reconstructions of the brightest validation spectra, as PNG files."""
    from xmm_pipeline.latent.products import plot_reconstruction

    val_rows = validation_rows(dataset, model)
    if len(val_rows) == 0:
        return []
    brightest = val_rows[np.argsort(dataset.counts[val_rows].sum(axis=1))[::-1][:N_RECONSTRUCTION_PLOTS]]
    subset = dataset.subset(brightest)
    expected = artifact.reconstruct(subset)
    paths = []
    for i in range(len(subset)):
        detid = int(subset.meta["detid"].iloc[i])
        paths.append(
            plot_reconstruction(
                dataset.grid.edges_kev,
                subset.counts[i],
                subset.background[i],
                expected[i],
                out_dir / f"reconstruction_{detid}.png",
                title=f"detid {detid}",
            )
        )
    return paths
