"""Embeddings table: assembly from model outputs, Parquet round trip, refusal of bad inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from xmm_pipeline.errors import UserError
from xmm_pipeline.latent.embed import (
    embeddings_frame,
    latent_columns,
    latent_matrix,
    read_embeddings,
    write_embeddings,
)
from xmm_pipeline_tests.latent.synthetic import synthetic_embeddings


def test_frame_has_identifiers_latents_and_version(tmp_path) -> None:
    frame, _ = synthetic_embeddings(n_sources=8, dim=3)
    assert latent_columns(frame) == ["z0", "z1", "z2"]
    assert {"logvar0", "logvar2", "deviance_per_dof", "model_version", "detid", "srcid", "mjd"} <= set(frame)
    assert latent_matrix(frame).dtype == np.float32 and latent_matrix(frame).flags.c_contiguous
    path = write_embeddings(frame, tmp_path / "latent" / "embeddings.parquet")
    back = read_embeddings(path)
    pd.testing.assert_frame_equal(back, frame)
    assert not list(path.parent.glob(".*tmp"))


def test_mismatched_or_bad_outputs_are_refused() -> None:
    meta = pd.DataFrame({"detid": [1, 2], "srcid": [1, 1], "mjd": [1.0, 2.0]})
    with pytest.raises(ValueError, match="do not match"):
        embeddings_frame(meta, np.zeros((3, 2)), np.zeros((3, 2)), np.zeros(3), "v")
    with pytest.raises(ValueError, match="non-finite"):
        embeddings_frame(meta, np.array([[0, np.nan], [0, 0]]), np.zeros((2, 2)), np.zeros(2), "v")
    with pytest.raises(UserError, match="more than once"):
        embeddings_frame(meta.assign(detid=[5, 5]), np.zeros((2, 2)), np.zeros((2, 2)), np.zeros(2), "v")
    with pytest.raises(UserError, match="lacks mjd"):
        embeddings_frame(meta.drop(columns="mjd"), np.zeros((2, 2)), np.zeros((2, 2)), np.zeros(2), "v")


def test_missing_embeddings_file_is_a_user_error(tmp_path) -> None:
    with pytest.raises(UserError, match="embed"):
        read_embeddings(tmp_path / "nothing.parquet")
