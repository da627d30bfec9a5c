"""The simulated sky: source classes, their spectral parameters, and how they change between epochs.

A source's parameters are a flat JSON-able dict (the `source_params` of `simulate_observation`):

    {"class": "AGN", "flux_erg_cm2_s": 2e-13, "nh_gal_cm2": 3e20, "photon_index": 1.9,
     "nh_cm2": 1e22, "redshift": 0.3, ...}

Common keys: `class` (AGN, star, CV, XRB, ULX, NS, pulsar, TDE, odd), `flux_erg_cm2_s` (observed,
absorbed 0.2-12 keV energy flux; default 1e-12) and `nh_gal_cm2` (Galactic column; default 3e20).
Per class (all optional, with the defaults in `_DEFAULTS`):
    AGN     photon_index, nh_cm2 (intrinsic, at the redshift), redshift, scattered_fraction,
            soft_excess_kt_kev, soft_excess_ratio (blackbody / power law at 0.5 keV rest),
            fe_line_ew_kev; a changing-look soft state sets bb_only_kt_kev (a blackbody with a
            residual power law of pl_residual at 2 keV)
    star    kt1_kev, kt2_kev, em_ratio (EM2/EM1), abundance
    CV      kt_max_kev, nh_pc_cm2, covering_fraction, fe_line_ew_kev
    XRB     state (thermal|hard|steep), disc_kt_kev, photon_index, disc_ratio (disc / power law at
            2 keV), fe_line_kev, fe_line_ew_kev
    ULX     disc_kt_kev, photon_index, cutoff_kev, hot_disc_kt_kev (two-thermal variant if > 0)
    NS      kt_kev, kt2_kev, bb2_ratio, feature_kev, feature_sigma_kev, feature_depth
    pulsar  kt_kev, photon_index, pl_ratio (power law / blackbody at 1 keV)
    TDE     kt_kev, pl_ratio (late-time power law / blackbody at 1 keV)
    odd     kind (line|edge|inverted), line_kev, line_ew_kev, edge_kev, edge_depth, photon_index
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from xmm_pipeline.archive import physics

CLASSES = ("AGN", "star", "CV", "XRB", "ULX", "NS", "pulsar", "TDE", "odd")
# Serendipitous source mix (brief section 6): ~50% AGN, ~40% stars, ~10% compact, TDEs rare,
# a few per mille odd spectra.
CLASS_FRACTIONS = {
    "AGN": 0.50,
    "star": 0.40,
    "CV": 0.025,
    "XRB": 0.025,
    "ULX": 0.015,
    "NS": 0.012,
    "pulsar": 0.012,
    "TDE": 0.006,
    "odd": 0.005,
}
DEFAULT_ODD_FRACTION = CLASS_FRACTIONS["odd"]
XRB_STATES = ("thermal", "hard", "steep")


def class_fractions(odd_fraction: float = DEFAULT_ODD_FRACTION) -> dict[str, float]:
    """The serendipitous class mix with `odd_fraction` odd spectra, the other classes scaled to keep
    their proportions (an evaluation archive needs enough odd spectra to measure outlier recall)."""
    if not 0.0 <= odd_fraction <= 1.0:
        raise ValueError(f"odd_fraction must be within 0..1, got {odd_fraction}")
    if odd_fraction == DEFAULT_ODD_FRACTION:
        return dict(CLASS_FRACTIONS)
    scale = (1.0 - odd_fraction) / (1.0 - DEFAULT_ODD_FRACTION)
    return {name: odd_fraction if name == "odd" else share * scale for name, share in CLASS_FRACTIONS.items()}

CHANGING_LOOK_IAUNAME = "4XMM J192719.5+653354"
CHANGING_LOOK_RA_DEG = 291.8313
CHANGING_LOOK_DEC_DEG = 65.5650
# 1ES 1927+654-like history: (MJD, state, parameters, flux erg/cm^2/s).
CHANGING_LOOK_EPOCHS: tuple[tuple[float, str, dict[str, float], float], ...] = (
    (
        55696.0,
        "powerlaw",
        {"photon_index": 2.4, "soft_excess_kt_kev": 0.17, "soft_excess_ratio": 0.6},
        2.0e-12,
    ),
    (58300.0, "soft_bb", {"bb_only_kt_kev": 0.080, "pl_residual": 0.02}, 2.5e-13),
    (58440.0, "soft_bb", {"bb_only_kt_kev": 0.110, "pl_residual": 0.02}, 4.0e-13),
    (58610.0, "soft_bb", {"bb_only_kt_kev": 0.150, "pl_residual": 0.03}, 6.0e-13),
    (58790.0, "soft_bb", {"bb_only_kt_kev": 0.180, "pl_residual": 0.04}, 8.0e-13),
    (58960.0, "soft_bb", {"bb_only_kt_kev": 0.200, "pl_residual": 0.05}, 1.0e-12),
    (
        59580.0,
        "powerlaw",
        {"photon_index": 2.6, "soft_excess_kt_kev": 0.15, "soft_excess_ratio": 1.0},
        1.5e-12,
    ),
    (
        59950.0,
        "powerlaw",
        {"photon_index": 2.4, "soft_excess_kt_kev": 0.16, "soft_excess_ratio": 0.7},
        1.8e-12,
    ),
)

_DEFAULTS: dict[str, dict[str, Any]] = {
    "AGN": {
        "photon_index": 1.9,
        "nh_cm2": 0.0,
        "redshift": 0.0,
        "scattered_fraction": 0.0,
        "soft_excess_kt_kev": 0.15,
        "soft_excess_ratio": 0.0,
        "fe_line_ew_kev": 0.0,
        "bb_only_kt_kev": 0.0,
        "pl_residual": 0.0,
    },
    "star": {"kt1_kev": 0.3, "kt2_kev": 0.9, "em_ratio": 0.7, "abundance": 0.5},
    "CV": {"kt_max_kev": 20.0, "nh_pc_cm2": 3e22, "covering_fraction": 0.5, "fe_line_ew_kev": 0.1},
    "XRB": {
        "state": "hard",
        "disc_kt_kev": 1.0,
        "photon_index": 1.7,
        "disc_ratio": 0.05,
        "fe_line_kev": 6.5,
        "fe_line_ew_kev": 0.08,
    },
    "ULX": {"disc_kt_kev": 0.3, "photon_index": 1.3, "cutoff_kev": 6.0, "hot_disc_kt_kev": 0.0},
    "NS": {
        "kt_kev": 0.08,
        "kt2_kev": 0.2,
        "bb2_ratio": 0.0,
        "feature_kev": 0.4,
        "feature_sigma_kev": 0.08,
        "feature_depth": 0.0,
    },
    "pulsar": {"kt_kev": 0.15, "photon_index": 1.6, "pl_ratio": 1.0},
    "TDE": {"kt_kev": 0.07, "pl_ratio": 0.0},
    "odd": {
        "kind": "line",
        "line_kev": 2.5,
        "line_ew_kev": 5.0,
        "edge_kev": 3.0,
        "edge_depth": 3.0,
        "photon_index": 1.8,
    },
}


def with_defaults(params: dict[str, Any]) -> dict[str, Any]:
    klass = params.get("class")
    if klass not in _DEFAULTS:
        raise ValueError(f"source_params['class'] must be one of {', '.join(CLASSES)}, got {klass!r}")
    return {"flux_erg_cm2_s": 1e-12, "nh_gal_cm2": 3e20, **_DEFAULTS[klass], **params}


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def draw_source(rng: np.random.Generator, klass: str) -> dict[str, Any]:
    """Base parameters of a new source of `klass` (before its epochs vary them)."""
    p: dict[str, Any] = {"class": klass, "nh_gal_cm2": _log_uniform(rng, 1e20, 1.5e21)}
    if klass == "AGN":
        absorbed = rng.random() < 0.35
        p.update(
            photon_index=float(np.clip(rng.normal(1.9, 0.3), 1.2, 3.0)),
            nh_cm2=_log_uniform(rng, 1e22, 1e24) if absorbed else _log_uniform(rng, 1e20, 3e21),
            redshift=_log_uniform(rng, 0.02, 2.5),
            scattered_fraction=float(rng.uniform(0.01, 0.05)) if absorbed else 0.0,
            soft_excess_kt_kev=float(rng.uniform(0.1, 0.2)),
            soft_excess_ratio=float(rng.uniform(0.3, 2.5)) if rng.random() < 0.5 else 0.0,
            fe_line_ew_kev=float(rng.uniform(0.05, 0.2)) if rng.random() < 0.6 else 0.0,
        )
    elif klass == "star":
        p.update(
            nh_gal_cm2=_log_uniform(rng, 1e19, 5e20),
            kt1_kev=float(rng.uniform(0.2, 0.4)),
            kt2_kev=float(rng.uniform(0.7, 1.1)),
            em_ratio=float(rng.uniform(0.3, 1.5)),
            abundance=float(rng.uniform(0.2, 1.0)),
        )
    elif klass == "CV":
        p.update(
            kt_max_kev=float(rng.uniform(10.0, 30.0)),
            nh_pc_cm2=_log_uniform(rng, 1e22, 1e23),
            covering_fraction=float(rng.uniform(0.3, 0.8)),
            fe_line_ew_kev=float(rng.uniform(0.05, 0.15)),
        )
    elif klass == "XRB":
        p.update(
            nh_gal_cm2=_log_uniform(rng, 1e21, 1e23),
            state=str(rng.choice(XRB_STATES)),
            disc_kt_kev=float(rng.uniform(0.7, 1.5)),
            photon_index=float(rng.uniform(1.4, 2.1)),
            disc_ratio=0.05,
            fe_line_kev=float(rng.uniform(6.4, 6.7)),
            fe_line_ew_kev=float(rng.uniform(0.05, 0.15)),
        )
        p.update(xrb_state_params(p, p["state"], rng))
    elif klass == "ULX":
        two_thermal = rng.random() < 0.35
        p.update(
            nh_gal_cm2=_log_uniform(rng, 1e20, 5e21),
            disc_kt_kev=float(rng.uniform(0.2, 0.4)),
            photon_index=float(rng.uniform(1.0, 1.6)),
            cutoff_kev=float(rng.uniform(5.0, 8.0)),
            hot_disc_kt_kev=float(rng.uniform(1.5, 2.5)) if two_thermal else 0.0,
        )
    elif klass == "NS":
        p.update(
            nh_gal_cm2=_log_uniform(rng, 1e20, 5e20),
            kt_kev=float(rng.uniform(0.05, 0.12)),
            kt2_kev=float(rng.uniform(0.15, 0.3)),
            bb2_ratio=float(rng.uniform(0.05, 0.3)) if rng.random() < 0.4 else 0.0,
            feature_kev=float(rng.uniform(0.3, 0.5)),
            feature_sigma_kev=float(rng.uniform(0.05, 0.1)),
            feature_depth=float(rng.uniform(0.5, 1.5)) if rng.random() < 0.5 else 0.0,
        )
    elif klass == "pulsar":
        p.update(
            nh_gal_cm2=_log_uniform(rng, 1e20, 5e21),
            kt_kev=float(rng.uniform(0.08, 0.3)),
            photon_index=float(rng.uniform(1.2, 2.0)),
            pl_ratio=_log_uniform(rng, 0.3, 5.0),
        )
    elif klass == "TDE":
        p.update(
            nh_gal_cm2=_log_uniform(rng, 1e20, 1e21), kt_kev=float(rng.uniform(0.05, 0.10)), pl_ratio=0.0
        )
    elif klass == "odd":
        kind = str(rng.choice(["line", "edge", "inverted"]))
        p.update(
            nh_gal_cm2=_log_uniform(rng, 1e20, 5e20),
            kind=kind,
            line_kev=float(rng.uniform(0.8, 5.0)),
            line_ew_kev=float(rng.uniform(3.0, 10.0)),
            edge_kev=float(rng.uniform(1.2, 5.0)),
            edge_depth=float(rng.uniform(2.0, 4.0)),
            photon_index=float(rng.uniform(-1.0, 0.0)) if kind == "inverted" else 1.8,
        )
    else:
        raise ValueError(f"unknown source class {klass!r}")
    return with_defaults(p)


def xrb_state_params(base: dict[str, Any], state: str, rng: np.random.Generator) -> dict[str, Any]:
    """The spectral parameters of an X-ray binary in `state` (brief section 6)."""
    if state == "thermal":
        return {
            "state": state,
            "disc_kt_kev": float(rng.uniform(0.7, 1.5)),
            "photon_index": 2.2,
            "disc_ratio": float(rng.uniform(5.0, 20.0)),
        }
    if state == "steep":
        return {
            "state": state,
            "disc_kt_kev": float(rng.uniform(0.8, 1.3)),
            "photon_index": float(rng.uniform(2.4, 3.0)),
            "disc_ratio": float(rng.uniform(0.3, 1.0)),
        }
    return {
        "state": "hard",
        "disc_kt_kev": float(rng.uniform(0.2, 0.4)),
        "photon_index": float(rng.uniform(1.4, 2.1)),
        "disc_ratio": 0.05,
    }


def source_state(params: dict[str, Any]) -> str:
    """A short label of the spectral state, recorded in the truth table."""
    klass = params["class"]
    if klass == "AGN":
        if params.get("bb_only_kt_kev", 0.0) > 0:
            return "soft_bb"
        if params["nh_cm2"] >= 1e22:
            return "absorbed"
        return "soft_excess" if params["soft_excess_ratio"] > 0 else "unabsorbed"
    if klass == "XRB":
        return str(params["state"]) + "_state"
    if klass == "star":
        return "flare" if params.get("flaring") else "quiescent"
    if klass == "ULX":
        return "two_thermal" if params["hot_disc_kt_kev"] > 0 else "cutoff_pl"
    if klass == "NS":
        return "bb_feature" if params["feature_depth"] > 0 else "bb"
    if klass == "TDE":
        return "late_hard" if params["pl_ratio"] > 0.05 else "thermal"
    if klass == "odd":
        return str(params["kind"])
    if klass == "CV":
        return "partial_covering"
    return "bb_pl"


def epoch_params(
    base: dict[str, Any], epoch: int, days_since_first: float, n_epochs: int, rng: np.random.Generator
) -> tuple[dict[str, Any], float]:
    """Parameters at one epoch and the flux relative to the first epoch.

    TDEs fade (t^-5/3 after a ~30-day plateau) and cool, with a power law that grows late
    (hardening); X-ray binaries go through an outburst hard -> soft (thermal/steep) -> hard and
    brighten at the peak; stars occasionally flare (hotter, brighter); others vary mildly.
    """
    p = dict(base)
    klass = p["class"]
    if epoch == 0 and klass not in ("TDE", "XRB"):
        return p, 1.0
    if klass == "TDE":
        t = max(days_since_first, 0.0)
        p["kt_kev"] = base["kt_kev"] * max(0.55, 1.0 - 0.15 * math.log10(1.0 + t / 30.0))
        p["pl_ratio"] = 0.0 if t < 200 else min(0.6, 0.05 * (t / 200.0) ** 1.5)
        return p, (1.0 + t / 30.0) ** (-5.0 / 3.0)
    if klass == "XRB":
        phase = epoch / max(n_epochs - 1, 1)
        state = (
            "hard" if phase < 0.2 or phase > 0.8 else ("steep" if phase < 0.35 or phase > 0.65 else "thermal")
        )
        p.update(xrb_state_params(base, state, rng))
        peak = 4.0 * math.exp(-0.5 * ((phase - 0.5) / 0.22) ** 2)
        return p, float((0.3 + peak) / (0.3 + 4.0 * math.exp(-0.5 * (0.5 / 0.22) ** 2)))
    if klass == "star" and rng.random() < 0.12:
        p.update(
            kt2_kev=base["kt2_kev"] * float(rng.uniform(1.5, 2.5)),
            em_ratio=base["em_ratio"] * 3.0,
            flaring=True,
        )
        return p, float(rng.uniform(2.0, 6.0))
    if klass == "AGN":
        p["photon_index"] = float(np.clip(base["photon_index"] + rng.normal(0.0, 0.08), 1.0, 3.2))
        return p, float(math.exp(rng.normal(0.0, 0.35)))
    return p, float(math.exp(rng.normal(0.0, 0.2)))


def photon_spectrum(
    params: dict[str, Any], energy_lo_kev: np.ndarray, energy_hi_kev: np.ndarray
) -> np.ndarray:
    """Photons/cm^2/s per energy bin of the model, scaled to params['flux_erg_cm2_s'] (0.2-12 keV)."""
    p = with_defaults(params)
    e = 0.5 * (energy_lo_kev + energy_hi_kev)
    width = energy_hi_kev - energy_lo_kev
    klass = p["class"]
    if klass == "AGN":
        z1 = 1.0 + p["redshift"]
        rest = e * z1
        pl = physics.powerlaw(rest, p["photon_index"])
        if p["bb_only_kt_kev"] > 0:
            bb = physics.blackbody(rest, p["bb_only_kt_kev"])
            density = (
                bb / float(physics.blackbody(0.3, p["bb_only_kt_kev"]))
                + p["pl_residual"] * pl / 2.0 ** -p["photon_index"]
            )
            density = density * physics.absorption(rest, p["nh_cm2"])
        else:
            density = pl * (physics.absorption(rest, p["nh_cm2"]) + p["scattered_fraction"])
            if p["soft_excess_ratio"] > 0:
                kt = p["soft_excess_kt_kev"]
                bb = physics.blackbody(rest, kt) / float(physics.blackbody(0.5, kt))
                density = density + p["soft_excess_ratio"] * 0.5 ** -p[
                    "photon_index"
                ] * bb * physics.absorption(rest, p["nh_cm2"])
        photons = density * width
        if p["fe_line_ew_kev"] > 0:
            continuum = float(physics.powerlaw(6.4, p["photon_index"]) * physics.absorption(6.4, p["nh_cm2"]))
            observed_ew_kev = p["fe_line_ew_kev"] / z1  # rest-frame EW, redshifted
            photons = photons + observed_ew_kev * continuum * physics.line_in_bins(
                energy_lo_kev, energy_hi_kev, 6.4 / z1, 0.05 / z1
            )
    elif klass == "star":
        photons = physics.plasma_in_bins(
            energy_lo_kev, energy_hi_kev, p["kt1_kev"], 1.0, p["abundance"]
        ) + physics.plasma_in_bins(energy_lo_kev, energy_hi_kev, p["kt2_kev"], p["em_ratio"], p["abundance"])
    elif klass == "CV":
        temperatures = p["kt_max_kev"] * np.array([1.0, 0.3, 0.1, 0.03])
        photons = sum(
            physics.plasma_in_bins(energy_lo_kev, energy_hi_kev, float(kt), float(kt) ** 0.5)
            for kt in temperatures
        )
        photons = photons * physics.partial_covering(e, p["nh_pc_cm2"], p["covering_fraction"])
        continuum = float(physics.bremsstrahlung(6.4, p["kt_max_kev"]) * p["kt_max_kev"] ** 0.5)
        photons = photons + p["fe_line_ew_kev"] * continuum * physics.line_in_bins(
            energy_lo_kev, energy_hi_kev, 6.4, 0.02
        )
    elif klass == "XRB":
        pl = physics.powerlaw(e, p["photon_index"]) / 2.0 ** -p["photon_index"]
        disc = physics.disc_blackbody(e, p["disc_kt_kev"]) / float(
            physics.disc_blackbody(2.0, p["disc_kt_kev"])
        )
        density = pl + p["disc_ratio"] * disc
        photons = density * width + p["fe_line_ew_kev"] * float(pl[np.searchsorted(e, p["fe_line_kev"])]) * (
            physics.line_in_bins(energy_lo_kev, energy_hi_kev, p["fe_line_kev"], 0.1)
        )
    elif klass == "ULX":
        disc = physics.disc_blackbody(e, p["disc_kt_kev"]) / float(
            physics.disc_blackbody(1.0, p["disc_kt_kev"])
        )
        if p["hot_disc_kt_kev"] > 0:
            hot = physics.disc_blackbody(e, p["hot_disc_kt_kev"]) / float(
                physics.disc_blackbody(1.0, p["hot_disc_kt_kev"])
            )
            density = 0.5 * disc + hot
        else:
            density = 0.5 * disc + physics.cutoff_powerlaw(e, p["photon_index"], p["cutoff_kev"])
        photons = density * width
    elif klass == "NS":
        bb = physics.blackbody(e, p["kt_kev"]) / float(physics.blackbody(0.3, p["kt_kev"]))
        if p["bb2_ratio"] > 0:
            bb = bb + p["bb2_ratio"] * physics.blackbody(e, p["kt2_kev"]) / float(
                physics.blackbody(0.3, p["kt2_kev"])
            )
        if p["feature_depth"] > 0:
            bb = bb * physics.gaussian_absorption(
                e, p["feature_kev"], p["feature_sigma_kev"], p["feature_depth"]
            )
        photons = bb * width
    elif klass == "pulsar":
        bb = physics.blackbody(e, p["kt_kev"]) / float(physics.blackbody(1.0, p["kt_kev"]))
        photons = (bb + p["pl_ratio"] * physics.powerlaw(e, p["photon_index"])) * width
    elif klass == "TDE":
        bb = physics.blackbody(e, p["kt_kev"]) / float(physics.blackbody(0.3, p["kt_kev"]))
        photons = (bb + p["pl_ratio"] * 0.1 * physics.powerlaw(e, 2.0) / 0.3**-2.0) * width
    else:  # odd
        pl = physics.powerlaw(e, p["photon_index"])
        if p["kind"] == "edge":
            pl = pl * physics.edge(e, p["edge_kev"], p["edge_depth"])
        photons = pl * width
        if p["kind"] == "line":
            continuum = float(physics.powerlaw(p["line_kev"], p["photon_index"]))
            photons = photons + p["line_ew_kev"] * continuum * physics.line_in_bins(
                energy_lo_kev, energy_hi_kev, p["line_kev"], 0.03
            )
    photons = photons * physics.absorption(e, p["nh_gal_cm2"])
    flux = float(physics.energy_flux_erg_cm2_s(energy_lo_kev, energy_hi_kev, photons))
    if not (flux > 0 and math.isfinite(flux)):
        raise ValueError(f"source model {klass} has no flux in 0.2-12 keV: {params}")
    return photons * (p["flux_erg_cm2_s"] / flux)
