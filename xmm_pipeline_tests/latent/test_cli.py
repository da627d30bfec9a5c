"""`similar`, `outliers` and `trajectory` on a latent folder built from synthetic embeddings."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest

from xmm_pipeline.cli import main
from xmm_pipeline.latent.build import LatentLayout, build_products
from xmm_pipeline.latent.embed import write_embeddings
from xmm_pipeline_tests.latent.synthetic import synthetic_embeddings


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("latent")
    embeddings, classes = synthetic_embeddings(n_sources=80, detections_per_source=3, n_odd=4)
    layout = LatentLayout(root)
    write_embeddings(embeddings, layout.embeddings)
    build_products(embeddings, classes, layout)
    return root


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_products_are_all_written(latent_dir: Path) -> None:
    layout = LatentLayout(latent_dir)
    for path in (layout.embeddings, layout.index_dir / "index.faiss", layout.classes, layout.outliers,
                 layout.trajectories, layout.trajectories_plot, layout.clusters, layout.cluster_summary,
                 layout.density_map, layout.class_map):
        assert path.is_file(), path


def test_similar_by_iau_name_detid_and_srcid(latent_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    embeddings = pd.read_parquet(LatentLayout(latent_dir).embeddings)
    source = embeddings.iloc[3]
    latent = ["--latent", str(latent_dir)]
    assert main(["similar", source["iauname"], "-k", "5", *latent, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 5 * 3  # three detections of the source, five neighbours each
    assert all(r["srcid"] != source["srcid"] for r in rows)
    assert {r["class"] for r in rows} == {"star"}  # source 1 is a star, far from the other classes
    assert all(r["obs_date"].startswith("20") for r in rows)
    assert [r["rank"] for r in rows[:5]] == [1, 2, 3, 4, 5]
    distances = [r["distance"] for r in rows[:5]]
    assert distances == sorted(distances)

    assert main(["similar", str(source["detid"]), "-k", "4", *latent, "--format", "csv"]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert len(frame) == 4 and set(frame.columns) >= {"neighbour", "distance", "class", "obs_date", "counts"}

    for flag, expected in (([], False), (["--include-same-source"], True)):
        assert main(["similar", str(source["srcid"]), "-k", "10", *latent, *flag]) == 0
        header, body = capsys.readouterr().out.split("\n", 1)
        assert "neighbour" in header and "distance" in header
        assert (str(source["iauname"]) in body) == expected


@pytest.mark.parametrize(("argv", "message"), [
    (["similar", "4XMM J000000.0+000001"], "no detection of 4XMM J000000.0+000001"),
    (["similar", "12345"], "no detection or source with id 12345"),
    (["similar", "Sgr A*"], "neither an IAU name"),
    (["similar"], "either a TARGET"),
    (["similar", "1", "-k", "0"], "-k must be >= 1"),
    (["trajectory", "999"], "no detection or source"),
    (["outliers", "-n", "0"], "-n must be >= 1"),
])
def test_user_mistakes_are_one_line_and_exit_2(latent_dir: Path, argv: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    before = _files(latent_dir)
    assert main([*argv, "--latent", str(latent_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert _files(latent_dir) == before


def test_missing_index_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    embeddings, _ = synthetic_embeddings(n_sources=5)
    write_embeddings(embeddings, tmp_path / "embeddings.parquet")
    assert main(["similar", str(embeddings["detid"].iloc[0]), "--latent", str(tmp_path)]) == 2
    assert "no latent index" in capsys.readouterr().err
    assert main(["outliers", "--latent", str(tmp_path / "nowhere")]) == 2
    assert "run `xmm-pipeline embed` first" in capsys.readouterr().err


def test_outliers_lists_the_odd_spectra_first(latent_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["outliers", "-n", "4", "--latent", str(latent_dir), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert {r["class"] for r in rows} == {"odd"}


def test_trajectory_table_and_plot(latent_dir: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    trajectories = pd.read_parquet(LatentLayout(latent_dir).trajectories)
    mover = trajectories.iloc[0]
    plot = tmp_path / "path.png"
    assert main(["trajectory", str(mover["srcid"]), "--plot", str(plot), "--latent", str(latent_dir),
                 "--format", "csv"]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert len(frame) == mover["n_detections"]
    assert frame["mjd"].is_monotonic_increasing
    assert frame["cumulative_path"].iloc[-1] == pytest.approx(mover["path_length"], rel=1e-4)
    assert plot.read_bytes()[:4] == b"\x89PNG"
