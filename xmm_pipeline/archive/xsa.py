"""The real archive: the XSA catalogue over TAP, pn spectral products over AIO, canned RMFs.

`XSAArchive` materialises the same layout as the simulated archive (see archive.base), so ingestion
never knows where its files came from. Everything it is configured with is a plain value (URLs,
numbers, a table name), so it can be built from Dagster config or command-line options alike.

The catalogue side (TAP, release adapters, fingerprint, proprietary periods) is in archive.xsa_tap;
this module adds the products: AIO requests, verification, canned matrices, resumption.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pandas as pd
import pyarrow.parquet as pq
from astropy.io import fits

from xmm_pipeline.archive.base import CATALOGUE_FILE, Archive
from xmm_pipeline.archive.catalogue import ReleaseAdapter
from xmm_pipeline.archive.download import (
    DownloadError,
    RetryPolicy,
    ServiceUnreachableError,
    TransferStats,
    download_to_file,
    safe_extract_tar,
    verify_pn_product,
    verify_rmf,
)
from xmm_pipeline.archive.products import PN_SPECTRAL_PRODUCT
from xmm_pipeline.archive.xsa_tap import (  # noqa: F401 - adql_*, parse_column_map: this module's API too
    DEFAULT_OBSERVATIONS_TABLE,
    DEFAULT_TABLE,
    DEFAULT_TAP_URL,
    FETCH_MODES,
    XSACatalogueSide,
    adql_select,
    adql_string,
    parse_column_map,
    validate_identifier,
    validate_obs_id,
    validate_url,
)
from xmm_pipeline.errors import ProductError, UserError
from xmm_pipeline.storage import QuarantineRecord, sha256_json, write_json_atomic

DEFAULT_AIO_URL = "https://nxsa.esac.esa.int/nxsa-sl/servlet/data-action-aio"
DEFAULT_RMF_URL = "https://sasdev-xmm.esac.esa.int/pub/ccf/constituents/extras/responses/PN/"
# Like the archive's own client (astroquery.esa.xmm_newton since March 2026), the suffix of the
# canned pn matrices is read once per run from Version.txt beside them ('_v22.0' -> <stem>_v22.0.rmf).
RMF_VERSION_FILE = "Version.txt"
RMF_VERSION_PATTERN = re.compile(r"^_v\d+(\.\d+)*$")
# An AIO answer of at most this many bytes of plain text is the servlet saying there is nothing.
NO_PRODUCT_MAX_BYTES = 4096
RMF_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.+-]+\.rmf$")
PARTIAL_DIR = ".partial"
OBSERVATION_MARKER = ".xsa_complete.json"
# catalogue columns whose change in a release means the observation was re-processed
MARKER_CATALOGUE_COLUMNS = ("obs_id", "src_num", "detid", "pn_8_cts", "pn_ontime", "sum_flag", "ep_extent")
# Why an observation was not downloaded (counted in XSAArchive.skipped, not quarantined).
SKIP_PROPRIETARY = "proprietary"
SKIP_NO_SPECTRA = "no_spectra_in_catalogue"
SKIP_NO_PRODUCT = "no_product"
PRODUCT_MODES = ("observation", "source")
_SKIP_LOCK = threading.Lock()


def validate_rmf_version(version: str, where: str = "rmf_version") -> str:
    """A canned-matrix version suffix such as '_v22.0' (what Version.txt holds)."""
    text = str(version).strip()
    if not RMF_VERSION_PATTERN.match(text):
        raise UserError(f"{where}: {text[:40]!r} is not a canned-matrix version suffix like '_v22.0'")
    return text


class NoProductError(Exception):
    """The AIO servlet answered 200 with a short text saying there is nothing (not a product)."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(text)


@dataclass(frozen=True)
class ProductRequest:
    """One AIO request and the observation (and, per-source, the detection) it serves."""

    obs_id: str
    url: str
    detid: int = -1
    kind: str = ""
    src_num: int = -1


class XSAArchive(XSACatalogueSide, Archive):
    """The XMM-Newton Science Archive (or any TAP + AIO pair speaking the same protocols).

    root: local folder with the layout of archive.base. tap_url/table: the detection catalogue;
    catalogue_file: a local catalogue FITS file used instead of TAP. column_map: canonical name ->
    served column, for a table the release adapters (archive.catalogue.ADAPTERS) do not read as it
    is. aio_url/rmf_url: products and canned responses; rmf_version: the matrices' version suffix
    ('_v22.0'; default: read from rmf_url's Version.txt once per run). product_mode: 'observation'
    (one tar per observation: the whole pn PPS set) or 'source' (one request per product of each
    detection in root/catalogue.parquet with pn_8_cts >= min_pn_counts). Only detections whose
    catalogue spectrum flag is not false are asked for, and observations still proprietary by
    observations_table (empty: no check) are skipped; `skipped` counts them by reason. fetch_mode:
    how the catalogue is read ('async' TAP job, 'paged' TOP/OFFSET pages of page_size rows, 'sync').
    release: the label stored in the catalogue's release column (default: the IAU name prefix).
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
        column_map: Mapping[str, str] | None = None,
        release: str | None = None,
        min_pn_counts: float = 0.0,
        rmf_version: str | None = None,
        observations_table: str = DEFAULT_OBSERVATIONS_TABLE,
    ) -> None:
        super().__init__(root)
        self.tap_url = validate_url(tap_url, "TAP URL")
        self.table = validate_identifier(table)
        self.aio_url = validate_url(aio_url, "AIO URL")
        self.rmf_url = validate_url(rmf_url if rmf_url.endswith("/") else rmf_url + "/", "RMF URL")
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
        self.rmf_version = validate_rmf_version(rmf_version) if rmf_version else None
        self.observations_table = validate_identifier(observations_table) if observations_table else ""
        self.stats = TransferStats()
        self.skipped: dict[str, list[str]] = {}
        self.warnings: list[str] = []
        self._resolution: tuple[ReleaseAdapter, dict[str, str]] | None = None

    # --- products ------------------------------------------------------------------------------

    def _aio(self, **params: str) -> str:
        return f"{self.aio_url}?{urlencode(params)}"

    def _catalogue_index(self) -> pd.DataFrame:
        """The marker columns and the spectrum flag of root/catalogue.parquet (a catalogue written
        before the flag existed has it unknown)."""
        path = self.root / CATALOGUE_FILE
        wanted = [*MARKER_CATALOGUE_COLUMNS, "has_spectrum"]
        if not path.is_file():
            return pd.DataFrame(columns=wanted)
        available = set(pq.read_schema(path).names)
        frame = pd.read_parquet(path, columns=[c for c in wanted if c in available])
        if "has_spectrum" not in frame:
            frame["has_spectrum"] = pd.array([pd.NA] * len(frame), dtype="boolean")
        return frame

    @staticmethod
    def _rows_hash(obs_id: str, catalogue: pd.DataFrame) -> str:
        """Hash of an observation's catalogue rows: when a release re-processes the observation (new
        counts, flags, exposure), the hash changes and its products are downloaded again."""
        rows = catalogue.loc[catalogue["obs_id"] == obs_id, list(MARKER_CATALOGUE_COLUMNS)]
        rows = rows.sort_values("detid")
        return sha256_json(rows.astype(str).to_numpy().tolist())[:16]

    @staticmethod
    def _without_spectra(obs_id: str, catalogue: pd.DataFrame) -> bool:
        """The catalogue lists the observation and says none of its detections has a spectrum."""
        flags = catalogue.loc[catalogue["obs_id"] == obs_id, "has_spectrum"]
        return bool(len(flags)) and bool((flags.astype("boolean") == False).fillna(False).all())  # noqa: E712

    def _requests_for(self, obs_id: str, catalogue: pd.DataFrame) -> list[ProductRequest]:
        base = {"obsno": obs_id, "level": "PPS", "instname": "PN"}
        if self.product_mode == "observation":
            return [ProductRequest(obs_id, self._aio(**base))]
        counts = catalogue["pn_8_cts"].fillna(0)
        flagged_without = (catalogue["has_spectrum"].astype("boolean") == False).fillna(False)  # noqa: E712
        rows = catalogue[(catalogue["obs_id"] == obs_id) & (counts > 0) & (counts >= self.min_pn_counts)
                         & ~flagged_without.to_numpy(dtype=bool)]
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
        catalogue = self._catalogue_index()
        self.skipped, self.warnings = {}, []
        without = [o for o in wanted if self._without_spectra(o, catalogue)]
        proprietary = self.proprietary_until([o for o in wanted if o not in without])
        for reason, skipped in ((SKIP_NO_SPECTRA, without), (SKIP_PROPRIETARY, sorted(proprietary))):
            if skipped:
                self.skipped[reason] = list(skipped)
        wanted = [o for o in wanted if o not in without and o not in proprietary]
        self._staging = _claim_staging(self.root / PARTIAL_DIR)
        detids = {(str(r.obs_id), int(r.src_num)): int(r.detid) for r in catalogue.itertuples()}
        records: list[QuarantineRecord] = []
        respfiles: dict[str, list[str]] = {}
        answered = self.stats.responses
        try:
            with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="xsa") as pool:
                results = pool.map(lambda o: self._fetch_observation(o, catalogue, detids), wanted)
                for done, (obs_id, (obs_records, obs_respfiles)) in enumerate(zip(wanted, results), start=1):
                    records.extend(obs_records)
                    for name in obs_respfiles:
                        respfiles.setdefault(name, []).append(obs_id)
                    if progress is not None:
                        progress(done, len(wanted))
                unreachable = [r for r in records if "connection failed" in r.reason
                               or "timed out" in r.reason]
                if records and len(unreachable) == len(records) and self.stats.responses == answered:
                    raise ServiceUnreachableError(self.aio_url, unreachable[0].reason.split(" (http")[0])
                records.extend(self._fetch_responses(respfiles, pool))
        finally:
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
        answers: list[str] = []
        for request in self._requests_for(obs_id, catalogue):
            present = request.kind and self._present_product(obs_id, request.kind, request.src_num)
            if present and not reprocessed:
                continue
            try:
                self._fetch_products(request, detids, records)
            except NoProductError as nothing:
                answers.append(nothing.text)
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
            marker = {"files": {p.name: p.stat().st_size for p in products}, "respfiles": respfiles,
                      "catalogue": rows_hash}
            if answers and not products:
                marker["no_product"] = answers[0]
                self._count_skip(SKIP_NO_PRODUCT, obs_id)
            write_json_atomic(self._marker(obs_id), marker)
        return records, respfiles

    def _count_skip(self, reason: str, obs_id: str) -> None:
        with _SKIP_LOCK:
            self.skipped.setdefault(reason, []).append(obs_id)

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
            nothing = _no_product_text(body)
            if nothing is not None:
                raise NoProductError(nothing)
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
        """Each canned RMF once, into root/responses/PN under the name the calibration site serves it
        by (<stem><version>.rmf, the version read once from Version.txt unless rmf_version is set).
        One already there under the bare RESPFILE name, or under any version (an explicit
        rmf_version: under that one), is not fetched again, and Version.txt is then not read."""
        target_dir = self.responses_dir()
        target_dir.mkdir(parents=True, exist_ok=True)
        version: list[str] = []
        version_problem: list[str] = []
        version_lock = threading.Lock()

        def served_version() -> str | None:
            with version_lock:
                if not version and not version_problem:
                    try:
                        version.append(self.served_rmf_version())
                    except (DownloadError, UserError) as error:
                        version_problem.append(getattr(error, "reason", None) or str(error))
            return version[0] if version else None

        def fetch(name: str) -> QuarantineRecord | None:
            if not RMF_NAME_PATTERN.match(name):
                return QuarantineRecord("download", f"RESPFILE {name!r} is not a plain .rmf file name",
                                        respfiles[name][0], -1, "")
            if (target_dir / name).is_file():
                return None
            stem = name[: -len(".rmf")]
            if self.rmf_version is None and any(target_dir.glob(f"{glob.escape(stem)}_v*.rmf")):
                return None  # already fetched (under the version served then): no request at all
            suffix = served_version()
            if suffix is None:
                where = self.rmf_url + RMF_VERSION_FILE
                return QuarantineRecord(
                    "download", f"RMF {name}: cannot tell the canned-matrix version ({where}: "
                    f"{version_problem[0]}; set rmf_version / --rmf-version); "
                    f"needed by {', '.join(respfiles[name])}",
                    respfiles[name][0], -1, where)
            url = self.rmf_url + _versioned_rmf_name(name, suffix)
            final = target_dir / _versioned_rmf_name(name, suffix)
            if final.is_file():
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

    def served_rmf_version(self) -> str:
        """The canned matrices' version suffix: rmf_version when set, else the calibration site's
        PN/Version.txt (what astroquery.esa.xmm_newton reads), e.g. '_v22.0'."""
        if self.rmf_version:
            return self.rmf_version
        url = self.rmf_url + RMF_VERSION_FILE
        tmp = self._staging / "rmf-version.txt"
        try:
            download_to_file(url, tmp, self.policy, self.stats)
            text = tmp.read_bytes()[:200].decode("utf-8", "replace")
        finally:
            tmp.unlink(missing_ok=True)
        return validate_rmf_version(text, url)


def _no_product_text(path: Path) -> str | None:
    """The text of a short plain-text answer (the servlet's 'nothing here'), else None."""
    if path.stat().st_size > NO_PRODUCT_MAX_BYTES:
        return None
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b" or raw[:6] == b"SIMPLE" or (len(raw) >= 262 and raw[257:262] == b"ustar"):
        return None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if not text or not all(c.isprintable() or c in "\r\n\t" for c in text):
        return None
    return " ".join(text.split())[:200]


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


def _versioned_rmf_name(name: str, version: str) -> str:
    """'epn_e3_ff20_sdY9.rmf' + '_v22.0' -> 'epn_e3_ff20_sdY9_v22.0.rmf' (a versioned name is kept)."""
    stem = name[: -len(".rmf")]
    return name if re.search(r"_v\d+\.\d+$", stem) else f"{stem}{version}.rmf"


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
