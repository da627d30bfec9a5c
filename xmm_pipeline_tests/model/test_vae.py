"""The VAE, the fold, the ML normalisation and the Poisson loss on a synthetic dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from xmm_pipeline.model.vae import (
    VAE,
    SpectraTensors,
    VAEConfig,
    count_parameters,
    fold,
    ml_normalisation,
    poisson_deviance_per_dof,
    poisson_vae_loss,
)
from xmm_pipeline_tests.model.synthetic import make_synthetic_dataset

SEED_PARAMETERS = 475_206


@pytest.fixture(scope="module")
def dataset():
    return make_synthetic_dataset(40, seed=3)


def test_default_size_is_close_to_the_seed_model(capsys: pytest.CaptureFixture[str]) -> None:
    n = count_parameters(VAE(VAEConfig()))
    print(f"default VAE: {n:,} parameters (seed: {SEED_PARAMETERS:,})")
    assert abs(n - SEED_PARAMETERS) / SEED_PARAMETERS < 0.01


def test_shapes_positivity_and_shared_trunk(dataset) -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=3)).eval()
    x = torch.as_tensor(dataset.unfolded[:5])
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, 3)
    flux = model.decode(mu)
    assert flux.shape == (5, 238) and bool((flux > 0).all())
    assert torch.allclose(flux.mean(-1), torch.ones(5), rtol=1e-4)
    one_by_one = torch.cat([model.decode(mu[i:i + 1]) for i in range(5)])
    assert torch.allclose(flux, one_by_one, rtol=1e-5, atol=1e-7)
    wide = model.decode(mu, torch.linspace(np.log(0.1), np.log(12.0), 50))
    assert wide.shape == (5, 50) and bool(torch.isfinite(wide).all())


def test_encoder_ignores_the_overall_scale(dataset) -> None:
    model = VAE(VAEConfig()).eval()
    x = torch.as_tensor(dataset.unfolded[:4])
    assert torch.allclose(model.encode(x)[0], model.encode(x * 1e6)[0], atol=1e-4)


@pytest.mark.parametrize("n_rmf", [2, 12])
@pytest.mark.parametrize("gather_all", [True, False])
def test_fold_matches_the_dataset_fold(dataset, n_rmf: int, gather_all: bool) -> None:
    """Both folding paths (all RMFs then gather; one matmul per RMF) equal SpectralDataset.fold."""
    rng = np.random.default_rng(1)
    matrices = np.concatenate([dataset.rmf_matrices] * (n_rmf // 2))
    ds = dataset.subset(np.arange(len(dataset)))
    ds.rmf_matrices, ds.rmf_index = matrices, rng.integers(0, n_rmf, len(ds))
    flux = rng.uniform(0.1, 2.0, ds.counts.shape).astype(np.float32)
    expected = ds.fold(flux * ds.grid.widths_kev)
    got = fold(torch.as_tensor(flux), SpectraTensors.from_dataset(ds), torch.as_tensor(matrices),
               gather_all).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3 * expected.max())


def test_ml_normalisation_is_the_poisson_maximum() -> None:
    rng = np.random.default_rng(2)
    source = rng.uniform(0.5, 5.0, (3, 238))
    background = np.stack([np.zeros(238), np.full(238, 0.5), np.full(238, 5.0)])
    counts = rng.poisson(2.0 * source + background).astype(float)
    norm = ml_normalisation(*(torch.tensor(a, dtype=torch.float32) for a in (source, counts, background)),
                            iterations=200).numpy()[:, 0]
    assert norm[0] == pytest.approx(counts[0].sum() / source[0].sum(), rel=1e-5)
    for i in range(3):
        best = minimize_scalar(lambda a, i=i: np.sum(a * source[i] + background[i]
                                                     - counts[i] * np.log(a * source[i] + background[i])),
                               bounds=(1e-3, 10.0), method="bounded", options={"xatol": 1e-8})
        assert norm[i] == pytest.approx(best.x, rel=1e-3)


def test_deviance_numpy_and_torch_agree_and_are_calibrated() -> None:
    rng = np.random.default_rng(4)
    mu = rng.uniform(50.0, 200.0, (200, 238))
    counts = rng.poisson(mu).astype(float)
    numpy_dev = poisson_deviance_per_dof(counts, mu)
    torch_dev = poisson_deviance_per_dof(torch.tensor(counts), torch.tensor(mu)).numpy()
    np.testing.assert_allclose(numpy_dev, torch_dev, rtol=1e-10)
    assert np.mean(numpy_dev) == pytest.approx(1.0, abs=0.03)
    assert np.allclose(poisson_deviance_per_dof(counts, np.maximum(counts, 1e-9)), 0.0, atol=1e-6)
    assert np.mean(poisson_deviance_per_dof(counts, 1.3 * mu)) > 5.0


def test_loss_gradients_reach_every_network(dataset) -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(encoder_widths=(32,), branch_widths=(32,), trunk_widths=(32,), n_basis=8))
    batch = SpectraTensors.from_dataset(dataset)
    loss, _, kl = poisson_vae_loss(model, batch, torch.as_tensor(dataset.rmf_matrices),
                                     torch.randn(len(dataset), model.config.latent_dim))
    loss.backward()
    assert torch.isfinite(loss.detach()) and float(kl.detach()) >= 0
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="decoder"):
        VAEConfig(decoder="transformer")
