"""The canonical detection schema and the adapters that map catalogue releases onto it.

Every release (4XMM-DR9..DR14 per-detection tables, 5XMM-DR15 stacked tables, a local FITS file)
is mapped onto one table with the columns of `CANONICAL_COLUMNS`, lower case, these dtypes. Nothing
downstream of this module reads a release's own column names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits

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


# --- 5XMM-DR15: the stacked catalogue -----------------------------------------------------------
# One table holds, per unique source, a summary row (N_OBS > 0, OBS_ID and PPS_SRCNUM null), one row
# per observation in which the source was detected (PPS_SRCNUM set), and upper-limit rows (PPS_SRCNUM
# null) for observations that covered the position without a detection. Only detection rows carry a
# pn spectrum; they map onto the canonical schema. Columns follow the 4XMM naming where the stacked
# catalogue kept it; the position is the combined fit (RA, DEC), so ra/dec and sc_ra/sc_dec coincide.
FIVEXMM_COLUMNS = [
    "srcid", "iauname", "obs_id", "pps_srcnum", "n_obs", "ra", "dec", "mjd_start", "mjd_stop",
    "pn_filter", "pn_submode", "pn_ontime", "pn_8_cts", "pn_8_cts_err", "ep_8_flux",
    "ep_hr1", "ep_hr2", "ep_hr3", "ep_hr4", "ep_hr1_err", "ep_hr2_err", "ep_hr3_err", "ep_hr4_err",
    "ep_extent", "sum_flag",
]
# Source-level values a release may leave null on the observation rows; taken from the summary row.
FIVEXMM_SOURCE_LEVEL = ["iauname", "ra", "dec", "ep_extent", "sum_flag"]

# Synthesised 5XMM detection id: 5 * 10^15 + int(obs_id) * 10^5 + pps_srcnum. Stable across runs and
# releases for the same (observation, pipeline source number), unique within the catalogue (obs ids
# have 10 digits, PPS source numbers stay below 10^5), and the leading 5 keeps it apart from 4XMM
# DETIDs, which start with 1.
FIVEXMM_DETID_BASE = 5 * 10**15

SCHEMA_4XMM = "4xmm"
SCHEMA_5XMM = "5xmm"
SCHEMA_COLUMNS = {SCHEMA_4XMM: FOURXMM_COLUMNS, SCHEMA_5XMM: FIVEXMM_COLUMNS}
# The columns that tell the two apart: a per-detection table has DETID and SRC_NUM, a stacked one
# PPS_SRCNUM and N_OBS.
SCHEMA_MARKERS = {SCHEMA_4XMM: ("detid", "src_num"), SCHEMA_5XMM: ("pps_srcnum", "n_obs")}


def detect_schema(columns: list[str] | pd.Index) -> str:
    """Which release family a table belongs to, from its column names alone (any case).

    Raises UserError naming, for each known family, the columns the table lacks.
    """
    for schema, markers in SCHEMA_MARKERS.items():
        if missing_columns(columns, list(markers)):
            continue
        missing = missing_columns(columns, SCHEMA_COLUMNS[schema])
        if missing:
            raise UserError(f"catalogue looks like {schema.upper()} but lacks columns {', '.join(missing)}")
        return schema
    details = "; ".join(
        f"as {name.upper()} it lacks {', '.join(missing_columns(columns, required))}"
        for name, required in SCHEMA_COLUMNS.items()
    )
    raise UserError(f"catalogue schema not recognised: {details}")


def synthesise_detid(obs_id: pd.Series, pps_srcnum: pd.Series) -> pd.Series:
    """The documented stable detection id for 5XMM rows (see FIVEXMM_DETID_BASE)."""
    srcnum = pps_srcnum.astype("int64")
    if (srcnum < 0).any() or (srcnum >= 10**5).any():
        raise UserError("5XMM PPS_SRCNUM outside 0..99999: cannot synthesise a detection id")
    return FIVEXMM_DETID_BASE + obs_id.astype("int64") * 10**5 + srcnum


def _nullable_number(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series.where(series.notna() & (series.astype(str).str.strip() != ""), np.nan),
                         errors="coerce")


def canonical_from_5xmm(
    table: pd.DataFrame, release: str, n_detections: dict[int, int] | None = None
) -> pd.DataFrame:
    """Map a 5XMM stacked table onto the canonical schema: detection rows only.

    Summary rows (N_OBS > 0) and upper-limit rows (null PPS_SRCNUM) are dropped; source-level values
    missing on detection rows are filled from the source's summary row; `n_detections` (srcid ->
    count) overrides the count of detection rows per srcid, for a table that holds only some of a
    source's observations.
    """
    frame = table.rename(columns={c: str(c).lower() for c in table.columns})
    missing = missing_columns(frame.columns, FIVEXMM_COLUMNS)
    if missing:
        raise UserError(f"catalogue is not a 5XMM stacked table: missing columns {', '.join(missing)}")
    frame = frame[FIVEXMM_COLUMNS].copy()
    n_obs = _nullable_number(frame["n_obs"])
    srcnum = _nullable_number(frame["pps_srcnum"])
    obs_id = frame["obs_id"].astype("string").str.strip().fillna("")
    is_summary = (n_obs.fillna(0) > 0).to_numpy(dtype=bool)
    is_detection = ~is_summary & srcnum.notna().to_numpy(dtype=bool) & (obs_id != "").to_numpy(dtype=bool)

    summary = frame[is_summary].drop_duplicates("srcid").set_index("srcid")
    rows = frame[is_detection].copy()
    for name in FIVEXMM_SOURCE_LEVEL:
        from_summary = rows["srcid"].map(summary[name])
        text = rows[name].astype(str).str.strip()
        blank = rows[name].isna().to_numpy(dtype=bool) | (text == "").to_numpy(dtype=bool)
        rows[name] = rows[name].where(~blank, from_summary)

    rows["obs_id"] = obs_id[is_detection].str.zfill(10)
    rows["src_num"] = srcnum[is_detection].astype("int64")
    rows["detid"] = synthesise_detid(rows["obs_id"], rows["src_num"])
    counts = rows.groupby("srcid")["srcid"].transform("size")
    if n_detections is not None:
        counts = rows["srcid"].map(n_detections).fillna(counts)
    rows["n_detections"] = counts.astype("int64")
    rows["sc_ra"] = rows["ra"]
    rows["sc_dec"] = rows["dec"]
    for name in ("iauname", "pn_filter", "pn_submode"):
        rows[name] = rows[name].astype(str).str.strip()
    rows["release"] = release
    return as_canonical(rows.reset_index(drop=True))


def canonical_from_release(
    table: pd.DataFrame, release: str, n_detections: dict[int, int] | None = None
) -> pd.DataFrame:
    """Map any supported release onto the canonical schema, the adapter chosen from the columns."""
    if detect_schema(table.columns) == SCHEMA_5XMM:
        return canonical_from_5xmm(table, release, n_detections)
    return canonical_from_4xmm(table, release)


def release_from_iauname(iauname: str) -> str:
    """The catalogue generation an IAU name belongs to: '4XMM J192719.5+653354' -> '4XMM'."""
    prefix = str(iauname).strip().split(" ")[0]
    return prefix if prefix else "unknown"


def read_catalogue_fits(path: str | Path, release: str | None = None) -> pd.DataFrame:
    """A local catalogue FITS file (e.g. 4XMM_DR14cat_v1.0.fits.gz) in the canonical schema.

    Reads only the columns the detected adapter needs, so the full 1M-row catalogue stays cheap.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"catalogue file not found: {path}")
    try:
        with fits.open(path, memmap=True) as hdus:
            hdu = next((h for h in hdus[1:] if isinstance(h, fits.BinTableHDU)), None)
            if hdu is None:
                raise UserError(f"{path}: no binary table extension")
            names = list(hdu.columns.names)
            schema = detect_schema(names)
            by_lower = {n.lower(): n for n in names}
            data = {}
            for name in SCHEMA_COLUMNS[schema]:
                column = np.asarray(hdu.data[by_lower[name]])
                if column.dtype.byteorder not in ("=", "|"):
                    column = column.astype(column.dtype.newbyteorder("="))
                if column.dtype.kind == "S":
                    column = np.char.decode(column, "ascii")
                data[name] = column
    except OSError as error:
        raise UserError(f"{path}: cannot read as FITS ({error})") from error
    frame = pd.DataFrame(data)
    label = release or release_from_iauname(frame["iauname"].iloc[0] if len(frame) else "")
    return canonical_from_release(frame, label)
