"""The simulator's pn response: grid, EBOUNDS, area, filters, vignetting, resolution, QUALITY, and
realism against the real canned RMF and on-axis ARF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xmm_pipeline.archive import instrument, physics
from xmm_pipeline.archive.simulated import write_canned_rmf
from xmm_pipeline.ogip.read import Arf, Rmf, read_arf, read_rmf
from xmm_pipeline.ogip.write import arf_bytes, write_fits_file
from xmm_pipeline.spectra.grid import EnergyGrid
from xmm_pipeline.spectra.response import channel_bins, fold_full, sum_into_bins


def test_energy_and_channel_grids() -> None:
    lo, hi = instrument.energy_grid_kev()
    assert lo.size == 2067 and np.array_equal(lo[1:], hi[:-1]) and np.all(hi > lo)
    assert lo[0] == pytest.approx(0.05) and hi[-1] == pytest.approx(16.005)
    clo, chi = instrument.channel_bounds_kev()
    assert clo.size == instrument.N_CHANNELS == 4096 and np.array_equal(clo[1:], chi[:-1])
    assert clo[0] == 0.0 and chi[-1] == pytest.approx(20.48)
    assert np.all(np.abs(chi - clo - 0.005) < 0.0004)  # the gain: 4.84-5.37 eV below 3 keV
    above = clo >= 3.015
    assert np.allclose(clo[above], 0.005 * np.flatnonzero(above), rtol=0, atol=1e-6)
    assert chi[60] == pytest.approx(0.3249, abs=1e-4)  # not 0.305: channel 60 ends at 0.325 keV


def test_source_spectra_flag_the_channels_below_0_32_kev() -> None:
    quality = instrument.source_spectrum_quality()
    assert quality.dtype == np.int16 and quality.shape == (4096,)
    assert np.array_equal(np.flatnonzero(quality), np.arange(61))


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


def _fwhm_of_row(row: np.ndarray, channel_lo: np.ndarray, channel_hi: np.ndarray) -> float:
    """FWHM of a row's peak in counts per keV (the channels are not all equally wide), the half-maximum
    crossings interpolated between channel centres."""
    density = row / (channel_hi - channel_lo)
    centre = 0.5 * (channel_lo + channel_hi)
    peak = int(np.argmax(density))
    half = density[peak] / 2
    left = peak - int(np.argmax(density[peak::-1] <= half))
    right = peak + int(np.argmax(density[peak:] <= half))
    low = np.interp(half, density[left : left + 2], centre[left : left + 2])
    high = np.interp(half, density[right - 1 : right + 1][::-1], centre[right - 1 : right + 1][::-1])
    return float(high - low)


def test_redistribution_rows_and_resolution() -> None:
    matrix = instrument.ONAXIS_RMF.matrix()
    assert matrix.shape == (2067, 4096) and matrix.dtype == np.float32
    assert np.allclose(matrix.sum(axis=1), 1.0, atol=1e-5)
    centre = instrument.energy_centres_kev()
    clo, chi = instrument.channel_bounds_kev()
    channel_kev = 0.5 * (clo + chi)
    for energy, fwhm in [(1.0, 0.10), (2.0, 0.13), (4.0, 0.17), (6.4, 0.22), (8.0, 0.25)]:
        row = matrix[np.searchsorted(centre, energy)]
        assert _fwhm_of_row(row, clo, chi) == pytest.approx(fwhm, rel=0.1)
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


def _written_simulated_response(tmp_path: Path) -> tuple[Rmf, Arf]:
    """The simulator's sdY9 full-frame matrix and on-axis Thin ARF, written as files and read back."""
    rmf_path = write_canned_rmf(tmp_path, instrument.ONAXIS_RMF)
    lo, hi = instrument.energy_grid_kev()
    arf_path = tmp_path / "onaxis.arf"
    write_fits_file(arf_path, arf_bytes(lo, hi, instrument.effective_area_cm2(0.5 * (lo + hi), "Thin1")))
    return read_rmf(rmf_path), read_arf(arf_path)


def _real_response(real_pn_dir: Path) -> tuple[Rmf, Arf]:
    canned = real_pn_dir / "canned"
    return read_rmf(canned / "epn_e3_ff20_sdY9_v19.0.rmf"), read_arf(canned / "pn_thin_onaxis.arf")


def _binned_fold(rmf: Rmf, arf: Arf, spectrum: str, grid: EnergyGrid) -> np.ndarray:
    """Expected counts on the 238-bin grid (channels by their EBOUNDS mid energy), full-resolution fold."""
    centre = 0.5 * (rmf.energy_lo_kev + rmf.energy_hi_kev)
    width = rmf.energy_hi_kev - rmf.energy_lo_kev
    if spectrum == "power law":
        photons = physics.powerlaw(centre, 1.9) * physics.absorption(centre, 3e20) * width
    else:
        photons = physics.blackbody(centre, 0.1) * physics.absorption(centre, 3e20) * width
    counts = fold_full(rmf, arf, 1.0, photons)
    return sum_into_bins(counts, channel_bins(rmf, grid), grid.n_bins)


def _worst_ratio(ours: np.ndarray, real: np.ndarray) -> tuple[float, int]:
    """Largest |ours/real - 1| over the grid bins holding > 1 count when the real fold has 10^6."""
    scale = 1e6 / real.sum()
    used = real * scale > 1.0
    deviation = np.abs(ours[used] / real[used] - 1.0)
    return float(deviation.max()), int(used.sum())


def test_simulated_grid_and_ebounds_are_the_real_canned_ones(tmp_path: Path, real_pn_dir: Path) -> None:
    ours, _ = _written_simulated_response(tmp_path)
    real, _ = _real_response(real_pn_dir)
    for name in ("energy_lo_kev", "energy_hi_kev", "channel_lo_kev", "channel_hi_kev"):
        assert np.array_equal(
            getattr(ours, name).astype(np.float32), getattr(real, name).astype(np.float32)
        ), name
    # every real row band and submode matrix shares these EBOUNDS: so must the simulated ones
    for submode, row_band in (("PrimeFullWindowExtended", 6), ("PrimeSmallWindow", 3)):
        rmf = instrument.CannedRMF(submode, row_band)
        other = read_rmf(write_canned_rmf(tmp_path, rmf))
        assert np.array_equal(other.channel_lo_kev, ours.channel_lo_kev)
        assert np.array_equal(other.energy_lo_kev, ours.energy_lo_kev)


@pytest.mark.parametrize("spectrum", ["power law", "blackbody"])
def test_simulated_matrix_folds_like_the_real_canned_matrix(
    tmp_path: Path, real_pn_dir: Path, spectrum: str
) -> None:
    """An absorbed power law (1.9, 3e20) and a 0.1 keV blackbody through the simulator's sdY9 matrix
    and through the real one, both with the real on-axis ARF: within 5% in every 238-grid bin over
    0.3-10 keV (measured: 1.7% and 3.1%); the core's FWHM within 2% of the real rows' at 0.5-8 keV."""
    grid = EnergyGrid()
    ours_rmf, _ = _written_simulated_response(tmp_path)
    real_rmf, real_arf = _real_response(real_pn_dir)
    real = _binned_fold(real_rmf, real_arf, spectrum, grid)
    ours = _binned_fold(ours_rmf, real_arf, spectrum, grid)
    worst, n_used = _worst_ratio(ours, real)
    assert n_used > (200 if spectrum == "power law" else 120)
    assert worst < 0.05, f"{spectrum}: worst bin off by {worst:.3f}"
    # the low-energy shoulder carries the counts of the lowest bins: the column sums agree there too
    column = {name: rmf.to_csr().sum(axis=0).A1 for name, rmf in (("ours", ours_rmf), ("real", real_rmf))}
    low = (real_rmf.channel_lo_kev >= 0.3) & (real_rmf.channel_hi_kev <= 0.6)
    assert np.allclose(column["ours"][low], column["real"][low], rtol=0.03)
    dense = {name: rmf.to_csr() for name, rmf in (("ours", ours_rmf), ("real", real_rmf))}
    centre = 0.5 * (real_rmf.energy_lo_kev + real_rmf.energy_hi_kev)
    for energy in (0.5, 1.0, 2.0, 4.0, 6.4, 8.0):
        row = int(np.searchsorted(centre, energy))
        ours_fwhm, real_fwhm = (
            _fwhm_of_row(dense[name][row].toarray().ravel(), real_rmf.channel_lo_kev, real_rmf.channel_hi_kev)
            for name in ("ours", "real")
        )
        assert ours_fwhm == pytest.approx(real_fwhm, rel=0.02), energy


@pytest.mark.parametrize("spectrum", ["power law", "blackbody"])
def test_simulated_response_folds_like_the_real_canned_response(
    tmp_path: Path, real_pn_dir: Path, spectrum: str
) -> None:
    """The whole simulated on-axis Thin response (its own ARF and matrix) against the real canned RMF +
    on-axis ARF: within 5% in every 238-grid bin over 0.3-10 keV (measured: 3.2% and 3.6%)."""
    grid = EnergyGrid()
    ours = _binned_fold(*_written_simulated_response(tmp_path), spectrum, grid)
    real = _binned_fold(*_real_response(real_pn_dir), spectrum, grid)
    worst, _ = _worst_ratio(ours, real)
    assert worst < 0.05, f"{spectrum}: worst bin off by {worst:.3f}"


def test_soft_leakage_into_the_band_is_the_real_matrix_s(tmp_path: Path, real_pn_dir: Path) -> None:
    """Share of the 0.3-10 keV counts of a blackbody that come from photons below 0.3 keV, through the
    simulated and the real matrix (both with the real ARF): within 10% of each other (measured: 4.7 vs
    4.9%, 1.39 vs 1.41%, 0.51 vs 0.51% at kT 50/80/120 eV)."""
    ours_rmf, _ = _written_simulated_response(tmp_path)
    real_rmf, real_arf = _real_response(real_pn_dir)
    centre = 0.5 * (real_rmf.energy_lo_kev + real_rmf.energy_hi_kev)
    width = real_rmf.energy_hi_kev - real_rmf.energy_lo_kev
    band = (real_rmf.channel_lo_kev >= 0.3) & (real_rmf.channel_hi_kev <= 10.0)
    for kt in (0.05, 0.08, 0.12):
        photons = physics.blackbody(centre, kt) * width
        shares = [
            fold_full(rmf, real_arf, 1.0, photons * (centre < 0.3))[band].sum()
            / fold_full(rmf, real_arf, 1.0, photons)[band].sum()
            for rmf in (ours_rmf, real_rmf)
        ]
        assert shares[0] == pytest.approx(shares[1], rel=0.1), kt


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
