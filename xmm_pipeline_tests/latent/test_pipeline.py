"""The latent stage on the session's simulated archive, spectra and trained model: `embed`, `similar`
(by name and by a user's spectrum file), `show`, and the evaluation report."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from astropy.io import fits

from xmm_pipeline.cli import main
from xmm_pipeline.latent.build import LatentLayout
from xmm_pipeline.latent.evaluate import ONE_ES_IAUNAME, write_evaluation_report


@pytest.fixture(scope="module")
def latent_dir(sim_archive: Path, spectra_dir: Path, trained_artifact: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("latent_products")
    argv = ["embed", "--spectra", str(spectra_dir), "--model", str(trained_artifact), "--archive",
            str(sim_archive), "--out", str(out)]
    assert main(argv) == 0
    return out


def _snapshot(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_embed_writes_every_product_once(latent_dir: Path, sim_archive: Path, spectra_dir: Path,
                                         trained_artifact: Path, spectral_dataset,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    layout = LatentLayout(latent_dir)
    embeddings = layout.read_embeddings()
    assert len(embeddings) == len(spectral_dataset)
    assert set(embeddings["detid"]) == set(spectral_dataset.meta["detid"])
    manifest = layout.read_manifest()
    assert embeddings["model_version"].eq(manifest["model_version"]).all()
    classes = layout.read_classes()
    assert classes["source"].eq("truth").all() and not classes["class"].eq("unknown").any()
    assert layout.load_index().info.n_vectors == len(embeddings)
    for path in (layout.outliers, layout.trajectories, layout.clusters, layout.density_map, layout.class_map):
        assert path.is_file()
    before = _snapshot(latent_dir)
    capsys.readouterr()
    assert main(["embed", "--spectra", str(spectra_dir), "--model", str(trained_artifact), "--archive",
                 str(sim_archive), "--out", str(latent_dir)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert _snapshot(latent_dir) == before


def test_similar_to_the_changing_look_agn(latent_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    embeddings = LatentLayout(latent_dir).read_embeddings()
    own = embeddings[embeddings["iauname"] == ONE_ES_IAUNAME]
    assert len(own) >= 2
    assert main(["similar", ONE_ES_IAUNAME, "-k", "5", "--latent", str(latent_dir), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 5 * len(own)
    assert not {r["srcid"] for r in rows} & set(own["srcid"])


def _product(archive: Path, obs_id: str, src_num: int, kind: str) -> Path:
    return next((archive / obs_id / "pps").glob(f"P{obs_id}PN*{kind}0{src_num:03X}.FTZ"))


def test_similar_to_a_spectrum_file_finds_its_own_detection(
    latent_dir: Path, sim_archive: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    embeddings = LatentLayout(latent_dir).read_embeddings()
    target = embeddings.sort_values("net_counts").iloc[len(embeddings) // 2]
    spectrum = _product(sim_archive, target["obs_id"], int(target["src_num"]), "SRSPEC")
    respfile = fits.getheader(spectrum, "SPECTRUM")["RESPFILE"]
    rmf = next((sim_archive / "responses" / "PN").glob(Path(respfile).stem + "*"))
    assert main(["similar", "--spectrum", str(spectrum), "--rmf", str(rmf), "-k", "3", "--latent",
                 str(latent_dir), "--format", "csv"]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert frame["detid"].iloc[0] == target["detid"]  # preprocessed exactly as the pipeline did
    assert frame["distance"].iloc[0] < 1e-3

    broken = tmp_path / "broken.FTZ"
    broken.write_bytes(b"SIMPLE  =                    T / not really FITS")
    before = _snapshot(latent_dir)
    assert main(["similar", "--spectrum", str(broken), "--rmf", str(rmf), "--latent", str(latent_dir)]) == 2
    err = capsys.readouterr().err
    assert "broken.FTZ" in err and err.count("\n") == 1
    assert _snapshot(latent_dir) == before


def test_show_plots_spectrum_and_reconstruction(latent_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    detid = int(LatentLayout(latent_dir).read_embeddings()["detid"].iloc[0])
    plot = tmp_path / "show.png"
    assert main(["show", str(detid), "--plot", str(plot), "--latent", str(latent_dir)]) == 0
    assert plot.read_bytes()[:4] == b"\x89PNG" and "deviance/dof" in capsys.readouterr().out
    missing = tmp_path / "missing.png"
    assert main(["show", "1", "--plot", str(missing), "--latent", str(latent_dir)]) == 2
    assert not missing.exists() and "no detection 1" in capsys.readouterr().err


def test_evaluation_report(sim_archive: Path, spectra_dir: Path, trained_artifact: Path,
                           tmp_path: Path) -> None:
    report = write_evaluation_report(sim_archive, spectra_dir, trained_artifact, tmp_path / "docs",
                                     latent_dims=[3], max_epochs=2, work_dir=tmp_path / "work",
                                     baseline_epochs=2)
    text = report.read_text()
    for heading in ("## Reconstruction", "## Classification in latent space", "## Similar spectra",
                    "## Outliers", "## Trajectories", "## Latent dimension"):
        assert heading in text
    assert ONE_ES_IAUNAME in text and "soft_bb" in text
    assert "hardness ratios" in text and "VAE + DeepONet" in text and "PCA of the unfolded spectra" in text
    study = text.split("## Latent dimension", 1)[1]
    assert "| latent dim |" in study and "\n| 3 |" in study
    assert (tmp_path / "work" / "latent_dim_3").is_dir()
    for image in ("reconstructions", "latent_classes", "latent_density", "latent_knn_recall"):
        assert (tmp_path / "docs" / "images" / f"{image}.png").is_file()
        assert f"images/{image}.png" in text
