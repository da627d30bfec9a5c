"""Output people can read: dates as dates and counts as integers in the text tables, the trajectory
map's arrow drawn where its title says, and quarantine reasons that keep matrix names whole."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Annotation

from xmm_pipeline.cli import main
from xmm_pipeline.latent import products
from xmm_pipeline.latent.build import LatentLayout, build_products
from xmm_pipeline.latent.embed import write_embeddings
from xmm_pipeline.spectra.preprocess import reason_category
from xmm_pipeline_tests.latent.synthetic import synthetic_embeddings


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("latent_readable")
    embeddings, classes = synthetic_embeddings(n_sources=40, detections_per_source=3, n_odd=3)
    embeddings["net_counts"] = 123456.7  # bright: five digits, where 4 significant digits go e+05
    embeddings.loc[0, "mjd"] = 58074.6  # 2017-11-17
    layout = LatentLayout(root)
    write_embeddings(embeddings, layout.embeddings)
    build_products(embeddings, classes, layout)
    return root


def test_trajectory_table_prints_dates_not_mjd_floats(latent_dir: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    srcid = str(pd.read_parquet(LatentLayout(latent_dir).embeddings)["srcid"].iloc[0])
    assert main(["trajectory", srcid, "--latent", str(latent_dir)]) == 0
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert "obs_date" in header.split() and "mjd" not in header.split()
    assert "2017-11-17" in rows[-1]
    assert not any(re.search(r"e\+0[45]|58074\.6", row) for row in rows), rows


def test_outlier_table_prints_counts_as_integers(latent_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["outliers", "-n", "5", "--latent", str(latent_dir)]) == 0
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert "net_counts" in header and len(rows) == 5
    assert all(re.search(r"\s123457\s", row) for row in rows), rows
    assert not any("1.235e+05" in row for row in rows)


def test_json_and_csv_keep_the_numbers(latent_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["outliers", "-n", "3", "--latent", str(latent_dir), "--format", "json"]) == 0
    rows = pd.read_json(io.StringIO(capsys.readouterr().out))
    assert rows["net_counts"].iloc[0] == pytest.approx(123456.7)


def test_trajectory_arrow_is_drawn_far_out_and_on_a_short_step(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    embeddings, classes = synthetic_embeddings(n_sources=400, detections_per_source=3, n_odd=0)
    far = embeddings["iauname"] == "4XMM J000001.0+000000"  # a star: three detections close together
    embeddings.loc[far, "z0"] += 40.0  # 3 of 1,200 detections: beyond the density map's 99.5 percentile
    srcids = [int(embeddings.loc[far, "srcid"].iloc[0]),
              int(embeddings.loc[embeddings["iauname"] == "4XMM J000005.0+000000", "srcid"].iloc[0])]
    figures = []
    monkeypatch.setattr(products, "save_png", lambda figure, path: figures.append(figure) or Path(path))
    products.plot_trajectories(embeddings, srcids, tmp_path / "t.png", classes)
    figure = figures[0]
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    axes = figure.axes[0]
    arrows = [a for a in axes.texts if isinstance(a, Annotation)]
    assert len(arrows) == len(srcids)
    assert "arrow = latest step" in axes.get_title()
    for arrow, srcid in zip(arrows, srcids):
        box = arrow.arrow_patch.get_window_extent(renderer)
        assert axes.bbox.contains(box.x0, box.y0) and axes.bbox.contains(box.x1, box.y1), (srcid, box)
        assert max(box.width, box.height) >= 9, f"arrowhead of {srcid} is {box.width:.1f} px: not visible"
        last = axes.transData.transform(arrow.xy)
        assert box.x0 - 3 <= last[0] <= box.x1 + 3 and box.y0 - 3 <= last[1] <= box.y1 + 3  # tip at the end


@pytest.mark.parametrize(("reason", "category"), [
    ("/a/0123456789/pps/P0123456789PNS003SRSPEC0017.FTZ: RMF epn_e3_ff20_sdY9.rmf not found",
     "RMF epn_e3_ff20_sdY9.rmf not found"),
    ("/a/x.FTZ: RMF epn_e4_ff20_dY9_v21.0.rmf not found", "RMF epn_e4_ff20_dY9_v21.0.rmf not found"),
    ("/a/x.FTZ: no positive net counts in 0.3-10.0 keV", "no positive net counts in N-N keV"),
    ("/a/x.FTZ: non-positive or NaN EXPOSURE = -5.0", "non-positive or NaN EXPOSURE = N"),
    ("/a/x.FTZ: 12 NaN or infinite channel values", "N NaN or infinite channel values"),
    ("/a/x.FTZ: BACKSCAL keyword is not a number: 'abc'", "BACKSCAL keyword is not a number: 'abc'"),
    ("/a/x.FTZ: AREASCAL = 1.5e-03 (must be positive)", "AREASCAL = N (must be positive)"),
])
def test_reason_category_keeps_matrix_names_whole(reason: str, category: str) -> None:
    assert reason_category(reason) == category


def test_reason_categories_group_the_same_problem() -> None:
    reasons = [f"/a/{o}/P{o}PNS003SRSPEC0001.FTZ: non-positive or NaN EXPOSURE = {e}"
               for o, e in (("0123456789", 0), ("0987654321", -3.5))]
    assert len({reason_category(r) for r in reasons}) == 1
