"""`xmm-pipeline train`: trains from a spectra folder, prints the size and the loss curve, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xmm_pipeline.cli import main
from xmm_pipeline.spectra.dataset import load_dataset
from xmm_pipeline_tests.model.synthetic import make_synthetic_dataset, write_spectra_dir


@pytest.fixture(scope="module")
def spectra(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_spectra_dir(make_synthetic_dataset(60, seed=5), tmp_path_factory.mktemp("spectra"))


def test_synthetic_spectra_folder_reads_back(spectra: Path) -> None:
    original = make_synthetic_dataset(60, seed=5)
    loaded = load_dataset(spectra)
    order = np.argsort(original.meta["obs_id"].to_numpy())
    np.testing.assert_array_equal(loaded.counts, original.counts[order])
    np.testing.assert_array_equal(loaded.rmf_index, original.rmf_index[order])


def test_train_command(spectra: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model"
    code = main(["train", "--spectra", str(spectra), "--out", str(out), "--epochs", "3", "--latent-dim", "3",
                 "--device", "cpu", "--seed", "2"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "parameters on 60 spectra" in printed and "val deviance/dof" in printed
    description = json.loads((out / "model.json").read_text())
    assert description["vae_config"]["latent_dim"] == 3 and description["train_config"]["max_epochs"] == 3
    assert description["preprocessing"]["spectra_dir"] == str(spectra.resolve())
    assert f"model version {description['version']}" in printed


@pytest.mark.parametrize(("argv", "message"), [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--device", "cuda:7"], "not available"),
    (["--spectra", "/nonexistent/spectra"], "no responses table"),
])
def test_bad_arguments_are_one_line_errors(spectra: Path, tmp_path: Path, argv: list[str], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    base = {"--spectra": str(spectra), "--out": str(tmp_path / "m")}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    if "cuda:7" in argv and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code = main(["train", *[item for pair in base.items() for item in pair]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
