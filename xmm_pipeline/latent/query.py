"""Queries on an embeddings table: which detections a user's target names, and their nearest neighbours.

Plain functions shared by the command line (`similar`, `trajectory`) and the explorer, so that both
resolve "4XMM J192719.5+653354", a detid or a srcid the same way and answer with the same neighbour
table (k nearest in latent space, the query source's own detections left out on request).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from xmm_pipeline.errors import UserError
from xmm_pipeline.latent.search import LatentIndex

IAU_NAME = re.compile(r"^\s*(\d?XMM)\s*J\s*(\d{6}\.\d[+-]\d{6})\s*$", re.IGNORECASE)
COUNTS_COLUMNS = ("net_counts", "pn_8_cts", "total_counts")


def obs_date(mjd) -> pd.Series:
    """Modified Julian dates as ISO calendar dates (YYYY-MM-DD); missing dates as ''."""
    stamps = pd.Timestamp("1858-11-17") + pd.to_timedelta(pd.Series(mjd, dtype="float64"), unit="D")
    return stamps.dt.strftime("%Y-%m-%d").fillna("")


def counts_column(frame: pd.DataFrame) -> str | None:
    """The counts column an embeddings table carries (net counts first), or None."""
    return next((c for c in COUNTS_COLUMNS if c in frame), None)


def resolve_target(embeddings: pd.DataFrame, target: str) -> pd.DataFrame:
    """Rows of the embeddings table a TARGET names: an IAU name, a detid, or a srcid (in that order)."""
    text = str(target).strip()
    match = IAU_NAME.match(text)
    if match:
        wanted = f"{match[1].upper()} J{match[2]}"
        rows = embeddings[embeddings["iauname"].astype(str).str.strip().str.upper() == wanted.upper()]
        if rows.empty:
            raise UserError(f"no detection of {wanted} in the embeddings")
        return rows
    if not re.fullmatch(r"\d{1,19}", text):
        raise UserError(f"target {text!r} is neither an IAU name (e.g. '4XMM J192719.5+653354'), "
                        "a srcid nor a detid")
    number = int(text)
    rows = embeddings[embeddings["detid"] == number]
    if rows.empty:
        rows = embeddings[embeddings["srcid"] == number]
    if rows.empty:
        raise UserError(f"no detection or source with id {number} in the embeddings")
    return rows


def neighbour_table(
    embeddings: pd.DataFrame,
    classes: pd.DataFrame | None,
    latent_index: LatentIndex,
    query_vectors: np.ndarray,
    query_labels: list[str],
    exclude: list[set[int]],
    k: int,
    detid_index: pd.Index | None = None,
) -> pd.DataFrame:
    """Per query: its k nearest detections, leaving out that query's `exclude` detids, as one table.

    `detid_index` (pd.Index(embeddings["detid"])) may be passed by a caller that asks many times, so
    that finding the hits' rows costs nothing proportional to the table's size."""
    detid_index = pd.Index(embeddings["detid"]) if detid_index is None else detid_index
    class_of = classes.set_index("detid")["class"] if classes is not None else pd.Series(dtype=str)
    widest = max((len(e) for e in exclude), default=0)
    distances, ids = latent_index.search(query_vectors, min(k + widest, latent_index.info.n_vectors))
    counts = counts_column(embeddings)
    parts = []
    for label, row_distances, row_ids, left_out in zip(query_labels, distances, ids, exclude):
        keep = (row_ids >= 0) & ~np.isin(row_ids, list(left_out))
        hit_ids, hit_distances = row_ids[keep][:k], row_distances[keep][:k]
        hits = embeddings.iloc[detid_index.get_indexer(hit_ids)]
        part = pd.DataFrame({
            "query": label,
            "rank": np.arange(1, len(hit_ids) + 1),
            "neighbour": hits["iauname"].to_numpy() if "iauname" in hits else hit_ids,
            "detid": hit_ids,
            "srcid": hits["srcid"].to_numpy(),
            "distance": hit_distances,
            "class": class_of.reindex(hit_ids).fillna("unknown").to_numpy(),
            "obs_date": obs_date(hits["mjd"].to_numpy()).to_numpy(),
        })
        if counts:
            part["counts"] = hits[counts].round().astype("Int64").to_numpy()
        parts.append(part)
    return pd.concat(parts, ignore_index=True)
