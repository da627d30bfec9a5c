"""The catalogue side of the real archive: TAP queries composed from validated values, the release
adapter chosen from TAP_SCHEMA, the release fingerprint, catalogue rows, proprietary periods.

`XSACatalogueSide` holds the TAP half of `archive.xsa.XSAArchive` (which sets the attributes it
reads: tap_url, table, policy, column_map, catalogue_file, fetch_mode, page_size, release,
observations_table, root). ADQL is composed only from validated values: table and column names
matching an identifier pattern, numbers, and observation ids matching ^\\d{10}$; string literals are
quoted with doubled single quotes. No free text (a target name) ever reaches a query.
"""

from __future__ import annotations

import json
import random
import re
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pyvo
import requests
from astropy.io import fits
from pyvo.dal.exceptions import DALFormatError, DALOverflowWarning, DALQueryError, DALServiceError

from xmm_pipeline.archive.base import CATALOGUE_FILE
from xmm_pipeline.archive.catalogue import (
    CANONICAL_COLUMNS,
    FAMILY_LABELS,
    SCHEMA_5XMM,
    ReleaseAdapter,
    as_canonical,
    canonical_from_release,
    choose_adapter,
    read_catalogue_fits,
    release_from_iauname,
)
from xmm_pipeline.archive.download import RetryPolicy, ServiceUnreachableError, connection_problem
from xmm_pipeline.errors import UserError
from xmm_pipeline.storage import sha256_json, write_json_atomic, write_parquet_atomic

DEFAULT_TAP_URL = "https://nxsa.esac.esa.int/tap-server/tap"
DEFAULT_TABLE = "xsa.v_epic_source_cat"
# The observations table and its columns (XSA TAP; see astroquery's XMMNewton.get_columns).
DEFAULT_OBSERVATIONS_TABLE = "xsa.v_all_observations"
PROPRIETARY_END_COLUMN = "proprietary_end_date"
OBSERVATION_ID_COLUMN = "observation_id"
OBS_ID_PATTERN = re.compile(r"^\d{10}$")
IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
CATALOGUE_STAMP = "catalogue.json"  # the release fingerprint root/catalogue.parquet was fetched for
IN_LIST_CHUNK = 200
FETCH_MODES = ("async", "paged", "sync")


def validate_obs_id(obs_id: object) -> str:
    text = str(obs_id).strip()
    if not OBS_ID_PATTERN.match(text):
        raise UserError(f"not an XMM-Newton observation id (10 digits): {obs_id!r}")
    return text


def validate_identifier(name: str, what: str = "table") -> str:
    if not IDENTIFIER_PATTERN.match(name):
        raise UserError(f"invalid {what} name for ADQL: {name!r}")
    return name


def adql_string(value: str) -> str:
    """An ADQL string literal; the value has already been validated, the quoting is belt and braces."""
    return "'" + str(value).replace("'", "''") + "'"


def adql_select(
    columns: str,
    table: str,
    where: str = "",
    top: int | None = None,
    order_by: str = "",
    offset: int | None = None,
) -> str:
    """Compose one ADQL SELECT. Every part comes from validated identifiers, numbers or adql_string."""
    top_clause = f"TOP {int(top)} " if top is not None else ""
    query = f"SELECT {top_clause}{columns} FROM {table}"  # noqa: S608 - parts validated by callers
    if where:
        query += f" WHERE {where}"
    if order_by:
        query += f" ORDER BY {order_by}"
    if offset is not None:
        query += f" OFFSET {int(offset)}"
    return query


def parse_column_map(text: str) -> dict[str, str]:
    """'canonical=served,...' (the CLI's --column-map and the Dagster resource's column_map)."""
    mapping: dict[str, str] = {}
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        canonical, sep, served = (x.strip() for x in item.partition("="))
        if not sep or not canonical or not served:
            raise UserError(f"column map entry {item!r} is not canonical=served")
        served = validate_identifier(served, "column").lower()
        mapping[validate_identifier(canonical, "column").lower()] = served
    return mapping


def validate_url(url: str, what: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"{what} must be an http(s) URL, got {url!r}")
    return url


class _TimeoutSession(requests.Session):
    """A requests session whose every request has a timeout (pyvo's sync queries set none)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def request(self, method, url, **kwargs):  # type: ignore[override]
        kwargs.setdefault("timeout", self.timeout_s)
        if kwargs["timeout"] is None:
            kwargs["timeout"] = self.timeout_s
        return super().request(method, url, **kwargs)


class XSACatalogueSide:
    """TAP and catalogue methods of XSAArchive (see the module docstring for the attributes)."""

    root: Path
    tap_url: str
    table: str
    policy: RetryPolicy
    column_map: dict[str, str]
    catalogue_file: Path | None
    fetch_mode: str
    page_size: int
    release: str | None
    observations_table: str
    warnings: list[str]
    _resolution: tuple[ReleaseAdapter, dict[str, str]] | None


    def _service(self) -> pyvo.dal.TAPService:
        return pyvo.dal.TAPService(self.tap_url, session=_TimeoutSession(self.policy.timeout_s))

    def query(self, adql: str, mode: str = "sync", allow_truncated: bool = False) -> pd.DataFrame:
        """Run one ADQL query (composed by this module from validated values) with retries.

        A query the service rejects is a UserError; a service that gives no usable answer (no
        connection, an HTTP error, no VOTable) is ServiceUnreachableError, one line with the URL.

        A result the service cut at its row limit (QUERY_STATUS OVERFLOW) is an error unless
        `allow_truncated` (the paged reader, which keeps asking until a page comes back empty).
        """
        service = self._service()
        reason = ""
        for attempt in range(self.policy.retries + 1):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DALOverflowWarning)
                    if mode == "async":
                        result = service.run_async(adql, timeout=max(self.policy.timeout_s, 600.0))
                    else:
                        result = service.run_sync(adql)
                if str(result.status[0]).upper() == "OVERFLOW" and not allow_truncated:
                    raise UserError(f"TAP service {self.tap_url} truncated the result at its row limit "
                                    f"({len(result)} rows); use fetch_mode='paged'")
                return votable_frame(result.to_table())
            except DALQueryError as error:
                raise UserError(f"TAP service {self.tap_url} rejected the query: {error}") from error
            except (DALServiceError, DALFormatError, requests.RequestException) as error:
                cause = getattr(error, "cause", None) or error
                unreachable = isinstance(cause, requests.ConnectionError | requests.Timeout)
                first_line = (str(error).splitlines() or [""])[0]
                reason = connection_problem(cause) if unreachable else first_line[:300]
                response = getattr(cause, "response", None)
                code = getattr(response, "status_code", None) or getattr(error, "code", None)
                if code is not None and not reason.startswith("HTTP"):
                    reason = f"HTTP {code}: {reason}"
                if code is not None and 400 <= int(code) < 500 and int(code) != 429:
                    break
            if attempt < self.policy.retries:
                time.sleep(self.policy.backoff_s * 2**attempt * random.uniform(0.5, 1.5))
        # not a query the service rejected: no answer, an HTTP error, or no VOTable (a wrong URL)
        raise ServiceUnreachableError(self.tap_url, f"TAP query failed ({reason}) after "
                                               f"{attempt + 1} attempt{'s' if attempt else ''}")

    def service_columns(self) -> list[str]:
        """The table's columns as the service reports them in TAP_SCHEMA (lower case, as served)."""
        frame = self.query(
            adql_select("column_name", "TAP_SCHEMA.columns", f"table_name = {adql_string(self.table)}")
        )
        if frame.empty:
            raise UserError(f"TAP service {self.tap_url} has no table {self.table!r} in TAP_SCHEMA")
        return [str(c).strip().lower() for c in frame.iloc[:, 0]]

    def resolution(self) -> tuple[ReleaseAdapter, dict[str, str]]:
        """The adapter reading the served table and its logical -> served column names (once)."""
        if self._resolution is None:
            try:
                self._resolution = choose_adapter(self.service_columns(), self.column_map)
            except ServiceUnreachableError:
                raise
            except UserError as error:
                raise UserError(f"{self.tap_url} table {self.table}: {error}") from None
        return self._resolution

    def schema(self) -> str:
        return self.resolution()[0].family

    def _to_service(self, name: str) -> str:
        resolved = self.resolution()[1]
        if name not in resolved:
            raise UserError(f"{self.tap_url} table {self.table}: no column for {name!r}")
        return validate_identifier(resolved[name], "column")

    def _select_list(self, schema: str) -> str:
        return ", ".join(validate_identifier(c, "column") for c in self.resolution()[1].values())

    def release_fingerprint(self) -> str:
        """Hash of the table description, column set, row count, latest MJD and IAU name prefix."""
        if self.catalogue_file is not None:
            return self._file_fingerprint()
        table = adql_string(self.table)
        description = self.query(adql_select("description", "TAP_SCHEMA.tables", f"table_name = {table}"))
        columns = sorted(self.service_columns())
        adapter, resolved = self.resolution()
        n_rows = self.query(adql_select("COUNT(*) AS n_rows", self.table))
        # only columns every adapter requires (archive.catalogue.COMMON_REQUIRED) are queried
        obs = self._to_service("obs_id")
        latest = self.query(adql_select(f"MAX({obs}) AS latest_obs_id", self.table))
        prefix = FAMILY_LABELS[adapter.family]
        if "iauname" in resolved:
            iau = self._to_service("iauname")
            name = self.query(adql_select(iau, self.table, f"{iau} IS NOT NULL", top=1))
            prefix = release_from_iauname(name.iloc[0, 0]) if len(name) else prefix
        latest_obs = latest.iloc[0, 0]
        facts = {
            "table": self.table,
            "description": str(description.iloc[0, 0]) if len(description) else "",
            "columns": columns,
            "schema": adapter.family,
            "n_rows": int(n_rows.iloc[0, 0]),
            "latest_obs_id": str(int(latest_obs)) if isinstance(latest_obs, int | float | np.number)
            and not pd.isna(latest_obs) else str(latest_obs),
            "iau_prefix": prefix,
        }
        return f"{facts['iau_prefix']}:{sha256_json(facts)[:32]}"

    def _file_fingerprint(self) -> str:
        path = self.catalogue_file
        if path is None or not path.is_file():
            raise UserError(f"catalogue file not found: {path}")
        with fits.open(path, memmap=True) as hdus:
            hdu = next((h for h in hdus[1:] if isinstance(h, fits.BinTableHDU)), None)
            if hdu is None:
                raise UserError(f"{path}: no binary table extension")
            header = hdu.header
            facts = {
                "file": path.name,
                "size": path.stat().st_size,
                "n_rows": int(header.get("NAXIS2", 0)),
                "columns": sorted(n.lower() for n in hdu.columns.names),
                "date": str(header.get("DATE", "")),
                "creator": str(header.get("CREATOR", "")),
            }
        return f"file:{sha256_json(facts)[:32]}"

    def _read_rows(self, schema: str, where: str = "", order_by: str = "") -> pd.DataFrame:
        columns = self._select_list(schema)
        if self.fetch_mode != "paged":
            return self.query(adql_select(columns, self.table, where), mode=self.fetch_mode)
        pages = []
        offset = 0
        while True:
            page = self.query(adql_select(columns, self.table, where, self.page_size, order_by, offset),
                              allow_truncated=True)
            if page.empty:
                break
            pages.append(page)
            offset += len(page)
        return pd.concat(pages, ignore_index=True) if pages else page

    def _order_key(self, schema: str) -> str:
        keys = ["detid"] if schema != SCHEMA_5XMM else ["srcid", "obs_id", "pps_srcnum"]
        return ", ".join(self._to_service(k) for k in keys)

    def _rename(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Served column names -> logical ones (what the adapters read)."""
        logical = {served.lower(): name for name, served in self.resolution()[1].items()}
        return frame.rename(columns={c: logical.get(str(c).lower(), str(c).lower()) for c in frame.columns})

    def _release_label(self, frame: pd.DataFrame) -> str:
        if self.release:
            return self.release
        names = frame["iauname"].dropna() if "iauname" in frame else []
        if len(names):
            return release_from_iauname(names.iloc[0])
        return FAMILY_LABELS[self.resolution()[0].family]

    def fetch_catalogue(self) -> pd.DataFrame:
        """The whole detection catalogue, canonical schema, written to root/catalogue.parquet.

        Downloaded once per release: a catalogue already written for the current fingerprint (the
        release sensor's fetch, say) is read back instead of pulling the whole table again.
        """
        fingerprint = self.release_fingerprint()
        stamp = self.root / CATALOGUE_STAMP
        cached = self.root / CATALOGUE_FILE
        fetched_for = json.loads(stamp.read_text()).get("fingerprint") if stamp.is_file() else None
        if cached.is_file() and fetched_for == fingerprint:
            return pd.read_parquet(cached)
        if self.catalogue_file is not None:
            canonical = read_catalogue_fits(self.catalogue_file, self.release, self.column_map)
        else:
            schema = self.schema()
            where = ""
            if schema == SCHEMA_5XMM:
                srcnum, n_obs = self._to_service("pps_srcnum"), self._to_service("n_obs")
                where = f"{srcnum} IS NOT NULL OR {n_obs} > 0"
            frame = self._rename(self._read_rows(schema, where, self._order_key(schema)))
            canonical = canonical_from_release(frame, self._release_label(frame))
        write_parquet_atomic(cached, canonical)
        write_json_atomic(stamp, {"fingerprint": fingerprint, "rows": len(canonical)})
        return canonical

    def fetch_catalogue_rows(self, obs_ids: Sequence[str]) -> pd.DataFrame:
        """The catalogue rows of these observations, merged into root/catalogue.parquet."""
        wanted = sorted({validate_obs_id(o) for o in obs_ids})
        if self.catalogue_file is not None:
            rows = read_catalogue_fits(self.catalogue_file, self.release, self.column_map)
            rows = rows[rows["obs_id"].isin(wanted)]
        else:
            rows = self._rows_for_observations(wanted)
        path = self.root / CATALOGUE_FILE
        (self.root / CATALOGUE_STAMP).unlink(missing_ok=True)  # no longer the whole release
        if path.is_file():
            previous = pd.read_parquet(path)
            previous = previous[~previous["detid"].isin(rows["detid"])]
            rows = pd.concat([previous, rows], ignore_index=True)
        rows = as_canonical(rows.sort_values(["obs_id", "src_num"]).reset_index(drop=True))
        write_parquet_atomic(path, rows)
        return rows

    def _rows_for_observations(self, obs_ids: list[str]) -> pd.DataFrame:
        schema = self.schema()
        obs_col = self._to_service("obs_id")
        parts = []
        for chunk in chunks(obs_ids, IN_LIST_CHUNK):
            in_list = ", ".join(adql_string(o) for o in chunk)
            parts.append(self._read_rows(schema, f"{obs_col} IN ({in_list})", self._order_key(schema)))
        frame = self._rename(pd.concat(parts, ignore_index=True))
        n_detections = None
        if schema == SCHEMA_5XMM:
            frame, n_detections = self._with_5xmm_source_rows(frame, schema)
        if frame.empty:
            return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in CANONICAL_COLUMNS.items()})
        return canonical_from_release(frame, self._release_label(frame), n_detections)

    def _with_5xmm_source_rows(self, frame: pd.DataFrame, schema: str) -> tuple[pd.DataFrame, dict[int, int]]:
        """Add the summary rows of the sources seen, and count each source's detections catalogue-wide."""
        srcids = sorted({int(s) for s in pd.to_numeric(frame["srcid"], errors="coerce").dropna()})
        srcid, n_obs, srcnum = (self._to_service(c) for c in ("srcid", "n_obs", "pps_srcnum"))
        summaries, counts = [], []
        for chunk in chunks(srcids, IN_LIST_CHUNK):
            in_list = ", ".join(str(int(s)) for s in chunk)
            summaries.append(self._read_rows(schema, f"{srcid} IN ({in_list}) AND {n_obs} > 0", srcid))
            counts.append(self.query(adql_select(
                srcid, self.table, f"{srcid} IN ({in_list}) AND {srcnum} IS NOT NULL AND {n_obs} IS NULL"
            )))
        if not srcids:
            return frame, {}
        summary = self._rename(pd.concat(summaries, ignore_index=True))
        counted = pd.concat(counts, ignore_index=True).iloc[:, 0].astype("int64").value_counts()
        return pd.concat([frame, summary], ignore_index=True), {int(k): int(v) for k, v in counted.items()}

    def proprietary_until(self, obs_ids: Sequence[str]) -> dict[str, str]:
        """Observations still proprietary by the observations table (proprietary end date in the
        future), obs_id -> that date. Empty where the check is off or the table cannot be read
        (HEASARC has none; a warning in `warnings`): the AIO's 401 still marks proprietary data."""
        if not self.observations_table or not obs_ids:
            return {}
        now = pd.Timestamp.now(tz="UTC")
        found: dict[str, str] = {}
        for chunk in chunks(sorted(obs_ids), IN_LIST_CHUNK):
            in_list = ", ".join(adql_string(o) for o in chunk)
            query = adql_select(f"{OBSERVATION_ID_COLUMN}, {PROPRIETARY_END_COLUMN}", self.observations_table,
                                f"{OBSERVATION_ID_COLUMN} IN ({in_list})")
            try:
                frame = self.query(query)
            except UserError as error:
                self.warnings.append(f"proprietary periods not checked ({self.observations_table}: {error}); "
                                     "proprietary data still answer HTTP 401")
                return {}
            ends = pd.to_datetime(frame[PROPRIETARY_END_COLUMN], utc=True, errors="coerce", format="mixed")
            for obs_id, end in zip(frame[OBSERVATION_ID_COLUMN].astype(str).str.strip().str.zfill(10), ends):
                if not pd.isna(end) and end > now:
                    found[obs_id] = end.strftime("%Y-%m-%d")
        return found


def votable_frame(table) -> pd.DataFrame:
    """A TAP result as a DataFrame: masked values as NaN/None, bytes decoded, names lower case."""
    data = {}
    for name in table.colnames:
        column = table[name]
        values = np.ma.asarray(column)
        mask = np.ma.getmaskarray(values)
        if values.dtype.kind in "SUO":
            decoded = [v.decode() if isinstance(v, bytes) else v for v in values.data]
            series = pd.Series([None if m else v for v, m in zip(decoded, mask)], dtype=object)
        elif values.dtype.kind in "iub" and mask.any():
            series = pd.Series(pd.array(values.data, dtype="Int64")).mask(mask)
        elif values.dtype.kind == "f":
            series = pd.Series(np.where(mask, np.nan, values.data))
        else:
            series = pd.Series(values.data)
        data[name.lower()] = series
    return pd.DataFrame(data)


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
