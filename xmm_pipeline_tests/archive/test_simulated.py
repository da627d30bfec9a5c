"""The simulated archive: files like the XSA's, a catalogue consistent with its spectra, determinism,
releases, the Archive interface and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.table import Table

from xmm_pipeline.archive import instrument, simulated, sources
from xmm_pipeline.archive.catalogue import CANONICAL_COLUMNS, FOURXMM_COLUMNS, canonical_from_4xmm
from xmm_pipeline.archive.products import responses_dir, spectral_product_paths
from xmm_pipeline.archive.simulated import (
    BANDS_KEV,
    SimulatedArchive,
    release_fingerprint,
    simulate_archive,
    simulate_observation,
)
from xmm_pipeline.cli import main
from xmm_pipeline.errors import UserError
from xmm_pipeline.ogip.read import read_pha
from xmm_pipeline.spectra.preprocess import find_rmf

REAL_PPS_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "real_pps" / "0677180601" / "pps"


@pytest.fixture(scope="module")
def real_pps_dir() -> Path:
    if not any(REAL_PPS_DIR.glob("*SRSPEC*.FTZ")):
        pytest.skip(f"real PPS products not found at {REAL_PPS_DIR} (../shared/data/real_pps)")
    return REAL_PPS_DIR


@pytest.fixture(scope="module")
def catalogue(sim_archive: Path) -> pd.DataFrame:
    return pd.read_parquet(sim_archive / "catalogue.parquet")


@pytest.fixture(scope="module")
def truth(sim_archive: Path) -> pd.DataFrame:
    return pd.read_parquet(sim_archive / "truth.parquet")


@pytest.fixture(scope="module")
def spectra(sim_archive: Path, catalogue: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """A sample of the written spectra with their net band counts (source minus scaled background)."""
    with_spectrum = catalogue[truth["has_spectrum"].to_numpy()]
    sample = with_spectrum.sample(n=min(150, len(with_spectrum)), random_state=0)
    clo, chi = instrument.channel_bounds_kev()
    centre = 0.5 * (clo + chi)
    rows = []
    for record in sample.itertuples():
        paths = spectral_product_paths(sim_archive, record.obs_id, record.src_num)
        with fits.open(paths["SRSPEC"]) as src, fits.open(paths["BGSPEC"]) as bkg:
            counts = src["SPECTRUM"].data["COUNTS"].astype(float)
            background = bkg["SPECTRUM"].data["COUNTS"].astype(float)
            scale = src["SPECTRUM"].header["BACKSCAL"] / bkg["SPECTRUM"].header["BACKSCAL"]
        bands = [((centre >= a) & (centre < b)) for a, b in [*BANDS_KEV, (0.2, 12.0)]]
        rows.append(
            {
                "detid": record.detid,
                "net": [counts[m].sum() - scale * background[m].sum() for m in bands],
                "variance": [counts[m].sum() + scale**2 * background[m].sum() + 1.0 for m in bands],
                # spectrum minus catalogue = the background model's expectation in the source region
                # (what the catalogue subtracts) minus the scaled background spectrum (what we subtract)
                "background_variance": [scale**2 * background[m].sum() + 1.0 for m in bands],
            }
        )
    return sample.merge(pd.DataFrame(rows), on="detid")


def test_catalogue_has_the_4xmm_columns_and_types(sim_archive: Path, catalogue: pd.DataFrame) -> None:
    with fits.open(sim_archive / "catalogue.fits") as hdus:
        columns = hdus[1].columns
        names = set(columns.names)
        assert {name.upper() for name in FOURXMM_COLUMNS} <= names
        assert {f"PN_{i}_RATE" for i in range(1, 6)} <= names
        formats = {c.name: c.format for c in columns}
        assert formats["DETID"] == "K" and formats["SRCID"] == "K" and formats["SC_RA"] == "D"
        assert formats["IAUNAME"] == "21A" and formats["SUM_FLAG"] == "I" and formats["PN_8_CTS"] == "E"
    fits_table = Table.read(sim_archive / "catalogue.fits").to_pandas()
    for name in ("IAUNAME", "OBS_ID", "PN_FILTER", "PN_SUBMODE"):
        fits_table[name] = fits_table[name].str.decode("ascii")
    assert list(catalogue.columns) == list(CANONICAL_COLUMNS)
    pd.testing.assert_frame_equal(canonical_from_4xmm(fits_table, release="4XMM-DR14"), catalogue)
    assert len(catalogue) == 1500 and catalogue["detid"].is_unique
    assert catalogue["iauname"].str.match(r"^4XMM J\d{6}\.\d[+-]\d{6}$").all()
    assert set(catalogue["pn_filter"]) == {"Thin1", "Medium", "Thick"}
    per_source = catalogue.groupby("srcid")
    assert (per_source["n_detections"].first() == per_source.size()).all()
    assert (per_source["iauname"].nunique() == 1).all()
    assert (catalogue["mjd_stop"] > catalogue["mjd_start"]).all()
    assert catalogue["mjd_start"].between(51575.0, 60309.0).all()


def test_products_read_back_as_pipeline_ogip_files(
    sim_archive: Path, catalogue: pd.DataFrame, truth: pd.DataFrame
) -> None:
    sample = catalogue[truth["has_spectrum"].to_numpy()].head(25)
    for record in sample.itertuples():
        paths = spectral_product_paths(sim_archive, record.obs_id, record.src_num)
        with fits.open(paths["SRSPEC"]) as hdus:
            hdus.verify("exception")
            header = hdus["SPECTRUM"].header
            data = hdus["SPECTRUM"].data
            for key, value in {
                "HDUCLASS": "OGIP",
                "HDUCLAS1": "SPECTRUM",
                "HDUCLAS2": "TOTAL",
                "HDUCLAS3": "COUNT",
                "CHANTYPE": "PI",
                "TELESCOP": "XMM",
                "INSTRUME": "EPN",
                "DETCHANS": 4096,
                "POISSERR": True,
                "FILTER": record.pn_filter,
                "OBS_ID": record.obs_id,
                "SUBMODE": record.pn_submode,
            }.items():
                assert header[key] == value, key
            assert np.array_equal(data["CHANNEL"], np.arange(4096))
            assert data["COUNTS"].dtype.kind == "i" and data["COUNTS"].min() >= 0
            livetime = instrument.livetime_fraction(record.pn_submode)
            assert header["EXPOSURE"] == pytest.approx(record.pn_ontime * livetime, rel=1e-5)
            assert header["BACKFILE"] == paths["BGSPEC"].name and header["ANCRFILE"] == paths["SRCARF"].name
            assert header["RESPFILE"].startswith("epn_e3_") and header["RESPFILE"].endswith(".rmf")
            rmf = find_rmf(header["RESPFILE"], paths["SRSPEC"].parent, responses_dir(sim_archive))
            assert rmf is not None and rmf.name == header["RESPFILE"][:-4] + "_v21.0.rmf"
            source_backscal = header["BACKSCAL"]
        with fits.open(paths["BGSPEC"]) as hdus:
            assert hdus["SPECTRUM"].header["HDUCLAS2"] == "BKG"
            assert 3.0 <= hdus["SPECTRUM"].header["BACKSCAL"] / source_backscal <= 10.0
        with fits.open(paths["SRCARF"]) as hdus:
            arf = hdus["SPECRESP"].data
            assert len(arf) == 2067 and hdus["SPECRESP"].header["HDUCLAS2"] == "SPECRESP"
            assert 100.0 < arf["SPECRESP"][np.searchsorted(arf["ENERG_LO"], 1.0)] < 1400.0
    with fits.open(next(responses_dir(sim_archive).glob("*.rmf"))) as hdus:
        hdus.verify("exception")
        assert hdus["MATRIX"].header["HDUCLAS3"] == "REDIST" and hdus["MATRIX"].header["TLMIN4"] == 0
        assert len(hdus["EBOUNDS"].data) == 4096


def _quality_column(path: Path) -> np.ndarray | None:
    with fits.open(path) as hdus:
        data, header = hdus["SPECTRUM"].data, hdus["SPECTRUM"].header
        assert header["QUALITY"] == 0
        return np.asarray(data["QUALITY"]) if "QUALITY" in data.columns.names else None


def test_products_carry_the_quality_flags_of_real_pipeline_products(
    sim_archive: Path, catalogue: pd.DataFrame, truth: pd.DataFrame, real_pps_dir: Path
) -> None:
    """Real SRSPECs flag channels 0-60 with QUALITY = 1 (specgroup setbad 0-0.32 keV); real BGSPECs
    have no QUALITY column (keyword QUALITY = 0). The simulated products do the same."""
    real_flags = {}
    for path in sorted(real_pps_dir.glob("*SRSPEC*.FTZ")):
        quality = _quality_column(path)
        assert quality is not None
        real_flags[path.name] = (tuple(np.flatnonzero(quality)), tuple(np.unique(quality[quality != 0])))
    assert len(set(real_flags.values())) == 1
    flagged, values = next(iter(real_flags.values()))
    assert all(_quality_column(path) is None for path in real_pps_dir.glob("*BGSPEC*.FTZ"))
    sample = catalogue[truth["has_spectrum"].to_numpy()].head(20)
    for record in sample.itertuples():
        paths = spectral_product_paths(sim_archive, record.obs_id, record.src_num)
        quality = _quality_column(paths["SRSPEC"])
        assert quality is not None and quality.dtype.kind == "i"
        assert tuple(np.flatnonzero(quality)) == flagged
        assert tuple(np.unique(quality[quality != 0])) == values
        assert _quality_column(paths["BGSPEC"]) is None
        assert np.array_equal(np.flatnonzero(read_pha(paths["SRSPEC"]).quality), np.array(flagged))
        assert not read_pha(paths["BGSPEC"]).quality.any()


def test_spectra_counts_match_the_catalogue_and_the_truth(spectra: pd.DataFrame, truth: pd.DataFrame) -> None:
    net = np.array([row[-1] for row in spectra["net"]])
    variance = np.array([row[-1] for row in spectra["background_variance"]])
    z_catalogue = (net - spectra["pn_8_cts"].to_numpy()) / np.sqrt(variance)
    assert abs(z_catalogue.mean()) < 0.3 and 0.6 < z_catalogue.std() < 1.4 and np.abs(z_catalogue).max() < 5
    expected = spectra.merge(truth[["detid", "expected_counts"]], on="detid")
    # spectra exist for PN_8_CTS >= 100: near that threshold only upward fluctuations have one (a
    # selection bias of ~+0.2 sigma over all spectra), so the truth is compared well above it
    expected = expected[expected["expected_counts"] > 2 * simulated.MIN_SPECTRUM_COUNTS]
    assert len(expected) > 40
    z_truth = (expected["pn_8_cts"] - expected["expected_counts"]) / np.sqrt(expected["expected_counts"])
    assert abs(z_truth.mean()) < 0.3 and 0.6 < z_truth.std() < 1.4


def test_hardness_ratios_agree_with_the_spectra(spectra: pd.DataFrame) -> None:
    pulls = []
    for record in spectra.itertuples():
        net = np.maximum(np.array(record.net[:5]), 0.0)
        variance = np.array(record.variance[:5])
        for i in range(4):
            soft, hard = net[i], net[i + 1]
            if soft + hard < 20:
                continue
            hr = (hard - soft) / (hard + soft)
            error = 2.0 * np.sqrt(hard**2 * variance[i] + soft**2 * variance[i + 1]) / (hard + soft) ** 2
            pulls.append((hr - getattr(record, f"ep_hr{i + 1}")) / error)
    pulls = np.array(pulls)
    assert len(pulls) > 200
    assert np.mean(np.abs(pulls) < 3.0) > 0.97


def test_products_exist_exactly_for_extracted_detections(
    sim_archive: Path, catalogue: pd.DataFrame, truth: pd.DataFrame
) -> None:
    present = np.array(
        [
            spectral_product_paths(sim_archive, r.obs_id, r.src_num)["SRSPEC"].is_file()
            for r in catalogue.itertuples()
        ]
    )
    assert np.array_equal(present, truth["has_spectrum"].to_numpy())
    assert not (present & (catalogue["pn_8_cts"].to_numpy() < 100)).any()
    bright = catalogue[catalogue["pn_8_cts"] >= 100]
    without = set(bright["obs_id"]) - set(catalogue.loc[present, "obs_id"])
    assert 0 < len(without) < 0.1 * bright["obs_id"].nunique()


def test_classes_odd_spectra_and_the_changing_look_agn(catalogue: pd.DataFrame, truth: pd.DataFrame) -> None:
    per_source = truth.drop_duplicates("srcid")["class"].value_counts(normalize=True)
    assert 0.35 < per_source["AGN"] < 0.6 and 0.3 < per_source["star"] < 0.5
    assert set(truth["class"]) == {"AGN", "star", "CV", "XRB", "ULX", "NS", "pulsar", "TDE", "odd"}
    assert truth["is_odd"].sum() >= 2 and (truth["is_odd"] == (truth["class"] == "odd")).all()
    params = truth["params_json"].map(json.loads)
    assert (params.map(lambda p: p["class"]) == truth["class"]).all()
    multi = catalogue.groupby("srcid").size()
    assert 0.1 < (multi > 1).mean() < 0.3

    cl = truth[truth["is_changing_look"]].sort_values("mjd")
    assert cl["srcid"].nunique() == 1 and len(cl) >= 6
    assert set(cl["iauname"]) == {"4XMM J192719.5+653354"}
    row = catalogue[catalogue["detid"] == cl["detid"].iloc[0]].iloc[0]
    assert row["sc_ra"] == pytest.approx(291.8313) and row["sc_dec"] == pytest.approx(65.5650)
    states = cl["state"].tolist()
    soft = [i for i, s in enumerate(states) if s == "soft_bb"]
    assert soft and states[0] != "soft_bb" and states[-1] != "soft_bb"
    temperatures = [json.loads(p)["bb_only_kt_kev"] for p in cl["params_json"].iloc[soft]]
    assert temperatures == sorted(temperatures) and temperatures[0] == pytest.approx(0.08)


def test_selection_removes_a_realistic_share(catalogue: pd.DataFrame) -> None:
    counts = catalogue["pn_8_cts"]
    assert counts.quantile(0.05) < 60 and counts.max() > 2e4
    bright = catalogue[counts > 300]
    assert 0.15 < len(bright) / len(catalogue) < 0.4
    kept = bright[(bright["sum_flag"] < 3) & (bright["ep_extent"] == 0)]
    assert 0.6 < len(kept) / len(bright) < 0.95


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_and_dr15_keeps_dr14(tmp_path: Path) -> None:
    first = simulate_archive(tmp_path / "a", "DR14", 120, 11)
    simulate_archive(tmp_path / "b", "DR14", 120, 11)
    dr14 = _files(tmp_path / "a")
    assert dr14 == _files(tmp_path / "b")
    assert first.n_detections == 120 and first.fingerprint == release_fingerprint("DR14", 120, 11)

    summary = simulate_archive(tmp_path / "c", "DR15", 120, 11)
    dr15 = _files(tmp_path / "c")
    assert summary.n_detections > 120 and summary.n_reprocessed >= 1
    truth = pd.read_parquet(tmp_path / "c" / "truth.parquet")
    reprocessed = set(truth.loc[truth["reprocessed"], "obs_id"])
    products = [name for name in dr14 if name.endswith(".FTZ")]
    changed = {name.split("/")[0] for name in products if dr15.get(name) != dr14[name]}
    assert changed and changed <= reprocessed
    assert all(dr15[name] == dr14[name] for name in dr14 if name.startswith("responses"))
    old = pd.read_parquet(tmp_path / "a" / "catalogue.parquet")
    new = pd.read_parquet(tmp_path / "c" / "catalogue.parquet")
    added = new[~new["detid"].isin(old["detid"])]
    assert len(added) > 0 and added["mjd_start"].min() > old["mjd_start"].max()
    merged = old.merge(new, on="detid", suffixes=("", "_15"))
    differs = merged["pn_8_cts"] != merged["pn_8_cts_15"]
    assert set(merged.loc[differs, "obs_id"]) <= reprocessed and differs.any()

    simulate_archive(tmp_path / "a", "DR15", 120, 11)  # DR15 over DR14 in place: same as a fresh DR15
    assert _files(tmp_path / "a") == dr15


def test_simulated_archive_interface(tmp_path: Path) -> None:
    archive = SimulatedArchive(tmp_path / "root", release="DR14", n_detections=60, seed=2)
    fingerprint = archive.release_fingerprint()
    assert fingerprint.startswith("sim-DR14-") and not (tmp_path / "root").exists()
    frame = archive.fetch_catalogue()
    assert list(frame.columns) == list(CANONICAL_COLUMNS) and len(frame) == 60
    release = json.loads((tmp_path / "root" / "release.json").read_text())
    assert release["fingerprint"] == fingerprint and release["seed"] == 2
    stamp = (tmp_path / "root" / "release.json").stat().st_mtime_ns
    archive.fetch_catalogue()
    assert (tmp_path / "root" / "release.json").stat().st_mtime_ns == stamp
    truth = pd.read_parquet(tmp_path / "root" / "truth.parquet")
    with_products = sorted(set(truth.loc[truth["has_spectrum"], "obs_id"]))
    records = archive.fetch_observations([*with_products, "0999999999"])
    assert [r.obs_id for r in records if r.reason.startswith("observation not in")] == ["0999999999"]
    assert not {r.obs_id for r in records} & set(with_products)
    assert SimulatedArchive(tmp_path / "root", "DR15", 60, 2).release_fingerprint() != fingerprint
    with pytest.raises(UserError, match="unknown release"):
        SimulatedArchive(tmp_path, release="DR99")


def test_simulate_observation_writes_one_detection(tmp_path: Path) -> None:
    params = {"class": "AGN", "photon_index": 1.9, "nh_cm2": 3e20, "flux_erg_cm2_s": 2e-12}
    totals = []
    for obs_id, exposure, pn_filter in [("0100000101", 10_000.0, "Thin1"), ("0100000201", 40_000.0, "Thick")]:
        path = simulate_observation(
            tmp_path,
            params,
            exposure_s=exposure,
            pn_filter=pn_filter,
            off_axis_arcmin=2.0,
            obs_id=obs_id,
            src_num=5,
            seed=1,
        )
        assert path == spectral_product_paths(tmp_path, obs_id, 5)["SRSPEC"]
        assert all(p.is_file() for p in spectral_product_paths(tmp_path, obs_id, 5).values())
        with fits.open(path) as hdus:
            assert hdus["SPECTRUM"].header["FILTER"] == pn_filter
            respfile = hdus["SPECTRUM"].header["RESPFILE"]
            assert find_rmf(respfile, path.parent, responses_dir(tmp_path)) is not None
            totals.append(hdus["SPECTRUM"].data["COUNTS"].sum())
    assert 2.0 < totals[1] / totals[0] < 4.0  # 4x the exposure, less soft area with the Thick filter
    with pytest.raises(UserError, match="filter"):
        simulate_observation(
            tmp_path,
            params,
            exposure_s=1e4,
            pn_filter="Open",
            off_axis_arcmin=0.0,
            obs_id="0100000301",
            src_num=1,
            seed=1,
        )


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--release", "DR99", "--detections", "10"], "unknown release"),
        (["--detections", "0"], "positive"),
        (["--detections", "-5"], "positive"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(
    arguments: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", *arguments, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error
    assert not (tmp_path / "out").exists()


def test_cli_unwritable_directory_and_success(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["simulate", "--detections", "10", "--out", str(blocker / "archive")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "cannot write" in error
    assert main(["simulate", "--detections", "25", "--seed", "4", "--out", str(tmp_path / "ok")]) == 0
    assert "25 detections" in capsys.readouterr().out
    assert (tmp_path / "ok" / "release.json").is_file()


def test_odd_fraction_is_a_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    default = sources.class_fractions()
    assert default == sources.CLASS_FRACTIONS and sum(default.values()) == pytest.approx(1.0)
    many = sources.class_fractions(0.25)
    assert many["odd"] == 0.25 and sum(many.values()) == pytest.approx(1.0)
    assert many["AGN"] / many["star"] == pytest.approx(default["AGN"] / default["star"])
    summary = simulate_archive(tmp_path / "odd", "DR14", 200, 3, odd_fraction=0.25)
    truth = pd.read_parquet(tmp_path / "odd" / "truth.parquet")
    plain = pd.read_parquet(simulate_archive(tmp_path / "plain", "DR14", 200, 3).out_dir / "truth.parquet")
    assert truth["is_odd"].mean() > 0.08 > 0.03 > plain["is_odd"].mean()  # targets and epochs dilute it
    assert summary.fingerprint == release_fingerprint("DR14", 200, 3, 0.25)
    assert summary.fingerprint != release_fingerprint("DR14", 200, 3)
    assert json.loads((tmp_path / "odd" / "release.json").read_text())["odd_fraction"] == 0.25
    assert SimulatedArchive(tmp_path / "odd", "DR14", 200, 3, odd_fraction=0.25).ensure_simulated().skipped
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(UserError, match="odd fraction"):
            simulate_archive(tmp_path / "bad", "DR14", 10, 0, odd_fraction=bad)
    assert main(["simulate", "--detections", "10", "--odd-fraction", "2", "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--odd-fraction" in error and not (tmp_path / "x").exists()
    args = ["simulate", "--detections", "200", "--seed", "3", "--odd-fraction", "0.25", "--out"]
    assert main([*args, str(tmp_path / "cli")]) == 0
    assert _files(tmp_path / "cli") == _files(tmp_path / "odd")


def test_worker_processes_write_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulated, "CHUNK_DETECTIONS", 40)
    simulate_archive(tmp_path / "one", "DR14", 150, 8, workers=1)
    simulate_archive(tmp_path / "two", "DR14", 150, 8, workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
