"""The EPIC-pn response used by the simulator: energy grid, effective area, redistribution, background.

A parametric model of the instrument, calibrated against the facts in the brief (section 5) and
checked in the tests against a real canned RMF and on-axis ARF (same folded counts within 10% per
bin over 0.5-9 keV); it does not read any calibration file. Numbers marked (approx.) are tuned by
eye to the real files' shapes, not calibration.

- Energy grid: 2067 bins from 0.05 keV, 1 eV wide around the C, O, Al, Si and Au edges, 3 eV at
  0.3-1.5 keV, 15 eV elsewhere (the structure of the canned matrices). Channels: PI 0..4095, 5 eV.
- Effective area: the on-axis Thin-filter table of the brief, interpolated log-log after dividing out
  edge transmissions exp(-tau (E/E_edge)^-p) for E >= E_edge, which are multiplied back, so the area
  goes through every table value and drops sharply at each edge. Medium/Thick filters: extra Al,
  polypropylene and Sn layers. Off-axis: vignetting 1 / (1 + (theta/theta_50(E))^2), theta_50 ~10'
  at 1.5 keV and smaller at higher energy.
- Redistribution: a Gaussian core with FWHM(E) of the brief; a low-energy shelf (incomplete charge
  collection; strong below ~0.6 keV and just above the Si K edge, where photons are absorbed near the
  entrance window), flat from E - w(E) to E; the Si K escape peak at E - 1.74 keV above 1.839 keV;
  below ~0.35 keV the core itself sits at about half the photon energy, so a soft blackbody leaks
  into the 0.3-10 keV channels as the brief says (6/1.5/0.5% at kT 50/80/120 eV).
- Background: particle continuum with the Al, Ni, Cu, Zn fluorescence lines (not vignetted, flat-ish,
  dominating above ~5 keV), soft X-ray sky (0.1 + 0.25 keV plasma-like thermal and the absorbed
  cosmic X-ray background, folded through the response), optional soft-proton flare component.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from xmm_pipeline.archive import physics

N_CHANNELS = 4096
CHANNEL_WIDTH_KEV = 0.005
SI_K_EDGE_KEV = 1.839
SI_ESCAPE_KEV = 1.74

# (start keV, width keV, number of bins): the canned matrices' energy grid structure.
ENERGY_SEGMENTS: tuple[tuple[float, float, int], ...] = (
    (0.050, 0.001, 250),
    (0.300, 0.003, 72),
    (0.516, 0.001, 36),
    (0.552, 0.003, 332),
    (1.548, 0.001, 51),
    (1.599, 0.015, 8),
    (1.719, 0.001, 186),
    (1.905, 0.015, 19),
    (2.190, 0.001, 210),
    (2.400, 0.015, 903),
)

# On-axis Thin-filter effective area (brief section 5), keV -> cm^2, extended (approx.) below 0.2 keV
# and above 12 keV where the brief gives no value.
THIN_AREA_TABLE_KEV_CM2: tuple[tuple[float, float], ...] = (
    (0.05, 20.0),
    (0.1, 160.0),
    (0.15, 265.0),
    (0.2, 461),
    (0.3, 277),
    (0.4, 738),
    (0.5, 932),
    (0.6, 958),
    (0.8, 1177),
    (1.0, 1278),
    (1.2, 1335),
    (1.5, 1383),
    (1.8, 1361),
    (2.0, 1356),
    (2.2, 1270),
    (2.5, 887),
    (3.0, 912),
    (4.0, 936),
    (5.0, 936),
    (6.0, 875),
    (7.0, 739),
    (8.0, 550),
    (9.0, 404),
    (10.0, 272),
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

# Energy resolution: FWHM (keV) of the Gaussian core (brief section 5; 12 keV extrapolated).
FWHM_TABLE_KEV: tuple[tuple[float, float], ...] = (
    (0.05, 0.10),
    (0.5, 0.10),
    (1.0, 0.10),
    (2.0, 0.13),
    (4.0, 0.17),
    (6.4, 0.22),
    (8.0, 0.25),
    (12.0, 0.30),
    (16.0, 0.34),
)
# Fraction of events in the low-energy shelf (approx.), below and above the Si K edge.
SHELF_BELOW_SI_K: tuple[tuple[float, float], ...] = (
    (0.05, 0.75),
    (0.3, 0.70),
    (0.4, 0.55),
    (0.5, 0.42),
    (0.6, 0.31),
    (0.7, 0.22),
    (0.8, 0.165),
    (1.0, 0.11),
    (1.2, 0.068),
    (1.5, 0.042),
    (1.839, 0.026),
)
CORE_CENTROID_RATIO: tuple[tuple[float, float], ...] = (
    (0.05, 0.45),
    (0.28, 0.47),
    (0.32, 0.55),
    (0.36, 0.85),
    (0.40, 0.95),
    (0.50, 0.99),
    (0.60, 1.0),
)
SHELF_ABOVE_SI_K: tuple[tuple[float, float], ...] = (
    (1.839, 0.17),
    (2.0, 0.11),
    (2.5, 0.068),
    (3.0, 0.046),
    (4.0, 0.026),
    (5.0, 0.017),
    (6.0, 0.012),
    (8.0, 0.009),
    (16.0, 0.006),
)

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
    """(ENERG_LO, ENERG_HI) of the response: 2067 bins from 0.05 to 15.945 keV."""
    edges = [np.array([ENERGY_SEGMENTS[0][0]])]
    for start, width, count in ENERGY_SEGMENTS:
        edges.append(start + width * np.arange(1, count + 1))
    all_edges = np.round(np.concatenate(edges), 6)
    all_edges.setflags(write=False)
    return all_edges[:-1], all_edges[1:]


def energy_centres_kev() -> np.ndarray:
    lo, hi = energy_grid_kev()
    return 0.5 * (lo + hi)


@functools.cache
def channel_bounds_kev() -> tuple[np.ndarray, np.ndarray]:
    """(E_MIN, E_MAX) of PI channels 0..4095."""
    edges = CHANNEL_WIDTH_KEV * np.arange(N_CHANNELS + 1)
    return edges[:-1], edges[1:]


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


def fwhm_kev(energy_kev: np.ndarray, scale: float = 1.0) -> np.ndarray:
    table_e, table_f = np.array(FWHM_TABLE_KEV).T
    return scale * np.interp(np.asarray(energy_kev, dtype=float), table_e, table_f)


def shelf_fraction(energy_kev: np.ndarray) -> np.ndarray:
    energy_kev = np.asarray(energy_kev, dtype=float)
    below_e, below_f = np.array(SHELF_BELOW_SI_K).T
    above_e, above_f = np.array(SHELF_ABOVE_SI_K).T
    below = np.exp(np.interp(np.log(energy_kev), np.log(below_e), np.log(below_f)))
    above = np.exp(np.interp(np.log(energy_kev), np.log(above_e), np.log(above_f)))
    return np.where(energy_kev < SI_K_EDGE_KEV, below, above)


def core_centroid_ratio(energy_kev: np.ndarray) -> np.ndarray:
    """Where the core of the redistribution sits relative to the photon energy: photons below ~0.35 keV
    are registered at about half their energy (incomplete charge collection near the entrance window;
    approx., read off the canned matrices), so they rarely reach the channels above 0.3 keV."""
    table_e, table_r = np.array(CORE_CENTROID_RATIO).T
    return np.interp(np.asarray(energy_kev, dtype=float), table_e, table_r)


def escape_fraction(energy_kev: np.ndarray) -> np.ndarray:
    """Share of events in the Si K escape peak (approx.): ~2% at 2 keV falling to ~0.1% at 10 keV."""
    energy_kev = np.asarray(energy_kev, dtype=float)
    return np.where(energy_kev > SI_K_EDGE_KEV, 0.022 * np.exp(-(energy_kev - 2.0) / 3.0), 0.0)


def _gauss_cdf(x: np.ndarray, mean: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + erf((x - mean) / (np.sqrt(2.0) * sigma)))


def _gauss_cdf_integral(y: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Integral of the standard Gaussian CDF Phi(t/sigma) dt from -inf to y."""
    z = y / sigma
    return y * 0.5 * (1.0 + erf(z / np.sqrt(2.0))) + sigma * np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi)


def redistribution_matrix(fwhm_scale: float = 1.0, rows_per_block: int = 128) -> np.ndarray:
    """Dense redistribution [energy bin, channel] (float32), each row summing to 1."""
    energy = energy_centres_kev()
    matrix = np.zeros((energy.size, N_CHANNELS), dtype=np.float32)
    for start in range(0, energy.size, rows_per_block):
        e = energy[start : start + rows_per_block, None]
        sigma = fwhm_kev(e, fwhm_scale) / 2.3548
        n_used = min(N_CHANNELS, int((e.max() + 8.0 * sigma.max()) / CHANNEL_WIDTH_KEV) + 2)
        edges = CHANNEL_WIDTH_KEV * np.arange(n_used + 1)
        f_shelf = shelf_fraction(e)
        f_escape = escape_fraction(e)
        core_cdf = _gauss_cdf(edges[None, :], e * core_centroid_ratio(e), sigma)
        shelf_low = np.maximum(0.02, e - np.minimum(1.1, 0.8 * e))
        width = e - shelf_low
        shelf_cdf = (
            _gauss_cdf_integral(edges[None, :] - shelf_low, sigma)
            - _gauss_cdf_integral(edges[None, :] - e, sigma)
        ) / width
        escape_e = np.maximum(e - SI_ESCAPE_KEV, 0.05)
        escape_cdf = _gauss_cdf(edges[None, :], escape_e, fwhm_kev(escape_e, fwhm_scale) / 2.3548)
        cdf = (1.0 - f_shelf - f_escape) * core_cdf + f_shelf * shelf_cdf + f_escape * escape_cdf
        block = np.diff(cdf, axis=1)
        block[block < 1e-7] = 0.0
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
    rate = continuum * CHANNEL_WIDTH_KEV
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
    rate = 2.0e-4 * np.maximum(centre, 0.2) ** -0.7 * np.exp(-centre / 12.0) * CHANNEL_WIDTH_KEV
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
