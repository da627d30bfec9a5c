"""The simulator's pn response: grid, area, filters, vignetting, resolution, and realism against the
real canned RMF and on-axis ARF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from xmm_pipeline.archive import instrument, physics
from xmm_pipeline.spectra.grid import EnergyGrid


def test_energy_and_channel_grids() -> None:
    lo, hi = instrument.energy_grid_kev()
    assert lo.size == 2067 and np.array_equal(lo[1:], hi[:-1]) and np.all(hi > lo)
    assert lo[0] == pytest.approx(0.05) and hi[-1] == pytest.approx(15.945)
    clo, chi = instrument.channel_bounds_kev()
    assert clo.size == instrument.N_CHANNELS == 4096 and np.allclose(chi - clo, 0.005)


def test_area_goes_through_the_brief_table_and_drops_at_the_edges() -> None:
    for energy, area in [
        (0.5, 932),
        (1.0, 1278),
        (1.5, 1383),
        (2.0, 1356),
        (2.5, 887),
        (4.0, 936),
        (6.0, 875),
        (8.0, 550),
        (10.0, 272),
    ]:
        assert instrument.onaxis_area_thin_cm2(np.array([energy]))[0] == pytest.approx(area, rel=1e-6)
    for edge_kev in (0.284, 0.536, 2.236):  # C K, O K, Au M5
        below, above = instrument.onaxis_area_thin_cm2(np.array([edge_kev - 0.004, edge_kev + 0.006]))
        assert above < 0.9 * below


def test_filters_and_vignetting() -> None:
    energy = np.array([0.3, 1.0, 5.0])
    thin, medium, thick = (instrument.effective_area_cm2(energy, f) for f in ("Thin1", "Medium", "Thick"))
    assert np.all(thin >= medium) and np.all(medium >= thick)
    assert thick[0] < 0.5 * thin[0] and thick[2] > 0.95 * thin[2]
    assert instrument.vignetting(np.array([1.5]), 10.0)[0] == pytest.approx(0.5, abs=0.03)
    assert instrument.vignetting(np.array([8.0]), 10.0)[0] < instrument.vignetting(np.array([1.5]), 10.0)[0]
    assert instrument.vignetting(np.array([1.0]), 0.0)[0] == 1.0
    with pytest.raises(ValueError, match="unknown pn filter"):
        instrument.filter_transmission(energy, "Open")


def _fwhm_of_row(row: np.ndarray, channel_kev: np.ndarray) -> float:
    peak = np.argmax(row)
    above = np.flatnonzero(row > row[peak] / 2)
    return float(channel_kev[above[-1]] - channel_kev[above[0]] + 0.005)


def test_redistribution_rows_and_resolution() -> None:
    matrix = instrument.ONAXIS_RMF.matrix()
    assert matrix.shape == (2067, 4096) and matrix.dtype == np.float32
    assert np.allclose(matrix.sum(axis=1), 1.0, atol=1e-5)
    centre = instrument.energy_centres_kev()
    clo, chi = instrument.channel_bounds_kev()
    channel_kev = 0.5 * (clo + chi)
    for energy, fwhm in [(1.0, 0.10), (2.0, 0.13), (4.0, 0.17), (6.4, 0.22), (8.0, 0.25)]:
        row = matrix[np.searchsorted(centre, energy)]
        assert _fwhm_of_row(row, channel_kev) == pytest.approx(fwhm, rel=0.1)
        assert channel_kev[np.argmax(row)] == pytest.approx(energy, abs=0.02)
    # low-energy shoulder below ~0.6 keV, Si escape peak at E - 1.74 keV above the Si K edge
    shoulder = [matrix[np.searchsorted(centre, e)][channel_kev < e - 0.15].sum() for e in (0.5, 1.5)]
    assert shoulder[0] > 0.2 > 0.05 > shoulder[1]
    row = matrix[np.searchsorted(centre, 4.0)]
    assert row[np.abs(channel_kev - 2.26) < 0.1].sum() > 5 * row[np.abs(channel_kev - 1.5) < 0.1].sum()


def test_soft_blackbody_leakage_into_the_band_matches_the_brief() -> None:
    """Share of 0.3-10 keV counts from photons below 0.3 keV (brief: 5.9%, 1.7%, 0.6%)."""
    lo, hi = instrument.energy_grid_kev()
    centre = 0.5 * (lo + hi)
    area = instrument.effective_area_cm2(centre, "Thin1")
    matrix = instrument.ONAXIS_RMF.matrix().astype(np.float64)
    clo, chi = instrument.channel_bounds_kev()
    band = (clo >= 0.3) & (chi <= 10.0)
    for kt, share in [(0.05, 0.059), (0.08, 0.017), (0.12, 0.006)]:
        photons = physics.blackbody(centre, kt) * (hi - lo) * area
        from_below = ((photons * (centre < 0.3)) @ matrix)[band].sum() / (photons @ matrix)[band].sum()
        assert from_below == pytest.approx(share, rel=0.35)


def _rebin(counts: np.ndarray, e_min: np.ndarray, e_max: np.ndarray, grid: EnergyGrid) -> np.ndarray:
    """Channel counts onto the grid, each channel split by energy overlap (channels of slightly
    different widths then compare without aliasing)."""
    edges = grid.edges_kev
    overlap = np.clip(
        np.minimum(e_max[:, None], edges[None, 1:]) - np.maximum(e_min[:, None], edges[None, :-1]), 0.0, None
    )
    return counts @ (overlap / np.maximum(e_max - e_min, 1e-12)[:, None])


def _dense_rmf(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    with fits.open(path) as hdus:
        table = hdus["MATRIX"].data
        matrix = np.zeros((len(table), hdus["EBOUNDS"].header["DETCHANS"]))
        for row, record in enumerate(table):
            position = 0
            for first, width in zip(
                np.atleast_1d(record["F_CHAN"])[: record["N_GRP"]],
                np.atleast_1d(record["N_CHAN"])[: record["N_GRP"]],
            ):
                matrix[row, first : first + width] = record["MATRIX"][position : position + width]
                position += width
        ebounds = hdus["EBOUNDS"].data
        return (
            table["ENERG_LO"].astype(float),
            table["ENERG_HI"].astype(float),
            matrix,
            ebounds["E_MIN"].astype(float),
            ebounds["E_MAX"].astype(float),
        )


def test_folded_power_law_matches_the_real_canned_response(real_pn_dir: Path) -> None:
    """An absorbed power law (index 1.9, N_H 3e20) through the simulator's on-axis Thin response and
    through the real canned RMF + on-axis ARF: within 10% in every 238-grid bin over 0.5-9 keV."""
    grid = EnergyGrid()

    def photons(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        centre = 0.5 * (lo + hi)
        return physics.powerlaw(centre, 1.9) * physics.absorption(centre, 3e20) * (hi - lo)

    e_lo, e_hi, real_matrix, ch_min, ch_max = _dense_rmf(
        real_pn_dir / "canned" / "epn_e3_ff20_sdY9_v19.0.rmf"
    )
    with fits.open(real_pn_dir / "canned" / "pn_thin_onaxis.arf") as hdus:
        real_area = hdus["SPECRESP"].data["SPECRESP"].astype(float)
    real = _rebin((photons(e_lo, e_hi) * real_area) @ real_matrix, ch_min, ch_max, grid)

    lo, hi = instrument.energy_grid_kev()
    area = instrument.effective_area_cm2(0.5 * (lo + hi), "Thin1", 0.0)
    simulated = (photons(lo, hi) * area) @ instrument.ONAXIS_RMF.matrix().astype(np.float64)
    ours = _rebin(simulated, *instrument.channel_bounds_kev(), grid)

    band = (grid.centres_kev > 0.5) & (grid.centres_kev < 9.0)
    ratio = ours[band] / real[band]
    assert np.all(np.abs(ratio - 1.0) < 0.10), f"worst bin off by {np.max(np.abs(ratio - 1.0)):.3f}"


def test_background_templates() -> None:
    clo, chi = instrument.channel_bounds_kev()
    centre = 0.5 * (clo + chi)
    particle = instrument.particle_background_rate()
    assert np.all(particle >= 0)
    cu = particle[np.abs(centre - 8.04) < 0.1].sum()
    assert cu > 3 * particle[np.abs(centre - 6.0) < 0.1].sum()  # Cu K fluorescence line
    assert np.all(instrument.soft_proton_rate() >= 0)
    lo, hi = instrument.energy_grid_kev()
    sky = instrument.sky_photon_flux(lo, hi)
    assert sky[np.searchsorted(lo, 0.25)] > sky[np.searchsorted(lo, 5.0)]
