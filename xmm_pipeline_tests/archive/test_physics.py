"""Source spectra: the published cross-section, the shapes of the continua, the plasma lines, every class."""

from __future__ import annotations

import numpy as np
import pytest

from xmm_pipeline.archive import physics
from xmm_pipeline.archive.instrument import energy_grid_kev
from xmm_pipeline.archive.sources import CLASSES, draw_source, epoch_params, photon_spectrum


def test_mm83_cross_section_values_and_edges() -> None:
    # (c0 + c1 E + c2 E^2) / E^3 * 1e-24 with the 0.867-1.303 keV coefficients at 1 keV
    assert physics.mm83_cross_section_cm2(np.array([1.0]))[0] == pytest.approx(2.422e-22, rel=1e-3)
    assert physics.absorption(np.array([1.0]), 1e22)[0] == pytest.approx(np.exp(-2.422), rel=1e-3)
    for edge_kev in (0.284, 0.532, 7.111):  # C, O, Fe K
        below, above = physics.mm83_cross_section_cm2(np.array([edge_kev - 1e-4, edge_kev + 1e-4]))
        assert above > 1.1 * below
    energy = np.geomspace(0.1, 10.0, 200)
    sigma = physics.mm83_cross_section_cm2(energy)
    assert np.all(sigma > 0) and sigma[0] > 1e3 * sigma[-1]


def test_continuum_shapes() -> None:
    energy = np.geomspace(0.01, 5.0, 4000)
    kt = 0.1
    assert energy[np.argmax(physics.blackbody(energy, kt))] == pytest.approx(1.594 * kt, rel=0.02)
    slope = np.diff(np.log(physics.powerlaw(energy, 1.7))) / np.diff(np.log(energy))
    assert np.allclose(slope, -1.7)
    # multi-colour disc: N(E) ~ E^-2/3 well below kT_in, Wien cut-off above
    low = np.array([0.05, 0.2])
    disc = physics.disc_blackbody(low, 1.0)
    assert np.log(disc[1] / disc[0]) / np.log(4.0) == pytest.approx(-2.0 / 3.0, abs=0.12)
    assert (
        physics.disc_blackbody(np.array([8.0]), 1.0)[0]
        < 1e-2 * physics.disc_blackbody(np.array([1.0]), 1.0)[0]
    )
    ratio = physics.cutoff_powerlaw(np.array([6.0]), 1.5, 6.0) / physics.powerlaw(np.array([6.0]), 1.5)
    assert ratio[0] == pytest.approx(np.exp(-1.0))
    covered = physics.partial_covering(np.array([0.5]), 1e23, 0.6)[0]
    assert covered == pytest.approx(0.4, abs=1e-3)


def test_plasma_lines_follow_temperature() -> None:
    lo, hi = energy_grid_kev()
    centre = 0.5 * (lo + hi)
    cool = physics.plasma_in_bins(lo, hi, 0.3)
    continuum = physics.bremsstrahlung(centre, 0.3) * (hi - lo)
    soft = (centre > 0.5) & (centre < 1.2)
    assert (cool[soft].sum() - continuum[soft].sum()) / cool[soft].sum() > 0.5  # coronae are line-dominated
    fe_xxv = np.searchsorted(hi, 6.70)
    widths = physics.plasma_line_equivalent_widths_kev(np.array([1.0, 5.0]))
    labels = [line[1] for line in physics.PLASMA_LINES]
    assert widths[1, labels.index("Fe XXV")] > 10 * widths[0, labels.index("Fe XXV")]
    assert widths[0, labels.index("O VIII")] > widths[1, labels.index("O VIII")]
    hot = physics.plasma_in_bins(lo, hi, 6.0)
    assert hot[fe_xxv] > 5 * physics.bremsstrahlung(centre[fe_xxv], 6.0) * (hi - lo)[fe_xxv]


@pytest.mark.parametrize("klass", CLASSES)
def test_every_class_has_the_requested_flux(klass: str) -> None:
    lo, hi = energy_grid_kev()
    rng = np.random.default_rng(3)
    for _ in range(5):
        params = {**draw_source(rng, klass), "flux_erg_cm2_s": 3e-13}
        photons = photon_spectrum(params, lo, hi)
        assert np.all(np.isfinite(photons)) and np.all(photons >= 0)
        assert physics.energy_flux_erg_cm2_s(lo, hi, photons) == pytest.approx(3e-13, rel=1e-9)


def _mean_energy(params: dict, lo: np.ndarray, hi: np.ndarray) -> float:
    photons = photon_spectrum(params, lo, hi)
    centre = 0.5 * (lo + hi)
    band = (centre > 0.3) & (centre < 10.0)
    return float((photons * centre)[band].sum() / photons[band].sum())


def test_tdes_fade_cool_and_harden_late_and_xrbs_go_through_an_outburst() -> None:
    lo, hi = energy_grid_kev()
    rng = np.random.default_rng(4)
    tde = draw_source(rng, "TDE")
    days = [0.0, 60.0, 180.0, 700.0]
    epochs = [epoch_params(tde, i, t, len(days), rng) for i, t in enumerate(days)]
    fluxes = [factor for _, factor in epochs]
    assert fluxes == sorted(fluxes, reverse=True) and fluxes[-1] < 0.05
    temperatures = [p["kt_kev"] for p, _ in epochs]
    assert temperatures == sorted(temperatures, reverse=True)
    assert _mean_energy(epochs[-1][0], lo, hi) > _mean_energy(epochs[1][0], lo, hi)  # late hardening

    xrb = draw_source(rng, "XRB")
    states = [epoch_params(xrb, i, 20.0 * i, 7, rng)[0]["state"] for i in range(7)]
    assert states[0] == "hard" and states[-1] == "hard" and "thermal" in states
