"""The FAISS index: exact for small sets, checked IVF for large, ids mapped, round trip on disk."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from xmm_pipeline.errors import UserError
from xmm_pipeline.latent.search import build_index, load_index, recall_at_k, save_index


def _clusters(n_rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """Points around 12 fixed cluster centres (the same centres for every seed)."""
    centres = np.random.default_rng(99).normal(0, 3, (12, dim))
    rng = np.random.default_rng(seed)
    return (centres[rng.integers(0, 12, n_rows)] + rng.normal(0, 0.4, (n_rows, dim))).astype(np.float32)


def test_small_set_is_exact_and_returns_detids() -> None:
    vectors = _clusters(500, 2)
    detids = np.arange(500, dtype=np.int64) * 10 + 7
    index = build_index(vectors, detids)
    assert index.info.kind == "flat"
    distances, ids = index.search(vectors[:20], 5)
    tree_distances, tree_rows = cKDTree(vectors).query(vectors[:20], 5)
    np.testing.assert_allclose(distances, tree_distances, rtol=1e-4, atol=1e-5)
    assert (ids[:, 0] == detids[:20]).all()
    assert set(ids.ravel()) <= set(detids)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(detids[tree_rows], axis=1))


def test_large_set_uses_ivf_with_checked_recall(tmp_path) -> None:
    vectors = _clusters(20_000, 4, seed=1)
    detids = np.arange(20_000, dtype=np.int64) + 5_000_000
    index = build_index(vectors, detids, exact_max_rows=5_000, recall_sample=500)
    assert index.info.kind == "ivf"
    assert index.info.recall_at_k >= 0.99
    queries = _clusters(300, 4, seed=2)
    found, _ = index.search(queries, 10)
    exact, _ = cKDTree(vectors).query(queries, 10)
    assert recall_at_k(found, exact) >= 0.99

    save_index(index, tmp_path)
    loaded = load_index(tmp_path)
    assert loaded.info == index.info
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], index.search(queries, 10)[1])


def test_unreachable_recall_falls_back_to_exact() -> None:
    vectors = _clusters(3_000, 8, seed=3)
    index = build_index(vectors, np.arange(3_000), exact_max_rows=100, min_recall=1.01, recall_sample=100)
    assert index.info.kind == "flat"


def test_recall_counts_ties_as_hits() -> None:
    exact = np.array([[0.0, 1.0, 1.0]])
    assert recall_at_k(np.array([[0.0, 1.0, 1.0]]), exact) == 1.0
    assert recall_at_k(np.array([[0.0, 1.0, 2.0]]), exact) == pytest.approx(2 / 3)


def test_bad_inputs_and_missing_index(tmp_path) -> None:
    vectors = _clusters(10, 2)
    with pytest.raises(UserError, match="not unique"):
        build_index(vectors, np.zeros(10))
    bad = vectors.copy()
    bad[3, 1] = np.nan
    with pytest.raises(UserError, match="NaN"):
        build_index(bad, np.arange(10))
    index = build_index(vectors, np.arange(10))
    with pytest.raises(UserError, match="3 latent dimensions"):
        index.search(np.zeros((1, 3)), 2)
    distances, ids = index.search(vectors[:1], 15)
    assert (ids[0, 10:] == -1).all() and np.isinf(distances[0, 10:]).all()
    with pytest.raises(UserError, match="no latent index"):
        load_index(tmp_path / "absent")
