"""Selection, per-observation Parquet, quarantine, idempotence and unfolding on written OGIP products."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from xmm_pipeline import storage
from xmm_pipeline.archive.catalogue import CANONICAL_COLUMNS, as_canonical
from xmm_pipeline.cli import main
from xmm_pipeline.errors import ProductError
from xmm_pipeline.spectra import preprocess as preprocess_module
from xmm_pipeline.spectra.dataset import load_dataset
from xmm_pipeline.spectra.preprocess import (
    PreprocessConfig,
    ResponseCache,
    preprocess_archive,
    preprocess_observation,
    select_detections,
    spectrum_to_dataset,
)
from xmm_pipeline_tests.spectra.synthetic_ogip import product_name, write_archive

NORM = 2e-3  # photons/cm^2/s/keV at 1 keV: ~40,000 counts in 20 ks
INDEX = 1.9
OBS_A, OBS_B = "0100000001", "0100000002"


@pytest.fixture(scope="module")
def base_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    sources = [dict(obs_id=OBS_A, src_num=n, detid=100 + n, srcid=1000 + n, norm=NORM) for n in (1, 2, 26)]
    sources += [
        dict(obs_id=OBS_B, src_num=n, detid=200 + n, srcid=2000 + n, norm=NORM / 4) for n in range(1, 7)
    ]
    write_archive(root, sources)
    return root


@pytest.fixture
def archive(base_archive: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base_archive, tmp_path / "archive"))


def _catalogue(**columns) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    frame = pd.DataFrame({name: [0] * n for name in CANONICAL_COLUMNS})
    frame["iauname"] = "x"
    frame["obs_id"] = "0000000001"
    frame["pn_ontime"] = 1000.0
    frame["pn_8_cts"] = 1000.0
    for name, values in columns.items():
        frame[name] = values
    return as_canonical(frame)


def test_selection_counts_every_drop_once_by_first_reason() -> None:
    catalogue = _catalogue(
        detid=np.arange(8),
        srcid=[1, 2, 3, 4, 5, 6, 6, 7],
        src_num=np.arange(8),
        pn_ontime=[1000, 0, 1000, 1000, 1000, 1000, 1000, 1000],
        sum_flag=[0, 3, 3, 1, 2, 0, 0, 0],
        ep_extent=[0, 0, 0, 6.0, np.nan, 0, 0, 0],
        pn_8_cts=[5000, 5000, 100, 5000, 300, 800, 900, 301],
    )
    selected, dropped = select_detections(catalogue, PreprocessConfig())
    assert dropped == {
        "no_pn_exposure": 1,
        "flagged": 1,
        "extended": 1,
        "low_counts": 1,
        "duplicate_in_observation": 1,
    }
    assert selected["detid"].tolist() == [0, 6, 7]  # srcid 6 twice in one observation: the brighter stays
    lenient, dropped = select_detections(catalogue, PreprocessConfig(min_counts=50, require_point_like=False))
    assert dropped["extended"] == 0 and 3 in lenient["detid"].tolist()
    assert sum(dropped.values()) + len(lenient) == len(catalogue)


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.rglob("*.parquet"))}


def test_archive_to_dataset_idempotent_and_faithful(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "spectra"
    first = preprocess_archive(archive, out)
    assert (first.selected, first.written, first.quarantined, first.observations) == (9, 9, 0, 2)
    spectra_before = _mtimes(out / "spectra")
    second = preprocess_archive(archive, out)
    assert second.observations_skipped == 2 and second.written == 9
    assert _mtimes(out / "spectra") == spectra_before

    dataset = load_dataset(out)
    assert len(dataset) == 9 and dataset.rmf_matrices.shape == (1, 238, dataset.model_grid.n_bins)
    assert dataset.meta["rmf_id"].nunique() == 1
    assert np.isfinite(dataset.unfolded).all() and (dataset.unfolded >= 0).all()
    assert dataset.unfolded.mean(axis=1) == pytest.approx(1.0, rel=1e-4)
    assert {"mjd", "log10_flux", "net_counts", "total_counts", "exposure_s", "pn_filter"} <= set(dataset.meta)
    # The known input model, folded through the stored response, predicts the stored counts.
    grid = dataset.grid
    model_edges = dataset.model_grid.edges_kev
    photons = NORM / (1 - INDEX) * (model_edges[1:] ** (1 - INDEX) - model_edges[:-1] ** (1 - INDEX))
    bright = dataset.meta["obs_id"].to_numpy() == OBS_A
    subset = dataset.subset(np.flatnonzero(bright))
    expected = subset.fold(np.tile(photons, (len(subset), 1))) + subset.background
    observed = subset.counts
    use = (expected > 10) & (grid.centres_kev[None, :] > 0.4) & (grid.centres_kev[None, :] < 9.5)
    chi2 = ((observed - expected) ** 2 / expected)[use]
    assert chi2.mean() < 1.3, chi2.mean()
    flux_erg = NORM * 1.602e-9 / (2 - INDEX) * (10 ** (2 - INDEX) - 0.3 ** (2 - INDEX))
    np.testing.assert_allclose(dataset.meta["log10_flux"][bright], np.log10(flux_erg), atol=0.03)


def test_a_changed_observation_alone_is_redone(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "spectra"
    preprocess_archive(archive, out)
    before = _mtimes(out / "spectra")
    catalogue = pd.read_parquet(archive / "catalogue.parquet")
    catalogue["release"] = "NEXT"  # a new release label and detection counts alone change no spectrum
    catalogue["n_detections"] += 1
    catalogue.to_parquet(archive / "catalogue.parquet", index=False)
    assert preprocess_archive(archive, out).observations_skipped == 2
    assert _mtimes(out / "spectra") == before
    background = archive / OBS_B / "pps" / product_name(OBS_B, "BGSPEC", 3)
    with fits.open(background) as hdus:
        hdus["SPECTRUM"].data["COUNTS"][100] += 7
        hdus.writeto(background, overwrite=True)
    summary = preprocess_archive(archive, out)
    after = _mtimes(out / "spectra")
    assert summary.observations_skipped == 1
    assert after[f"{OBS_A}.parquet"] == before[f"{OBS_A}.parquet"]
    assert after[f"{OBS_B}.parquet"] != before[f"{OBS_B}.parquet"]


def _rewrite_spectrum(path: Path, edit) -> None:
    with fits.open(path) as hdus:
        hdul = fits.HDUList([hdu.copy() for hdu in hdus])
    edit(hdul)
    hdul.writeto(path, overwrite=True)


def _truncate_channels(hdul: fits.HDUList) -> None:
    table = hdul["SPECTRUM"]
    short = fits.BinTableHDU(table.data[:2048], header=table.header, name="SPECTRUM")
    short.header["DETCHANS"] = 2048
    hdul["SPECTRUM"] = short


def _nan_counts(hdul: fits.HDUList) -> None:
    table = hdul["SPECTRUM"]
    counts = table.data["COUNTS"].astype(np.float32)
    counts[500] = np.nan
    columns = [
        fits.Column("CHANNEL", "I", array=table.data["CHANNEL"]),
        fits.Column("COUNTS", "E", array=counts),
    ]
    hdul["SPECTRUM"] = fits.BinTableHDU.from_columns(columns, header=table.header, name="SPECTRUM")


def test_bad_products_are_quarantined_and_the_rest_goes_on(archive: Path, tmp_path: Path) -> None:
    pps = archive / OBS_B / "pps"
    corrupt = pps / product_name(OBS_B, "SRSPEC", 1)
    corrupt.write_bytes(corrupt.read_bytes()[:300])
    (pps / product_name(OBS_B, "SRCARF", 2)).unlink()
    _rewrite_spectrum(
        pps / product_name(OBS_B, "SRSPEC", 3), lambda h: h["SPECTRUM"].header.set("EXPOSURE", 0.0)
    )
    _rewrite_spectrum(pps / product_name(OBS_B, "SRSPEC", 4), _truncate_channels)
    _rewrite_spectrum(pps / product_name(OBS_B, "BGSPEC", 5), _nan_counts)
    out = tmp_path / "spectra"
    summary = preprocess_archive(archive, out)
    assert summary.written == 4 and summary.quarantined == 5
    quarantine = pd.read_parquet(out / "quarantine.parquet").set_index("detid")
    expected = {
        201: ("SRSPEC0001", "gzip"),
        202: ("SRCARF0002", "not found"),
        203: ("SRSPEC0003", "EXPOSURE"),
        204: ("SRSPEC0004", "2048 channels"),
        205: ("BGSPEC0005", "NaN"),
    }
    for detid, (file_part, problem) in expected.items():
        reason = quarantine.loc[detid, "reason"]
        assert file_part in reason and problem in reason, reason
        assert file_part in quarantine.loc[detid, "path"]
    dataset = load_dataset(out)
    assert sorted(dataset.meta["detid"]) == [101, 102, 126, 206]
    rerun = preprocess_archive(archive, out)  # skipped observations keep their quarantine records
    assert rerun.observations_skipped == 2 and rerun.quarantined == 5


def test_missing_spectrum_is_a_counted_drop(archive: Path, tmp_path: Path) -> None:
    (archive / OBS_A / "pps" / product_name(OBS_A, "SRSPEC", 26)).unlink()
    summary = preprocess_archive(archive, tmp_path / "spectra")
    assert summary.dropped["no_pn_spectrum"] == 1 and summary.written == 8 and summary.quarantined == 0


def test_a_crashed_write_leaves_no_partial_file(archive: Path, tmp_path: Path, monkeypatch) -> None:
    def crash_half_way(path, table: pa.Table) -> None:
        with storage.atomic_path(path) as tmp:
            pq.write_table(table, tmp)
            tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
            raise RuntimeError("disk full")

    monkeypatch.setattr(preprocess_module, "write_parquet_atomic", crash_half_way)
    out = tmp_path / "spectra"
    rows = select_detections(pd.read_parquet(archive / "catalogue.parquet"), PreprocessConfig())[0]
    rows = rows[rows.obs_id == OBS_A]
    with pytest.raises(RuntimeError, match="disk full"):
        preprocess_observation(rows, archive, out, PreprocessConfig(), ResponseCache())
    assert list((out / "spectra").iterdir()) == []
    monkeypatch.undo()
    result = preprocess_observation(rows, archive, out, PreprocessConfig(), ResponseCache())
    assert not result.skipped and result.n_written == 3


def test_each_rmf_is_read_once_per_run(archive: Path, tmp_path: Path) -> None:
    rows = select_detections(pd.read_parquet(archive / "catalogue.parquet"), PreprocessConfig())[0]
    cache = ResponseCache()
    results = [
        preprocess_observation(group, archive, tmp_path, PreprocessConfig(), cache)
        for _, group in rows.groupby("obs_id")
    ]
    assert [r.n_written for r in results] == [3, 6] and cache.rmf_reads == 1
    table = pq.read_table(results[0].path)
    assert table.schema.field("unfolded").type.list_size == 238


def test_user_spectrum_is_preprocessed_exactly_as_in_the_pipeline(archive: Path, tmp_path: Path) -> None:
    preprocess_archive(archive, tmp_path / "spectra")
    stored = load_dataset(tmp_path / "spectra", obs_ids=[OBS_A])
    row = int(np.flatnonzero(stored.meta["src_num"] == 26)[0])
    pps = archive / OBS_A / "pps"
    rmf = archive / "responses" / "PN" / "epn_e3_ff20_sdY9_v21.0.rmf"
    single = spectrum_to_dataset(pps / product_name(OBS_A, "SRSPEC", 26), rmf_path=rmf)
    for name in ("counts", "background", "area_exposure", "unfolded"):
        np.testing.assert_array_equal(getattr(single, name)[0], getattr(stored, name)[row])
    np.testing.assert_array_equal(single.rmf_matrices[0], stored.rmf_matrices[0])


def test_real_spectra_by_header_links_or_explicit_files(real_pn_dir: Path) -> None:
    p13 = spectrum_to_dataset(real_pn_dir / "ngc7793_p13" / "PN.pha")
    assert p13.meta.loc[0, "pn_filter"] == "Medium" and p13.counts.sum() > 10000
    igr = real_pn_dir / "igr_j18490"
    with pytest.raises(ProductError, match="--background"):
        spectrum_to_dataset(igr / "PN_PWN.fits")
    explicit = spectrum_to_dataset(
        igr / "PN_PWN.fits", igr / "PN_PWN_bkg.fits", igr / "PN_PWN.arf", igr / "PN_PWN.rmf"
    )
    assert explicit.unfolded.mean() == pytest.approx(1.0, rel=1e-4)
    circinus = real_pn_dir / "circinus_ulx"
    with pytest.raises(ProductError, match=r"RESPFILE is NONE.*--rmf"):
        spectrum_to_dataset(circinus / "pn_spec.fits", background_path=circinus / "pn_backspec.fits")
    assert -13 < float(explicit.meta.loc[0, "log10_flux"]) < -10



def test_zero_background_backscal_column_is_refused(real_pn_dir: Path, tmp_path: Path) -> None:
    """A per-channel BACKSCAL of 0 in the background would scale it by infinity: refused, naming it."""
    igr = real_pn_dir / "igr_j18490"
    with fits.open(igr / "PN_PWN_bkg.fits") as hdus:
        spectrum = hdus["SPECTRUM"]
        zeros = fits.Column("BACKSCAL", "E", array=np.zeros(len(spectrum.data)))
        columns = fits.ColDefs([*spectrum.columns, zeros])
        table = fits.BinTableHDU.from_columns(columns, header=spectrum.header)
        del table.header["BACKSCAL"]
        broken = tmp_path / "bkg_zero_backscal.fits"
        fits.HDUList([fits.PrimaryHDU(), table]).writeto(broken)
    with pytest.raises(ProductError, match=r"bkg_zero_backscal\.fits.*BACKSCAL"):
        spectrum_to_dataset(igr / "PN_PWN.fits", broken, igr / "PN_PWN.arf", igr / "PN_PWN.rmf")

def test_cli_prints_selection_and_quarantine(archive: Path, tmp_path: Path, capsys) -> None:
    (archive / OBS_B / "pps" / product_name(OBS_B, "SRCARF", 6)).unlink()
    assert (
        main(["preprocess", "--archive", str(archive), "--out", str(tmp_path / "o"), "--min-counts", "300"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "selected: 9" in printed and "dropped low_counts: 0" in printed and "quarantined: 1" in printed
    assert main(["preprocess", "--archive", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2


def coarse_shape(dataset, row: int, bands: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The unfolded shape summed into coarse bands and normalised over them, with its Poisson error.

    Recomputes `unfolded` from the stored counts, background and response by its documented definition.
    """
    grid = dataset.grid
    folded = dataset.rmf_matrices[dataset.rmf_index[row]].astype(np.float64) @ dataset.area_exposure[row]
    valid = dataset.valid[row]
    per_count = np.divide(grid.centres_kev**2, folded * grid.widths_kev, out=np.zeros(grid.n_bins),
                          where=valid)  # masked bins (flagged channels, no channel) are 0 by definition
    nu_f_nu = per_count * np.clip(dataset.counts[row] - dataset.background[row], 0, None)
    np.testing.assert_allclose(dataset.unfolded[row], nu_f_nu / nu_f_nu.mean(), rtol=1e-5, atol=1e-6)
    variance = (per_count / nu_f_nu.mean()) ** 2 * (dataset.counts[row] + dataset.background[row])
    band = np.digitize(grid.centres_kev, bands) - 1
    inside = (band >= 0) & (band < len(bands) - 1)
    shape = np.bincount(band[inside], dataset.unfolded[row][inside], len(bands) - 1)
    error = np.sqrt(np.bincount(band[inside], variance[inside], len(bands) - 1))
    return shape / shape.sum(), error / shape.sum()


def test_one_model_at_two_exposures_and_filters_unfolds_alike(tmp_path: Path) -> None:
    """A long on-axis Thin exposure and a short off-axis Thick one of the same power law: the raw count
    spectra differ far beyond noise, the unfolded shapes agree within it."""
    sources = [
        dict(obs_id=OBS_A, src_num=1, detid=1, srcid=7, norm=NORM, exposure_s=60000.0, pn_filter="Thin1"),
        dict(
            obs_id=OBS_B, src_num=1, detid=2, srcid=7, norm=NORM, exposure_s=12000.0, pn_filter="Thick",
            off_axis_arcmin=8.0,
        ),
    ]  # fmt: skip
    write_archive(tmp_path / "archive", sources, seed=5)
    preprocess_archive(tmp_path / "archive", tmp_path / "spectra")
    dataset = load_dataset(tmp_path / "spectra")
    bands = np.geomspace(0.4, 9.0, 13)
    shape_a, error_a = coarse_shape(dataset, 0, bands)
    shape_b, error_b = coarse_shape(dataset, 1, bands)
    pull = (shape_a - shape_b) / np.hypot(error_a, error_b)
    assert np.all(np.abs(pull) < 4), pull
    assert np.mean(pull**2) < 3, pull

    band = np.digitize(dataset.grid.centres_kev, bands) - 1
    inside = (band >= 0) & (band < 12)
    raw = [np.bincount(band[inside], dataset.counts[r][inside], 12) for r in (0, 1)]
    raw_pull = (raw[0] / raw[0].sum() - raw[1] / raw[1].sum()) / np.hypot(
        np.sqrt(raw[0]) / raw[0].sum(), np.sqrt(raw[1]) / raw[1].sum()
    )
    assert np.max(np.abs(raw_pull)) > 10  # the instrument made them look different


# ---------------------------------------------------------------- on the simulated archive


def test_simulated_archive_preprocesses_cleanly(sim_archive: Path, spectra_dir: Path, spectral_dataset):
    import json

    selection = json.loads((spectra_dir / "selection.json").read_text())
    catalogue = pd.read_parquet(sim_archive / "catalogue.parquet")
    selection_drops = sum(n for reason, n in selection["dropped"].items() if reason != "no_pn_spectrum")
    assert selection["selected"] + selection_drops == len(catalogue)
    assert (
        selection["written"] + selection["quarantined"] + selection["dropped"]["no_pn_spectrum"]
        == (selection["selected"])
    )
    assert selection["quarantined"] <= 0.01 * selection["selected"]
    meta = spectral_dataset.meta
    assert len(spectral_dataset) == selection["written"] > 100
    assert (meta["pn_8_cts"] > 300).all() and (meta["sum_flag"] <= 2).all()
    assert (meta["ep_extent"].fillna(0) <= 0).all()
    assert not meta.duplicated(["obs_id", "srcid"]).any()
    for name in ("counts", "background", "area_exposure", "unfolded"):
        assert np.isfinite(getattr(spectral_dataset, name)).all()
    assert np.allclose(spectral_dataset.unfolded.mean(axis=1), 1.0, rtol=1e-4)
    assert len(spectral_dataset.rmf_ids) > 1  # several canned RMFs, each stored once
    # The catalogue's pn counts (0.2-12 keV) and the spectra's 0.3-10 keV source counts tell one story.
    ratio = meta["total_counts"] / meta["pn_8_cts"]
    assert 0.6 < float(np.median(ratio)) < 1.3


def test_simulated_source_unfolds_alike_across_exposures_and_filters(tmp_path: Path) -> None:
    from xmm_pipeline.archive.simulated import simulate_observation
    from xmm_pipeline.spectra.preprocess import find_rmf

    params = {"class": "AGN", "photon_index": 1.9, "nh_cm2": 3e20, "flux_erg_cm2_s": 4e-12}
    observations = [
        dict(exposure_s=60000.0, pn_filter="Thin1", off_axis_arcmin=0.0, obs_id="0200000001"),
        dict(exposure_s=15000.0, pn_filter="Thick", off_axis_arcmin=8.0, obs_id="0200000002"),
    ]
    shapes, raw = [], []
    for seed, observation in enumerate(observations):
        spectrum = simulate_observation(tmp_path, params, src_num=1, seed=seed, **observation)
        rmf = find_rmf(read_pha_respfile(spectrum), spectrum.parent, tmp_path / "responses" / "PN")
        dataset = spectrum_to_dataset(spectrum, rmf_path=rmf)
        bands = np.geomspace(0.4, 9.0, 13)
        shapes.append(coarse_shape(dataset, 0, bands))
        band = np.digitize(dataset.grid.centres_kev, bands) - 1
        inside = (band >= 0) & (band < 12)
        raw.append(np.bincount(band[inside], dataset.counts[0][inside], 12))
    (shape_a, error_a), (shape_b, error_b) = shapes
    pull = (shape_a - shape_b) / np.hypot(error_a, error_b)
    assert np.all(np.abs(pull) < 4), pull
    assert np.mean(pull**2) < 3, pull
    raw_pull = (raw[0] / raw[0].sum() - raw[1] / raw[1].sum()) / np.hypot(
        np.sqrt(raw[0]) / raw[0].sum(), np.sqrt(raw[1]) / raw[1].sum()
    )
    assert np.max(np.abs(raw_pull)) > 10


def read_pha_respfile(spectrum: Path) -> str:
    from xmm_pipeline.ogip.read import read_pha

    return read_pha(spectrum).respfile
