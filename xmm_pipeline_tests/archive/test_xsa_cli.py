"""`xmm-pipeline download` against loopback TAP + AIO servers, including a run killed mid-transfer."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from xmm_pipeline.cli import main
from xmm_pipeline_tests.archive.servers import (
    AioFaults,
    AioServer,
    TapCatalogue,
    TapServer,
    as_4xmm_table,
    write_test_archive,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("cli_source")
    return root, write_test_archive(root, n_obs=5, sources_per_obs=2, seed=9)


@pytest.fixture()
def servers(source):
    root, catalogue = source
    with TapServer(TapCatalogue("xsa.v_epic_source_cat", as_4xmm_table(catalogue))) as tap, \
            AioServer(root, AioFaults()) as aio:
        yield tap, aio


def _options(tap: TapServer, aio: AioServer) -> list[str]:
    return ["--tap-url", tap.tap_url, "--aio-url", aio.aio_url, "--rmf-url", aio.rmf_url,
            "--timeout", "2", "--retries", "1", "--release", "DR14"]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.glob("*/pps/P*.FTZ")}


def test_download_command_writes_the_archive_layout(source, servers, tmp_path: Path, capsys) -> None:
    src, catalogue = source
    tap, aio = servers
    obs_ids = sorted(catalogue["obs_id"].unique())[:3]
    out = tmp_path / "archive"
    assert main(["download", *obs_ids, "--out", str(out), *_options(tap, aio)]) == 0
    assert "3 observations, 6 catalogue rows" in capsys.readouterr().out
    assert _files(out) == {k: v for k, v in _files(src).items() if k.split("/")[0] in obs_ids}
    rows = pd.read_parquet(out / "catalogue.parquet")
    expected = catalogue[catalogue["obs_id"].isin(obs_ids)].reset_index(drop=True)
    pd.testing.assert_frame_equal(rows, expected)
    assert sorted(p.name for p in (out / "responses" / "PN").iterdir()) == [
        "epn_e3_ff20_sdY6_v21.0.rmf", "epn_e3_ff20_sdY9_v21.0.rmf"]


def test_download_command_reports_quarantine(source, servers, tmp_path: Path, capsys) -> None:
    _, catalogue = source
    tap, aio = servers
    obs_ids = sorted(catalogue["obs_id"].unique())[:2]
    aio.faults.by_key[obs_ids[1]] = "401"
    out = tmp_path / "archive"
    assert main(["download", *obs_ids, "--out", str(out), *_options(tap, aio)]) == 1
    printed = capsys.readouterr().out
    assert f"quarantined {obs_ids[1]}: proprietary data (HTTP 401)" in printed
    quarantine = pd.read_parquet(out / "download_quarantine.parquet")
    assert list(quarantine["obs_id"]) == [obs_ids[1]]


def test_download_command_rejects_bad_ids(servers, tmp_path: Path, capsys) -> None:
    tap, aio = servers
    code = main(["download", "12345", "--out", str(tmp_path), *_options(tap, aio)])
    assert code == 2
    assert "not an XMM-Newton observation id" in capsys.readouterr().err
    assert tap.count() == 0 and aio.count() == 0


def test_killed_download_resumes_with_every_file_intact(source, servers, tmp_path: Path) -> None:
    src, catalogue = source
    tap, aio = servers
    obs_ids = sorted(catalogue["obs_id"].unique())
    aio.faults.by_key.update({o: "trickle" for o in obs_ids})
    aio.faults.trickle_s = 0.05
    out = tmp_path / "archive"
    command = [sys.executable, "-m", "xmm_pipeline", "download", *obs_ids, "--out", str(out),
               *_options(tap, aio), "--concurrency", "1", "--timeout", "30"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while len(list(out.glob("*/pps/.xsa_complete.json"))) < 2 and time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        process.kill()
        process.wait(timeout=10)
    completed = len(list(out.glob("*/pps/.xsa_complete.json")))
    assert 2 <= completed < len(obs_ids), "the kill must land mid-run"
    assert (out / ".partial").exists(), "a transfer was in flight when the process died"

    aio.faults.by_key.clear()
    served_before = dict(aio.faults.served)
    assert main(["download", *obs_ids, "--out", str(out), *_options(tap, aio)]) == 0
    assert _files(out) == _files(src)
    assert not (out / ".partial").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    resumed = {k for k, v in aio.faults.served.items() if v > served_before.get(k, 0) and k in obs_ids}
    assert len(resumed) == len(obs_ids) - completed, "finished observations are not fetched again"
