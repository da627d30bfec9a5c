"""The model on the pipeline's own data: the session's simulated archive and the real pn spectra."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xmm_pipeline.model.baselines import to_model_grid
from xmm_pipeline.model.train import load_artifact
from xmm_pipeline.model.vae import SpectraTensors, expected_counts, float32_tensor, poisson_deviance_per_dof

REAL_SPECTRA = {  # label: (spectrum, background, arf, rmf) relative to real_pn_dir
    "NGC 7793 P13": ("ngc7793_p13/PN.pha", None, None, None),
    "IGR J18490-0000": ("igr_j18490/PN_PWN.fits", "igr_j18490/PN_PWN_bkg.fits", "igr_j18490/PN_PWN.arf",
                        "igr_j18490/PN_PWN.rmf"),
    "Circinus ULX": ("circinus_ulx/pn_spec.fits", "circinus_ulx/pn_backspec.fits", "circinus_ulx/pn.arf",
                     "circinus_ulx/pn.rmf"),
}


def real_datasets(real_pn_dir: Path) -> dict:
    from xmm_pipeline.spectra.preprocess import spectrum_to_dataset

    return {label: spectrum_to_dataset(*(None if p is None else real_pn_dir / p for p in paths))
            for label, paths in REAL_SPECTRA.items()}


def test_trained_artifact_reconstructs_the_simulated_spectra(trained_artifact: Path,
                                                             spectral_dataset) -> None:
    artifact = load_artifact(trained_artifact)
    description = json.loads((Path(trained_artifact) / "model.json").read_text())
    history = json.loads((Path(trained_artifact) / "history.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert description["split"]["n_train"] + description["split"]["n_val"] == len(spectral_dataset)
    mu, logvar = artifact.encode(spectral_dataset)
    assert mu.shape == (len(spectral_dataset), artifact.config.latent_dim) and np.isfinite(logvar).all()
    assert mu.std(axis=0).min() > 1e-3  # the latent space is used, not collapsed onto the prior mean
    deviance = artifact.deviance_per_dof(spectral_dataset)
    assert np.isfinite(deviance).all()
    # a constant-shape model (the mean flux shape for every spectrum) is the floor to beat
    assert np.median(deviance) < np.median(_constant_shape_deviance(artifact, spectral_dataset))


def _constant_shape_deviance(artifact, dataset) -> np.ndarray:
    """The mean unfolded shape on the model grid (held constant in E^2 flux beyond the band edges)."""
    grid = dataset.model_grid
    mean_unfolded = to_model_grid(dataset.unfolded.mean(axis=0), grid) / grid.centres_kev**2
    flux = np.tile(np.maximum(mean_unfolded, 1e-6 * mean_unfolded.max()), (len(dataset), 1))
    mu = expected_counts(float32_tensor(flux), SpectraTensors.from_dataset(dataset),
                         float32_tensor(dataset.rmf_matrices)).numpy()
    return poisson_deviance_per_dof(dataset.counts, mu, artifact.config.latent_dim + 1, dataset.valid)


def test_real_spectra_encode_and_reconstruct(trained_artifact: Path, real_pn_dir: Path) -> None:
    artifact = load_artifact(trained_artifact)
    for label, dataset in real_datasets(real_pn_dir).items():
        mu, _ = artifact.encode(dataset)
        expected = artifact.reconstruct(dataset)
        deviance = artifact.deviance_per_dof(dataset)
        assert np.isfinite(mu).all() and (expected > 0).all(), label
        assert np.isfinite(deviance).all() and deviance[0] > 0, label


@pytest.mark.slow
def test_evaluation_on_the_simulated_archive(trained_artifact: Path, spectral_dataset, sim_archive: Path,
                                             real_pn_dir: Path, tmp_path: Path) -> None:
    import pandas as pd

    from xmm_pipeline.model.evaluate import evaluate_reconstruction
    from xmm_pipeline.model.train import TrainConfig, split_by_source

    truth = pd.read_parquet(sim_archive / "truth.parquet", columns=["detid", "class"])
    classes = spectral_dataset.meta[["detid"]].merge(truth, on="detid", how="left")["class"].fillna("?")
    train_rows, test_rows = split_by_source(spectral_dataset.meta["srcid"].to_numpy(), 0.25, seed=5)
    markdown, metrics = evaluate_reconstruction(
        spectral_dataset.subset(train_rows), spectral_dataset.subset(test_rows), trained_artifact, tmp_path,
        real=real_datasets(real_pn_dir), classes=classes.to_numpy()[test_rows].tolist(),
        train_config=TrainConfig(max_epochs=15, seed=1))
    assert {e["label"] for e in metrics["examples"]} >= {"AGN", "star"}
    assert set(metrics["real"]) == set(REAL_SPECTRA)
    assert all(np.isfinite(s["mean"]) for s in metrics["test"].values())
    assert "Circinus ULX" in markdown
