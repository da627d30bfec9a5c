"""explore.data and explore.selection on a latent folder embedded from the session's simulated archive."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.table import Table

from xmm_pipeline.errors import UserError
from xmm_pipeline.explore.data import ExplorerData
from xmm_pipeline.explore.selection import selection_frame, write_selection
from xmm_pipeline.latent.embed import latent_matrix
from xmm_pipeline.latent.evaluate import ONE_ES_IAUNAME
from xmm_pipeline.latent.query import neighbour_table
from xmm_pipeline.model.train import load_artifact
from xmm_pipeline.spectra.dataset import load_dataset
from xmm_pipeline_tests.explore.conftest import archive_product, archive_rmf


def test_a_detection_shows_what_show_computes(explorer_data: ExplorerData) -> None:
    data = explorer_data
    row = int(np.argmax(data.embeddings["net_counts"].to_numpy()))
    detail = data.detection(row, k=6)
    json.dumps(detail, allow_nan=False)
    record = data.embeddings.iloc[row]
    catalogue = detail["catalogue"]
    assert catalogue["detid"] == record["detid"] and catalogue["iauname"] == record["iauname"]
    # The reconstruction of `xmm-pipeline show`: the detection's row of its observation's spectra file.
    dataset = load_dataset(data.spectra_dir, obs_ids=[str(record["obs_id"])])
    one = dataset.subset(np.flatnonzero(dataset.meta["detid"].to_numpy() == record["detid"])[:1])
    artifact = load_artifact(data.model_dir)
    expected = artifact.reconstruct(one)[0]
    spectrum = detail["spectrum"]
    widths, valid = one.grid.widths_kev, one.valid[0]

    def drawn(name: str) -> np.ndarray:
        values = np.array([np.nan if v is None else v for v in spectrum[name]], dtype=float) * widths
        assert np.isnan(values[~valid]).all()  # masked bins are left out of the figure, as in `show`
        return values[valid]

    assert (~valid).any()  # the simulated products flag the channels below 0.32 keV, as real ones do
    np.testing.assert_allclose(drawn("model_per_kev"), expected[valid], rtol=1e-5)
    np.testing.assert_allclose(drawn("counts_per_kev"), one.counts[0][valid])
    np.testing.assert_allclose(drawn("background_per_kev"), one.background[0][valid], rtol=1e-6)
    assert spectrum["deviance_per_dof"] == pytest.approx(artifact.deviance_per_dof(one, expected[None])[0])
    assert f"detid {record['detid']}" in spectrum["title"] and "deviance/dof" in spectrum["title"]
    # Neighbours: the CLI's table (other sources only), with their map rows and spectra for the overlay.
    same = set(data.embeddings.loc[data.embeddings["srcid"] == record["srcid"], "detid"])
    query = latent_matrix(data.embeddings.iloc[[row]])
    cli = neighbour_table(data.embeddings, data.classes, data.index, query, ["q"], [same], 6)
    assert [n["detid"] for n in detail["neighbours"]] == cli["detid"].tolist()
    assert all(n["srcid"] != record["srcid"] for n in detail["neighbours"])
    assert all(data.detids[n["row"]] == n["detid"] for n in detail["neighbours"])
    lines = detail["overlay"]["lines"]
    assert len(lines) == 7 and lines[0]["name"] == record["iauname"]
    np.testing.assert_allclose(lines[0]["values"], one.unfolded[0])


def test_map_colours_and_density(explorer_data: ExplorerData) -> None:
    data = explorer_data
    n = len(data.detids)
    assert data.xy.shape == (n, 2) and np.isfinite(data.xy).all()
    fields = data.colour_fields()
    assert {"class", "outlier_score", "ep_hr1", "log10_counts", "obs_year"} <= set(fields)
    for field in fields:
        values, info = data.colour(field)
        assert values.shape == (n,) and values.dtype == np.float32
    codes, info = data.colour("class")
    classes = data.classes.set_index("detid")["class"].reindex(data.detids).fillna("unknown").to_numpy()
    assert [info["labels"][int(c)] for c in codes] == classes.tolist()
    years, _ = data.colour("obs_year")
    assert years.min() >= 2000 and years.max() <= 2025
    density = data.density()
    z = np.array([[np.nan if v is None else v for v in r] for r in density["z"]], dtype=float)
    x0, x1, y0, y1 = density["x"][0], density["x"][-1], density["y"][0], density["y"][-1]
    inside = ((data.xy[:, 0] > x0) & (data.xy[:, 0] < x1) & (data.xy[:, 1] > y0) & (data.xy[:, 1] < y1)).sum()
    assert inside <= np.nansum(10 ** z) <= n
    with pytest.raises(UserError, match="unknown colour field 'pink'"):
        data.colour("pink")


def test_search_outliers_and_trajectory(explorer_data: ExplorerData) -> None:
    data = explorer_data
    matches = data.search(ONE_ES_IAUNAME.lower())
    assert len(matches) >= 2 and {m["iauname"] for m in matches} == {ONE_ES_IAUNAME}
    assert [m["obs_date"] for m in matches] == sorted(m["obs_date"] for m in matches)
    assert data.search(str(matches[0]["detid"]))[0]["row"] == matches[0]["row"]
    with pytest.raises(UserError, match=r"no detection of 4XMM J000000\.0"):
        data.search("4XMM J000000.0+000000")
    path = data.trajectory(matches[0]["srcid"])
    assert path["rows"] == [m["row"] for m in matches] and len(path["epochs"]) == len(matches)
    np.testing.assert_allclose(path["map_x"], data.xy[path["rows"], 0])
    outliers = data.outlier_list(5)
    ranked = pd.read_parquet(data.layout.outliers).head(5)
    assert [o["detid"] for o in outliers] == ranked["detid"].tolist()
    assert all(data.detids[o["row"]] == o["detid"] for o in outliers)


def test_a_users_spectrum_lands_on_its_own_detection(explorer_data: ExplorerData, sim_archive: Path) -> None:
    data = explorer_data
    row = int(np.argsort(data.embeddings["net_counts"].to_numpy())[len(data.detids) // 2])
    record = data.embeddings.iloc[row]
    spectrum = archive_product(sim_archive, record["obs_id"], int(record["src_num"]), "SRSPEC")
    placed = data.place_spectrum(spectrum, rmf=archive_rmf(sim_archive, spectrum), k=4)
    json.dumps(placed, allow_nan=False)
    assert placed["neighbours"][0]["detid"] == record["detid"] and placed["neighbours"][0]["distance"] < 1e-3
    assert placed["map_x"] == pytest.approx(float(data.xy[row, 0]), abs=1e-3)
    assert placed["deviance_per_dof"] == pytest.approx(float(record["deviance_per_dof"]), rel=1e-3)
    assert 0 < placed["deviance_percentile"] <= 1 and len(placed["overlay"]["lines"]) == 5
    assert placed["fit"].startswith("fit: deviance/dof")  # the line `similar --spectrum` prints


def test_a_real_pn_spectrum_is_placed(explorer_data: ExplorerData, real_pn_dir: Path) -> None:
    folder = real_pn_dir / "ngc7793_p13"
    placed = explorer_data.place_spectrum(folder / "PN.pha", k=3)
    assert np.isfinite([placed["map_x"], placed["map_y"], placed["deviance_per_dof"]]).all()
    assert len(placed["neighbours"]) == 3 and placed["spectrum"]["total_counts"] > 10_000


@pytest.mark.parametrize("fmt", ["csv", "fits", "votable"])
def test_export_reads_back(explorer_data: ExplorerData, fmt: str) -> None:
    data = explorer_data
    rows = [5, 2, 9, 2]
    content = write_selection(selection_frame(data, rows), fmt)
    table = (Table.read(io.BytesIO(content), format="ascii.csv") if fmt == "csv" else
             Table.read(io.BytesIO(content), format="fits" if fmt == "fits" else "votable"))
    assert list(table["detid"]) == [int(data.detids[r]) for r in (5, 2, 9)]
    assert list(table["iauname"]) == data.embeddings["iauname"].iloc[[5, 2, 9]].tolist()
    assert {"ra", "dec", "obs_date", "class", "outlier_score", "z0", "map_x"} <= set(table.colnames)
    if fmt != "csv":
        assert str(table["ra"].unit) == "deg" and str(table["mjd"].unit) == "d"


def test_mistakes_name_what_is_wrong(explorer_data: ExplorerData, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"embeddings\.parquet: no embeddings"):
        ExplorerData(tmp_path)
    with pytest.raises(UserError, match="row 100000 is not a detection"):
        explorer_data.detection(100_000)
    with pytest.raises(UserError, match="k must be between 1 and 100"):
        explorer_data.detection(0, k=0)
    with pytest.raises(UserError, match="selection is empty"):
        selection_frame(explorer_data, [])
    with pytest.raises(UserError, match="unknown export format 'xls'"):
        write_selection(selection_frame(explorer_data, [0]), "xls")
    broken = tmp_path / "broken.pha"
    broken.write_bytes(b"SIMPLE  =                    T / not really FITS")
    with pytest.raises(Exception, match=r"broken\.pha"):
        explorer_data.place_spectrum(broken)
