"""The training set as arrays: what the preprocessing writes and what the model and latent code read.

On disk (written by `spectra.preprocess`, one Parquet file per observation so a new release adds
files rather than rewriting them):

    SPECTRA_DIR/spectra/<obs_id>.parquet   one row per selected detection (columns below)
    SPECTRA_DIR/responses.parquet          one row per canned RMF: rmf_id, e_min_kev, e_max_kev,
                                           n_bins, matrix (n_bins*n_bins float32, row-major [k, j])
    SPECTRA_DIR/quarantine.parquet         what was set aside, with the reason
    SPECTRA_DIR/selection.json             detections dropped by the selection, by reason

Array columns (fixed-size lists of length n_bins, one entry per bin of the EnergyGrid):
    counts               int32    source-region counts summed into channel bin k (by EBOUNDS energy)
    background           float32  background counts scaled to the source region and exposure
    area_exposure_cm2_s  float32  effective area x exposure of model bin j (ARF averaged over the bin)
    unfolded             float32  scaled unfolded spectrum, the encoder's input (see docs/DATA.md)
The redistribution matrix R[k, j] of the spectrum's `rmf_id` is the probability that a photon in
model bin j is registered in channel bin k. Expected source counts for a photon flux phi_j
(photons/cm^2/s integrated over model bin j) are mu_k = sum_j R[k, j] * area_exposure_j * phi_j.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from xmm_pipeline.errors import UserError
from xmm_pipeline.spectra.grid import EnergyGrid

ARRAY_COLUMNS = ("counts", "background", "area_exposure_cm2_s", "unfolded")
SPECTRA_SUBDIR = "spectra"
RESPONSES_FILE = "responses.parquet"


@dataclass
class SpectralDataset:
    grid: EnergyGrid
    counts: np.ndarray  # float32 [N, B]
    background: np.ndarray  # float32 [N, B], expected background counts in the source region
    area_exposure: np.ndarray  # float32 [N, B], cm^2 s per model bin
    rmf_index: np.ndarray  # int64 [N], row of rmf_matrices used by each spectrum
    rmf_matrices: np.ndarray  # float32 [R, B, B], [r, k, j]
    rmf_ids: list[str]
    unfolded: np.ndarray  # float32 [N, B], the encoder's input
    meta: pd.DataFrame  # one row per spectrum: detid, srcid, obs_id, iauname, mjd, ...

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
            meta=self.meta.iloc[index].reset_index(drop=True),
        )

    def fold(self, photon_flux_per_bin: np.ndarray) -> np.ndarray:
        """Expected source counts per channel bin for photon fluxes [N, B] (photons/cm^2/s per bin)."""
        incident = photon_flux_per_bin * self.area_exposure
        out = np.empty_like(incident, dtype=np.float64)
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


def read_responses(spectra_dir: str | Path) -> tuple[EnergyGrid, list[str], np.ndarray]:
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
    matrices = _stack(table["matrix"], grid.n_bins * grid.n_bins, np.float32).reshape(
        -1, grid.n_bins, grid.n_bins
    )
    return grid, [str(v) for v in table["rmf_id"].to_pylist()], matrices


def spectra_files(spectra_dir: str | Path) -> list[Path]:
    return sorted((Path(spectra_dir) / SPECTRA_SUBDIR).glob("*.parquet"))


def load_dataset(spectra_dir: str | Path, obs_ids: list[str] | None = None) -> SpectralDataset:
    """Read the per-observation Parquet spectra (all, or the named observations) as one dataset."""
    grid, rmf_ids, matrices = read_responses(spectra_dir)
    files = spectra_files(spectra_dir)
    if obs_ids is not None:
        wanted = set(obs_ids)
        files = [f for f in files if f.stem in wanted]
    if not files:
        raise UserError(f"{Path(spectra_dir) / SPECTRA_SUBDIR}: no spectra to load")
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    table = table.sort_by([("obs_id", "ascending"), ("src_num", "ascending")])
    arrays = {name: _stack(table[name], grid.n_bins, np.float32) for name in ARRAY_COLUMNS}
    position = {rmf_id: i for i, rmf_id in enumerate(rmf_ids)}
    unknown = sorted(set(table["rmf_id"].to_pylist()) - set(position))
    if unknown:
        raise UserError(f"{spectra_dir}: spectra reference RMFs missing from {RESPONSES_FILE}: {unknown}")
    meta = table.drop_columns(list(ARRAY_COLUMNS)).to_pandas()
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
    )
