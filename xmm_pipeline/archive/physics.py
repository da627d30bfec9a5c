"""Source spectra for the simulated archive: plain numpy functions of photon energy (keV).

Additive components return a photon flux density (photons/cm^2/s/keV) at `energy_kev`;
multiplicative ones a dimensionless transmission. Parameters broadcast against `energy_kev`, so a
column of parameters (shape [N, 1]) against a row of energies gives N spectra at once.

- Photoelectric absorption: Morrison & McCammon (1983, ApJ 270, 119), the piecewise quadratic fit
  sigma(E) = (c0 + c1 E + c2 E^2) E^-3 1e-24 cm^2 per H atom for solar abundances (their Table 2),
  extrapolated with the last segment above 10 keV.
- Continua: power law, cut-off power law, blackbody (Planck photon spectrum), multi-colour disc
  (sum of blackbodies with T(r) ~ r^-3/4 up to T_in), thermal bremsstrahlung.
- Collisional plasma (coronae, CVs): an approximation, not APEC. Bremsstrahlung continuum with a
  Gaunt factor ~(E/kT)^-0.3 plus the strong lines of C, N, O, Ne, Mg, Si, S, Ar, Ca and Fe; each
  line's equivalent width is log-normal in temperature around the temperature where its ion is most
  abundant (width 0.25 dex), with peak widths typical of solar-abundance plasmas (approx.).
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf

KEV_TO_ERG = 1.602176634e-9

# Morrison & McCammon (1983) Table 2: upper energy of each range (keV) and c0, c1, c2.
MM83_UPPER_KEV = np.array(
    [0.100, 0.284, 0.400, 0.532, 0.707, 0.867, 1.303, 1.840, 2.471, 3.210, 4.038, 7.111, 8.331, 10.000]
)
MM83_COEFFICIENTS = np.array(
    [
        [17.3, 608.1, -2150.0],
        [34.6, 267.9, -476.1],
        [78.1, 18.8, 4.3],
        [71.4, 66.8, -51.4],
        [95.5, 145.8, -61.1],
        [308.9, -380.6, 294.0],
        [120.6, 169.3, -47.7],
        [141.3, 146.8, -31.5],
        [202.7, 104.7, -17.0],
        [342.7, 18.7, 0.0],
        [352.2, 18.7, 0.0],
        [433.9, -2.4, 0.75],
        [629.0, 30.9, 0.0],
        [701.2, 25.2, 0.0],
    ]
)


def mm83_cross_section_cm2(energy_kev: np.ndarray) -> np.ndarray:
    """Photoelectric cross-section per hydrogen atom (cm^2), solar abundances, 0.03-10 keV."""
    energy = np.asarray(energy_kev, dtype=float)
    segment = np.minimum(np.searchsorted(MM83_UPPER_KEV, energy, side="right"), len(MM83_UPPER_KEV) - 1)
    c0, c1, c2 = MM83_COEFFICIENTS[segment].T
    return (c0 + c1 * energy + c2 * energy**2) / energy**3 * 1e-24


def absorption(energy_kev: np.ndarray, nh_cm2: np.ndarray | float) -> np.ndarray:
    """Transmission exp(-N_H sigma(E)) of a neutral absorber with column `nh_cm2`."""
    return np.exp(-np.asarray(nh_cm2) * mm83_cross_section_cm2(energy_kev))


def partial_covering(
    energy_kev: np.ndarray, nh_cm2: np.ndarray | float, covering_fraction: np.ndarray | float
) -> np.ndarray:
    """A fraction of the source behind column `nh_cm2`, the rest unabsorbed."""
    f = np.asarray(covering_fraction)
    return f * absorption(energy_kev, nh_cm2) + (1.0 - f)


def edge(energy_kev: np.ndarray, edge_kev: float, depth: float) -> np.ndarray:
    """An absorption edge: exp(-depth (E/E_edge)^-3) above `edge_kev`, 1 below."""
    energy = np.asarray(energy_kev, dtype=float)
    ratio = np.maximum(energy / edge_kev, 1e-3)
    return np.where(energy >= edge_kev, np.exp(-depth * ratio**-3), 1.0)


def gaussian_absorption(
    energy_kev: np.ndarray, line_kev: float, sigma_kev: float, depth: float
) -> np.ndarray:
    """A broad absorption feature (e.g. cyclotron-like, isolated neutron stars)."""
    return np.exp(-depth * np.exp(-0.5 * ((np.asarray(energy_kev) - line_kev) / sigma_kev) ** 2))


def powerlaw(
    energy_kev: np.ndarray, photon_index: np.ndarray | float, norm: np.ndarray | float = 1.0
) -> np.ndarray:
    """norm * E^-photon_index (norm: photons/cm^2/s/keV at 1 keV)."""
    return np.asarray(norm) * np.asarray(energy_kev, dtype=float) ** -np.asarray(photon_index)


def cutoff_powerlaw(
    energy_kev: np.ndarray,
    photon_index: np.ndarray | float,
    cutoff_kev: np.ndarray | float,
    norm: np.ndarray | float = 1.0,
) -> np.ndarray:
    return powerlaw(energy_kev, photon_index, norm) * np.exp(-np.asarray(energy_kev) / np.asarray(cutoff_kev))


def blackbody(
    energy_kev: np.ndarray, kt_kev: np.ndarray | float, norm: np.ndarray | float = 1.0
) -> np.ndarray:
    """Planck photon spectrum, XSPEC `bbody` normalisation (norm = L_39 / D_10^2)."""
    energy = np.asarray(energy_kev, dtype=float)
    kt = np.asarray(kt_kev, dtype=float)
    x = np.minimum(energy / kt, 700.0)
    return np.asarray(norm) * 8.0525 * energy**2 / (kt**4 * np.expm1(x))


def disc_blackbody(
    energy_kev: np.ndarray, kt_in_kev: np.ndarray | float, norm: np.ndarray | float = 1.0, n_rings: int = 32
) -> np.ndarray:
    """Multi-colour disc: blackbody rings with T(r) = T_in (r/r_in)^-3/4 out to 1000 r_in, area-weighted.

    Normalised so that the bolometric photon flux equals that of a blackbody at T_in with `norm`
    times the ring-weight sum; the shape (a nu^1/3 middle, Wien cut-off at kT_in) is what matters here.
    """
    log_radius = np.linspace(0.0, np.log(1000.0), n_rings)
    radius = np.exp(log_radius)
    weight = radius**2 * (log_radius[1] - log_radius[0])  # dA = 2 pi r dr = 2 pi r^2 dln r
    weight = weight / weight.sum()
    kt_in = np.asarray(kt_in_kev, dtype=float)[..., None]
    kt_ring = kt_in * radius**-0.75
    energy = np.asarray(energy_kev, dtype=float)[..., None]
    x = np.minimum(energy / kt_ring, 700.0)
    planck = energy**2 / np.expm1(x)
    return np.asarray(norm) * 8.0525 * (planck * weight).sum(axis=-1) / np.squeeze(kt_in, -1) ** 4


def bremsstrahlung(
    energy_kev: np.ndarray, kt_kev: np.ndarray | float, norm: np.ndarray | float = 1.0
) -> np.ndarray:
    """Thermal bremsstrahlung photon spectrum, Gaunt factor ~(E/kT)^-0.3 (approx.)."""
    energy = np.asarray(energy_kev, dtype=float)
    kt = np.asarray(kt_kev, dtype=float)
    x = energy / kt
    return np.asarray(norm) * kt**-0.5 * np.exp(-np.minimum(x, 700.0)) / energy * np.maximum(x, 1e-3) ** -0.3


def line_in_bins(
    energy_lo_kev: np.ndarray, energy_hi_kev: np.ndarray, line_kev: float, sigma_kev: float
) -> np.ndarray:
    """Fraction of a Gaussian line's photons falling in each energy bin (exact bin integrals, so
    lines narrower than the grid keep their flux)."""
    scale = np.sqrt(2.0) * sigma_kev
    return 0.5 * (erf((energy_hi_kev - line_kev) / scale) - erf((energy_lo_kev - line_kev) / scale))


# Plasma emission lines: (energy keV, label, temperature of peak emission keV, peak equivalent width eV)
# for solar abundances (approx.; from the temperature of maximum ion fraction and typical coronal and
# CV spectra, not a calculation).
PLASMA_LINES: tuple[tuple[float, str, float, float], ...] = (
    (0.367, "C VI", 0.13, 250.0),
    (0.431, "N VI", 0.10, 60.0),
    (0.500, "N VII", 0.17, 90.0),
    (0.569, "O VII", 0.17, 380.0),
    (0.654, "O VIII", 0.27, 300.0),
    (0.726, "Fe XVII", 0.35, 140.0),
    (0.775, "O VIII Lyb", 0.27, 60.0),
    (0.826, "Fe XVII", 0.35, 240.0),
    (0.873, "Fe XVIII", 0.55, 120.0),
    (0.922, "Ne IX", 0.30, 200.0),
    (0.965, "Fe XX", 0.85, 100.0),
    (1.022, "Ne X", 0.55, 150.0),
    (1.053, "Fe XXI-XXII", 1.0, 80.0),
    (1.125, "Fe XXIII-XXIV", 1.6, 80.0),
    (1.352, "Mg XI", 0.60, 80.0),
    (1.473, "Mg XII", 0.95, 60.0),
    (1.865, "Si XIII", 0.90, 100.0),
    (2.006, "Si XIV", 1.50, 60.0),
    (2.461, "S XV", 1.40, 80.0),
    (2.623, "S XVI", 2.30, 40.0),
    (3.140, "Ar XVII", 2.00, 40.0),
    (3.902, "Ca XIX", 3.00, 30.0),
    (6.700, "Fe XXV", 5.00, 450.0),
    (6.966, "Fe XXVI", 13.0, 200.0),
)
PLASMA_LINE_WIDTH_DEX = 0.25
PLASMA_LINE_ENERGIES_KEV = np.array([line[0] for line in PLASMA_LINES])


def plasma_line_equivalent_widths_kev(
    kt_kev: np.ndarray | float, abundance: np.ndarray | float = 1.0
) -> np.ndarray:
    """Equivalent width of each PLASMA_LINES line (keV) at temperature kT (last axis: lines)."""
    peak_kt = np.array([line[2] for line in PLASMA_LINES])
    peak_ew = np.array([line[3] for line in PLASMA_LINES]) * 1e-3
    kt = np.asarray(kt_kev, dtype=float)[..., None]
    log_offset = (np.log10(kt) - np.log10(peak_kt)) / PLASMA_LINE_WIDTH_DEX
    return np.asarray(abundance)[..., None] * peak_ew * np.exp(-0.5 * log_offset**2)


def plasma_in_bins(
    energy_lo_kev: np.ndarray,
    energy_hi_kev: np.ndarray,
    kt_kev: float,
    norm: float = 1.0,
    abundance: float = 1.0,
) -> np.ndarray:
    """Photons/cm^2/s per energy bin of a one-temperature collisional plasma (continuum + lines)."""
    centre = 0.5 * (energy_lo_kev + energy_hi_kev)
    continuum = bremsstrahlung(centre, kt_kev, norm)
    photons = continuum * (energy_hi_kev - energy_lo_kev)
    widths = plasma_line_equivalent_widths_kev(kt_kev, abundance)
    line_photons = widths * bremsstrahlung(PLASMA_LINE_ENERGIES_KEV, kt_kev, norm)
    return photons + line_photons @ _line_profiles(energy_lo_kev, energy_hi_kev)


_PROFILE_CACHE: dict[tuple, np.ndarray] = {}


def _line_profiles(energy_lo_kev: np.ndarray, energy_hi_kev: np.ndarray) -> np.ndarray:
    """[line, bin] share of each plasma line's photons per bin (thermal width 0.2% of E), cached per grid."""
    key = (energy_lo_kev.size, float(energy_lo_kev[0]), float(energy_hi_kev[-1]), float(energy_lo_kev.sum()))
    if key not in _PROFILE_CACHE:
        _PROFILE_CACHE[key] = np.stack(
            [line_in_bins(energy_lo_kev, energy_hi_kev, e, 2e-3 * e) for e in PLASMA_LINE_ENERGIES_KEV]
        )
    return _PROFILE_CACHE[key]


def energy_flux_erg_cm2_s(
    energy_lo_kev: np.ndarray,
    energy_hi_kev: np.ndarray,
    photons_per_bin: np.ndarray,
    band_kev: tuple[float, float] = (0.2, 12.0),
) -> np.ndarray:
    """Energy flux in a band of a spectrum given as photons/cm^2/s per bin (last axis: bins)."""
    centre = 0.5 * (energy_lo_kev + energy_hi_kev)
    inside = (centre >= band_kev[0]) & (centre < band_kev[1])
    return (photons_per_bin[..., inside] * centre[inside]).sum(axis=-1) * KEV_TO_ERG
