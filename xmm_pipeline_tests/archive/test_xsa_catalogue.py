"""XSAArchive's catalogue side against a loopback TAP server: sync, async, paged, 4XMM and 5XMM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.table import Table

from xmm_pipeline.archive.catalogue import FIVEXMM_DETID_BASE, as_canonical
from xmm_pipeline.archive.xsa import XSAArchive, adql_select, adql_string
from xmm_pipeline.errors import UserError
from xmm_pipeline_tests.archive.servers import (
    TapCatalogue,
    TapServer,
    as_4xmm_table,
    as_5xmm_table,
    run_adql,
    write_test_archive,
)

TABLE = "xsa.v_epic_source_cat"


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pd.DataFrame]:
    """DR14, and a DR15 with the same observations plus two new ones."""
    dr15 = write_test_archive(tmp_path_factory.mktemp("dr15"), n_obs=6, sources_per_obs=2, release="DR15")
    dr14 = as_canonical(dr15[dr15["obs_id"] < "0100000501"].assign(release="DR14"))
    return {"DR14": dr14, "DR15": dr15}


@pytest.fixture()
def tap(releases: dict[str, pd.DataFrame]):
    with TapServer(TapCatalogue(TABLE, as_4xmm_table(releases["DR14"]), "4XMM-DR14 detections")) as server:
        yield server


def _archive(root: Path, tap: TapServer, **options) -> XSAArchive:
    settings = {"timeout_s": 2.0, "retries": 1, "backoff_s": 0.01, "release": "DR14", "table": TABLE}
    settings.update(options)
    return XSAArchive(root, tap_url=tap.tap_url, **settings)


def _queries(tap: TapServer) -> list[str]:
    return [p for m, p in tap.log]


@pytest.mark.parametrize("mode", ["sync", "async", "paged"])
def test_catalogue_in_every_fetch_mode(mode: str, releases, tap: TapServer, tmp_path: Path) -> None:
    archive = _archive(tmp_path, tap, fetch_mode=mode, page_size=3)
    out = archive.fetch_catalogue()
    pd.testing.assert_frame_equal(out.sort_values("detid").reset_index(drop=True), releases["DR14"])
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "catalogue.parquet"), out)
    paths = _queries(tap)
    if mode == "async":
        assert any(p.startswith("/tap/async/") and p.endswith("/results/result") for p in paths)
    if mode == "paged":
        assert tap.count(lambda m, p: p == "/tap/sync") >= 2 + len(out) // 3


def test_service_row_limit(releases, tap: TapServer, tmp_path: Path) -> None:
    tap.max_rows = 5
    with pytest.raises(UserError, match="truncated the result at its row limit"):
        _archive(tmp_path, tap, fetch_mode="sync").fetch_catalogue()
    out = _archive(tmp_path, tap, fetch_mode="paged", page_size=50).fetch_catalogue()
    pd.testing.assert_frame_equal(out.sort_values("detid").reset_index(drop=True), releases["DR14"])


def test_5xmm_stacked_catalogue(releases, tap: TapServer, tmp_path: Path) -> None:
    stacked = as_5xmm_table(releases["DR15"])
    tap.catalogue = TapCatalogue(TABLE, stacked, "5XMM-DR15 stacked catalogue")
    out = _archive(tmp_path, tap, release="DR15").fetch_catalogue()
    assert len(out) == len(releases["DR15"])
    assert (out["detid"] > FIVEXMM_DETID_BASE).all() and out["detid"].is_unique
    assert out["iauname"].str.startswith("5XMM J").all()
    merged = out.merge(releases["DR15"], on=["obs_id", "src_num"], suffixes=("", "_4xmm"))
    assert len(merged) == len(out)
    for name in ("srcid", "pn_8_cts", "mjd_stop", "sum_flag", "n_detections"):
        np.testing.assert_array_equal(merged[name], merged[f"{name}_4xmm"], err_msg=name)


def test_rows_for_some_observations(releases, tap: TapServer, tmp_path: Path) -> None:
    dr15 = releases["DR15"]
    tap.catalogue = TapCatalogue(TABLE, as_5xmm_table(dr15), "5XMM-DR15 stacked catalogue")
    archive = _archive(tmp_path, tap, release="DR15")
    multi = dr15.groupby("srcid")["obs_id"].transform("size") > 1
    obs_id = dr15.loc[multi, "obs_id"].iloc[0]
    first = archive.fetch_catalogue_rows([obs_id])
    assert set(first["obs_id"]) == {obs_id}
    expected = dr15[dr15["obs_id"] == obs_id].set_index("src_num")["n_detections"]
    np.testing.assert_array_equal(first.set_index("src_num")["n_detections"], expected.loc[first["src_num"]])
    assert first["n_detections"].max() > 1, "counted catalogue-wide, not within the fetched rows"

    other = sorted(set(dr15["obs_id"]) - {obs_id})[0]
    both = archive.fetch_catalogue_rows([other, obs_id])
    assert set(both["obs_id"]) == {obs_id, other} and both["detid"].is_unique
    assert len(pd.read_parquet(tmp_path / "catalogue.parquet")) == len(both)


def test_fingerprint_is_stable_and_tracks_releases(releases, tap: TapServer, tmp_path: Path) -> None:
    first = _archive(tmp_path, tap).release_fingerprint()
    assert first.startswith("4XMM:")
    assert _archive(tmp_path / "other", tap).release_fingerprint() == first
    assert tap.count(lambda m, p: p == "/tap/sync") > 0
    assert tap.count(lambda m, p: p.startswith("/tap/async")) == 0

    tap.catalogue = TapCatalogue(TABLE, as_4xmm_table(releases["DR15"]), "4XMM-DR14 detections")
    dr15 = _archive(tmp_path, tap).release_fingerprint()
    assert dr15 != first
    tap.catalogue = TapCatalogue(TABLE, as_4xmm_table(releases["DR14"]), "4XMM-DR14 detections, v2 text")
    assert _archive(tmp_path, tap).release_fingerprint() not in (first, dr15)
    tap.catalogue = TapCatalogue(TABLE, as_5xmm_table(releases["DR15"]), "5XMM-DR15 stacked catalogue")
    assert _archive(tmp_path, tap).release_fingerprint().startswith("5XMM:")
    tap.catalogue = TapCatalogue(TABLE, as_4xmm_table(releases["DR14"]), "4XMM-DR14 detections")
    assert _archive(tmp_path, tap).release_fingerprint() == first


def test_catalogue_is_downloaded_once_per_release(releases, tap: TapServer, tmp_path: Path) -> None:
    first = _archive(tmp_path, tap).fetch_catalogue()
    row_jobs = tap.count(lambda m, p: p.startswith("/tap/async"))
    assert row_jobs > 0
    again = _archive(tmp_path, tap).fetch_catalogue()
    pd.testing.assert_frame_equal(again, first)
    assert tap.count(lambda m, p: p.startswith("/tap/async")) == row_jobs

    tap.catalogue = TapCatalogue(TABLE, as_4xmm_table(releases["DR15"]), "4XMM-DR14 detections")
    dr15 = _archive(tmp_path, tap).fetch_catalogue()
    assert tap.count(lambda m, p: p.startswith("/tap/async")) > row_jobs
    assert len(dr15) == len(releases["DR15"]) > len(first)


def test_fingerprint_uses_cheap_queries_only(tap: TapServer, tmp_path: Path) -> None:
    sent: list[str] = []
    archive = _archive(tmp_path, tap)
    original = archive.query

    def spy(adql: str, mode: str = "sync") -> pd.DataFrame:
        sent.append(adql)
        return original(adql, mode)

    archive.query = spy  # type: ignore[method-assign]
    archive.release_fingerprint()
    assert sent
    for adql in sent:
        assert "TAP_SCHEMA" in adql or "COUNT(*)" in adql or "MAX(" in adql or "TOP 1 " in adql, adql


def test_unknown_schema_is_a_clear_error(releases, tap: TapServer, tmp_path: Path) -> None:
    tap.catalogue = TapCatalogue(TABLE, as_4xmm_table(releases["DR14"]).drop(columns=["detid", "src_num"]))
    with pytest.raises(UserError, match=r"not recognised: as 4XMM it lacks detid, src_num; as 5XMM it lacks"):
        _archive(tmp_path, tap).fetch_catalogue()
    with pytest.raises(UserError, match=r"no table 'xsa\.absent'"):
        _archive(tmp_path, tap, table="xsa.absent").fetch_catalogue()


def test_column_map_for_renaming_services(releases, tap: TapServer, tmp_path: Path) -> None:
    renamed = as_4xmm_table(releases["DR14"]).rename(columns={"obs_id": "obsid", "pn_8_cts": "pn_counts"})
    tap.catalogue = TapCatalogue("xmmssc", renamed, "HEASARC-style")
    mapping = {"obs_id": "obsid", "pn_8_cts": "pn_counts"}  # canonical -> served
    archive = _archive(tmp_path, tap, table="xmmssc", column_map=mapping)
    out = archive.fetch_catalogue()
    pd.testing.assert_frame_equal(out.sort_values("detid").reset_index(drop=True), releases["DR14"])
    fresh = _archive(tmp_path / "fresh", tap, table="xmmssc", column_map=mapping)
    assert len(fresh.fetch_catalogue_rows([releases["DR14"]["obs_id"].iloc[0]])) == 2


def test_local_catalogue_file(releases, tap: TapServer, tmp_path: Path) -> None:
    table = Table.from_pandas(as_4xmm_table(releases["DR14"]).astype(
        {"iauname": str, "obs_id": str, "pn_filter": str, "pn_submode": str}))
    path = tmp_path / "cat.fits"
    table.write(path)
    archive = XSAArchive(tmp_path / "root", catalogue_file=path, release="DR14")
    pd.testing.assert_frame_equal(archive.fetch_catalogue(), releases["DR14"])
    fingerprint = archive.release_fingerprint()
    assert fingerprint.startswith("file:") and fingerprint == archive.release_fingerprint()
    fresh = XSAArchive(tmp_path / "fresh", catalogue_file=path, release="DR14")
    assert len(fresh.fetch_catalogue_rows(["0100000101"])) == 2
    assert tap.count() == 0


def test_configuration_is_validated(tmp_path: Path) -> None:
    for options in ({"table": "xsa.v; DROP TABLE x"}, {"tap_url": "file:///etc/passwd"},
                    {"aio_url": "ftp://example.org/"}, {"max_concurrency": 0}, {"fetch_mode": "bulk"},
                    {"product_mode": "everything"}, {"column_map": {"obs id": "obs_id"}}):
        with pytest.raises(UserError):
            XSAArchive(tmp_path, **options)


def test_adql_helpers_and_server_subset(releases) -> None:
    assert adql_string("it's") == "'it''s'"
    query = adql_select("obs_id, COUNT(*) AS n", TABLE, "obs_id IN ('0100000101')", top=3, order_by="obs_id",
                        offset=2)
    assert query == ("SELECT TOP 3 obs_id, COUNT(*) AS n FROM xsa.v_epic_source_cat WHERE obs_id IN "
                     "('0100000101') ORDER BY obs_id OFFSET 2")
    frame = as_4xmm_table(releases["DR14"])
    injected = run_adql(f"SELECT detid FROM t WHERE iauname = {adql_string(chr(39) + ' OR 1=1 --')}",
                        {"t": frame})
    assert injected.empty
    page = run_adql("SELECT TOP 2 detid FROM t WHERE (pn_8_cts > 0 OR detid IS NULL) AND NOT sum_flag > 0 "
                    "ORDER BY detid DESC OFFSET 1", {"t": frame})
    assert list(page["detid"]) == sorted(frame["detid"], reverse=True)[1:3]


def test_tap_error_becomes_user_error(tap: TapServer, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="rejected the query"):
        _archive(tmp_path, tap).query("SELECT nothing FROM xsa.v_epic_source_cat")


@pytest.mark.parametrize("flavour", ["5xmm-names", "heasarc-xmmstack", "heasarc-xmmssc"])
def test_catalogue_under_each_release_adapters_names(flavour: str, releases, tap: TapServer,
                                                     tmp_path: Path) -> None:
    """The served columns (TAP_SCHEMA.columns) choose the adapter: XSA's 5XMM-DR15 names (mjd_first,
    mjd_last, ep_flux, extent; no detid, src_num), HEASARC's xmmstack and xmmssc (obsid, name)."""
    from xmm_pipeline_tests.archive.servers import as_5xmm_named_table, as_heasarc_table

    dr15 = releases["DR15"]
    table, name = {
        "5xmm-names": (as_5xmm_named_table(dr15), TABLE),
        "heasarc-xmmstack": (as_heasarc_table(dr15, stacked=True), "xmmstack"),
        "heasarc-xmmssc": (as_heasarc_table(dr15), "xmmssc"),
    }[flavour]
    tap.catalogue = TapCatalogue(name, table, flavour)
    archive = _archive(tmp_path, tap, release="DR15", table=name)
    out = archive.fetch_catalogue().sort_values(["obs_id", "src_num"]).reset_index(drop=True)
    if flavour == "heasarc-xmmssc":
        pd.testing.assert_frame_equal(out, dr15.sort_values(["obs_id", "src_num"]).reset_index(drop=True))
    else:
        assert (out["detid"] > FIVEXMM_DETID_BASE).all()
        merged = out.merge(dr15, on=["obs_id", "src_num"], suffixes=("", "_4xmm"))
        assert len(merged) == len(out) == len(dr15)
        for column in ("srcid", "pn_8_cts", "mjd_start", "mjd_stop", "ep_8_flux", "n_detections"):
            np.testing.assert_array_equal(merged[column], merged[f"{column}_4xmm"], err_msg=column)
    assert archive.release_fingerprint().startswith("5XMM:" if flavour != "heasarc-xmmssc" else "4XMM:")
    obs_id = sorted(dr15["obs_id"])[0]
    rows = _archive(tmp_path / "rows", tap, release="DR15", table=name).fetch_catalogue_rows([obs_id])
    assert set(rows["obs_id"]) == {obs_id} and len(rows) == int((dr15["obs_id"] == obs_id).sum())


def test_missing_column_is_one_line_with_the_closest_served_names(releases, tap: TapServer,
                                                                   tmp_path: Path) -> None:
    renamed = as_4xmm_table(releases["DR14"]).rename(columns={"pn_8_cts": "pn_8_counts"})
    tap.catalogue = TapCatalogue(TABLE, renamed)
    with pytest.raises(UserError) as error:
        _archive(tmp_path, tap).fetch_catalogue()
    message = str(error.value)
    assert "\n" not in message and tap.tap_url in message
    assert "lacks columns pn_8_cts" in message and "pn_8_cts ~ pn_8_counts" in message, message
    fixed = _archive(tmp_path, tap, column_map={"pn_8_cts": "pn_8_counts"}).fetch_catalogue()
    pd.testing.assert_frame_equal(fixed.sort_values("detid").reset_index(drop=True), releases["DR14"])
    with pytest.raises(UserError, match="no column 'pn_counts'"):
        _archive(tmp_path / "bad", tap, column_map={"pn_8_cts": "pn_counts"}).fetch_catalogue()


def test_fingerprint_queries_only_columns_every_adapter_has(releases, tap: TapServer, tmp_path: Path) -> None:
    from xmm_pipeline.archive.catalogue import ADAPTERS, COMMON_REQUIRED
    from xmm_pipeline_tests.archive.servers import as_heasarc_table

    assert "obs_id" in COMMON_REQUIRED and all(set(COMMON_REQUIRED) <= set(a.required) for a in ADAPTERS)
    tap.catalogue = TapCatalogue("xmmstack", as_heasarc_table(releases["DR15"], stacked=True))
    sent: list[str] = []
    archive = _archive(tmp_path, tap, table="xmmstack")
    original = archive.query
    archive.query = lambda adql, mode="sync": sent.append(adql) or original(adql, mode)  # type: ignore
    first = archive.release_fingerprint()
    catalogue_queries = [q for q in sent if "TAP_SCHEMA" not in q]
    assert catalogue_queries == ["SELECT COUNT(*) AS n_rows FROM xmmstack",
                                 "SELECT MAX(obsid) AS latest_obs_id FROM xmmstack",
                                 "SELECT TOP 1 name FROM xmmstack WHERE name IS NOT NULL"]
    assert first == _archive(tmp_path, tap, table="xmmstack").release_fingerprint()


def test_download_cli_column_map_and_resource_setting(
    releases, tap: TapServer, tmp_path: Path, capsys
) -> None:
    import socket

    from xmm_pipeline.cli import main
    from xmm_pipeline.orchestration.resources import ArchiveResource

    renamed = as_4xmm_table(releases["DR14"]).rename(columns={"pn_8_cts": "pn_8_counts"})
    tap.catalogue = TapCatalogue(TABLE, renamed)
    obs_id = sorted(releases["DR14"]["obs_id"])[0]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/aio"
    common = ["--tap-url", tap.tap_url, "--aio-url", closed, "--timeout", "2", "--retries", "0"]
    assert main(["download", obs_id, "--out", str(tmp_path / "a"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pn_8_cts ~ pn_8_counts" in err
    assert not (tmp_path / "a").exists()
    assert main(["download", obs_id, "--out", str(tmp_path / "b"), *common, "--column-map", "x y"]) == 2
    assert "is not canonical=served" in capsys.readouterr().err
    code = main(["download", obs_id, "--out", str(tmp_path / "c"), *common,
                 "--column-map", "pn_8_cts=pn_8_counts"])
    assert code == 3, "the catalogue rows came; the AIO on a closed port cannot be reached"
    rows = pd.read_parquet(tmp_path / "c" / "catalogue.parquet")
    assert len(rows) == 2 and rows["pn_8_cts"].notna().all()

    resource = ArchiveResource(kind="xsa", root=str(tmp_path / "r"), tap_url=tap.tap_url, tap_table=TABLE,
                               column_map="pn_8_cts=pn_8_counts, obs_id=obs_id", rmf_version="_v22.0",
                               observations_table="")
    archive = resource.get_archive()
    assert archive.column_map == {"pn_8_cts": "pn_8_counts", "obs_id": "obs_id"}
    assert archive.rmf_version == "_v22.0" and archive.observations_table == ""
    assert len(archive.fetch_catalogue()) == len(releases["DR14"])
