"""The XSA as it is in 2026, over loopback servers: canned matrices named by Version.txt, 'no results'
answers, spectra flags and proprietary periods, services that cannot be reached, and a stacked 5XMM
table served under its own names, downloaded and preprocessed end to end."""

from __future__ import annotations

import socket
from pathlib import Path

import pandas as pd
import pytest

from xmm_pipeline.archive.catalogue import FIVEXMM_DETID_BASE
from xmm_pipeline.archive.download import EXIT_SERVICE_UNREACHABLE, ServiceUnreachableError
from xmm_pipeline.archive.xsa import SKIP_NO_PRODUCT, SKIP_NO_SPECTRA, SKIP_PROPRIETARY, XSAArchive
from xmm_pipeline.cli import main
from xmm_pipeline.errors import UserError
from xmm_pipeline.spectra.preprocess import PreprocessConfig, find_rmf, select_detections
from xmm_pipeline_tests.archive.servers import (
    AioFaults,
    AioServer,
    TapCatalogue,
    TapServer,
    as_4xmm_table,
    as_5xmm_named_table,
    write_test_archive,
)

TABLE = "xsa.v_epic_source_cat"
# neither the v21.0 the code used to hard-code nor the v22.0 the calibration site moved to in 2026
SERVED_VERSION = "_v23.4"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("real_archive_source")
    return root, write_test_archive(root, n_obs=4, sources_per_obs=2, seed=3)


@pytest.fixture()
def aio(source):
    with AioServer(source[0], AioFaults(), rmf_version=SERVED_VERSION) as server:
        yield server


def _archive(root: Path, aio: AioServer, **options) -> XSAArchive:
    settings = {"timeout_s": 2.0, "retries": 1, "backoff_s": 0.01, "observations_table": ""}
    settings.update(options)
    return XSAArchive(root, aio_url=aio.aio_url, rmf_url=aio.rmf_url, **settings)


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_rmf_version_is_read_from_version_txt(source, aio: AioServer, tmp_path: Path) -> None:
    _, catalogue = source
    obs_ids = sorted(catalogue["obs_id"].unique())
    archive = _archive(tmp_path, aio)
    assert archive.fetch_observations(obs_ids) == []
    names = sorted(p.name for p in archive.responses_dir().iterdir())
    assert names == [f"epn_e3_ff20_sdY6{SERVED_VERSION}.rmf", f"epn_e3_ff20_sdY9{SERVED_VERSION}.rmf"]
    assert aio.count(lambda m, p: p == "/rmf/Version.txt") == 1
    for respfile in ("epn_e3_ff20_sdY6.rmf", "epn_e3_ff20_sdY9.rmf"):
        found = find_rmf(respfile, tmp_path / obs_ids[0] / "pps", archive.responses_dir())
        assert found is not None and found.name == respfile.replace(".rmf", f"{SERVED_VERSION}.rmf")

    before = aio.count()
    assert _archive(tmp_path, aio).fetch_observations(obs_ids) == []
    assert aio.count() == before, "present matrices cost no request, not even Version.txt"


def test_user_rmf_version_overrides_the_served_one(source, aio: AioServer, tmp_path: Path) -> None:
    obs_id = sorted(source[1]["obs_id"].unique())[0]
    records = _archive(tmp_path, aio, rmf_version="_v22.0").fetch_observations([obs_id])
    assert aio.count(lambda m, p: p == "/rmf/Version.txt") == 0
    assert records and all(r.path.endswith("_v22.0.rmf") and "HTTP 404" in r.reason for r in records)
    with pytest.raises(UserError, match="not a canned-matrix version suffix"):
        _archive(tmp_path, aio, rmf_version="22.0/../x")


def test_unreadable_version_txt_is_named(source, aio: AioServer, tmp_path: Path) -> None:
    obs_id = sorted(source[1]["obs_id"].unique())[0]
    aio.rmf_version = "<html>maintenance</html>"
    records = _archive(tmp_path, aio).fetch_observations([obs_id])
    assert records and all("cannot tell the canned-matrix version" in r.reason for r in records)
    assert all(r.path == aio.rmf_url + "Version.txt" and "--rmf-version" in r.reason for r in records)


def test_no_results_is_recorded_not_quarantined(source, aio: AioServer, tmp_path: Path) -> None:
    obs_ids = sorted(source[1]["obs_id"].unique())[:2]
    aio.faults.by_key[obs_ids[0]] = "no-results"
    archive = _archive(tmp_path, aio)
    assert archive.fetch_observations(obs_ids) == []
    assert archive.skipped == {SKIP_NO_PRODUCT: [obs_ids[0]]}
    assert not list((tmp_path / obs_ids[0] / "pps").glob("*.FTZ"))
    served = aio.faults.served[obs_ids[0]]
    again = _archive(tmp_path, aio)
    assert again.fetch_observations(obs_ids) == []
    assert aio.faults.served[obs_ids[0]] == served, "an observation with nothing is not asked again"


def test_only_what_exists_is_requested(source, aio: AioServer, tmp_path: Path) -> None:
    """Per-source requests skip detections whose SPECTRA flag is false; an observation none of whose
    detections has a spectrum, and one still proprietary, are not requested at all."""
    _, catalogue = source
    obs_ids = sorted(catalogue["obs_id"].unique())
    rows = catalogue.copy()
    rows["has_spectrum"] = pd.array([True] * len(rows), dtype="boolean")
    rows.loc[rows["obs_id"] == obs_ids[0], "has_spectrum"] = False
    one_off = rows.index[rows["obs_id"] == obs_ids[1]][0]
    rows.loc[one_off, "has_spectrum"] = False
    rows.loc[rows.index[rows["obs_id"] == obs_ids[3]], "has_spectrum"] = pd.NA  # unknown: asked for
    rows.to_parquet(tmp_path / "catalogue.parquet", index=False)
    observations = pd.DataFrame({
        "observation_id": obs_ids,
        "proprietary_end_date": ["2001-05-01 00:00:00", "2002-01-01 00:00:00", "2999-01-01 00:00:00", None],
    })
    with TapServer(TapCatalogue(TABLE, as_4xmm_table(catalogue), observations=observations)) as tap:
        archive = _archive(tmp_path, aio, product_mode="source", tap_url=tap.tap_url,
                           observations_table="xsa.v_all_observations")
        assert archive.fetch_observations(obs_ids) == []
    assert archive.skipped == {SKIP_NO_SPECTRA: [obs_ids[0]], SKIP_PROPRIETARY: [obs_ids[2]]}
    assert aio.faults.served[obs_ids[0]] == 0 and aio.faults.served[obs_ids[2]] == 0
    assert aio.faults.served[obs_ids[1]] == 3, "three products of the one detection with a spectrum"
    assert aio.faults.served[obs_ids[3]] == 6


def test_unreachable_tap_is_one_line_and_leaves_no_folder(source, tmp_path: Path, capsys) -> None:
    obs_id = sorted(source[1]["obs_id"].unique())[0]
    url = _closed_port_url() + "/tap"
    out = tmp_path / "new" / "archive"
    code = main(["download", obs_id, "--out", str(out), "--tap-url", url, "--retries", "0", "--timeout", "2"])
    assert code == EXIT_SERVICE_UNREACHABLE == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and url in err and "Connection refused" in err, err
    assert not (tmp_path / "new").exists(), "no folder the run created is left behind"


def test_tap_url_that_is_no_tap_service_is_one_line(source, aio: AioServer, tmp_path: Path, capsys) -> None:
    """A typo in the path: the host answers, but with HTTP 404 and no VOTable."""
    _, catalogue = source
    obs_id = sorted(catalogue["obs_id"].unique())[0]
    with TapServer(TapCatalogue(TABLE, as_4xmm_table(catalogue))) as tap:
        url = tap.url + "/tpa"
        code = main(["download", obs_id, "--out", str(tmp_path / "a"), "--tap-url", url, "--retries", "0"])
    assert code == EXIT_SERVICE_UNREACHABLE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot reach {url}" in err and "404" in err, err
    assert not (tmp_path / "a").exists()


def test_unreachable_aio_is_one_line(source, tmp_path: Path, capsys) -> None:
    _, catalogue = source
    obs_ids = sorted(catalogue["obs_id"].unique())[:2]
    aio_url = _closed_port_url() + "/aio"
    with TapServer(TapCatalogue(TABLE, as_4xmm_table(catalogue))) as tap:
        code = main(["download", *obs_ids, "--out", str(tmp_path / "archive"), "--tap-url", tap.tap_url,
                     "--aio-url", aio_url, "--retries", "0", "--timeout", "2"])
    assert code == EXIT_SERVICE_UNREACHABLE
    err = capsys.readouterr().err.strip()
    problems = [line for line in err.splitlines() if not line.startswith("download: ")]  # not progress
    assert len(problems) == 1 and aio_url in problems[0] and "Connection refused" in err, err
    with pytest.raises(ServiceUnreachableError, match="cannot reach"):
        archive = XSAArchive(tmp_path / "x", aio_url=aio_url, retries=0, observations_table="")
        archive.fetch_observations(obs_ids)


def test_download_of_a_stacked_5xmm_release_with_v22_matrices_ingests(
    sim_archive: Path, tmp_path: Path, capsys
) -> None:
    """`xmm-pipeline download` against an XSA serving the 5XMM-DR15 stacked table under its own names
    and v22.0-named canned matrices, then `xmm-pipeline preprocess` on what it wrote."""
    catalogue = pd.read_parquet(sim_archive / "catalogue.parquet")
    stacked = as_5xmm_named_table(catalogue)
    assert {"mjd_first", "mjd_last", "ep_flux", "extent", "n_obs", "pps_srcnum"} <= set(stacked.columns)
    assert not {"detid", "src_num", "mjd_stop", "ep_extent"} & set(stacked.columns)
    with_spectra = [o for o in sorted(catalogue["obs_id"].unique())
                    if any((sim_archive / o / "pps").glob("*SRSPEC*"))]
    bright = catalogue[catalogue["obs_id"].isin(with_spectra) & (catalogue["pn_8_cts"] > 300)
                       & (catalogue["sum_flag"] <= 2) & (catalogue["ep_extent"] <= 0)]
    obs_ids = sorted(bright["obs_id"].unique())[:4]
    out, spectra = tmp_path / "xsa", tmp_path / "spectra"
    with TapServer(TapCatalogue(TABLE, stacked, "5XMM-DR15 stacked catalogue")) as tap, \
            AioServer(sim_archive, rmf_version="_v22.0") as aio:
        code = main(["download", *obs_ids, "--out", str(out), "--tap-url", tap.tap_url, "--aio-url",
                     aio.aio_url, "--rmf-url", aio.rmf_url, "--timeout", "10", "--retries", "1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = pd.read_parquet(out / "catalogue.parquet")
    assert set(rows["obs_id"]) == set(obs_ids) and rows["iauname"].str.startswith("5XMM").all()
    rmfs = sorted(p.name for p in (out / "responses" / "PN").iterdir())
    assert rmfs and all(name.endswith("_v22.0.rmf") for name in rmfs)

    assert main(["preprocess", "--archive", str(out), "--out", str(spectra)]) == 0
    quarantine = pd.read_parquet(spectra / "quarantine.parquet")
    assert quarantine.empty, quarantine["reason"].tolist()
    written = pd.concat([pd.read_parquet(p) for p in (spectra / "spectra").glob("*.parquet")])
    selected, _ = select_detections(rows, PreprocessConfig())
    assert len(selected) > 0 and sorted(written["detid"]) == sorted(selected["detid"])
    assert (written["detid"] > FIVEXMM_DETID_BASE).all(), "5XMM rows carry synthesised detection ids"


def test_download_command_counts_what_it_skipped(source, aio: AioServer, tmp_path: Path, capsys) -> None:
    _, catalogue = source
    obs_ids = sorted(catalogue["obs_id"].unique())[:3]
    aio.faults.by_key[obs_ids[0]] = "no-results"
    observations = pd.DataFrame({"observation_id": obs_ids,
                                 "proprietary_end_date": ["2010-01-01", "2999-12-31", "2011-01-01"]})
    with TapServer(TapCatalogue(TABLE, as_4xmm_table(catalogue), observations=observations)) as tap:
        code = main(["download", *obs_ids, "--out", str(tmp_path / "a"), "--tap-url", tap.tap_url,
                     "--aio-url", aio.aio_url, "--rmf-url", aio.rmf_url, "--timeout", "2", "--retries", "1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"skipped 1 no product: {obs_ids[0]}" in printed
    assert f"skipped 1 proprietary: {obs_ids[1]}" in printed
    assert aio.faults.served[obs_ids[1]] == 0
    assert not (tmp_path / "a" / "download_quarantine.parquet").exists()


def test_archive_written_before_the_spectrum_flag_is_not_downloaded_again(
    source, aio: AioServer, tmp_path: Path
) -> None:
    """A root whose catalogue.parquet and completion markers predate has_spectrum: the markers still
    match (the row hash is over the same columns), nothing is requested."""
    src, catalogue = source
    obs_ids = sorted(catalogue["obs_id"].unique())
    import shutil

    shutil.copy(src / "catalogue.parquet", tmp_path / "catalogue.parquet")
    archive = _archive(tmp_path, aio)
    assert archive.fetch_observations(obs_ids) == []
    old = pd.read_parquet(tmp_path / "catalogue.parquet").drop(columns=["has_spectrum"])
    old.to_parquet(tmp_path / "catalogue.parquet", index=False)
    before = aio.count()
    assert _archive(tmp_path, aio).fetch_observations(obs_ids) == []
    assert aio.count() == before
