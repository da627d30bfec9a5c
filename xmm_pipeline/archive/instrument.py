"""The EPIC-pn response used by the simulator: energy grid, effective area, redistribution, background.

The matrices are modelled on the real canned matrix `epn_e3_ff20_sdY9` (its constants, and how they
were obtained, are in `pn_canned`); the simulator reads no calibration file at run time. The tests
compare them with that real matrix and the real on-axis Thin ARF (xmm_pipeline_tests/archive/
test_instrument.py). Numbers marked (approx.) are tuned by eye, not calibration.

- Energy grid and channels: the canned matrices' 2067 energy bins (0.05-16.005 keV) and their EBOUNDS
  (PI 0..4095, not exactly 5 eV wide below 3 keV), identical to the real ones.
- Effective area: the on-axis Thin-filter table of the brief, interpolated log-log after dividing out
  edge transmissions exp(-tau (E/E_edge)^-p) for E >= E_edge, which are multiplied back, so the area
  goes through every table value and drops sharply at each edge. Medium/Thick filters: extra Al,
  polypropylene and Sn layers. Off-axis: vignetting 1 / (1 + (theta/theta_50(E))^2), theta_50 ~10'
  at 1.5 keV and smaller at higher energy.
- Redistribution: each row a Gaussian core, a low-energy shoulder and a plateau below it (incomplete
  charge collection; strong below ~0.6 keV and just above the Si K edge) and the Si K escape peak,
  with parameters fitted to the real matrix's rows (`redistribution_matrix`). Below ~0.35 keV the
  core sits far below the photon energy, so a soft blackbody leaks into the 0.3-10 keV channels as
  the brief says. Matrices of other submodes and CCD row bands: the same rows, the core widened by
  the row band's factor (approx.; only sdY9 full frame is at hand).
- Background: particle continuum with the Al, Ni, Cu, Zn fluorescence lines (not vignetted, flat-ish,
  dominating above ~5 keV), soft X-ray sky (0.1 + 0.25 keV plasma-like thermal and the absorbed
  cosmic X-ray background, folded through the response), optional soft-proton flare component.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from xmm_pipeline.archive import physics, pn_canned

N_CHANNELS = 4096
CHANNEL_WIDTH_KEV = 0.005
SI_K_EDGE_KEV = 1.839
SI_ESCAPE_KEV = 1.74

# On-axis Thin-filter effective area, keV -> cm^2: the brief's table (section 5), with the values of
# the real on-axis Thin ARF (pn_thin_onaxis.arf, at its bin centres) added between them where the
# edges of C, N, O and Au shape the curve (0.22-0.58, 0.7, 0.9, 2.1-2.7, 3.5, 11 keV); extended
# (approx.) below 0.2 keV and above 12 keV.
THIN_AREA_TABLE_KEV_CM2: tuple[tuple[float, float], ...] = (
    (0.05, 20.0),
    (0.1, 160.0),
    (0.15, 265.0),
    (0.2, 461),
    (0.2205, 549.0),
    (0.2505, 676.3),
    (0.2705, 747.7),
    (0.2905, 380.9),
    (0.3, 277),
    (0.3225, 488.4),
    (0.3525, 609.1),
    (0.3825, 689.2),
    (0.4, 738),
    (0.4215, 769.6),
    (0.4515, 861.7),
    (0.4815, 924.9),
    (0.5, 932),
    (0.5205, 975.1),
    (0.5517, 862.4),
    (0.5815, 931.7),
    (0.6, 958),
    (0.7015, 1086.0),
    (0.8, 1177),
    (0.9025, 1234.7),
    (1.0, 1278),
    (1.2, 1335),
    (1.5, 1383),
    (1.8, 1361),
    (2.0, 1356),
    (2.1075, 1343.1),
    (2.2, 1270),
    (2.3005, 879.6),
    (2.4012, 836.0),
    (2.5, 887),
    (2.7075, 912.3),
    (3.0, 912),
    (3.5025, 907.8),
    (4.0, 936),
    (5.0, 936),
    (6.0, 875),
    (7.0, 739),
    (8.0, 550),
    (9.0, 404),
    (10.0, 272),
    (11.0025, 174.5),
    (12.0, 41),
    (13.0, 29.0),
    (14.0, 9.0),
    (16.0, 2.0),
)

# Edges of the telescope + filter + detector: (energy keV, optical depth at the edge, recovery
# exponent p), applied as exp(-tau (E/E_edge)^-p) above the edge (approx.).
AREA_EDGES: tuple[tuple[float, float, float], ...] = (
    (0.284, 1.05, 2.7),  # C K (filter polyimide, contamination)
    (0.410, 0.08, 2.7),  # N K (polyimide)
    (0.536, 0.24, 3.0),  # O K (polyimide, SiO2 dead layer)
    (1.559, 0.06, 2.7),  # Al K (filter)
    (1.846, 0.02, 2.7),  # Si K (dead layer)
    (2.236, 0.33, 2.0),  # Au M5 (mirror)
    (2.295, 0.06, 2.0),  # Au M4
    (2.745, 0.06, 2.0),  # Au M3
    (11.92, 1.90, 2.0),  # Au L3
)

# Extra filter layers relative to Thin: (optical depth at 1 keV, power-law slope, edge keV).
FILTER_LAYERS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "Thin1": (),
    "Thin2": (),
    "Medium": ((0.012, 2.6, 0.0),),  # +40 nm Al
    "Thick": ((0.021, 2.6, 0.0), (0.066, 2.9, 0.284), (0.13, 2.4, 0.49)),  # +70 nm Al, 330 nm PP, 45 nm Sn
}

# Columns of the redistribution knots (pn_canned), after the photon energy.
REDISTRIBUTION_COLUMNS = (
    "core_kev",
    "core_sigma_kev",
    "shoulder_fraction",
    "shoulder_low_kev",
    "plateau_fraction",
    "plateau_sigma_kev",
    "escape_fraction",
    "escape_kev",
    "escape_sigma_kev",
)
NO_ESCAPE_PEAK = {"escape_fraction": 0.0, "escape_kev": 0.05, "escape_sigma_kev": 0.05}  # below Si K
BAD_BELOW_KEV = 0.32  # SAS specgroup setbad=0.0:0.32 in the pipeline's source spectra

# Submode -> (RMF name token, live-time fraction).
SUBMODES: dict[str, tuple[str, float]] = {
    "PrimeFullWindow": ("ff", 0.994),
    "PrimeFullWindowExtended": ("ef", 0.977),
    "PrimeLargeWindow": ("lw", 0.947),
    "PrimeSmallWindow": ("sw", 0.710),
}
# CCD row band of the canned RMF (distance to the read-out, charge-transfer losses) -> FWHM scale.
ROW_BANDS: dict[int, float] = {3: 0.95, 6: 0.975, 9: 1.0}


@functools.cache
def energy_grid_kev() -> tuple[np.ndarray, np.ndarray]:
    """(ENERG_LO, ENERG_HI) of the canned matrices: 2067 bins from 0.05 to 16.005 keV."""
    edges = [np.array([pn_canned.ENERGY_GRID_START_KEV])]
    for width, count in pn_canned.ENERGY_BIN_SEGMENTS:
        edges.append(edges[-1][-1] + width * np.arange(1, count + 1))
    all_edges = np.round(np.concatenate(edges), 6)
    all_edges.setflags(write=False)
    return all_edges[:-1], all_edges[1:]


def energy_centres_kev() -> np.ndarray:
    lo, hi = energy_grid_kev()
    return 0.5 * (lo + hi)


@functools.cache
def channel_bounds_kev() -> tuple[np.ndarray, np.ndarray]:
    """(E_MIN, E_MAX) of PI channels 0..4095 as the canned matrices' EBOUNDS give them (float32
    values): ~5.37 eV wide at channel 0, 4.84-5.0 eV at 1-3 keV, exactly 5 eV above 3.015 keV."""
    edges = CHANNEL_WIDTH_KEV * np.arange(N_CHANNELS + 1, dtype=np.float64)
    edges[: pn_canned.EBOUNDS_LINEAR_FROM_CHANNEL] = pn_canned.EBOUNDS_LOW_E_MIN_KEV
    edges = edges.astype(np.float32).astype(np.float64)
    edges.setflags(write=False)
    return edges[:-1], edges[1:]


def channel_edges_kev() -> np.ndarray:
    lo, hi = channel_bounds_kev()
    return np.append(lo, hi[-1])


def source_spectrum_quality() -> np.ndarray:
    """QUALITY of a pipeline source spectrum (int16 per channel): 1 for the channels that reach
    below 0.32 keV (SAS specgroup `setbad=0.0:0.32` in the PPS; channels 0-60 by the canned EBOUNDS),
    0 elsewhere. Background spectra carry no QUALITY column (keyword QUALITY = 0)."""
    lo, _ = channel_bounds_kev()
    return (lo < BAD_BELOW_KEV).astype(np.int16)


def _edge_transmission(energy_kev: np.ndarray) -> np.ndarray:
    optical_depth = np.zeros_like(energy_kev, dtype=float)
    for edge_kev, tau, slope in AREA_EDGES:
        above = energy_kev >= edge_kev
        optical_depth[above] += tau * (energy_kev[above] / edge_kev) ** -slope
    return np.exp(-optical_depth)


def onaxis_area_thin_cm2(energy_kev: np.ndarray) -> np.ndarray:
    """On-axis effective area with the Thin filter (cm^2)."""
    energy_kev = np.asarray(energy_kev, dtype=float)
    table_e = np.array([e for e, _ in THIN_AREA_TABLE_KEV_CM2])
    table_a = np.array([a for _, a in THIN_AREA_TABLE_KEV_CM2], dtype=float)
    smooth = table_a / _edge_transmission(table_e)
    log_area = np.interp(np.log(energy_kev), np.log(table_e), np.log(smooth))
    return np.exp(log_area) * _edge_transmission(energy_kev)


def filter_transmission(energy_kev: np.ndarray, filter_name: str) -> np.ndarray:
    """Transmission of `filter_name` relative to the Thin filter (1 for Thin)."""
    if filter_name not in FILTER_LAYERS:
        raise ValueError(f"unknown pn filter {filter_name!r}; known: {', '.join(FILTER_LAYERS)}")
    energy_kev = np.asarray(energy_kev, dtype=float)
    optical_depth = np.zeros_like(energy_kev)
    for tau_1kev, slope, edge_kev in FILTER_LAYERS[filter_name]:
        tau = tau_1kev * energy_kev**-slope
        optical_depth += np.where(energy_kev >= edge_kev, tau, 0.3 * tau)
    return np.exp(-optical_depth)


def vignetting(energy_kev: np.ndarray, off_axis_arcmin: float) -> np.ndarray:
    """Fraction of the on-axis area at `off_axis_arcmin`: ~0.5 at 10' and 1.5 keV, less at high energy."""
    theta_50 = 10.0 * (np.maximum(np.asarray(energy_kev, dtype=float), 0.1) / 1.5) ** -0.15
    return 1.0 / (1.0 + (off_axis_arcmin / theta_50) ** 2)


def effective_area_cm2(energy_kev: np.ndarray, filter_name: str, off_axis_arcmin: float = 0.0) -> np.ndarray:
    """The ARF of a point source: on-axis Thin area x filter transmission x vignetting."""
    return (
        onaxis_area_thin_cm2(energy_kev)
        * filter_transmission(energy_kev, filter_name)
        * vignetting(energy_kev, off_axis_arcmin)
    )


def redistribution_parameters(energy_kev: np.ndarray) -> dict[str, np.ndarray]:
    """The row-shape parameters at `energy_kev` (keV): the knots of `pn_canned` interpolated linearly
    in ln E, never across the Si K edge (the shoulder jumps and the escape peak appears there)."""
    energy_kev = np.atleast_1d(np.asarray(energy_kev, dtype=float))
    below = np.array(pn_canned.REDISTRIBUTION_BELOW_SI_K)
    above = np.array(pn_canned.REDISTRIBUTION_ABOVE_SI_K)
    log_e = np.log(energy_kev)
    values = {}
    for column, name in enumerate(REDISTRIBUTION_COLUMNS, start=1):
        if column < below.shape[1]:
            low = np.interp(log_e, np.log(below[:, 0]), below[:, column])
        else:
            low = NO_ESCAPE_PEAK[name]
        high = np.interp(log_e, np.log(above[:, 0]), above[:, column])
        values[name] = np.where(energy_kev < SI_K_EDGE_KEV, low, high)
    return values


def fwhm_kev(energy_kev: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """FWHM of the core of the redistribution (keV): 0.10 keV at 0.5-1 keV, 0.13 at 2, 0.22 at 6.4."""
    shape = np.shape(energy_kev)
    sigma = redistribution_parameters(energy_kev)["core_sigma_kev"]
    return (scale * 2.3548 * sigma).reshape(shape)


def _gauss_cdf(x: np.ndarray, mean: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + erf((x - mean) / (np.sqrt(2.0) * sigma)))


def _gauss_cdf_integral(y: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Integral of the standard Gaussian CDF Phi(t/sigma) dt from -inf to y."""
    z = y / sigma
    return y * 0.5 * (1.0 + erf(z / np.sqrt(2.0))) + sigma * np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi)


def _uniform_cdf(x: np.ndarray, low: np.ndarray, high: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """CDF of a uniform distribution on [low, high] convolved with a Gaussian of `sigma`."""
    width = np.maximum(high - low, 1e-6)
    return (_gauss_cdf_integral(x - low, sigma) - _gauss_cdf_integral(x - high, sigma)) / width


def redistribution_matrix(fwhm_scale: float = 1.0, rows_per_block: int = 128) -> np.ndarray:
    """Dense redistribution [energy bin, channel] (float32), each row summing to 1, over the canned
    EBOUNDS. A row is a Gaussian core, a shoulder (uniform from `shoulder_low_kev` up to the core,
    smoothed by the core's sigma: incomplete charge collection of photons absorbed near the entrance
    window, strong below ~0.6 keV and above the Si K edge), a plateau from 0 up to the shoulder and,
    above the Si K edge, the Si K escape peak near E - 1.74 keV; below ~0.35 keV the core itself sits
    far below the photon energy. `fwhm_scale` widens the core and the escape peak (CCD row bands)."""
    energy = energy_centres_kev()
    channel_edges = channel_edges_kev()
    matrix = np.zeros((energy.size, N_CHANNELS), dtype=np.float32)
    for start in range(0, energy.size, rows_per_block):
        e = energy[start : start + rows_per_block]
        p = {name: value[:, None] for name, value in redistribution_parameters(e).items()}
        sigma = fwhm_scale * p["core_sigma_kev"]
        escape_sigma = fwhm_scale * p["escape_sigma_kev"]
        top = float(np.max(p["core_kev"] + 8.0 * sigma))
        n_used = min(N_CHANNELS, int(np.searchsorted(channel_edges, top)) + 2)
        x = channel_edges[None, : n_used + 1]
        f_shoulder, f_plateau, f_escape = p["shoulder_fraction"], p["plateau_fraction"], p["escape_fraction"]
        shoulder_low = np.maximum(p["shoulder_low_kev"], 1e-4)
        cdf = (
            (1.0 - f_shoulder - f_plateau - f_escape) * _gauss_cdf(x, p["core_kev"], sigma)
            + f_shoulder * _uniform_cdf(x, shoulder_low, p["core_kev"], sigma)
            + f_plateau * _uniform_cdf(x, 0.0, shoulder_low, p["plateau_sigma_kev"])
            + f_escape * _gauss_cdf(x, p["escape_kev"], escape_sigma)
        )
        block = np.clip(np.diff(cdf, axis=1), 0.0, None)
        block[block < 1e-9] = 0.0
        matrix[start : start + rows_per_block, :n_used] = block / block.sum(axis=1, keepdims=True)
    return matrix


@dataclass(frozen=True)
class CannedRMF:
    """One canned matrix: its RESPFILE stem (as the spectra name it) and its resolution."""

    submode: str
    row_band: int
    epoch: int = 3

    @property
    def stem(self) -> str:
        return f"epn_e{self.epoch}_{SUBMODES[self.submode][0]}20_sdY{self.row_band}"

    @property
    def fwhm_scale(self) -> float:
        return ROW_BANDS[self.row_band]

    def matrix(self) -> np.ndarray:
        return _cached_matrix(round(self.fwhm_scale, 6))


@functools.lru_cache(maxsize=16)
def _cached_matrix(fwhm_scale: float) -> np.ndarray:
    matrix = redistribution_matrix(fwhm_scale)
    matrix.setflags(write=False)
    return matrix


ONAXIS_RMF = CannedRMF("PrimeFullWindow", 9)


def livetime_fraction(submode: str) -> float:
    return SUBMODES[submode][1]


# --- background ---------------------------------------------------------------------------------
# Rates per arcmin^2 of extraction region (approx., quiescent pn full frame).
PARTICLE_CONTINUUM_CTS_S_ARCMIN2_KEV = 1.6e-4
PARTICLE_LINES_KEV_STRENGTH: tuple[tuple[float, float], ...] = (
    (1.487, 2.0e-5),
    (7.47, 3.0e-5),
    (8.04, 1.6e-4),
    (8.63, 6.0e-5),
    (8.90, 3.0e-5),
)
SKY_CXB_NORM_PER_ARCMIN2 = 10.9 / 1.1818e7  # 10.9 photons/cm^2/s/sr/keV at 1 keV, Gamma 1.42


def particle_background_rate(channel_scale: float = 1.0) -> np.ndarray:
    """Particle background per channel (counts/s/arcmin^2): flat continuum rising slightly at low
    energy, plus the fluorescence lines, broadened by the resolution."""
    lo, hi = channel_bounds_kev()
    centre = 0.5 * (lo + hi)
    continuum = PARTICLE_CONTINUUM_CTS_S_ARCMIN2_KEV * (1.0 + 0.6 * np.exp(-centre / 1.0))
    rate = continuum * (hi - lo)
    edges = np.append(lo, hi[-1])
    for line_kev, strength in PARTICLE_LINES_KEV_STRENGTH:
        sigma = float(fwhm_kev(line_kev)) / 2.3548
        rate = rate + strength * np.diff(_gauss_cdf(edges, line_kev, sigma))
    rate[centre < 0.15] = 0.0
    return channel_scale * rate


def soft_proton_rate() -> np.ndarray:
    """Soft-proton flare template per channel (counts/s/arcmin^2 at flare factor 1): a hard,
    unfolded power law (protons do not follow the photon response)."""
    lo, hi = channel_bounds_kev()
    centre = 0.5 * (lo + hi)
    rate = 2.0e-4 * np.maximum(centre, 0.2) ** -0.7 * np.exp(-centre / 12.0) * (hi - lo)
    rate[centre < 0.15] = 0.0
    return rate


def sky_photon_flux(energy_lo_kev: np.ndarray, energy_hi_kev: np.ndarray) -> np.ndarray:
    """Diffuse sky photons per arcmin^2 per energy bin (photons/cm^2/s): local hot bubble/halo thermal
    emission (kT 0.1 and 0.25 keV) and the absorbed cosmic X-ray background."""
    centre = 0.5 * (energy_lo_kev + energy_hi_kev)
    width = energy_hi_kev - energy_lo_kev
    absorption = physics.absorption(centre, 3e20)
    cxb = physics.powerlaw(centre, 1.42, SKY_CXB_NORM_PER_ARCMIN2) * absorption
    thermal = (
        physics.bremsstrahlung(centre, 0.1, 2e-5) + physics.bremsstrahlung(centre, 0.25, 7.5e-6) * absorption
    )
    return (cxb + thermal) * width
