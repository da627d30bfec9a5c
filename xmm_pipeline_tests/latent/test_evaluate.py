"""Evaluation metrics on synthetic embeddings with a known answer, and the latent report."""

from __future__ import annotations

import numpy as np
import pytest

from xmm_pipeline.latent.evaluate import (
    CV_REPEATS,
    ONE_ES_IAUNAME,
    ClassificationScores,
    active_dimensions,
    comparison_verdict,
    evaluate_latent_space,
    hardness_baseline,
    knn_classification,
    latent_metrics,
    latent_report_sections,
    outlier_recall,
    paired_margin,
    precision_at_k,
    soft_state_neighbours,
)
from xmm_pipeline.latent.products import outlier_scores
from xmm_pipeline_tests.latent.synthetic import synthetic_embeddings


def test_knn_is_cross_validated_by_source() -> None:
    rng = np.random.default_rng(0)
    # Each source has a private random label and a private location: only leakage across folds
    # (detections of one source on both sides) could predict it.
    groups = np.repeat(np.arange(60), 5)
    labels = np.repeat(rng.choice(["a", "b", "c"], 60), 5)
    features = np.repeat(rng.normal(0, 10, (60, 2)), 5, axis=0) + rng.normal(0, 0.01, (300, 2))
    leaky = knn_classification(features, labels, np.arange(300), k=3)
    grouped = knn_classification(features, labels, groups, k=3)
    assert leaky.accuracy > 0.95
    assert grouped.accuracy < 0.6
    assert set(grouped.recall_by_class) == {"a", "b", "c"} and grouped.n_samples == 300


def _clustered(rng: np.random.Generator, n_sources: int = 90) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three overlapping classes in two dimensions, three detections per source."""
    labels = np.repeat(np.array(["a", "b", "c"] * (n_sources // 3)), 3)
    centres = {"a": (0.0, 0.0), "b": (1.0, 0.0), "c": (0.0, 1.0)}  # overlapping: scaling matters
    points = np.array([centres[c] for c in labels]) + rng.normal(0, 0.3, (len(labels), 2))
    return points, labels, np.repeat(np.arange(n_sources), 3)


def test_latent_means_are_scored_as_they_are_so_a_collapsed_dimension_does_not_count() -> None:
    embeddings, classes = synthetic_embeddings(n_sources=200, detections_per_source=3, n_odd=0, dim=7)
    rng = np.random.default_rng(1)
    embeddings[["z0", "z1"]] += rng.normal(0, 0.8, (len(embeddings), 2))  # classes that overlap a little
    # five inactive (posterior-collapsed) dimensions, as an 8-D VAE of our spectra has: means ~ 0
    collapsed = [f"z{i}" for i in range(2, 7)]
    embeddings[collapsed] = rng.normal(0, 0.02, (len(embeddings), len(collapsed)))
    metrics = latent_metrics(embeddings, classes)
    assert metrics.latent_dim == 7 and metrics.knn_latent.scaling == "as is"
    assert metrics.knn_latent.balanced_accuracy > 0.97
    assert len(metrics.knn_latent.per_repeat_balanced_accuracy) == CV_REPEATS
    # standardised, each noise dimension weighs as much as an informative one
    table = embeddings.merge(classes[["detid", "class"]], on="detid")
    standardised = knn_classification(table[["z0", "z1", *collapsed]].to_numpy(), table["class"].to_numpy(),
                                      table["srcid"].to_numpy())
    assert standardised.balanced_accuracy < metrics.knn_latent.balanced_accuracy - 0.05


def test_active_dimensions_leave_out_the_collapsed_ones() -> None:
    embeddings, _ = synthetic_embeddings(n_sources=50, n_odd=0, dim=4)
    assert active_dimensions(embeddings) == 4  # informative means, posterior variance e^-3
    rng = np.random.default_rng(0)
    embeddings["z3"], embeddings["logvar3"] = rng.normal(0, 0.05, len(embeddings)), -0.01  # the prior
    assert active_dimensions(embeddings) == 3


def test_hardness_baseline_is_the_better_of_standardised_and_as_is() -> None:
    rng = np.random.default_rng(2)
    points, labels, groups = _clustered(rng)
    small_signal = np.hstack([points * 0.01, rng.normal(0, 1.0, (len(points), 2))])
    small_noise = np.hstack([points, rng.normal(0, 0.01, (len(points), 2))])
    for features, expected in ((small_signal, "standardised"), (small_noise, "as is")):
        chosen = hardness_baseline(features, labels, groups, repeats=2)
        other = knn_classification(features, labels, groups, repeats=2, standardise=expected == "as is")
        assert chosen.scaling == expected
        assert chosen.balanced_accuracy >= other.balanced_accuracy


def test_a_given_hardness_baseline_is_reused_not_recomputed() -> None:
    embeddings, classes = synthetic_embeddings(n_sources=80, detections_per_source=3, n_odd=0)
    first = latent_metrics(embeddings, classes)
    given = ClassificationScores(0.5, 0.25, per_repeat_balanced_accuracy=[0.25] * CV_REPEATS, scaling="as is")
    again = latent_metrics(embeddings, classes, knn_hardness=given)
    assert again.knn_hardness is given and first.knn_hardness.balanced_accuracy != 0.25
    assert again.knn_latent.balanced_accuracy == first.knn_latent.balanced_accuracy


def test_the_verdict_is_paired_and_needs_a_margin_above_the_noise() -> None:
    def scores(per_repeat: list[float]) -> ClassificationScores:
        return ClassificationScores(0.0, float(np.mean(per_repeat)), per_repeat_balanced_accuracy=per_repeat)

    # both move with the folds: a steady +0.02 is a win although the scores vary by 0.1
    margin, spread = paired_margin(scores([0.50, 0.40, 0.60]), scores([0.48, 0.38, 0.58]))
    assert margin == pytest.approx(0.02) and spread == pytest.approx(0.0, abs=1e-12)
    assert comparison_verdict(margin, spread) == "beats"
    margin, spread = paired_margin(scores([0.50, 0.40, 0.60]), scores([0.40, 0.50, 0.57]))
    assert comparison_verdict(margin, spread).startswith("ties")
    assert comparison_verdict(-0.05, 0.01) == "does not beat"


def test_precision_at_k_skips_the_same_source() -> None:
    features = np.array([[0.0], [0.0], [1.0], [1.1], [5.0], [5.1]])
    labels = np.array(["x", "x", "x", "y", "y", "y"])
    srcids = np.array([1, 1, 2, 3, 4, 5])
    # source 1's two detections would be perfect neighbours of each other; they do not count
    assert precision_at_k(features, labels, srcids, k=1) == pytest.approx((1 + 1 + 0 + 0 + 1 + 1) / 6)


def test_latent_metrics_on_a_known_answer() -> None:
    embeddings, classes = synthetic_embeddings(n_sources=200, detections_per_source=3, n_odd=5)
    metrics = latent_metrics(embeddings, classes)
    assert metrics.outliers["n_top"] == 7  # 1% of 605
    assert metrics.knn_latent.accuracy > 0.95
    # the odd spectra are isolated single detections: no neighbour can vouch for them
    assert all(r > 0.95 for c, r in metrics.knn_latent.recall_by_class.items() if c != "odd")
    assert metrics.knn_latent.balanced_accuracy > metrics.knn_hardness.balanced_accuracy + 0.2
    assert metrics.precision_at_10_latent > metrics.precision_at_10_hardness
    assert metrics.outliers["n_odd"] == 5 and metrics.outliers["recall"] == 1.0
    paths = metrics.path_lengths.set_index("class")["median_path_length"]
    assert paths["TDE"] > 5 * paths["AGN"] and paths["XRB"] > 5 * paths["AGN"]
    row = metrics.summary_row()
    assert row["latent dim"] == 2 and row["TDE+XRB / AGN path"] > 5


def test_outlier_recall_counts_the_top_percent() -> None:
    embeddings, classes = synthetic_embeddings(n_sources=100, n_odd=2)
    ranked = outlier_scores(embeddings)
    table = embeddings.merge(classes[["detid", "class", "is_odd"]], on="detid")
    result = outlier_recall(ranked, table, top_fraction=0.01)
    assert result["n_top"] == int(np.ceil(0.01 * len(table))) and result["found"] == 2
    reversed_rank = ranked.iloc[::-1]
    assert outlier_recall(reversed_rank, table)["recall"] == 0.0


def test_soft_state_neighbours_of_the_named_source() -> None:
    embeddings, classes = synthetic_embeddings(n_sources=80, detections_per_source=3, n_odd=0)
    table = embeddings.merge(classes[["detid", "class"]], on="detid")
    tde_source = table.loc[table["class"] == "TDE", "srcid"].iloc[0]
    table.loc[table["srcid"] == tde_source, "iauname"] = ONE_ES_IAUNAME
    table["state"] = np.where(table["detid"] == table.loc[table["srcid"] == tde_source, "detid"].iloc[0],
                              "soft blackbody", "power law")
    neighbours = soft_state_neighbours(table, k=5)
    assert len(neighbours) == 5 and neighbours["query_state"].eq("soft blackbody").all()
    assert (neighbours["srcid"] != tde_source).all()
    assert neighbours["distance"].is_monotonic_increasing
    assert (neighbours["class"] == "TDE").all()
    assert soft_state_neighbours(table, iauname="4XMM J235959.9+895959").empty


def test_latent_report_is_written(tmp_path) -> None:
    embeddings, classes = synthetic_embeddings(n_sources=80, detections_per_source=3, n_odd=3)
    text = evaluate_latent_space(embeddings, classes, tmp_path)
    assert (tmp_path / "EVALUATION.md").read_text() == text
    assert "**beats**" in text and "## Outliers" in text and "## Trajectories" in text
    for name in ("latent_density", "latent_classes", "latent_knn_recall", "latent_trajectories"):
        assert (tmp_path / "images" / f"{name}.png").stat().st_size > 5000
        assert f"images/{name}.png" in text


def test_reference_representations_are_scored_like_the_latent_space(tmp_path) -> None:
    embeddings, classes = synthetic_embeddings(n_sources=80, detections_per_source=3, n_odd=0)
    same = embeddings[["detid", "z0", "z1"]].rename(columns={"z0": "a", "z1": "b"})
    text, metrics = latent_report_sections(embeddings, classes, tmp_path, references={"copy of z": same})
    row = next(line for line in text.splitlines() if line.startswith("| copy of z |"))
    assert f"{metrics.knn_latent.balanced_accuracy:.3f}" in row
    assert f"{metrics.precision_at_10_latent:.3f}" in row
