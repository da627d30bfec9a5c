"""Training and encoding throughput of the model (run on demand, not a test).

    .venv/bin/python benchmarks/bench_train.py [--spectra 2000] [--epochs 5] [--threads 1]

1. CPU training throughput (spectra / s per epoch) of the project's loop (the whole set as tensors,
   batches are index permutations) against a baseline loop with a standard torch DataLoader over
   per-spectrum tensors: same model, same loss, same batch size; the ratio.
2. CPU encoding throughput (spectra / s) of ModelArtifact.encode, as the embeddings use it.
3. Where CUDA exists: epochs on 100,000 synthetic spectra (batch 4096, optionally bf16 + compile) and
   the extrapolated time of the seed's 25,000-epoch schedule. Needs a GPU machine; skipped otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xmm_pipeline.model.train import TrainConfig, load_artifact, make_loss_step, make_optimizer, train_model
from xmm_pipeline.model.vae import VAE, SpectraTensors, VAEConfig, count_parameters
from xmm_pipeline_tests.model.synthetic import make_synthetic_dataset


class PerSpectrum(torch.utils.data.Dataset):
    """The baseline's view: one dict of tensors per spectrum, collated by the DataLoader."""

    def __init__(self, data: SpectraTensors) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        d = self.data
        return {"unfolded": d.unfolded[i], "counts": d.counts[i], "background": d.background[i],
                "exposure_width": d.exposure_width[i], "rmf_index": d.rmf_index[i]}


def seconds_per_epoch_tensors(model, loss_step, data: SpectraTensors, batch_size: int, epochs: int) -> float:
    optimizer = make_optimizer(model, TrainConfig())
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator).to(data.counts.device)
        for i in range(0, len(data), batch_size):
            index = order[i:i + batch_size]
            noise = torch.randn(len(index), model.config.latent_dim, device=data.counts.device)
            loss = loss_step(data.take(index), noise)[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    if data.counts.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / epochs


def seconds_per_epoch_dataloader(model, loss_step, data: SpectraTensors, batch_size: int,
                                 epochs: int) -> float:
    optimizer = make_optimizer(model, TrainConfig())
    loader = torch.utils.data.DataLoader(PerSpectrum(data), batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            tensors = SpectraTensors(batch["unfolded"], batch["counts"], batch["background"],
                                     batch["exposure_width"], batch["rmf_index"])
            noise = torch.randn(len(tensors), model.config.latent_dim)
            loss = loss_step(tensors, noise)[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return (time.perf_counter() - start) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spectra", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[TrainConfig().batch_size, 1024])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu-spectra", type=int, default=100_000)
    parser.add_argument("--gpu-batch-size", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dataset = make_synthetic_dataset(args.spectra, seed=0)
    data = SpectraTensors.from_dataset(dataset)
    matrices = torch.as_tensor(dataset.rmf_matrices)
    torch.manual_seed(0)
    model = VAE(VAEConfig())
    print(f"model: {count_parameters(model):,} parameters; {args.spectra} synthetic spectra; "
          f"{args.threads} thread(s); torch {torch.__version__}")
    step = make_loss_step(model, matrices, bf16=False, compiled=False)
    seconds_per_epoch_tensors(model, step, data, 64, 1)  # warm-up
    rates = {}
    for batch_size in args.batch_sizes:
        ours = baseline = math.inf
        for _ in range(args.rounds):  # interleaved, best of each: the machine is shared
            ours = min(ours, seconds_per_epoch_tensors(model, step, data, batch_size, args.epochs))
            baseline = min(baseline, seconds_per_epoch_dataloader(model, step, data, batch_size, args.epochs))
        rates[batch_size] = (args.spectra / ours, args.spectra / baseline)
        print(f"train CPU, batch {batch_size}: tensors + index permutations {rates[batch_size][0]:,.0f} "
              f"spectra/s per epoch; DataLoader over per-spectrum tensors {rates[batch_size][1]:,.0f}; "
              f"ratio {baseline / ours:.2f}x")

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(max_epochs=args.epochs, num_threads=args.threads, patience=10**6)
        result = train_model(dataset, tmp, VAEConfig(), config)
        n_train = len(dataset) * (1 - config.val_fraction)
        seconds = np.median([row["seconds"] for row in result.history])
        print(f"train_model end to end (incl. validation each epoch): ~{n_train / seconds:,.0f} "
              "spectra/s per epoch")
        artifact = load_artifact(tmp)
        artifact.encode(dataset)
        start = time.perf_counter()
        repeats = 5
        for _ in range(repeats):
            artifact.encode(dataset)
        encode_rate = repeats * len(dataset) / (time.perf_counter() - start)
        print(f"encode CPU: {encode_rate:,.0f} spectra/s")

    result_fields = " ".join(f"batch{b}_spectra_per_s={ours:.0f} batch{b}_dataloader={base:.0f} "
                             f"batch{b}_ratio={ours / base:.2f}" for b, (ours, base) in rates.items())
    if not torch.cuda.is_available():
        print("GPU: no CUDA device here; the 100,000-spectra / 25,000-epoch timing needs a GPU machine")
        print(f"RESULT bench_train {result_fields} encode_spectra_per_s={encode_rate:.0f}")
        return
    device = torch.device("cuda")
    big = make_synthetic_dataset(args.gpu_spectra, seed=1)
    gpu_data = SpectraTensors.from_dataset(big, device)
    gpu_matrices = torch.as_tensor(big.rmf_matrices, device=device)
    timings = {}
    for label, bf16, compiled in (("float32 eager", False, False), ("bf16 + compile", True, True)):
        torch.manual_seed(0)
        gpu_model = VAE(VAEConfig()).to(device)
        gpu_step = make_loss_step(gpu_model, gpu_matrices, bf16, compiled)
        seconds_per_epoch_tensors(gpu_model, gpu_step, gpu_data, args.gpu_batch_size, 2)  # warm-up, compile
        timings[label] = seconds_per_epoch_tensors(gpu_model, gpu_step, gpu_data, args.gpu_batch_size, 5)
        print(f"GPU {torch.cuda.get_device_name()} {label}: {timings[label]:.3f} s/epoch on "
              f"{args.gpu_spectra:,} spectra; 25,000 epochs ~ {25_000 * timings[label] / 60:.1f} min")
    print(f"RESULT bench_train {result_fields} encode_spectra_per_s={encode_rate:.0f} "
          + " ".join(f"gpu_{k.replace(' ', '_')}_s_per_epoch={v:.3f}" for k, v in timings.items()))


if __name__ == "__main__":
    main()
