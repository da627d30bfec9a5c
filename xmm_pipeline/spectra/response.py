"""Collapse an ARF + RMF onto the energy grids, and fold model spectra (compressed or full resolution).

Definitions (B channel bins k of the channel grid; M model bins j of the model grid, the channel grid
extended to 0.2-12 keV (spectra/grid.py), with edges G_0 < ... < G_M; fine RMF energy bins
i = [lo_i, hi_i] of width w_i; channels c with mid energy from EBOUNDS):

    O[i, j]  = |[lo_i, hi_i] ∩ [G_j, G_j+1]| / w_i         share of fine bin i inside model bin j
    area_j   = sum_i O[i,j] w_i A_i / sum_i O[i,j] w_i       ARF averaged over model bin j (cm^2)
    Rb[i, k] = sum_{c : E_c in channel bin k} M[i, c]        RMF summed into channel bins
    R[k, j]  = sum_i W[i,j] Rb[i,k] / sum_i W[i,j]           redistribution of model bin j, [B, M]

with weights W[i,j] = O[i,j] w_i ("width", the default: independent of any ARF, so one matrix per
canned RMF serves every spectrum that names it) or O[i,j] w_i A_i ("area_width": exact for a flat
photon spectrum within each bin, but tied to one ARF). Expected counts in channel bin k for photon
fluxes phi_j (photons/cm^2/s integrated over grid bin j) are

    mu_k = sum_j R[k, j] * area_exposure_j * phi_j,   area_exposure_j = area_j * EXPOSURE * AREASCAL.

Photons outside the model grid are not modelled (on the real pn responses they change no channel bin
by more than 0.5%); channels outside the channel grid are dropped. On the real pn files both weightings
reproduce the full-resolution fold within 0.5% in every channel bin (measured figures in docs/DATA.md).
Channel bins that no EBOUNDS mid energy falls in (the 0.330 keV bin of the canned matrices: bins
narrower than the 5 eV channels) have an all-zero row of R; `channels_per_bin` counts them so that the
preprocessing masks them. For a SPECRESP MATRIX (area inside the RMF) the row sums of the matrix are
taken as an area factor and the rows normalised before binning.

The response id is content-keyed only: a hash of the compressed matrix and the two grids, so one
matrix served under two names (the canned v19.0 and v21.0 files are identical) is one response.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse

from xmm_pipeline.errors import ProductError
from xmm_pipeline.ogip.read import Arf, Rmf, read_rmf
from xmm_pipeline.spectra.grid import DEFAULT_GRID, EnergyGrid, ModelGrid

WEIGHTINGS = ("width", "area_width")


def overlap_fractions(
    energy_lo_kev: np.ndarray, energy_hi_kev: np.ndarray, grid: EnergyGrid | ModelGrid
) -> sparse.csr_matrix:
    """O[i, j]: the fraction of fine energy bin i that lies inside grid bin j (CSR, [fine, grid])."""
    edges = grid.edges_kev
    first = np.clip(np.searchsorted(edges, energy_lo_kev, side="right") - 1, 0, grid.n_bins - 1)
    last = np.clip(np.searchsorted(edges, energy_hi_kev, side="left") - 1, 0, grid.n_bins - 1)
    span = np.maximum(last - first + 1, 1)
    rows = np.repeat(np.arange(len(energy_lo_kev)), span)
    cols = np.repeat(first, span) + (np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span))
    overlap = np.minimum(energy_hi_kev[rows], edges[cols + 1]) - np.maximum(energy_lo_kev[rows], edges[cols])
    fraction = np.clip(overlap, 0.0, None) / (energy_hi_kev - energy_lo_kev)[rows]
    keep = fraction > 0
    shape = (len(energy_lo_kev), grid.n_bins)
    return sparse.csr_matrix((fraction[keep], (rows[keep], cols[keep])), shape=shape)


def bin_average(values: np.ndarray, overlap: sparse.csr_matrix, width_kev: np.ndarray) -> np.ndarray:
    """Width-weighted mean of a fine-grid quantity over each grid bin; 0 where no fine bin reaches."""
    weight = overlap.T @ width_kev
    total = overlap.T @ (width_kev * values)
    return np.divide(total, weight, out=np.zeros_like(total), where=weight > 0)


def averaging_operator(
    energy_lo_kev: np.ndarray, energy_hi_kev: np.ndarray, grid: EnergyGrid | ModelGrid
) -> sparse.csr_matrix:
    """[grid, fine] CSR with rows summing to 1: `operator @ values` is `bin_average` of the values."""
    overlap = overlap_fractions(energy_lo_kev, energy_hi_kev, grid)
    weights = overlap.multiply((energy_hi_kev - energy_lo_kev)[:, None]).T.tocsr()
    total = np.asarray(weights.sum(axis=1)).ravel()
    return sparse.diags(np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)) @ weights


def channel_bins(rmf: Rmf, grid: EnergyGrid) -> np.ndarray:
    """Grid bin of each RMF channel by its mid energy (EBOUNDS); -1 outside the grid."""
    return grid.bin_index(0.5 * (rmf.channel_lo_kev + rmf.channel_hi_kev))


def channels_per_bin(channel_bin: np.ndarray, n_bins: int) -> np.ndarray:
    """How many RMF channels each channel bin sums (0: a bin no channel feeds)."""
    return np.bincount(channel_bin[channel_bin >= 0], minlength=n_bins)


def binned_redistribution(rmf: Rmf, grid: EnergyGrid) -> tuple[np.ndarray, np.ndarray]:
    """(Rb [fine energy, channel bin], row sum of M over all channels [fine energy])."""
    matrix = rmf.to_csr()
    k = channel_bins(rmf, grid)
    inside = np.flatnonzero(k >= 0)
    to_bins = sparse.csr_matrix(
        (np.ones(len(inside)), (inside, k[inside])), shape=(rmf.n_channels, grid.n_bins)
    )
    return (matrix @ to_bins).toarray(), np.asarray(matrix.sum(axis=1)).ravel()


def _same_energies(rmf: Rmf, arf: Arf) -> bool:
    """Same energy bins; the lower edge of the first may differ (SAS rmfgen starts it at 0.001 keV where
    arfgen says 0.05 keV: circinus_ulx in ../shared/data/real_pn), far below any grid."""
    return len(arf.energy_lo_kev) == rmf.n_energies and bool(
        np.allclose(arf.energy_lo_kev[1:], rmf.energy_lo_kev[1:], rtol=1e-5)
        and np.allclose(arf.energy_hi_kev, rmf.energy_hi_kev, rtol=1e-5)
    )


def _fine_area(rmf: Rmf, arf: Arf | None, row_total: np.ndarray) -> np.ndarray:
    """Effective area on the RMF's energy bins: ARF x (matrix row sums for a SPECRESP MATRIX)."""
    if arf is None:
        if not rmf.includes_area:
            raise ProductError(rmf.path, "RMF is a pure redistribution matrix: an ARF is needed")
        return row_total
    if not _same_energies(rmf, arf):
        raise ProductError(
            arf.path, f"ARF energy bins ({len(arf.energy_lo_kev)}) differ from those of the RMF "
            f"{rmf.path.name} ({rmf.n_energies})",
        )
    return arf.area_cm2 * row_total if rmf.includes_area else arf.area_cm2


def compress_response(
    rmf: Rmf,
    arf: Arf | None,
    grid: EnergyGrid = DEFAULT_GRID,
    weighting: str = "width",
    model_grid: ModelGrid | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(area per model bin in cm^2 [M], redistribution matrix R [k, j] [B, M]) as defined above.

    The model grid defaults to `grid.extended()`."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    model_grid = grid.extended() if model_grid is None else model_grid
    _check_grids(grid, model_grid)
    width = rmf.energy_hi_kev - rmf.energy_lo_kev
    overlap = overlap_fractions(rmf.energy_lo_kev, rmf.energy_hi_kev, model_grid)
    binned, row_total = binned_redistribution(rmf, grid)
    area_fine = _fine_area(rmf, arf, row_total)
    if rmf.includes_area:
        binned = np.divide(
            binned, row_total[:, None], out=np.zeros_like(binned), where=row_total[:, None] > 0
        )
    weight_fine = width * area_fine if weighting == "area_width" else width
    matrix = _redistribution(binned, overlap, weight_fine)
    return bin_average(area_fine, overlap, width), matrix


def _check_grids(grid: EnergyGrid, model_grid: ModelGrid) -> None:
    if model_grid.channel != grid:
        raise ValueError(f"model grid {model_grid} does not extend the channel grid {grid}")


def _redistribution(binned: np.ndarray, overlap: sparse.csr_matrix, weight_fine: np.ndarray) -> np.ndarray:
    weights = overlap.multiply(weight_fine[:, None]).tocsc()  # [fine, j]
    norm = np.asarray(weights.sum(axis=0)).ravel()
    summed = np.asarray(weights.T @ binned).T  # [k, j]
    return np.divide(summed, norm[None, :], out=np.zeros_like(summed), where=norm[None, :] > 0)


def fold_full(
    rmf: Rmf, arf: Arf | None, exposure_s: float, photon_flux_per_energy_bin: np.ndarray
) -> np.ndarray:
    """Reference fold at full resolution: expected counts per RMF channel.

    `photon_flux_per_energy_bin` is photons/cm^2/s integrated over each RMF energy bin.
    """
    matrix = rmf.to_csr()
    row_total = np.asarray(matrix.sum(axis=1)).ravel()
    area = _fine_area(rmf, arf, row_total)
    if rmf.includes_area:
        matrix = (
            sparse.diags(np.divide(1.0, row_total, out=np.zeros_like(row_total), where=row_total > 0))
            @ matrix
        )
    return np.asarray(matrix.T @ (photon_flux_per_energy_bin * area * exposure_s)).ravel()


def sum_into_bins(counts_per_channel: np.ndarray, channel_bin: np.ndarray, n_bins: int) -> np.ndarray:
    inside = channel_bin >= 0
    return np.bincount(channel_bin[inside], weights=counts_per_channel[inside], minlength=n_bins)


def fold_compressed(
    area_exposure_cm2_s: np.ndarray, matrix: np.ndarray, photon_flux_per_bin: np.ndarray
) -> np.ndarray:
    """Expected counts per channel bin [B]: mu_k = sum_j R[k, j] area_exposure_j phi_j (j: model bins)."""
    return matrix @ (area_exposure_cm2_s * photon_flux_per_bin)


@dataclass(frozen=True)
class CompressedRmf:
    """One RMF collapsed onto the grid, plus what is needed to bin spectra and ARFs that use it."""

    rmf_id: str
    path: Path
    matrix: np.ndarray  # float32 [k, j]: B channel bins x M model bins
    channel: np.ndarray  # channel numbers (EBOUNDS), to index PHA channels
    channel_bin: np.ndarray  # channel-grid bin of each channel, -1 outside
    bin_channels: np.ndarray  # [B] how many channels each channel bin sums (0: fed by none)
    energy_lo_kev: np.ndarray
    energy_hi_kev: np.ndarray
    overlap: sparse.csr_matrix  # [fine energy, model bin]
    area_factor: np.ndarray | None  # SPECRESP MATRIX row sums on the fine energies, else None

    @property
    def n_channels(self) -> int:
        return len(self.channel)


def rmf_identifier(matrix: np.ndarray, grid: EnergyGrid, model_grid: ModelGrid) -> str:
    """Content-keyed: a hash of the compressed float32 matrix and of the two grids, not of any file name."""
    digest = hashlib.sha256(np.ascontiguousarray(matrix, dtype=np.float32).tobytes())
    digest.update(f"{grid.e_min_kev}:{grid.e_max_kev}:{grid.n_bins}".encode())
    digest.update(f"{model_grid.bins_below}:{model_grid.bins_above}".encode())
    return f"rmf-{digest.hexdigest()[:16]}"


def compress_rmf(rmf: Rmf, grid: EnergyGrid, model_grid: ModelGrid | None = None) -> CompressedRmf:
    """The ARF-independent part of the response (width-weighted redistribution), [B channel x M model]."""
    model_grid = grid.extended() if model_grid is None else model_grid
    _check_grids(grid, model_grid)
    width = rmf.energy_hi_kev - rmf.energy_lo_kev
    overlap = overlap_fractions(rmf.energy_lo_kev, rmf.energy_hi_kev, model_grid)
    binned, row_total = binned_redistribution(rmf, grid)
    if rmf.includes_area:
        binned = np.divide(
            binned, row_total[:, None], out=np.zeros_like(binned), where=row_total[:, None] > 0
        )
    matrix = _redistribution(binned, overlap, width).astype(np.float32)
    channel_bin = channel_bins(rmf, grid)
    return CompressedRmf(
        rmf_id=rmf_identifier(matrix, grid, model_grid),
        path=rmf.path,
        matrix=matrix,
        channel=rmf.channel,
        channel_bin=channel_bin,
        bin_channels=channels_per_bin(channel_bin, grid.n_bins),
        energy_lo_kev=rmf.energy_lo_kev,
        energy_hi_kev=rmf.energy_hi_kev,
        overlap=overlap,
        area_factor=row_total if rmf.includes_area else None,
    )


class ResponseCache:
    """Reads and compresses each RMF once per run (keyed by resolved path; ids keyed by content).

    Also caches the averaging operator of each ARF energy grid, so averaging an ARF over the grid costs
    one sparse product per spectrum.
    """

    def __init__(self, grid: EnergyGrid = DEFAULT_GRID) -> None:
        self.grid = grid
        self.model_grid = grid.extended()
        self.centres_kev = grid.centres_kev
        self.widths_kev = grid.widths_kev
        self.rmf_reads = 0
        self._by_path: dict[str, CompressedRmf] = {}
        self._by_id: dict[str, CompressedRmf] = {}
        self._averaging: dict[bytes, sparse.csr_matrix] = {}

    def get(self, rmf_path: str | Path) -> CompressedRmf:
        key = str(Path(rmf_path).resolve())
        entry = self._by_path.get(key)
        if entry is None:
            entry = compress_rmf(read_rmf(rmf_path), self.grid, self.model_grid)
            self.rmf_reads += 1
            self._by_path[key] = entry
            self._by_id.setdefault(entry.rmf_id, entry)
        return entry

    def area_per_bin(self, arf: Arf | None, response: CompressedRmf) -> np.ndarray:
        """ARF (x SPECRESP MATRIX area) averaged over each model bin, cm^2 [M]."""
        if response.area_factor is not None:
            fine = response.area_factor
            if arf is not None:
                if len(arf.energy_lo_kev) != len(fine) or not np.allclose(
                    arf.energy_lo_kev, response.energy_lo_kev
                ):
                    raise ProductError(arf.path, "ARF energy bins differ from the SPECRESP MATRIX's")
                fine = fine * arf.area_cm2
            return bin_average(fine, response.overlap, response.energy_hi_kev - response.energy_lo_kev)
        if arf is None:
            raise ProductError(response.path, "RMF is a pure redistribution matrix: an ARF is needed")
        key = arf.energy_lo_kev.tobytes() + arf.energy_hi_kev.tobytes()
        averaging = self._averaging.get(key)
        if averaging is None:
            averaging = averaging_operator(arf.energy_lo_kev, arf.energy_hi_kev, self.model_grid)
            self._averaging[key] = averaging
        return averaging @ arf.area_cm2

    def responses(self) -> dict[str, np.ndarray]:
        """rmf_id -> float32 matrix [k, j] (B x M) of every RMF seen in this run."""
        return {rmf_id: entry.matrix for rmf_id, entry in self._by_id.items()}
