"""The fair baselines for "the learned templates matter", fitted on the same training spectra.

- `mlp`: the same VAE with an MLP decoder of (about) the same size: each bin an independent output.
- `pca_trunk`: a DeepONet whose trunk is fixed to the PCA basis (and mean) of the training set's
  log-unfolded spectra; only the encoder and branch learn.
- `pca`: plain PCA with latent_dim components of the log-unfolded spectra; a spectrum is projected,
  reconstructed, turned back into a photon flux shape and folded exactly as the VAE's output is.

Log-unfolded: log(max(unfolded / mean(unfolded), LOG_FLOOR)) of the preprocessing's E^2-weighted
unfolded spectrum (spectra.preprocess: unfolded = E^2 flux / mean), so subtracting 2 log E gives the
log photon flux density shape the decoders produce. Masked bins (no data) are filled by interpolating
each spectrum's valid bins in log energy before the PCA. The PCA lives on the channel grid; on the model
grid bins beyond the band hold the edge bins' log-unfolded values (a constant E^2 flux beyond the edges).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xmm_pipeline.model.train import ModelArtifact, TrainConfig, load_artifact, train_model
from xmm_pipeline.model.vae import (
    VAE,
    SpectraTensors,
    VAEConfig,
    expected_counts,
    float32_tensor,
    with_model_grid,
)
from xmm_pipeline.spectra.dataset import SpectralDataset
from xmm_pipeline.spectra.grid import ModelGrid

UNFOLDED_ENERGY_POWER = 2.0  # unfolded = E^UNFOLDED_ENERGY_POWER x photon flux density (spectra.preprocess)
LOG_FLOOR = 1e-2  # floor of the mean-normalised unfolded spectrum before the log (empty bins)


def log_unfolded(unfolded: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Log of the mean-normalised unfolded spectra, masked bins interpolated from the valid ones."""
    if valid is not None:
        valid = np.broadcast_to(np.asarray(valid, dtype=bool), unfolded.shape)
        unfolded = np.where(valid, unfolded, 0.0)
        count = valid.sum(axis=-1, keepdims=True)
        scale = np.abs(unfolded).sum(axis=-1, keepdims=True) / np.maximum(count, 1)
    else:
        scale = np.abs(unfolded).mean(axis=-1, keepdims=True)
    logs = np.log(np.maximum(unfolded / np.where(scale > 0, scale, 1.0), LOG_FLOOR))
    if valid is not None and not valid.all():
        positions = np.arange(logs.shape[-1])
        for row in np.flatnonzero(~valid.all(axis=-1)):
            if valid[row].any():
                logs[row] = np.interp(positions, positions[valid[row]], logs[row, valid[row]])
    return logs


def to_model_grid(values: np.ndarray, grid: ModelGrid) -> np.ndarray:
    """Channel-grid values [..., B] on the model grid [..., M], edge values held beyond the band."""
    pad = [(0, 0)] * (np.ndim(values) - 1) + [(grid.bins_below, grid.bins_above)]
    return np.pad(values, pad, mode="edge")


@dataclass
class LogPCA:
    """PCA of log-unfolded spectra: mean [B] and orthonormal components [p, B] on the channel grid;
    `log_flux` gives shapes on the model grid (log_energy [M])."""

    mean: np.ndarray
    components: np.ndarray
    log_energy: np.ndarray
    model_grid: ModelGrid | None = None

    @classmethod
    def fit(cls, dataset: SpectralDataset, n_components: int) -> LogPCA:
        logs = log_unfolded(dataset.unfolded.astype(np.float64), dataset.valid)
        mean = logs.mean(axis=0)
        _, _, vt = np.linalg.svd(logs - mean, full_matrices=False)
        n = min(n_components, vt.shape[0])
        return cls(mean, vt[:n], np.log(dataset.model_grid.centres_kev), dataset.model_grid)

    def project(self, dataset: SpectralDataset) -> np.ndarray:
        logs = log_unfolded(dataset.unfolded.astype(np.float64), dataset.valid)
        return (logs - self.mean) @ self.components.T

    def log_flux(self, coefficients: np.ndarray) -> np.ndarray:
        """Log photon flux density shapes [N, M] of the given PCA coefficients, on the model grid."""
        shape = self.mean + coefficients @ self.components
        if self.model_grid is not None:
            shape = to_model_grid(shape, self.model_grid)
        return shape - UNFOLDED_ENERGY_POWER * self.log_energy

    def reconstruct(self, dataset: SpectralDataset, norm_iterations: int = 20) -> np.ndarray:
        """Expected counts [N, B]: PCA reconstruction, folded, background added, ML-normalised."""
        log_flux = self.log_flux(self.project(dataset))
        flux = np.exp(log_flux - log_flux.max(axis=-1, keepdims=True))
        with torch.no_grad():
            mu = expected_counts(torch.as_tensor(flux, dtype=torch.float32),
                                 SpectraTensors.from_dataset(dataset), float32_tensor(dataset.rmf_matrices),
                                 norm_iterations)
        return mu.numpy()


def pca_trunk_model(train: SpectralDataset, config: VAEConfig, seed: int) -> VAE:
    """A VAE whose DeepONet trunk is the training set's log PCA basis (bias template: the PCA mean)."""
    pca = LogPCA.fit(train, config.n_basis)
    torch.manual_seed(seed)
    model = VAE(with_model_grid(VAEConfig.from_dict({**config.to_dict(), "decoder": "pca_trunk"}),
                                train.model_grid))
    grid = train.model_grid
    basis = np.zeros((grid.n_bins, config.n_basis + 1))
    basis[:, : len(pca.components)] = to_model_grid(pca.components, grid).T
    basis[:, -1] = to_model_grid(pca.mean, grid) - UNFOLDED_ENERGY_POWER * pca.log_energy
    model.decoder.basis.copy_(torch.as_tensor(basis, dtype=torch.float32))
    return model


def fit_baselines(train: SpectralDataset, config: VAEConfig, train_config: TrainConfig, out_dir: str | Path
                  ) -> tuple[dict[str, ModelArtifact], LogPCA]:
    """Train the MLP-decoder and PCA-trunk VAEs (artifacts under out_dir/<name>) and fit the plain PCA."""
    out = Path(out_dir)
    mlp_config = VAEConfig.from_dict({**config.to_dict(), "decoder": "mlp"})
    mlp = train_model(train, out / "mlp", mlp_config, train_config)
    trunk = train_model(train, out / "pca_trunk", train_config=train_config,
                        model=pca_trunk_model(train, config, train_config.seed))
    return {"mlp": load_artifact(mlp.artifact_dir), "pca_trunk": load_artifact(trunk.artifact_dir)}, \
        LogPCA.fit(train, config.latent_dim)
