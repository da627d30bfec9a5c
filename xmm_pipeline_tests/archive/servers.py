"""Real HTTP servers on 127.0.0.1 that speak the XSA's protocols, for the real-archive tests.

- `TapServer`: TAP sync and async (UWS jobs) answering a subset of ADQL with VOTables, including
  TAP_SCHEMA.tables/columns, over a catalogue in 4XMM (per-detection) or 5XMM (stacked) flavour.
- `AioServer`: the AIO servlet over an archive folder (tars per observation, single products),
  and the calibration site's canned RMFs under /rmf/: `Version.txt` holds the served version suffix
  and matrices are served only under `<stem><version>.rmf`, as the real site does; fault injection
  per observation or RMF name (including 'no-results': 200 with the servlet's short text body).

Both are stdlib `http.server` instances in a daemon thread on an ephemeral port; `close()` (or the
context manager) shuts them down. Every request is logged so tests can count what a client did.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import re
import socket
import struct
import tarfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.io.votable import from_table
from astropy.io.votable.tree import Info
from astropy.table import MaskedColumn, Table

from xmm_pipeline.archive.products import PN_SPECTRAL_PRODUCT

# --- a small ADQL engine over pandas -------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<number>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)|(?P<string>'(?:[^']|'')*')"
    r"|(?P<op><=|>=|<>|!=|=|<|>|\(|\)|,|\*)|(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?))"
)
KEYWORDS = {"SELECT", "TOP", "FROM", "WHERE", "AND", "OR", "NOT", "IS", "NULL", "IN", "ORDER", "BY",
            "ASC", "DESC", "OFFSET", "AS", "COUNT", "MAX", "MIN"}


class AdqlError(ValueError):
    """A query outside the supported subset, or naming an unknown table or column."""


def _tokenize(text: str) -> list[tuple[str, Any]]:
    tokens: list[tuple[str, Any]] = []
    position = 0
    text = text.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            raise AdqlError(f"cannot parse ADQL near {text[position:position + 20]!r}")
        position = match.end()
        if match["number"] is not None:
            value = match["number"]
            tokens.append(("lit", float(value) if any(c in value for c in ".eE") else int(value)))
        elif match["string"] is not None:
            tokens.append(("lit", match["string"][1:-1].replace("''", "'")))
        elif match["op"] is not None:
            tokens.append(("op", match["op"]))
        elif match["name"].upper() in KEYWORDS:
            tokens.append(("kw", match["name"].upper()))
        else:
            tokens.append(("name", match["name"]))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self, kind: str | None = None, value: Any = None) -> bool:
        if self.i >= len(self.tokens):
            return False
        token_kind, token_value = self.tokens[self.i]
        return (kind is None or token_kind == kind) and (value is None or token_value == value)

    def take(self, kind: str | None = None, value: Any = None) -> Any:
        if not self.peek(kind, value):
            found = self.tokens[self.i] if self.i < len(self.tokens) else "end of query"
            raise AdqlError(f"expected {value or kind}, found {found}")
        self.i += 1
        return self.tokens[self.i - 1][1]

    def query(self) -> dict[str, Any]:
        self.take("kw", "SELECT")
        top = None
        if self.peek("kw", "TOP"):
            self.take()
            top = int(self.take("lit"))
        items = [self.item()]
        while self.peek("op", ","):
            self.take()
            items.append(self.item())
        self.take("kw", "FROM")
        table = self.take("name")
        where = None
        if self.peek("kw", "WHERE"):
            self.take()
            where = self.condition()
        order: list[tuple[str, bool]] = []
        if self.peek("kw", "ORDER"):
            self.take()
            self.take("kw", "BY")
            while True:
                name = self.take("name")
                descending = False
                if self.peek("kw", "ASC") or self.peek("kw", "DESC"):
                    descending = self.take() == "DESC"
                order.append((name, descending))
                if not self.peek("op", ","):
                    break
                self.take()
        offset = 0
        if self.peek("kw", "OFFSET"):
            self.take()
            offset = int(self.take("lit"))
        if self.i != len(self.tokens):
            raise AdqlError(f"unexpected {self.tokens[self.i]}")
        return {"top": top, "items": items, "table": table, "where": where, "order": order, "offset": offset}

    def item(self) -> tuple[str, str | None, str]:
        if self.peek("op", "*"):
            self.take()
            return ("star", None, "*")
        if self.peek("kw", "COUNT") or self.peek("kw", "MAX") or self.peek("kw", "MIN"):
            function = self.take()
            self.take("op", "(")
            argument = self.take("op", "*") if function == "COUNT" else self.take("name")
            self.take("op", ")")
            alias = self.alias() or function.lower()
            return (function.lower(), argument, alias)
        name = self.take("name")
        return ("column", name, self.alias() or name)

    def alias(self) -> str | None:
        if self.peek("kw", "AS"):
            self.take()
            return self.take("name")
        return None

    def condition(self) -> tuple:
        left = self.conjunction()
        while self.peek("kw", "OR"):
            self.take()
            left = ("or", left, self.conjunction())
        return left

    def conjunction(self) -> tuple:
        left = self.negation()
        while self.peek("kw", "AND"):
            self.take()
            left = ("and", left, self.negation())
        return left

    def negation(self) -> tuple:
        if self.peek("kw", "NOT"):
            self.take()
            return ("not", self.negation())
        if self.peek("op", "("):
            self.take()
            inner = self.condition()
            self.take("op", ")")
            return inner
        name = self.take("name")
        if self.peek("kw", "IS"):
            self.take()
            negated = bool(self.peek("kw", "NOT")) and bool(self.take())
            self.take("kw", "NULL")
            return ("notnull" if negated else "null", name)
        if self.peek("kw", "IN"):
            self.take()
            self.take("op", "(")
            values = [self.take("lit")]
            while self.peek("op", ","):
                self.take()
                values.append(self.take("lit"))
            self.take("op", ")")
            return ("in", name, values)
        operator = self.take("op")
        if operator not in ("=", "<>", "!=", "<", ">", "<=", ">="):
            raise AdqlError(f"unsupported operator {operator}")
        return ("cmp", name, operator, self.take("lit"))


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    lookup = {c.lower(): c for c in frame.columns}
    key = name.split(".")[-1].lower()
    if key not in lookup:
        raise AdqlError(f"unknown column {name}")
    return frame[lookup[key]]


def _evaluate(frame: pd.DataFrame, node: tuple) -> np.ndarray:
    kind = node[0]
    if kind == "or":
        return _evaluate(frame, node[1]) | _evaluate(frame, node[2])
    if kind == "and":
        return _evaluate(frame, node[1]) & _evaluate(frame, node[2])
    if kind == "not":
        return ~_evaluate(frame, node[1])
    column = _column(frame, node[1])
    present = column.notna().to_numpy()
    if kind == "null":
        return ~present
    if kind == "notnull":
        return present
    if kind == "in":
        values = set(node[2]) | {str(v) for v in node[2]}
        return present & column.isin(values).to_numpy()
    operator, literal = node[2], node[3]
    values = column if not isinstance(literal, str) else column.astype(str)
    with np.errstate(invalid="ignore"):
        result = {
            "=": lambda: values == literal, "<>": lambda: values != literal, "!=": lambda: values != literal,
            "<": lambda: values < literal, ">": lambda: values > literal,
            "<=": lambda: values <= literal, ">=": lambda: values >= literal,
        }[operator]()
    return present & np.asarray(result.fillna(False) if hasattr(result, "fillna") else result, dtype=bool)


def run_adql(query: str, tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Answer one query of the supported subset (SELECT [TOP] cols|COUNT(*)|MAX|MIN FROM t [WHERE]
    [ORDER BY] [OFFSET]) over the named tables (names case-insensitive)."""
    parsed = _Parser(query).query()
    lookup = {name.lower(): frame for name, frame in tables.items()}
    if parsed["table"].lower() not in lookup:
        raise AdqlError(f"unknown table {parsed['table']}")
    frame = lookup[parsed["table"].lower()]
    if parsed["where"] is not None:
        frame = frame[_evaluate(frame, parsed["where"])]
    aggregates = [item for item in parsed["items"] if item[0] in ("count", "max", "min")]
    if aggregates:
        row = {}
        for function, argument, alias in aggregates:
            if function == "count":
                row[alias] = len(frame)
            else:
                values = pd.to_numeric(_column(frame, argument), errors="coerce")
                row[alias] = values.max() if function == "max" else values.min()
        return pd.DataFrame([row])
    if parsed["order"]:
        names = [_column(frame, name).name for name, _ in parsed["order"]]
        ascending = [not descending for _, descending in parsed["order"]]
        frame = frame.sort_values(names, ascending=ascending, kind="stable", na_position="first")
    frame = frame.iloc[parsed["offset"]:]
    if parsed["top"] is not None:
        frame = frame.iloc[: parsed["top"]]
    columns: list[str] = []
    for kind, name, _ in parsed["items"]:
        columns.extend(list(frame.columns) if kind == "star" else [_column(frame, name).name])
    return frame[columns].reset_index(drop=True)


def votable_bytes(frame: pd.DataFrame, overflow: bool = False) -> bytes:
    """A DataFrame as a TAP result VOTable; None/NaN in string and integer columns become nulls.
    `overflow` adds QUERY_STATUS=OVERFLOW, as a service does when it cut the result at its limit."""
    table = Table()
    for name in frame.columns:
        series = frame[name]
        mask = series.isna().to_numpy()
        if pd.api.types.is_bool_dtype(series) or pd.api.types.is_integer_dtype(series):
            data = series.fillna(0).astype("int64").to_numpy()
        elif pd.api.types.is_float_dtype(series):
            data = series.to_numpy(dtype="float64")
        elif len(series.dropna()) and series.dropna().map(lambda v: isinstance(v, int | np.integer)).all():
            data = series.fillna(0).astype("int64").to_numpy()
        elif len(series.dropna()) and series.dropna().map(lambda v: isinstance(v, float | np.floating)).all():
            data = series.astype("float64").to_numpy()
        else:
            data = np.array(["" if m else str(v) for v, m in zip(series, mask)], dtype=str)
        table[name] = MaskedColumn(data, mask=mask) if mask.any() else data
    votable = from_table(table)
    resource = votable.resources[0]
    resource.type = "results"
    resource.infos.append(Info(name="QUERY_STATUS", value="OVERFLOW" if overflow else "OK"))
    buffer = io.BytesIO()
    votable.to_xml(buffer)
    return buffer.getvalue()


def error_votable(message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<VOTABLE version="1.3" '
        'xmlns="http://www.ivoa.net/xml/VOTable/v1.3"><RESOURCE type="results">'
        f'<INFO name="QUERY_STATUS" value="ERROR">{escape(message)}</INFO></RESOURCE></VOTABLE>'
    ).encode()


# --- the servers ----------------------------------------------------------------------------------


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up (timeouts, injected resets) are part of the tests, not errors."""


class LoopbackServer:
    """A ThreadingHTTPServer on 127.0.0.1 (ephemeral port) in a daemon thread, with a request log."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.log: list[tuple[str, str]] = []
        self._log_lock = threading.Lock()
        handler_class = type(handler.__name__, (handler,), {"app": self})
        self.httpd = _QuietServer(("127.0.0.1", 0), handler_class)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def record(self, method: str, path: str) -> None:
        with self._log_lock:
            self.log.append((method, path))

    def count(self, predicate: Callable[[str, str], bool] = lambda m, p: True) -> int:
        with self._log_lock:
            return sum(1 for method, path in self.log if predicate(method, path))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    app: Any
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def params(self) -> dict[str, str]:
        query = urlsplit(self.path).query
        body = b""
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            body = self.rfile.read(length)
        merged = parse_qs(query, keep_blank_values=True)
        merged.update(parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True))
        return {k.upper(): v[-1] for k, v in merged.items()}

    def send(self, status: int, body: bytes = b"", content_type: str = "text/plain",
             headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def reset_connection(self) -> None:
        """Drop the TCP connection with an RST, the way a failing proxy does."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().finish()


@dataclass
class TapCatalogue:
    """What the TAP server serves: one catalogue table, its description, and any extra tables."""

    table_name: str
    frame: pd.DataFrame
    description: str = ""
    # xsa.v_all_observations rows (observation_id, proprietary_end_date); None: the table is absent
    observations: pd.DataFrame | None = None


@dataclass
class _Job:
    query: str
    phase: str = "PENDING"
    result: bytes = b""
    error: str = ""


class _TapHandler(_Handler):
    def do_GET(self) -> None:
        self.handle_tap()

    def do_POST(self) -> None:
        self.handle_tap()

    def do_DELETE(self) -> None:
        path = urlsplit(self.path).path
        self.app.record("DELETE", path)
        self.app.jobs.pop(path.rstrip("/").split("/")[-1], None)
        self.send(303, headers={"Location": f"{self.app.url}/tap/async"})

    def handle_tap(self) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        self.app.record(self.command, self.path)
        params = self.params()
        if path == "/tap/sync":
            status, body = self.app.execute(params.get("QUERY", ""), params.get("MAXREC"))
            self.send(status, body, "application/x-votable+xml")
            return
        if path == "/tap/async" and self.command == "POST":
            job_id = uuid.uuid4().hex[:12]
            self.app.jobs[job_id] = _Job(params.get("QUERY", ""))
            if params.get("PHASE", "").upper() == "RUN":
                self.app.run_job(job_id, params.get("MAXREC"))
            self.send(303, headers={"Location": f"{self.app.url}/tap/async/{job_id}"})
            return
        match = re.fullmatch(r"/tap/async/(\w+)(/phase|/results/result)?", path)
        job = self.app.jobs.get(match.group(1)) if match else None
        if job is None:
            self.send(404, b"no such job")
            return
        suffix = match.group(2)
        if suffix == "/phase" and self.command == "POST":
            if params.get("PHASE", "").upper() == "RUN":
                self.app.run_job(match.group(1), params.get("MAXREC"))
            self.send(303, headers={"Location": f"{self.app.url}/tap/async/{match.group(1)}"})
        elif suffix == "/phase":
            self.send(200, job.phase.encode())
        elif suffix == "/results/result":
            self.send(200, job.result, "application/x-votable+xml")
        else:
            self.send(200, self.app.job_xml(match.group(1)), "text/xml")


class TapServer(LoopbackServer):
    """TAP on /tap (sync, async) over `catalogue`; swap `catalogue` to simulate a new release.
    `max_rows` is the service's row limit on catalogue queries: longer results are cut and flagged
    OVERFLOW (TAP_SCHEMA answers stay whole)."""

    def __init__(self, catalogue: TapCatalogue, max_rows: int = 10**9) -> None:
        self.catalogue = catalogue
        self.max_rows = max_rows
        self.jobs: dict[str, _Job] = {}
        super().__init__(_TapHandler)
        self.tap_url = f"{self.url}/tap"

    def tables(self) -> dict[str, pd.DataFrame]:
        frame = self.catalogue.frame
        schema_name, _, _ = self.catalogue.table_name.rpartition(".")
        tap_tables = pd.DataFrame({
            "schema_name": [schema_name or "public"], "table_name": [self.catalogue.table_name],
            "table_type": ["table"], "description": [self.catalogue.description],
        })
        tap_columns = pd.DataFrame({
            "table_name": [self.catalogue.table_name] * len(frame.columns),
            "column_name": [str(c) for c in frame.columns],
            "datatype": [str(frame[c].dtype) for c in frame.columns],
        })
        tables = {self.catalogue.table_name: frame, "TAP_SCHEMA.tables": tap_tables,
                  "TAP_SCHEMA.columns": tap_columns}
        if self.catalogue.observations is not None:
            tables["xsa.v_all_observations"] = self.catalogue.observations
        return tables

    def execute(self, query: str, maxrec: str | None) -> tuple[int, bytes]:
        try:
            result = run_adql(query, self.tables())
        except AdqlError as error:
            return 400, error_votable(str(error))
        except Exception as error:
            return 500, error_votable(f"internal error: {error!r}")
        on_catalogue = "tap_schema." not in query.lower()
        limit = self.max_rows if on_catalogue else len(result)
        limit = min(int(maxrec), limit) if maxrec not in (None, "") else limit
        return 200, votable_bytes(result.iloc[:limit], overflow=len(result) > limit)

    def run_job(self, job_id: str, maxrec: str | None) -> None:
        job = self.jobs[job_id]
        status, body = self.execute(job.query, maxrec)
        job.phase, job.result = ("COMPLETED", body) if status == 200 else ("ERROR", b"")
        job.error = "" if status == 200 else body.decode()

    def job_xml(self, job_id: str) -> bytes:
        job = self.jobs[job_id]
        now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        results = (f'<uws:results><uws:result id="result" xlink:type="simple" '
                   f'xlink:href="{self.url}/tap/async/{job_id}/results/result"/></uws:results>'
                   if job.phase == "COMPLETED" else "<uws:results/>")
        error = (f'<uws:errorSummary type="fatal" hasDetail="false"><uws:message>{escape(job.error)}'
                 "</uws:message></uws:errorSummary>" if job.phase == "ERROR" else "")
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<uws:job xmlns:uws="http://www.ivoa.net/xml/UWS/v1.0" '
            'xmlns:xlink="http://www.w3.org/1999/xlink" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" version="1.1">'
            f"<uws:jobId>{job_id}</uws:jobId><uws:runId/><uws:ownerId xsi:nil=\"true\"/>"
            f"<uws:phase>{job.phase}</uws:phase><uws:quote xsi:nil=\"true\"/>"
            f"<uws:creationTime>{now}</uws:creationTime><uws:startTime>{now}</uws:startTime>"
            f"<uws:endTime>{now}</uws:endTime><uws:executionDuration>0</uws:executionDuration>"
            f"<uws:destruction>{now}</uws:destruction><uws:parameters>"
            f'<uws:parameter id="query">{escape(job.query)}</uws:parameter></uws:parameters>'
            f"{results}{error}</uws:job>"
        ).encode()


FAULTS = ("500", "500-once", "429-once", "slow", "slow-once", "reset", "reset-once", "truncated-gzip",
          "corrupt-fits", "401", "404", "unsafe-tar", "trickle", "no-results")
# What the AIO servlet answers (HTTP 200, text/plain) for a request that matches nothing.
NO_RESULTS_BODY = b"No results found for the given parameters\n"


@dataclass
class AioFaults:
    """Faults by observation id (or RMF file name). `slow_s`: delay of a slow answer; `trickle_s`:
    pause between 4 KiB chunks of a 'trickle' answer (for killing a client mid-transfer)."""

    by_key: dict[str, str] = field(default_factory=dict)
    slow_s: float = 2.0
    trickle_s: float = 0.02
    served: Counter = field(default_factory=Counter)


class _AioHandler(_Handler):
    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        self.app.record("GET", self.path)
        if parts.path.startswith("/rmf/"):
            name = parts.path[len("/rmf/"):]
            self.serve(name, lambda: self.app.rmf_body(name), "application/fits", name)
            return
        if parts.path != "/aio":
            self.send(404, b"unknown endpoint")
            return
        params = {k.lower(): v[-1] for k, v in parse_qs(parts.query).items()}
        obs_id = params.get("obsno", "")
        valid = params.get("level") == "PPS" and params.get("instname") == "PN"
        if not valid or not re.fullmatch(r"\d{10}", obs_id):
            self.send(400, b"obsno, level=PPS and instname=PN are required")
            return
        if "name" in params:
            body = lambda: self.app.product_body(obs_id, params["name"], params.get("sourceno", ""))  # noqa: E731
            self.serve(obs_id, body, "application/octet-stream", None)
        else:
            self.serve(obs_id, lambda: self.app.tar_body(obs_id), "application/x-tar", f"{obs_id}.tar")

    def serve(self, key: str, make_body: Callable[[], tuple[bytes, str] | bytes | None],
              content_type: str, filename: str | None) -> None:
        faults: AioFaults = self.app.faults
        fault = faults.by_key.get(key, "")
        faults.served[key] += 1
        first = faults.served[key] == 1
        if fault == "401":
            self.send(401, b"proprietary")
            return
        if fault == "404":
            self.send(404, b"not found")
            return
        if fault == "500" or (fault == "500-once" and first):
            self.send(500, b"internal error")
            return
        if fault == "429-once" and first:
            self.send(429, b"slow down", headers={"Retry-After": "1"})
            return
        if fault == "reset" or (fault == "reset-once" and first):
            self.reset_connection()
            return
        if fault == "slow" or (fault == "slow-once" and first):
            time.sleep(faults.slow_s)
        if fault == "no-results":
            self.send(200, NO_RESULTS_BODY, "text/plain;charset=UTF-8")
            return
        made = make_body()
        if made is None:
            self.send(404, b"no such product")
            return
        body, name = made if isinstance(made, tuple) else (made, filename)
        headers = {"Content-Disposition": f'attachment; filename="{name}"'} if name else {}
        if fault == "trickle":
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for start in range(0, len(body), 4096):
                self.wfile.write(body[start:start + 4096])
                self.wfile.flush()
                time.sleep(faults.trickle_s)
            return
        self.send(200, body, content_type, headers)


class AioServer(LoopbackServer):
    """The AIO servlet on /aio over `archive_root`, canned RMFs on /rmf/<name>, with `faults`."""

    def __init__(
        self, archive_root: Path, faults: AioFaults | None = None, rmf_version: str = "_v21.0"
    ) -> None:
        self.archive_root = Path(archive_root)
        self.faults = faults or AioFaults()
        self.rmf_version = rmf_version
        super().__init__(_AioHandler)
        self.aio_url = f"{self.url}/aio"
        self.rmf_url = f"{self.url}/rmf/"

    def _products(self, obs_id: str) -> list[Path]:
        return sorted((self.archive_root / obs_id / "pps").glob("P*.FTZ"))

    def _member_bytes(self, obs_id: str, path: Path, index: int) -> bytes:
        data = path.read_bytes()
        fault = self.faults.by_key.get(obs_id, "")
        if index == 0 and fault == "truncated-gzip":
            return data[: len(data) // 2]
        if index == 0 and fault == "corrupt-fits":
            return gzip.compress(b"SIMPLE  = this is not a FITS file" + b"\0" * 3000, mtime=0)
        return data

    def tar_body(self, obs_id: str) -> bytes | None:
        products = self._products(obs_id)
        if not products:
            return None
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for index, path in enumerate(products):
                _add_member(tar, f"{obs_id}/pps/{path.name}", self._member_bytes(obs_id, path, index))
            if self.faults.by_key.get(obs_id) == "unsafe-tar":
                _add_member(tar, "../escaped.FTZ", b"outside")
                _add_member(tar, "/tmp/absolute.FTZ", b"outside")
        return buffer.getvalue()

    def product_body(self, obs_id: str, kind: str, sourceno: str) -> tuple[bytes, str] | None:
        products = self._products(obs_id)
        for index, path in enumerate(products):
            match = PN_SPECTRAL_PRODUCT.match(path.name)
            if match and match["kind"] == kind and match["src_hex"] == sourceno.upper():
                return self._member_bytes(obs_id, path, index), path.name
        return None

    def rmf_body(self, name: str) -> bytes | None:
        """Version.txt, or the matrix `<stem><rmf_version>.rmf` (any other version: None, a 404),
        read from the archive folder under its bare or any versioned name."""
        if name == "Version.txt":
            return f"{self.rmf_version}\n".encode()
        if not name.endswith(f"{self.rmf_version}.rmf"):
            return None
        stem = name[: -len(f"{self.rmf_version}.rmf")]
        folder = self.archive_root / "responses" / "PN"
        for path in [folder / f"{stem}.rmf", *sorted(folder.glob(f"{stem}_v*.rmf"))]:
            if path.is_file():
                data = path.read_bytes()
                if self.faults.by_key.get(name) == "corrupt-fits":
                    return data[: len(data) // 3]
                return data
        return None


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


# --- catalogue flavours and a small archive -------------------------------------------------------


def as_4xmm_table(canonical: pd.DataFrame) -> pd.DataFrame:
    """The per-detection 4XMM flavour of a canonical table (the TAP services' lower-case names)."""
    return canonical.drop(columns=["release"]).reset_index(drop=True)


def as_5xmm_table(canonical: pd.DataFrame, upper_limit_every: int = 3) -> pd.DataFrame:
    """The stacked 5XMM flavour: per source a summary row (N_OBS > 0, no OBS_ID/PPS_SRCNUM), its
    detection rows (PPS_SRCNUM = SRC_NUM, source-level IAUNAME and SUM_FLAG null, as the adapter must
    fill them), and for every `upper_limit_every`-th source an upper-limit row (null PPS_SRCNUM)."""
    rows: list[dict[str, Any]] = []
    obs_ids = sorted(canonical["obs_id"].unique())
    for index, (srcid, group) in enumerate(canonical.groupby("srcid", sort=True)):
        first = group.iloc[0]
        iauname = "5XMM " + str(first["iauname"]).split(" ", 1)[-1]
        n_upper = 1 if index % upper_limit_every == 0 else 0
        summary = {c: None for c in group.columns if c != "release"}
        summary.update(srcid=srcid, iauname=iauname, n_obs=len(group) + n_upper, ra=first["sc_ra"],
                       dec=first["sc_dec"], sum_flag=int(group["sum_flag"].max()),
                       ep_extent=float(first["ep_extent"]), pps_srcnum=None, obs_id=None)
        rows.append(summary)
        for detection in group.itertuples(index=False):
            row = {c: getattr(detection, c) for c in group.columns if c != "release"}
            row.update(pps_srcnum=int(detection.src_num), n_obs=None, iauname=None, sum_flag=None,
                       ra=first["sc_ra"], dec=first["sc_dec"])
            rows.append(row)
        if n_upper:
            other = next((o for o in obs_ids if o not in set(group["obs_id"])), obs_ids[0])
            limit = {c: None for c in group.columns if c != "release"}
            limit.update(srcid=srcid, obs_id=other, pps_srcnum=None, n_obs=None, ra=first["sc_ra"],
                         dec=first["sc_dec"], pn_8_cts=3.0, mjd_start=float(first["mjd_start"]),
                         mjd_stop=float(first["mjd_stop"]))
            rows.append(limit)
    frame = pd.DataFrame(rows).drop(columns=["detid", "src_num", "sc_ra", "sc_dec", "n_detections"])
    for name in ("pps_srcnum", "n_obs", "sum_flag"):
        frame[name] = pd.array(frame[name], dtype="Int64")
    return frame


# 5XMM-DR15 column names that differ from the 4XMM ones (BRIEF section 3; the stacked catalogue's
# user guide): the table as XSA's v_epic_source_cat may now serve it.
FIVEXMM_RENAMED = {"mjd_start": "mjd_first", "mjd_stop": "mjd_last", "ep_8_flux": "ep_flux",
                   "ep_extent": "extent"}


def as_5xmm_named_table(canonical: pd.DataFrame, upper_limit_every: int = 3) -> pd.DataFrame:
    """The stacked flavour under the 5XMM-DR15 names (mjd_first, mjd_last, ep_flux, extent, n_obs,
    pps_srcnum; no detid, src_num)."""
    return as_5xmm_table(canonical, upper_limit_every).rename(columns=FIVEXMM_RENAMED)


def as_heasarc_table(canonical: pd.DataFrame, stacked: bool = False) -> pd.DataFrame:
    """HEASARC's copies: xmmssc (4XMM) or xmmstack (5XMM), the observation served as `obsid` and the
    IAU name as `name`."""
    table = as_5xmm_named_table(canonical) if stacked else as_4xmm_table(canonical)
    return table.rename(columns={"obs_id": "obsid", "iauname": "name"})


def write_test_archive(root: Path, n_obs: int = 4, sources_per_obs: int = 3, seed: int = 0,
                       release: str = "DR14", first_obs: int = 100000101) -> pd.DataFrame:
    """A small archive in the shared layout (catalogue.parquet, products, canned RMFs), for tests that
    need precise control; the session's simulated archive serves the end-to-end ones."""
    from xmm_pipeline.archive.catalogue import as_canonical

    rng = np.random.default_rng(seed)
    rmfs = ["epn_e3_ff20_sdY9.rmf", "epn_e3_ff20_sdY6.rmf"]
    rows = []
    for o in range(n_obs):
        obs_id = f"{first_obs + o * 100:010d}"
        mjd = 52000.0 + 100 * o
        for s in range(1, sources_per_obs + 1):
            src_num = s * 7
            srcid = 200000000 + (o * sources_per_obs + s) % (n_obs * sources_per_obs - 1)
            rows.append({
                "detid": 100000000 + o * 1000 + s, "srcid": srcid,
                "iauname": f"4XMM J{12 + o:02d}{s:02d}00.0+01{s:02d}00", "obs_id": obs_id, "src_num": src_num,
                "ra": 180.0 + o + s / 100, "dec": 1.0 + s / 100, "sc_ra": 180.0 + o + s / 100,
                "sc_dec": 1.0 + s / 100, "mjd_start": mjd, "mjd_stop": mjd + 0.4, "pn_filter": "Thin1",
                "pn_submode": "PrimeFullWindow", "pn_ontime": 20000.0,
                "pn_8_cts": float(rng.integers(200, 5000)),
                "pn_8_cts_err": 30.0, "ep_8_flux": 1e-13, **{f"ep_hr{i}": 0.1 * i for i in range(1, 5)},
                **{f"ep_hr{i}_err": 0.05 for i in range(1, 5)}, "ep_extent": 0.0, "sum_flag": 0,
                "n_detections": 1, "release": release,
            })
            pps = root / obs_id / "pps"
            pps.mkdir(parents=True, exist_ok=True)
            stem = f"P{obs_id}PNS003"
            rmf = rmfs[(o + s) % 2]
            counts = rng.poisson(0.5, 4096).astype("int32")
            _write_gz(pps / f"{stem}SRSPEC0{src_num:03X}.FTZ", _spectrum_hdu(counts, {
                "RESPFILE": rmf, "ANCRFILE": f"{stem}SRCARF0{src_num:03X}.FTZ",
                "BACKFILE": f"{stem}BGSPEC0{src_num:03X}.FTZ", "EXPOSURE": 20000.0, "BACKSCAL": 1.0}))
            background = rng.poisson(2.0, 4096).astype("int32")
            _write_gz(pps / f"{stem}BGSPEC0{src_num:03X}.FTZ",
                      _spectrum_hdu(background, {"EXPOSURE": 20000.0, "BACKSCAL": 8.0}))
            energies = np.linspace(0.1, 12.0, 200)
            arf = fits.BinTableHDU.from_columns([
                fits.Column("ENERG_LO", "E", array=energies[:-1]),
                fits.Column("ENERG_HI", "E", array=energies[1:]),
                fits.Column("SPECRESP", "E", array=np.full(199, 900.0)),
            ], name="SPECRESP")
            _write_gz(pps / f"{stem}SRCARF0{src_num:03X}.FTZ", arf)
    responses = root / "responses" / "PN"
    responses.mkdir(parents=True, exist_ok=True)
    for name in rmfs:
        matrix = fits.BinTableHDU.from_columns([
            fits.Column("ENERG_LO", "E", array=[0.1, 0.2]), fits.Column("ENERG_HI", "E", array=[0.2, 0.3]),
            fits.Column("N_GRP", "J", array=[1, 1]),
            fits.Column("MATRIX", "2E", array=[[0.5, 0.5], [0.2, 0.8]]),
        ], name="MATRIX")
        ebounds = fits.BinTableHDU.from_columns([
            fits.Column("CHANNEL", "J", array=[0, 1]), fits.Column("E_MIN", "E", array=[0.1, 0.2]),
            fits.Column("E_MAX", "E", array=[0.2, 0.3]),
        ], name="EBOUNDS")
        fits.HDUList([fits.PrimaryHDU(), matrix, ebounds]).writeto(responses / name, overwrite=True)
    canonical = as_canonical(pd.DataFrame(rows))
    canonical["n_detections"] = canonical.groupby("srcid")["srcid"].transform("size").astype("int32")
    canonical.to_parquet(root / "catalogue.parquet", index=False)
    return canonical


def _spectrum_hdu(counts: np.ndarray, keywords: dict[str, Any]) -> fits.BinTableHDU:
    hdu = fits.BinTableHDU.from_columns([
        fits.Column("CHANNEL", "J", array=np.arange(len(counts))), fits.Column("COUNTS", "J", array=counts),
    ], name="SPECTRUM")
    for key, value in keywords.items():
        hdu.header[key] = value
    return hdu


def _write_gz(path: Path, hdu: fits.BinTableHDU) -> None:
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buffer)
    path.write_bytes(gzip.compress(buffer.getvalue(), mtime=0))
