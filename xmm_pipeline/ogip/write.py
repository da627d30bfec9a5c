"""Write OGIP spectral files (PHA type I, ARF, RMF) as the XMM pipeline and calibration site serve them.

The FITS bytes are composed directly (80-character cards, big-endian binary tables, variable-length
arrays in the heap) rather than through astropy's table machinery: the simulator writes tens of
thousands of small files and this is ~50x faster. No wall-clock keyword is written, so the same
inputs give the same bytes; `.FTZ`/`.gz` paths are gzipped with mtime 0 for the same reason.
The layout follows OGIP memos CAL/GEN/92-007 (PHA) and CAL/GEN/92-002 (ARF/RMF); read the result back
with astropy or any OGIP reader.
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK_BYTES = 2880
CARD_BYTES = 80
Value = str | int | float | bool

# (TFORM letter) -> big-endian numpy dtype
_FITS_DTYPES = {"I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8", "B": "u1"}
MISSION_KEYWORDS: dict[str, Value] = {"TELESCOP": "XMM", "INSTRUME": "EPN"}


@functools.lru_cache(maxsize=8192)
def card(key: str, value: Value | None = None, comment: str = "") -> bytes:
    """One 80-byte header card in FITS fixed format (strings left-, numbers right-justified)."""
    if value is None:
        text = f"{key:<8}" if not comment else f"{key:<8}{comment}"
    else:
        if isinstance(value, bool):
            rendered = f"{'T' if value else 'F':>20}"
        elif isinstance(value, (int, np.integer)):
            rendered = f"{int(value):>20}"
        elif isinstance(value, (float, np.floating)):
            number = repr(float(value)).upper()
            if "." not in number and "E" not in number:
                number += ".0"
            rendered = f"{number:>20}"
        else:
            quoted = str(value).replace("'", "''")
            rendered = f"'{quoted:<8}'"
        text = f"{key:<8}= {rendered}"
        if comment:
            text += f" / {comment}"
    if len(text) > CARD_BYTES:
        text = text[:CARD_BYTES]
    return text.ljust(CARD_BYTES).encode("ascii")


def _header(cards: Sequence[bytes]) -> bytes:
    block = b"".join(cards) + card("END")
    return block + b" " * (-len(block) % BLOCK_BYTES)


@dataclass(frozen=True)
class Column:
    """A binary-table column: fixed (`data` 1-D or 2-D) or variable-length (`data` a list of arrays,
    `tform` like 'PE' or 'PI')."""

    name: str
    tform: str
    data: np.ndarray | list[np.ndarray]
    unit: str = ""


def primary_hdu(keywords: Mapping[str, Value] | None = None) -> bytes:
    cards = [
        card("SIMPLE", True, "file does conform to FITS standard"),
        card("BITPIX", 8, "number of bits per data pixel"),
        card("NAXIS", 0, "number of data axes"),
        card("EXTEND", True, "FITS dataset may contain extensions"),
    ]
    cards += [card(k, v) for k, v in (keywords or {}).items()]
    return _header(cards)


def bintable_hdu(extname: str, columns: Sequence[Column], keywords: Mapping[str, Value]) -> bytes:
    """A BINTABLE extension: header cards, the row data, and the heap for variable-length columns."""
    n_rows = len(columns[0].data)
    fields: list[tuple[str, str] | tuple[str, str, tuple[int]]] = []
    values: list[np.ndarray] = []
    tforms: list[str] = []
    heap_parts: list[bytes] = []
    heap_size = 0
    for column in columns:
        if column.tform.startswith("P"):
            code = column.tform[1]
            dtype = np.dtype(_FITS_DTYPES[code])
            arrays = [np.asarray(a, dtype=dtype) for a in column.data]
            lengths = np.array([a.size for a in arrays], dtype=np.int64)
            offsets = heap_size + np.concatenate([[0], np.cumsum(lengths[:-1] * dtype.itemsize)])
            descriptors = np.stack([lengths, offsets], axis=1).astype(">i4")
            blob = b"".join(a.tobytes() for a in arrays)
            heap_parts.append(blob)
            heap_size += len(blob)
            fields.append((column.name, ">i4", (2,)))
            values.append(descriptors)
            tforms.append(f"1P{code}({int(lengths.max()) if n_rows else 0})")
        else:
            code = column.tform[-1]
            repeat = int(column.tform[:-1] or 1)
            dtype = np.dtype(_FITS_DTYPES[code])
            data = np.asarray(column.data, dtype=dtype)
            if repeat > 1:
                fields.append((column.name, dtype.str, (repeat,)))
            else:
                fields.append((column.name, dtype.str))
            values.append(data)
            tforms.append(column.tform)
    table = np.empty(n_rows, dtype=np.dtype(fields))
    for column, data in zip(columns, values):
        table[column.name] = data
    heap = b"".join(heap_parts)
    cards = [
        card("XTENSION", "BINTABLE", "binary table extension"),
        card("BITPIX", 8, "8-bit bytes"),
        card("NAXIS", 2, "2-dimensional binary table"),
        card("NAXIS1", table.dtype.itemsize, "width of table in bytes"),
        card("NAXIS2", n_rows, "number of rows in table"),
        card("PCOUNT", len(heap), "size of special data area"),
        card("GCOUNT", 1, "one data group (required keyword)"),
        card("TFIELDS", len(columns), "number of fields in each row"),
    ]
    for index, (column, tform) in enumerate(zip(columns, tforms), start=1):
        cards.append(card(f"TTYPE{index}", column.name))
        cards.append(card(f"TFORM{index}", tform))
        if column.unit:
            cards.append(card(f"TUNIT{index}", column.unit))
    cards.append(card("EXTNAME", extname, "name of this binary table extension"))
    cards += [card(k, v) for k, v in keywords.items()]
    data = table.tobytes() + heap
    return _header(cards) + data + b"\0" * (-len(data) % BLOCK_BYTES)


def fits_bytes(*hdus: bytes) -> bytes:
    return b"".join(hdus)


def gzip_bytes(data: bytes) -> bytes:
    """Gzip without a file name or timestamp, so equal inputs give equal bytes."""
    return gzip.compress(data, compresslevel=1, mtime=0)


def is_gzip_name(path: str | Path) -> bool:
    return str(path).upper().endswith((".FTZ", ".GZ"))


def write_fits_file(path: str | Path, data: bytes, compress: bool | None = None) -> Path:
    """Write FITS bytes atomically (a temporary sibling renamed into place); gzip when `compress`
    (default: from the suffix, .FTZ or .gz).

    A file that already holds exactly these bytes is left untouched (its mtime too), so re-running
    a deterministic writer does no work downstream.
    """
    path = Path(path)
    if compress if compress is not None else is_gzip_name(path):
        data = gzip_bytes(data)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            tmp.write_bytes(data)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def pha_bytes(
    counts: np.ndarray,
    *,
    exposure_s: float,
    backscal: float,
    respfile: str,
    ancrfile: str,
    backfile: str,
    filter_name: str = "Thin1",
    spectrum_type: str = "TOTAL",
    areascal: float = 1.0,
    quality: np.ndarray | None = None,
    header_extra: Mapping[str, Value] | None = None,
) -> bytes:
    """A PHA type I spectrum: CHANNEL 0..N-1 (TLMIN1=0) and integer COUNTS with Poisson errors.

    `quality` (one int16 flag per channel, 0 = good) adds a QUALITY column, as the pipeline's source
    spectra carry one (SAS specgroup marks the channels below 0.32 keV bad); the QUALITY keyword then
    stays 0, as in those files, and the column takes precedence (OGIP CAL/GEN/92-007)."""
    counts = np.asarray(counts)
    if counts.ndim != 1 or np.any(counts < 0) or not np.all(np.floor(counts) == counts):
        raise ValueError("PHA counts must be a 1-D array of non-negative integers")
    n_channels = counts.size
    if quality is not None:
        quality = np.asarray(quality)
        if quality.shape != counts.shape or not np.all(np.floor(quality) == quality):
            raise ValueError(f"PHA quality must be {n_channels} integer flags, one per channel")
    keywords: dict[str, Value] = {
        **MISSION_KEYWORDS,
        "FILTER": filter_name,
        "HDUCLASS": "OGIP",
        "HDUCLAS1": "SPECTRUM",
        "HDUCLAS2": spectrum_type,
        "HDUCLAS3": "COUNT",
        "HDUVERS1": "1.1.0",
        "HDUVERS": "1.2.1",
        "AREASCAL": float(areascal),
        "CORRSCAL": 1.0,
        "POISSERR": True,
        "SYS_ERR": 0,
        "CHANTYPE": "PI",
        "DETCHANS": n_channels,
        "QUALITY": 0,
        "GROUPING": 0,
        "EXPOSURE": float(exposure_s),
        "BACKSCAL": float(backscal),
        "ANCRFILE": ancrfile,
        "RESPFILE": respfile,
        "BACKFILE": backfile,
        "CORRFILE": "NONE",
        "TLMIN1": 0,
        "TLMAX1": n_channels - 1,
        **(header_extra or {}),
    }
    columns = [
        Column("CHANNEL", "I", np.arange(n_channels)),
        Column("COUNTS", "J", counts.astype(np.int64), unit="count"),
    ]
    if quality is not None:
        columns.append(Column("QUALITY", "I", quality.astype(np.int16)))
    primary = {**MISSION_KEYWORDS, "FILTER": filter_name, **(header_extra or {})}
    return fits_bytes(primary_hdu(primary), bintable_hdu("SPECTRUM", columns, keywords))


def write_pha(path: str | Path, counts: np.ndarray, *, compress: bool | None = None, **keywords) -> Path:
    """Write a PHA type I spectrum (see `pha_bytes` for the keyword arguments)."""
    return write_fits_file(path, pha_bytes(counts, **keywords), compress)


def arf_bytes(
    energy_lo_kev: np.ndarray,
    energy_hi_kev: np.ndarray,
    specresp_cm2: np.ndarray,
    *,
    filter_name: str = "Thin1",
    header_extra: Mapping[str, Value] | None = None,
) -> bytes:
    """An ARF: SPECRESP extension with ENERG_LO, ENERG_HI (keV) and SPECRESP (cm^2)."""
    keywords: dict[str, Value] = {
        **MISSION_KEYWORDS,
        "FILTER": filter_name,
        "ARFVERSN": "1992a",
        "HDUCLASS": "OGIP",
        "HDUCLAS1": "RESPONSE",
        "HDUCLAS2": "SPECRESP",
        "HDUVERS": "1.1.0",
        **(header_extra or {}),
    }
    columns = [
        Column("ENERG_LO", "E", energy_lo_kev, unit="keV"),
        Column("ENERG_HI", "E", energy_hi_kev, unit="keV"),
        Column("SPECRESP", "E", specresp_cm2, unit="cm**2"),
    ]
    return fits_bytes(primary_hdu(MISSION_KEYWORDS), bintable_hdu("SPECRESP", columns, keywords))


def write_arf(
    path: str | Path,
    energy_lo_kev: np.ndarray,
    energy_hi_kev: np.ndarray,
    specresp_cm2: np.ndarray,
    *,
    compress: bool | None = None,
    **keywords,
) -> Path:
    return write_fits_file(path, arf_bytes(energy_lo_kev, energy_hi_kev, specresp_cm2, **keywords), compress)


def sparse_rows(matrix: np.ndarray, threshold: float = 0.0) -> tuple[list[np.ndarray], ...]:
    """Per row of a dense redistribution matrix: the groups of consecutive channels above threshold,
    as (n_grp, f_chan, n_chan, values) lists in the OGIP convention (zero-based channels)."""
    keep = matrix > threshold
    n_grp, f_chan, n_chan, values = [], [], [], []
    padded = np.zeros((matrix.shape[0], matrix.shape[1] + 2), dtype=bool)
    padded[:, 1:-1] = keep
    changes = np.diff(padded.astype(np.int8), axis=1)
    for row in range(matrix.shape[0]):
        starts = np.flatnonzero(changes[row] == 1)
        stops = np.flatnonzero(changes[row] == -1)
        n_grp.append(np.array(starts.size))
        f_chan.append(starts)
        n_chan.append(stops - starts)
        values.append(
            np.concatenate([matrix[row, a:b] for a, b in zip(starts, stops)]) if starts.size else np.zeros(0)
        )
    return n_grp, f_chan, n_chan, values


def rmf_bytes(
    energy_lo_kev: np.ndarray,
    energy_hi_kev: np.ndarray,
    matrix: np.ndarray,
    channel_emin_kev: np.ndarray,
    channel_emax_kev: np.ndarray,
    *,
    threshold: float = 1e-6,
    filter_name: str = "NONE",
    header_extra: Mapping[str, Value] | None = None,
) -> bytes:
    """An RMF: MATRIX (HDUCLAS3=REDIST, variable-length N_GRP groups, F_CHAN zero-based with TLMIN4=0)
    and EBOUNDS. `matrix` is dense [energy, channel]; entries <= threshold are dropped (LO_THRES)."""
    matrix = np.asarray(matrix)
    n_channels = matrix.shape[1]
    n_grp, f_chan, n_chan, values = sparse_rows(matrix, threshold)
    common: dict[str, Value] = {
        **MISSION_KEYWORDS,
        "FILTER": filter_name,
        "RMFVERSN": "1992a",
        "CHANTYPE": "PI",
        "DETCHANS": n_channels,
        "HDUCLASS": "OGIP",
        "HDUCLAS1": "RESPONSE",
    }
    matrix_keywords: dict[str, Value] = {
        **common,
        "HDUCLAS2": "RSP_MATRIX",
        "HDUCLAS3": "REDIST",
        "HDUVERS": "1.3.0",
        "LO_THRES": float(threshold),
        "TLMIN4": 0,
        "TLMAX4": n_channels - 1,
        **(header_extra or {}),
    }
    matrix_columns = [
        Column("ENERG_LO", "E", energy_lo_kev, unit="keV"),
        Column("ENERG_HI", "E", energy_hi_kev, unit="keV"),
        Column("N_GRP", "I", np.array([int(n) for n in n_grp])),
        Column("F_CHAN", "PI", f_chan),
        Column("N_CHAN", "PI", n_chan),
        Column("MATRIX", "PE", values),
    ]
    ebounds_keywords: dict[str, Value] = {
        **common,
        "HDUCLAS2": "EBOUNDS",
        "HDUVERS": "1.2.0",
        "TLMIN1": 0,
        "TLMAX1": n_channels - 1,
    }
    ebounds_columns = [
        Column("CHANNEL", "I", np.arange(n_channels)),
        Column("E_MIN", "E", channel_emin_kev, unit="keV"),
        Column("E_MAX", "E", channel_emax_kev, unit="keV"),
    ]
    return fits_bytes(
        primary_hdu(MISSION_KEYWORDS),
        bintable_hdu("MATRIX", matrix_columns, matrix_keywords),
        bintable_hdu("EBOUNDS", ebounds_columns, ebounds_keywords),
    )


def write_rmf(
    path: str | Path,
    energy_lo_kev: np.ndarray,
    energy_hi_kev: np.ndarray,
    matrix: np.ndarray,
    channel_emin_kev: np.ndarray,
    channel_emax_kev: np.ndarray,
    *,
    compress: bool | None = None,
    **keywords,
) -> Path:
    data = rmf_bytes(energy_lo_kev, energy_hi_kev, matrix, channel_emin_kev, channel_emax_kev, **keywords)
    return write_fits_file(path, data, compress)
