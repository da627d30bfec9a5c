"""`xmm-pipeline train --spectra DIR --out DIR`: train the VAE on preprocessed spectra, outside Dagster."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EPOCH_HEADER = "  epoch   train loss     val loss   val deviance/dof"  # as loss_curve_summary's


def add_arguments(parser: argparse.ArgumentParser, name: str = "train") -> None:
    parser.add_argument("--spectra", required=True, type=Path,
                        help="folder written by `xmm-pipeline preprocess`")
    parser.add_argument("--out", required=True, type=Path, help="artifact folder (model.pt, model.json)")
    parser.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: TrainConfig)")
    parser.add_argument("--latent-dim", type=int, default=None, help="latent dimension (default 8)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--patience", type=int, default=None, help="early-stopping patience in epochs")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the loss step (CUDA only)")


def preprocessing_settings(spectra_dir: Path) -> dict[str, Any]:
    """What the spectra were made with: the Parquet metadata of one file and the selection summary."""
    import pyarrow.parquet as pq

    from xmm_pipeline.spectra.dataset import spectra_files

    settings: dict[str, Any] = {"spectra_dir": str(spectra_dir.resolve())}
    files = spectra_files(spectra_dir)
    if files:
        metadata = pq.read_schema(files[0]).metadata or {}
        for key, value in metadata.items():
            if not key.startswith(b"pandas") and not key.startswith(b"ARROW"):
                try:
                    settings[key.decode()] = json.loads(value)
                except ValueError:
                    settings[key.decode()] = value.decode(errors="replace")
    selection = spectra_dir / "selection.json"
    if selection.exists():
        settings["selection"] = json.loads(selection.read_text())
    return settings


def loss_curve_summary(history: list[dict[str, float]], n_points: int = 8) -> list[str]:
    evaluated = [row for row in history if "val_loss" in row]
    if not evaluated:
        return []
    picks = sorted({evaluated[round(i * (len(evaluated) - 1) / max(n_points - 1, 1))]["epoch"]
                    for i in range(n_points)})
    by_epoch = {row["epoch"]: row for row in evaluated}
    lines = ["  epoch   train loss     val loss   val deviance/dof"]
    lines += [f"  {e:5d} {by_epoch[e]['train_loss']:12.2f} {by_epoch[e]['val_loss']:12.2f} "
              f"{by_epoch[e]['val_deviance_per_dof']:18.3f}" for e in picks]
    return lines


def epoch_printer(progress: Callable[[int, int], None], max_epochs: int, first: int = 10,
                  every_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
    """`on_epoch_end` for train_model: each row to `progress`, and the loss table printed as it grows
    (the first `first` evaluated epochs, then one every `every_s` seconds, and the last)."""
    state = {"printed": 0, "last": -math.inf}

    def on_epoch_end(row: dict[str, float]) -> None:
        progress(int(row["epoch"]), max_epochs)
        now = clock()
        if "val_loss" not in row or not (state["printed"] < first or now - state["last"] >= every_s
                                         or row["epoch"] >= max_epochs):
            return
        lines = [EPOCH_HEADER] if state["printed"] == 0 else []
        lines.append(f"  {row['epoch']:5d} {row['train_loss']:12.2f} {row['val_loss']:12.2f} "
                     f"{row['val_deviance_per_dof']:18.3f}")
        note = getattr(progress, "note", None)
        for line in lines:
            if note is not None:
                note(line)
            else:
                print(line, flush=True)
        state["printed"] += 1
        state["last"] = now

    return on_epoch_end


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from xmm_pipeline.cli.paths import writable_folder
    from xmm_pipeline.errors import UserError
    from xmm_pipeline.model.train import TrainConfig, pick_device, train_model
    from xmm_pipeline.model.vae import VAE, VAEConfig, count_parameters
    from xmm_pipeline.progress import Progress
    from xmm_pipeline.spectra.dataset import load_dataset

    for option in ("epochs", "latent_dim", "batch_size", "patience"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UserError(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    if args.lr is not None and not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    writable_folder(args.out, "--out")
    device = pick_device(args.device)
    dataset = load_dataset(args.spectra)
    model_config = VAEConfig(n_bins=dataset.grid.n_bins, e_min_kev=dataset.grid.e_min_kev,
                             e_max_kev=dataset.grid.e_max_kev)
    if args.latent_dim is not None:
        model_config = replace(model_config, latent_dim=args.latent_dim)
    overrides = {"max_epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                 "patience": args.patience}
    defaults = TrainConfig(device=str(device), seed=args.seed, bf16=args.bf16, compile=args.compile)
    train_config = replace(defaults, **{k: v for k, v in overrides.items() if v is not None})
    print(f"training a VAE with {count_parameters(VAE(model_config)):,} parameters on {len(dataset)} spectra "
          f"({device}, up to {train_config.max_epochs} epochs)")
    with Progress("train", "epochs") as progress:
        result = train_model(dataset, args.out, model_config, train_config,
                             preprocessing=preprocessing_settings(args.spectra),
                             on_epoch_end=epoch_printer(progress, train_config.max_epochs))
    print("loss curve, sampled:")
    print("\n".join(loss_curve_summary(result.history)))
    if result.resumed_from_epoch:
        print(f"resumed from the checkpoint at epoch {result.resumed_from_epoch}")
    print(f"best epoch {result.best_epoch} of {len(result.history)}; model version {result.version}; "
          f"artifact in {result.artifact_dir}")
    return 0
