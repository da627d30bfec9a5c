"""The per-bin validity mask: which channel bins are fitted, and that masked bins change nothing.

A channel bin is fitted only when its counts and its response row sum the same channels: every RMF
channel whose EBOUNDS mid energy falls in the bin is present in the spectrum with QUALITY 0, there is
at least one, and the response reaches the bin. Real pn SRSPECs flag channels 0-60 (up to 0.325 keV by
the canned EBOUNDS); with the canned matrices no channel centre falls in the 0.330 keV bin.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from xmm_pipeline.archive.base import RESPONSES_SUBDIR
from xmm_pipeline.errors import UserError
from xmm_pipeline.model.train import TrainConfig, load_artifact, train_model
from xmm_pipeline.model.vae import (
    VAE,
    SpectraTensors,
    VAEConfig,
    float32_tensor,
    poisson_deviance_per_dof,
    poisson_vae_loss,
)
from xmm_pipeline.ogip.read import read_arf, read_pha, read_rmf
from xmm_pipeline.spectra.dataset import SPECTRA_SUBDIR, load_dataset
from xmm_pipeline.spectra.grid import DEFAULT_GRID, ModelGrid
from xmm_pipeline.spectra.preprocess import (
    PreprocessConfig,
    bin_spectrum,
    preprocess_observation,
    spectra_schema,
    spectrum_to_dataset,
    write_responses,
)
from xmm_pipeline.spectra.response import ResponseCache
from xmm_pipeline_tests.model.synthetic import make_synthetic_dataset, write_spectra_dir

REAL_PPS_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real_pps"
OBS_ID = "0677180601"
CANNED = "canned/epn_e3_ff20_sdY9_v19.0.rmf"


@pytest.fixture(scope="module")
def real_pps_dir() -> Path:
    if not REAL_PPS_DIR.is_dir():
        pytest.skip(f"real PPS products not found at {REAL_PPS_DIR} (../shared/data/real_pps)")
    return REAL_PPS_DIR


def _pps(real_pps_dir: Path, kind: str, src: int = 4) -> Path:
    return real_pps_dir / OBS_ID / "pps" / f"P{OBS_ID}PNS003{kind}0{src:03X}.FTZ"


def expected_mask(spectrum: Path, rmf_path: Path) -> np.ndarray:
    """The rule, recomputed from the files alone: all of a bin's RMF channels present and good."""
    pha, rmf = read_pha(spectrum), read_rmf(rmf_path)
    mid = 0.5 * (rmf.channel_lo_kev + rmf.channel_hi_kev)
    bins = DEFAULT_GRID.bin_index(mid)
    good = dict(zip(pha.channel.tolist(), (pha.quality == 0).tolist()))
    mask = np.zeros(DEFAULT_GRID.n_bins, dtype=bool)
    for k in range(DEFAULT_GRID.n_bins):
        channels = rmf.channel[bins == k]
        mask[k] = len(channels) > 0 and all(good.get(int(c), False) for c in channels)
    return mask


def test_real_pps_spectrum_masks_its_bad_low_bins_and_the_empty_bin(real_pps_dir: Path, real_pn_dir: Path):
    spectrum = _pps(real_pps_dir, "SRSPEC")
    rmf = real_pn_dir / CANNED
    one = spectrum_to_dataset(spectrum, _pps(real_pps_dir, "BGSPEC"), _pps(real_pps_dir, "SRCARF"), rmf)
    valid = one.valid[0]
    np.testing.assert_array_equal(valid, expected_mask(spectrum, rmf))
    centres = DEFAULT_GRID.centres_kev
    # channels 0-60 are bad and channel 60 ends at 0.325 keV: every bin centred below it is masked
    assert not valid[centres < 0.322].any() and valid[(centres > 0.335) & (centres < 9.0)].all()
    empty = np.argmin(np.abs(centres - 0.330))
    assert ResponseCache().get(rmf).bin_channels[empty] == 0 and not valid[empty]
    assert one.unfolded[0][~valid].max() == 0 and one.unfolded[0].mean() == pytest.approx(1.0, rel=1e-5)
    assert one.meta["total_counts"][0] == one.counts[0][valid].sum()


def test_the_real_pps_observation_preprocesses_with_the_mask_in_its_table(
    real_pps_dir: Path, real_pn_dir: Path, tmp_path: Path
) -> None:
    """Through preprocess_observation, with the canned matrix found by its bare RESPFILE name."""
    archive = tmp_path / "archive"
    shutil.copytree(real_pps_dir / OBS_ID, archive / OBS_ID)
    (archive / RESPONSES_SUBDIR).mkdir(parents=True)
    shutil.copyfile(real_pn_dir / CANNED, archive / RESPONSES_SUBDIR / Path(CANNED).name)
    row = {"detid": 1, "srcid": 11, "iauname": "4XMM J000000.0+000000", "obs_id": OBS_ID, "src_num": 4,
           "ra": 0.0, "dec": 0.0, "mjd_start": 55853.2, "mjd_stop": 55853.3, "pn_filter": "Thin1",
           "pn_submode": "PrimeFullWindow", "pn_8_cts": 400.0, "ep_8_flux": 1e-13, "ep_hr1": 0.0,
           "ep_hr2": 0.0, "ep_hr3": 0.0, "ep_hr4": 0.0, "ep_extent": 0.0, "sum_flag": 0}
    out = tmp_path / "spectra"
    cache = ResponseCache()
    result = preprocess_observation(pd.DataFrame([row]), archive, out, PreprocessConfig(), cache)
    assert result.n_written == 1, result.quarantine
    write_responses(out, cache)
    schema = pq.read_schema(out / SPECTRA_SUBDIR / f"{OBS_ID}.parquet")
    assert schema.field("valid").type == spectra_schema(DEFAULT_GRID).field("valid").type
    dataset = load_dataset(out)
    assert dataset.valid.shape == (1, 238) and dataset.area_exposure.shape == (1, dataset.model_grid.n_bins)
    np.testing.assert_array_equal(dataset.valid[0], expected_mask(_pps(real_pps_dir, "SRSPEC"),
                                                                  real_pn_dir / CANNED))
    assert (~dataset.valid[0][:8]).sum() == 6  # five bins of bad channels, the empty 0.330 keV bin


def test_one_bad_channel_masks_its_bin_and_that_bin_changes_no_encoder_input(real_pn_dir: Path) -> None:
    folder = real_pn_dir / "ngc7793_p13"
    source, background = read_pha(folder / "PN.pha"), read_pha(folder / "PNbackground_spectrum.fits")
    arf, cache = read_arf(folder / "PN.arf"), ResponseCache()
    response = cache.get(folder / "PN.rmf")
    before = bin_spectrum(source, background, arf, response, cache)
    k = int(np.argmin(np.abs(DEFAULT_GRID.centres_kev - 1.0)))
    in_bin = np.flatnonzero(response.channel_bin[np.searchsorted(response.channel, source.channel)] == k)
    assert len(in_bin) >= 2 and before["valid"][k]
    quality = source.quality.copy()
    quality[in_bin[0]] = 2
    flagged = replace(source, quality=quality)
    masked = bin_spectrum(flagged, background, arf, response, cache)
    assert not masked["valid"][k] and masked["valid"].sum() == before["valid"].sum() - 1
    counts = flagged.counts.copy()
    counts[in_bin] += 500  # the bad channel and the good ones beside it in the masked bin
    louder = bin_spectrum(replace(flagged, counts=counts), background, arf, response, cache)
    np.testing.assert_array_equal(louder["unfolded"], masked["unfolded"])
    np.testing.assert_array_equal(louder["valid"], masked["valid"])
    assert louder["total_counts"] == masked["total_counts"]
    assert louder["log10_flux"] == masked["log10_flux"]
    counts[in_bin] -= 500
    counts[in_bin + 40] += 500  # a valid bin does change the input
    changed = bin_spectrum(replace(flagged, counts=counts), background, arf, response, cache)
    assert not np.array_equal(changed["unfolded"], masked["unfolded"])


def _masked_dataset():
    dataset = make_synthetic_dataset(48, seed=3)
    valid = np.ones_like(dataset.valid)
    valid[:, :6] = False
    valid[:, 40] = False
    valid[::3, 100:104] = False
    dataset = replace(dataset, valid=valid)
    louder = replace(dataset, counts=np.where(valid, dataset.counts, 3 * dataset.counts + 50),
                     background=np.where(valid, dataset.background, 7.0))
    return dataset, louder


def test_masked_bins_change_neither_loss_nor_deviance_nor_dof(tmp_path: Path) -> None:
    dataset, louder = _masked_dataset()
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=2, n_basis=16))
    matrices = float32_tensor(dataset.rmf_matrices)
    with torch.no_grad():
        base = poisson_vae_loss(model, SpectraTensors.from_dataset(dataset), matrices)
        loud = poisson_vae_loss(model, SpectraTensors.from_dataset(louder), matrices)
        unmasked = poisson_vae_loss(model, SpectraTensors.from_dataset(replace(louder, valid=None)), matrices)
    for a, b in zip(base, loud):
        assert torch.allclose(a, b, rtol=1e-6), (a, b)
    assert not torch.allclose(base[1], unmasked[1], rtol=1e-3)  # the same counts, unmasked, do count

    result = train_model(dataset, tmp_path / "model", VAEConfig(latent_dim=2, n_basis=16),
                         TrainConfig(max_epochs=2, batch_size=16))
    assert result.history[-1]["val_deviance_per_dof"] > 0
    artifact = load_artifact(result.artifact_dir)
    deviance = artifact.deviance_per_dof(dataset)
    np.testing.assert_allclose(artifact.deviance_per_dof(louder), deviance, rtol=1e-5)
    expected = artifact.reconstruct(dataset)
    n_fitted = artifact.config.latent_dim + 1
    counts, valid = dataset.counts.astype(np.float64), dataset.valid
    terms = expected - counts + np.where(counts > 0, counts * np.log(np.maximum(counts, 1) / expected), 0)
    by_hand = 2 * np.where(valid, terms, 0).sum(-1) / (valid.sum(-1) - n_fitted)
    np.testing.assert_allclose(artifact.deviance_per_dof(dataset, expected), by_hand, rtol=1e-5)
    torch_dof = poisson_deviance_per_dof(torch.as_tensor(counts), torch.as_tensor(expected), n_fitted,
                                         torch.as_tensor(valid))
    np.testing.assert_allclose(torch_dof.numpy(), by_hand, rtol=1e-5)
    mu, _ = artifact.encode(dataset)
    np.testing.assert_array_equal(artifact.encode(louder)[0], mu)  # the encoder reads unfolded only


def test_tables_without_a_mask_load_all_valid_and_a_wrong_size_is_one_line(tmp_path: Path) -> None:
    """Spectra tables written before the mask and the model grid load as they were fitted then."""
    dataset = make_synthetic_dataset(12, seed=1)
    out = write_spectra_dir(dataset, tmp_path / "old")
    loaded = load_dataset(out)
    assert loaded.valid.all() and loaded.valid.shape == (12, 238)
    assert loaded.model_grid == ModelGrid.same_as(loaded.grid)
    assert "valid" not in loaded.meta.columns
    responses = pq.read_table(out / "responses.parquet")
    import pyarrow as pa

    wider = responses.append_column("model_bins_below", pa.array([1] * responses.num_rows, pa.int32()))
    wider = wider.append_column("model_bins_above", pa.array([0] * responses.num_rows, pa.int32()))
    pq.write_table(wider, out / "responses.parquet")
    with pytest.raises(UserError, match="need") as error:
        load_dataset(out)
    assert "\n" not in str(error.value)



def test_the_encoder_scales_its_input_over_the_valid_bins_only() -> None:
    """The encoder's input scale is the mean over the valid bins: what masked bins hold and how many
    there are do not rescale the others (a spectrum with an unusual mask lands where its shape says)."""
    from xmm_pipeline.model.vae import VAE, VAEConfig

    model = VAE(VAEConfig())
    unfolded = torch.rand(1, 238, generator=torch.Generator().manual_seed(3)) + 0.1
    valid = torch.ones(1, 238)
    valid[0, :7] = 0  # the flagged channels below 0.325 keV and the unfed 0.330 keV bin
    valid[0, 200:] = 0  # e.g. other QUALITY flags at the high end
    other = unfolded.clone()
    other[0, 200:] = 50.0  # whatever the masked bins held
    scaled = model.scale_input(other, valid)
    kept = valid[0] > 0
    mean_valid = unfolded[0, kept].abs().mean()
    expected = torch.asinh(unfolded[0, kept] / (mean_valid * model.config.input_softening))
    torch.testing.assert_close(scaled[0, kept], expected)
    assert scaled[0, ~kept].abs().max() == 0
    torch.testing.assert_close(model.scale_input(unfolded * valid, valid), scaled)
