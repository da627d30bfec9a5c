"""The explorer's current selection (a lasso or a neighbour list) as a file: CSV, FITS or VOTable.

One row per selected detection: its catalogue columns from the embeddings table (identifiers,
position, date, counts, hardness ratios, latent means, deviance/dof), its class, outlier score and
rank, cluster and map position; the model version goes in the table's metadata (MODELVER). FITS
and VOTable are written by astropy with units on the columns (deg, d, s), so TOPCAT and Aladin
read positions and dates as they are.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from astropy.table import Table

from xmm_pipeline.errors import UserError
from xmm_pipeline.explore.data import ExplorerData
from xmm_pipeline.latent.query import obs_date

FORMATS = {"csv": ("text/csv", "csv"), "fits": ("application/fits", "fits"),
           "votable": ("application/x-votable+xml", "vot")}
UNITS = {"ra": "deg", "dec": "deg", "mjd": "d", "exposure_s": "s"}
MAX_ROWS = 2_000_000


def selection_frame(data: ExplorerData, rows: list[int] | np.ndarray) -> pd.DataFrame:
    """The selected detections (by map row, duplicates dropped, order kept) as one table."""
    rows = pd.unique(np.asarray(rows, dtype=np.int64))
    if len(rows) == 0:
        raise UserError("the selection is empty: draw a lasso on the map or pick a detection first")
    if len(rows) > MAX_ROWS or rows.min() < 0 or rows.max() >= len(data.detids):
        raise UserError(f"selection rows must lie in 0..{len(data.detids) - 1}")
    keep = [c for c in data.embeddings.columns if not c.startswith("logvar") and c != "model_version"]
    frame = data.embeddings.iloc[rows][keep].reset_index(drop=True)
    frame.insert(frame.columns.get_loc("mjd") + 1, "obs_date", obs_date(frame["mjd"].to_numpy()).to_numpy())
    frame["class"] = data.class_name[rows]
    frame["outlier_score"] = data.outlier_score[rows]
    frame["outlier_rank"] = data.outlier_rank[rows]
    frame["cluster"] = data.cluster[rows]
    frame["map_x"] = data.xy[rows, 0].astype(np.float64)
    frame["map_y"] = data.xy[rows, 1].astype(np.float64)
    frame.attrs["model_version"] = data.model_version
    return frame


def write_selection(frame: pd.DataFrame, fmt: str) -> bytes:
    """The selection table as the bytes of a CSV, FITS (binary table) or VOTable file."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return frame.to_csv(index=False).encode()
    table = Table.from_pandas(frame.astype({c: str for c in frame.columns if frame[c].dtype == object}))
    for name, unit in UNITS.items():
        if name in table.colnames:
            table[name].unit = unit
    table.meta["ORIGIN"] = "xmm-pipeline explore"
    if frame.attrs.get("model_version"):
        table.meta["MODELVER"] = str(frame.attrs["model_version"])
    buffer = io.BytesIO()
    table.write(buffer, format="fits" if fmt == "fits" else "votable")
    return buffer.getvalue()
