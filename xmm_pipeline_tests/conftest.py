"""Shared fixtures: the real pn files beside the checkout, and one small simulated archive per session.

Session fixtures build on each other (archive -> spectra -> model) so that the whole suite pays for
each stage once. Tests must not modify their contents; copy to tmp_path first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def skip_unless_ci(reason: str) -> None:
    """Skip for want of a system package (a user's machine without root); in CI (CI set), where
    `make test` installs them, fail instead, so a missing install never silently drops the test."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} [CI is set: `make test` should have installed it]")
    pytest.skip(reason)
REAL_PN_DIR = REPO_ROOT.parent / "shared" / "data" / "real_pn"

# The session's simulated archive: large enough for every class to appear and for >300-count
# spectra to number in the hundreds, small enough to simulate in seconds.
SIM_DETECTIONS = 1500
SIM_SEED = 20261125


@pytest.fixture(scope="session")
def real_pn_dir() -> Path:
    if not REAL_PN_DIR.is_dir():
        pytest.skip(
            f"real EPIC-pn files not found at {REAL_PN_DIR} (../shared/data/real_pn beside the checkout)"
        )
    return REAL_PN_DIR


@pytest.fixture(scope="session")
def sim_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xmm_pipeline.archive.simulated import simulate_archive

    out = tmp_path_factory.mktemp("sim_dr14")
    simulate_archive(out, release="DR14", n_detections=SIM_DETECTIONS, seed=SIM_SEED)
    return out


@pytest.fixture(scope="session")
def spectra_dir(sim_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xmm_pipeline.spectra.preprocess import preprocess_archive

    out = tmp_path_factory.mktemp("spectra_dr14")
    preprocess_archive(sim_archive, out)
    return out


@pytest.fixture(scope="session")
def spectral_dataset(spectra_dir: Path):
    from xmm_pipeline.spectra.dataset import load_dataset

    return load_dataset(spectra_dir)


@pytest.fixture(scope="session")
def trained_artifact(spectral_dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small but real training run (few epochs) shared by the latent and orchestration tests."""
    from xmm_pipeline.model.train import TrainConfig, train_model
    from xmm_pipeline.model.vae import VAEConfig

    out = tmp_path_factory.mktemp("model")
    result = train_model(spectral_dataset, out, VAEConfig(), TrainConfig(max_epochs=40, seed=1))
    return result.artifact_dir
