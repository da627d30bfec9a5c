"""Outliers, trajectories, clusters and maps on synthetic embeddings with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from xmm_pipeline.errors import UserError
from xmm_pipeline.latent.embed import latent_matrix
from xmm_pipeline.latent.products import (
    MapProjection,
    fit_clusters,
    knn_mean_distance,
    latent_trajectories,
    outlier_scores,
    plot_latent_classes,
    plot_latent_density,
    plot_reconstruction,
    plot_trajectories,
    trajectory_points,
)
from xmm_pipeline_tests.latent.synthetic import synthetic_embeddings


def test_knn_distance_excludes_self_and_matches_kdtree() -> None:
    frame, _ = synthetic_embeddings(n_sources=60)
    vectors = latent_matrix(frame)
    knn = knn_mean_distance(vectors, frame["detid"].to_numpy(), k=4)
    distances, _ = cKDTree(vectors).query(vectors, 5)
    np.testing.assert_allclose(knn, distances[:, 1:].mean(axis=1), rtol=1e-4, atol=1e-6)


def test_odd_points_top_the_outlier_ranking() -> None:
    frame, classes = synthetic_embeddings(n_sources=120, n_odd=5)
    ranked = outlier_scores(frame)
    assert list(ranked["rank"]) == list(range(1, len(frame) + 1))
    assert ranked["outlier_score"].is_monotonic_decreasing
    odd = set(classes.loc[classes["is_odd"], "detid"])
    assert set(ranked["detid"].head(5)) == odd
    assert ranked["outlier_score"].between(0, 1).all()
    # A point unusual in only one way scores below one unusual in both.
    one_way = frame.copy()
    one_way.loc[0, "deviance_per_dof"] = 100.0
    rescored = outlier_scores(one_way).set_index("detid")
    odd_scores = rescored.loc[list(odd), "outlier_score"]
    assert rescored.loc[frame.loc[0, "detid"], "outlier_score"] < odd_scores.min()


def test_trajectories_measure_known_paths() -> None:
    frame, classes = synthetic_embeddings(n_sources=40, detections_per_source=4, n_odd=0)
    paths = latent_trajectories(frame)
    assert len(paths) == 40 and (paths["n_detections"] == 4).all()
    assert paths["path_length"].is_monotonic_decreasing
    by_class = paths.merge(classes.drop_duplicates("srcid")[["srcid", "class"]], on="srcid")
    medians = by_class.groupby("class")["path_length"].median()
    assert medians["XRB"] == pytest.approx(4.5, abs=0.4) and medians["TDE"] == pytest.approx(4.5, abs=0.4)
    assert medians["AGN"] < 0.5
    mover = by_class[by_class["class"] == "TDE"].iloc[0]
    points = trajectory_points(frame, mover["srcid"])
    assert points["mjd"].is_monotonic_increasing
    assert points["cumulative_path"].iloc[-1] == pytest.approx(mover["path_length"])
    assert mover["largest_jump"] == pytest.approx(points["step"].max())
    assert mover["jump_to_detid"] == points.loc[points["step"].idxmax(), "detid"]
    with pytest.raises(UserError, match="not in the embeddings"):
        trajectory_points(frame, 1)


def test_single_detection_sources_have_no_trajectory() -> None:
    frame, _ = synthetic_embeddings(n_sources=10, detections_per_source=1, n_odd=0)
    assert latent_trajectories(frame).empty


def test_clusters_recover_the_classes() -> None:
    frame, classes = synthetic_embeddings(n_sources=200, n_odd=0)
    result = fit_clusters(frame, classes, max_components=8)
    # four well-separated blobs; XRB/TDE smear into lines, so BIC may split them further
    assert 4 <= len(result.summary) <= 8
    assert result.summary["n_detections"].sum() == len(frame)
    assert result.summary["n_detections"].is_monotonic_decreasing
    assert (result.summary["majority_share"] > 0.95).all()
    assert set(result.summary["majority_class"]) == {"AGN", "star", "XRB", "TDE"}
    assert result.bic["bic"].idxmin() + 1 == len(result.summary)


def test_projection_keeps_2d_and_projects_higher() -> None:
    frame2, _ = synthetic_embeddings(n_sources=20)
    vectors2 = latent_matrix(frame2)
    np.testing.assert_allclose(MapProjection.fit(vectors2)(vectors2), vectors2, rtol=1e-6)
    frame8, _ = synthetic_embeddings(n_sources=20, dim=8)
    points = MapProjection.fit(latent_matrix(frame8))(latent_matrix(frame8))
    assert points.shape == (len(frame8), 2)
    assert points[:, 0].var() >= points[:, 1].var()


def test_plots_are_written_as_png(tmp_path) -> None:
    frame, classes = synthetic_embeddings(n_sources=60, detections_per_source=3)
    written = [
        plot_latent_density(frame, tmp_path / "density.png"),
        plot_latent_classes(frame, classes, tmp_path / "classes.png"),
        plot_trajectories(frame, list(latent_trajectories(frame)["srcid"].head(3)), tmp_path / "paths.png",
                          classes=classes),
    ]
    edges = np.geomspace(0.3, 10, 21)
    expected = np.linspace(50, 5, 20)
    written.append(plot_reconstruction(edges, np.random.default_rng(0).poisson(expected), np.full(20, 1.0),
                                       expected, tmp_path / "show.png", title="test"))
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert not list(tmp_path.glob(".*"))
