"""Select detections, bin their pn spectra onto the grid, unfold and scale them, write Parquet.

Per spectrum (channel bins k of the grid, model bins j of grid.extended(); see spectra/response.py for
the compressed response R and area_j):

    counts_k      source counts of the good-quality (QUALITY = 0) channels whose EBOUNDS mid energy
                  falls in bin k; RATE files give RATE x EXPOSURE, rounded
    background_k  background counts of the same channels x (EXPOSURE x BACKSCAL x AREASCAL of the source)
                  / (the same of the background): the expected background in the source region
    valid_k       the bin is fitted: every RMF channel of bin k is present with QUALITY 0, there is at
                  least one, and folded_k >= 1e-6 x its maximum (the response reaches it)
    area_exposure_j = area_j x EXPOSURE x AREASCAL                     (cm^2 s per model bin)
    folded_k      = sum_j R[k, j] area_exposure_j                      (cm^2 s seen by channel bin k)
    flux_k        = max(counts_k - background_k, 0) / (folded_k x width_k)   photons/cm^2/s/keV
                    (0 in masked bins, valid_k false)
    unfolded_k    = E_k^2 flux_k / mean_k(E_k^2 flux_k)               the encoder's input
    log10_flux    = log10(sum_k E_k flux_k width_k x 1.602e-9)         erg/cm^2/s, valid bins

Negative net bins (background fluctuations) are clipped to zero before unfolding: the loss of the model
works on the raw counts and background, so the encoder input only needs an unbiased-looking shape, and
a clipped shape never has negative fluxes. E^2 flux (nu F nu per keV) is flat for a photon index 2,
so the unfolded shape spans a few decades less than the photon flux and its bins are O(1) after the
unit-mean normalisation; the brightness lives in `log10_flux`. A spectrum with no positive net counts
in the grid cannot be scaled and goes to quarantine.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from xmm_pipeline.archive.base import CATALOGUE_FILE, RESPONSES_SUBDIR
from xmm_pipeline.archive.catalogue import as_canonical
from xmm_pipeline.errors import ProductError, UserError
from xmm_pipeline.ogip.read import Arf, Pha, check_pn_imaging, read_arf, read_pha
from xmm_pipeline.spectra.dataset import RESPONSES_FILE, SPECTRA_SUBDIR, SpectralDataset
from xmm_pipeline.spectra.grid import DEFAULT_GRID, EnergyGrid
from xmm_pipeline.spectra.response import CompressedRmf, ResponseCache, fold_compressed
from xmm_pipeline.storage import (
    QuarantineRecord,
    quarantine_frame,
    sha256_file,
    sha256_json,
    write_json_atomic,
    write_parquet_atomic,
)

KEV_TO_ERG = 1.602176634e-9
METADATA_KEY = b"xmm_pipeline"
SELECTION_FILE = "selection.json"
QUARANTINE_FILE = "quarantine.parquet"
DROP_REASONS = ("no_pn_exposure", "flagged", "extended", "low_counts", "duplicate_in_observation")
NO_SPECTRUM = "no_pn_spectrum"
_PRODUCT = re.compile(
    r"^P(?P<obs>\d{10})PN(?P<kind>[SUX])(?P<expo>\d{3})(?P<type>SRSPEC|BGSPEC|SRCARF)(?P<field>.)"
    r"(?P<src>[0-9A-F]{3})\.(?:FTZ|FIT|FITS)(?:\.GZ)?$",
    re.IGNORECASE,
)
_CATALOGUE_SCALARS = (
    "detid",
    "srcid",
    "iauname",
    "obs_id",
    "src_num",
    "ra",
    "dec",
    "mjd_start",
    "mjd_stop",
    "pn_filter",
    "pn_submode",
    "pn_8_cts",
    "ep_8_flux",
    "ep_hr1",
    "ep_hr2",
    "ep_hr3",
    "ep_hr4",
    "ep_extent",
    "sum_flag",
)


@dataclass(frozen=True)
class PreprocessConfig:
    grid: EnergyGrid = DEFAULT_GRID
    min_counts: float = 300
    max_sum_flag: int = 2
    require_point_like: bool = True


@dataclass
class ObservationResult:
    obs_id: str
    path: Path
    n_written: int = 0
    skipped: bool = False
    quarantine: list[QuarantineRecord] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # e.g. no_pn_spectrum
    rmf_ids: list[str] = field(default_factory=list)


@dataclass
class PreprocessSummary:
    catalogue_rows: int
    selected: int
    dropped: dict[str, int]
    written: int
    quarantined: int
    quarantine_by_reason: dict[str, int]
    observations: int
    observations_skipped: int
    stale_removed: int
    seconds: float
    selection: str = "catalogue"

    def lines(self) -> list[str]:
        out = [
            f"selection: {self.selection}",
            f"catalogue rows: {self.catalogue_rows}; selected: {self.selected}; written: {self.written}",
            f"observations: {self.observations} ({self.observations_skipped} unchanged, skipped)",
        ]
        out += [f"  dropped {reason}: {n}" for reason, n in self.dropped.items()]
        out.append(f"quarantined: {self.quarantined}")
        out += [f"  {reason}: {n}" for reason, n in sorted(self.quarantine_by_reason.items())]
        return out


# ---------------------------------------------------------------- selection


def select_detections(
    catalogue: pd.DataFrame, config: PreprocessConfig
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The detections whose pn spectrum enters the training set, and how many were dropped, by reason.

    Each detection is counted once, under the first rule it fails, in the order of DROP_REASONS:
    no pn exposure (pn_ontime <= 0, or pn_ontime and pn_8_cts both missing: a catalogue leaves the pn
    columns null where the pn did not observe); SUM_FLAG > max_sum_flag; extended (ep_extent > 0,
    when point-like sources are required); pn_8_cts not above min_counts; and one spectrum per source
    per observation: where a srcid appears more than once in an obs_id, the detection with the most pn
    counts is kept (ties: the lowest detid). A missing pn_ontime or ep_extent (a catalogue without
    those columns) is unknown, not a reason to drop: pn counts show the pn observed the source.
    """
    frame = catalogue.reset_index(drop=True)
    remaining = np.ones(len(frame), dtype=bool)
    dropped: dict[str, int] = {}
    ontime_s = frame["pn_ontime"].astype("float64").to_numpy()
    pn_counts = frame["pn_8_cts"].astype("float64").to_numpy()
    rules = {
        "no_pn_exposure": (ontime_s <= 0) | (np.isnan(ontime_s) & np.isnan(pn_counts)),
        "flagged": frame["sum_flag"].astype("float64").fillna(99).to_numpy() > config.max_sum_flag,
        "extended": (frame["ep_extent"].astype("float64").fillna(0).to_numpy() > 0)
        if config.require_point_like
        else np.zeros(len(frame), dtype=bool),
        "low_counts": ~(frame["pn_8_cts"].astype("float64").fillna(-1).to_numpy() > config.min_counts),
    }
    for reason, fails in rules.items():
        dropped[reason] = int(np.sum(remaining & fails))
        remaining &= ~fails
    kept = frame[remaining]
    order = kept.sort_values(["obs_id", "srcid", "pn_8_cts", "detid"], ascending=[True, True, False, True])
    duplicate = order.duplicated(subset=["obs_id", "srcid"], keep="first")
    dropped["duplicate_in_observation"] = int(duplicate.sum())
    selected = order[~duplicate].sort_values(["obs_id", "src_num"]).reset_index(drop=True)
    return selected, dropped


# ---------------------------------------------------------------- locating products


def _existing(candidates: Iterable[Path]) -> Path | None:
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def _gz_variants(path: Path) -> list[Path]:
    if path.suffix.lower() == ".gz":
        return [path, path.with_suffix("")]
    return [path, path.with_name(path.name + ".gz")]


def _version_key(path: Path) -> tuple[float, ...]:
    match = re.search(r"_v(\d+(?:\.\d+)*)\.rmf", path.name, re.IGNORECASE)
    return tuple(float(part) for part in match.group(1).split(".")) if match else (-1.0,)


def find_rmf(respfile: str, spectrum_dir: Path, responses_dir: Path | None) -> Path | None:
    """The RMF named by RESPFILE: beside the spectrum, else in responses_dir by name or as <stem>_v*.rmf."""
    name = Path(respfile).name
    candidates = _gz_variants(spectrum_dir / respfile)
    if responses_dir is not None:
        candidates += _gz_variants(responses_dir / name)
    found = _existing(candidates)
    if found is None and responses_dir is not None and responses_dir.is_dir():
        stem = re.sub(r"(_v\d+(\.\d+)*)?\.rmf(\.gz)?$", "", name, flags=re.IGNORECASE)
        versions = [
            p for p in responses_dir.glob(f"{stem}_v*.rmf*") if p.name.lower().endswith((".rmf", ".rmf.gz"))
        ]
        found = max(versions, key=_version_key) if versions else None
    return found


def _linked(link: str | None, spectrum: Path, fallback: Path | None) -> Path | None:
    """A header link (relative to the spectrum, gzipped or not), else the fallback, else None."""
    if link:
        found = _existing(_gz_variants(spectrum.parent / link))
        if found is not None:
            return found
    return fallback


def _observation_products(obs_dir: Path) -> dict[tuple[str, int], dict[str, Path]]:
    """(exposure id, src_num) -> {SRSPEC/BGSPEC/SRCARF: path} for the pn products in a pps folder."""
    products: dict[tuple[str, int], dict[str, Path]] = {}
    if not obs_dir.is_dir():
        return products
    for name in sorted(os.listdir(obs_dir)):
        match = _PRODUCT.match(name)
        if match:
            key = (match["kind"].upper() + match["expo"], int(match["src"], 16))
            products.setdefault(key, {})[match["type"].upper()] = obs_dir / name
    return products


def _exposure_order(exposure_id: str) -> tuple[int, str]:
    return ("SUX".index(exposure_id[0]), exposure_id[1:])


def _spectrum_products(
    products: dict[tuple[str, int], dict[str, Path]], src_num: int
) -> dict[str, Path] | None:
    """The products of one source: the scheduled (S) exposure first, then the lowest exposure number."""
    candidates = [key for key in products if key[1] == src_num and "SRSPEC" in products[key]]
    if not candidates:
        return None
    return products[min(candidates, key=lambda key: _exposure_order(key[0]))]


# ---------------------------------------------------------------- one spectrum


def _channel_index(pha: Pha, response: CompressedRmf) -> np.ndarray:
    if pha.n_channels != response.n_channels or len(pha.counts) > response.n_channels:
        raise ProductError(
            pha.path, f"{pha.n_channels} channels but the RMF {response.path.name} has {response.n_channels}"
        )
    index = pha.channel - response.channel[0]
    if np.any(index < 0) or np.any(index >= response.n_channels):
        raise ProductError(
            pha.path, f"CHANNEL values outside the RMF's {response.channel[0]}..{response.channel[-1]}"
        )
    return index


def bin_spectrum(
    source: Pha, background: Pha, arf: Arf | None, response: CompressedRmf, cache: ResponseCache
) -> dict[str, np.ndarray | float | int]:
    """The grid arrays and derived scalars of one spectrum (definitions in the module docstring)."""
    grid = cache.grid
    index = _channel_index(source, response)
    if len(background.counts) != len(source.counts) or not np.array_equal(background.channel, source.channel):
        raise ProductError(
            background.path,
            f"{len(background.counts)} channels, the source spectrum has {len(source.counts)}",
        )
    good = source.quality == 0
    bins = response.channel_bin[index]
    use = good & (bins >= 0)
    # fitted only where the counts and the response row sum the same channels: all present and good
    good_channels = np.bincount(bins[use], minlength=grid.n_bins)
    fed = (response.bin_channels > 0) & (good_channels == response.bin_channels)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = (source.exposure_s * np.asarray(source.backscal) * np.asarray(source.areascal)) / (
            background.exposure_s * np.asarray(background.backscal) * np.asarray(background.areascal)
        )
    if not np.isfinite(np.broadcast_to(scale, source.counts.shape)[use]).all():
        raise ProductError(background.path, "zero BACKSCAL or AREASCAL in channels in use: no scale")
    counts = np.bincount(bins[use], weights=np.round(source.counts[use]), minlength=grid.n_bins)
    background_counts = np.bincount(
        bins[use],
        weights=(background.counts * scale)[use] if np.ndim(scale) else background.counts[use] * scale,
        minlength=grid.n_bins,
    )
    areascal = float(np.mean(source.areascal)) if np.ndim(source.areascal) else float(source.areascal)
    area_exposure = cache.area_per_bin(arf, response) * source.exposure_s * areascal
    folded = fold_compressed(area_exposure, response.matrix.astype(np.float64), np.ones(len(area_exposure)))
    reachable = folded > 1e-6 * max(float(folded.max()), 0.0)
    valid = fed & reachable & (folded > 0)
    net = np.clip(counts - background_counts, 0.0, None)
    centres, widths = cache.centres_kev, cache.widths_kev
    flux = np.divide(net, folded * widths, out=np.zeros(grid.n_bins), where=valid)
    energy_flux = float(np.sum(centres * flux * widths)) * KEV_TO_ERG
    if not energy_flux > 0:
        raise ProductError(
            source.path, f"no positive net counts in the valid bins of {grid.e_min_kev}-{grid.e_max_kev} keV"
        )
    nu_f_nu = centres**2 * flux
    return {
        "counts": counts.astype(np.int32),
        "background": background_counts.astype(np.float32),
        "area_exposure_cm2_s": area_exposure.astype(np.float32),
        "unfolded": (nu_f_nu / nu_f_nu.mean()).astype(np.float32),
        "valid": valid,
        "total_counts": int(counts[valid].sum()),
        "net_counts": float(counts[valid].sum() - background_counts[valid].sum()),
        "log10_flux": float(np.log10(energy_flux)),
        "exposure_s": source.exposure_s,
        "backscal_ratio": float(np.mean(scale) * background.exposure_s / source.exposure_s),
        "n_bad_channels": int(np.sum(~good & (response.channel_bin[index] >= 0))),
        "rmf_id": response.rmf_id,
    }


def _spectrum_arrays(
    source: Pha, background: Path, arf: Path | None, rmf: Path | None, cache: ResponseCache
) -> dict:
    check_pn_imaging(source)
    if rmf is None:
        raise ProductError(source.path, f"RMF {source.respfile or '(RESPFILE not set)'} not found")
    response = cache.get(rmf)
    arf_data = read_arf(arf) if arf is not None else None
    if arf_data is None and response.area_factor is None:
        raise ProductError(source.path, "ARF not found (ANCRFILE / SRCARF)")
    return bin_spectrum(source, read_pha(background), arf_data, response, cache)


# ---------------------------------------------------------------- one observation

_ARRAY_TYPES = {
    "counts": pa.int32(),
    "background": pa.float32(),
    "area_exposure_cm2_s": pa.float32(),
    "unfolded": pa.float32(),
    "valid": pa.bool_(),
}
_MODEL_GRID_ARRAYS = ("area_exposure_cm2_s",)  # on the model grid (grid.extended()); the rest on the grid
_SCALAR_TYPES = {
    "detid": pa.int64(),
    "srcid": pa.int64(),
    "iauname": pa.string(),
    "obs_id": pa.string(),
    "src_num": pa.int32(),
    "ra": pa.float64(),
    "dec": pa.float64(),
    "mjd": pa.float64(),
    "mjd_start": pa.float64(),
    "mjd_stop": pa.float64(),
    "pn_filter": pa.string(),
    "pn_submode": pa.string(),
    "exposure_s": pa.float64(),
    "pn_8_cts": pa.float32(),
    "ep_8_flux": pa.float32(),
    "ep_hr1": pa.float32(),
    "ep_hr2": pa.float32(),
    "ep_hr3": pa.float32(),
    "ep_hr4": pa.float32(),
    "ep_extent": pa.float32(),
    "sum_flag": pa.int16(),
    "rmf_id": pa.string(),
    "total_counts": pa.int32(),
    "net_counts": pa.float32(),
    "log10_flux": pa.float32(),
    "backscal_ratio": pa.float32(),
    "n_bad_channels": pa.int32(),
    "spectrum_file": pa.string(),
    "input_hash": pa.string(),
}


def _array_sizes(grid: EnergyGrid) -> dict[str, int]:
    n_model = grid.extended().n_bins
    return {name: n_model if name in _MODEL_GRID_ARRAYS else grid.n_bins for name in _ARRAY_TYPES}


def spectra_schema(grid: EnergyGrid) -> pa.Schema:
    sizes = _array_sizes(grid)
    fields = [pa.field(name, kind) for name, kind in _SCALAR_TYPES.items()]
    fields += [pa.field(name, pa.list_(kind, sizes[name])) for name, kind in _ARRAY_TYPES.items()]
    return pa.schema(fields)


def _spectra_table(records: list[dict], grid: EnergyGrid, metadata: dict) -> pa.Table:
    columns = {}
    sizes = _array_sizes(grid)
    for name, kind in _SCALAR_TYPES.items():
        columns[name] = pa.array([record[name] for record in records], type=kind)
    for name, kind in _ARRAY_TYPES.items():
        values = np.concatenate([record[name] for record in records]) if records else np.zeros(0)
        flat = pa.array(values.astype(kind.to_pandas_dtype()), type=kind)
        columns[name] = pa.FixedSizeListArray.from_arrays(flat, sizes[name])
    schema = spectra_schema(grid).with_metadata({METADATA_KEY: json.dumps(metadata).encode()})
    return pa.Table.from_arrays(list(columns.values()), schema=schema)


def _stored_metadata(path: Path) -> dict | None:
    with contextlib.suppress(OSError, pa.ArrowException, ValueError, KeyError, TypeError):
        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata[METADATA_KEY])
    return None


@functools.cache
def preprocess_version() -> str:
    """Hash of the source of the code that turns products into spectra (this module, the response
    compression, the OGIP readers, the grid): a change to any of it redoes every observation, as the
    Dagster code version of `pn_spectra` says it must, and nothing else does."""
    from xmm_pipeline.ogip import read
    from xmm_pipeline.spectra import grid, response

    digest = hashlib.sha256()
    for module_file in (__file__, read.__file__, response.__file__, grid.__file__):
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()[:16]


def _observation_hash(
    rows: list[dict], products: dict[tuple[str, int], dict[str, Path]], config: PreprocessConfig
) -> str:
    src_nums = {int(row["src_num"]) for row in rows}
    files = sorted(
        (path.name, sha256_file(path))
        for (_, src_num), kinds in products.items()
        if src_num in src_nums
        for path in kinds.values()
    )
    ordered = [
        [row[name] for name in _CATALOGUE_SCALARS] for row in sorted(rows, key=lambda r: int(r["detid"]))
    ]
    return sha256_json(
        {"version": preprocess_version(), "grid": asdict(config.grid), "rows": ordered, "files": files}
    )


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows as dicts of plain values, missing values as None (one conversion, not one per cell)."""
    columns = list(frame.columns)
    values = frame.to_numpy(dtype=object)
    return [{c: (None if v is pd.NA else v) for c, v in zip(columns, row)} for row in values]


def _catalogue_scalars(row: dict) -> dict:
    record = {name: row[name] for name in _CATALOGUE_SCALARS}
    record["mjd"] = 0.5 * (float(row["mjd_start"]) + float(row["mjd_stop"]))
    return record


def preprocess_observation(
    obs_rows: pd.DataFrame,
    archive_dir: Path,
    out_dir: Path,
    config: PreprocessConfig,
    cache: ResponseCache,
    responses_dir: Path | None = None,
) -> ObservationResult:
    """Preprocess the selected detections of one observation into out_dir/spectra/<obs_id>.parquet.

    RMFs named by RESPFILE are looked for beside the spectrum, then in `responses_dir` (default
    archive_dir/responses/PN).
    Skipped (files untouched) when that file exists with the same input hash: the catalogue values the
    file carries (not e.g. `release` or `n_detections`, which a new release changes everywhere), the
    product file contents, the grid and preprocess_version(). Bad products go to the returned
    quarantine list; a source without an SRSPEC counts as dropped (no_pn_spectrum). The file is written
    atomically, also when no row survives, so that the outcome (quarantine, drops, in the file's
    metadata) is kept.
    """
    archive_dir, out_dir = Path(archive_dir), Path(out_dir)
    obs_ids = obs_rows["obs_id"].astype(str).unique()
    if len(obs_ids) != 1:
        raise ValueError(f"preprocess_observation needs the rows of one observation, got {list(obs_ids)}")
    obs_id = str(obs_ids[0])
    path = out_dir / SPECTRA_SUBDIR / f"{obs_id}.parquet"
    products = _observation_products(archive_dir / obs_id / "pps")
    rows = _records(obs_rows)
    input_hash = _observation_hash(rows, products, config)
    stored = _stored_metadata(path) if path.exists() else None
    if stored is not None and stored.get("input_hash") == input_hash:
        return ObservationResult(
            obs_id=obs_id,
            path=path,
            n_written=int(stored.get("n_written", 0)),
            skipped=True,
            quarantine=[QuarantineRecord(**record) for record in stored.get("quarantine", [])],
            dropped=dict(stored.get("dropped", {})),
            rmf_ids=list(stored.get("rmf_ids", [])),
        )
    if cache.grid != config.grid:
        raise ValueError(f"ResponseCache grid {cache.grid} differs from the config's {config.grid}")
    responses_dir = Path(responses_dir) if responses_dir is not None else archive_dir / RESPONSES_SUBDIR
    records, quarantine, missing = [], [], 0
    for row in rows:
        found = _spectrum_products(products, int(row["src_num"]))
        if found is None:
            missing += 1
            continue
        spectrum = found["SRSPEC"]
        try:
            source = read_pha(spectrum)
            background = _linked(source.backfile, spectrum, found.get("BGSPEC"))
            arf = _linked(source.ancrfile, spectrum, found.get("SRCARF"))
            rmf = find_rmf(source.respfile, spectrum.parent, responses_dir) if source.respfile else None
            if background is None:
                raise ProductError(spectrum.parent / _sibling(spectrum, "BGSPEC"), "file not found")
            if arf is None:
                raise ProductError(spectrum.parent / _sibling(spectrum, "SRCARF"), "file not found")
            arrays = _spectrum_arrays(source, background, arf, rmf, cache)
        except ProductError as error:
            quarantine.append(
                QuarantineRecord(
                    "preprocess", str(error), obs_id=obs_id, detid=int(row["detid"]), path=error.path
                )
            )
            continue
        record = _catalogue_scalars(row) | arrays
        record["spectrum_file"] = spectrum.name
        record["input_hash"] = input_hash
        records.append(record)
    rmf_ids = sorted({record["rmf_id"] for record in records})
    dropped = {NO_SPECTRUM: missing}
    metadata = {
        "input_hash": input_hash,
        "n_written": len(records),
        "quarantine": [asdict(record) for record in quarantine],
        "dropped": dropped,
        "rmf_ids": rmf_ids,
        "grid": asdict(config.grid),
        "version": preprocess_version(),
    }
    write_parquet_atomic(path, _spectra_table(records, config.grid, metadata))
    return ObservationResult(obs_id, path, len(records), False, quarantine, dropped, rmf_ids)


def _sibling(spectrum: Path, kind: str) -> str:
    return re.sub("SRSPEC", kind, spectrum.name, flags=re.IGNORECASE)


# ---------------------------------------------------------------- responses table and the archive


def write_responses(out_dir: Path, cache: ResponseCache) -> Path:
    """Write (or extend) out_dir/responses.parquet with every RMF the cache has compressed; atomic."""
    path = Path(out_dir) / RESPONSES_FILE
    grid, model_grid = cache.grid, cache.model_grid
    matrices = {rmf_id: matrix.ravel() for rmf_id, matrix in cache.responses().items()}
    if path.exists():
        existing = pq.read_table(path)
        same_grid = existing.num_rows and (
            existing["n_bins"][0].as_py() == grid.n_bins
            and existing["e_min_kev"][0].as_py() == grid.e_min_kev
            and existing["e_max_kev"][0].as_py() == grid.e_max_kev
            and "model_bins_below" in existing.column_names
            and existing["model_bins_below"][0].as_py() == model_grid.bins_below
            and existing["model_bins_above"][0].as_py() == model_grid.bins_above
        )
        if same_grid:
            flat = existing["matrix"].combine_chunks().flatten().to_numpy().reshape(existing.num_rows, -1)
            for rmf_id, matrix in zip(existing["rmf_id"].to_pylist(), flat):
                matrices.setdefault(rmf_id, matrix)
    ids = sorted(matrices)
    values = np.concatenate([matrices[i] for i in ids]).astype(np.float32) if ids else np.zeros(0, np.float32)
    table = pa.table(
        {
            "rmf_id": pa.array(ids, pa.string()),
            "e_min_kev": pa.array([grid.e_min_kev] * len(ids), pa.float64()),
            "e_max_kev": pa.array([grid.e_max_kev] * len(ids), pa.float64()),
            "n_bins": pa.array([grid.n_bins] * len(ids), pa.int32()),
            "model_bins_below": pa.array([model_grid.bins_below] * len(ids), pa.int32()),
            "model_bins_above": pa.array([model_grid.bins_above] * len(ids), pa.int32()),
            "matrix": pa.FixedSizeListArray.from_arrays(pa.array(values), grid.n_bins * model_grid.n_bins),
        }
    )
    write_parquet_atomic(path, table)
    return path


def reason_category(reason: str) -> str:
    """The problem part of a quarantine reason (the path before ': ' dropped) with free-standing
    numbers replaced by N, for counting; digits inside a name (epn_e3_ff20_sdY9.rmf) stay."""
    problem = reason.split(": ", 1)[1] if ": " in reason else reason
    return re.sub(r"(?<![\w.])-?\d+(\.\d+)?(e[-+]?\d+)?(?!\w)", "N", problem)


def read_catalogue(archive_dir: Path) -> pd.DataFrame:
    """ARCHIVE/catalogue.parquet in the canonical schema; it needs only the required columns
    (archive.catalogue.REQUIRED_COLUMNS), the others get their documented defaults."""
    path = Path(archive_dir) / CATALOGUE_FILE
    if not path.is_file():
        raise UserError(f"{path}: no catalogue (is {archive_dir} an archive folder?)")
    try:
        return as_canonical(pd.read_parquet(path))
    except UserError as error:
        raise UserError(f"{path}: {error}") from None


def preprocess_archive(
    archive_dir: Path,
    out_dir: Path,
    config: PreprocessConfig = PreprocessConfig(),
    cache: ResponseCache | None = None,
    progress: Callable[[int, int], None] | None = None,
    responses_dir: Path | None = None,
) -> PreprocessSummary:
    """Select, then preprocess observation by observation (memory flat), then write the run's tables.

    Writes out_dir/spectra/<obs_id>.parquet (unchanged observations skipped), responses.parquet,
    quarantine.parquet and selection.json; removes per-observation files of observations that no
    longer have a selected detection, so the folder always loads as this catalogue's dataset.
    An archive folder without catalogue.parquet but with <obs_id>/pps/ product folders (a user's own
    PPS products) is selected on the products' own net counts instead (`catalogue_from_products`).
    Pass a `cache` to share compressed RMFs across calls in one process; `responses_dir` is where the
    canned RMFs are (default archive_dir/responses/PN); `progress(done, total)` is called with the
    selected detections handled after each observation.
    """
    started = time.perf_counter()
    archive_dir, out_dir = Path(archive_dir), Path(out_dir)
    if (archive_dir / CATALOGUE_FILE).is_file() or not product_observations(archive_dir):
        _refuse_misplaced_products(archive_dir)
        catalogue = read_catalogue(archive_dir)
        selected, dropped = select_detections(catalogue, config)
        point_like = ", point-like" if config.require_point_like else ""
        selection = (
            f"{CATALOGUE_FILE}: pn_8_cts > {config.min_counts:g}, SUM_FLAG <= {config.max_sum_flag}"
            f"{point_like}, one detection per source and observation"
        )
    else:
        catalogue = catalogue_from_products(archive_dir)
        selected, dropped = select_on_product_counts(catalogue, config)
        selection = (
            f"no {CATALOGUE_FILE}: selected on the products' own net counts "
            f"({NET_COUNTS_BAND_KEV[0]}-{NET_COUNTS_BAND_KEV[1]} keV, > {config.min_counts:g}); "
            "SUM_FLAG, extent and duplicates not applied"
        )
    cache = cache if cache is not None else ResponseCache(config.grid)
    quarantine: list[QuarantineRecord] = []
    written = skipped = 0
    drops: Counter[str] = Counter()
    obs_ids = []
    plain = selected.astype({name: object for name in selected.columns if selected[name].dtype == "string"})
    handled = 0
    for obs_id, rows in plain.groupby("obs_id", sort=True):
        result = preprocess_observation(rows, archive_dir, out_dir, config, cache, responses_dir)
        obs_ids.append(str(obs_id))
        written += result.n_written
        skipped += int(result.skipped)
        quarantine += result.quarantine
        drops.update(result.dropped)
        handled += len(rows)
        if progress is not None:
            progress(handled, len(plain))
    kept = set(obs_ids)
    stale = [p for p in (out_dir / SPECTRA_SUBDIR).glob("*.parquet") if p.stem not in kept]
    for path in stale:
        path.unlink()
    if cache.responses() or not (out_dir / RESPONSES_FILE).exists():
        write_responses(out_dir, cache)
    write_parquet_atomic(out_dir / QUARANTINE_FILE, quarantine_frame(quarantine))
    all_dropped = dropped | {NO_SPECTRUM: drops.get(NO_SPECTRUM, 0)}
    by_reason = dict(Counter(reason_category(record.reason) for record in quarantine))
    summary = PreprocessSummary(
        catalogue_rows=len(catalogue),
        selected=len(selected),
        dropped=all_dropped,
        written=written,
        quarantined=len(quarantine),
        quarantine_by_reason=by_reason,
        observations=len(obs_ids),
        observations_skipped=skipped,
        stale_removed=len(stale),
        seconds=time.perf_counter() - started,
        selection=selection,
    )
    record = asdict(summary) | {"config": asdict(config), "version": preprocess_version()}
    write_json_atomic(out_dir / SELECTION_FILE, record)
    return summary


# ---------------------------------------------------------------- products without a catalogue

NET_COUNTS_BAND_KEV = (0.2, 12.0)  # the band of the catalogue's pn_8_cts
PN_CHANNEL_KEV = 0.005  # pn PI channel c spans [c, c + 1) x 5 eV
_OBS_ID = re.compile(r"^\d{10}$")
_NULL_WITHOUT_CATALOGUE = ("ra", "dec", "mjd_start", "mjd_stop", "pn_8_cts", "ep_8_flux", "ep_extent")
_NULL_WITHOUT_CATALOGUE += ("ep_hr1", "ep_hr2", "ep_hr3", "ep_hr4")


def product_observations(archive_dir: Path) -> list[str]:
    """The obs_ids of archive_dir/<obs_id>/pps/ folders (10-digit names) holding a pn SRSPEC."""
    archive_dir = Path(archive_dir)
    if not archive_dir.is_dir():
        return []
    found = []
    for name in sorted(os.listdir(archive_dir)):
        products = _observation_products(archive_dir / name / "pps") if _OBS_ID.match(name) else {}
        if any("SRSPEC" in kinds for kinds in products.values()):
            found.append(name)
    return found


def _refuse_misplaced_products(archive_dir: Path) -> None:
    """A clear error for PPS products given one or two levels too deep (a pps/ or <obs_id>/ folder)."""
    if (archive_dir / CATALOGUE_FILE).is_file():
        return
    levels = ((archive_dir, archive_dir.parent.parent), (archive_dir / "pps", archive_dir.parent))
    for folder, above in levels:
        if any("SRSPEC" in kinds for kinds in _observation_products(folder).values()):
            raise UserError(
                f"{archive_dir}: PPS products found in {folder}, but the archive layout is "
                f"ARCHIVE/<obs_id>/pps/: pass the folder above <obs_id> ({above})"
            )


def product_detid(obs_id: str, src_num: int) -> int:
    """The id of a detection known only from its products: obs_id x 10^4 + the PPS source number."""
    return int(obs_id) * 10_000 + int(src_num)


def product_net_counts(source: Pha, background: Pha) -> float:
    """Net counts of the good-quality (QUALITY = 0) channels in NET_COUNTS_BAND_KEV, background scaled
    by EXPOSURE x BACKSCAL x AREASCAL; channel energies are pn PI channels, as in pn_8_cts."""
    energy_kev = source.channel * PN_CHANNEL_KEV
    use = (
        (source.quality == 0) & (energy_kev >= NET_COUNTS_BAND_KEV[0]) & (energy_kev < NET_COUNTS_BAND_KEV[1])
    )
    if len(background.counts) != len(source.counts):
        raise ProductError(
            background.path, f"{len(background.counts)} channels, the source has {len(source.counts)}"
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.broadcast_to(
            source.exposure_s
            * np.asarray(source.backscal)
            * np.asarray(source.areascal)
            / (background.exposure_s * np.asarray(background.backscal) * np.asarray(background.areascal)),
            source.counts.shape,
        )
    if not np.isfinite(scale[use]).all():
        raise ProductError(background.path, "zero BACKSCAL or AREASCAL: no background scale")
    return float(source.counts[use].sum() - (background.counts * scale)[use].sum())


def _product_row(obs_id: str, src_num: int, found: dict[str, Path]) -> dict:
    """The canonical detection row of one source's products; net counts NaN where they cannot be read
    (the row is then kept, so that preprocessing quarantines it with the reason)."""
    spectrum = found["SRSPEC"]
    row: dict = dict.fromkeys(_CATALOGUE_SCALARS)
    detid = product_detid(obs_id, src_num)
    row |= {
        "detid": detid,
        "srcid": detid,
        "obs_id": obs_id,
        "src_num": src_num,
        "iauname": f"{obs_id} src {src_num:03X}",
        "product_net_counts": np.nan,
    }
    row |= dict.fromkeys(_NULL_WITHOUT_CATALOGUE, np.nan)
    try:
        source = read_pha(spectrum)
    except ProductError:
        return row
    keywords = source.keywords
    row |= {
        "mjd_start": _date_to_mjd(keywords.get("DATE-OBS")),
        "mjd_stop": _date_to_mjd(keywords.get("DATE-END")),
        "pn_filter": str(keywords.get("FILTER", "")),
        "pn_submode": str(keywords.get("SUBMODE", "")),
    }
    if not np.isfinite(row["mjd_stop"]):
        row["mjd_stop"] = row["mjd_start"]
    background = _linked(source.backfile, spectrum, found.get("BGSPEC"))
    with contextlib.suppress(ProductError):
        if background is not None:
            row["product_net_counts"] = product_net_counts(source, read_pha(background))
    return row


def catalogue_from_products(archive_dir: Path) -> pd.DataFrame:
    """One canonical detection row per pn source with an SRSPEC in archive_dir/<obs_id>/pps/.

    For a folder of PPS products without a catalogue: detid = srcid = product_detid (each detection its
    own source: nothing links detections across observations), iauname "<obs_id> src <HHH>", the
    observation dates, filter and submode from the spectrum's header, and a `product_net_counts` column
    (`product_net_counts`); catalogue-only columns (coordinates, fluxes, hardness ratios, SUM_FLAG) null.
    """
    rows = []
    for obs_id in product_observations(archive_dir):
        products = _observation_products(Path(archive_dir) / obs_id / "pps")
        for src_num in sorted({src for _, src in products}):
            found = _spectrum_products(products, src_num)
            if found is not None:
                rows.append(_product_row(obs_id, src_num, found))
    if not rows:
        raise UserError(f"{archive_dir}: no {CATALOGUE_FILE} and no <obs_id>/pps/ folder with pn products")
    frame = pd.DataFrame(rows)
    for name in ("iauname", "obs_id", "pn_filter", "pn_submode"):
        frame[name] = frame[name].astype(object)
    frame["sum_flag"] = frame["sum_flag"].astype(object)
    return frame


def select_on_product_counts(
    products: pd.DataFrame, config: PreprocessConfig
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows of `catalogue_from_products` whose net counts exceed config.min_counts (rows whose
    products could not be read stay in, to be quarantined with the reason); drops by reason."""
    net = products["product_net_counts"].astype("float64").to_numpy()
    low = np.isfinite(net) & ~(net > config.min_counts)
    dropped = dict.fromkeys(DROP_REASONS, 0) | {"low_counts": int(low.sum())}
    return products[~low].reset_index(drop=True), dropped


# ---------------------------------------------------------------- a user's own spectrum


def _explicit_or_linked(
    explicit: str | Path | None, link: str | None, spectrum: Path, keyword: str, option: str
) -> Path:
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ProductError(path, "file not found")
        return path
    if not link:
        raise ProductError(spectrum, f"{keyword} is NONE or absent: pass the file explicitly ({option})")
    found = _existing(_gz_variants(spectrum.parent / link))
    if found is None:
        raise ProductError(
            spectrum.parent / link, f"file named by {keyword} not found: pass it explicitly ({option})"
        )
    return found


def spectrum_to_dataset(
    spectrum_path: str | Path,
    background_path: str | Path | None = None,
    arf_path: str | Path | None = None,
    rmf_path: str | Path | None = None,
    grid: EnergyGrid = DEFAULT_GRID,
) -> SpectralDataset:
    """One user spectrum, preprocessed exactly as in the pipeline, as a one-row SpectralDataset.

    Files not passed are taken from the header links (BACKFILE, ANCRFILE, RESPFILE, relative to the
    spectrum); a link that is NONE or absent raises ProductError naming the option to pass.
    """
    spectrum = Path(spectrum_path)
    source = read_pha(spectrum)
    check_pn_imaging(source)
    background = _explicit_or_linked(background_path, source.backfile, spectrum, "BACKFILE", "--background")
    rmf = _explicit_or_linked(rmf_path, source.respfile, spectrum, "RESPFILE", "--rmf")
    cache = ResponseCache(grid)
    response = cache.get(rmf)
    arf: Path | None = None
    if arf_path is not None or response.area_factor is None:
        try:
            arf = _explicit_or_linked(arf_path, source.ancrfile, spectrum, "ANCRFILE", "--arf")
        except ProductError as error:
            if arf_path is not None:
                raise
            raise ProductError(
                error.path, f"{error.problem}; the RMF {rmf.name} holds no effective area: the ARF is needed"
            ) from None
    arrays = _spectrum_arrays(source, background, arf, rmf, cache)
    keywords = source.keywords
    meta = {
        "detid": -1,
        "srcid": -1,
        "iauname": str(keywords.get("OBJECT", spectrum.stem)),
        "obs_id": str(keywords.get("OBS_ID", "")),
        "src_num": -1,
        "ra": np.nan,
        "dec": np.nan,
        "mjd": _date_to_mjd(keywords.get("DATE-OBS")),
        "pn_filter": str(keywords.get("FILTER", "")),
        "pn_submode": str(keywords.get("SUBMODE", "")),
        "spectrum_file": str(spectrum),
    }
    meta |= {name: value for name, value in arrays.items() if np.ndim(value) == 0}
    return SpectralDataset(
        grid=grid,
        counts=arrays["counts"][None, :].astype(np.float32),
        background=arrays["background"][None, :],
        area_exposure=arrays["area_exposure_cm2_s"][None, :],
        rmf_index=np.zeros(1, dtype=np.int64),
        rmf_matrices=response.matrix[None, :, :],
        rmf_ids=[response.rmf_id],
        unfolded=arrays["unfolded"][None, :],
        meta=pd.DataFrame([meta]),
        valid=arrays["valid"][None, :],
        model_grid=cache.model_grid,
    )


def _date_to_mjd(date_obs: object) -> float:
    if not date_obs:
        return float("nan")
    try:
        stamp = pd.Timestamp(str(date_obs))
    except ValueError:
        return float("nan")
    return float((stamp - pd.Timestamp("1858-11-17")) / pd.Timedelta(days=1))
