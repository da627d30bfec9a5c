"""The canonical schema's adapters: 4XMM per-detection, 5XMM stacked, local FITS catalogues."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.table import Table

from xmm_pipeline.archive.catalogue import (
    CANONICAL_COLUMNS,
    FIVEXMM_DETID_BASE,
    SCHEMA_4XMM,
    SCHEMA_5XMM,
    canonical_from_4xmm,
    canonical_from_5xmm,
    canonical_from_release,
    detect_schema,
    read_catalogue_fits,
    synthesise_detid,
)
from xmm_pipeline.errors import UserError
from xmm_pipeline_tests.archive.servers import as_4xmm_table, as_5xmm_table, write_test_archive


@pytest.fixture(scope="module")
def canonical(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return write_test_archive(tmp_path_factory.mktemp("catalogue_src"), n_obs=4, sources_per_obs=3)


def test_schema_detected_from_columns(canonical: pd.DataFrame) -> None:
    assert detect_schema(as_4xmm_table(canonical).columns) == SCHEMA_4XMM
    assert detect_schema([c.upper() for c in as_5xmm_table(canonical).columns]) == SCHEMA_5XMM


def test_unknown_schema_lists_missing_columns() -> None:
    with pytest.raises(UserError) as error:
        detect_schema(["srcid", "obs_id", "ra", "dec"])
    message = str(error.value)
    assert "4XMM it lacks" in message and "detid" in message
    assert "5XMM it lacks" in message and "pps_srcnum" in message
    assert "obs_id," not in message.split("lacks")[1].split(";")[0]


def test_partial_5xmm_schema_names_its_missing_columns(canonical: pd.DataFrame) -> None:
    """Only the columns selection needs are required (ep_hr3 is optional); a missing one is named
    together with the served name closest to it."""
    table = as_5xmm_table(canonical).drop(columns=["ep_hr3"]).rename(columns={"sum_flag": "sumflag"})
    with pytest.raises(UserError, match=r"looks like 5XMM but lacks columns sum_flag \(closest served names: "
                                        r"sum_flag ~ sumflag"):
        detect_schema(table.columns)
    assert detect_schema(table.columns, {"sum_flag": "sumflag"}) == SCHEMA_5XMM


def test_4xmm_adapter_round_trip(canonical: pd.DataFrame) -> None:
    upper = as_4xmm_table(canonical).rename(columns=str.upper)
    out = canonical_from_4xmm(upper, "DR14")
    assert list(out.columns) == list(CANONICAL_COLUMNS)
    pd.testing.assert_frame_equal(out, canonical)


def test_5xmm_adapter_keeps_detections_only(canonical: pd.DataFrame) -> None:
    stacked = as_5xmm_table(canonical)
    n_summary = int((stacked["n_obs"].fillna(0) > 0).sum())
    n_upper = int((stacked["pps_srcnum"].isna() & stacked["n_obs"].isna()).sum())
    assert n_summary == canonical["srcid"].nunique() and n_upper > 0
    assert len(stacked) == len(canonical) + n_summary + n_upper

    out = canonical_from_5xmm(stacked.rename(columns=str.upper), "DR15")
    assert list(out.columns) == list(CANONICAL_COLUMNS)
    assert len(out) == len(canonical)
    key = ["obs_id", "src_num"]
    out = out.sort_values(key).reset_index(drop=True)
    expected = canonical.sort_values(key).reset_index(drop=True)
    for name in ("srcid", "obs_id", "src_num", "pn_8_cts", "pn_filter", "mjd_start", "ep_hr2", "sum_flag",
                 "n_detections"):
        np.testing.assert_array_equal(out[name].to_numpy(), expected[name].to_numpy(), err_msg=name)
    # source-level values were null on the detection rows and come from the summary rows
    assert out["iauname"].str.startswith("5XMM J").all()
    assert (out["release"] == "DR15").all()


def test_5xmm_detid_is_synthesised_stably(canonical: pd.DataFrame) -> None:
    stacked = as_5xmm_table(canonical)
    first = canonical_from_5xmm(stacked, "DR15")
    shuffled = canonical_from_5xmm(stacked.sample(frac=1.0, random_state=3), "DR15")
    assert first["detid"].is_unique
    by_key = dict(zip(zip(first["obs_id"], first["src_num"]), first["detid"]))
    assert by_key == dict(zip(zip(shuffled["obs_id"], shuffled["src_num"]), shuffled["detid"]))
    assert by_key[("0100000201", 14)] == FIVEXMM_DETID_BASE + 100000201 * 10**5 + 14
    assert str(first["detid"].iloc[0]).startswith("5")


def test_5xmm_n_detections_override(canonical: pd.DataFrame) -> None:
    stacked = as_5xmm_table(canonical)
    one_obs = stacked[(stacked["obs_id"] == "0100000101") | (stacked["n_obs"].fillna(0) > 0)]
    srcid = int(canonical.loc[canonical["obs_id"] == "0100000101", "srcid"].iloc[0])
    out = canonical_from_5xmm(one_obs, "DR15", n_detections={srcid: 7})
    assert set(out["obs_id"]) == {"0100000101"}
    assert int(out.loc[out["srcid"] == srcid, "n_detections"].iloc[0]) == 7


def test_synthesised_detid_rejects_out_of_range_srcnum() -> None:
    with pytest.raises(UserError, match="PPS_SRCNUM"):
        synthesise_detid(pd.Series(["0123456789"]), pd.Series([100000]))


def test_release_adapter_dispatch(canonical: pd.DataFrame) -> None:
    assert len(canonical_from_release(as_4xmm_table(canonical), "DR14")) == len(canonical)
    assert canonical_from_release(as_5xmm_table(canonical), "DR15")["detid"].min() > FIVEXMM_DETID_BASE


def test_local_fits_catalogue(canonical: pd.DataFrame, tmp_path: Path) -> None:
    table = Table.from_pandas(as_4xmm_table(canonical).astype({"iauname": str, "obs_id": str,
                                                               "pn_filter": str, "pn_submode": str}))
    for name in table.colnames:
        table.rename_column(name, name.upper())
    table["EXTRA_COLUMN"] = np.arange(len(table))
    path = tmp_path / "4XMM_DR14cat_slim.fits.gz"
    table.write(path)
    out = read_catalogue_fits(path, release="DR14")
    pd.testing.assert_frame_equal(out, canonical)
    assert (read_catalogue_fits(path)["release"] == "4XMM").all()


def test_local_fits_catalogue_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        read_catalogue_fits(tmp_path / "absent.fits")
    Table({"RA": [1.0], "DEC": [2.0]}).write(tmp_path / "odd.fits")
    with pytest.raises(UserError, match="schema not recognised"):
        read_catalogue_fits(tmp_path / "odd.fits")


REAL_CATALOGUE = (Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real_pps"
                  / "test_catalogue.fits")


@pytest.fixture(scope="module")
def real_catalogue() -> Path:
    if not REAL_CATALOGUE.is_file():
        pytest.skip(f"real catalogue extract not found at {REAL_CATALOGUE} (../shared/data/real_pps)")
    return REAL_CATALOGUE


def test_real_4xmm_dr11s_extract_loads_with_defaults(real_catalogue: Path) -> None:
    """A real 4XMM-DR11s extract: SRCID, OBS_ID, DETID, SRC_NUM, PN_8_CTS, SUM_FLAG, SPECTRA (with
    nulls), source summary rows, no coordinates, hardness ratios, PN_ONTIME or EP_EXTENT."""
    import warnings

    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = Table.read(real_catalogue)
        with fits.open(real_catalogue) as hdus:
            spectra_bytes = np.asarray(hdus[1].data.base["SPECTRA"]).view(np.uint8)
    is_detection = ~np.ma.getmaskarray(reference["DETID"])
    out = read_catalogue_fits(real_catalogue)
    assert list(out.columns) == list(CANONICAL_COLUMNS)
    assert len(out) == int(is_detection.sum()) and out["detid"].is_unique
    np.testing.assert_array_equal(out["detid"], np.asarray(reference["DETID"])[is_detection])
    np.testing.assert_array_equal(out["src_num"], np.asarray(reference["SRC_NUM"])[is_detection])
    assert set(out["obs_id"]) == {str(o).strip() for o in reference["OBS_ID"][is_detection]}
    counts = np.ma.filled(reference["PN_8_CTS"][is_detection].astype(float), np.nan)
    np.testing.assert_array_equal(np.isnan(out["pn_8_cts"].to_numpy()), np.isnan(counts))
    flags = spectra_bytes[is_detection]
    assert out["has_spectrum"].isna().sum() == int((flags == 0).sum())
    assert int(out["has_spectrum"].sum()) == int((flags == ord("T")).sum()) > 0
    for name in ("pn_ontime", "ep_extent", "ra", "ep_hr1", "mjd_start"):
        assert out[name].isna().all(), name
    assert out["iauname"].isna().all() and (out["release"] == "4XMM").all()
    np.testing.assert_array_equal(out["n_detections"], out.groupby("srcid")["srcid"].transform("size"))


def test_real_extract_selects_on_counts_not_on_missing_columns(real_catalogue: Path) -> None:
    """No PN_ONTIME or EP_EXTENT column means unknown, not 'no pn exposure' or 'extended': the
    selection keeps the >300-count detections with SUM_FLAG <= 2, drops those without pn counts."""
    from xmm_pipeline.spectra.preprocess import PreprocessConfig, select_detections

    out = read_catalogue_fits(real_catalogue)
    selected, dropped = select_detections(out, PreprocessConfig())
    expected = out[(out["pn_8_cts"] > 300) & (out["sum_flag"] <= 2)]
    assert len(expected) >= 3
    assert sorted(selected["detid"]) == sorted(expected["detid"])
    assert dropped["no_pn_exposure"] == int(out["pn_8_cts"].isna().sum()) > 0
    assert dropped["extended"] == 0
    lenient, _ = select_detections(out, PreprocessConfig(min_counts=50))
    assert len(lenient) > len(selected)


def test_catalogue_with_only_the_required_columns(canonical: pd.DataFrame, tmp_path: Path) -> None:
    from xmm_pipeline.archive.catalogue import REQUIRED_COLUMNS

    table = Table.from_pandas(as_4xmm_table(canonical)[list(REQUIRED_COLUMNS)].astype({"obs_id": str}))
    path = tmp_path / "minimal.fits"
    table.write(path)
    out = read_catalogue_fits(path, release="mine")
    assert len(out) == len(canonical) and (out["release"] == "mine").all()
    np.testing.assert_array_equal(out["pn_8_cts"], canonical["pn_8_cts"])
    assert out["pn_ontime"].isna().all() and out["has_spectrum"].isna().all()
    without = Table.from_pandas(as_4xmm_table(canonical)[["detid", "srcid", "obs_id", "src_num", "sum_flag"]]
                                .astype({"obs_id": str}).rename(columns={"src_num": "src_no"}))
    without.write(tmp_path / "lacking.fits")
    with pytest.raises(UserError) as error:
        read_catalogue_fits(tmp_path / "lacking.fits")
    message = str(error.value)
    assert "\n" not in message and "lacking.fits" in message
    assert "src_num ~ src_no" in message and "pn_8_cts ~ (none close)" in message


def test_every_adapter_reads_its_own_names(canonical: pd.DataFrame) -> None:
    from xmm_pipeline.archive.catalogue import (
        ADAPTER_4XMM,
        ADAPTER_5XMM,
        ADAPTER_HEASARC_XMMSSC,
        ADAPTER_HEASARC_XMMSTACK,
        choose_adapter,
    )
    from xmm_pipeline_tests.archive.servers import as_5xmm_named_table, as_heasarc_table

    flavours = [
        (ADAPTER_4XMM, as_4xmm_table(canonical)),
        (ADAPTER_5XMM, as_5xmm_named_table(canonical)),
        (ADAPTER_HEASARC_XMMSSC, as_heasarc_table(canonical)),
        (ADAPTER_HEASARC_XMMSTACK, as_heasarc_table(canonical, stacked=True)),
    ]
    four = canonical_from_release(as_4xmm_table(canonical), "R").sort_values("detid").reset_index(drop=True)
    five = canonical_from_release(as_5xmm_table(canonical), "R").sort_values("detid").reset_index(drop=True)
    for adapter, table in flavours:
        chosen, _ = choose_adapter(table.columns)
        assert chosen is adapter, (adapter.name, chosen.name)
        out = canonical_from_release(table, "R").sort_values("detid").reset_index(drop=True)
        pd.testing.assert_frame_equal(out, five if adapter.family == SCHEMA_5XMM else four, obj=adapter.name)
