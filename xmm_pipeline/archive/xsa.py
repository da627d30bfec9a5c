"""The real archive: the XSA catalogue over TAP, pn spectral products over AIO, canned RMFs.

`XSAArchive` materialises the same layout as the simulated archive (see archive.base), so ingestion
never knows where its files came from. Everything it is configured with is a plain value (URLs,
numbers, a table name), so it can be built from Dagster config or command-line options alike.

ADQL is composed only from validated values: table and column names matching an identifier
pattern, numbers, and observation ids matching ^\\d{10}$; string literals are quoted with doubled
single quotes. No free text (a target name) ever reaches a query.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import random
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import numpy as np
import pandas as pd
import pyvo
import requests
from astropy.io import fits
from pyvo.dal.exceptions import DALOverflowWarning, DALQueryError, DALServiceError

from xmm_pipeline.archive.base import CATALOGUE_FILE, Archive
from xmm_pipeline.archive.catalogue import (
    CANONICAL_COLUMNS,
    SCHEMA_5XMM,
    SCHEMA_COLUMNS,
    as_canonical,
    canonical_from_release,
    detect_schema,
    read_catalogue_fits,
    release_from_iauname,
)
from xmm_pipeline.archive.download import (
    DownloadError,
    RetryPolicy,
    TransferStats,
    download_to_file,
    safe_extract_tar,
    verify_pn_product,
    verify_rmf,
)
from xmm_pipeline.archive.products import PN_SPECTRAL_PRODUCT
from xmm_pipeline.errors import ProductError, UserError
from xmm_pipeline.storage import QuarantineRecord, sha256_json, write_json_atomic, write_parquet_atomic

DEFAULT_TAP_URL = "https://nxsa.esac.esa.int/tap-server/tap"
DEFAULT_TABLE = "xsa.v_epic_source_cat"
DEFAULT_AIO_URL = "https://nxsa.esac.esa.int/nxsa-sl/servlet/data-action-aio"
DEFAULT_RMF_URL = "https://sasdev-xmm.esac.esa.int/pub/ccf/constituents/extras/responses/PN/"
# The canned matrices v18..v21 are identical; the calibration site serves them with this suffix.
RMF_VERSION_SUFFIX = "_v21.0"

OBS_ID_PATTERN = re.compile(r"^\d{10}$")
IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
RMF_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.+-]+\.rmf$")
PARTIAL_DIR = ".partial"
OBSERVATION_MARKER = ".xsa_complete.json"
# catalogue columns whose change in a release means the observation was re-processed
MARKER_CATALOGUE_COLUMNS = ("obs_id", "src_num", "detid", "pn_8_cts", "pn_ontime", "sum_flag", "ep_extent")
CATALOGUE_STAMP = "catalogue.json"  # the release fingerprint root/catalogue.parquet was fetched for
IN_LIST_CHUNK = 200
PRODUCT_MODES = ("observation", "source")
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


def _validate_url(url: str, what: str) -> str:
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


@dataclass(frozen=True)
class ProductRequest:
    """One AIO request and the observation (and, per-source, the detection) it serves."""

    obs_id: str
    url: str
    detid: int = -1
    kind: str = ""
    src_num: int = -1


class XSAArchive(Archive):
    """The XMM-Newton Science Archive (or any TAP + AIO pair speaking the same protocols).

    root: local folder with the layout of archive.base. tap_url/table: the detection catalogue;
    catalogue_file: a local catalogue FITS file used instead of TAP. column_map: service column ->
    canonical (4XMM) name, for services that rename columns (HEASARC). aio_url/rmf_url: products and
    canned responses. product_mode: 'observation' (one tar per observation: the whole pn PPS set) or
    'source' (one request per product of each detection in root/catalogue.parquet with pn_8_cts >=
    min_pn_counts). fetch_mode: how the catalogue is read ('async' TAP job, 'paged' TOP/OFFSET pages
    of page_size rows, 'sync'). release: the label stored in the catalogue's release column (default:
    the IAU name prefix, e.g. 4XMM).
    """

    def __init__(
        self,
        root: str | Path,
        tap_url: str = DEFAULT_TAP_URL,
        table: str = DEFAULT_TABLE,
        aio_url: str = DEFAULT_AIO_URL,
        rmf_url: str = DEFAULT_RMF_URL,
        timeout_s: float = 60.0,
        max_concurrency: int = 4,
        retries: int = 4,
        catalogue_file: str | Path | None = None,
        backoff_s: float = 1.0,
        page_size: int = 50_000,
        fetch_mode: str = "async",
        product_mode: str = "observation",
        column_map: dict[str, str] | None = None,
        release: str | None = None,
        min_pn_counts: float = 0.0,
    ) -> None:
        super().__init__(root)
        self.tap_url = _validate_url(tap_url, "TAP URL")
        self.table = validate_identifier(table)
        self.aio_url = _validate_url(aio_url, "AIO URL")
        self.rmf_url = _validate_url(rmf_url if rmf_url.endswith("/") else rmf_url + "/", "RMF URL")
        if max_concurrency < 1 or retries < 0 or timeout_s <= 0 or page_size < 1:
            raise UserError("max_concurrency and page_size must be >= 1, retries >= 0, timeout_s > 0")
        if fetch_mode not in FETCH_MODES:
            raise UserError(f"fetch_mode must be one of {', '.join(FETCH_MODES)}, got {fetch_mode!r}")
        if product_mode not in PRODUCT_MODES:
            raise UserError(f"product_mode must be one of {', '.join(PRODUCT_MODES)}, got {product_mode!r}")
        self.max_concurrency = max_concurrency
        self.policy = RetryPolicy(timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
        self.catalogue_file = Path(catalogue_file) if catalogue_file else None
        self.page_size = page_size
        self.fetch_mode = fetch_mode
        self.product_mode = product_mode
        self.column_map = {
            validate_identifier(k, "column").lower(): validate_identifier(v, "column").lower()
            for k, v in (column_map or {}).items()
        }
        self.release = release
        self.min_pn_counts = float(min_pn_counts)
        self.stats = TransferStats()

    # --- TAP -----------------------------------------------------------------------------------

    def _service(self) -> pyvo.dal.TAPService:
        return pyvo.dal.TAPService(self.tap_url, session=_TimeoutSession(self.policy.timeout_s))

    def query(self, adql: str, mode: str = "sync", allow_truncated: bool = False) -> pd.DataFrame:
        """Run one ADQL query (composed by this module from validated values) with retries.

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
                return _votable_frame(result.to_table())
            except DALQueryError as error:
                raise UserError(f"TAP service {self.tap_url} rejected the query: {error}") from error
            except (DALServiceError, requests.RequestException) as error:
                reason = str(error)
                response = getattr(getattr(error, "cause", None), "response", None)
                code = getattr(response, "status_code", None) or getattr(error, "code", None)
                if code is not None and 400 <= int(code) < 500 and int(code) != 429:
                    break
            if attempt < self.policy.retries:
                time.sleep(self.policy.backoff_s * 2**attempt * random.uniform(0.5, 1.5))
        raise UserError(f"TAP service {self.tap_url} failed: {reason}")

    def _to_service(self, name: str) -> str:
        inverse = {v: k for k, v in self.column_map.items()}
        return inverse.get(name, name)

    def service_columns(self) -> list[str]:
        """The table's columns as the service reports them in TAP_SCHEMA (mapped, lower case)."""
        frame = self.query(
            adql_select("column_name", "TAP_SCHEMA.columns", f"table_name = {adql_string(self.table)}")
        )
        if frame.empty:
            raise UserError(f"TAP service {self.tap_url} has no table {self.table!r} in TAP_SCHEMA")
        names = [str(c).strip().lower() for c in frame.iloc[:, 0]]
        return [self.column_map.get(n, n) for n in names]

    def schema(self) -> str:
        return detect_schema(self.service_columns())

    def _select_list(self, schema: str) -> str:
        return ", ".join(validate_identifier(self._to_service(c), "column") for c in SCHEMA_COLUMNS[schema])

    def release_fingerprint(self) -> str:
        """Hash of the table description, column set, row count, latest MJD and IAU name prefix."""
        if self.catalogue_file is not None:
            return self._file_fingerprint()
        table = adql_string(self.table)
        description = self.query(adql_select("description", "TAP_SCHEMA.tables", f"table_name = {table}"))
        columns = sorted(self.service_columns())
        schema = detect_schema(columns)
        n_rows = self.query(adql_select("COUNT(*) AS n_rows", self.table))
        mjd = self._to_service("mjd_stop")
        latest = self.query(adql_select(f"MAX({mjd}) AS latest_mjd", self.table))
        iau = self._to_service("iauname")
        name = self.query(adql_select(iau, self.table, f"{iau} IS NOT NULL", top=1))
        facts = {
            "table": self.table,
            "description": str(description.iloc[0, 0]) if len(description) else "",
            "columns": columns,
            "schema": schema,
            "n_rows": int(n_rows.iloc[0, 0]),
            "latest_mjd": round(float(latest.iloc[0, 0]), 6),
            "iau_prefix": release_from_iauname(name.iloc[0, 0]) if len(name) else "unknown",
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
        lower = {c: str(c).lower() for c in frame.columns}
        return frame.rename(columns={c: self.column_map.get(lo, lo) for c, lo in lower.items()})

    def _release_label(self, frame: pd.DataFrame) -> str:
        if self.release:
            return self.release
        names = frame["iauname"].dropna() if "iauname" in frame else []
        return release_from_iauname(names.iloc[0]) if len(names) else "unknown"

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
            canonical = read_catalogue_fits(self.catalogue_file, self.release)
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
            rows = read_catalogue_fits(self.catalogue_file, self.release)
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
        for chunk in _chunks(obs_ids, IN_LIST_CHUNK):
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
        for chunk in _chunks(srcids, IN_LIST_CHUNK):
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

    # --- products ------------------------------------------------------------------------------

    def _aio(self, **params: str) -> str:
        return f"{self.aio_url}?{urlencode(params)}"

    def _catalogue_index(self) -> pd.DataFrame:
        path = self.root / CATALOGUE_FILE
        if not path.is_file():
            return pd.DataFrame(columns=list(MARKER_CATALOGUE_COLUMNS))
        return pd.read_parquet(path, columns=list(MARKER_CATALOGUE_COLUMNS))

    @staticmethod
    def _rows_hash(obs_id: str, catalogue: pd.DataFrame) -> str:
        """Hash of an observation's catalogue rows: when a release re-processes the observation (new
        counts, flags, exposure), the hash changes and its products are downloaded again."""
        rows = catalogue[catalogue["obs_id"] == obs_id].sort_values("detid")
        return sha256_json(rows.astype(str).to_numpy().tolist())[:16]

    def _requests_for(self, obs_id: str, catalogue: pd.DataFrame) -> list[ProductRequest]:
        base = {"obsno": obs_id, "level": "PPS", "instname": "PN"}
        if self.product_mode == "observation":
            return [ProductRequest(obs_id, self._aio(**base))]
        counts = catalogue["pn_8_cts"].fillna(0)
        rows = catalogue[(catalogue["obs_id"] == obs_id) & (counts > 0) & (counts >= self.min_pn_counts)]
        return [
            ProductRequest(
                obs_id,
                self._aio(**base, name=kind, sourceno=f"{int(row.src_num):03X}", extension="FTZ"),
                int(row.detid), kind, int(row.src_num),
            )
            for row in rows.itertuples()
            for kind in ("SRSPEC", "BGSPEC", "SRCARF")
        ]

    def fetch_observations(
        self, obs_ids: Sequence[str], progress: Callable[[int, int], None] | None = None
    ) -> list[QuarantineRecord]:
        """Download the pn spectral products of these observations and the RMFs they name.

        Already complete observations cost no request; failures come back as quarantine records
        (stage 'download', reason with the URL, path = the URL) and the rest goes on.
        `progress(done, total)` is called with the observations finished, in order.
        """
        wanted = list(dict.fromkeys(validate_obs_id(o) for o in obs_ids))
        self._staging = _claim_staging(self.root / PARTIAL_DIR)
        catalogue = self._catalogue_index()
        detids = {(str(r.obs_id), int(r.src_num)): int(r.detid) for r in catalogue.itertuples()}
        records: list[QuarantineRecord] = []
        respfiles: dict[str, list[str]] = {}
        with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="xsa") as pool:
            results = pool.map(lambda o: self._fetch_observation(o, catalogue, detids), wanted)
            for done, (obs_id, (obs_records, obs_respfiles)) in enumerate(zip(wanted, results), start=1):
                records.extend(obs_records)
                for name in obs_respfiles:
                    respfiles.setdefault(name, []).append(obs_id)
                if progress is not None:
                    progress(done, len(wanted))
            records.extend(self._fetch_responses(respfiles, pool))
        _release_staging(self._staging)
        return records

    def forget_observations(self, obs_ids: Sequence[str]) -> None:
        """Mark observations as not yet complete (e.g. re-processed in a new release): the next
        fetch_observations asks the archive again and replaces their files atomically."""
        for obs_id in obs_ids:
            self._marker(validate_obs_id(obs_id)).unlink(missing_ok=True)

    def _marker(self, obs_id: str) -> Path:
        return self.observation_dir(obs_id) / OBSERVATION_MARKER

    def _complete(self, obs_id: str, rows_hash: str) -> list[str] | None:
        """The RESPFILEs of an observation whose recorded products are all present and were fetched
        for the same catalogue rows, else None."""
        marker = self._marker(obs_id)
        if not marker.is_file():
            return None
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):
            return None
        if record.get("catalogue", rows_hash) != rows_hash:
            return None
        for name, size in record.get("files", {}).items():
            path = self.observation_dir(obs_id) / name
            if not path.is_file() or path.stat().st_size != size:
                return None
        return list(record.get("respfiles", []))

    def _fetch_observation(
        self, obs_id: str, catalogue: pd.DataFrame, detids: dict[tuple[str, int], int]
    ) -> tuple[list[QuarantineRecord], list[str]]:
        rows_hash = self._rows_hash(obs_id, catalogue)
        done = self._complete(obs_id, rows_hash)
        if done is not None:
            return [], done
        reprocessed = self._marker(obs_id).is_file()  # complete once, for other catalogue rows
        records: list[QuarantineRecord] = []
        for request in self._requests_for(obs_id, catalogue):
            present = request.kind and self._present_product(obs_id, request.kind, request.src_num)
            if present and not reprocessed:
                continue
            try:
                self._fetch_products(request, detids, records)
            except DownloadError as error:
                records.append(QuarantineRecord("download", f"{error.reason} ({error.url})", obs_id,
                                                request.detid, error.url))
            except ProductError as error:
                records.append(QuarantineRecord("download", f"{error.problem} ({request.url})", obs_id,
                                                request.detid, request.url))
        products = sorted(p for p in self.observation_dir(obs_id).glob("P*.FTZ")
                          if PN_SPECTRAL_PRODUCT.match(p.name))
        respfiles = sorted({self._respfile(p) for p in products if "SRSPEC" in p.name} - {""})
        if not records:
            write_json_atomic(self._marker(obs_id), {
                "files": {p.name: p.stat().st_size for p in products}, "respfiles": respfiles,
                "catalogue": rows_hash,
            })
        return records, respfiles

    def _present_product(self, obs_id: str, kind: str, src_num: int) -> bool:
        pattern = f"P{obs_id}PN????{kind}?{src_num:03X}.FTZ"
        for path in self.observation_dir(obs_id).glob(pattern):
            try:
                verify_pn_product(path, kind)
                return True
            except ProductError:
                continue
        return False

    @staticmethod
    def _respfile(path: Path) -> str:
        with fits.open(path) as hdus:
            value = str(hdus["SPECTRUM"].header.get("RESPFILE", "")).strip()
        return "" if value.upper() in ("", "NONE") else Path(value).name

    def _fetch_products(
        self, request: ProductRequest, detids: dict[tuple[str, int], int], records: list[QuarantineRecord]
    ) -> None:
        """One AIO request: a tar of products or one product; each verified, then moved into place."""
        staging = self._staging / f"{request.obs_id}-{abs(hash(request.url)):x}"
        staging.mkdir(parents=True, exist_ok=True)
        try:
            body = staging / "response"
            headers = download_to_file(request.url, body, self.policy, self.stats)
            if _is_tar(body):
                def wanted(name: str) -> bool:
                    match = PN_SPECTRAL_PRODUCT.match(Path(name).name)
                    return bool(match) and match["obs_id"] == request.obs_id
                files = safe_extract_tar(body, staging / "tar", select=wanted)
            else:
                files = [body.rename(staging / _single_file_name(request, headers))]
            for path in files:
                match = PN_SPECTRAL_PRODUCT.match(path.name)
                if match is None:
                    raise ProductError(request.url, f"unexpected product name {path.name!r}")
                detid = detids.get((request.obs_id, int(match["src_hex"], 16)), request.detid)
                try:
                    verify_pn_product(path, match["kind"])
                except ProductError as error:
                    reason = f"{path.name}: {error.problem} ({request.url})"
                    records.append(QuarantineRecord("download", reason, request.obs_id, detid, request.url))
                    continue
                final = self.observation_dir(request.obs_id) / path.name
                final.parent.mkdir(parents=True, exist_ok=True)
                path.replace(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _fetch_responses(
        self, respfiles: dict[str, list[str]], pool: ThreadPoolExecutor
    ) -> list[QuarantineRecord]:
        """Each canned RMF once, into root/responses/PN as the calibration site names it (<stem>_v21.0.rmf);
        one already there under that name or the bare RESPFILE name is not fetched again."""
        target_dir = self.responses_dir()
        target_dir.mkdir(parents=True, exist_ok=True)

        def fetch(name: str) -> QuarantineRecord | None:
            url = self.rmf_url + _versioned_rmf_name(name)
            if not RMF_NAME_PATTERN.match(name):
                return QuarantineRecord("download", f"RESPFILE {name!r} is not a plain .rmf file name",
                                        respfiles[name][0], -1, "")
            final = target_dir / _versioned_rmf_name(name)
            if final.is_file() or (target_dir / name).is_file():
                return None
            tmp = self._staging / f"rmf-{name}"
            try:
                download_to_file(url, tmp, self.policy, self.stats)
                verify_rmf(tmp)
                tmp.replace(final)
                return None
            except DownloadError as error:
                reason = error.reason
            except ProductError as error:
                reason = error.problem
            finally:
                tmp.unlink(missing_ok=True)
            users = ", ".join(respfiles[name])
            return QuarantineRecord("download", f"RMF {name}: {reason} ({url}); needed by {users}",
                                    respfiles[name][0], -1, url)

        return [r for r in pool.map(fetch, sorted(respfiles)) if r is not None]


def _claim_staging(partial: Path) -> Path:
    """A staging folder of this process under ROOT/.partial, after clearing those of dead processes
    (a killed run); folders of live processes (another worker on the same root) are left alone."""
    partial.mkdir(parents=True, exist_ok=True)
    for folder in partial.iterdir():
        pid = folder.name.split("-")[0]
        if pid.isdigit() and _process_alive(int(pid)):
            continue
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            folder.unlink(missing_ok=True)
    staging = partial / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def _release_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _versioned_rmf_name(name: str) -> str:
    stem = name[: -len(".rmf")]
    return name if re.search(r"_v\d+\.\d+$", stem) else f"{stem}{RMF_VERSION_SUFFIX}.rmf"


def _single_file_name(request: ProductRequest, headers: dict[str, str]) -> str:
    disposition = headers.get("Content-Disposition", "")
    match = re.search(r'filename="?([^";]+)"?', disposition)
    if match and PN_SPECTRAL_PRODUCT.match(Path(match.group(1)).name):
        return Path(match.group(1)).name
    return f"P{request.obs_id}PNS003{request.kind}0{request.src_num:03X}.FTZ"


def _is_tar(path: Path) -> bool:
    with open(path, "rb") as stream:
        head = stream.read(512)
    if head[:2] == b"\x1f\x8b":
        with gzip.open(path) as inner:
            try:
                head = inner.read(512)
            except (OSError, EOFError):
                return False
    return len(head) >= 262 and head[257:262] == b"ustar"


def _votable_frame(table) -> pd.DataFrame:
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


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
