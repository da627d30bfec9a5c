"""The model energy grid: wider than the channel grid, so that the compressed fold of every real pn
response matches the full-resolution fold in every channel bin of the 0.3-10 keV band."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xmm_pipeline.model.vae import VAE, VAEConfig, matched_mlp_widths, model_grid, with_model_grid
from xmm_pipeline.ogip.read import Arf, Rmf, read_arf, read_rmf
from xmm_pipeline.spectra.grid import DEFAULT_GRID, DEFAULT_MODEL_GRID, EnergyGrid, ModelGrid
from xmm_pipeline.spectra.response import (
    ResponseCache,
    channel_bins,
    compress_response,
    fold_compressed,
    fold_full,
    sum_into_bins,
)
from xmm_pipeline_tests.spectra.test_response import absorbed_power_law, blackbody_100ev, integrate

# every real response in ../shared/data/real_pn: (rmf, arf, exposure in s)
REAL_RESPONSES = {
    "ngc7793_p13": ("ngc7793_p13/PN.rmf", "ngc7793_p13/PN.arf", 20266.0),
    "igr_j18490": ("igr_j18490/PN_PWN.rmf", "igr_j18490/PN_PWN.arf", 8775.0),
    "circinus_ulx": ("circinus_ulx/pn.rmf", "circinus_ulx/pn.arf", 22092.0),
    "canned_sdY9": ("canned/epn_e3_ff20_sdY9_v19.0.rmf", "canned/pn_thin_onaxis.arf", 20000.0),
}
# A realistic bright detection: 10^5 counts in the 0.3-10 keV channels (the Circinus ULX spectrum here
# has 48,907); the brighter, the more bins are held to the bar.
BAND_COUNTS = 1e5


def blackbody_50ev(energy_kev: np.ndarray) -> np.ndarray:
    return energy_kev**2 / np.expm1(np.minimum(energy_kev / 0.05, 500.0))


MODELS = {"absorbed_power_law": absorbed_power_law, "blackbody_100ev": blackbody_100ev,
          "blackbody_50ev": blackbody_50ev}


@pytest.fixture(scope="module")
def responses(real_pn_dir: Path) -> dict:
    return {name: (read_rmf(real_pn_dir / rmf), read_arf(real_pn_dir / arf), exposure)
            for name, (rmf, arf, exposure) in REAL_RESPONSES.items()}


def full_resolution_counts(rmf: Rmf, arf: Arf, exposure_s: float, density) -> np.ndarray:
    """The reference: fold at the RMF's own resolution, channels summed into the 238 channel bins."""
    per_channel = fold_full(rmf, arf, exposure_s,
                            integrate(density, rmf.energy_lo_kev, rmf.energy_hi_kev))
    return sum_into_bins(per_channel, channel_bins(rmf, DEFAULT_GRID), DEFAULT_GRID.n_bins)


def pipeline_fold_miss(rmf: Rmf, arf: Arf, exposure_s: float, density) -> tuple[float, float, int]:
    """(worst |compressed / full - 1|, its energy in keV, bins checked) of the response as the
    preprocessing stores it (ResponseCache: matrix [238 x M], area per model bin), over every channel
    bin with > 1 expected count at BAND_COUNTS counts in 0.3-10 keV. The figures in docs/DATA.md:
    `python -c "from xmm_pipeline_tests.spectra.test_model_grid import print_fold_table as p; p()"`."""
    full = full_resolution_counts(rmf, arf, exposure_s, density)
    cache = ResponseCache()
    response = cache.get(rmf.path)
    grid = cache.model_grid
    assert response.matrix.shape == (DEFAULT_GRID.n_bins, grid.n_bins)
    area_exposure = cache.area_per_bin(arf, response) * exposure_s
    compressed = fold_compressed(area_exposure, response.matrix.astype(np.float64),
                                 integrate(density, grid.edges_kev[:-1], grid.edges_kev[1:]))
    checked = full * BAND_COUNTS / full.sum() > 1
    relative = np.abs(compressed[checked] / full[checked] - 1)
    worst_kev = float(DEFAULT_GRID.centres_kev[checked][relative.argmax()])
    return float(relative.max()), worst_kev, int(checked.sum())


def print_fold_table() -> None:
    from xmm_pipeline_tests.conftest import REAL_PN_DIR

    for name, (rmf, arf, exposure) in REAL_RESPONSES.items():
        rmf_data, arf_data = read_rmf(REAL_PN_DIR / rmf), read_arf(REAL_PN_DIR / arf)
        cells = [pipeline_fold_miss(rmf_data, arf_data, exposure, MODELS[m]) for m in MODELS]
        print(name, " | ".join(f"{m}: {r:.2%} at {e:.2f} keV ({n} bins)"
                               for m, (r, e, n) in zip(MODELS, cells, strict=True)))


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(REAL_RESPONSES))
def test_pipeline_fold_within_one_percent_of_full_resolution_over_the_whole_band(
    responses: dict, name: str, model: str
) -> None:
    """Within 1% of the full-resolution fold in every channel bin with > 1 count, 0.3-10 keV."""
    rmf, arf, exposure = responses[name]
    worst, energy_kev, n_checked = pipeline_fold_miss(rmf, arf, exposure, MODELS[model])
    assert n_checked > 100 if model == "absorbed_power_law" else n_checked > 20
    assert worst < 0.01, f"{worst:.2%} off at {energy_kev:.3f} keV"


@pytest.mark.parametrize(("model", "edge_kev"), [("blackbody_100ev", 0.3), ("absorbed_power_law", 9.9)])
def test_the_channel_grid_alone_misses_the_photons_from_outside_the_band(
    responses: dict, model: str, edge_kev: float
) -> None:
    """What the wider grid is for: stopping the model at 0.3 and 10 keV misses the edge bins by > 5%."""
    rmf, arf, exposure = responses["canned_sdY9"]
    density = MODELS[model]
    full = full_resolution_counts(rmf, arf, exposure, density)
    for grid, worst in ((ModelGrid.same_as(DEFAULT_GRID), 0.05), (DEFAULT_MODEL_GRID, 0.01)):
        area, matrix = compress_response(rmf, arf, DEFAULT_GRID, model_grid=grid)
        compressed = fold_compressed(area * exposure, matrix,
                                     integrate(density, grid.edges_kev[:-1], grid.edges_kev[1:]))
        edge = np.argmin(np.abs(DEFAULT_GRID.centres_kev - edge_kev))
        miss = abs(compressed[edge] / full[edge] - 1)
        assert (miss > worst) if grid.n_bins == DEFAULT_GRID.n_bins else (miss < worst), (grid, miss)


def test_one_grid_definition_the_model_grid_extends_the_channel_grid() -> None:
    grid = DEFAULT_MODEL_GRID
    assert grid.channel == DEFAULT_GRID
    assert grid.e_min_kev <= 0.2 and grid.e_max_kev >= 12.0
    assert grid.e_min_kev > 0.2 * np.exp(-DEFAULT_GRID.log_step)  # no more than one step beyond
    np.testing.assert_array_equal(grid.edges_kev[grid.channel_slice.start:grid.channel_slice.stop + 1],
                                  DEFAULT_GRID.edges_kev)
    np.testing.assert_allclose(np.diff(np.log(grid.edges_kev)), DEFAULT_GRID.log_step, rtol=1e-9)
    coarse = EnergyGrid(0.5, 8.0, 40).extended(0.3, 9.0)
    assert coarse.channel == EnergyGrid(0.5, 8.0, 40) and coarse.e_min_kev <= 0.3 <= coarse.edges_kev[1]
    assert ModelGrid.from_dict(grid.to_dict()) == grid
    with pytest.raises(ValueError, match="must contain the channel grid"):
        DEFAULT_GRID.extended(0.4, 12.0)


@pytest.mark.parametrize("decoder", ["deeponet", "mlp", "pca_trunk"])
def test_every_decoder_is_evaluated_on_the_model_grid(decoder: str) -> None:
    import torch

    config = with_model_grid(VAEConfig(latent_dim=2, decoder=decoder, n_basis=16), DEFAULT_MODEL_GRID)
    assert model_grid(config) == DEFAULT_MODEL_GRID
    model = VAE(config)
    flux, _, _ = model(torch.rand(3, DEFAULT_GRID.n_bins))
    assert flux.shape == (3, DEFAULT_MODEL_GRID.n_bins)
    assert torch.allclose(flux.mean(-1), torch.ones(3))
    if decoder == "mlp":
        assert model.decoder.net[-1].out_features == DEFAULT_MODEL_GRID.n_bins
        assert matched_mlp_widths(config)[0] > 0
