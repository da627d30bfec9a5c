"""Model domain: the VAE with the DeepONet decoder, trained in the `gpu` pool (CPU where none).

matplotlib is imported where a figure is drawn, not at load: every step process of a multiprocess run
loads this module, and matplotlib.figure is the largest import of the whole code location.
"""

import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from dagster import AssetExecutionContext, DataVersion, MaterializeResult, asset

from xmm_pipeline.orchestration.assets_spectra import training_set
from xmm_pipeline.orchestration.metadata import figure_markdown, path_value, png_markdown
from xmm_pipeline.orchestration.resources import ComputeResource, ModelSettings, StorageResource
from xmm_pipeline.orchestration.versions import code_version
from xmm_pipeline.storage import write_json_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GROUP = "model"
VALIDATION_FILE = "validation.json"


@asset(
    group_name=GROUP,
    deps=[training_set],
    pool="gpu",
    code_version=code_version("xmm_pipeline.model.vae", "xmm_pipeline.model.train"),
    description="The VAE (MLP encoder, DeepONet decoder) on the training set; never retrained automatically.",
)
def vae_model(
    context: AssetExecutionContext, storage: StorageResource, model: ModelSettings, compute: ComputeResource
) -> MaterializeResult:
    from xmm_pipeline.model.train import load_artifact, pick_device, train_model
    from xmm_pipeline.spectra.dataset import load_dataset
    from xmm_pipeline.spectra.preprocess import PreprocessConfig, preprocess_version

    dataset = load_dataset(storage.training_dir)
    result = train_model(
        dataset,
        storage.model_dir,
        model.vae_config(),
        model.train_config(compute),
        preprocessing=asdict(PreprocessConfig()) | {"version": preprocess_version()},
        on_epoch_end=lambda row: context.log.debug(f"epoch {row}"),
    )
    artifact = load_artifact(result.artifact_dir)
    validation = validation_summary(dataset, artifact)
    write_json_atomic(storage.model_dir / VALIDATION_FILE, validation)
    figure = reconstruction_plot(dataset, artifact, storage.model_dir / "reconstructions.png")
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
            "reconstructions": png_markdown(figure, "input counts vs folded reconstruction"),
        },
    )


def validation_split(dataset, artifact):
    """(train, validation) datasets: the artifact's own split by source (same function, fraction, seed)."""
    from xmm_pipeline.model.train import source_ids, split_by_source

    config = artifact.train_config
    train_rows, val_rows = split_by_source(source_ids(dataset), config.val_fraction, config.seed)
    return dataset.subset(train_rows), dataset.subset(val_rows)


def validation_summary(dataset, artifact) -> dict[str, float]:
    """Validation loss of the trained model, and the deviance per dof of the model and of a plain PCA
    of the same latent dimension (folded the same way) on the model's own validation spectra."""
    from xmm_pipeline.model.baselines import LogPCA
    from xmm_pipeline.model.vae import poisson_deviance_per_dof

    train, validation = validation_split(dataset, artifact)
    n_fitted = artifact.config.latent_dim + 1
    pca = LogPCA.fit(train, artifact.config.latent_dim).reconstruct(
        validation, artifact.config.norm_iterations
    )
    val_loss = artifact.description.get("history_summary", {}).get("best_val_loss")
    pca_deviance = poisson_deviance_per_dof(validation.counts, pca, n_fitted, validation.valid)
    return {
        "val_loss": math.nan if val_loss is None else float(val_loss),
        "vae_deviance_per_dof": float(np.mean(artifact.deviance_per_dof(validation))),
        "pca_deviance_per_dof": float(np.mean(pca_deviance)),
        "n_validation": len(validation),
    }


def loss_curve_figure(history: list[dict[str, float]]) -> "Figure":
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.6))
    axes = figure.add_subplot(1, 1, 1)
    axes.plot([row["epoch"] for row in history], [row["train_loss"] for row in history], label="train")
    evaluated = [row for row in history if "val_loss" in row]
    axes.plot([row["epoch"] for row in evaluated], [row["val_loss"] for row in evaluated], label="validation")
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss per spectrum (Poisson NLL + KL)")
    axes.legend()
    return figure


def reconstruction_plot(dataset, artifact, path: Path) -> Path:
    """Input counts against the folded reconstruction for four validation spectra (the seed's slides)."""
    from xmm_pipeline.model.evaluate import pick_examples, plot_reconstructions

    _, validation = validation_split(dataset, artifact)
    examples = pick_examples(validation, None)
    rows = [row for _, row in examples]
    subset = validation.subset(np.array(rows, dtype=np.int64))
    expected = np.zeros_like(validation.counts, dtype=np.float64)
    expected[rows] = artifact.reconstruct(subset)
    deviance = np.zeros(len(validation))
    deviance[rows] = artifact.deviance_per_dof(subset)
    plot_reconstructions(validation, expected, examples, deviance, path)
    return path
