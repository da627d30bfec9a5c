"""Which class each detection belongs to: SIMBAD over TAP (real data) or the simulated truth table.

SIMBAD path. The detections' positions are uploaded as a VOTable (TAP_UPLOAD, in batches of
`batch_rows`) and joined server-side with SIMBAD's `basic` table on a cone of `radius_arcsec` around
each position, so a whole batch costs one request. The ADQL text holds no user-supplied text: only the
radius, a validated finite float; positions travel in the upload after validation (finite, RA in
[0, 360), Dec in [-90, 90]). The nearest SIMBAD object within the radius gives the detection its
SIMBAD main type (`otype`), mapped by `simbad_class` onto AGN / star / XRB / CV / ULX / NS / TDE /
other; a detection with no object within the radius is `unknown`.

Embedded default. The simulated archive's `truth.parquet` gives every detection its true class; it
stands in for the cross-match and is never an input of training.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from xmm_pipeline.errors import UserError

SIMBAD_TAP_URL = "https://simbad.cds.unistra.fr/simbad/sim-tap"
TRUTH_FILE = "truth.parquet"
CLASS_COLUMNS = ["detid", "srcid", "class", "source"]
UNKNOWN = "unknown"
MAX_RADIUS_ARCSEC = 120.0

# SIMBAD object types (short labels of basic.otype and the long names of the 2023 nomenclature),
# candidates ("?" / "_Candidate") folded onto their type. Anything else with a "*" is a star.
_SIMBAD_TYPES = {
    "AGN": ["AGN", "AG?", "SyG", "Sy1", "Sy2", "Sy?", "QSO", "Q?", "Bla", "Bz?", "BLL", "BL?", "LIN", "LI?",
            "rG", "Seyfert", "Seyfert1", "Seyfert2", "Blazar", "BLLac", "LINER", "RadioG"],
    "XRB": ["XB*", "XB?", "LXB", "LX?", "HXB", "HX?", "XrayBin", "LowMassXBin", "HighMassXBin"],
    "CV": ["CV*", "CV?", "No*", "No?", "DN*", "DQ*", "AM*", "NL*", "CataclyV*", "Nova"],
    "ULX": ["ULX", "UX?"],
    "NS": ["N*", "N*?", "Psr", "Mag", "Mag?", "Neutron*", "Pulsar", "Magnetar"],
    "TDE": ["TDE", "TDE?", "TidalDisruptionEvent"],
    "star": ["Y*O", "Y*?", "YSO", "Star"],
}
_OTYPE_TO_CLASS = {otype: name for name, otypes in _SIMBAD_TYPES.items() for otype in otypes}


def simbad_class(otype: str | None) -> str:
    """Map a SIMBAD main object type onto the project's classes."""
    if otype is None:
        return UNKNOWN
    label = str(otype).strip()
    if not label:
        return UNKNOWN
    for candidate in (label, label.removesuffix("_Candidate"), label.rstrip("?") + "?"):
        if candidate in _OTYPE_TO_CLASS:
            return _OTYPE_TO_CLASS[candidate]
    return "star" if "*" in label else "other"


# --- embedded default ---------------------------------------------------------------------------

def classes_from_truth(archive_dir: str | Path) -> pd.DataFrame:
    """Per-detection classes from a simulated archive's truth table (all its columns are kept)."""
    path = Path(archive_dir) / TRUTH_FILE
    if not path.is_file():
        raise UserError(f"{path}: no truth table (only simulated archives have one; use SIMBAD for real "
                        "data)")
    truth = pq.read_table(path).to_pandas()
    missing = [c for c in ("detid", "srcid", "class") if c not in truth.columns]
    if missing:
        raise UserError(f"{path}: truth table lacks {', '.join(missing)}")
    truth["detid"] = truth["detid"].astype("int64")
    truth["srcid"] = truth["srcid"].astype("int64")
    truth["class"] = truth["class"].astype(str)
    truth["source"] = "truth"
    return truth


# --- SIMBAD over TAP ----------------------------------------------------------------------------

def _validated_radius_deg(radius_arcsec: float) -> float:
    radius = float(radius_arcsec)
    if not math.isfinite(radius) or not 0 < radius <= MAX_RADIUS_ARCSEC:
        raise UserError(f"cross-match radius must be in (0, {MAX_RADIUS_ARCSEC}] arcsec, "
                        f"got {radius_arcsec!r}")
    return radius / 3600.0


def simbad_upload_query(radius_arcsec: float, upload_name: str = "xmm") -> str:
    """The ADQL joining an uploaded table (detid, ra, dec) with SIMBAD's basic table on a cone."""
    if not upload_name.isidentifier():
        raise UserError(f"upload table name must be an identifier, got {upload_name!r}")
    radius_deg = _validated_radius_deg(radius_arcsec)
    # Only a checked identifier and a validated float are interpolated.
    return (
        "SELECT u.detid, b.main_id, b.otype, b.ra AS simbad_ra, b.dec AS simbad_dec "  # noqa: S608
        f"FROM TAP_UPLOAD.{upload_name} AS u JOIN basic AS b "
        f"ON 1 = CONTAINS(POINT('ICRS', b.ra, b.dec), CIRCLE('ICRS', u.ra, u.dec, {radius_deg!r}))"
    )


def _validated_positions(positions: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("detid", "ra", "dec") if c not in positions.columns]
    if missing:
        raise UserError(f"positions lack {', '.join(missing)}")
    frame = pd.DataFrame({
        "detid": positions["detid"].astype("int64").to_numpy(),
        "ra": pd.to_numeric(positions["ra"], errors="coerce").to_numpy(np.float64),
        "dec": pd.to_numeric(positions["dec"], errors="coerce").to_numpy(np.float64),
    })
    bad = ~(np.isfinite(frame["ra"]) & np.isfinite(frame["dec"])
            & frame["ra"].between(0, 360, inclusive="left") & frame["dec"].between(-90, 90))
    if bad.any():
        row = frame[bad].iloc[0]
        raise UserError(f"detection {row['detid']}: position ra={row['ra']}, dec={row['dec']} is not valid")
    return frame


def angular_separation_arcsec(
    ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray
) -> np.ndarray:
    """Great-circle separation (haversine), degrees in, arcsec out."""
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(a, dtype=np.float64)) for a in (ra1, dec1, ra2, dec2))
    hav = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(hav, 0, 1)))) * 3600.0


def _run_batch(
    service, query: str, batch: pd.DataFrame, maxrec: int, attempts: int, url: str
) -> pd.DataFrame:
    from astropy.table import Table
    from pyvo.dal import DALFormatError, DALQueryError, DALServiceError

    upload = Table.from_pandas(batch)
    for attempt in range(attempts):
        try:
            result = service.run_sync(query, uploads={"xmm": upload}, maxrec=maxrec)
            break
        except DALQueryError as error:
            raise UserError(f"SIMBAD TAP at {url} rejected the cross-match query: {error}") from error
        except (DALServiceError, DALFormatError) as error:
            if attempt + 1 == attempts:
                raise UserError(f"SIMBAD TAP at {url} failed after {attempts} attempts: {error}") from error
            time.sleep(min(2.0**attempt, 30.0))
    table = result.to_table()
    if str(result.query_status).upper() == "OVERFLOW" or len(table) >= maxrec:
        raise UserError(f"SIMBAD TAP at {url} truncated a batch at {maxrec} rows; lower the radius or "
                        "the batch size")
    frame = table.to_pandas()
    frame.columns = [str(c).lower() for c in frame.columns]
    for name in ("main_id", "otype"):
        if name in frame and frame[name].dtype == object:
            frame[name] = frame[name].map(lambda v: v.decode() if isinstance(v, bytes) else str(v))
    return frame


def classes_from_simbad(
    positions: pd.DataFrame,
    tap_url: str = SIMBAD_TAP_URL,
    radius_arcsec: float = 5.0,
    batch_rows: int = 5000,
    timeout_s: float = 120.0,
    attempts: int = 3,
    maxrec: int | None = None,
) -> pd.DataFrame:
    """Cross-match detections (detid, ra, dec[, srcid]) with SIMBAD: the nearest object in the cone.

    A transient failure (HTTP error, unreadable answer) is retried `attempts` times with exponential
    backoff; a rejected query or a batch that hits `maxrec` rows (default 100 per position) stops the
    run with a UserError rather than returning a silently truncated match.
    Returns one row per detection: detid, srcid, class, source, simbad_main_id, simbad_otype,
    separation_arcsec (NaN and class `unknown` where nothing lies within the radius).
    """
    import pyvo
    import requests

    query = simbad_upload_query(radius_arcsec)
    frame = _validated_positions(positions)
    if batch_rows < 1:
        raise UserError(f"batch_rows must be >= 1, got {batch_rows}")
    session = requests.Session()
    session.request = _with_timeout(session.request, timeout_s)
    service = pyvo.dal.TAPService(tap_url, session=session)
    maxrec = maxrec or max(100 * batch_rows, 10_000)
    matches = []
    for start in range(0, len(frame), batch_rows):
        batch = frame.iloc[start:start + batch_rows]
        if not batch.empty:
            matches.append(_run_batch(service, query, batch, maxrec, attempts, tap_url))
    hits = pd.concat(matches, ignore_index=True) if matches else pd.DataFrame()
    out = frame.copy()
    out["srcid"] = positions["srcid"].astype("int64").to_numpy() if "srcid" in positions else -1
    if hits.empty:
        hits = pd.DataFrame(columns=["detid", "main_id", "otype", "simbad_ra", "simbad_dec"])
    hits["detid"] = hits["detid"].astype("int64")
    hits = hits.merge(frame, on="detid", how="inner")
    hits["separation_arcsec"] = angular_separation_arcsec(hits["ra"], hits["dec"], hits["simbad_ra"],
                                                          hits["simbad_dec"])
    nearest = hits.sort_values(["detid", "separation_arcsec"]).drop_duplicates("detid").set_index("detid")
    out["simbad_main_id"] = out["detid"].map(nearest["main_id"]).fillna("").astype(str)
    out["simbad_otype"] = out["detid"].map(nearest["otype"]).fillna("").astype(str)
    out["separation_arcsec"] = out["detid"].map(nearest["separation_arcsec"]).astype(np.float64)
    out["class"] = [simbad_class(o) for o in out["simbad_otype"]]
    out["source"] = "simbad"
    return out[[*CLASS_COLUMNS, "simbad_main_id", "simbad_otype", "separation_arcsec"]]


def _with_timeout(request, timeout_s: float):
    def request_with_timeout(method, url, **kwargs):
        kwargs.setdefault("timeout", timeout_s)
        return request(method, url, **kwargs)

    return request_with_timeout


def source_classes(
    embeddings: pd.DataFrame,
    archive_dir: str | Path | None = None,
    tap_url: str | None = None,
    radius_arcsec: float = 5.0,
) -> pd.DataFrame:
    """Classes for the embedded detections: the truth table when the archive has one, else SIMBAD
    when `tap_url` is given, else every detection `unknown`."""
    if archive_dir is not None and (Path(archive_dir) / TRUTH_FILE).is_file():
        truth = classes_from_truth(archive_dir)
        table = embeddings[["detid", "srcid"]].merge(truth.drop(columns="srcid"), on="detid", how="left")
        table["class"] = table["class"].fillna(UNKNOWN)
        table["source"] = table["source"].fillna("truth")
        return table
    if tap_url:
        return classes_from_simbad(embeddings, tap_url=tap_url, radius_arcsec=radius_arcsec)
    table = embeddings[["detid", "srcid"]].copy()
    table["class"] = UNKNOWN
    table["source"] = "none"
    return table


def classes_for_archive(
    archive: object,
    detections: pd.DataFrame,
    tap_url: str = SIMBAD_TAP_URL,
    radius_arcsec: float = 5.0,
) -> pd.DataFrame:
    """Classes for an archive's detections (detid, srcid, ra, dec): its truth table when it has one
    (the simulated archive), otherwise SIMBAD over TAP at `tap_url` (the real archive)."""
    root = Path(getattr(archive, "root", archive))
    if (root / TRUTH_FILE).is_file():
        return source_classes(detections, archive_dir=root)
    return classes_from_simbad(detections, tap_url=tap_url, radius_arcsec=radius_arcsec)
