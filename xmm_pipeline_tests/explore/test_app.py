"""The explorer's HTTP interface, served by uvicorn on 127.0.0.1, and the `xmm-pipeline explore` command."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from email.message import Message
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from xmm_pipeline.cli import build_parser, main
from xmm_pipeline.explore.app import _safe_name, plotly_js
from xmm_pipeline.latent.evaluate import ONE_ES_IAUNAME
from xmm_pipeline_tests.explore.conftest import archive_product, archive_rmf, free_port


def _get(url: str) -> tuple[int, bytes, Message]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers


def _post(url: str, body: bytes, content_type: str) -> tuple[int, bytes, Message]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers


def test_the_page_loads_only_its_own_files(explorer_url: str) -> None:
    status, page, _ = _get(explorer_url + "/")
    assert status == 200
    links = re.findall(r'(?:src|href)="([^"]+)"', page.decode())
    assert "/vendor/plotly.min.js" in links and "/static/explore.js" in links
    assert all(link.startswith("/") and not link.startswith("//") for link in links), links
    for link in links:
        assert _get(explorer_url + link)[0] == 200, link
    assert _get(explorer_url + "/vendor/plotly.min.js")[1] == plotly_js().read_bytes()
    script = _get(explorer_url + "/static/explore.js")[1].decode()
    assert not re.search(r"https?://", script)


def test_points_and_colours_are_binary_float32(explorer_url: str, explorer_data) -> None:
    n = len(explorer_data.detids)
    status, body, _ = _get(explorer_url + "/api/points")
    xy = np.frombuffer(body, dtype="<f4").reshape(2, n)
    np.testing.assert_array_equal(xy.T, explorer_data.xy)
    status, body, headers = _get(explorer_url + "/api/colour?by=class")
    info = json.loads(headers["X-Colour-Info"])
    codes = np.frombuffer(body, dtype="<f4")
    assert status == 200 and len(codes) == n and info["kind"] == "category"
    assert info["labels"][int(codes[0])] == explorer_data.class_name[0]


def test_api_answers_and_mistakes(explorer_url: str, explorer_data) -> None:
    query = urllib.parse.quote(ONE_ES_IAUNAME)
    status, body, _ = _get(f"{explorer_url}/api/search?q={query}")
    matches = json.loads(body)["matches"]
    assert status == 200 and matches and {m["iauname"] for m in matches} == {ONE_ES_IAUNAME}
    status, body, _ = _get(f"{explorer_url}/api/detection?row={matches[0]['row']}&k=3")
    detail = json.loads(body)
    assert detail["catalogue"]["detid"] == matches[0]["detid"] and len(detail["neighbours"]) == 3
    status, body, _ = _get(f"{explorer_url}/api/trajectory?row={matches[-1]['row']}")
    assert status == 200 and json.loads(body)["rows"] == [m["row"] for m in matches]
    status, body, _ = _get(f"{explorer_url}/api/show.png?row={matches[0]['row']}")
    assert status == 200 and body[:4] == b"\x89PNG"
    for path, message in (("/api/search?q=Sgr%20A*", "neither an IAU name"),
                          ("/api/detection?row=abc", "parameter row must be an integer"),
                          ("/api/detection?row=999999", "row 999999 is not a detection"),
                          ("/api/colour?by=pink", "unknown colour field"),
                          ("/api/trajectory?srcid=1", "source 1 is not in the embeddings")):
        status, body, _ = _get(explorer_url + path)
        assert status == 400 and message in json.loads(body)["error"], path


def _multipart(files: dict[str, Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for field, path in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                     f'filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode())
        parts.append(path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def test_upload_and_export_over_http(explorer_url: str, explorer_data, sim_archive: Path,
                                     tmp_path: Path) -> None:
    record = explorer_data.embeddings.iloc[len(explorer_data.detids) // 3]
    spectrum = archive_product(sim_archive, record["obs_id"], int(record["src_num"]), "SRSPEC")
    body, content_type = _multipart({
        "spectrum": spectrum, "rmf": archive_rmf(sim_archive, spectrum),
        "background": archive_product(sim_archive, record["obs_id"], int(record["src_num"]), "BGSPEC"),
        "arf": archive_product(sim_archive, record["obs_id"], int(record["src_num"]), "SRCARF")})
    status, answer, _ = _post(explorer_url + "/api/upload?k=5", body, content_type)
    placed = json.loads(answer)
    assert status == 200 and placed["neighbours"][0]["detid"] == record["detid"]
    assert placed["neighbours"][0]["distance"] < 1e-3

    broken = tmp_path / "broken.pha"
    broken.write_bytes(b"not FITS")
    status, answer, _ = _post(explorer_url + "/api/upload", *_multipart({"spectrum": broken}))
    assert status == 400 and "broken.pha" in json.loads(answer)["error"]

    rows = [n["row"] for n in placed["neighbours"]]
    request = json.dumps({"rows": rows, "format": "votable"}).encode()
    status, content, headers = _post(explorer_url + "/api/export", request, "application/json")
    assert status == 200 and 'filename="xmm_selection_5.vot"' in headers["Content-Disposition"]
    table = Table.read(io.BytesIO(content), format="votable")
    assert list(table["detid"]) == [n["detid"] for n in placed["neighbours"]]
    status, answer, _ = _post(explorer_url + "/api/export", b'{"rows": [], "format": "csv"}',
                              "application/json")
    assert status == 400 and "selection is empty" in json.loads(answer)["error"]


def test_the_command_serves_on_localhost_and_fails_in_one_line(explore_latent: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["explore"])
    assert args.host == "127.0.0.1" and args.latent == "data/latent"
    assert main(["explore", "--latent", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no embeddings" in err and err.count("\n") == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["explore", "--latent", str(explore_latent), "--port", str(port)]) == 2
        assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "xmm_pipeline", "explore", "--latent",
                               str(explore_latent), "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                meta = json.loads(_get(f"http://127.0.0.1:{port}/api/meta")[1])
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None and time.monotonic() < deadline, "explore did not start"
                time.sleep(0.3)
        assert meta["n_detections"] > 0 and meta["has_spectra"] and meta["has_model"]
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert f"open http://127.0.0.1:{port}/" in err


def test_uploaded_names_stay_in_the_upload_folder() -> None:
    assert _safe_name("../../etc/x y.pha", "spectrum") == "x_y.pha"
    assert _safe_name("..", "spectrum") == "spectrum"
    assert _safe_name(None, "rmf") == "rmf"
