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
