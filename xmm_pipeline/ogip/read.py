"""Read OGIP spectral files (PHA type I, ARF, RMF) into dataclasses of numpy arrays.

Every problem raises `ProductError` naming the file. PHA and ARF files (small, one per spectrum,
read hundreds of times per second in ingestion) go through a minimal FITS binary-table reader that
decompresses the file once and maps the table with `numpy.frombuffer`; anything it does not handle
(variable-length columns, scaled columns, odd layouts) falls back to astropy. RMFs (few per run,
variable-length arrays) are read with astropy and kept in their sparse group form.
"""

from __future__ import annotations

import functools
import gzip
import re
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xmm_pipeline.errors import ProductError

_BLOCK = 2880
_CARD = 80
_TFORM = re.compile(r"^\s*(\d*)\s*([LXBIJKAEDCMPQ])")
_FITS_DTYPES = {"L": "i1", "B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8"}
_NO_LINK = {"", "NONE", "NONE.FITS"}
# A matrix row of pure redistribution (HDUCLAS3 REDIST) sums to 1, one with detector efficiency
# (DETECTOR) to at most 1; an effective area in cm^2 (FULL) reaches hundreds. Between the two nothing
# real lies: a largest row sum above this many cm^2 is an area.
AREA_ROW_SUM_MIN = 1.5
_AREA_HDUCLAS3 = {"FULL": True, "REDIST": False, "DETECTOR": False}
# EPIC-pn imaging modes (SUBMODE as the pipeline writes it); timing and burst data have another
# response and background and are refused, as are the other instruments.
PN_INSTRUMENT = "EPN"
PN_IMAGING_DATAMODE = "IMAGING"
PN_IMAGING_SUBMODES = ("PrimeFullWindow", "PrimeFullWindowExtended", "PrimeLargeWindow", "PrimeSmallWindow")
_Table = tuple[Mapping[str, Any], dict[str, np.ndarray], str]  # keywords, columns by name, EXTNAME


@dataclass(frozen=True)
class Pha:
    """A PHA type I spectrum. `counts` are counts per channel (RATE x EXPOSURE where rates are stored)."""

    path: Path
    channel: np.ndarray  # int64, channel numbers as stored (first is TLMIN of CHANNEL)
    counts: np.ndarray  # float64
    quality: np.ndarray  # int16, 0 = good
    exposure_s: float
    backscal: float | np.ndarray
    areascal: float | np.ndarray
    poisson: bool
    n_channels: int  # DETCHANS, the channel count the RMF must have
    backfile: str | None
    respfile: str | None
    ancrfile: str | None
    keywords: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Arf:
    path: Path
    energy_lo_kev: np.ndarray  # float64
    energy_hi_kev: np.ndarray
    area_cm2: np.ndarray


@dataclass(frozen=True)
class Rmf:
    """A response matrix in its sparse OGIP form: groups of consecutive channels per energy row.

    Element values of group g are `values[offset[g] : offset[g] + group_n_chan[g]]`, channel indices
    (zero-based into `channel`) `group_first_channel[g] + arange(group_n_chan[g])`.
    `includes_area` says whether the effective area is folded into the rows (see `matrix_holds_area`).
    """

    path: Path
    energy_lo_kev: np.ndarray  # float64 [E]
    energy_hi_kev: np.ndarray
    channel: np.ndarray  # int64 [C], from EBOUNDS
    channel_lo_kev: np.ndarray  # float64 [C]
    channel_hi_kev: np.ndarray
    group_energy_index: np.ndarray  # int32 [G]
    group_first_channel: np.ndarray  # int32 [G], zero-based
    group_n_chan: np.ndarray  # int32 [G]
    values: np.ndarray  # float32 [sum(group_n_chan)]
    includes_area: bool

    @property
    def n_energies(self) -> int:
        return len(self.energy_lo_kev)

    @property
    def n_channels(self) -> int:
        return len(self.channel)

    def element_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """(energy row, zero-based channel) of every stored matrix element."""
        n_chan = self.group_n_chan.astype(np.int64)
        starts = np.cumsum(n_chan) - n_chan
        within = np.arange(int(n_chan.sum()), dtype=np.int64) - np.repeat(starts, n_chan)
        rows = np.repeat(self.group_energy_index.astype(np.int64), n_chan)
        return rows, np.repeat(self.group_first_channel.astype(np.int64), n_chan) + within

    def to_csr(self):
        """The matrix as scipy.sparse CSR [energy, channel] (duplicates summed)."""
        from scipy import sparse

        rows, cols = self.element_indices()
        shape = (self.n_energies, self.n_channels)
        return sparse.csr_matrix((self.values.astype(np.float64), (rows, cols)), shape=shape)

    def to_dense(self) -> np.ndarray:
        dense = np.zeros((self.n_energies, self.n_channels), dtype=np.float64)
        rows, cols = self.element_indices()
        np.add.at(dense, (rows, cols), self.values)
        return dense


# ---------------------------------------------------------------- fast FITS binary tables


class _UnsupportedError(Exception):
    """The fast reader does not handle this file; use astropy."""


def _file_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ProductError(path, "file not found") from None
    except OSError as error:
        raise ProductError(path, f"cannot read file: {error.strerror or error}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return zlib.decompress(raw, wbits=31)  # one gzip member, CRC checked
        except zlib.error:
            pass
        try:
            return gzip.decompress(raw)  # several members
        except (OSError, EOFError, zlib.error) as error:
            raise ProductError(path, f"corrupt gzip data: {error}") from None
    return raw


@functools.lru_cache(maxsize=8192)
def _card_value(text: str) -> Any:
    """The value of a card's value field (cached: most cards repeat across the files of a run)."""
    text = text.strip()
    if text.startswith("'"):
        out, i = [], 1
        while i < len(text):
            if text[i] == "'":
                if i + 1 < len(text) and text[i + 1] == "'":
                    out.append("'")
                    i += 2
                    continue
                break
            out.append(text[i])
            i += 1
        return "".join(out).rstrip()
    word = text.split("/", 1)[0].strip()
    if word in ("T", "F"):
        return word == "T"
    if not word:
        return None
    try:
        return int(word)
    except ValueError:
        pass
    try:
        return float(word.replace("D", "E").replace("d", "e"))
    except ValueError:
        return word


class _Header(Mapping[str, Any]):
    """FITS keywords, each parsed on first access: most cards of a pipeline header are never read."""

    def __init__(self, raw: dict[str, str], parsed: dict[str, Any]) -> None:
        self._raw = raw
        self._parsed = parsed

    def __getitem__(self, key: str) -> Any:
        if key not in self._parsed:
            self._parsed[key] = _card_value(self._raw[key])
        return self._parsed[key]

    def __contains__(self, key: object) -> bool:
        return key in self._raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def merged(self, other: _Header) -> _Header:
        """These keywords overridden by `other`'s."""
        parsed = {key: value for key, value in self._parsed.items() if key not in other._raw}
        return _Header(self._raw | other._raw, parsed | other._parsed)


_END_CARD = re.compile(rb"END {77}")


def _end_of_header(data: bytes, start: int, path: Path) -> int:
    """Offset of the END card of the header at `start` (80-byte aligned)."""
    position = start
    while True:
        match = _END_CARD.search(data, position)
        if match is None:
            raise ProductError(path, "truncated FITS header (no END card)")
        if (match.start() - start) % _CARD == 0:
            return match.start()
        position = match.start() + 1


def _parse_header(data: bytes, start: int, path: Path) -> tuple[_Header, int]:
    """Keywords of the header at `start` and the offset of its data unit."""
    end = _end_of_header(data, start, path)
    text = data[start:end].decode("ascii", errors="replace")
    cards = [text[i : i + _CARD] for i in range(0, len(text), _CARD)]
    data_start = start + (end - start) // _BLOCK * _BLOCK + _BLOCK
    if data_start > len(data):
        raise ProductError(path, "truncated FITS header")
    raw: dict[str, str] = {}
    for card in reversed(cards):  # the first occurrence of a keyword wins
        if card[8:10] == "= ":
            raw[card[:8].rstrip()] = card[10:]
    header = _Header(raw, {})
    if "CONTINUE" in text:
        last_key = ""
        for card in cards:
            key = card[:8].rstrip()
            if key == "CONTINUE" and last_key:
                previous, value = header[last_key], _card_value(card[8:])
                if isinstance(previous, str) and isinstance(value, str) and previous.endswith("&"):
                    header._parsed[last_key] = previous[:-1] + value
                continue
            last_key = key if card[8:10] == "= " and card[10:].lstrip().startswith("'") else ""
    return header, data_start


def _data_size(header: Mapping[str, Any]) -> int:
    naxis = int(header.get("NAXIS", 0))
    if naxis == 0:
        return 0
    size = abs(int(header.get("BITPIX", 8))) // 8
    for axis in range(1, naxis + 1):
        size *= int(header.get(f"NAXIS{axis}", 0))
    size = (size + int(header.get("PCOUNT", 0))) * int(header.get("GCOUNT", 1))
    return -(-size // _BLOCK) * _BLOCK


@dataclass(frozen=True)
class _VarLength:
    """A variable-length array column: all rows' values concatenated, and each row's length."""

    values: np.ndarray
    counts: np.ndarray  # int64 [rows]

    @classmethod
    def from_rows(cls, rows: Any, dtype: Any) -> _VarLength:
        parts = [np.atleast_1d(np.asarray(row, dtype=dtype)) for row in rows]
        counts = np.array([len(part) for part in parts], dtype=np.int64)
        return cls(np.concatenate(parts) if parts else np.zeros(0, dtype), counts)


def _heap_values(descriptors: np.ndarray, heap: memoryview, dtype: np.dtype) -> _VarLength:
    counts, offsets = descriptors[:, 0].astype(np.int64), descriptors[:, 1].astype(np.int64)
    sizes = counts * dtype.itemsize
    if np.any(offsets + sizes > len(heap)) or np.any(counts < 0):
        raise ValueError("variable-length array descriptor points outside the heap")
    total = int(counts.sum())
    contiguous = len(counts) == 0 or bool(np.all(offsets[1:] == offsets[:-1] + sizes[:-1]))
    if contiguous:
        start = int(offsets[0]) if len(offsets) else 0
        values = np.frombuffer(heap, dtype=dtype, count=total, offset=start)
    else:
        starts = np.repeat(offsets - (np.cumsum(sizes) - sizes), sizes)
        byte_index = np.arange(int(sizes.sum()), dtype=np.int64) + starts
        values = np.frombuffer(heap, dtype=np.uint8)[byte_index].view(dtype)
    return _VarLength(values.astype(dtype.newbyteorder("=")), counts)


def _table_columns(header: Mapping[str, Any], data: bytes, start: int) -> dict[str, Any]:
    """Columns of a binary table as numpy arrays (variable-length ones as _VarLength)."""
    n_rows, row_bytes = int(header["NAXIS2"]), int(header["NAXIS1"])
    names, formats, offsets, scales, heap_types = [], [], [], {}, {}
    offset = 0
    for index in range(1, int(header["TFIELDS"]) + 1):
        tform = str(header.get(f"TFORM{index}", ""))
        match = _TFORM.match(tform)
        if not match:
            raise _UnsupportedError(f"TFORM{index}")
        repeat = int(match.group(1) or 1)
        code = match.group(2)
        name = str(header.get(f"TTYPE{index}", f"COL{index}")).strip().upper()
        if code in "PQ":
            element = tform[match.end() : match.end() + 1]
            if element not in _FITS_DTYPES or repeat != 1:
                raise _UnsupportedError(f"TFORM{index} = {tform}")
            heap_types[name] = np.dtype(_FITS_DTYPES[element])
            dtype_code, width = (">i4" if code == "P" else ">i8", (2,)), 8 if code == "P" else 16
        elif code in "CMX":
            dtype_code = None
            width = {"C": 8, "M": 16, "X": 1}[code] * (repeat if code != "X" else -(-repeat // 8))
        elif code == "A":
            dtype_code, width = None, repeat
        else:
            dtype_code = (_FITS_DTYPES[code], (repeat,)) if repeat > 1 else _FITS_DTYPES[code]
            width = np.dtype(_FITS_DTYPES[code]).itemsize * repeat
        if dtype_code is not None and name not in names:
            names.append(name)
            formats.append(dtype_code)
            offsets.append(offset)
            scale, zero = header.get(f"TSCAL{index}", 1), header.get(f"TZERO{index}", 0)
            if scale != 1 or zero != 0:
                scales[name] = (scale, zero)
        offset += width
    if offset != row_bytes:
        raise _UnsupportedError("row width")
    dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": row_bytes})
    table = np.frombuffer(data, dtype=dtype, count=n_rows, offset=start)
    heap_start = start + int(header.get("THEAP", row_bytes * n_rows))
    heap = memoryview(data)[heap_start : start + row_bytes * n_rows + int(header.get("PCOUNT", 0))]
    columns: dict[str, Any] = {}
    for name in names:
        column = table[name]
        if name in heap_types:
            columns[name] = _heap_values(column, heap, heap_types[name])
            continue
        if name in scales:
            column = column * scales[name][0] + scales[name][1]
        columns[name] = column
    return columns


def _fast_tables(path: Path):
    """Yield (keywords of primary + extension, EXTNAME, data bytes, data start) of each BINTABLE."""
    data = _file_bytes(path)
    if not data.startswith(b"SIMPLE  ="):
        raise ProductError(path, "not a FITS file (no SIMPLE card)")
    primary, position = _parse_header(data, 0, path)
    position += _data_size(primary)
    while position < len(data):
        header, data_start = _parse_header(data, position, path)
        position = data_start + _data_size(header)
        if str(header.get("XTENSION", "")).strip() == "BINTABLE":
            if position > len(data) + _BLOCK:
                raise ProductError(path, f"truncated FITS data in extension {header.get('EXTNAME', '')}")
            yield primary.merged(header), str(header.get("EXTNAME", "")).strip().upper(), data, data_start


def _read_table_fast(path: Path, extnames: tuple[str, ...], hduclas1: str) -> _Table:
    for header, extname, data, data_start in _fast_tables(path):
        if extname in extnames or str(header.get("HDUCLAS1", "")).strip().upper() == hduclas1:
            if data_start + int(header["NAXIS1"]) * int(header["NAXIS2"]) > len(data):
                raise ProductError(path, f"truncated FITS data in extension {extname}")
            return header, _table_columns(header, data, data_start), extname
    raise ProductError(path, f"no {' or '.join(extnames)} extension")


def _read_table_astropy(path: Path, extnames: tuple[str, ...], hduclas1: str) -> _Table:
    from astropy.io import fits

    try:
        with fits.open(path, memmap=False) as hdus:
            primary = dict(hdus[0].header)
            for hdu in hdus[1:]:
                extname = str(hdu.header.get("EXTNAME", "")).strip().upper()
                if extname in extnames or str(hdu.header.get("HDUCLAS1", "")).strip().upper() == hduclas1:
                    columns = {name.upper(): np.asarray(hdu.data[name]) for name in hdu.columns.names}
                    return {**primary, **dict(hdu.header)}, columns, extname
    except FileNotFoundError:
        raise ProductError(path, "file not found") from None
    except (OSError, ValueError, TypeError, KeyError, IndexError) as error:
        raise ProductError(path, f"unreadable FITS file: {error}") from None
    raise ProductError(path, f"no {' or '.join(extnames)} extension")


def read_table(path: str | Path, extnames: tuple[str, ...], hduclas1: str = "") -> _Table:
    """(keywords of primary+extension, columns by upper-case name, extname) of the first matching table."""
    path = Path(path)
    try:
        return _read_table_fast(path, extnames, hduclas1)
    except (_UnsupportedError, KeyError, ValueError, TypeError):
        return _read_table_astropy(path, extnames, hduclas1)


# ---------------------------------------------------------------- public readers


def _link(header: Mapping[str, Any], key: str) -> str | None:
    value = header.get(key)
    if value is None:
        return None
    text = str(value).strip()
    return None if text.upper() in _NO_LINK else text


def _per_channel(
    path: Path, header: Mapping[str, Any], columns: dict, key: str, n: int
) -> float | np.ndarray:
    if key in columns:
        values = np.asarray(columns[key], dtype=np.float64)
        if values.shape != (n,):
            raise ProductError(path, f"{key} column has shape {values.shape}, expected ({n},)")
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ProductError(path, f"{key} column has NaN or negative values")
        return values
    value = header.get(key, 1.0)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ProductError(path, f"{key} keyword is not a number: {value!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise ProductError(path, f"{key} = {value} (must be positive)")
    return value


def read_pha(path: str | Path) -> Pha:
    """Read a PHA type I spectrum (COUNTS or RATE). GROUPING is ignored: binning is done downstream."""
    path = Path(path)
    header, columns, _ = read_table(path, ("SPECTRUM",), "SPECTRUM")
    exposure = header.get("EXPOSURE")
    try:
        exposure_s = float(exposure)
    except (TypeError, ValueError):
        raise ProductError(path, f"EXPOSURE keyword missing or not a number ({exposure!r})") from None
    if not np.isfinite(exposure_s) or exposure_s <= 0:
        raise ProductError(path, f"non-positive or NaN EXPOSURE = {exposure_s}")
    poisson = bool(header.get("POISSERR", False))
    if "COUNTS" in columns:
        raw = np.asarray(columns["COUNTS"])
        counts = raw.astype(np.float64)
    elif "RATE" in columns:
        raw = np.asarray(columns["RATE"])
        counts = raw.astype(np.float64) * exposure_s
    else:
        raise ProductError(path, "SPECTRUM extension has neither COUNTS nor RATE")
    if counts.ndim != 1:
        raise ProductError(path, f"PHA type II ({counts.shape[0]} spectra in one file) is not supported")
    n = len(counts)
    if n == 0:
        raise ProductError(path, "SPECTRUM extension has no channels")
    if not np.all(np.isfinite(counts)):
        raise ProductError(path, f"{int(np.sum(~np.isfinite(counts)))} NaN or infinite channel values")
    if poisson and "COUNTS" in columns:
        if np.any(counts < 0):
            raise ProductError(path, "negative COUNTS although POISSERR = T")
        if raw.dtype.kind == "f" and np.any(counts != np.round(counts)):
            raise ProductError(path, "non-integer COUNTS although POISSERR = T")
    if "CHANNEL" in columns:
        channel = np.asarray(columns["CHANNEL"], dtype=np.int64)
    else:
        channel = np.arange(n, dtype=np.int64) + int(header.get("TLMIN1", 1))
    if "QUALITY" in columns:
        quality = np.asarray(columns["QUALITY"], dtype=np.int16)
    else:
        quality = np.full(n, int(header.get("QUALITY", 0) or 0), dtype=np.int16)
    keywords = {
        key: header[key]
        for key in (
            "TELESCOP",
            "INSTRUME",
            "FILTER",
            "OBS_ID",
            "OBJECT",
            "DATE-OBS",
            "DATE-END",
            "HDUCLAS2",
            "DATAMODE",
            "SUBMODE",
        )
        if key in header
    }
    return Pha(
        path=path,
        channel=channel,
        counts=counts,
        quality=quality,
        exposure_s=exposure_s,
        backscal=_per_channel(path, header, columns, "BACKSCAL", n),
        areascal=_per_channel(path, header, columns, "AREASCAL", n),
        poisson=poisson,
        n_channels=int(header.get("DETCHANS", n) or n),
        backfile=_link(header, "BACKFILE"),
        respfile=_link(header, "RESPFILE"),
        ancrfile=_link(header, "ANCRFILE"),
        keywords=keywords,
    )


def _energy_bins(path: Path, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    if len(lo) == 0 or not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ProductError(path, "energy bins empty or NaN")
    if np.any(hi <= lo) or np.any(np.diff(lo) <= 0):
        raise ProductError(path, "energy bins not increasing (ENERG_LO/ENERG_HI)")
    return lo, hi


def read_arf(path: str | Path) -> Arf:
    path = Path(path)
    _, columns, _ = read_table(path, ("SPECRESP",), "RESPONSE")
    missing = [name for name in ("ENERG_LO", "ENERG_HI", "SPECRESP") if name not in columns]
    if missing:
        raise ProductError(path, f"SPECRESP extension lacks columns {', '.join(missing)}")
    lo, hi = _energy_bins(path, columns["ENERG_LO"], columns["ENERG_HI"])
    area = np.asarray(columns["SPECRESP"], dtype=np.float64)
    if not np.all(np.isfinite(area)):
        raise ProductError(path, "NaN in SPECRESP")
    if np.any(area < 0):
        raise ProductError(path, "negative effective area in SPECRESP")
    return Arf(path=path, energy_lo_kev=lo, energy_hi_kev=hi, area_cm2=area)


def _row_prefixes(path: Path, column: Any, n_per_row: np.ndarray, name: str) -> np.ndarray:
    """The first n_per_row[i] entries of each row of a fixed or variable-length column, concatenated."""
    if isinstance(column, _VarLength):
        if np.any(column.counts < n_per_row):
            raise ProductError(path, f"{name} rows shorter than N_GRP / N_CHAN say")
        starts = np.cumsum(column.counts) - column.counts
        index = np.arange(int(n_per_row.sum())) + np.repeat(
            starts - (np.cumsum(n_per_row) - n_per_row), n_per_row
        )
        return column.values[index]
    array = np.asarray(column)
    if array.ndim == 1:
        array = array[:, None]
    if np.any(n_per_row > array.shape[1]):
        raise ProductError(path, f"{name} vectors shorter than N_GRP / N_CHAN say")
    return array[np.arange(array.shape[1])[None, :] < n_per_row[:, None]]


def _rmf_tables_astropy(path: Path) -> dict[str, tuple[Mapping[str, Any], dict[str, Any]]]:
    from astropy.io import fits

    tables = {}
    try:
        with fits.open(path, memmap=False) as hdus:
            for hdu in hdus[1:]:
                extname = str(hdu.header.get("EXTNAME", "")).strip().upper()
                if extname in ("MATRIX", "SPECRESP MATRIX", "EBOUNDS") and extname not in tables:
                    columns = {}
                    for name in hdu.columns.names:
                        values = hdu.data[name]
                        columns[name.upper()] = (
                            _VarLength.from_rows(values, np.float64)
                            if values.dtype == object
                            else np.asarray(values)
                        )
                    tables[extname] = (dict(hdus[0].header) | dict(hdu.header), columns)
    except FileNotFoundError:
        raise ProductError(path, "file not found") from None
    except (OSError, ValueError, TypeError, KeyError, IndexError) as error:
        raise ProductError(path, f"unreadable RMF: {error}") from None
    return tables


def _rmf_tables(path: Path) -> dict[str, tuple[Mapping[str, Any], dict[str, Any]]]:
    try:
        tables = {}
        for header, extname, data, data_start in _fast_tables(path):
            if extname in ("MATRIX", "SPECRESP MATRIX", "EBOUNDS") and extname not in tables:
                tables[extname] = (header, _table_columns(header, data, data_start))
        return tables
    except (_UnsupportedError, KeyError, ValueError, TypeError):
        return _rmf_tables_astropy(path)


def read_rmf(path: str | Path) -> Rmf:
    """Read MATRIX or SPECRESP MATRIX and EBOUNDS; variable-length or fixed group columns."""
    path = Path(path)
    tables = _rmf_tables(path)
    matrix_name = "MATRIX" if "MATRIX" in tables else "SPECRESP MATRIX"
    if matrix_name not in tables:
        raise ProductError(path, "no MATRIX or SPECRESP MATRIX extension")
    if "EBOUNDS" not in tables:
        raise ProductError(path, "no EBOUNDS extension")
    header, rows = tables[matrix_name]
    ebounds = tables["EBOUNDS"][1]
    try:
        lo, hi = _energy_bins(path, rows["ENERG_LO"], rows["ENERG_HI"])
        n_grp = np.asarray(rows["N_GRP"], dtype=np.int64).ravel()
        f_chan = _row_prefixes(path, rows["F_CHAN"], n_grp, "F_CHAN").astype(np.int64)
        n_chan = _row_prefixes(path, rows["N_CHAN"], n_grp, "N_CHAN").astype(np.int64)
        group_row = np.repeat(np.arange(len(n_grp)), n_grp)
        row_lengths = np.bincount(group_row, weights=n_chan, minlength=len(n_grp)).astype(np.int64)
        values = _row_prefixes(path, rows["MATRIX"], row_lengths, "MATRIX").astype(np.float32)
        channel = np.asarray(ebounds["CHANNEL"], dtype=np.int64)
        channel_lo = np.asarray(ebounds["E_MIN"], dtype=np.float64)
        channel_hi = np.asarray(ebounds["E_MAX"], dtype=np.float64)
    except KeyError as error:
        raise ProductError(path, f"RMF lacks column {error}") from None
    f_chan_index = next(
        (i for i in range(1, 1000) if str(header.get(f"TTYPE{i}", "")).upper() == "F_CHAN"), 0
    )
    tlmin = header.get(f"TLMIN{f_chan_index}")
    first_channel = int(tlmin) if tlmin is not None else int(channel[0]) if len(channel) else 1
    detchans = int(header.get("DETCHANS", len(channel)))
    if detchans != len(channel):
        raise ProductError(path, f"DETCHANS = {detchans} but EBOUNDS has {len(channel)} channels")
    first = f_chan - first_channel
    if np.any(first < 0) or np.any(first + n_chan > len(channel)):
        raise ProductError(
            path, f"F_CHAN/N_CHAN outside channels {first_channel}..{first_channel + len(channel) - 1}"
        )
    if not np.all(np.isfinite(values)):
        raise ProductError(path, "NaN in MATRIX")
    keep = n_chan > 0
    row_sum = np.bincount(
        np.repeat(group_row, n_chan), weights=values.astype(np.float64), minlength=len(n_grp)
    )
    hduclas3 = str(header.get("HDUCLAS3", "")).strip().upper()
    return Rmf(
        path=path,
        energy_lo_kev=lo,
        energy_hi_kev=hi,
        channel=channel,
        channel_lo_kev=channel_lo,
        channel_hi_kev=channel_hi,
        group_energy_index=group_row[keep].astype(np.int32),
        group_first_channel=first[keep].astype(np.int32),
        group_n_chan=n_chan[keep].astype(np.int32),
        values=values,
        includes_area=matrix_holds_area(path, hduclas3, float(row_sum.max()) if len(row_sum) else 0.0),
    )


def matrix_holds_area(path: Path, hduclas3: str, max_row_sum: float) -> bool:
    """Whether an RMF's rows carry the effective area (cm^2), from HDUCLAS3 and the row sums.

    OGIP CAL/GEN/92-002: HDUCLAS3 REDIST (redistribution only) and DETECTOR (with detector
    efficiency) hold no area, FULL holds all of it. The extension name says nothing: a SPECRESP MATRIX
    may be DETECTOR. Where HDUCLAS3 is absent or another word, the row sums decide; where it contradicts
    the row sums the matrix is refused rather than guessed at.
    """
    by_sums = max_row_sum > AREA_ROW_SUM_MIN
    by_header = _AREA_HDUCLAS3.get(hduclas3)
    if by_header is None or by_header == by_sums:
        return by_sums
    held = "holds an effective area" if by_header else "holds no effective area"
    raise ProductError(
        path,
        f"HDUCLAS3 = {hduclas3} says the matrix {held}, but its largest row sum is {max_row_sum:.4g}: "
        "the header contradicts the matrix",
    )


def check_pn_imaging(pha: Pha) -> None:
    """Refuse a spectrum that is not EPIC-pn imaging-mode data (INSTRUME, DATAMODE, SUBMODE).

    The pipeline's grid, canned responses and background model are those of pn imaging modes; a MOS
    or RGS spectrum, or pn timing/burst data, would be binned and compared as if it were one. Pipeline
    and SAS spectra carry all three keywords; one that is absent (hand-made or simulated files) is not
    held against the spectrum, one that names anything else is.
    """
    keywords = pha.keywords
    instrument = str(keywords.get("INSTRUME", "") or "").strip()
    if instrument and instrument.upper() != PN_INSTRUMENT:
        raise ProductError(pha.path, f"INSTRUME = {instrument}: not an EPIC-pn spectrum ({PN_INSTRUMENT})")
    datamode = str(keywords.get("DATAMODE", "") or "").strip()
    if datamode and datamode.upper() != PN_IMAGING_DATAMODE:
        raise ProductError(pha.path, f"DATAMODE = {datamode}: only pn {PN_IMAGING_DATAMODE} data are used")
    submode = str(keywords.get("SUBMODE", "") or "").strip()
    if submode and submode.lower() not in {mode.lower() for mode in PN_IMAGING_SUBMODES}:
        raise ProductError(
            pha.path, f"SUBMODE = {submode}: not a pn imaging mode ({', '.join(PN_IMAGING_SUBMODES)})"
        )
