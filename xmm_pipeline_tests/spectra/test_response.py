"""The compressed response against the full-resolution fold, on the real pn responses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xmm_pipeline.errors import ProductError
from xmm_pipeline.ogip.read import read_arf, read_rmf
from xmm_pipeline.spectra.grid import DEFAULT_GRID, EnergyGrid
from xmm_pipeline.spectra.response import (
    WEIGHTINGS,
    ResponseCache,
    channel_bins,
    compress_response,
    fold_compressed,
    fold_full,
    overlap_fractions,
    sum_into_bins,
)

REAL_RESPONSES = {
    "ngc7793_p13": ("PN.rmf", "PN.arf", 20266.0),
    "igr_j18490": ("PN_PWN.rmf", "PN_PWN.arf", 8775.0),
}


def integrate(density, lo_kev: np.ndarray, hi_kev: np.ndarray, order: int = 8) -> np.ndarray:
    """Photons per bin: Gauss-Legendre integral of a photon density over each [lo, hi]."""
    x, w = np.polynomial.legendre.leggauss(order)
    mid, half = 0.5 * (lo_kev + hi_kev), 0.5 * (hi_kev - lo_kev)
    return (density(mid[:, None] + half[:, None] * x[None, :]) * w[None, :]).sum(axis=1) * half


def absorbed_power_law(energy_kev: np.ndarray) -> np.ndarray:
    """Photon index 1.9 behind N_H = 3e21 cm^-2 (cross-section ~ 2e-22 E^-8/3 cm^2)."""
    return energy_kev**-1.9 * np.exp(-3e21 * 2.0e-22 * energy_kev ** (-8 / 3))


def blackbody_100ev(energy_kev: np.ndarray) -> np.ndarray:
    return energy_kev**2 / np.expm1(np.minimum(energy_kev / 0.1, 500.0))  # no overflow far up the grid


@pytest.fixture(scope="module")
def real_responses(real_pn_dir: Path) -> dict:
    return {
        name: (read_rmf(real_pn_dir / name / rmf), read_arf(real_pn_dir / name / arf), exposure)
        for name, (rmf, arf, exposure) in REAL_RESPONSES.items()
    }


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("model", [absorbed_power_law, blackbody_100ev])
@pytest.mark.parametrize("name", sorted(REAL_RESPONSES))
def test_compressed_fold_matches_full_resolution(
    real_responses: dict, name: str, model, weighting: str
) -> None:
    rmf, arf, exposure = real_responses[name]
    grid = DEFAULT_GRID
    model_grid = grid.extended()
    area, matrix = compress_response(rmf, arf, grid, weighting, model_grid)
    full = sum_into_bins(
        fold_full(rmf, arf, exposure, integrate(model, rmf.energy_lo_kev, rmf.energy_hi_kev)),
        channel_bins(rmf, grid),
        grid.n_bins,
    )
    compressed = fold_compressed(
        area * exposure, matrix, integrate(model, model_grid.edges_kev[:-1], model_grid.edges_kev[1:])
    )
    scale = 2e4 / full.sum()  # a bright spectrum: 20,000 counts in the band
    full, compressed = full * scale, compressed * scale
    checked = (full > 1) & (grid.centres_kev > 0.5) & (grid.centres_kev < 9)
    assert checked.sum() > 60
    relative = np.abs(compressed[checked] / full[checked] - 1)
    assert relative.max() < 0.01, f"worst bin {grid.centres_kev[checked][relative.argmax()]:.2f} keV"


def test_overlap_fractions_partition_each_fine_bin() -> None:
    grid = EnergyGrid(0.3, 10.0, 50)
    lo = np.arange(0.05, 12.0, 0.013)
    overlap = overlap_fractions(lo, lo + 0.013, grid)
    total = np.asarray(overlap.sum(axis=1)).ravel()
    inside = (lo >= 0.3) & (lo + 0.013 <= 10.0)
    np.testing.assert_allclose(total[inside], 1.0)
    assert np.all(total[(lo + 0.013 <= 0.3) | (lo >= 10.0)] == 0)
    straddling = np.searchsorted(lo, 0.3) - 1
    assert 0 < total[straddling] < 1


def test_cache_reads_each_rmf_once_and_ids_follow_content(real_pn_dir: Path, tmp_path: Path) -> None:
    """The same canned matrix under its v19.0 and v21.0 names is one response id (content, not name)."""
    canned = real_pn_dir / "canned" / "epn_e3_ff20_sdY9_v19.0.rmf"
    copy = tmp_path / "epn_e3_ff20_sdY9_v21.0.rmf"
    copy.write_bytes(canned.read_bytes())
    cache = ResponseCache()
    first = cache.get(canned)
    assert cache.get(canned) is first
    second = cache.get(copy)
    assert cache.rmf_reads == 2
    assert first.rmf_id == second.rmf_id  # same matrix, one id
    assert "v19" not in first.rmf_id and "sdY9" not in first.rmf_id
    model_grid = DEFAULT_GRID.extended()
    assert first.matrix.shape == (238, model_grid.n_bins) and first.matrix.dtype == np.float32
    columns = first.matrix.sum(axis=0)
    centres = model_grid.centres_kev
    assert np.all(columns <= 1.0 + 1e-4)
    assert np.all(columns[(centres > 2.5) & (centres < 9.5)] > 0.99)  # hard photons stay in the band
    assert 0.05 < columns[model_grid.bins_below] < 0.6  # the soft shoulder sends 0.3 keV photons below
    area = cache.area_per_bin(read_arf(real_pn_dir / "canned" / "pn_thin_onaxis.arf"), first)
    assert area.shape == (model_grid.n_bins,)
    assert area[np.argmin(np.abs(centres - 1.5))] == pytest.approx(1383, rel=0.05)
    assert area[np.argmin(np.abs(centres - 0.2))] == pytest.approx(461, rel=0.1)  # the brief's ARF at 0.2


def test_pure_redistribution_needs_an_arf(real_responses: dict) -> None:
    rmf, _, _ = real_responses["igr_j18490"]
    with pytest.raises(ProductError, match="ARF is needed"):
        compress_response(rmf, None)


def test_specresp_matrix_equals_rmf_plus_arf(real_responses: dict) -> None:
    """A SPECRESP MATRIX (area folded into the RMF rows) compresses to the same area and matrix."""
    from dataclasses import replace

    rmf, arf, _ = real_responses["ngc7793_p13"]
    full = replace(rmf, values=(rmf.values * arf.area_cm2[rmf.element_indices()[0]]).astype(np.float32))
    full = replace(full, includes_area=True)
    area, matrix = compress_response(rmf, arf)
    area_full, matrix_full = compress_response(full, None)
    usable = area > 1.0
    np.testing.assert_allclose(area_full[usable], area[usable], rtol=2e-3)
    np.testing.assert_allclose(matrix_full[:, usable], matrix[:, usable], atol=1e-5)
    cache = ResponseCache()
    compressed = cache.get(rmf.path)
    np.testing.assert_allclose(cache.area_per_bin(arf, compressed), area, rtol=1e-6)
