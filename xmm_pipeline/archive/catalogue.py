"""The canonical detection schema and the release adapters that map catalogues onto it.

Every release (4XMM-DR9..DR14 per-detection tables, 4XMM-DRns stacked extracts, 5XMM-DR15 stacked
tables, HEASARC's copies of them, a local FITS file) is mapped onto one table with the columns of
`CANONICAL_COLUMNS`, lower case, these dtypes. Nothing downstream of this module reads a release's
own column names.

Each adapter is data (`ReleaseAdapter`): per logical column the names a service may serve it under,
which of them the selection cannot do without, and the marker columns that identify the family. A
table only has to carry the required columns; every other canonical column gets the documented
default of `OPTIONAL_DEFAULTS` (NaN, null, or a value derived from the rows).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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
    "has_spectrum": "boolean",
    "release": "string",
}

# What detection selection cannot do without; a table lacking one of these is refused.
REQUIRED_COLUMNS = ("detid", "srcid", "obs_id", "src_num", "pn_8_cts", "sum_flag")
# Defaults of the optional columns when a table does not carry them (see docs/DATA.md): NaN for
# numbers (unknown: a missing pn_ontime is not "no pn exposure", a missing ep_extent not "extended"),
# null for text and for has_spectrum (unknown whether the pipeline extracted a spectrum);
# n_detections is derived (rows per srcid), release is the adapter's label.
OPTIONAL_DEFAULTS: dict[str, object] = {
    name: (pd.NA if dtype in ("string", "boolean") else np.nan)
    for name, dtype in CANONICAL_COLUMNS.items()
    if name not in REQUIRED_COLUMNS and name not in ("n_detections", "release")
}

# The canonical columns a 4XMM-DR9..DR14 per-detection table carries under the same names (upper
# case in the FITS file, lower case in TAP services); `release` is added by the adapter and the
# SPECTRA flag (has_spectrum) is served under its own name.
FOURXMM_COLUMNS = [name for name in CANONICAL_COLUMNS if name not in ("release", "has_spectrum")]

SCHEMA_4XMM = "4xmm"
SCHEMA_5XMM = "5xmm"
FAMILY_LABELS = {SCHEMA_4XMM: "4XMM", SCHEMA_5XMM: "5XMM"}
# The columns that tell the families apart: a per-detection table has DETID and SRC_NUM, a stacked
# 5XMM one PPS_SRCNUM and N_OBS.
SCHEMA_MARKERS = {SCHEMA_4XMM: ("detid", "src_num"), SCHEMA_5XMM: ("pps_srcnum", "n_obs")}


@dataclass(frozen=True)
class ReleaseAdapter:
    """One way a catalogue may be served: logical column -> served names (first present wins).

    Logical names are the canonical ones, plus a family's own (5XMM: pps_srcnum, n_obs). `required`
    must all be found; the rest are read when present.
    """

    name: str
    family: str
    columns: Mapping[str, tuple[str, ...]]
    required: tuple[str, ...]
    markers: tuple[str, ...] = field(default=())

    def resolve(self, served: Iterable[str], column_map: Mapping[str, str] | None = None) -> dict[str, str]:
        """Logical column -> the served name it is read from, for the columns found (any case).

        `column_map` (logical/canonical -> served name) overrides the adapter's own names.
        """
        by_lower = {str(c).strip().lower(): str(c) for c in served}
        overrides = {k.lower(): v.lower() for k, v in (column_map or {}).items()}
        found: dict[str, str] = {}
        for logical, names in self.columns.items():
            candidates = (overrides[logical],) if logical in overrides else names
            for candidate in candidates:
                if candidate.lower() in by_lower:
                    found[logical] = by_lower[candidate.lower()]
                    break
        return found

    def missing(self, resolved: Mapping[str, str]) -> list[str]:
        return [name for name in dict.fromkeys((*self.markers, *self.required)) if name not in resolved]


def _same_names(names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    return {name: (name,) for name in names}


_4XMM_NAMES = _same_names(FOURXMM_COLUMNS) | {"has_spectrum": ("spectra", "spectra_flag")}
# 5XMM-DR15 (stacked): no detid, src_num, sc_ra/sc_dec or n_detections (synthesised or derived);
# the per-observation source number is PPS_SRCNUM; some columns renamed from 4XMM.
_5XMM_NAMES = {
    name: names for name, names in _4XMM_NAMES.items()
    if name not in ("detid", "src_num", "sc_ra", "sc_dec", "n_detections")
} | {
    "pps_srcnum": ("pps_srcnum",),
    "n_obs": ("n_obs",),
    "mjd_start": ("mjd_start", "mjd_first"),
    "mjd_stop": ("mjd_stop", "mjd_last"),
    "ep_8_flux": ("ep_8_flux", "ep_flux"),
    "ep_extent": ("ep_extent", "extent"),
}
_5XMM_REQUIRED = ("srcid", "obs_id", "pps_srcnum", "n_obs", "pn_8_cts", "sum_flag")

ADAPTER_4XMM = ReleaseAdapter("XSA 4XMM", SCHEMA_4XMM, _4XMM_NAMES, REQUIRED_COLUMNS,
                              SCHEMA_MARKERS[SCHEMA_4XMM])
ADAPTER_5XMM = ReleaseAdapter("XSA 5XMM stacked", SCHEMA_5XMM, _5XMM_NAMES, _5XMM_REQUIRED,
                              SCHEMA_MARKERS[SCHEMA_5XMM])
# HEASARC's copies (xmmssc, xmmstack) serve the observation as `obsid` and the IAU name as `name`.
_HEASARC = {"obs_id": ("obsid", "obs_id"), "iauname": ("name", "iauname")}
ADAPTER_HEASARC_XMMSSC = ReleaseAdapter("HEASARC xmmssc", SCHEMA_4XMM, _4XMM_NAMES | _HEASARC,
                                        REQUIRED_COLUMNS, SCHEMA_MARKERS[SCHEMA_4XMM])
ADAPTER_HEASARC_XMMSTACK = ReleaseAdapter("HEASARC xmmstack", SCHEMA_5XMM, _5XMM_NAMES | _HEASARC,
                                          _5XMM_REQUIRED, SCHEMA_MARKERS[SCHEMA_5XMM])
ADAPTERS = (ADAPTER_4XMM, ADAPTER_5XMM, ADAPTER_HEASARC_XMMSSC, ADAPTER_HEASARC_XMMSTACK)
# Columns every adapter resolves whenever it is chosen: what the release fingerprint may query.
COMMON_REQUIRED = tuple(c for c in REQUIRED_COLUMNS if all(c in a.required for a in ADAPTERS))


def missing_columns(columns: list[str] | pd.Index, required: list[str]) -> list[str]:
    present = {str(c).lower() for c in columns}
    return [name for name in required if name not in present]


def _closest(missing: Iterable[str], adapter: ReleaseAdapter, served: list[str]) -> list[str]:
    lower = [str(c).lower() for c in served]
    hints = []
    for name in dict.fromkeys(missing):
        matches: list[str] = []
        for alias in (name, *adapter.columns.get(name, ())):
            close = difflib.get_close_matches(alias, lower, n=3, cutoff=0.6)
            matches += [m for m in close if m not in matches]
        hints.append(f"{name} ~ {', '.join(matches[:3])}" if matches else f"{name} ~ (none close)")
    return hints


def choose_adapter(
    columns: Iterable[str], column_map: Mapping[str, str] | None = None
) -> tuple[ReleaseAdapter, dict[str, str]]:
    """The adapter that reads a table with these served columns, and its logical -> served names.

    Raises UserError, one line: per family the canonical names it lacks, then the served names
    closest to each (difflib), so a renamed column is one `--column-map canonical=served` away.
    """
    served = [str(c).strip() for c in columns]
    lower = {c.lower() for c in served}
    for canonical, name in (column_map or {}).items():
        if name.lower() not in lower:
            raise UserError(f"column map {canonical}={name}: the table has no column {name!r}")
    ranked = []
    for order, adapter in enumerate(ADAPTERS):
        resolved = adapter.resolve(served, column_map)
        ranked.append((len(adapter.missing(resolved)), -len(resolved), order, adapter, resolved))
    ranked.sort(key=lambda item: item[:3])
    n_missing, _, _, adapter, resolved = ranked[0]
    if n_missing == 0:
        return adapter, resolved
    best: dict[str, tuple[ReleaseAdapter, list[str]]] = {}
    for _, _, _, candidate, found in ranked:
        best.setdefault(candidate.family, (candidate, candidate.missing(found)))
    marked = [f for f, (a, m) in best.items() if not any(x in m for x in a.markers)]
    if marked:
        family = marked[0]
        candidate, missing = best[family]
        hints = "; ".join(_closest(missing, candidate, served))
        raise UserError(f"catalogue looks like {FAMILY_LABELS[family]} but lacks columns "
                        f"{', '.join(missing)} (closest served names: {hints}; "
                        "map them with --column-map canonical=served)")
    details = "; ".join(f"as {FAMILY_LABELS[f]} it lacks {', '.join(m)}" for f, (_, m) in best.items())
    hints = "; ".join(dict.fromkeys(h for a, m in best.values() for h in _closest(m, a, served)))
    raise UserError(f"catalogue schema not recognised: {details}; closest served names: {hints}")


def detect_schema(columns: list[str] | pd.Index, column_map: Mapping[str, str] | None = None) -> str:
    """Which release family a table belongs to, from its column names alone (any case)."""
    return choose_adapter(columns, column_map)[0].family


def _blank(series: pd.Series) -> np.ndarray:
    """Null, NaN or empty text."""
    text = series.astype("string").str.strip()
    return (series.isna() | text.isna() | (text == "")).to_numpy(dtype=bool)


def _nullable_number(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series.where(~_blank(series), np.nan), errors="coerce")


def _logical_frame(table: pd.DataFrame, resolved: Mapping[str, str]) -> pd.DataFrame:
    """The resolved columns of `table` under their logical names."""
    by_lower = {str(c).strip().lower(): c for c in table.columns}
    return pd.DataFrame({name: table[by_lower[col.lower()]].to_numpy() for name, col in resolved.items()})


def as_canonical(frame: pd.DataFrame) -> pd.DataFrame:
    """The canonical schema, in order and dtype: required columns must be there, optional ones
    missing from `frame` get OPTIONAL_DEFAULTS (n_detections: rows per srcid; release: 'unknown')."""
    missing = missing_columns(frame.columns, list(REQUIRED_COLUMNS))
    if missing:
        raise UserError(f"detection table lacks required columns: {', '.join(missing)}")
    out = pd.DataFrame(index=np.arange(len(frame)))
    for name, dtype in CANONICAL_COLUMNS.items():
        if name in frame.columns:
            values = frame[name].to_numpy()
        elif name == "n_detections":
            values = frame.groupby("srcid")["srcid"].transform("size").to_numpy()
        elif name == "release":
            values = np.full(len(frame), "unknown", dtype=object)
        else:
            values = np.full(len(frame), OPTIONAL_DEFAULTS[name], dtype=object)
        if dtype in ("float32", "float64") and values.dtype == object:
            values = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy()
        out[name] = pd.Series(values).astype(dtype).to_numpy() if dtype not in ("string", "boolean") \
            else pd.array(values, dtype=dtype)
    return out


def _finish(rows: pd.DataFrame, release: str) -> pd.DataFrame:
    for name in ("iauname", "pn_filter", "pn_submode"):
        if name in rows:
            rows[name] = rows[name].astype("string").str.strip()
    if "sum_flag" in rows:
        # a detection row without a summary flag is treated as the worst documented value (4)
        rows["sum_flag"] = _nullable_number(rows["sum_flag"]).fillna(4)
    if "n_detections" in rows:
        derived = rows.groupby("srcid")["srcid"].transform("size")
        rows["n_detections"] = _nullable_number(rows["n_detections"]).fillna(derived)
    if "has_spectrum" in rows:
        rows["has_spectrum"] = pd.array(
            [None if (v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v))) else bool(v)
             for v in rows["has_spectrum"]], dtype="boolean")
    rows["release"] = release
    return as_canonical(rows.reset_index(drop=True))


def canonical_from_4xmm(
    table: pd.DataFrame, release: str, column_map: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Map a 4XMM per-detection table (FITS or TAP column case, XSA or HEASARC names) onto the
    canonical schema. Rows without a detection (null DETID, SRC_NUM or OBS_ID: the source summary
    rows of a 4XMM-DRns stacked extract) are dropped."""
    adapter, resolved = choose_adapter(table.columns, column_map)
    if adapter.family != SCHEMA_4XMM:
        raise UserError(f"catalogue is not a 4XMM per-detection table (it reads as {adapter.name})")
    frame = _logical_frame(table, resolved)
    obs_id = frame["obs_id"].astype("string").str.strip()
    detection = ~(_blank(frame["detid"]) | _blank(frame["src_num"]) | _blank(frame["obs_id"]))
    rows = frame[detection].copy()
    rows["obs_id"] = obs_id[detection].str.zfill(10).to_numpy()
    for name in ("detid", "src_num", "srcid"):
        rows[name] = _nullable_number(rows[name]).astype("int64")
    return _finish(rows, release)


# --- 5XMM-DR15: the stacked catalogue -----------------------------------------------------------
# One table holds, per unique source, a summary row (N_OBS > 0, OBS_ID and PPS_SRCNUM null), one row
# per observation in which the source was detected (PPS_SRCNUM set), and upper-limit rows (PPS_SRCNUM
# null) for observations that covered the position without a detection. Only detection rows carry a
# pn spectrum; they map onto the canonical schema. The position is the combined fit (RA, DEC), so
# ra/dec and sc_ra/sc_dec coincide.
FIVEXMM_COLUMNS = list(_5XMM_NAMES)
# Source-level values a release may leave null on the observation rows; taken from the summary row.
FIVEXMM_SOURCE_LEVEL = ["iauname", "ra", "dec", "ep_extent", "sum_flag"]

# Synthesised 5XMM detection id: 5 * 10^15 + int(obs_id) * 10^5 + pps_srcnum. Stable across runs and
# releases for the same (observation, pipeline source number), unique within the catalogue (obs ids
# have 10 digits, PPS source numbers stay below 10^5), and the leading 5 keeps it apart from 4XMM
# DETIDs, which start with 1.
FIVEXMM_DETID_BASE = 5 * 10**15
SCHEMA_COLUMNS = {SCHEMA_4XMM: FOURXMM_COLUMNS, SCHEMA_5XMM: FIVEXMM_COLUMNS}


def synthesise_detid(obs_id: pd.Series, pps_srcnum: pd.Series) -> pd.Series:
    """The documented stable detection id for 5XMM rows (see FIVEXMM_DETID_BASE)."""
    srcnum = pps_srcnum.astype("int64")
    if (srcnum < 0).any() or (srcnum >= 10**5).any():
        raise UserError("5XMM PPS_SRCNUM outside 0..99999: cannot synthesise a detection id")
    return FIVEXMM_DETID_BASE + obs_id.astype("int64") * 10**5 + srcnum


def canonical_from_5xmm(
    table: pd.DataFrame, release: str, n_detections: dict[int, int] | None = None,
    column_map: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Map a 5XMM stacked table (XSA or HEASARC names) onto the canonical schema: detection rows only.

    Summary rows (N_OBS > 0) and upper-limit rows (null PPS_SRCNUM) are dropped; source-level values
    missing on detection rows are filled from the source's summary row; `n_detections` (srcid ->
    count) overrides the count of detection rows per srcid, for a table that holds only some of a
    source's observations.
    """
    adapter, resolved = choose_adapter(table.columns, column_map)
    if adapter.family != SCHEMA_5XMM:
        raise UserError(f"catalogue is not a 5XMM stacked table (it reads as {adapter.name})")
    frame = _logical_frame(table, resolved)
    n_obs = _nullable_number(frame["n_obs"])
    srcnum = _nullable_number(frame["pps_srcnum"])
    obs_id = frame["obs_id"].astype("string").str.strip().fillna("")
    is_summary = (n_obs.fillna(0) > 0).to_numpy(dtype=bool)
    is_detection = ~is_summary & srcnum.notna().to_numpy(dtype=bool) & (obs_id != "").to_numpy(dtype=bool)

    summary = frame[is_summary].drop_duplicates("srcid").set_index("srcid")
    rows = frame[is_detection].copy()
    for name in FIVEXMM_SOURCE_LEVEL:
        if name not in rows:
            continue
        from_summary = rows["srcid"].map(summary[name])
        rows[name] = rows[name].where(~_blank(rows[name]), from_summary)

    rows["obs_id"] = obs_id[is_detection].str.zfill(10)
    rows["src_num"] = srcnum[is_detection].astype("int64")
    rows["detid"] = synthesise_detid(rows["obs_id"], rows["src_num"])
    counts = rows.groupby("srcid")["srcid"].transform("size")
    if n_detections is not None:
        counts = rows["srcid"].map(n_detections).fillna(counts)
    rows["n_detections"] = counts.astype("int64")
    for name, source in (("sc_ra", "ra"), ("sc_dec", "dec")):
        if source in rows:
            rows[name] = rows[source]
    return _finish(rows.drop(columns=["pps_srcnum", "n_obs"]), release)


def canonical_from_release(
    table: pd.DataFrame, release: str, n_detections: dict[int, int] | None = None,
    column_map: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Map any supported release onto the canonical schema, the adapter chosen from the columns."""
    if detect_schema(table.columns, column_map) == SCHEMA_5XMM:
        return canonical_from_5xmm(table, release, n_detections, column_map)
    return canonical_from_4xmm(table, release, column_map)


def release_from_iauname(iauname: str) -> str:
    """The catalogue generation an IAU name belongs to: '4XMM J192719.5+653354' -> '4XMM'."""
    prefix = str(iauname).strip().split(" ")[0]
    return prefix if prefix else "unknown"


def _fits_column(hdu: fits.BinTableHDU, name: str) -> np.ndarray | pd.Series:
    """One column as numpy/pandas values with FITS nulls (TNULL, logical null) as NaN/None."""
    column = hdu.columns[name]
    if column.format.upper().endswith("L"):
        raw = np.asarray(hdu.data.base[name]).view(np.uint8)  # b'T', b'F', 0 (null)
        return pd.array([True if v == 84 else False if v == 70 else None for v in raw], dtype="boolean")
    values = np.asarray(hdu.data[name])
    if values.dtype.byteorder not in ("=", "|"):
        values = values.astype(values.dtype.newbyteorder("="))
    if values.dtype.kind == "S":
        return np.char.strip(np.char.decode(values, "ascii"))
    if values.dtype.kind in "iu" and column.null is not None:
        mask = values == int(column.null)
        if mask.any():
            return pd.Series(pd.array(values, dtype="Int64")).mask(mask)
    return values


def read_catalogue_fits(
    path: str | Path, release: str | None = None, column_map: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """A local catalogue FITS file (e.g. 4XMM_DR14cat_v1.0.fits.gz, or an extract with only the
    required columns) in the canonical schema.

    Reads only the columns the chosen adapter resolves, so the full 1M-row catalogue stays cheap.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"catalogue file not found: {path}")
    try:
        with fits.open(path, memmap=True) as hdus:
            hdu = next((h for h in hdus[1:] if isinstance(h, fits.BinTableHDU)), None)
            if hdu is None:
                raise UserError(f"{path}: no binary table extension")
            try:
                _, resolved = choose_adapter(hdu.columns.names, column_map)
            except UserError as error:
                raise UserError(f"{path}: {error}") from None
            frame = pd.DataFrame({served: _fits_column(hdu, served) for served in resolved.values()})
    except OSError as error:
        raise UserError(f"{path}: cannot read as FITS ({error})") from error
    if release is None:
        by_lower = {c.lower(): c for c in frame.columns}
        iau = resolved.get("iauname")
        names = frame[by_lower[iau.lower()]] if iau else pd.Series([], dtype=object)
        names = names[~_blank(names)] if len(names) else names
        family = detect_schema(frame.columns, column_map)
        release = release_from_iauname(names.iloc[0]) if len(names) else FAMILY_LABELS[family]
    return canonical_from_release(frame, release, column_map=column_map)
