"""`xmm-pipeline export` and `--format votable`: files read back with astropy, units and UCDs on the
columns, and a table sent over SAMP to astropy's own hub and a receiving client."""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import urljoin, urlparse
from urllib.request import pathname2url, url2pathname

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.io.votable import parse_single_table
from astropy.io.votable.ucd import check_ucd
from astropy.table import Table

from xmm_pipeline.cli import main
from xmm_pipeline.latent.build import LatentLayout, build_products
from xmm_pipeline.latent.embed import write_embeddings
from xmm_pipeline.latent.export import samp_module
from xmm_pipeline_tests.latent.synthetic import synthetic_embeddings

EXPECTED_COLUMNS = {
    "detid", "srcid", "iauname", "obs_id", "ra", "dec", "mjd", "obs_date", "net_counts", "ep_hr1", "ep_hr2",
    "ep_hr3", "ep_hr4", "z0", "z1", "deviance_per_dof", "outlier_score", "outlier_rank", "cluster",
    "cluster_probability", "class", "flux_0p3_10kev",
}


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("latent_export")
    embeddings, classes = synthetic_embeddings(n_sources=40, detections_per_source=3, n_odd=3)
    embeddings["log10_flux"] = np.float32(-12.5)
    layout = LatentLayout(root)
    write_embeddings(embeddings, layout.embeddings)
    build_products(embeddings, classes, layout)
    return root


def _expected(latent_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(LatentLayout(latent_dir).embeddings).set_index("detid")


def test_fits_export_has_units_ucds_and_time_frame(latent_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cat.fits"
    assert main(["export", "--latent", str(latent_dir), "--out", str(out)]) == 0
    assert f"written to {out} (fits)" in capsys.readouterr().out
    table = Table.read(out)
    table.convert_bytestring_to_unicode()
    assert set(table.colnames) >= EXPECTED_COLUMNS
    embeddings = _expected(latent_dir)
    assert len(table) == len(embeddings)
    assert table["ra"].unit == "deg" and table["dec"].unit == "deg" and table["mjd"].unit == "d"
    assert table["net_counts"].unit == "ct" and table["flux_0p3_10kev"].unit == "mW / m2"
    np.testing.assert_allclose(table["flux_0p3_10kev"], 10 ** -12.5, rtol=1e-5)
    row = embeddings.loc[int(table["detid"][0])]
    assert table["iauname"][0] == row["iauname"]
    np.testing.assert_allclose([table["ra"][0], table["z1"][0]], [row["ra"], row["z1"]], rtol=1e-6)
    with fits.open(out) as hdul:
        header = hdul[1].header
    ucds = {header[f"TTYPE{i}"]: header.get(f"TUCD{i}") for i in range(1, header["TFIELDS"] + 1)}
    assert ucds["ra"] == "pos.eq.ra;meta.main" and ucds["dec"] == "pos.eq.dec;meta.main"
    assert ucds["mjd"] == "time.epoch" and ucds["detid"] == "meta.id;meta.main"
    assert all(ucds.values()), [name for name, ucd in ucds.items() if not ucd]
    assert header["TIMESYS"] == "TT" and header["MJDREF"] == 0.0 and header["TIMEUNIT"] == "d"
    outliers = pd.read_parquet(LatentLayout(latent_dir).outliers)
    top = outliers.iloc[0]
    exported = table.to_pandas().set_index("detid")
    assert exported.loc[top["detid"], "outlier_rank"] == 1
    assert exported.loc[top["detid"], "outlier_score"] == pytest.approx(top["outlier_score"])
    assert exported.loc[top["detid"], "class"] == "odd"


def test_votable_export_fields_carry_unit_ucd_and_timesys(latent_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cat.vot"
    assert main(["export", "--latent", str(latent_dir), "--format", "votable", "--out", str(out)]) == 0
    vo_table = parse_single_table(str(out), verify="exception")
    fields = {f.name: f for f in vo_table.fields}
    assert set(fields) >= EXPECTED_COLUMNS
    assert fields["ra"].ucd == "pos.eq.ra;meta.main" and str(fields["ra"].unit) == "deg"
    assert fields["dec"].ucd == "pos.eq.dec;meta.main"
    assert fields["mjd"].ucd == "time.epoch" and str(fields["mjd"].unit) == "d"
    assert fields["net_counts"].ucd.startswith("phot.count")
    for field in vo_table.fields:
        assert field.ucd and check_ucd(field.ucd, check_controlled_vocabulary=True), (field.name, field.ucd)
        assert field.description, field.name
    timesys = {t.ID: t for t in vo_table._votable.resources[0].time_systems}
    assert timesys[fields["mjd"].ref].timescale == "TT"
    assert timesys[fields["mjd"].ref].timeorigin == "MJD-origin"
    table = vo_table.to_table()
    assert len(table) == len(_expected(latent_dir))
    assert set(table["class"]) >= {"AGN", "star", "odd"}


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_parquet_and_csv_export(latent_dir: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"cat.{fmt}"
    assert main(["export", "--latent", str(latent_dir), "--out", str(out)]) == 0
    frame = pd.read_parquet(out) if fmt == "parquet" else pd.read_csv(out, dtype={"obs_id": str})
    assert set(frame.columns) >= EXPECTED_COLUMNS and len(frame) == len(_expected(latent_dir))
    assert frame["obs_date"].astype(str).str.match(r"^\d{4}-\d\d-\d\d$").all()
    assert frame["obs_id"].str.len().eq(10).all()


def test_export_default_is_a_votable_in_the_latent_folder(latent_dir: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "latent"
    shutil.copytree(latent_dir, folder)
    assert main(["export", "--latent", str(folder)]) == 0
    assert Table.read(folder / "latent_catalogue.vot")["ra"].unit == "deg"


def test_export_without_products_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--latent", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no embeddings" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_export_to_an_impossible_place_is_one_line(latent_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["export", "--latent", str(latent_dir), "--out", str(blocker / "cat.fits")]) == 2
    err = capsys.readouterr().err
    assert "cannot create output folder" in err and err.count("\n") == 1
    assert main(["outliers", "--latent", str(latent_dir), "--format", "votable",
                 "--out", str(blocker / "o.vot")]) == 2
    assert "cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["outliers", "-n", "5"], ["similar", "-k", "3"], ["trajectory"]])
def test_latent_commands_write_votables(latent_dir: Path, tmp_path: Path, command: list[str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    embeddings = pd.read_parquet(LatentLayout(latent_dir).embeddings)
    mover = embeddings[embeddings["iauname"] == "4XMM J000002.0+000000"]  # source 2: an XRB that moves
    if command[0] != "outliers":
        command = [command[0], str(mover["srcid"].iloc[0]), *command[1:]]
    argv = [*command, "--latent", str(latent_dir), "--format", "votable"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("<?xml")
    out = tmp_path / "table.vot"
    assert main([*argv, "--out", str(out)]) == 0
    assert capsys.readouterr().out == ""
    assert out.read_text() == stdout
    vo_table = parse_single_table(str(out), verify="exception")
    fields = {f.name: f for f in vo_table.fields}
    table = vo_table.to_table()
    assert fields["detid"].ucd == "meta.id;meta.main"
    if command[0] == "outliers":
        assert len(table) == 5 and fields["outlier_score"].ucd == "stat.value"
        assert list(table["rank"]) == [1, 2, 3, 4, 5]
        assert fields["ra"].ucd == "pos.eq.ra;meta.main" and fields["dec"].ucd == "pos.eq.dec;meta.main"
        assert fields["mjd"].ucd == "time.epoch"
        by_detid = embeddings.set_index("detid")
        assert list(table["ra"]) == pytest.approx(list(by_detid.loc[list(table["detid"]), "ra"]))
    elif command[0] == "similar":
        assert len(table) == 3 * len(mover) and fields["distance"].ucd == "pos.distance;stat.value"
    else:
        assert list(table["detid"]) == list(mover.sort_values(["mjd", "detid"])["detid"])
        assert fields["mjd"].ucd == "time.epoch" and str(fields["mjd"].unit) == "d"


# --- SAMP ---------------------------------------------------------------------------------------

@pytest.fixture
def samp_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """astropy's own hub (pyvo.samp since astropy 8) on 127.0.0.1, standard profile, via $SAMP_HUB."""
    SAMPHubServer = samp_module().SAMPHubServer

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SAMP_HUB", raising=False)
    lockfile = tmp_path / "samp-hub.lock"
    hub = SAMPHubServer(web_profile=False, lockfile=str(lockfile), addr="127.0.0.1", pool_size=1)
    hub.start()
    monkeypatch.setenv("SAMP_HUB", "std-lockurl:" + urljoin("file:", pathname2url(str(lockfile))))
    yield hub
    hub.stop()


def test_samp_sends_the_table_to_a_listening_client(samp_hub, latent_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    SAMPIntegratedClient = samp_module().SAMPIntegratedClient
    received: list[dict] = []
    arrived = threading.Event()

    def on_table(private_key, sender_id, mtype, params, extra) -> None:
        received.append(params)
        arrived.set()

    receiver = SAMPIntegratedClient(name="receiver", addr="127.0.0.1")
    receiver.connect(pool_size=1)
    try:
        receiver.bind_receive_notification("table.load.votable", on_table)
        out = tmp_path / "sent.vot"
        assert main(["export", "--latent", str(latent_dir), "--samp", "--out", str(out)]) == 0
        assert arrived.wait(10), "no table.load.votable notification arrived"
    finally:
        receiver.disconnect()
    assert "sent over SAMP to receiver" in capsys.readouterr().out
    params = received[0]
    assert params["name"] == "latent_catalogue"
    path = Path(url2pathname(urlparse(params["url"]).path))
    assert path == out.resolve()
    table = Table.read(path, format="votable")
    assert len(table) == len(_expected(latent_dir)) and table["ra"].unit == "deg"


def test_samp_without_a_listener_or_hub_is_one_line(samp_hub, latent_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never.vot"
    assert main(["export", "--latent", str(latent_dir), "--samp", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no client that loads tables" in err and err.count("\n") == 1
    samp_hub.stop()
    monkeypatch.delenv("SAMP_HUB")
    assert main(["export", "--latent", str(latent_dir), "--samp", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no SAMP hub running" in err and err.count("\n") == 1
    assert not out.exists()
    assert main(["export", "--latent", str(latent_dir), "--samp", "--format", "csv"]) == 2
    assert "--samp sends a VOTable" in capsys.readouterr().err


def test_cli_formats_match_the_writer() -> None:
    from xmm_pipeline.cli.latent import EXPORT_FORMATS, EXPORT_SUFFIXES
    from xmm_pipeline.latent.export import FORMATS, SUFFIXES

    assert EXPORT_FORMATS == FORMATS and set(EXPORT_SUFFIXES.values()) == set(FORMATS)
    assert all(EXPORT_SUFFIXES[SUFFIXES[fmt]] == fmt for fmt in FORMATS)
