"""Encode a spectral dataset into latent embeddings, and read/write them as Parquet.

An embeddings table has one row per detection: the identifiers and observation facts carried over
from the dataset's meta (`IDENTITY_COLUMNS`, those present), the latent mean `z0..z{D-1}`, the latent
log-variance `logvar0..logvar{D-1}`, the model's reconstruction deviance per degree of freedom, and the
version hash of the model that produced it (`model_version`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from xmm_pipeline.errors import UserError
from xmm_pipeline.spectra.dataset import SpectralDataset
from xmm_pipeline.storage import write_parquet_atomic

REQUIRED_META = ("detid", "srcid", "mjd")
EMBED_CHUNK = 8192  # spectra encoded per part: bounds the memory of one part, paces the progress
IDENTITY_COLUMNS = (
    "detid", "srcid", "iauname", "obs_id", "src_num", "ra", "dec", "mjd", "pn_filter", "exposure_s",
    "pn_8_cts", "net_counts", "total_counts", "log10_flux", "ep_hr1", "ep_hr2", "ep_hr3", "ep_hr4",
)
_LATENT_NAME = re.compile(r"^z(\d+)$")


class Encoder(Protocol):
    """What embedding needs from a trained model artifact (xmm_pipeline.model.train.ModelArtifact)."""

    version: str

    def encode(self, dataset: SpectralDataset) -> tuple[np.ndarray, np.ndarray]: ...

    def deviance_per_dof(self, dataset: SpectralDataset) -> np.ndarray: ...


def latent_columns(frame: pd.DataFrame) -> list[str]:
    """The latent-mean columns z0..z{D-1} of an embeddings table, in dimension order."""
    names = sorted((int(m.group(1)), c) for c in frame.columns if (m := _LATENT_NAME.match(str(c))))
    if not names or [i for i, _ in names] != list(range(len(names))):
        raise UserError("embeddings table has no contiguous latent columns z0..z{D-1}")
    return [c for _, c in names]


def latent_matrix(frame: pd.DataFrame) -> np.ndarray:
    """Latent means as a C-contiguous float32 array [N, D] (what FAISS wants)."""
    return np.ascontiguousarray(frame[latent_columns(frame)].to_numpy(dtype=np.float32))


def embeddings_frame(
    meta: pd.DataFrame, mu: np.ndarray, logvar: np.ndarray, deviance_per_dof: np.ndarray, model_version: str
) -> pd.DataFrame:
    """Assemble an embeddings table from the meta rows and the model's per-row outputs."""
    missing = [c for c in REQUIRED_META if c not in meta.columns]
    if missing:
        raise UserError(f"dataset meta lacks {', '.join(missing)}: cannot embed")
    n_rows = len(meta)
    mu = np.asarray(mu, dtype=np.float32)
    logvar = np.asarray(logvar, dtype=np.float32)
    deviance = np.asarray(deviance_per_dof, dtype=np.float32).reshape(-1)
    if mu.ndim != 2 or mu.shape != logvar.shape or len(mu) != n_rows or len(deviance) != n_rows:
        raise ValueError(
            f"model outputs do not match the dataset: mu {mu.shape}, logvar {logvar.shape}, "
            f"deviance {deviance.shape}, {n_rows} spectra"
        )
    if not (np.isfinite(mu).all() and np.isfinite(logvar).all()):
        raise ValueError("model produced non-finite latent values")
    frame = meta[[c for c in IDENTITY_COLUMNS if c in meta.columns]].reset_index(drop=True).copy()
    frame["detid"] = frame["detid"].astype("int64")
    frame["srcid"] = frame["srcid"].astype("int64")
    frame["mjd"] = frame["mjd"].astype("float64")
    latent = {f"z{d}": mu[:, d] for d in range(mu.shape[1])}
    latent |= {f"logvar{d}": logvar[:, d] for d in range(mu.shape[1])}
    frame = pd.concat([frame, pd.DataFrame(latent)], axis=1)
    frame["deviance_per_dof"] = deviance
    frame["model_version"] = str(model_version)
    if frame["detid"].duplicated().any():
        dup = frame.loc[frame["detid"].duplicated(), "detid"].iloc[0]
        raise UserError(f"dataset holds detection {dup} more than once")
    return frame


def embed_dataset(
    artifact: Encoder, dataset: SpectralDataset, progress: Callable[[int, int], None] | None = None
) -> pd.DataFrame:
    """Encode every spectrum of `dataset` with `artifact`: one embeddings row per detection.
    `progress(done, total)` is called with the spectra encoded after each part of EMBED_CHUNK."""
    n_rows = len(dataset)
    parts = [dataset] if n_rows <= EMBED_CHUNK else [
        dataset.subset(np.arange(start, min(start + EMBED_CHUNK, n_rows)))
        for start in range(0, n_rows, EMBED_CHUNK)]
    mus, logvars, deviances, done = [], [], [], 0
    for part in parts:
        mu, logvar = artifact.encode(part)
        mus.append(mu)
        logvars.append(logvar)
        deviances.append(np.asarray(artifact.deviance_per_dof(part)).reshape(-1))
        done += len(part)
        if progress is not None:
            progress(done, n_rows)
    return embeddings_frame(dataset.meta, np.concatenate(mus), np.concatenate(logvars),
                            np.concatenate(deviances), artifact.version)


def write_embeddings(frame: pd.DataFrame, path: str | Path) -> Path:
    latent_columns(frame)
    write_parquet_atomic(path, frame)
    return Path(path)


def read_embeddings(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no embeddings; run `xmm-pipeline embed` first")
    frame = pq.read_table(path).to_pandas()
    latent_columns(frame)
    return frame
