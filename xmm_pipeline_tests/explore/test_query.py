"""latent.query: target resolution and the neighbour table, as plain functions the CLI and explorer share."""

from __future__ import annotations

import numpy as np
import pytest

from xmm_pipeline.cli import latent as cli_latent
from xmm_pipeline.errors import UserError
from xmm_pipeline.latent.embed import latent_matrix
from xmm_pipeline.latent.query import neighbour_table, obs_date, resolve_target
from xmm_pipeline.latent.search import build_index
from xmm_pipeline_tests.latent.synthetic import synthetic_embeddings


@pytest.fixture(scope="module")
def table():
    embeddings, classes = synthetic_embeddings(n_sources=40, detections_per_source=3, n_odd=2)
    return embeddings, classes, build_index(latent_matrix(embeddings), embeddings["detid"].to_numpy())


def test_resolve_by_iau_name_detid_and_srcid(table) -> None:
    embeddings, _, _ = table
    row = embeddings.iloc[4]
    by_name = resolve_target(embeddings, f"  {row['iauname'].lower().replace(' j', 'J')} ")
    assert set(by_name["srcid"]) == {row["srcid"]} and len(by_name) == 3
    assert resolve_target(embeddings, str(row["detid"]))["detid"].tolist() == [row["detid"]]
    assert len(resolve_target(embeddings, str(row["srcid"]))) == 3
    with pytest.raises(UserError, match="neither an IAU name"):
        resolve_target(embeddings, "Sgr A*")
    with pytest.raises(UserError, match="no detection or source with id 7"):
        resolve_target(embeddings, "7")


def test_neighbour_table_leaves_out_the_excluded_and_sorts_by_distance(table) -> None:
    embeddings, classes, index = table
    rows = embeddings[embeddings["srcid"] == embeddings["srcid"].iloc[0]]
    same = set(rows["detid"].tolist())
    frame = neighbour_table(embeddings, classes, index, latent_matrix(rows), ["a", "b", "c"], [same] * 3, 4)
    assert len(frame) == 12 and not set(frame["detid"]) & same
    for _, block in frame.groupby("query"):
        assert block["rank"].tolist() == [1, 2, 3, 4]
        assert np.all(np.diff(block["distance"].to_numpy()) >= 0)
    assert set(frame.columns) >= {"neighbour", "srcid", "class", "obs_date", "counts"}
    assert obs_date([51544.0, np.nan]).tolist() == ["2000-01-01", ""]


def test_the_cli_answers_through_the_same_functions(table) -> None:
    embeddings, classes, index = table
    row = embeddings.iloc[7]
    assert cli_latent.resolve_target(embeddings, str(row["detid"])).equals(
        resolve_target(embeddings, str(row["detid"])))
    vectors = latent_matrix(embeddings.iloc[[7]])
    assert cli_latent._neighbour_table(embeddings, classes, index, vectors, ["q"], [set()], 3).equals(
        neighbour_table(embeddings, classes, index, vectors, ["q"], [set()], 3))
