"""The XSA client over loopback servers serving the simulated archive reproduces that archive."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from astropy.io import fits

from xmm_pipeline.archive.catalogue import as_canonical
from xmm_pipeline.archive.products import PN_SPECTRAL_PRODUCT
from xmm_pipeline.archive.xsa import XSAArchive
from xmm_pipeline_tests.archive.servers import AioServer, TapCatalogue, TapServer, as_4xmm_table

TABLE = "xsa.v_epic_source_cat"
N_OBSERVATIONS = 6


@pytest.fixture(scope="module")
def served(sim_archive: Path):
    catalogue = pd.read_parquet(sim_archive / "catalogue.parquet")
    with TapServer(TapCatalogue(TABLE, as_4xmm_table(catalogue), "4XMM-DR14 detections")) as tap, \
            AioServer(sim_archive) as aio:
        yield catalogue, tap, aio


def _archive(root: Path, tap: TapServer, aio: AioServer, release: str) -> XSAArchive:
    return XSAArchive(root, tap_url=tap.tap_url, table=TABLE, aio_url=aio.aio_url, rmf_url=aio.rmf_url,
                      timeout_s=10, retries=1, backoff_s=0.01, release=release)


def _observations(catalogue: pd.DataFrame, sim_archive: Path) -> list[str]:
    observations = catalogue["obs_id"].unique()
    with_products = sorted(o for o in observations if any((sim_archive / o / "pps").glob("*.FTZ")))
    return with_products[:: max(1, len(with_products) // N_OBSERVATIONS)][:N_OBSERVATIONS]


def test_download_reproduces_the_simulated_archive(sim_archive: Path, served, tmp_path: Path) -> None:
    catalogue, tap, aio = served
    release = str(catalogue["release"].iloc[0])
    archive = _archive(tmp_path, tap, aio, release)
    fetched = archive.fetch_catalogue()
    expected = as_canonical(catalogue).sort_values("detid").reset_index(drop=True)
    pd.testing.assert_frame_equal(fetched.sort_values("detid").reset_index(drop=True), expected)

    obs_ids = _observations(catalogue, sim_archive)
    assert archive.fetch_observations(obs_ids) == []
    for obs_id in obs_ids:
        source = {p.name: p.read_bytes() for p in (sim_archive / obs_id / "pps").glob("P*.FTZ")
                  if PN_SPECTRAL_PRODUCT.match(p.name)}
        mine = {p.name: p.read_bytes() for p in archive.observation_dir(obs_id).glob("*.FTZ")}
        assert mine == source, obs_id
    for spectrum in tmp_path.glob("*/pps/*SRSPEC*.FTZ"):
        respfile = Path(fits.getheader(spectrum, "SPECTRUM")["RESPFILE"]).name
        stem = respfile[: -len(".rmf")] if respfile.endswith(".rmf") else respfile
        served_rmf = next((sim_archive / "responses" / "PN").glob(f"{stem}*.rmf"))
        downloaded = next(archive.responses_dir().glob(f"{stem}*.rmf"))
        assert downloaded.read_bytes() == served_rmf.read_bytes()

    before = aio.count()
    assert _archive(tmp_path, tap, aio, release).fetch_observations(obs_ids) == []
    assert aio.count() == before


def test_fingerprint_follows_simulated_releases(tmp_path_factory: pytest.TempPathFactory) -> None:
    from xmm_pipeline.archive.simulated import simulate_archive

    roots = {}
    for release in ("DR14", "DR15"):
        roots[release] = tmp_path_factory.mktemp(f"fingerprint_{release}")
        simulate_archive(roots[release], release=release, n_detections=150, seed=11)
    tables = {r: as_4xmm_table(pd.read_parquet(roots[r] / "catalogue.parquet")) for r in roots}
    with TapServer(TapCatalogue(TABLE, tables["DR14"], "4XMM detections")) as tap:
        archive = XSAArchive(tmp_path_factory.mktemp("fp"), tap_url=tap.tap_url, table=TABLE, timeout_s=10)
        dr14 = archive.release_fingerprint()
        assert archive.release_fingerprint() == dr14
        tap.catalogue = TapCatalogue(TABLE, tables["DR15"], "4XMM detections")
        dr15 = archive.release_fingerprint()
        assert dr15 != dr14 and archive.release_fingerprint() == dr15
        tap.catalogue = TapCatalogue(TABLE, tables["DR14"], "4XMM detections")
        assert archive.release_fingerprint() == dr14


def test_preprocessing_reads_a_download_like_the_simulated_archive(
    sim_archive: Path, spectra_dir: Path, served, tmp_path: Path
) -> None:
    """`preprocess --archive DIR` on a download gives the same spectra as on the simulated archive."""
    from xmm_pipeline.spectra.preprocess import preprocess_archive

    catalogue, tap, aio = served
    archive = _archive(tmp_path / "download", tap, aio, str(catalogue["release"].iloc[0]))
    expected_files = sorted((spectra_dir / "spectra").glob("*.parquet"))
    obs_ids = [p.stem for p in expected_files[:: max(1, len(expected_files) // 4)][:4]]
    archive.fetch_catalogue_rows(obs_ids)
    assert archive.fetch_observations(obs_ids) == []
    preprocess_archive(tmp_path / "download", tmp_path / "spectra")
    for obs_id in obs_ids:
        mine = pd.read_parquet(tmp_path / "spectra" / "spectra" / f"{obs_id}.parquet")
        theirs = pd.read_parquet(spectra_dir / "spectra" / f"{obs_id}.parquet")
        pd.testing.assert_frame_equal(mine, theirs)


@pytest.mark.parametrize("product_mode", ["observation", "source"])
def test_reprocessed_observations_are_downloaded_again(
    sim_archive: Path, served, tmp_path: Path, product_mode: str
) -> None:
    """A new release that re-processes an observation (its catalogue rows change) gets its products
    downloaded again; unchanged observations cost no request."""
    from xmm_pipeline.archive.simulated import MIN_SPECTRUM_COUNTS, simulate_archive
    from xmm_pipeline_tests.conftest import SIM_DETECTIONS, SIM_SEED

    catalogue, tap, aio = served
    dr15_dir = tmp_path / "dr15"
    simulate_archive(dr15_dir, release="DR15", n_detections=SIM_DETECTIONS, seed=SIM_SEED)
    dr15 = pd.read_parquet(dr15_dir / "catalogue.parquet")
    truth = pd.read_parquet(dr15_dir / "truth.parquet")
    reprocessed = sorted(set(truth.loc[truth["reprocessed"], "obs_id"]) & set(catalogue["obs_id"]))
    with_products = [o for o in reprocessed if any((dr15_dir / o / "pps").glob("*SRSPEC*.FTZ"))]
    assert with_products, "the simulated DR15 re-processes no DR14 observation with spectra"
    unchanged = [o for o in _observations(catalogue, sim_archive) if o not in reprocessed][:3]
    wanted = [*with_products[:2], *unchanged]

    root = tmp_path / "download"
    archive = XSAArchive(root, tap_url=tap.tap_url, table=TABLE, aio_url=aio.aio_url, rmf_url=aio.rmf_url,
                         timeout_s=10, retries=1, backoff_s=0.01, release=str(catalogue["release"].iloc[0]),
                         product_mode=product_mode, min_pn_counts=MIN_SPECTRUM_COUNTS)
    archive.fetch_catalogue()
    assert archive.fetch_observations(wanted) == []
    try:
        tap.catalogue = TapCatalogue(TABLE, as_4xmm_table(dr15), "4XMM-DR15 detections")
        aio.archive_root = dr15_dir
        archive.release = str(dr15["release"].iloc[0])
        archive.fetch_catalogue()
        before = aio.count()
        assert archive.fetch_observations(wanted) == []
        asked = aio.count() - before
    finally:
        tap.catalogue = TapCatalogue(TABLE, as_4xmm_table(catalogue), "4XMM-DR14 detections")
        aio.archive_root = sim_archive
    assert asked > 0
    for obs_id in wanted:
        served_files = {p.name: p.read_bytes() for p in (dr15_dir / obs_id / "pps").glob("P*.FTZ")
                        if PN_SPECTRAL_PRODUCT.match(p.name)}
        mine = {p.name: p.read_bytes() for p in archive.observation_dir(obs_id).glob("*.FTZ")}
        assert mine == served_files, obs_id
    assert archive.fetch_observations(wanted) == []
    assert aio.count() - before == asked
