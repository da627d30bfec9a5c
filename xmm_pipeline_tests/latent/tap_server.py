"""A SIMBAD-like TAP service on 127.0.0.1 for the cross-match tests.

A real HTTP server (stdlib, one thread) answering the TAP sync protocol: POST <base>/sync with
REQUEST=doQuery, LANG=ADQL, QUERY, MAXREC and UPLOAD=<name>,param:<name> with the table as a
multipart VOTable part. It understands the one ADQL shape the client sends (an uploaded table joined
with `basic` on a cone, parsed strictly: anything else is answered with a TAP error VOTable and HTTP
400) and evaluates it against an in-memory object table. Bounded: it answers at most
`max_requests`, can fail the first `fail_first` requests with 503 (to exercise retries), can
pretend `basic` does not exist (`known_tables`, a permanently rejected query), and stops
itself after `lifetime_s` even if a test forgets to.
"""

from __future__ import annotations

import io
import re
import threading
from email.parser import BytesParser
from email.policy import default as default_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import numpy as np
import pandas as pd
from astropy.io import votable
from astropy.io.votable.tree import Info
from astropy.table import Table

from xmm_pipeline.latent.crossmatch import angular_separation_arcsec

VOTABLE = "application/x-votable+xml"
_QUERY = re.compile(
    r"^SELECT u\.detid, b\.main_id, b\.otype, b\.ra AS simbad_ra, b\.dec AS simbad_dec "
    r"FROM TAP_UPLOAD\.(?P<table>[A-Za-z_]\w*) AS u JOIN basic AS b "
    r"ON 1 = CONTAINS\(POINT\('ICRS', b\.ra, b\.dec\), CIRCLE\('ICRS', u\.ra, u\.dec, "
    r"(?P<radius>[0-9.]+(?:[eE][-+]?[0-9]+)?)\)\)$"
)


def _votable_bytes(table: Table | None, status: str, message: str = "") -> bytes:
    document = votable.from_table(table if table is not None else Table({"x": np.zeros(0)}))
    resource = document.resources[0]
    resource.type = "results"
    info = Info(name="QUERY_STATUS", value=status)
    info.content = message or None
    resource.infos.append(info)
    if table is None:
        resource.tables.clear()
    buffer = io.BytesIO()
    document.to_xml(buffer)
    return buffer.getvalue()


class SimbadTapServer:
    def __init__(self, objects: pd.DataFrame, max_requests: int = 50, fail_first: int = 0,
                 lifetime_s: float = 60.0, known_tables: tuple[str, ...] = ("basic",)) -> None:
        self.objects = objects.reset_index(drop=True)
        self.max_requests = max_requests
        self.fail_first = fail_first
        self.lifetime_s = lifetime_s
        self.known_tables = known_tables
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._timer = threading.Timer(lifetime_s, self._server.shutdown)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/simbad/sim-tap"

    def __enter__(self) -> SimbadTapServer:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def answer(self, params: dict[str, str], uploads: dict[str, bytes]) -> tuple[int, bytes, str]:
        """(HTTP status, body, content type) for one sync request."""
        with self._lock:
            self.requests.append({"params": params, "upload_rows": None})
            record = self.requests[-1]
            n_seen = len(self.requests)
        if n_seen > self.max_requests:
            return 503, b"request budget of the test server spent", "text/plain"
        if n_seen <= self.fail_first:
            return 503, b"service temporarily unavailable (injected)", "text/plain"
        if params.get("REQUEST") != "doQuery" or params.get("LANG", "").upper() != "ADQL":
            return 400, _votable_bytes(None, "ERROR", "REQUEST=doQuery and LANG=ADQL required"), VOTABLE
        match = _QUERY.match(params.get("QUERY", "").strip())
        if not match:
            return 400, _votable_bytes(None, "ERROR", "query not understood by the test server"), VOTABLE
        if "basic" not in self.known_tables:
            return 400, _votable_bytes(None, "ERROR", "table basic does not exist"), VOTABLE
        name = match["table"]
        upload_spec = {u.split(",")[0].strip(): u.split(",")[1].strip() for u in
                       params.get("UPLOAD", "").split(";") if "," in u}
        if upload_spec.get(name) != f"param:{name}" or name not in uploads:
            return 400, _votable_bytes(None, "ERROR", f"TAP_UPLOAD.{name} was not uploaded"), VOTABLE
        positions = votable.parse_single_table(io.BytesIO(uploads[name])).to_table().to_pandas()
        record["upload_rows"] = len(positions)
        radius_arcsec = float(match["radius"]) * 3600.0
        rows = []
        for detid, ra, dec in positions[["detid", "ra", "dec"]].itertuples(index=False):
            separation = angular_separation_arcsec(ra, dec, self.objects["ra"], self.objects["dec"])
            for i in np.flatnonzero(separation <= radius_arcsec):
                obj = self.objects.iloc[i]
                rows.append((int(detid), obj["main_id"], obj["otype"], float(obj["ra"]), float(obj["dec"])))
        maxrec = int(params.get("MAXREC", 10**9))
        status = "OVERFLOW" if len(rows) > maxrec else "OK"
        rows = rows[:maxrec]
        table = Table(rows=rows or None, names=["detid", "main_id", "otype", "simbad_ra", "simbad_dec"],
                      dtype=[np.int64, str, str, np.float64, np.float64])
        return 200, _votable_bytes(table, status), VOTABLE

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                if not self.path.rstrip("/").endswith("/sync"):
                    self._reply(404, b"not found", "text/plain")
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                content_type = self.headers.get("Content-Type", "")
                params, uploads = {}, {}
                if content_type.startswith("multipart/form-data"):
                    message = BytesParser(policy=default_policy).parsebytes(
                        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
                    for part in message.iter_parts():
                        name = part.get_param("name", header="content-disposition")
                        payload = part.get_payload(decode=True) or b""
                        if part.get_filename() is not None:
                            uploads[name] = payload
                        else:
                            params[name] = payload.decode()
                else:
                    params = {k: v[0] for k, v in parse_qs(body.decode()).items()}
                self._reply(*server.answer(params, uploads))

            def _reply(self, status: int, payload: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler
