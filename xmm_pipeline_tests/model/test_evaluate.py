"""Baselines (MLP decoder, PCA trunk, plain PCA) and the reconstruction report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from xmm_pipeline.model.baselines import LogPCA, log_unfolded, pca_trunk_model
from xmm_pipeline.model.evaluate import evaluate_reconstruction, pick_examples
from xmm_pipeline.model.train import load_artifact, split_by_source, train_model
from xmm_pipeline.model.vae import VAE, VAEConfig, count_parameters
from xmm_pipeline.spectra.dataset import SpectralDataset
from xmm_pipeline_tests.model.synthetic import make_synthetic_dataset
from xmm_pipeline_tests.model.test_train import QUICK, TINY


@pytest.fixture(scope="module")
def split():
    dataset = make_synthetic_dataset(160, seed=21)
    train_rows, test_rows = split_by_source(dataset.meta["srcid"].to_numpy(), 0.25, seed=2)
    return dataset.subset(train_rows), dataset.subset(test_rows)


def test_mlp_decoder_has_the_deeponet_decoders_size() -> None:
    deeponet, mlp = VAE(VAEConfig()), VAE(VAEConfig(decoder="mlp"))
    assert count_parameters(mlp.decoder) == pytest.approx(count_parameters(deeponet.decoder), rel=0.01)


def test_log_pca_is_orthonormal_and_exact_on_low_rank_spectra(split) -> None:
    """Log-shapes in a k-dimensional family (plus the normalisation's constant) need k+1 components."""
    train, _ = split
    rng = np.random.default_rng(0)
    energy = np.log(train.grid.centres_kev)
    directions = np.stack([energy, np.sin(3 * energy), np.exp(-((energy - 0.5) ** 2) / 0.01)])
    low_rank = train.subset(np.arange(len(train)))
    low_rank.unfolded = np.exp(rng.normal(0, 0.5, (len(train), 3)) @ directions).astype(np.float32)
    pca = LogPCA.fit(low_rank, 4)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(4), atol=1e-10)
    recovered = pca.mean + pca.project(low_rank) @ pca.components
    np.testing.assert_allclose(recovered, log_unfolded(low_rank.unfolded), atol=1e-4)
    assert np.abs(LogPCA.fit(low_rank, 2).log_flux(LogPCA.fit(low_rank, 2).project(low_rank))
                  + 2 * energy - log_unfolded(low_rank.unfolded)).max() > 1e-2


def test_pca_trunk_stays_fixed_while_the_branch_learns(split, tmp_path: Path) -> None:
    train, _ = split
    model = pca_trunk_model(train, TINY, seed=0)
    basis = model.decoder.basis.clone()
    assert model.decoder.trunk is None and not basis[:, :-1].eq(0).all()
    result = train_model(train, tmp_path, train_config=QUICK, model=model)
    artifact = load_artifact(result.artifact_dir)
    assert artifact.config.decoder == "pca_trunk"
    torch.testing.assert_close(artifact.model.decoder.basis, basis)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_pick_examples_one_per_class_or_by_index(split) -> None:
    _, test = split
    labels = [label for label, _ in pick_examples(test, None)]
    present = [c for c in ("AGN", "star", "XRB", "TDE") if c in set(test.meta["class"])]
    assert labels[: len(present)] == present and len(labels) == 4
    no_class = test.subset(np.arange(len(test)))
    no_class.meta = no_class.meta.drop(columns="class")
    assert pick_examples(no_class, None) == [(f"spectrum {i}", i) for i in range(4)]


def test_evaluation_table_figure_and_real_spectra(split, tmp_path: Path) -> None:
    train, test = split
    trained = train_model(train, tmp_path / "vae", TINY, QUICK)
    real: dict[str, SpectralDataset] = {"first": test.subset([0]), "second": test.subset([1])}
    markdown, metrics = evaluate_reconstruction(train, test, trained.artifact_dir, tmp_path / "eval",
                                                real=real)
    assert set(metrics["test"]) == {"vae_deeponet", "mlp", "pca_trunk", "pca"}
    for summary in metrics["test"].values():
        assert summary["n"] == len(test) and 0 < summary["q25"] <= summary["median"] <= summary["q75"]
        assert np.isfinite(summary["mean"])
    assert set(metrics["real"]) == {"first", "second"}
    assert "| VAE + DeepONet |" in markdown and "| PCA (latent_dim components) |" in markdown
    assert "| first |" in markdown and metrics["version"] == trained.version
    figure = Path(metrics["figure"])
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "eval" / "baselines" / "mlp" / "model.pt").exists()
    # a 2-D PCA of 238 noisy bins is a poor model: the trained decoders must beat it here
    assert metrics["test"]["vae_deeponet"]["median"] < metrics["test"]["pca"]["median"]
