"""The simulated XMM-Newton archive: the embedded default, file for file like the real one.

`simulate_archive(out_dir, release, n_detections, seed)` writes

    catalogue.fits      4XMM-DR14 per-detection columns (upper case, FITS types) + pn band rates
    catalogue.parquet   the same rows in the canonical schema (archive.catalogue)
    truth.parquet       per detection: class, state, model parameters (JSON), flags
    release.json        release, seed, n_detections, fingerprint
    <obs_id>/pps/P<obs_id>PNS003{SRSPEC,BGSPEC,SRCARF}0<HHH>.FTZ
    responses/PN/<canned rmf>_v21.0.rmf

How the sky is laid out: observations come in fields (one pointing); a field is observed once
(most), a few times, or monitored 4-8 times around a transient (TDE, X-ray binary outburst) at its
centre. Every source in a field is detected at every epoch, so ~20% of sources have several
detections. Field 0 holds the 1ES 1927+654-like changing-look AGN (8 epochs, 2011-2022).

Counts: each source's first detection gets pn 0.2-12 keV counts from a truncated power law
N(>C) ~ C^-0.8 between 50 and 10^5 (a logN-logS-like shape; with the bright monitoring targets ~30%
of detections end above 300); its flux follows, and later epochs change flux and spectrum as
`sources.epoch_params` says (exposure changes move the counts too). The catalogue's PN_8_CTS and
band rates count the simulated source photons (the spectrum minus its background realisation);
EP_HRi = (R_{i+1} - R_i) / (R_{i+1} + R_i) on the band rates (0.2-0.5, 0.5-1, 1-2, 2-4.5, 4.5-12 keV).

Which detections have spectra: the pipeline extracts a pn spectrum when PN_8_CTS >= 100, except in
~3% of observations that have no pn spectral products at all (processing failures). SUM_FLAG is
0/1/2/3/4 with probabilities 0.70/0.12/0.05/0.09/0.04 and ~5% of detections are extended
(EP_EXTENT 6-60"), so the >300 counts / SUM_FLAG < 3 / point-like selection removes ~20% of the bright ones.

Determinism: every random draw comes from a generator keyed (numpy SeedSequence spawn keys) by the
seed and the field or observation, never from a shared stream, and model folds run single-threaded in
fixed-size row blocks, so an observation's files depend only on (seed, its field), not on the number
of worker processes. DR15 = DR14's fields unchanged
plus new fields (MJD 60310-60597) and a few DR14 observations re-processed (new counts and flags).
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from astropy.io import fits
from threadpoolctl import threadpool_limits

from xmm_pipeline.archive import instrument
from xmm_pipeline.archive.base import CATALOGUE_FILE, Archive
from xmm_pipeline.archive.catalogue import as_canonical, canonical_from_4xmm
from xmm_pipeline.archive.products import (
    canned_rmf_file_name,
    product_file_name,
    responses_dir,
    spectral_product_paths,
)
from xmm_pipeline.archive.sources import (
    CHANGING_LOOK_DEC_DEG,
    CHANGING_LOOK_EPOCHS,
    CHANGING_LOOK_RA_DEG,
    DEFAULT_ODD_FRACTION,
    class_fractions,
    draw_source,
    epoch_params,
    photon_spectrum,
    source_state,
    with_defaults,
)
from xmm_pipeline.errors import UserError
from xmm_pipeline.ogip.write import arf_bytes, pha_bytes, rmf_bytes, write_fits_file
from xmm_pipeline.storage import (
    QuarantineRecord,
    sha256_file,
    sha256_json,
    write_json_atomic,
    write_parquet_atomic,
)

SIMULATOR_VERSION = "2.0"  # 2.0: the canned matrices' grid, EBOUNDS and redistribution; QUALITY
RELEASES = ("DR14", "DR15")
MAX_DETECTIONS = 500_000
TRUTH_FILE = "truth.parquet"
RELEASE_FILE = "release.json"
CATALOGUE_FITS = "catalogue.fits"

MJD_DR14 = (51575.0, 60309.0)  # 2000-02-01 .. 2023-12-31
MJD_DR15 = (60310.0, 60597.0)  # 2024-01-01 .. 2024-10-14
BANDS_KEV = ((0.2, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.5), (4.5, 12.0))
FULL_BAND_KEV = (0.2, 12.0)
MIN_SPECTRUM_COUNTS = 100.0
NO_PN_SPECTRA_FRACTION = 0.03
SUM_FLAG_PROBABILITIES = (0.70, 0.12, 0.05, 0.09, 0.04)
EXTENDED_FRACTION = 0.05
FILTER_PROBABILITIES = {"Thin1": 0.45, "Medium": 0.45, "Thick": 0.10}
SUBMODE_PROBABILITIES = {
    "PrimeFullWindow": 0.70,
    "PrimeFullWindowExtended": 0.12,
    "PrimeLargeWindow": 0.12,
    "PrimeSmallWindow": 0.06,
}
REPROCESSED_FRACTION = 0.02
MJD_EPOCH = datetime(1858, 11, 17)
FLUX_UNIT = 1e-12  # folds are computed for this flux (erg/cm^2/s) and scaled
FOLD_BLOCK_ROWS = 128
CHUNK_DETECTIONS = 2048
PIXEL_ARCSEC = 0.05  # BACKSCAL is in (0.05")^2 sky pixels, as in pipeline spectra

# Stream keys of the random generators (SeedSequence spawn keys).
_FIELD, _OBSERVATION, _DR15_FIELD, _REPROCESS, _DR15_CHOICE, _SINGLE = range(6)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)))


@dataclass
class SimulationSummary:
    out_dir: Path
    release: str
    seed: int
    n_detections: int
    n_observations: int
    n_sources: int
    n_spectra: int
    n_rmfs: int
    fingerprint: str
    n_reprocessed: int = 0
    skipped: bool = False


@dataclass
class Source:
    srcid: int
    params: dict[str, Any]
    ra_deg: float
    dec_deg: float
    off_axis_arcmin: float
    row_band: int
    target_counts: float
    is_changing_look: bool = False


@dataclass
class Detection:
    source: Source
    src_num: int
    params: dict[str, Any]
    flux_factor: float
    fixed_flux: float | None = None


@dataclass
class Observation:
    obs_id: str
    field_key: tuple[int, ...]
    epoch: int
    mjd_start: float
    ontime_s: float
    pn_filter: str
    submode: str
    particle_scale: float
    sky_scale: float
    flare_factor: float
    has_pn_spectra: bool
    detections: list[Detection] = field(default_factory=list)
    reprocessed: bool = False


# --- the sky and its observations -----------------------------------------------------------------


def _iau_name(ra_deg: float, dec_deg: float) -> str:
    """'4XMM JHHMMSS.s+DDMMSS' with truncated (not rounded) coordinates, as the IAU convention asks."""
    ra_s = ra_deg / 15.0 * 3600.0
    hh, rem = divmod(int(ra_s * 10) / 10.0, 3600.0)
    mm, ss = divmod(rem, 60.0)
    sign = "+" if dec_deg >= 0 else "-"
    dec_s = int(abs(dec_deg) * 3600.0)
    dd, rem2 = divmod(dec_s, 3600)
    dm, ds = divmod(rem2, 60)
    return f"4XMM J{int(hh):02d}{int(mm):02d}{math.floor(ss * 10) / 10:04.1f}{sign}{dd:02d}{dm:02d}{ds:02d}"


def _offset_position(
    ra0: float, dec0: float, off_axis_arcmin: float, angle_rad: float
) -> tuple[float, float]:
    dec = dec0 + off_axis_arcmin / 60.0 * math.cos(angle_rad)
    dec = float(np.clip(dec, -89.99, 89.99))
    ra = (ra0 + off_axis_arcmin / 60.0 * math.sin(angle_rad) / max(math.cos(math.radians(dec)), 0.05)) % 360.0
    return ra, dec


def _draw_class(rng: np.random.Generator, odd_fraction: float) -> str:
    fractions = class_fractions(odd_fraction)
    names = list(fractions)
    weights = np.array([fractions[n] for n in names])
    return str(names[rng.choice(len(names), p=weights / weights.sum())])


def _target_counts(rng: np.random.Generator) -> float:
    """Truncated power law N(>C) ~ C^-0.8 on [50, 1e5]."""
    alpha, low, high = 0.8, 50.0, 1e5
    u = rng.random()
    return float((low**-alpha - u * (low**-alpha - high**-alpha)) ** (-1.0 / alpha))


def _draw_observation_setup(rng: np.random.Generator) -> dict[str, Any]:
    filters = list(FILTER_PROBABILITIES)
    submodes = list(SUBMODE_PROBABILITIES)
    return {
        "ontime_s": float(np.clip(math.exp(rng.normal(math.log(25_000.0), 0.6)), 3_000.0, 140_000.0)),
        "pn_filter": filters[rng.choice(len(filters), p=list(FILTER_PROBABILITIES.values()))],
        "submode": submodes[rng.choice(len(submodes), p=list(SUBMODE_PROBABILITIES.values()))],
        "particle_scale": float(math.exp(rng.normal(0.0, 0.2))),
        "sky_scale": float(math.exp(rng.normal(0.0, 0.3))),
        "flare_factor": float(math.exp(rng.uniform(math.log(2.0), math.log(100.0))))
        if rng.random() < 0.12
        else 0.0,
        "has_pn_spectra": bool(rng.random() >= NO_PN_SPECTRA_FRACTION),
    }


def _obs_id(proposal: int, epoch: int) -> str:
    return f"{proposal:06d}{epoch + 1:02d}01"


def _make_field(
    rng: np.random.Generator,
    key: tuple[int, ...],
    proposal: int,
    srcid_base: int,
    mjd_range: tuple[float, float],
    changing_look: bool = False,
    odd_fraction: float = DEFAULT_ODD_FRACTION,
) -> list[Observation]:
    """One pointing: its sources and the observations (epochs) that detect them."""
    kind_draw = rng.random()
    if changing_look:
        kind = "changing_look"
    elif kind_draw < 0.84:
        kind = "survey"
    elif kind_draw < 0.93:
        kind = "repeat"
    else:
        kind = "monitor"
    if changing_look:
        ra0, dec0 = CHANGING_LOOK_RA_DEG, CHANGING_LOOK_DEC_DEG
    else:
        ra0, dec0 = float(rng.uniform(0.0, 360.0)), float(math.degrees(math.asin(rng.uniform(-1.0, 1.0))))
    # Epoch times
    span = mjd_range[1] - mjd_range[0]
    if changing_look:
        mjds = [epoch[0] for epoch in CHANGING_LOOK_EPOCHS]
    elif kind == "survey":
        mjds = [float(rng.uniform(*mjd_range))]
    elif kind == "repeat":
        n = int(rng.integers(2, 4))
        start = float(rng.uniform(mjd_range[0], mjd_range[1] - 0.3 * span))
        mjds = sorted([start, *(start + rng.uniform(0.0, mjd_range[1] - start, size=n - 1)).tolist()])
    else:
        n = int(rng.integers(4, 9))
        start = float(
            rng.uniform(mjd_range[0], max(mjd_range[0] + 1.0, mjd_range[1] - min(800.0, 0.5 * span)))
        )
        gaps = (
            rng.uniform(10.0, 40.0, size=n - 1)
            if rng.random() < 0.5
            else rng.uniform(30.0, 150.0, size=n - 1)
        )
        mjds = [start, *(start + np.cumsum(gaps)).tolist()]
        mjds = [m for m in mjds if m < mjd_range[1]] or [start]
    # Sources: a target at the centre of monitored fields, serendipitous ones anywhere in the FOV.
    sources: list[Source] = []

    def add_source(
        params: dict[str, Any],
        off_axis: float,
        angle: float,
        is_cl: bool = False,
        counts: float | None = None,
    ) -> None:
        ra, dec = _offset_position(ra0, dec0, off_axis, angle)
        if is_cl:
            ra, dec = CHANGING_LOOK_RA_DEG, CHANGING_LOOK_DEC_DEG
        band = (3, 6, 9)[int(angle / (2 * math.pi) * 3) % 3]
        sources.append(
            Source(
                srcid_base + len(sources) + 1,
                params,
                ra,
                dec,
                off_axis,
                band,
                counts if counts is not None else _target_counts(rng),
                is_cl,
            )
        )

    if changing_look:
        add_source(with_defaults({"class": "AGN", "nh_gal_cm2": 6.5e20, "redshift": 0.017}), 0.3, 0.5, True)
    elif kind == "monitor":
        # The target of a monitoring programme is bright: its fading or outburst stays measurable.
        target = str(rng.choice(["TDE", "XRB", "XRB", "TDE", "CV", "AGN", "star", "ULX"]))
        add_source(
            draw_source(rng, target),
            float(rng.uniform(0.0, 1.5)),
            float(rng.uniform(0, 2 * math.pi)),
            counts=float(math.exp(rng.uniform(math.log(1e3), math.log(1.5e4)))),
        )
    for _ in range(1 + int(rng.poisson(3.0))):
        add_source(
            draw_source(rng, _draw_class(rng, odd_fraction)),
            float(14.0 * math.sqrt(rng.random())),
            float(rng.uniform(0, 2 * math.pi)),
        )

    observations = []
    for epoch, mjd in enumerate(mjds):
        setup = _draw_observation_setup(rng)
        obs = Observation(_obs_id(proposal, epoch), key, epoch, float(mjd), **setup)
        for number, source in enumerate(sources, start=1):
            if source.is_changing_look:
                _, _, cl_params, flux = CHANGING_LOOK_EPOCHS[epoch]
                params = with_defaults({**source.params, **cl_params})
                obs.detections.append(Detection(source, number, params, 1.0, fixed_flux=flux))
                continue
            params, factor = epoch_params(source.params, epoch, mjd - mjds[0], len(mjds), rng)
            obs.detections.append(Detection(source, number, params, factor))
        observations.append(obs)
    return observations


def _layout(
    seed: int,
    n_detections: int,
    stream: int,
    proposal_base: int,
    srcid_prefix: int,
    mjd_range: tuple[float, float],
    with_changing_look: bool,
    odd_fraction: float = DEFAULT_ODD_FRACTION,
) -> list[list[Observation]]:
    """Fields until `n_detections` detections; the last field is cut to give exactly that many."""
    fields: list[list[Observation]] = []
    total = 0
    index = 0
    while total < n_detections:
        changing_look = with_changing_look and index == 0
        observations = _make_field(
            _rng(seed, stream, index),
            (stream, index),
            proposal_base + 3 * index,
            srcid_prefix * 10**14 + index * 1000,
            mjd_range,
            changing_look,
            odd_fraction,
        )
        kept = []
        for obs in observations:
            room = n_detections - total
            if room <= 0:
                break
            obs.detections = obs.detections[:room]
            total += len(obs.detections)
            kept.append(obs)
        fields.append(kept)
        index += 1
    return fields


# --- folding, noise and products ------------------------------------------------------------------


@dataclass
class _Templates:
    """Per-run caches: canned matrices, background templates, band masks on the channel grid."""

    energy_lo: np.ndarray
    energy_hi: np.ndarray
    channel_centre: np.ndarray
    band_starts: np.ndarray  # first channel of each band, then the end of the last (contiguous bands)
    full_mask: np.ndarray
    particle: np.ndarray
    soft_proton: np.ndarray
    sky_photons: np.ndarray

    _onaxis: dict[str, np.ndarray] = field(default_factory=dict)
    _sky: dict[tuple[str, instrument.CannedRMF], np.ndarray] = field(default_factory=dict)

    def arf(self, pn_filter: str, off_axis_arcmin: float) -> np.ndarray:
        centre = 0.5 * (self.energy_lo + self.energy_hi)
        if pn_filter not in self._onaxis:
            self._onaxis[pn_filter] = instrument.effective_area_cm2(centre, pn_filter, 0.0)
        return self._onaxis[pn_filter] * instrument.vignetting(centre, off_axis_arcmin)

    def sky_rate(self, pn_filter: str, rmf: instrument.CannedRMF) -> np.ndarray:
        """Diffuse sky counts/s/arcmin^2 per channel through the on-axis response (vignetting applied
        by the caller)."""
        key = (pn_filter, rmf)
        if key not in self._sky:
            row = (self.sky_photons * self.arf(pn_filter, 0.0)).astype(np.float32)[None, :]
            self._sky[key] = _fold_rows(row, rmf.matrix())[0]
        return self._sky[key]

    @classmethod
    def build(cls) -> _Templates:
        lo, hi = instrument.energy_grid_kev()
        clo, chi = instrument.channel_bounds_kev()
        centre = 0.5 * (clo + chi)
        edges = [BANDS_KEV[0][0]] + [b for _, b in BANDS_KEV]
        starts = np.searchsorted(centre, edges, side="left")
        full = (centre >= FULL_BAND_KEV[0]) & (centre < FULL_BAND_KEV[1])
        return cls(
            lo,
            hi,
            centre,
            starts,
            full,
            instrument.particle_background_rate(),
            instrument.soft_proton_rate(),
            instrument.sky_photon_flux(lo, hi),
        )


@functools.cache
def _templates() -> _Templates:
    return _Templates.build()


def _fold_rows(rows: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """rows [n, energies] @ matrix [energies, channels], single-threaded, in fixed-size zero-padded
    blocks: each row's result is then the same whatever rows share its call and however many cores
    the machine has, which keeps the Poisson draws, hence the products, byte-stable."""
    out = np.empty((rows.shape[0], matrix.shape[1]), dtype=np.float32)
    block = np.zeros((FOLD_BLOCK_ROWS, rows.shape[1]), dtype=np.float32)
    with threadpool_limits(limits=1, user_api="blas"):
        for start in range(0, rows.shape[0], FOLD_BLOCK_ROWS):
            chunk = rows[start : start + FOLD_BLOCK_ROWS]
            block[:] = 0.0
            block[: len(chunk)] = chunk
            out[start : start + len(chunk)] = (block @ matrix)[: len(chunk)]
    return out


def _rmf_for(submode: str, row_band: int) -> instrument.CannedRMF:
    return instrument.CannedRMF(submode, row_band)


def _date(mjd: float) -> str:
    return (MJD_EPOCH + timedelta(days=mjd)).strftime("%Y-%m-%dT%H:%M:%S")


@dataclass
class _FoldedDetection:
    detection: Detection
    obs: Observation
    rmf: instrument.CannedRMF
    arf_cm2: np.ndarray
    rate_per_unit: np.ndarray  # counts/s per channel at FLUX_UNIT
    sky_rate: np.ndarray  # sky counts/s per channel per arcmin^2


def _fold_observations(observations: Sequence[Observation], templates: _Templates) -> list[_FoldedDetection]:
    """Fold every detection of these observations at unit flux, grouped by canned RMF."""
    folded: list[_FoldedDetection] = []
    rows_by_rmf: dict[instrument.CannedRMF, list[int]] = {}
    source_rows: list[np.ndarray] = []
    for obs in observations:
        for det in obs.detections:
            rmf = _rmf_for(obs.submode, det.source.row_band)
            arf = templates.arf(obs.pn_filter, det.source.off_axis_arcmin)
            unit = photon_spectrum(
                {**det.params, "flux_erg_cm2_s": FLUX_UNIT}, templates.energy_lo, templates.energy_hi
            )
            rows_by_rmf.setdefault(rmf, []).append(len(folded))
            source_rows.append((unit * arf).astype(np.float32))
            sky = templates.sky_rate(obs.pn_filter, rmf) * float(
                instrument.vignetting(1.0, det.source.off_axis_arcmin)
            )
            folded.append(_FoldedDetection(det, obs, rmf, arf, np.empty(0), sky))
    for rmf, indices in rows_by_rmf.items():
        rates = _fold_rows(np.stack([source_rows[i] for i in indices]), rmf.matrix())
        for i, rate in zip(indices, rates):
            folded[i].rate_per_unit = rate
    return folded


def _flux_of(det: Detection, folded_first: _FoldedDetection, templates: _Templates) -> float:
    """The detection's flux: the source's first-epoch flux set by its target counts, times variability."""
    if det.fixed_flux is not None:
        return det.fixed_flux
    first_obs = folded_first.obs
    exposure = first_obs.ontime_s * instrument.livetime_fraction(first_obs.submode)
    unit_counts = float(folded_first.rate_per_unit[templates.full_mask].sum()) * exposure
    flux0 = FLUX_UNIT * det.source.target_counts / max(unit_counts, 1e-9)
    return flux0 * det.flux_factor


def _hardness(rates: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    soft, hard = rates[:-1], rates[1:]
    total = soft + hard
    with np.errstate(invalid="ignore", divide="ignore"):
        hr = np.where(total > 0, (hard - soft) / total, np.nan)
        err = np.where(
            total > 0, 2.0 * np.sqrt((soft * errors[1:]) ** 2 + (hard * errors[:-1]) ** 2) / total**2, np.nan
        )
    return hr, err


def _simulate_observation(
    obs: Observation,
    folded: list[_FoldedDetection],
    flux_of: dict[int, float],
    templates: _Templates,
    rng: np.random.Generator,
    out_dir: Path,
    rmfs_used: set[instrument.CannedRMF],
    pipeline_version: str = "21.0",
    min_counts: float = MIN_SPECTRUM_COUNTS,
) -> tuple[list[dict], list[dict]]:
    """Noise, catalogue rows, truth rows and (when `out_dir` is given) the products of one observation."""
    livetime = instrument.livetime_fraction(obs.submode)
    exposure = obs.ontime_s * livetime
    duration_days = obs.ontime_s * 1.08 / 86400.0
    catalogue_rows: list[dict] = []
    truth_rows: list[dict] = []
    for item in folded:
        det = item.detection
        src = det.source
        flux = flux_of[id(det)]
        source_rate = item.rate_per_unit.astype(np.float64) * (flux / FLUX_UNIT)
        radius_arcsec = float(rng.uniform(20.0, 40.0))
        area_arcmin2 = math.pi * (radius_arcsec / 60.0) ** 2
        backscal = float(round(math.pi * (radius_arcsec / PIXEL_ARCSEC) ** 2))
        back_ratio = float(rng.uniform(3.0, 10.0))
        background_rate = area_arcmin2 * (
            obs.particle_scale * templates.particle
            + obs.flare_factor * templates.soft_proton
            + obs.sky_scale * item.sky_rate.astype(np.float64)
        )
        source_counts = rng.poisson(source_rate * exposure)
        background_in_source = rng.poisson(background_rate * exposure)
        background_counts = rng.poisson(background_rate * exposure * back_ratio)
        spectrum = source_counts + background_in_source
        # The catalogue measures a source as a detection does: the counts in the source region (source
        # plus background) less the background model's expectation, so the band counts, rates and
        # hardness ratios carry the background's counting noise, as their errors say. Band rates are
        # non-negative, as a fitted source rate is; the total counts keep their sign (unbiased).
        band_background = np.add.reduceat(background_rate * exposure, templates.band_starts)[:5]
        band_total = np.add.reduceat(spectrum, templates.band_starts)[:5].astype(float)
        band_counts = band_total - band_background
        pn_8_cts = float(band_counts.sum())
        pn_8_bkg = float(band_background.sum())
        rates = np.maximum(band_counts, 0.0) / exposure
        rate_errors = np.sqrt(band_counts + band_background + 1.0) / exposure
        hr, hr_err = _hardness(rates, rate_errors)
        sum_flag = int(rng.choice(5, p=SUM_FLAG_PROBABILITIES))
        extent = float(rng.uniform(6.0, 60.0)) if rng.random() < EXTENDED_FRACTION else 0.0
        has_spectrum = obs.has_pn_spectra and pn_8_cts >= min_counts
        jitter_ra, jitter_dec = rng.normal(0.0, 1.0 / 3600.0, size=2)
        detid = 10**14 + int(obs.obs_id) * 10**4 + det.src_num
        catalogue_rows.append(
            {
                "DETID": detid,
                "SRCID": src.srcid,
                "IAUNAME": _iau_name(src.ra_deg, src.dec_deg),
                "OBS_ID": obs.obs_id,
                "SRC_NUM": det.src_num,
                "SC_RA": src.ra_deg,
                "SC_DEC": src.dec_deg,
                "RA": (src.ra_deg + jitter_ra / max(math.cos(math.radians(src.dec_deg)), 0.05)) % 360.0,
                "DEC": float(np.clip(src.dec_deg + jitter_dec, -90.0, 90.0)),
                "MJD_START": obs.mjd_start,
                "MJD_STOP": obs.mjd_start + duration_days,
                "PN_FILTER": obs.pn_filter,
                "PN_SUBMODE": obs.submode,
                "PN_ONTIME": obs.ontime_s,
                "PN_OFFAX": src.off_axis_arcmin,
                "PN_8_CTS": pn_8_cts,
                "PN_8_CTS_ERR": math.sqrt(pn_8_cts + pn_8_bkg + 1.0),
                "PN_8_RATE": pn_8_cts / exposure,
                **{f"PN_{i + 1}_RATE": float(rates[i]) for i in range(5)},
                **{f"PN_{i + 1}_RATE_ERR": float(rate_errors[i]) for i in range(5)},
                "EP_8_FLUX": flux,
                "EP_8_FLUX_ERR": flux * math.sqrt(pn_8_cts + pn_8_bkg + 1.0) / max(pn_8_cts, 1.0),
                **{f"EP_HR{i + 1}": float(hr[i]) for i in range(4)},
                **{f"EP_HR{i + 1}_ERR": float(hr_err[i]) for i in range(4)},
                "EP_EXTENT": extent,
                "SUM_FLAG": sum_flag,
                "N_DETECTIONS": 0,
            }
        )
        params = {**det.params, "flux_erg_cm2_s": flux}
        truth_rows.append(
            {
                "detid": detid,
                "srcid": src.srcid,
                "obs_id": obs.obs_id,
                "src_num": det.src_num,
                "iauname": _iau_name(src.ra_deg, src.dec_deg),
                "mjd": obs.mjd_start,
                "class": params["class"],
                "state": source_state(params),
                "is_odd": params["class"] == "odd",
                "is_changing_look": src.is_changing_look,
                "flux_erg_cm2_s": flux,
                "expected_counts": float(source_rate[templates.full_mask].sum() * exposure),
                "off_axis_arcmin": src.off_axis_arcmin,
                "exposure_s": exposure,
                "rmf": item.rmf.stem,
                "has_spectrum": has_spectrum,
                "reprocessed": obs.reprocessed,
                "params_json": json.dumps(params, sort_keys=True),
            }
        )
        if has_spectrum:
            _write_products(
                out_dir,
                obs,
                det,
                item,
                spectrum,
                background_counts,
                exposure,
                backscal,
                backscal * back_ratio,
                pipeline_version,
            )
            rmfs_used.add(item.rmf)
    return catalogue_rows, truth_rows


def _write_products(
    out_dir: Path,
    obs: Observation,
    det: Detection,
    item: _FoldedDetection,
    spectrum: np.ndarray,
    background: np.ndarray,
    exposure_s: float,
    backscal: float,
    back_backscal: float,
    pipeline_version: str,
) -> Path:
    names = {
        kind: product_file_name(obs.obs_id, kind, det.src_num) for kind in ("SRSPEC", "BGSPEC", "SRCARF")
    }
    folder = out_dir / obs.obs_id / "pps"
    header = {
        "OBS_ID": obs.obs_id,
        "EXP_ID": f"{obs.obs_id}003",
        "EXPIDSTR": "S003",
        "DATAMODE": "IMAGING",
        "SUBMODE": obs.submode,
        "DATE-OBS": _date(obs.mjd_start),
        "DATE-END": _date(obs.mjd_start + obs.ontime_s / 86400.0),
        "SRCNUM": det.src_num,
        "RA_OBJ": det.source.ra_deg,
        "DEC_OBJ": det.source.dec_deg,
        "CREATOR": f"xmm_pipeline simulate {SIMULATOR_VERSION}",
        "SASVERS": f"xmmsas_{pipeline_version}",
    }
    common = {
        "exposure_s": exposure_s,
        "respfile": f"{item.rmf.stem}.rmf",
        "ancrfile": names["SRCARF"],
        "filter_name": obs.pn_filter,
    }
    path = write_fits_file(
        folder / names["SRSPEC"],
        pha_bytes(
            spectrum,
            backscal=backscal,
            backfile=names["BGSPEC"],
            spectrum_type="TOTAL",
            quality=instrument.source_spectrum_quality(),
            header_extra=header,
            **common,
        ),
    )
    write_fits_file(
        folder / names["BGSPEC"],
        pha_bytes(
            background,
            backscal=back_backscal,
            backfile="NONE",
            spectrum_type="BKG",
            header_extra=header,
            **common,
        ),
    )
    write_fits_file(
        folder / names["SRCARF"],
        arf_bytes(
            *instrument.energy_grid_kev(),
            item.arf_cm2,
            filter_name=obs.pn_filter,
            header_extra={"OBS_ID": obs.obs_id, "SRCNUM": det.src_num},
        ),
    )
    return path


def write_canned_rmf(out_dir: Path, rmf: instrument.CannedRMF) -> Path:
    """responses/PN/<stem>_v21.0.rmf (left alone when already present)."""
    path = responses_dir(out_dir) / canned_rmf_file_name(f"{rmf.stem}.rmf")
    if not path.is_file():
        write_fits_file(path, _canned_rmf_bytes(rmf), compress=False)
    return path


@functools.lru_cache(maxsize=16)
def _canned_rmf_bytes(rmf: instrument.CannedRMF) -> bytes:
    lo, hi = instrument.energy_grid_kev()
    clo, chi = instrument.channel_bounds_kev()
    header = {"CREATOR": f"xmm_pipeline simulate {SIMULATOR_VERSION}", "SUBMODE": rmf.submode}
    return rmf_bytes(lo, hi, rmf.matrix(), clo, chi, filter_name="NONE", header_extra=header)


# --- the archive ----------------------------------------------------------------------------------


def release_fingerprint(
    release: str, n_detections: int, seed: int, odd_fraction: float = DEFAULT_ODD_FRACTION
) -> str:
    """Release name + a hash of everything the archive's content is a deterministic function of."""
    _check_parameters(release, n_detections, seed, odd_fraction)
    digest = sha256_json(
        {
            "release": release,
            "n_detections": int(n_detections),
            "seed": int(seed),
            "odd_fraction": float(odd_fraction),
            "simulator": SIMULATOR_VERSION,
        }
    )
    return f"sim-{release}-{digest[:16]}"


def _check_parameters(
    release: str, n_detections: int, seed: int, odd_fraction: float = DEFAULT_ODD_FRACTION
) -> None:
    if release not in RELEASES:
        raise UserError(f"unknown release {release!r}; the simulator knows {', '.join(RELEASES)}")
    if isinstance(n_detections, bool) or not isinstance(n_detections, (int, np.integer)) or n_detections <= 0:
        raise UserError(f"number of detections must be a positive integer, got {n_detections!r}")
    if n_detections > MAX_DETECTIONS:
        raise UserError(f"number of detections must be at most {MAX_DETECTIONS}, got {n_detections}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if (
        isinstance(odd_fraction, bool)
        or not isinstance(odd_fraction, (int, float, np.integer, np.floating))
        or not 0.0 <= float(odd_fraction) <= 1.0
    ):
        raise UserError(f"odd fraction must be a number within 0..1, got {odd_fraction!r}")


def _chunks(fields: list[list[Observation]], max_detections: int | None = None) -> list[list[Observation]]:
    """Whole fields grouped into chunks of about `max_detections` (the unit of one batched fold and of
    one worker task)."""
    max_detections = max_detections or CHUNK_DETECTIONS
    chunks: list[list[Observation]] = []
    current: list[Observation] = []
    size = 0
    for observations in fields:
        current += observations
        size += sum(len(obs.detections) for obs in observations)
        if size >= max_detections:
            chunks.append(current)
            current, size = [], 0
    if current:
        chunks.append(current)
    return chunks


def _all_fields(
    release: str, n_detections: int, seed: int, odd_fraction: float = DEFAULT_ODD_FRACTION
) -> tuple[list[list[Observation]], list[list[Observation]]]:
    """DR14's fields, and the fields a later release adds (empty for DR14)."""
    fields = _layout(seed, n_detections, _FIELD, 10_000, 2, MJD_DR14, True, odd_fraction)
    if release == "DR15":
        dr14_observations = [obs for f in fields for obs in f]
        choice = _rng(seed, _DR15_CHOICE)
        n_reprocessed = max(1, round(REPROCESSED_FRACTION * len(dr14_observations)))
        for index in sorted(choice.choice(len(dr14_observations), size=n_reprocessed, replace=False)):
            dr14_observations[int(index)].reprocessed = True
        n_new = max(10, n_detections // 10)
        return fields, _layout(seed, n_new, _DR15_FIELD, 950_000, 3, MJD_DR15, False, odd_fraction)
    return fields, []


def _read_release(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / RELEASE_FILE).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class _ChunkResult:
    catalogue_rows: list[dict]
    truth_rows: list[dict]
    rmfs_used: set[instrument.CannedRMF]


def _simulate_chunk(job: tuple[list[Observation], int, Path]) -> _ChunkResult:
    """Fold, sample and write one chunk of whole fields (runs in a worker process when parallel)."""
    observations, seed, out_dir = job
    templates = _templates()
    folded = _fold_observations(observations, templates)
    first_of_source: dict[int, _FoldedDetection] = {}
    by_obs: dict[str, list[_FoldedDetection]] = {}
    for item in folded:
        first_of_source.setdefault(item.detection.source.srcid, item)
        by_obs.setdefault(item.obs.obs_id, []).append(item)
    flux_of = {
        id(item.detection): _flux_of(item.detection, first_of_source[item.detection.source.srcid], templates)
        for item in folded
    }
    result = _ChunkResult([], [], set())
    for obs in observations:
        if obs.reprocessed:
            rng = _rng(seed, _REPROCESS, *obs.field_key, obs.epoch)
            obs.ontime_s *= 0.97
            version = "22.0"
        else:
            rng = _rng(seed, _OBSERVATION, *obs.field_key, obs.epoch)
            version = "21.0"
        rows, truth = _simulate_observation(
            obs, by_obs[obs.obs_id], flux_of, templates, rng, out_dir, result.rmfs_used, version
        )
        result.catalogue_rows += rows
        result.truth_rows += truth
    return result


def _worker_count(workers: int | None, n_detections: int, n_chunks: int) -> int:
    """Processes to use: as asked, else up to 2 (or the CPU count) for archives big enough to pay the
    start-up of a worker (~2 s)."""
    if multiprocessing.current_process().daemon:
        return 1
    if workers is not None:
        return max(1, min(int(workers), n_chunks))
    if n_detections < 6000:
        return 1
    return max(1, min(os.cpu_count() or 1, 4, n_chunks))


def _reporting(results: Iterable[_ChunkResult], done: list[int],
               progress: Callable[[int, int], None] | None) -> list[_ChunkResult]:
    collected = []
    for result in results:
        collected.append(result)
        if progress is not None:
            progress(done[len(collected) - 1], done[-1])
    return collected


def simulate_archive(
    out_dir: str | Path,
    release: str = "DR14",
    n_detections: int = 2000,
    seed: int = 0,
    workers: int | None = None,
    odd_fraction: float = DEFAULT_ODD_FRACTION,
    progress: Callable[[int, int], None] | None = None,
) -> SimulationSummary:
    """Write the simulated archive into `out_dir` (see the module docstring). Deterministic in
    (release, n_detections, seed, odd_fraction) whatever the number of `workers` (processes; default:
    one for small archives, up to the CPU count for large ones); a finished archive with the same
    parameters is not rewritten. `odd_fraction` is the share of odd spectra among serendipitous
    sources (default 0.5%; an outlier evaluation needs more). `progress(done, total)` is called with
    detections simulated after each chunk."""
    _check_parameters(release, n_detections, seed, odd_fraction)
    out_dir = Path(out_dir)
    fingerprint = release_fingerprint(release, n_detections, seed, odd_fraction)
    previous = _read_release(out_dir)
    if previous is not None and previous.get("fingerprint") == fingerprint:
        return SimulationSummary(
            out_dir,
            release,
            seed,
            int(previous["n_detections_total"]),
            int(previous["n_observations"]),
            int(previous["n_sources"]),
            int(previous["n_spectra"]),
            int(previous["n_rmfs"]),
            fingerprint,
            int(previous.get("n_reprocessed", 0)),
            skipped=True,
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(
            f"cannot write the simulated archive to {out_dir}: {error.strerror or error}"
        ) from error

    dr14_fields, new_fields = _all_fields(release, n_detections, seed, odd_fraction)
    chunks = _chunks(dr14_fields) + _chunks(new_fields)
    jobs = [(chunk, seed, out_dir) for chunk in chunks]
    n_workers = _worker_count(workers, n_detections, len(chunks))
    done = np.cumsum([sum(len(obs.detections) for obs in chunk) for chunk in chunks]).tolist()
    if n_workers > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=context) as pool:
            results = _reporting(pool.map(_simulate_chunk, jobs), done, progress)
    else:
        results = _reporting(map(_simulate_chunk, jobs), done, progress)
    catalogue_rows = [row for result in results for row in result.catalogue_rows]
    truth_rows = [row for result in results for row in result.truth_rows]
    rmfs_used = {rmf for result in results for rmf in result.rmfs_used}
    expected_products = {
        path
        for row in truth_rows
        if row["has_spectrum"]
        for path in spectral_product_paths(out_dir, row["obs_id"], row["src_num"]).values()
    }
    for rmf in sorted(rmfs_used, key=lambda r: r.stem):
        write_canned_rmf(out_dir, rmf)
    _remove_stale_products(out_dir, expected_products, previous)

    catalogue = pd.DataFrame(catalogue_rows)
    counts = catalogue.groupby("SRCID")["SRCID"].transform("size")
    catalogue["N_DETECTIONS"] = counts.astype(np.int16)
    truth = pd.DataFrame(truth_rows)
    label = f"4XMM-{release}"
    canonical = canonical_from_4xmm(catalogue, release=label)
    _write_catalogue_fits(out_dir / CATALOGUE_FITS, catalogue, label)
    write_parquet_atomic(out_dir / CATALOGUE_FILE, canonical)
    write_parquet_atomic(out_dir / TRUTH_FILE, truth)
    summary = SimulationSummary(
        out_dir,
        release,
        int(seed),
        len(catalogue),
        int(catalogue["OBS_ID"].nunique()),
        int(catalogue["SRCID"].nunique()),
        int(truth["has_spectrum"].sum()),
        len(rmfs_used),
        fingerprint,
        int(sum(obs.reprocessed for f in dr14_fields for obs in f)),
    )
    write_json_atomic(
        out_dir / RELEASE_FILE,
        {
            "release": release,
            "label": label,
            "seed": int(seed),
            "n_detections": int(n_detections),
            "odd_fraction": float(odd_fraction),
            "n_detections_total": summary.n_detections,
            "n_observations": summary.n_observations,
            "n_sources": summary.n_sources,
            "n_spectra": summary.n_spectra,
            "n_rmfs": summary.n_rmfs,
            "n_reprocessed": summary.n_reprocessed,
            "fingerprint": fingerprint,
            "simulator": SIMULATOR_VERSION,
            "catalogue_sha256": sha256_file(out_dir / CATALOGUE_FILE),
            "latest_mjd": float(catalogue["MJD_START"].max()),
        },
    )
    return summary


def _remove_stale_products(out_dir: Path, expected: set[Path], previous: dict[str, Any] | None) -> None:
    """Delete product files a previous simulation left that this one does not have (a re-processed
    detection that fell below the extraction threshold, another seed). Only in an archive this
    simulator wrote (it has a release.json), and only files named like pipeline products."""
    if previous is None:
        return
    for path in out_dir.glob("[0-9]" * 10 + "/pps/P*.FTZ"):
        if path not in expected:
            path.unlink()
    for folder in out_dir.glob("[0-9]" * 10 + "/pps"):
        if not any(folder.iterdir()):
            folder.rmdir()
            folder.parent.rmdir()


FITS_FORMATS = {
    "DETID": "K",
    "SRCID": "K",
    "IAUNAME": "21A",
    "OBS_ID": "10A",
    "SRC_NUM": "J",
    "SC_RA": "D",
    "SC_DEC": "D",
    "RA": "D",
    "DEC": "D",
    "MJD_START": "D",
    "MJD_STOP": "D",
    "PN_FILTER": "6A",
    "PN_SUBMODE": "23A",
    "SUM_FLAG": "I",
    "N_DETECTIONS": "I",
    "EP_8_FLUX": "E",
    "EP_8_FLUX_ERR": "E",
}
FITS_UNITS = {
    "SC_RA": "deg",
    "SC_DEC": "deg",
    "RA": "deg",
    "DEC": "deg",
    "MJD_START": "d",
    "MJD_STOP": "d",
    "PN_ONTIME": "s",
    "PN_8_CTS": "count",
    "PN_8_CTS_ERR": "count",
    "EP_8_FLUX": "erg/cm**2/s",
    "EP_8_FLUX_ERR": "erg/cm**2/s",
    "EP_EXTENT": "arcsec",
    "PN_OFFAX": "arcmin",
}


def _write_catalogue_fits(path: Path, catalogue: pd.DataFrame, label: str) -> None:
    columns = []
    for name in catalogue.columns:
        fmt = FITS_FORMATS.get(name, "E")
        values = catalogue[name].to_numpy()
        if fmt.endswith("A"):
            values = np.array([str(v) for v in values])
        columns.append(fits.Column(name=name, format=fmt, array=values, unit=FITS_UNITS.get(name)))
    hdu = fits.BinTableHDU.from_columns(columns, name="SRCLIST")
    hdu.header["CATALOG"] = (label, "simulated catalogue release")
    hdu.header["CREATOR"] = f"xmm_pipeline simulate {SIMULATOR_VERSION}"
    from xmm_pipeline.storage import atomic_path

    with atomic_path(path) as tmp:
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(tmp, overwrite=True)


# --- one observation of one source (for tests of preprocessing) ---------------------------------------


def simulate_observation(
    out_dir: str | Path,
    source_params: dict[str, Any],
    *,
    exposure_s: float,
    pn_filter: str,
    off_axis_arcmin: float,
    obs_id: str,
    src_num: int,
    seed: int,
    submode: str = "PrimeFullWindow",
) -> Path:
    """Simulate one detection of a source with known parameters (see `sources` for the dict format,
    e.g. {"class": "AGN", "photon_index": 1.9, "nh_cm2": 3e20, "flux_erg_cm2_s": 1e-12}) and write its
    SRSPEC, BGSPEC and SRCARF under out_dir/<obs_id>/pps plus the canned RMF under out_dir/responses/PN.
    `exposure_s` is the on-time; the spectrum's EXPOSURE is the live time. Returns the SRSPEC path."""
    params = with_defaults(source_params)
    if pn_filter not in instrument.FILTER_LAYERS:
        raise UserError(f"unknown pn filter {pn_filter!r}")
    if submode not in instrument.SUBMODES:
        raise UserError(f"unknown pn submode {submode!r}")
    if not exposure_s > 0:
        raise UserError(f"exposure_s must be positive, got {exposure_s}")
    out_dir = Path(out_dir)
    source = Source(0, params, 0.0, 0.0, float(off_axis_arcmin), 9, 0.0)
    detection = Detection(source, int(src_num), params, 1.0, fixed_flux=float(params["flux_erg_cm2_s"]))
    obs = Observation(
        str(obs_id), (0,), 0, 58000.0, float(exposure_s), pn_filter, submode, 1.0, 1.0, 0.0, True, [detection]
    )
    templates = _templates()
    folded = _fold_observations([obs], templates)
    rmfs: set[instrument.CannedRMF] = set()
    flux_of = {id(detection): float(params["flux_erg_cm2_s"])}
    _simulate_observation(obs, folded, flux_of, templates, _rng(seed, _SINGLE), out_dir, rmfs, min_counts=0.0)
    write_canned_rmf(out_dir, folded[0].rmf)
    return out_dir / obs.obs_id / "pps" / product_file_name(obs.obs_id, "SRSPEC", int(src_num))


# --- the Archive interface ----------------------------------------------------------------------------


class SimulatedArchive(Archive):
    """The embedded default archive: simulated into `root` on first use (see `simulate_archive`)."""

    def __init__(
        self,
        root: str | Path,
        release: str = "DR14",
        n_detections: int = 2000,
        seed: int = 0,
        odd_fraction: float = DEFAULT_ODD_FRACTION,
    ) -> None:
        super().__init__(root)
        _check_parameters(release, n_detections, seed, odd_fraction)
        self.release = release
        self.n_detections = int(n_detections)
        self.seed = int(seed)
        self.odd_fraction = float(odd_fraction)

    def release_fingerprint(self) -> str:
        return release_fingerprint(self.release, self.n_detections, self.seed, self.odd_fraction)

    def ensure_simulated(self) -> SimulationSummary:
        return simulate_archive(
            self.root, self.release, self.n_detections, self.seed, odd_fraction=self.odd_fraction
        )

    def fetch_catalogue(self) -> pd.DataFrame:
        self.ensure_simulated()
        return as_canonical(pd.read_parquet(self.root / CATALOGUE_FILE))

    def fetch_observations(self, obs_ids: Sequence[str]) -> list[QuarantineRecord]:
        self.ensure_simulated()
        catalogue = pd.read_parquet(self.root / CATALOGUE_FILE, columns=["obs_id"])
        known = set(catalogue["obs_id"].astype(str))
        records = []
        for obs_id in obs_ids:
            obs_id = str(obs_id)
            if obs_id not in known:
                records.append(
                    QuarantineRecord("download", "observation not in the simulated archive", obs_id=obs_id)
                )
            elif not any(self.observation_dir(obs_id).glob(f"P{obs_id}PN*SRSPEC*.FTZ")):
                records.append(
                    QuarantineRecord(
                        "download",
                        "no pn spectral products for this observation",
                        obs_id=obs_id,
                        path=str(self.observation_dir(obs_id)),
                    )
                )
        return records
