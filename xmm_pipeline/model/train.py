"""Training: device choice, the split by source, a resumable loop, and the model artifact.

The whole training set lives on the device as tensors and batches are index permutations (no
DataLoader). Every `checkpoint_every` epochs, and at the end, `out_dir/checkpoint.pt` is written
atomically with the weights, optimizer, early-stopping state and RNG states, so a killed run resumes
from the last checkpoint and ends bit-identical (on CPU) to an uninterrupted one. The artifact is

    out_dir/model.pt      state dict of the best-validation weights (torch.load(weights_only=True))
    out_dir/model.json    VAEConfig, TrainConfig, grid, model_grid, preprocessing settings, n_parameters,
                          history summary, version (sha256 of weights + configs), fingerprint
    out_dir/history.json  the per-epoch loss curve
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmm_pipeline.errors import UserError
from xmm_pipeline.model.vae import (
    VAE,
    SpectraTensors,
    VAEConfig,
    channel_grid,
    count_parameters,
    expected_counts,
    float32_tensor,
    model_grid,
    poisson_deviance_per_dof,
    poisson_vae_loss,
    vae_loss,
    with_model_grid,
)
from xmm_pipeline.spectra.dataset import SpectralDataset
from xmm_pipeline.spectra.grid import EnergyGrid, ModelGrid
from xmm_pipeline.storage import atomic_path, sha256_json, write_json_atomic

log = logging.getLogger(__name__)

MODEL_FILE, CONFIG_FILE, HISTORY_FILE = "model.pt", "model.json", "history.json"
CHECKPOINT_FILE = "checkpoint.pt"
FAST_PATH_TOLERANCE = 1e-2
NOT_FINGERPRINTED = ("device", "num_threads", "checkpoint_every")  # settings that do not change the model


@dataclass(frozen=True)
class TrainConfig:
    max_epochs: int = 600  # the seed's full schedule is 25_000 (GPU)
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-4
    beta: float | None = None  # overrides VAEConfig.beta when set
    patience: int = 40  # epochs without a validation improvement before stopping
    min_delta: float = 1e-4  # relative improvement that counts
    eval_every: int = 1
    checkpoint_every: int = 25
    val_fraction: float = 0.15
    seed: int = 0
    device: str = "auto"
    bf16: bool = False  # CUDA only: bf16 autocast of the networks (fold and loss stay float32)
    compile: bool = False  # CUDA only: torch.compile of the loss step
    compile_mode: str = "default"  # torch.compile mode, e.g. "reduce-overhead" (CUDA graphs)
    num_threads: int | None = None  # CPU threads for torch (None: torch's default)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class TrainResult:
    artifact_dir: Path
    history: list[dict[str, float]]
    best_epoch: int
    n_parameters: int
    version: str
    resumed_from_epoch: int = 0
    model: VAE | None = field(default=None, repr=False)


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU for 'auto'; an explicit device must exist."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise UserError(f"device {requested!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {requested!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {requested!r} requested but Apple MPS is not available")
    return device


def split_by_source(srcid: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): whole sources go to one side, about val_fraction of them to val."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    srcid = np.asarray(srcid)
    sources = np.unique(srcid)
    n_val = 0 if val_fraction == 0 else min(max(1, round(val_fraction * len(sources))), len(sources) - 1)
    val_sources = np.random.default_rng(seed).permutation(sources)[:n_val]
    is_val = np.isin(srcid, val_sources)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def dataset_fingerprint(dataset: SpectralDataset) -> str:
    digest = hashlib.sha256()
    for array in (dataset.counts, dataset.background, dataset.area_exposure, dataset.unfolded,
                  dataset.rmf_index, dataset.rmf_matrices, source_ids(dataset), dataset.valid):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps(asdict(dataset.grid)).encode())
    digest.update(json.dumps(dataset.model_grid.to_dict()).encode())
    return digest.hexdigest()


def source_ids(dataset: SpectralDataset) -> np.ndarray:
    if "srcid" in dataset.meta.columns:
        return dataset.meta["srcid"].to_numpy()
    return np.arange(len(dataset))


def state_dict_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_dataset(dataset: SpectralDataset, config: VAEConfig) -> None:
    if len(dataset) < 2:
        raise UserError(f"training needs at least 2 spectra, got {len(dataset)}")
    if dataset.grid != channel_grid(config):
        raise UserError(f"dataset grid {dataset.grid} differs from the model's {channel_grid(config)}")
    if dataset.model_grid != model_grid(config):
        raise UserError(f"dataset model grid {dataset.model_grid} differs from the model's "
                        f"{model_grid(config)}")
    for name in ("counts", "background", "area_exposure", "unfolded"):
        values = getattr(dataset, name)
        if not np.isfinite(values).all():
            rows = np.flatnonzero(~np.isfinite(values).all(axis=1))[:5]
            raise UserError(f"dataset column {name} has non-finite values in rows {rows.tolist()}")
    if (dataset.counts < 0).any() or (dataset.area_exposure < 0).any():
        raise UserError("dataset has negative counts or negative area x exposure")
    if dataset.rmf_index.min() < 0 or dataset.rmf_index.max() >= len(dataset.rmf_matrices):
        raise UserError("dataset rmf_index points outside rmf_matrices")


@contextlib.contextmanager
def torch_threads(num_threads: int | None):
    previous = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_loss_step(model: VAE, rmf_matrices: torch.Tensor, bf16: bool, compiled: bool,
                   compile_mode: str = "default") -> Callable:
    """loss(batch, noise) -> (loss, nll, kl), optionally under bf16 autocast and torch.compile."""

    def step(batch: SpectraTensors, noise: torch.Tensor | None):
        with torch.autocast(device_type=rmf_matrices.device.type, dtype=torch.bfloat16, enabled=bf16):
            return poisson_vae_loss(model, batch, rmf_matrices, noise)

    return torch.compile(step, mode=compile_mode) if compiled else step


def check_fast_paths(model: VAE, data: SpectraTensors, rmf_matrices: torch.Tensor, bf16: bool,
                     compiled: bool, n_check: int = 512) -> dict[str, float]:
    """Relative change of the (noise-free) loss that bf16 autocast / torch.compile cause on a batch."""
    batch = data.take(torch.arange(min(n_check, len(data)), device=data.counts.device))
    with torch.no_grad():
        reference = make_loss_step(model, rmf_matrices, False, False)(batch, None)[0].item()
        changes = {}
        if bf16:
            changes["bf16"] = abs(make_loss_step(model, rmf_matrices, True, False)(batch, None)[0].item()
                                  - reference) / abs(reference)
        if compiled:
            changes["compile"] = abs(make_loss_step(model, rmf_matrices, False, True)(batch, None)[0].item()
                                     - reference) / abs(reference)
    return changes


@torch.no_grad()
def evaluate_loss(model: VAE, data: SpectraTensors, rmf_matrices: torch.Tensor, chunk: int = 8192
                  ) -> tuple[float, float]:
    """(mean noise-free loss, mean deviance per dof) over a whole tensor set."""
    model.eval()
    loss_sum, deviance_sum = 0.0, 0.0
    for start in range(0, len(data), chunk):
        batch = data.take(torch.arange(start, min(start + chunk, len(data)), device=data.counts.device))
        flux, z_mean, logvar = model(batch.unfolded, valid=batch.valid)
        expected = expected_counts(flux, batch, rmf_matrices, model.config.norm_iterations)
        loss, _, _ = vae_loss(model.config, batch.counts, expected, z_mean, logvar, batch.valid)
        loss_sum += loss.item() * len(batch)
        deviance = poisson_deviance_per_dof(batch.counts, expected, model.config.latent_dim + 1, batch.valid)
        deviance_sum += deviance.sum().item()
    model.train()
    return loss_sum / len(data), deviance_sum / len(data)


def make_optimizer(model: VAE, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where the device supports it (5x faster on CPU)."""
    settings = {"lr": config.lr, "weight_decay": config.weight_decay}
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **settings)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(model.parameters(), **settings)


def _generators(device: torch.device, seed: int) -> tuple[torch.Generator, torch.Generator]:
    permutation = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed(seed + 1)
    return permutation, noise


def train_model(
    dataset: SpectralDataset,
    out_dir: str | Path,
    model_config: VAEConfig | None = None,
    train_config: TrainConfig | None = None,
    *,
    preprocessing: dict[str, Any] | None = None,
    model: VAE | None = None,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train (or resume, or find already trained) a VAE on `dataset` and write the artifact to out_dir.

    `model` replaces the freshly initialised VAE (the baselines pass a prepared one); `on_epoch_end`
    receives each history row (progress reporting). A fresh model takes its model grid from the dataset
    (VAEConfig.model_bins_below/above)."""
    model_config = model.config if model is not None else (model_config or VAEConfig())
    if model is None:
        model_config = with_model_grid(model_config, dataset.model_grid)
    train_config = train_config or TrainConfig()
    if train_config.beta is not None:
        model_config = VAEConfig.from_dict({**model_config.to_dict(), "beta": train_config.beta})
    check_dataset(dataset, model_config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = sha256_json({"data": dataset_fingerprint(dataset), "model": model_config.to_dict(),
                               "train": {k: v for k, v in train_config.to_dict().items()
                                         if k not in NOT_FINGERPRINTED},
                               "init": None if model is None else state_dict_hash(model.state_dict())})
    finished = _finished_result(out, fingerprint)
    if finished is not None:
        log.info("model in %s already trained with these inputs; nothing to do", out)
        return finished

    device = pick_device(train_config.device)
    with torch_threads(train_config.num_threads):
        return _train(dataset, out, model_config, train_config, device, fingerprint, preprocessing or {},
                      model, on_epoch_end)


def _train(dataset: SpectralDataset, out: Path, model_config: VAEConfig, train_config: TrainConfig,
           device: torch.device, fingerprint: str, preprocessing: dict[str, Any], model: VAE | None,
           on_epoch_end: Callable[[dict[str, float]], None] | None) -> TrainResult:
    train_rows, val_rows = split_by_source(source_ids(dataset), train_config.val_fraction, train_config.seed)
    data = SpectraTensors.from_dataset(dataset, device)
    train_data = data.take(torch.as_tensor(train_rows, device=device))
    val_data = data.take(torch.as_tensor(val_rows, device=device)) if len(val_rows) else None
    del data  # the two parts are copies; keep device memory at one copy of the set
    rmf_matrices = float32_tensor(dataset.rmf_matrices, device)

    torch.manual_seed(train_config.seed)
    if model is None:
        model = VAE(model_config)
    model.config = model_config
    model = model.to(device)
    optimizer = make_optimizer(model, train_config)
    permutation_gen, noise_gen = generators = _generators(device, train_config.seed)

    fast = device.type == "cuda"
    bf16, compiled = train_config.bf16 and fast, train_config.compile and fast
    if (train_config.bf16 or train_config.compile) and not fast:
        log.warning("bf16/compile are CUDA-only switches; training in float32 eager on %s", device)
    if bf16 or compiled:
        changes = check_fast_paths(model, train_data, rmf_matrices, bf16, compiled)
        log.info("fast-path loss changes: %s", changes)
        if any(change >= FAST_PATH_TOLERANCE for change in changes.values()):
            log.warning("fast paths change the loss by %s >= %g; training in float32 eager", changes,
                        FAST_PATH_TOLERANCE)
            bf16 = compiled = False
    loss_step = make_loss_step(model, rmf_matrices, bf16, compiled, train_config.compile_mode)

    state = {"epoch": 0, "best_val": math.inf, "best_epoch": 0, "bad_epochs": 0, "history": [],
             "stopped": False,
             "best_model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    resumed_from = _resume(out / CHECKPOINT_FILE, fingerprint, model, optimizer, permutation_gen, noise_gen,
                           state, device)
    n_parameters = count_parameters(model)
    log.info("training %d parameters on %s: %d train / %d val spectra", n_parameters, device,
             len(train_rows), len(val_rows))

    n_train, batch_size = len(train_data), min(train_config.batch_size, len(train_data))
    while state["epoch"] < train_config.max_epochs and not state["stopped"]:
        epoch_start = time.perf_counter()
        order = torch.randperm(n_train, generator=permutation_gen).to(device)
        loss_sum = torch.zeros((), device=device)
        for start in range(0, n_train, batch_size):
            index = order[start:start + batch_size]
            noise = torch.randn(len(index), model_config.latent_dim, generator=noise_gen, device=device)
            loss, _, _ = loss_step(train_data.take(index), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(index)
        state["epoch"] += 1
        epoch = state["epoch"]
        row = {"epoch": epoch, "train_loss": loss_sum.item() / n_train}
        if epoch % train_config.eval_every == 0 or epoch == train_config.max_epochs:
            monitored_data = val_data if val_data is not None else train_data
            row["val_loss"], row["val_deviance_per_dof"] = evaluate_loss(model, monitored_data, rmf_matrices)
            state["stopped"] = _update_early_stopping(state, row["val_loss"], model, train_config)
        row["seconds"] = time.perf_counter() - epoch_start
        state["history"].append(row)
        if on_epoch_end is not None:
            on_epoch_end(row)
        if epoch % train_config.checkpoint_every == 0 and not state["stopped"]:
            _save_checkpoint(out / CHECKPOINT_FILE, fingerprint, model, optimizer, generators, state)
    _save_checkpoint(out / CHECKPOINT_FILE, fingerprint, model, optimizer, generators, state)

    model.load_state_dict(state["best_model"])
    model = model.cpu().eval()
    version = _write_artifact(out, model, model_config, train_config, dataset.grid, dataset.model_grid,
                              preprocessing, state, n_parameters, fingerprint, len(train_rows), len(val_rows),
                              str(device))
    return TrainResult(out, state["history"], state["best_epoch"], n_parameters, version, resumed_from, model)


def _update_early_stopping(state: dict[str, Any], val_loss: float, model: VAE, config: TrainConfig) -> bool:
    if not math.isfinite(val_loss):
        raise RuntimeError(f"validation loss became {val_loss} at epoch {state['epoch']}")
    if val_loss < state["best_val"] - config.min_delta * abs(state["best_val"]) or state["best_epoch"] == 0:
        state.update(best_val=val_loss, best_epoch=state["epoch"], bad_epochs=0,
                     best_model={k: v.detach().clone() for k, v in model.state_dict().items()})
        return False
    state["bad_epochs"] += config.eval_every
    return state["bad_epochs"] >= config.patience


def _save_checkpoint(path: Path, fingerprint: str, model: VAE, optimizer: torch.optim.Optimizer,
                     generators: tuple[torch.Generator, torch.Generator], state: dict[str, Any]) -> None:
    permutation_gen, noise_gen = generators
    payload = {"fingerprint": fingerprint, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "permutation_rng": permutation_gen.get_state(), "noise_rng": noise_gen.get_state(), **state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _resume(path: Path, fingerprint: str, model: VAE, optimizer: torch.optim.Optimizer,
            permutation_gen: torch.Generator, noise_gen: torch.Generator, state: dict[str, Any],
            device: torch.device) -> int:
    if not path.exists():
        return 0
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    if checkpoint.get("fingerprint") != fingerprint:
        log.warning("%s is from other data or settings; starting afresh", path)
        return 0
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    permutation_gen.set_state(checkpoint["permutation_rng"].cpu())
    noise_gen.set_state(checkpoint["noise_rng"].cpu())
    for key in state:
        state[key] = checkpoint[key]
    log.info("resumed from %s at epoch %d", path, state["epoch"])
    return int(state["epoch"])


def _history_summary(history: list[dict[str, float]], best_epoch: int) -> dict[str, Any]:
    evaluated = [row for row in history if "val_loss" in row]
    best = next((row for row in evaluated if row["epoch"] == best_epoch), evaluated[-1] if evaluated else {})
    return {"epochs_run": len(history), "best_epoch": best_epoch,
            "first_train_loss": history[0]["train_loss"] if history else None,
            "final_train_loss": history[-1]["train_loss"] if history else None,
            "best_val_loss": best.get("val_loss"),
            "best_val_deviance_per_dof": best.get("val_deviance_per_dof"),
            "seconds": sum(row["seconds"] for row in history)}


def _write_artifact(out: Path, model: VAE, model_config: VAEConfig, train_config: TrainConfig,
                    grid: EnergyGrid, grid_of_model: ModelGrid, preprocessing: dict[str, Any],
                    state: dict[str, Any], n_parameters: int, fingerprint: str, n_train: int, n_val: int,
                    device: str) -> str:
    state_dict = model.state_dict()
    description = {"vae_config": model_config.to_dict(), "train_config": train_config.to_dict(),
                   "grid": asdict(grid), "model_grid": grid_of_model.to_dict(),
                   "preprocessing": preprocessing}
    version = sha256_json({"weights": state_dict_hash(state_dict), **description})[:16]
    with atomic_path(out / MODEL_FILE) as tmp:
        torch.save(state_dict, tmp)
    write_json_atomic(out / HISTORY_FILE, state["history"])
    write_json_atomic(out / CONFIG_FILE, {
        **description, "n_parameters": n_parameters, "version": version, "fingerprint": fingerprint,
        "history_summary": _history_summary(state["history"], state["best_epoch"]),
        "split": {"n_train": n_train, "n_val": n_val, "by": "srcid"}, "trained_on": device,
        "torch_version": torch.__version__,
    })
    return version


def _finished_result(out: Path, fingerprint: str) -> TrainResult | None:
    config_path, weights_path = out / CONFIG_FILE, out / MODEL_FILE
    if not (config_path.exists() and weights_path.exists()):
        return None
    description = json.loads(config_path.read_text())
    if description.get("fingerprint") != fingerprint:
        return None
    history_path = out / HISTORY_FILE
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    return TrainResult(out, history, int(description["history_summary"]["best_epoch"]),
                       int(description["n_parameters"]), str(description["version"]))


class ModelArtifact:
    """A trained model read back from its artifact folder, with numpy in and out (CPU by default)."""

    def __init__(self, artifact_dir: str | Path, device: str = "cpu", chunk: int = 4096) -> None:
        self.artifact_dir = Path(artifact_dir)
        config_path, weights_path = self.artifact_dir / CONFIG_FILE, self.artifact_dir / MODEL_FILE
        if not (config_path.exists() and weights_path.exists()):
            raise UserError(f"{self.artifact_dir}: no trained model here ({CONFIG_FILE}, {MODEL_FILE})")
        self.description: dict[str, Any] = json.loads(config_path.read_text())
        self.config = VAEConfig.from_dict(self.description["vae_config"])
        self.train_config = TrainConfig.from_dict(self.description["train_config"])
        self.grid = EnergyGrid(**self.description["grid"])
        self.model_grid = model_grid(self.config)
        self.preprocessing: dict[str, Any] = self.description.get("preprocessing", {})
        self.version: str = self.description["version"]
        self.n_parameters: int = int(self.description["n_parameters"])
        self.device = pick_device(device)
        self.chunk = chunk
        self.model = VAE(self.config)
        self.model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        self.model = self.model.to(self.device).eval()

    def _check(self, dataset: SpectralDataset) -> None:
        if dataset.grid != self.grid:
            raise UserError(f"dataset grid {dataset.grid} differs from the model's {self.grid} "
                            f"({self.artifact_dir})")
        if dataset.model_grid != self.model_grid:
            ours, theirs = self.model_grid, dataset.model_grid
            raise UserError(f"dataset model grid ({theirs.n_bins} bins, {theirs.e_min_kev:.3g}-"
                            f"{theirs.e_max_kev:.3g} keV) differs from the model's ({ours.n_bins} bins) in "
                            f"{self.artifact_dir}: preprocess and train with the same version")

    def _chunks(self, dataset: SpectralDataset):
        data = SpectraTensors.from_dataset(dataset, self.device)
        for start in range(0, len(dataset), self.chunk):
            yield data.take(torch.arange(start, min(start + self.chunk, len(dataset)), device=self.device))

    @torch.no_grad()
    def encode(self, dataset: SpectralDataset) -> tuple[np.ndarray, np.ndarray]:
        """Latent mean and log-variance [N, latent_dim] of each spectrum."""
        self._check(dataset)
        parts = [self.model.encode(batch.unfolded, batch.valid) for batch in self._chunks(dataset)]
        return (np.concatenate([p[0].cpu().numpy() for p in parts]).reshape(-1, self.config.latent_dim),
                np.concatenate([p[1].cpu().numpy() for p in parts]).reshape(-1, self.config.latent_dim))

    @torch.no_grad()
    def reconstruct(self, dataset: SpectralDataset) -> np.ndarray:
        """Expected counts [N, B] of the decoded latent mean: folded, background added, ML-normalised."""
        self._check(dataset)
        rmf_matrices = float32_tensor(dataset.rmf_matrices, self.device)
        out = []
        for batch in self._chunks(dataset):
            flux = self.model.decode(self.model.encode(batch.unfolded, batch.valid)[0])
            out.append(expected_counts(flux, batch, rmf_matrices, self.config.norm_iterations).cpu().numpy())
        return np.concatenate(out).reshape(len(dataset), -1)

    def deviance_per_dof(self, dataset: SpectralDataset, expected: np.ndarray | None = None) -> np.ndarray:
        """Poisson deviance per degree of freedom [N] over the valid bins (dof = valid bins - latent_dim
        - 1 for the normalisation); pass `expected` from `reconstruct` when it is at hand, to decode once."""
        expected = self.reconstruct(dataset) if expected is None else expected
        return poisson_deviance_per_dof(dataset.counts, expected, self.config.latent_dim + 1, dataset.valid)

    @torch.no_grad()
    def decode_latent(self, z: np.ndarray, energy_kev: np.ndarray | None = None) -> np.ndarray:
        """Photon flux density shapes [N, E] (unit mean) of latent points, on the model grid (E = M bins,
        `self.model_grid.centres_kev`) or at the given energies."""
        z_tensor = torch.as_tensor(np.atleast_2d(np.asarray(z, dtype=np.float32)), device=self.device)
        log_energy = None if energy_kev is None else torch.as_tensor(
            np.log(np.asarray(energy_kev, dtype=np.float32)), device=self.device)
        if log_energy is not None and self.config.decoder == "mlp":
            raise UserError("an MLP decoder is defined on the training grid only")
        return self.model.decode(z_tensor, log_energy).cpu().numpy()


def load_artifact(artifact_dir: str | Path, device: str = "cpu") -> ModelArtifact:
    return ModelArtifact(artifact_dir, device)
