"""Training: device choice, the split, a real (tiny) run, the artifact, determinism, kill and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from xmm_pipeline.errors import UserError
from xmm_pipeline.model.train import (
    CHECKPOINT_FILE,
    TrainConfig,
    check_fast_paths,
    load_artifact,
    pick_device,
    split_by_source,
    train_model,
)
from xmm_pipeline.model.vae import VAE, SpectraTensors, VAEConfig
from xmm_pipeline_tests.model.synthetic import make_synthetic_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = VAEConfig(encoder_widths=(48, 24), branch_widths=(24,), trunk_widths=(24, 24), n_basis=12)
QUICK = TrainConfig(max_epochs=30, batch_size=32, lr=3e-3, patience=1000, checkpoint_every=10, seed=7,
                    num_threads=1)


@pytest.fixture(scope="module")
def dataset():
    return make_synthetic_dataset(120, seed=11)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("tiny_model")
    return train_model(dataset, out, TINY, QUICK)


def test_auto_device_is_cpu_without_accelerators() -> None:
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("an accelerator is present; 'auto' picks it")
    assert pick_device("auto").type == "cpu"
    assert pick_device("cpu").type == "cpu"
    with pytest.raises(UserError, match="CUDA is not available"):
        pick_device("cuda")
    with pytest.raises(UserError, match="gpu7"):
        pick_device("gpu7")


def test_split_keeps_each_source_on_one_side() -> None:
    srcid = np.repeat(np.arange(100), np.random.default_rng(0).integers(1, 4, 100))
    train_rows, val_rows = split_by_source(srcid, 0.2, seed=3)
    assert not set(srcid[train_rows]) & set(srcid[val_rows])
    assert sorted(np.concatenate([train_rows, val_rows])) == list(range(len(srcid)))
    assert len(set(srcid[val_rows])) == 20
    again = split_by_source(srcid, 0.2, seed=3)
    assert np.array_equal(again[1], val_rows)
    assert not np.array_equal(split_by_source(srcid, 0.2, seed=4)[1], val_rows)
    with pytest.raises(UserError, match="val_fraction"):
        split_by_source(srcid, 1.0, seed=0)


def test_training_learns_and_writes_a_loadable_artifact(trained, dataset) -> None:
    history = trained.history
    assert len(history) == QUICK.max_epochs
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert min(r["val_deviance_per_dof"] for r in history) < 0.6 * history[0]["val_deviance_per_dof"]
    description = json.loads((trained.artifact_dir / "model.json").read_text())
    assert description["vae_config"]["n_basis"] == 12 and description["train_config"]["seed"] == 7
    assert description["grid"] == {"e_min_kev": 0.3, "e_max_kev": 10.0, "n_bins": 238}
    assert description["version"] == trained.version and len(trained.version) == 16
    assert description["history_summary"]["best_epoch"] == trained.best_epoch

    artifact = load_artifact(trained.artifact_dir)
    assert artifact.version == trained.version and artifact.n_parameters == trained.n_parameters
    mu, logvar = artifact.encode(dataset)
    assert mu.shape == logvar.shape == (len(dataset), artifact.config.latent_dim)
    expected = artifact.reconstruct(dataset)
    assert expected.shape == dataset.counts.shape and (expected > 0).all()
    # ML normalisation: rescaling the source part either way only lowers the Poisson likelihood
    source = expected - dataset.background

    def nll(scale: float) -> np.ndarray:
        mu = scale * source + dataset.background
        return (mu - dataset.counts * np.log(mu)).sum(1)

    assert (nll(1.01) > nll(1.0)).all() and (nll(0.99) > nll(1.0)).all()
    deviance = artifact.deviance_per_dof(dataset)
    assert deviance.shape == (len(dataset),) and np.isfinite(deviance).all()
    shapes = artifact.decode_latent(mu[:3])
    assert shapes.shape == (3, 238) and (shapes > 0).all()
    assert artifact.decode_latent(mu[:3], np.geomspace(0.1, 12, 40)).shape == (3, 40)


def test_same_seed_same_model_and_a_finished_run_does_no_work(trained, dataset, tmp_path: Path) -> None:
    again = train_model(dataset, tmp_path, TINY, QUICK)
    assert again.version == trained.version
    weights = trained.artifact_dir / "model.pt"
    before = weights.stat().st_mtime_ns
    rerun = train_model(dataset, trained.artifact_dir, TINY, QUICK)
    assert rerun.version == trained.version and weights.stat().st_mtime_ns == before
    other_threads = TrainConfig.from_dict({**QUICK.to_dict(), "num_threads": 2, "checkpoint_every": 5})
    assert train_model(dataset, trained.artifact_dir, TINY, other_threads).version == trained.version
    assert weights.stat().st_mtime_ns == before


def test_killed_run_resumes_to_the_uninterrupted_result(dataset, tmp_path: Path) -> None:
    """SIGKILL at epoch 13 (after the epoch-10 checkpoint), resume, compare with a clean run."""
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    script = textwrap.dedent(f"""
        import os, signal
        from xmm_pipeline.model.train import TrainConfig, train_model
        from xmm_pipeline_tests.model.test_train import TINY, QUICK
        from xmm_pipeline_tests.model.synthetic import make_synthetic_dataset

        def die(row):
            if row["epoch"] == 13:
                os.kill(os.getpid(), signal.SIGKILL)

        train_model(make_synthetic_dataset(120, seed=11), {str(killed_dir)!r}, TINY, QUICK, on_epoch_end=die)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT, capture_output=True,
                             timeout=120)
    assert process.returncode == -9, process.stderr.decode()[-2000:]
    assert (killed_dir / CHECKPOINT_FILE).exists() and not (killed_dir / "model.pt").exists()

    resumed = train_model(dataset, killed_dir, TINY, QUICK)
    clean = train_model(dataset, clean_dir, TINY, QUICK)
    assert resumed.resumed_from_epoch == 10 and clean.resumed_from_epoch == 0
    for name, value in clean.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-6, atol=1e-7)
    clean_losses = [r["train_loss"] for r in clean.history]
    assert [r["train_loss"] for r in resumed.history] == pytest.approx(clean_losses)


def test_early_stopping_stops_and_keeps_the_best(dataset, tmp_path: Path) -> None:
    config = TrainConfig(max_epochs=400, batch_size=32, lr=3e-3, patience=5, seed=1, num_threads=1)
    result = train_model(dataset, tmp_path, TINY, config)
    assert len(result.history) < 400
    assert len(result.history) - result.best_epoch >= 5
    best = min(r["val_loss"] for r in result.history)
    assert next(r for r in result.history if r["epoch"] == result.best_epoch)["val_loss"] == best


def test_bad_data_and_bad_artifacts_are_clear_errors(dataset, tmp_path: Path) -> None:
    broken = dataset.subset(np.arange(10))
    broken.unfolded = broken.unfolded.copy()
    broken.unfolded[3, 5] = np.nan
    with pytest.raises(UserError, match=r"unfolded .*rows \[3\]"):
        train_model(broken, tmp_path / "m", TINY, QUICK)
    with pytest.raises(UserError, match="bins"):
        train_model(dataset, tmp_path / "m", VAEConfig(n_bins=100), QUICK)
    with pytest.raises(UserError, match="no trained model"):
        load_artifact(tmp_path / "nothing")


def test_bf16_autocast_keeps_the_fold_in_float32_and_the_loss_within_one_percent(dataset) -> None:
    """The same check training runs on CUDA, here with CPU bf16 autocast (the CUDA-only switch aside)."""
    torch.manual_seed(0)
    model = VAE(VAEConfig())
    data = SpectraTensors.from_dataset(dataset)
    changes = check_fast_paths(model, data, torch.as_tensor(dataset.rmf_matrices), bf16=True, compiled=False)
    assert set(changes) == {"bf16"} and 0 < changes["bf16"] < 1e-2, changes


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="bf16 autocast and torch.compile are CUDA-only paths; no CUDA device here")
def test_cuda_fast_paths_change_the_loss_by_less_than_one_percent(dataset) -> None:
    device = torch.device("cuda")
    model = VAE(VAEConfig()).to(device)
    data = SpectraTensors.from_dataset(dataset, device)
    matrices = torch.as_tensor(dataset.rmf_matrices, device=device)
    changes = check_fast_paths(model, data, matrices, bf16=True, compiled=True)
    assert set(changes) == {"bf16", "compile"}
    assert all(change < 1e-2 for change in changes.values()), changes
