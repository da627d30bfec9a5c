"""Atomic writes, content hashes and the quarantine table: the I/O rules every writer follows."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def _file_mode_from_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# mkstemp creates 0600 files; written products should get the permissions of an ordinary file.
_DEFAULT_FILE_MODE = _file_mode_from_umask()


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `final_path`; rename it into place only if the block succeeds."""
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.chmod(_DEFAULT_FILE_MODE)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_parquet_atomic(path: str | os.PathLike[str], table: pa.Table | pd.DataFrame) -> None:
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class QuarantineRecord:
    """One input that was set aside, with why. `stage` is e.g. 'download', 'read', 'preprocess'."""

    stage: str
    reason: str
    obs_id: str = ""
    detid: int = -1
    path: str = ""


QUARANTINE_COLUMNS = ["stage", "reason", "obs_id", "detid", "path"]


def quarantine_frame(records: list[QuarantineRecord]) -> pd.DataFrame:
    frame = pd.DataFrame([asdict(r) for r in records], columns=QUARANTINE_COLUMNS)
    return frame.astype({"stage": str, "reason": str, "obs_id": str, "detid": "int64", "path": str})
