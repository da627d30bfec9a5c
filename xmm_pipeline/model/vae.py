"""The VAE: an MLP encoder of the unfolded spectrum and a DeepONet decoder of the photon flux shape.

    x (unfolded, [N, B]) --asinh scaling--> encoder MLP --> (mu, logvar) of q(z | x), z in R^latent_dim
    z --branch MLP--> coefficients b_k(z), k = 1..p
    log E (the model grid) --trunk MLP--> templates t_k(E) and a bias template t_0(E), once per pass
    log f(E) = sum_k b_k(z) t_k(E) + t_0(E);  f = exp(log f), normalised to unit mean over the model grid

f is a photon flux density shape (photons / cm^2 / s / keV, arbitrary scale) on the M bins of the
model grid: the B channel bins extended by `model_bins_below` and `model_bins_above` log steps
(spectra/grid.py; 0.2-12 keV for the default 0.3-10 keV grid), because the response moves photons from
outside the band into its edge channels. The trunk is a function of energy, so it is simply evaluated
on the wider grid; the MLP decoder baseline has M outputs. The loss folds f through each spectrum's
compressed response [B x M] and fixes the scale to the Poisson maximum-likelihood value given the
observed counts, so the latent codes shape, not brightness:

    mu_k = A * sum_j R[k, j] * area_exposure_j * width_j * f_j + background_k
    loss = mean over spectra of [ w sum_k v_k (mu_k - n_k + n_k log(n_k / mu_k)) + beta KL(q(z|x) || N(0,1)) ]
    w = (count_weight_reference / sum_k v_k n_k) ** count_weight_power

with v_k the spectrum's validity mask (spectra/dataset.py): masked channel bins enter neither the sum,
nor A, nor w, nor the degrees of freedom of the deviance (sum_k v_k - latent_dim - 1). The sum over k is
half the Poisson deviance (the NLL up to a per-spectrum constant). The weight w
tempers the likelihood of bright spectra: unweighted, a 10^5-count spectrum pulls on the shared
networks 100x harder than a typical 10^3-count one, and the latent map is laid out for the few bright
sources; with w = (1000 / counts)^0.5 every detection counts more evenly (see docs/MODEL.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from xmm_pipeline.spectra.grid import EnergyGrid, ModelGrid


@dataclass(frozen=True)
class VAEConfig:
    n_bins: int = 238
    latent_dim: int = 8  # the seed: 2; 8 classifies better at the same deviance (docs/MODEL.md)
    encoder_widths: tuple[int, ...] = (512, 256, 128)
    branch_widths: tuple[int, ...] = (256, 256)
    trunk_widths: tuple[int, ...] = (128, 128, 128)
    n_basis: int = 224  # p, the number of DeepONet templates
    trunk_frequencies: int = 6  # Fourier features sin/cos(2^k pi u), k < this, of the scaled log-energy u
    beta: float = 1.0  # weight of the KL term
    e_min_kev: float = 0.3  # energy range the trunk's log-energy input is scaled over
    e_max_kev: float = 10.0
    input_softening: float = 0.1  # asinh softening of the mean-normalised unfolded spectrum
    count_weight_power: float = 0.5  # per-spectrum likelihood weight (reference / counts) ** power
    count_weight_reference: float = 1000.0  # counts at which a spectrum's likelihood has weight 1
    decoder: str = "deeponet"  # "deeponet" | "mlp" | "pca_trunk" (the last two are baselines)
    norm_iterations: int = 20  # EM iterations for the ML normalisation with background
    model_bins_below: int = 0  # model grid = the channel grid + these log steps below and above;
    model_bins_above: int = 0  # train_model takes them from the dataset (0: models before the wider grid)

    def __post_init__(self) -> None:
        if self.decoder not in ("deeponet", "mlp", "pca_trunk"):
            raise ValueError(f"VAEConfig.decoder must be deeponet, mlp or pca_trunk, got {self.decoder!r}")
        if self.latent_dim < 1 or self.n_basis < 1 or self.n_bins < 2:
            raise ValueError(f"VAEConfig needs latent_dim, n_basis >= 1 and n_bins >= 2: {self}")
        if self.model_bins_below < 0 or self.model_bins_above < 0:
            raise ValueError(f"VAEConfig model grid extensions must be >= 0: {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VAEConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})


def channel_grid(config: VAEConfig) -> EnergyGrid:
    """The spectra's channel grid: the encoder's input bins."""
    return EnergyGrid(config.e_min_kev, config.e_max_kev, config.n_bins)


def model_grid(config: VAEConfig) -> ModelGrid:
    """The energy grid the decoder is evaluated on: the channel grid, extended."""
    return ModelGrid(channel_grid(config), config.model_bins_below, config.model_bins_above)


def with_model_grid(config: VAEConfig, grid: ModelGrid) -> VAEConfig:
    """`config` with the model grid extensions of `grid` (a dataset's)."""
    return VAEConfig.from_dict({**config.to_dict(), "model_bins_below": grid.bins_below,
                                "model_bins_above": grid.bins_above})


def mlp(n_in: int, widths: tuple[int, ...], n_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(n_in, width), nn.SiLU()]
        n_in = width
    return nn.Sequential(*layers, nn.Linear(n_in, n_out))


class DeepONetDecoder(nn.Module):
    """log f(E) = branch(z) . trunk(E)[:p] + trunk(E)[p]; with `fixed_basis` the trunk is a PCA basis."""

    def __init__(self, config: VAEConfig, fixed_basis: bool = False) -> None:
        super().__init__()
        self.branch = mlp(config.latent_dim, config.branch_widths, config.n_basis)
        if fixed_basis:
            self.trunk = None
            self.register_buffer("basis", torch.zeros(model_grid(config).n_bins, config.n_basis + 1))
        else:
            self.trunk = mlp(1 + 2 * config.trunk_frequencies, config.trunk_widths, config.n_basis + 1)
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(config.trunk_frequencies))

    def forward(self, z: torch.Tensor, energy_input: torch.Tensor) -> torch.Tensor:
        if self.trunk is None:
            templates = self.basis
        else:
            phase = energy_input[:, None] * self.frequencies
            templates = self.trunk(torch.cat([energy_input[:, None], phase.sin(), phase.cos()], dim=-1))
        return self.branch(z) @ templates[:, :-1].T + templates[:, -1]


class MLPDecoder(nn.Module):
    """Baseline: every model bin an independent output of an MLP of z (only on the training grid)."""

    def __init__(self, config: VAEConfig, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.net = mlp(config.latent_dim, widths, model_grid(config).n_bins)

    def forward(self, z: torch.Tensor, energy_input: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def matched_mlp_widths(config: VAEConfig) -> tuple[int, int]:
    """Two equal hidden widths giving an MLP decoder about as many parameters as the DeepONet decoder."""
    target = sum(p.numel() for p in DeepONetDecoder(config).parameters())
    # (L + 1) w + (w + 1) w + (w + 1) M = target, solved for w
    n_out = model_grid(config).n_bins
    b, c = config.latent_dim + 2 + n_out, n_out - target
    return (round((-b + math.sqrt(b * b - 4 * c)) / 2),) * 2


class VAE(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = mlp(config.n_bins, config.encoder_widths, 2 * config.latent_dim)
        if config.decoder == "mlp":
            self.decoder: nn.Module = MLPDecoder(config, matched_mlp_widths(config))
        else:
            self.decoder = DeepONetDecoder(config, fixed_basis=config.decoder == "pca_trunk")
        log_centres = np.log(model_grid(config).centres_kev)  # the decoder's M model bins
        self.register_buffer("log_energy", torch.tensor(log_centres, dtype=torch.float32))

    def scale_input(self, unfolded: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """asinh(x / (mean|x| * softening)): independent of the spectrum's overall scale, log-like for
        bright bins and linear (so negative net counts stay finite) for the faint ones. With the validity
        mask the mean runs over the valid bins and masked bins are 0, so how many bins a spectrum has
        masked does not rescale the others."""
        if valid is None:
            mean_abs = unfolded.abs().mean(dim=-1, keepdim=True)
        else:
            weight = valid.to(unfolded.dtype)
            unfolded = unfolded * weight
            mean_abs = unfolded.abs().sum(-1, keepdim=True) / weight.sum(-1, keepdim=True).clamp_min(1.0)
        return torch.asinh(unfolded / (mean_abs.clamp_min(1e-30) * self.config.input_softening))

    def encode(self, unfolded: torch.Tensor, valid: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(self.scale_input(unfolded, valid)).chunk(2, dim=-1)
        return mu, logvar.clamp(-20.0, 10.0)

    def decode(self, z: torch.Tensor, log_energy: torch.Tensor | None = None) -> torch.Tensor:
        """Positive photon flux density shape [N, E] at the given log-energies (default: the model grid)."""
        log_energy = self.log_energy if log_energy is None else log_energy
        lo, hi = math.log(self.config.e_min_kev), math.log(self.config.e_max_kev)
        log_flux = self.decoder(z, (2.0 * log_energy - (lo + hi)) / (hi - lo)).float()
        log_mean = torch.logsumexp(log_flux, dim=-1, keepdim=True) - math.log(log_flux.shape[-1])
        return torch.exp(log_flux - log_mean)

    def forward(self, unfolded: torch.Tensor, noise: torch.Tensor | None = None,
                valid: torch.Tensor | None = None):
        mu, logvar = self.encode(unfolded, valid)
        z = mu if noise is None else mu + noise * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def float32_tensor(array: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """A float32 tensor of a numpy array (copied only when needed: non-float32, strided or read-only)."""
    return torch.from_numpy(np.require(array, np.float32, ["C", "W"])).to(device)


@dataclass
class SpectraTensors:
    """A dataset's arrays on one device, ready for the loss; `take(index)` gives a batch."""

    unfolded: torch.Tensor  # [N, B]
    counts: torch.Tensor  # [N, B]
    background: torch.Tensor  # [N, B]
    exposure_width: torch.Tensor  # [N, M] area x exposure x model bin width, cm^2 s keV
    rmf_index: torch.Tensor  # [N] int64
    valid: torch.Tensor | None = None  # [N, B] 1 where the channel bin is fitted, 0 where masked

    def __post_init__(self) -> None:
        if self.valid is None:
            self.valid = torch.ones_like(self.counts)

    @classmethod
    def from_dataset(cls, dataset: Any, device: torch.device | str = "cpu") -> SpectraTensors:
        widths = dataset.model_grid.widths_kev.astype(np.float32)
        return cls(
            unfolded=float32_tensor(dataset.unfolded, device),
            counts=float32_tensor(dataset.counts, device),
            background=float32_tensor(dataset.background, device),
            exposure_width=float32_tensor(dataset.area_exposure * widths, device),
            rmf_index=torch.as_tensor(np.asarray(dataset.rmf_index, dtype=np.int64), device=device),
            valid=float32_tensor(dataset.valid, device),
        )

    def take(self, index: torch.Tensor) -> SpectraTensors:
        return SpectraTensors(*(t[index] for t in (self.unfolded, self.counts, self.background,
                                                   self.exposure_width, self.rmf_index, self.valid)))

    def __len__(self) -> int:
        return len(self.counts)


FOLD_ALL_MAX_RMFS = 16


def fold(flux: torch.Tensor, batch: SpectraTensors, rmf_matrices: torch.Tensor,
         gather_all: bool | None = None) -> torch.Tensor:
    """Source counts per channel bin [N, B] for flux density shapes [N, M]: area x exposure, then RMF.

    On an accelerator with few RMFs every spectrum is folded through all of them and the right one
    gathered (no data-dependent shapes or host syncs: good for torch.compile and CUDA graphs); on CPU,
    or with many RMFs, one matmul per RMF over its rows (measured 1.3-6x faster on CPU)."""
    incident = flux * batch.exposure_width
    n_rmf = rmf_matrices.shape[0]
    if gather_all is None:
        gather_all = incident.device.type != "cpu" and n_rmf <= FOLD_ALL_MAX_RMFS
    if gather_all:
        every = torch.einsum("nj,rkj->nrk", incident, rmf_matrices)
        return every.gather(1, batch.rmf_index[:, None, None].expand(-1, 1, every.shape[-1])).squeeze(1)
    out = incident.new_zeros(len(incident), rmf_matrices.shape[1])
    for r in torch.unique(batch.rmf_index).tolist():
        rows = batch.rmf_index == r
        out[rows] = incident[rows] @ rmf_matrices[r].T
    return out


@torch.no_grad()
def ml_normalisation(source: torch.Tensor, counts: torch.Tensor, background: torch.Tensor,
                     iterations: int = 20, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Poisson maximum-likelihood A [N, 1] for mu = A * source + background given the counts, over
    the valid bins only (all when `valid` is None).

    Without background the closed form sum(n) / sum(m); with it, EM fixed-point iterations
    A <- A * sum(n m / (A m + b)) / sum(m) from the net-count estimate. Detached: at the optimum
    d(loss)/dA = 0, so no gradient flows through A anyway."""
    if valid is not None:
        source, counts, background = source * valid, counts * valid, background * valid
    inverse_total = 1.0 / source.sum(-1, keepdim=True).clamp_min(1e-30)
    total_counts = counts.sum(-1, keepdim=True)
    net_counts = total_counts - background.sum(-1, keepdim=True)
    norm = net_counts.clamp_min(0.1 * total_counts + 1e-3) * inverse_total
    weighted = counts * source
    for _ in range(iterations):
        expected = torch.addcmul(background, norm, source).clamp_min(1e-30)
        norm = norm * (weighted / expected).sum(-1, keepdim=True) * inverse_total
    return norm.clamp_min(1e-30)


def expected_counts(flux: torch.Tensor, batch: SpectraTensors, rmf_matrices: torch.Tensor,
                    iterations: int = 20) -> torch.Tensor:
    with torch.autocast(device_type=flux.device.type, enabled=False):  # fold and likelihood in float32
        source = fold(flux.float(), batch, rmf_matrices)
        norm = ml_normalisation(source, batch.counts, batch.background, iterations, batch.valid)
        return (norm * source + batch.background).clamp_min(1e-30)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (1.0 + logvar - mu.square() - logvar.exp()).sum(-1)


def poisson_vae_loss(model: VAE, batch: SpectraTensors, rmf_matrices: torch.Tensor,
                     noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mean weighted Poisson half-deviance per spectrum, mean KL per spectrum); noise None: z = mu."""
    flux, mu, logvar = model(batch.unfolded, noise, batch.valid)
    expected = expected_counts(flux, batch, rmf_matrices, model.config.norm_iterations)
    return vae_loss(model.config, batch.counts, expected, mu, logvar, batch.valid)


def vae_loss(config: VAEConfig, counts: torch.Tensor, expected: torch.Tensor, mu: torch.Tensor,
             logvar: torch.Tensor, valid: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of `poisson_vae_loss` from already computed expected counts and posterior."""
    weights = likelihood_weights(counts if valid is None else counts * valid, config)
    nll = (weights * half_deviance(counts, expected, valid)).mean()
    kl = kl_divergence(mu.float(), logvar.float()).mean()
    return nll + config.beta * kl, nll, kl


def half_deviance(counts: torch.Tensor, expected: torch.Tensor, valid: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """sum_k (mu - n + n log(n / mu)) per spectrum over the valid bins: the Poisson NLL less its constant."""
    terms = expected - counts + torch.xlogy(counts, counts) - torch.xlogy(counts, expected)
    return (terms if valid is None else terms * valid).sum(-1)


def likelihood_weights(counts: torch.Tensor, config: VAEConfig) -> torch.Tensor:
    """Per-spectrum weight (reference / total counts) ** power of the Poisson term [N]."""
    total = counts.sum(-1).clamp_min(1.0)
    return (config.count_weight_reference / total) ** config.count_weight_power


def poisson_deviance_per_dof(counts: Any, mu: Any, n_fitted: int = 0, valid: Any = None) -> Any:
    """2 sum_k v_k (mu - n + n log(n / mu)) / (sum_k v_k - n_fitted) per spectrum, v the validity mask
    (all bins when None; dof at least 1); numpy or torch in, same out."""
    if isinstance(counts, torch.Tensor):
        valid = torch.ones_like(counts) if valid is None else torch.as_tensor(valid).to(counts)
        deviance = 2.0 * half_deviance(counts, mu, valid)
        return deviance / (valid.sum(-1) - n_fitted).clamp_min(1.0)
    counts, mu = np.asarray(counts, dtype=np.float64), np.asarray(mu, dtype=np.float64)
    valid = np.ones(counts.shape, dtype=bool) if valid is None else np.broadcast_to(np.asarray(valid, bool),
                                                                                   counts.shape)
    safe_counts = np.where(counts > 0, counts, 1.0)
    safe_mu = np.where(valid, mu, 1.0)
    log_ratio = np.where(counts > 0, counts * (np.log(safe_counts) - np.log(safe_mu)), 0.0)
    deviance = 2.0 * np.where(valid, safe_mu - counts + log_ratio, 0.0).sum(-1)
    return deviance / np.maximum(valid.sum(-1) - n_fitted, 1)
