"""The canonical detection schema and the adapters that map catalogue releases onto it.

Every release (4XMM-DR9..DR14 per-detection tables, 5XMM-DR15 stacked tables, a local FITS file)
is mapped onto one table with the columns of `CANONICAL_COLUMNS`, lower case, these dtypes. Nothing
downstream of this module reads a release's own column names.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from xmm_pipeline.errors import UserError

# name -> pandas dtype. Units: degrees, MJD (days), seconds, counts, erg/cm^2/s; ep_extent in arcsec.
CANONICAL_COLUMNS: dict[str, str] = {
    "detid": "int64",
    "srcid": "int64",
    "iauname": "string",
    "obs_id": "string",
    "src_num": "int32",
    "ra": "float64",
    "dec": "float64",
    "sc_ra": "float64",
    "sc_dec": "float64",
    "mjd_start": "float64",
    "mjd_stop": "float64",
    "pn_filter": "string",
    "pn_submode": "string",
    "pn_ontime": "float32",
    "pn_8_cts": "float32",
    "pn_8_cts_err": "float32",
    "ep_8_flux": "float32",
    "ep_hr1": "float32",
    "ep_hr2": "float32",
    "ep_hr3": "float32",
    "ep_hr4": "float32",
    "ep_hr1_err": "float32",
    "ep_hr2_err": "float32",
    "ep_hr3_err": "float32",
    "ep_hr4_err": "float32",
    "ep_extent": "float32",
    "sum_flag": "int16",
    "n_detections": "int32",
    "release": "string",
}

# The 4XMM-DR9..DR14 per-detection tables carry every canonical column under the same name (upper
# case in the FITS file, lower case in TAP services) except `release`, which the adapter adds.
FOURXMM_COLUMNS = [name for name in CANONICAL_COLUMNS if name != "release"]


def missing_columns(columns: list[str] | pd.Index, required: list[str]) -> list[str]:
    present = {str(c).lower() for c in columns}
    return [name for name in required if name not in present]


def canonical_from_4xmm(table: pd.DataFrame, release: str) -> pd.DataFrame:
    """Map a 4XMM per-detection table (FITS or TAP column case) onto the canonical schema."""
    frame = table.rename(columns={c: str(c).lower() for c in table.columns})
    missing = missing_columns(frame.columns, FOURXMM_COLUMNS)
    if missing:
        raise UserError(f"catalogue is not a 4XMM per-detection table: missing columns {', '.join(missing)}")
    frame = frame[FOURXMM_COLUMNS].copy()
    for name in ("iauname", "obs_id", "pn_filter", "pn_submode"):
        frame[name] = frame[name].astype(str).str.strip()
    frame["obs_id"] = frame["obs_id"].str.zfill(10)
    frame["release"] = release
    return as_canonical(frame)


def as_canonical(frame: pd.DataFrame) -> pd.DataFrame:
    """Check the canonical columns are present and cast them to the canonical dtypes, in order."""
    missing = missing_columns(frame.columns, list(CANONICAL_COLUMNS))
    if missing:
        raise UserError(f"detection table lacks canonical columns: {', '.join(missing)}")
    out = pd.DataFrame(index=np.arange(len(frame)))
    for name, dtype in CANONICAL_COLUMNS.items():
        out[name] = frame[name].to_numpy()
        out[name] = out[name].astype(dtype)
    return out
