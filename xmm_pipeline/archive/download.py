"""Polite, verified HTTP downloads and safe tar extraction for the real archive.

Three rules keep a large ingest from losing or corrupting anything:
- every request retries transient failures (timeouts, resets, 5xx, 429) with exponential backoff and
  jitter, honours Retry-After, and never retries other 4xx; 401 means proprietary data;
- every body lands in a temporary file that is checked (length, gzip integrity, FITS structure)
  before it is renamed into place, so a file in the layout is always complete;
- tar members are vetted before anything is written: absolute paths, `..`, links and device files
  refuse the whole archive.
"""

from __future__ import annotations

import email.utils
import gzip
import io
import os
import random
import re
import tarfile
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

import requests
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning

from xmm_pipeline.errors import ProductError, UserError
from xmm_pipeline.storage import atomic_path

# The HDU each product must hold to be usable.
REQUIRED_HDUS = {"SRSPEC": ("SPECTRUM",), "BGSPEC": ("SPECTRUM",), "SRCARF": ("SPECRESP",)}
RMF_MATRIX_HDUS = ("MATRIX", "SPECRESP MATRIX")

CHUNK_BYTES = 1 << 16
# The exit status of `xmm-pipeline download` when a service could not be reached at all (0: done,
# 1: done with some products quarantined, 2: a problem with the arguments or the input).
EXIT_SERVICE_UNREACHABLE = 3


class ServiceUnreachableError(UserError):
    """A service that could not be reached at all (refused, unknown host, timed out): one line naming
    the URL and what failed; nothing was fetched from it."""

    def __init__(self, url: str, problem: str) -> None:
        self.url = url
        self.problem = problem
        super().__init__(f"cannot reach {url}: {problem}")


def connection_problem(error: BaseException) -> str:
    """The innermost cause of a connection failure in a few words ('[Errno 111] Connection refused')."""
    text = str(error)
    match = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if match:
        return match.group(0).strip().rstrip(",")
    if "timed out" in text.lower() or isinstance(error, requests.Timeout):
        return "timed out"
    return type(error).__name__


class DownloadError(Exception):
    """A URL that could not be had; `reason` is what goes into the quarantine table."""

    def __init__(self, url: str, reason: str, proprietary: bool = False) -> None:
        self.url = url
        self.reason = reason
        self.proprietary = proprietary
        super().__init__(f"{url}: {reason}")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one URL. Delays: backoff_s * 2**attempt, times a jitter in [0.5, 1.5)."""

    timeout_s: float = 60.0
    retries: int = 4
    backoff_s: float = 1.0
    max_delay_s: float = 60.0


@dataclass
class TransferStats:
    """Counters shared by a run's worker threads (requests made, bytes received, retries)."""

    requests: int = 0
    bytes_received: int = 0
    retries: int = 0
    responses: int = 0  # requests answered with any HTTP status: the server was reached
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(
        self, requests_made: int = 0, bytes_received: int = 0, retries: int = 0, responses: int = 0
    ) -> None:
        with self._lock:
            self.requests += requests_made
            self.bytes_received += bytes_received
            self.retries += retries
            self.responses += responses


_PROCESS_SLOTS = threading.BoundedSemaphore(8)
_thread_state = threading.local()


def set_process_request_limit(limit: int) -> None:
    """Cap the requests in flight from this process, across every archive instance and thread."""
    global _PROCESS_SLOTS
    if limit < 1:
        raise ValueError(f"process request limit must be >= 1, got {limit}")
    _PROCESS_SLOTS = threading.BoundedSemaphore(limit)


def _session() -> requests.Session:
    session = getattr(_thread_state, "session", None)
    if session is None:
        session = requests.Session()
        session.headers["User-Agent"] = "xmm_pipeline (+https://github.com/) python-requests"
        _thread_state.session = session
    return session


def _retry_after_s(header: str | None) -> float | None:
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        when = email.utils.parsedate_to_datetime(header)
        return max(0.0, when.timestamp() - time.time()) if when else None


def download_to_file(
    url: str, target: Path, policy: RetryPolicy, stats: TransferStats | None = None
) -> dict[str, str]:
    """GET `url` into `target` (overwritten), retrying transient failures; returns the headers.

    Raises DownloadError with the reason after the last attempt, at once for a non-retryable 4xx.
    """
    stats = stats or TransferStats()
    reason = "no attempt made"
    for attempt in range(policy.retries + 1):
        if attempt:
            stats.add(retries=1)
        wait_s: float | None = None
        try:
            with _PROCESS_SLOTS:
                stats.add(requests_made=1)
                with _session().get(url, stream=True, timeout=policy.timeout_s) as response:
                    stats.add(responses=1)
                    status = response.status_code
                    if status == 401:
                        raise DownloadError(url, "proprietary data (HTTP 401)", proprietary=True)
                    if status == 429 or status >= 500:
                        reason = f"HTTP {status}"
                        wait_s = _retry_after_s(response.headers.get("Retry-After"))
                    elif status >= 400:
                        raise DownloadError(url, f"HTTP {status} {response.reason}")
                    else:
                        received = 0
                        with open(target, "wb") as out:
                            for chunk in response.iter_content(CHUNK_BYTES):
                                out.write(chunk)
                                received += len(chunk)
                        stats.add(bytes_received=received)
                        expected = response.headers.get("Content-Length")
                        if expected is not None and int(expected) != received:
                            reason = f"truncated transfer: {received} of {expected} bytes"
                        else:
                            return dict(response.headers)
        except requests.Timeout:
            reason = f"timed out after {policy.timeout_s:g} s"
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as error:
            reason = f"connection failed ({type(error).__name__}: {connection_problem(error)})"
        if attempt < policy.retries:
            backoff = policy.backoff_s * 2**attempt * random.uniform(0.5, 1.5)
            time.sleep(min(policy.max_delay_s, wait_s if wait_s is not None else backoff))
    raise DownloadError(url, f"{reason} after {policy.retries + 1} attempts")


def read_verified_fits(
    path: Path, required_hdus: tuple[str, ...], one_of_hdus: tuple[str, ...] = ()
) -> fits.Header:
    """Check a (possibly gzipped) FITS file end to end, in one read: every HDU of `required_hdus`
    and, when given, at least one of `one_of_hdus` must be there and readable. Returns the header of
    the first `one_of_hdus` present, else of the first required HDU.

    Decompresses fully (a truncated gzip fails its CRC), opens the FITS, reads the data of the
    HDUs checked. Raises ProductError naming the file and the problem.
    """
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise ProductError(path, f"gzip stream is corrupt or truncated ({error})") from error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", VerifyWarning)
            with fits.open(io.BytesIO(raw), lazy_load_hdus=False) as hdus:
                names = [h.name.upper() for h in hdus]
                have = ", ".join(names)
                missing = [n for n in required_hdus if n not in names]
                if missing:
                    raise ProductError(path, f"missing HDU {' and '.join(missing)} (has {have})")
                alternatives = [n for n in one_of_hdus if n in names]
                if one_of_hdus and not alternatives:
                    raise ProductError(path, f"missing HDU {' or '.join(one_of_hdus)} (has {have})")
                for name in (*required_hdus, *alternatives):
                    _ = hdus[name].data
                return hdus[(alternatives or list(required_hdus))[0]].header.copy()
    except ProductError:
        raise
    except Exception as error:
        raise ProductError(path, f"not a readable FITS file ({error})") from error


def verify_pn_product(path: Path, kind: str) -> fits.Header:
    return read_verified_fits(path, REQUIRED_HDUS[kind])


def verify_rmf(path: Path) -> fits.Header:
    return read_verified_fits(path, ("EBOUNDS",), RMF_MATRIX_HDUS)


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in parts:
        return "parent-directory component"
    if member.issym() or member.islnk():
        return "link"
    if member.isdev() or member.isfifo():
        return "device or fifo"
    if not (member.isfile() or member.isdir()):
        return "not a regular file"
    return None


def safe_extract_tar(
    source: str | os.PathLike[str] | IO[bytes],
    dest_dir: str | os.PathLike[str],
    select: Callable[[str], bool] | None = None,
) -> list[Path]:
    """Extract the regular files of a tar (any compression) under `dest_dir`; return their paths.

    Every member is vetted first: one absolute path, `..`, link, device or fifo refuses the whole
    archive (ProductError naming the member) before anything is written. `select(member_name)`
    picks which regular files to write; each is written atomically.
    """
    dest = Path(dest_dir).resolve()
    label = str(source) if isinstance(source, str | os.PathLike) else getattr(source, "name", "tar stream")
    try:
        opened = {"fileobj": source} if hasattr(source, "read") else {"name": source}
        tar = tarfile.open(mode="r:*", **opened)  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ProductError(label, f"not a readable tar archive ({error})") from error
    written: list[Path] = []
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
            raise ProductError(label, f"tar archive is corrupt or truncated ({error})") from error
        for member in members:
            problem = _unsafe_reason(member)
            if problem is None:
                target = (dest / member.name).resolve()
                if target != dest and dest not in target.parents:
                    problem = "resolves outside the target folder"
            if problem:
                raise ProductError(label, f"unsafe tar member {member.name!r}: {problem}")
        for member in members:
            if not member.isfile() or (select is not None and not select(member.name)):
                continue
            target = dest / member.name
            stream = tar.extractfile(member)
            if stream is None:
                continue
            try:
                with atomic_path(target) as tmp, open(tmp, "wb") as out:
                    while chunk := stream.read(CHUNK_BYTES):
                        out.write(chunk)
            except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
                raise ProductError(label, f"tar member {member.name!r} is truncated ({error})") from error
            written.append(target)
    return written
