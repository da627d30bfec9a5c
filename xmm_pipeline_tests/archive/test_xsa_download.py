"""XSAArchive.fetch_observations against a loopback AIO server: layout, faults, resumption."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from xmm_pipeline.archive import download
from xmm_pipeline.archive.download import verify_rmf
from xmm_pipeline.archive.xsa import XSAArchive
from xmm_pipeline.errors import UserError
from xmm_pipeline_tests.archive.servers import AioFaults, AioServer, write_test_archive

N_OBS = 11
RETRIES = 2


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("aio_source")
    return root, write_test_archive(root, n_obs=N_OBS, sources_per_obs=3, seed=5)


@pytest.fixture()
def aio(source: tuple[Path, pd.DataFrame]):
    with AioServer(source[0], AioFaults(slow_s=1.2)) as server:
        yield server


def _archive(root: Path, aio: AioServer, **options) -> XSAArchive:
    settings = {"timeout_s": 0.5, "retries": RETRIES, "backoff_s": 0.01, "max_concurrency": 4,
                "observations_table": ""}  # no TAP here: no proprietary-period check
    settings.update(options)
    return XSAArchive(root, aio_url=aio.aio_url, rmf_url=aio.rmf_url, **settings)


def _products(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.glob("*/pps/P*.FTZ")}


def test_download_lands_in_the_layout_and_is_not_repeated(
    source: tuple[Path, pd.DataFrame], aio: AioServer, tmp_path: Path
) -> None:
    src, catalogue = source
    obs_ids = sorted(catalogue["obs_id"].unique())
    archive = _archive(tmp_path, aio)
    assert archive.fetch_observations(obs_ids) == []
    assert _products(tmp_path) == _products(src)
    rmfs = sorted(p.name for p in archive.responses_dir().iterdir())
    assert rmfs == ["epn_e3_ff20_sdY6_v21.0.rmf", "epn_e3_ff20_sdY9_v21.0.rmf"]
    for name in rmfs:
        verify_rmf(archive.responses_dir() / name)
    assert aio.count(lambda m, p: p.startswith("/rmf/") and p.endswith(".rmf")) == 2
    assert aio.count(lambda m, p: p == "/rmf/Version.txt") == 1, "the version is read once per run"
    assert not (tmp_path / ".partial").exists()

    before = aio.count()
    assert _archive(tmp_path, aio).fetch_observations(obs_ids) == []
    assert aio.count() == before, "a second run must not download anything"

    archive.forget_observations(obs_ids[:1])
    assert archive.fetch_observations(obs_ids) == []
    assert aio.count() == before + 1 and aio.faults.served[obs_ids[0]] == 2
    assert _products(tmp_path) == _products(src)


def test_faults_end_in_quarantine_with_url_and_reason(
    source: tuple[Path, pd.DataFrame], aio: AioServer, tmp_path: Path
) -> None:
    src, catalogue = source
    obs_ids = sorted(catalogue["obs_id"].unique())
    faults = ["500", "slow", "reset", "truncated-gzip", "corrupt-fits", "401", "unsafe-tar", "404",
              "500-once", "reset-once", "slow-once"]
    aio.faults.by_key.update(dict(zip(obs_ids, faults)))
    records = _archive(tmp_path, aio).fetch_observations(obs_ids)
    by_obs = {}
    for record in records:
        by_obs.setdefault(record.obs_id, []).append(record)
        assert record.stage == "download"
        assert record.path.startswith(aio.aio_url) and f"obsno={record.obs_id}" in record.path
        assert record.path in record.reason

    expected = {
        "500": f"HTTP 500 after {RETRIES + 1} attempts",
        "slow": "timed out after 0.5 s",
        "reset": "connection failed",
        "truncated-gzip": "gzip stream is corrupt or truncated",
        "corrupt-fits": "not a readable FITS file",
        "401": "proprietary data (HTTP 401)",
        "unsafe-tar": "unsafe tar member '../escaped.FTZ'",
        "404": "HTTP 404",
    }
    assert set(by_obs) == {obs_ids[faults.index(kind)] for kind in expected}
    for kind, reason in expected.items():
        obs_id = obs_ids[faults.index(kind)]
        assert len(by_obs[obs_id]) == 1 and reason in by_obs[obs_id][0].reason, (kind, by_obs[obs_id])

    served = aio.faults.served
    for kind, attempts in {"500": RETRIES + 1, "slow": RETRIES + 1, "reset": RETRIES + 1, "401": 1,
                           "404": 1, "500-once": 2, "reset-once": 2, "slow-once": 2}.items():
        assert served[obs_ids[faults.index(kind)]] == attempts, kind

    # the bad member is set aside, its siblings are in place; the detection id comes from no catalogue
    truncated = obs_ids[faults.index("truncated-gzip")]
    assert by_obs[truncated][0].reason.startswith(f"P{truncated}PNS003")
    assert len(list((tmp_path / truncated / "pps").glob("*.FTZ"))) == 8
    unsafe = obs_ids[faults.index("unsafe-tar")]
    assert not (tmp_path / unsafe).exists() and not (tmp_path.parent / "escaped.FTZ").exists()
    for kind in ("500-once", "reset-once", "slow-once"):
        obs_id = obs_ids[faults.index(kind)]
        assert _products(tmp_path).keys() >= {k for k in _products(src) if k.startswith(obs_id)}

    # faults cleared: a re-run asks only for what failed, and completes the layout
    aio.faults.by_key.clear()
    aio.faults.served.clear()
    assert _archive(tmp_path, aio).fetch_observations(obs_ids) == []
    assert set(aio.faults.served) == set(by_obs)
    assert _products(tmp_path) == _products(src)


def test_429_honours_retry_after(
    source: tuple[Path, pd.DataFrame], aio: AioServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    obs_id = sorted(source[1]["obs_id"].unique())[0]
    aio.faults.by_key[obs_id] = "429-once"
    waits: list[float] = []
    monkeypatch.setattr(download.time, "sleep", waits.append)
    assert _archive(tmp_path, aio, backoff_s=0.001).fetch_observations([obs_id]) == []
    assert waits == [1.0], "Retry-After: 1 must be waited out, not the tiny backoff"
    assert aio.faults.served[obs_id] == 2


def test_bad_rmf_is_quarantined_for_its_observations(
    source: tuple[Path, pd.DataFrame], aio: AioServer, tmp_path: Path
) -> None:
    obs_ids = sorted(source[1]["obs_id"].unique())[:2]
    aio.faults.by_key["epn_e3_ff20_sdY9_v21.0.rmf"] = "corrupt-fits"
    records = _archive(tmp_path, aio).fetch_observations(obs_ids)
    assert len(records) == 1
    assert records[0].reason.startswith("RMF epn_e3_ff20_sdY9.rmf: ")
    assert "needed by " + ", ".join(obs_ids) in records[0].reason
    assert records[0].path == aio.rmf_url + "epn_e3_ff20_sdY9_v21.0.rmf"
    assert sorted(p.name for p in (tmp_path / "responses" / "PN").iterdir()) == ["epn_e3_ff20_sdY6_v21.0.rmf"]


def test_per_source_files(source: tuple[Path, pd.DataFrame], aio: AioServer, tmp_path: Path) -> None:
    src, catalogue = source
    obs_ids = sorted(catalogue["obs_id"].unique())[:3]
    shutil.copy(src / "catalogue.parquet", tmp_path / "catalogue.parquet")
    aio.faults.by_key[obs_ids[1]] = "401"
    archive = _archive(tmp_path, aio, product_mode="source")
    records = archive.fetch_observations(obs_ids)
    assert len(records) == 9 and {r.obs_id for r in records} == {obs_ids[1]}
    detids = set(catalogue.loc[catalogue["obs_id"] == obs_ids[1], "detid"])
    assert {r.detid for r in records} == detids
    assert all("name=" in r.path and "sourceno=" in r.path for r in records)
    expected = {k: v for k, v in _products(src).items() if k.split("/")[0] in (obs_ids[0], obs_ids[2])}
    assert _products(tmp_path) == expected
    before = aio.count()
    archive.fetch_observations([obs_ids[0], obs_ids[2]])
    assert aio.count() == before

    bright = catalogue[catalogue["obs_id"].isin(obs_ids[:1])]["pn_8_cts"].max()
    selective = _archive(tmp_path / "bright", aio, product_mode="source", min_pn_counts=bright)
    (tmp_path / "bright").mkdir()
    shutil.copy(src / "catalogue.parquet", tmp_path / "bright" / "catalogue.parquet")
    assert selective.fetch_observations(obs_ids[:1]) == []
    assert len(list((tmp_path / "bright" / obs_ids[0] / "pps").glob("*.FTZ"))) == 3


def test_observation_ids_are_validated(aio: AioServer, tmp_path: Path) -> None:
    archive = _archive(tmp_path, aio)
    for bad in ("012345678", "0123456789' OR 1=1 --", "../../etc", "01234567890"):
        with pytest.raises(UserError, match="observation id"):
            archive.fetch_observations([bad])
    assert aio.count() == 0


def test_staging_of_live_processes_is_left_alone(
    source: tuple[Path, pd.DataFrame], aio: AioServer, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    partial = tmp_path / ".partial"
    stale = partial / f"{dead.stdout.strip()}-deadbeef"
    live = partial / f"{os.getpid()}-0another"
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / "half.tar").write_bytes(b"partial body")
    assert _archive(tmp_path, aio).fetch_observations(sorted(source[1]["obs_id"].unique())[:1]) == []
    assert not stale.exists(), "a killed run's staging is cleared"
    assert (live / "half.tar").exists(), "a concurrent worker's staging is not touched"
