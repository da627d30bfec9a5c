"""A small physical SpectralDataset for the model's unit tests, independent of the simulator.

Four classes on the grid (absorbed power law AGN, a two-temperature line-rich star, a disc-like XRB,
a very soft TDE), an effective area with the pn's shape, Gaussian redistribution with the pn's
FWHM(E) (two matrices of slightly different resolution), a flat background, Poisson counts, and the
unfolded spectrum defined as spectra.preprocess defines it: E^2 x max(net counts, 0) / (folded area x
exposure x bin width), normalised to unit mean.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from xmm_pipeline.spectra.dataset import RESPONSES_FILE, SPECTRA_SUBDIR, SpectralDataset
from xmm_pipeline.spectra.grid import EnergyGrid

CLASSES = ("AGN", "star", "XRB", "TDE")
AREA_KEV = np.array([0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 2.2, 2.5, 3.0, 5.0, 6.0, 8.0, 10.0, 12.0])
AREA_CM2 = np.array([461, 277, 738, 932, 958, 1177, 1278, 1383, 1356, 1270, 887, 912, 936, 875, 550, 272, 41])


def absorption(energy_kev: np.ndarray, nh_cm2: float) -> np.ndarray:
    return np.exp(-nh_cm2 * 2.4e-22 * energy_kev ** (-8.0 / 3.0))


def photon_flux_density(kind: str, energy_kev: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photon flux density shape (photons / cm^2 / s / keV, arbitrary scale) of one source class."""
    e = energy_kev
    if kind == "AGN":
        shape = e ** -rng.normal(1.9, 0.3) * absorption(e, 10 ** rng.uniform(20, 22.5))
        shape += 0.02 * np.exp(-0.5 * ((e - 6.4) / 0.05) ** 2)
    elif kind == "star":
        kt1, kt2 = rng.uniform(0.2, 0.4), rng.uniform(0.7, 1.1)
        shape = np.exp(-e / kt1) / e + 0.3 * np.exp(-e / kt2) / e
        lines = ((0.57, 2.0), (0.65, 3.0), (0.83, 4.0), (1.02, 2.0), (1.35, 1.0), (1.86, 0.5))
        for line_kev, strength in lines:
            shape += strength * np.exp(-e / kt2) * np.exp(-0.5 * ((e - line_kev) / 0.01) ** 2)
        shape *= absorption(e, 10 ** rng.uniform(19.5, 20.5))
    elif kind == "XRB":
        kt = rng.uniform(0.7, 1.5)
        shape = e**2 / np.expm1(e / kt) + 0.1 * e ** -rng.uniform(1.4, 2.1)
        shape *= absorption(e, 10 ** rng.uniform(21.5, 22.5))
    elif kind == "TDE":
        kt = rng.uniform(0.05, 0.1)
        shape = e**2 / np.expm1(np.minimum(e / kt, 300.0)) * absorption(e, 10 ** rng.uniform(20, 20.7))
    else:
        raise ValueError(kind)
    return shape / shape.max()


def gaussian_rmf(grid: EnergyGrid, fwhm_scale: float) -> np.ndarray:
    """R[k, j]: Gaussian of FWHM(E) = fwhm_scale * 0.1 keV * (E / 0.75 keV)^0.45 around model bin j."""
    edges, centres = grid.edges_kev, grid.centres_kev
    sigma = fwhm_scale * 0.1 * (centres / 0.75) ** 0.45 / 2.3548
    from scipy.special import ndtr

    upper = ndtr((edges[1:, None] - centres[None, :]) / sigma[None, :])
    lower = ndtr((edges[:-1, None] - centres[None, :]) / sigma[None, :])
    return (upper - lower).astype(np.float32)


def make_synthetic_dataset(n_spectra: int = 200, seed: int = 0, grid: EnergyGrid | None = None,
                           n_sources: int | None = None) -> SpectralDataset:
    grid = grid or EnergyGrid()
    rng = np.random.default_rng(seed)
    centres, widths = grid.centres_kev, grid.widths_kev
    rmfs = np.stack([gaussian_rmf(grid, 1.0), gaussian_rmf(grid, 1.2)])
    area_cm2 = np.interp(centres, AREA_KEV, AREA_CM2)
    n_sources = n_sources or max(1, int(0.8 * n_spectra))
    source_of = np.concatenate([np.arange(n_sources), rng.integers(0, n_sources, n_spectra - n_sources)])
    source_class = rng.choice(len(CLASSES), size=n_sources, p=[0.45, 0.35, 0.12, 0.08])
    counts, background, area_exposure, unfolded, rmf_index, rows = [], [], [], [], [], []
    for i, source in enumerate(source_of):
        kind = CLASSES[source_class[source]]
        exposure_s = rng.uniform(5e3, 5e4)
        filter_cut = absorption(centres, rng.choice([0.0, 3e20, 1e21]))
        ae = (area_cm2 * filter_cut * rng.uniform(0.5, 1.0) * exposure_s).astype(np.float32)
        r = int(rng.integers(0, len(rmfs)))
        folded = rmfs[r] @ (photon_flux_density(kind, centres, rng) * widths * ae)
        total = 10 ** rng.uniform(np.log10(300), np.log10(5000))
        source_counts = folded * total / folded.sum()
        bkg = np.full(grid.n_bins, rng.uniform(0.01, 0.3), dtype=np.float32)
        n = rng.poisson(source_counts + bkg).astype(np.float32)
        flux = np.clip(n - bkg, 0.0, None) / (rmfs[r] @ ae * widths)
        nu_f_nu = centres**2 * flux
        counts.append(n), background.append(bkg), area_exposure.append(ae), rmf_index.append(r)
        unfolded.append((nu_f_nu / nu_f_nu.mean()).astype(np.float32))
        rows.append({"detid": 10_000 + i, "srcid": 5_000 + int(source), "obs_id": f"{i:010d}", "src_num": 1,
                     "iauname": f"4XMM J{i:06d}.0+000000", "mjd": 51_000.0 + i, "class": kind})
    return SpectralDataset(
        grid=grid,
        counts=np.stack(counts),
        background=np.stack(background),
        area_exposure=np.stack(area_exposure),
        rmf_index=np.asarray(rmf_index, dtype=np.int64),
        rmf_matrices=rmfs,
        rmf_ids=["gauss_1.0", "gauss_1.2"],
        unfolded=np.stack(unfolded),
        meta=pd.DataFrame(rows),
    )


def write_spectra_dir(dataset: SpectralDataset, out_dir: Path) -> Path:
    """Write the dataset in the on-disk layout spectra.dataset.load_dataset reads (one file per obs_id)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out_dir / SPECTRA_SUBDIR).mkdir(parents=True, exist_ok=True)
    n_bins = dataset.grid.n_bins
    responses = pa.table({
        "rmf_id": dataset.rmf_ids,
        "e_min_kev": [dataset.grid.e_min_kev] * len(dataset.rmf_ids),
        "e_max_kev": [dataset.grid.e_max_kev] * len(dataset.rmf_ids),
        "n_bins": [n_bins] * len(dataset.rmf_ids),
        "matrix": pa.FixedSizeListArray.from_arrays(pa.array(dataset.rmf_matrices.ravel()), n_bins * n_bins),
    })
    pq.write_table(responses, out_dir / RESPONSES_FILE)
    meta = dataset.meta.assign(rmf_id=[dataset.rmf_ids[r] for r in dataset.rmf_index])
    columns = {"counts": dataset.counts.astype(np.int32), "background": dataset.background,
               "area_exposure_cm2_s": dataset.area_exposure, "unfolded": dataset.unfolded}
    for obs_id, rows in meta.groupby("obs_id").indices.items():
        table = pa.Table.from_pandas(meta.iloc[rows], preserve_index=False)
        for name, values in columns.items():
            column = pa.FixedSizeListArray.from_arrays(pa.array(values[rows].ravel()), n_bins)
            table = table.append_column(name, column)
        pq.write_table(table, out_dir / SPECTRA_SUBDIR / f"{obs_id}.parquet")
    return out_dir
