"""The training set as arrays: what the preprocessing writes and what the model and latent code read.

On disk (written by `spectra.preprocess`, one Parquet file per observation so a new release adds
files rather than rewriting them):

    SPECTRA_DIR/spectra/<obs_id>.parquet   one row per selected detection (columns below)
    SPECTRA_DIR/responses.parquet          one row per canned RMF: rmf_id, e_min_kev, e_max_kev,
                                           n_bins (the channel grid), model_bins_below,
                                           model_bins_above (the model grid: spectra/grid.py), matrix
                                           (n_bins * n_model_bins float32, row-major [k, j])
    SPECTRA_DIR/quarantine.parquet         what was set aside, with the reason
    SPECTRA_DIR/selection.json             detections dropped by the selection, by reason

Array columns, fixed-size lists: B = n_bins entries (channel bins k) or M = n_model_bins (model bins j):
    counts               int32    [B] source counts of the good channels summed into channel bin k
    background           float32  [B] background counts scaled to the source region and exposure
    valid                bool     [B] the bin is fitted: all the channels its response row sums are
                                  present with QUALITY 0 (none bad, at least one) and the response
                                  reaches it; masked bins are left out of the likelihood, the deviance
                                  and its degrees of freedom, the encoder input and the plots
    area_exposure_cm2_s  float32  [M] effective area x exposure of model bin j (ARF averaged over it)
    unfolded             float32  [B] scaled unfolded spectrum, the encoder's input: 0 in masked bins,
                                  unit mean over all bins
The redistribution matrix R[k, j] of the spectrum's `rmf_id` is the probability that a photon in
model bin j is registered in channel bin k. Expected source counts for a photon flux phi_j
(photons/cm^2/s integrated over model bin j) are mu_k = sum_j R[k, j] * area_exposure_j * phi_j.

Tables written before the mask and the model grid (no `valid` column, no model_bins_* columns) still
load: every bin valid, the model grid equal to the channel grid, as they were fitted when written.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from xmm_pipeline.errors import UserError
from xmm_pipeline.spectra.grid import EnergyGrid, ModelGrid

CHANNEL_COLUMNS = ("counts", "background", "unfolded")
MODEL_COLUMNS = ("area_exposure_cm2_s",)
MASK_COLUMN = "valid"
ARRAY_COLUMNS = (*CHANNEL_COLUMNS[:2], *MODEL_COLUMNS, CHANNEL_COLUMNS[2], MASK_COLUMN)
SPECTRA_SUBDIR = "spectra"
RESPONSES_FILE = "responses.parquet"


@dataclass
class SpectralDataset:
    """Spectra on the channel grid (B bins) with responses from the model grid (M bins).

    `valid` defaults to all bins valid; `model_grid` to the channel grid itself when the matrices are
    square (data made before the wider model grid)."""

    grid: EnergyGrid
    counts: np.ndarray  # float32 [N, B]
    background: np.ndarray  # float32 [N, B], expected background counts in the source region
    area_exposure: np.ndarray  # float32 [N, M], cm^2 s per model bin
    rmf_index: np.ndarray  # int64 [N], row of rmf_matrices used by each spectrum
    rmf_matrices: np.ndarray  # float32 [R, B, M], [r, k, j]
    rmf_ids: list[str]
    unfolded: np.ndarray  # float32 [N, B], the encoder's input
    meta: pd.DataFrame  # one row per spectrum: detid, srcid, obs_id, iauname, mjd, ...
    valid: np.ndarray | None = None  # bool [N, B], the channel bins that are fitted
    model_grid: ModelGrid | None = None

    def __post_init__(self) -> None:
        if self.model_grid is None:
            if self.rmf_matrices.shape[-1] != self.grid.n_bins:
                raise ValueError(
                    f"responses have {self.rmf_matrices.shape[-1]} model bins: pass the model grid"
                )
            self.model_grid = ModelGrid.same_as(self.grid)
        if self.model_grid.channel != self.grid:
            raise ValueError(f"model grid {self.model_grid} does not extend the channel grid {self.grid}")
        if self.valid is None:
            self.valid = np.ones(np.shape(self.counts), dtype=bool)
        self.valid = np.asarray(self.valid, dtype=bool)
        n_channel, n_model = self.grid.n_bins, self.model_grid.n_bins
        shapes = {"counts": (n_channel, self.counts), "background": (n_channel, self.background),
                  "unfolded": (n_channel, self.unfolded), "valid": (n_channel, self.valid),
                  "area_exposure": (n_model, self.area_exposure)}
        for name, (n, values) in shapes.items():
            if np.ndim(values) != 2 or np.shape(values)[1] != n:
                raise ValueError(f"SpectralDataset.{name} has shape {np.shape(values)}, wants [N, {n}]")
        if self.rmf_matrices.shape[1:] != (n_channel, n_model):
            raise ValueError(f"rmf_matrices have shape {self.rmf_matrices.shape}, want [R, {n_channel}, "
                             f"{n_model}]")

    @property
    def model_widths_kev(self) -> np.ndarray:
        return self.model_grid.widths_kev

    def __len__(self) -> int:
        return len(self.counts)

    def subset(self, index: np.ndarray) -> SpectralDataset:
        index = np.asarray(index)
        return replace(
            self,
            counts=self.counts[index],
            background=self.background[index],
            area_exposure=self.area_exposure[index],
            rmf_index=self.rmf_index[index],
            unfolded=self.unfolded[index],
            valid=self.valid[index],
            meta=self.meta.iloc[index].reset_index(drop=True),
        )

    def fold(self, photon_flux_per_bin: np.ndarray) -> np.ndarray:
        """Expected source counts per channel bin [N, B] for photon fluxes [N, M] (photons/cm^2/s per
        model bin)."""
        incident = photon_flux_per_bin * self.area_exposure
        out = np.empty((len(incident), self.grid.n_bins), dtype=np.float64)
        for r in range(len(self.rmf_matrices)):
            rows = self.rmf_index == r
            if rows.any():
                out[rows] = incident[rows] @ self.rmf_matrices[r].T.astype(np.float64)
        return out


def _stack(column: pa.ChunkedArray, n_bins: int, dtype: type) -> np.ndarray:
    flat = (
        pa.concat_arrays([chunk.flatten() for chunk in column.chunks]) if column.num_chunks else pa.array([])
    )
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=dtype).reshape(-1, n_bins)


def read_responses(spectra_dir: str | Path) -> tuple[ModelGrid, list[str], np.ndarray]:
    """(model grid, whose .channel is the channel grid; rmf ids; matrices [R, B, M])."""
    path = Path(spectra_dir) / RESPONSES_FILE
    if not path.exists():
        raise UserError(f"{path}: no responses table; run the preprocessing first")
    table = pq.read_table(path)
    if table.num_rows == 0:
        raise UserError(f"{path}: responses table is empty")
    grid = EnergyGrid(
        float(table["e_min_kev"][0].as_py()),
        float(table["e_max_kev"][0].as_py()),
        int(table["n_bins"][0].as_py()),
    )
    names = set(table.column_names)
    model_grid = (
        ModelGrid(grid, int(table["model_bins_below"][0].as_py()), int(table["model_bins_above"][0].as_py()))
        if {"model_bins_below", "model_bins_above"} <= names
        else ModelGrid.same_as(grid)
    )
    size = grid.n_bins * model_grid.n_bins
    stored = table.schema.field("matrix").type.list_size
    if stored != size:
        raise UserError(f"{path}: matrices of {stored} values, the grids "
                        f"({grid.n_bins} x {model_grid.n_bins} bins) need {size}")
    matrices = _stack(table["matrix"], size, np.float32).reshape(-1, grid.n_bins, model_grid.n_bins)
    return model_grid, [str(v) for v in table["rmf_id"].to_pylist()], matrices


def spectra_files(spectra_dir: str | Path) -> list[Path]:
    return sorted((Path(spectra_dir) / SPECTRA_SUBDIR).glob("*.parquet"))


def load_dataset(spectra_dir: str | Path, obs_ids: list[str] | None = None) -> SpectralDataset:
    """Read the per-observation Parquet spectra (all, or the named observations) as one dataset."""
    responses = read_responses(spectra_dir)
    files = spectra_files(spectra_dir)
    if obs_ids is not None:
        wanted = set(obs_ids)
        files = [f for f in files if f.stem in wanted]
    if not files:
        raise UserError(f"{Path(spectra_dir) / SPECTRA_SUBDIR}: no spectra to load")
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    table = table.sort_by([("obs_id", "ascending"), ("src_num", "ascending")])
    return dataset_from_table(table, responses, spectra_dir)


def dataset_from_table(
    table: pa.Table, responses: tuple[ModelGrid, list[str], np.ndarray], where: str | Path
) -> SpectralDataset:
    """A spectra table (rows of per-observation files) with the responses table `read_responses` gave,
    as a dataset; `where` names the folder or file in the one-line errors."""
    model_grid, rmf_ids, matrices = responses
    grid = model_grid.channel
    sizes = {name: grid.n_bins for name in CHANNEL_COLUMNS}
    sizes |= {name: model_grid.n_bins for name in MODEL_COLUMNS}
    for name, size in sizes.items():
        stored = table.schema.field(name).type if name in table.column_names else None
        if stored is None or getattr(stored, "list_size", size) != size:
            raise UserError(f"{where}: spectra column {name} is {stored or 'missing'}, the responses' "
                            f"grids need {size} entries; preprocess again")
    arrays = {name: _stack(table[name], size, np.float32) for name, size in sizes.items()}
    valid = (
        _stack(table[MASK_COLUMN], grid.n_bins, np.bool_)
        if MASK_COLUMN in table.column_names
        else np.ones((table.num_rows, grid.n_bins), dtype=bool)
    )
    position = {rmf_id: i for i, rmf_id in enumerate(rmf_ids)}
    unknown = sorted(set(table["rmf_id"].to_pylist()) - set(position))
    if unknown:
        raise UserError(f"{where}: spectra reference RMFs missing from {RESPONSES_FILE}: {unknown}")
    meta = table.drop_columns([c for c in ARRAY_COLUMNS if c in table.column_names]).to_pandas()
    return SpectralDataset(
        grid=grid,
        counts=arrays["counts"],
        background=arrays["background"],
        area_exposure=arrays["area_exposure_cm2_s"],
        rmf_index=np.array([position[r] for r in meta["rmf_id"]], dtype=np.int64),
        rmf_matrices=matrices,
        rmf_ids=rmf_ids,
        unfolded=arrays["unfolded"],
        meta=meta,
        valid=valid,
        model_grid=model_grid,
    )
