"""The real PPS observation in ../shared/data/real_pps, preprocessed in place without a catalogue.

Its six pn sources name four canned matrices (RESPFILE epn_e3_ff20_sdY6/7/8/9.rmf) of which only sdY9
is at hand (../shared/data/real_pn/canned): five spectra must end in the quarantine naming the missing
matrix, source 004 must be binned. Expected values are read from the files with astropy, not with the
project's readers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from xmm_pipeline.cli import main
from xmm_pipeline.spectra.preprocess import (
    PreprocessConfig,
    catalogue_from_products,
    preprocess_archive,
    product_detid,
)
from xmm_pipeline_tests.conftest import REPO_ROOT

REAL_PPS_DIR = REPO_ROOT.parent / "shared" / "data" / "real_pps"
OBS_ID = "0677180601"
SOURCES = (0x002, 0x003, 0x004, 0x007, 0x009, 0x019)
MATCHED = 0x004
CANNED = "epn_e3_ff20_sdY9_v19.0.rmf"


@pytest.fixture(scope="module")
def real_pps_dir() -> Path:
    if not (REAL_PPS_DIR / OBS_ID / "pps").is_dir():
        pytest.skip(
            f"real PPS products not found at {REAL_PPS_DIR} (../shared/data/real_pps beside the checkout)"
        )
    return REAL_PPS_DIR


@pytest.fixture()
def archive(real_pps_dir: Path, real_pn_dir: Path, tmp_path: Path) -> Path:
    """The archive layout, by symlinks: <obs_id>/pps/ and responses/PN/ with the one canned matrix."""
    root = tmp_path / "archive"
    (root / "responses" / "PN").mkdir(parents=True)
    (root / OBS_ID).symlink_to(real_pps_dir / OBS_ID, target_is_directory=True)
    (root / "responses" / "PN" / CANNED).symlink_to(real_pn_dir / "canned" / CANNED)
    return root


def _spectrum(real_pps_dir: Path, src_num: int, kind: str = "SRSPEC") -> Path:
    return real_pps_dir / OBS_ID / "pps" / f"P{OBS_ID}PNS003{kind}0{src_num:03X}.FTZ"


def _respfile(real_pps_dir: Path, src_num: int) -> str:
    return str(fits.getheader(_spectrum(real_pps_dir, src_num), "SPECTRUM")["RESPFILE"]).strip()


def _net_counts(real_pps_dir: Path, src_num: int) -> float:
    """Good-quality 0.2-12 keV net counts by astropy (pn PI channel = 5 eV), background scaled."""
    with (
        fits.open(_spectrum(real_pps_dir, src_num)) as source,
        fits.open(_spectrum(real_pps_dir, src_num, "BGSPEC")) as background,
    ):
        s, b = source["SPECTRUM"], background["SPECTRUM"]
        energy = s.data["CHANNEL"] * 0.005
        use = (s.data["QUALITY"] == 0) & (energy >= 0.2) & (energy < 12.0)
        scale = (s.header["EXPOSURE"] * s.header["BACKSCAL"]) / (b.header["EXPOSURE"] * b.header["BACKSCAL"])
        return float(s.data["COUNTS"][use].sum() - scale * b.data["COUNTS"][use].sum())


def test_the_observation_preprocesses_with_five_quarantined_and_one_binned(
    archive: Path, real_pps_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "spectra"
    summary = preprocess_archive(archive, out, PreprocessConfig(min_counts=50))
    assert (summary.catalogue_rows, summary.selected, summary.written, summary.quarantined) == (6, 6, 1, 5)
    assert "own net counts" in summary.selection and "> 50" in summary.selection
    assert any("own net counts" in line for line in summary.lines())
    assert "own net counts" in json.loads((out / "selection.json").read_text())["selection"]

    quarantine = pd.read_parquet(out / "quarantine.parquet")
    assert sorted(quarantine["detid"]) == sorted(product_detid(OBS_ID, s) for s in SOURCES if s != MATCHED)
    for src_num in SOURCES:
        if src_num == MATCHED:
            continue
        respfile = _respfile(real_pps_dir, src_num)
        assert respfile.startswith(("epn_e3_ff20_sdY6", "epn_e3_ff20_sdY7", "epn_e3_ff20_sdY8"))
        row = quarantine[quarantine["detid"] == product_detid(OBS_ID, src_num)].iloc[0]
        assert f"RMF {respfile} not found" in row["reason"]
        assert Path(row["path"]).name == _spectrum(real_pps_dir, src_num).name

    table = pd.read_parquet(out / "spectra" / f"{OBS_ID}.parquet")
    assert table["src_num"].tolist() == [MATCHED]
    row = table.iloc[0]
    assert (
        row["detid"] == product_detid(OBS_ID, MATCHED)
        and row["spectrum_file"] == _spectrum(real_pps_dir, MATCHED).name
    )
    assert pd.read_parquet(out / "responses.parquet")["rmf_id"].tolist() == [row["rmf_id"]]  # sdY9 alone
    assert row["pn_submode"] == "PrimeFullWindow" and row["pn_filter"] == "Thin1"
    date_obs = pd.Timestamp(fits.getheader(_spectrum(real_pps_dir, MATCHED))["DATE-OBS"])
    assert abs(row["mjd_start"] - (date_obs - pd.Timestamp("1858-11-17")) / pd.Timedelta(days=1)) < 1e-6
    # Binned: the good channels inside the 0.3-10 keV grid, by the canned EBOUNDS (astropy).
    with (
        fits.open(_spectrum(real_pps_dir, MATCHED)) as source,
        fits.open(archive / "responses" / "PN" / CANNED) as rmf,
    ):
        ebounds = rmf["EBOUNDS"].data
        mid = 0.5 * (ebounds["E_MIN"] + ebounds["E_MAX"])
        data = source["SPECTRUM"].data
        in_grid = (mid >= 0.3) & (mid < 10.0)
        good = data["QUALITY"] == 0
        assert int(np.sum(row["counts"])) == int(data["COUNTS"][in_grid & good].sum()) > 150
        assert 0 < row["total_counts"] <= int(np.sum(row["counts"]))
        assert row["n_bad_channels"] == int((in_grid & ~good).sum()) > 0  # channels 0-60 are flagged
        # The bins holding flagged channels (0.300-0.325 keV) and the bin no channel feeds are masked.
        edges = np.geomspace(0.3, 10.0, 239)
        bins = np.searchsorted(edges, mid, side="right") - 1
        flagged = np.unique(bins[in_grid & ~good])
        fed = np.unique(bins[in_grid])
        valid = np.asarray(row["valid"], dtype=bool)
        assert not valid[flagged].any() and not np.delete(valid, fed).any()
        assert valid[fed[~np.isin(fed, flagged)]].all()
    assert np.isfinite(row["log10_flux"]) and -15 < row["log10_flux"] < -11

    again = preprocess_archive(archive, out, PreprocessConfig(min_counts=50))
    assert again.observations_skipped == 1 and again.written == 1 and again.quarantined == 5


def test_selection_on_the_products_own_net_counts(archive: Path, real_pps_dir: Path, tmp_path: Path) -> None:
    rows = catalogue_from_products(archive).set_index("src_num")
    assert sorted(rows.index) == list(SOURCES)
    for src_num in SOURCES:
        assert rows.loc[src_num, "product_net_counts"] == pytest.approx(
            _net_counts(real_pps_dir, src_num), rel=1e-6
        )
        assert rows.loc[src_num, "detid"] == rows.loc[src_num, "srcid"] == product_detid(OBS_ID, src_num)
    summary = preprocess_archive(archive, tmp_path / "out", PreprocessConfig(min_counts=300))
    above = [s for s in SOURCES if _net_counts(real_pps_dir, s) > 300]
    assert above == [0x002, 0x003]
    assert summary.selected == len(above) and summary.dropped["low_counts"] == len(SOURCES) - len(above)


def test_timing_mode_and_mos_products_are_quarantined_with_the_reason(
    real_pps_dir: Path, real_pn_dir: Path, tmp_path: Path
) -> None:
    """A copy of the observation where source 004 is a timing-mode spectrum and 003 a MOS one."""
    root = tmp_path / "archive"
    pps = root / OBS_ID / "pps"
    shutil.copytree(real_pps_dir / OBS_ID / "pps", pps)
    for src_num, header in (
        (MATCHED, {"DATAMODE": "TIMING", "SUBMODE": "FastTiming"}),
        (0x003, {"INSTRUME": "EMOS1"}),
    ):
        path = pps / _spectrum(real_pps_dir, src_num).name
        with fits.open(_spectrum(real_pps_dir, src_num)) as hdus:
            hdus[0].header.update(header)
            hdus["SPECTRUM"].header.update({k: v for k, v in header.items() if k in hdus["SPECTRUM"].header})
            hdus.writeto(path, overwrite=True)
    summary = preprocess_archive(
        root, tmp_path / "out", PreprocessConfig(min_counts=50), responses_dir=real_pn_dir / "canned"
    )
    assert (summary.written, summary.quarantined) == (0, 6)
    reasons = pd.read_parquet(tmp_path / "out" / "quarantine.parquet").set_index("detid")["reason"]
    assert "DATAMODE = TIMING: only pn IMAGING" in reasons[product_detid(OBS_ID, MATCHED)]
    assert "INSTRUME = EMOS1: not an EPIC-pn spectrum" in reasons[product_detid(OBS_ID, 0x003)]


def test_cli_preprocess_of_a_products_folder(
    real_pps_dir: Path, real_pn_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / OBS_ID).symlink_to(real_pps_dir / OBS_ID, target_is_directory=True)
    out = tmp_path / "out"
    argv = [
        "preprocess",
        "--archive",
        str(root),
        "--out",
        str(out),
        "--min-counts",
        "50",
        "--responses",
        str(real_pn_dir / "canned"),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "selection: no catalogue.parquet: selected on the products' own net counts" in printed
    assert "written: 1" in printed and "quarantined: 5" in printed
    assert main([*argv[:-1], str(tmp_path / "nowhere")]) == 2
    assert "responses folder not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["preprocess", "--archive", str(empty), "--out", str(tmp_path / "o2")]) == 2
    assert "no catalogue" in capsys.readouterr().err
    for too_deep in (real_pps_dir / OBS_ID / "pps", real_pps_dir / OBS_ID):
        assert main(["preprocess", "--archive", str(too_deep), "--out", str(tmp_path / "o3")]) == 2
        err = capsys.readouterr().err
        assert "ARCHIVE/<obs_id>/pps/: pass the folder above <obs_id>" in err and str(real_pps_dir) in err
        assert err.count("\n") == 1
