"""Observation partitions: the manifest that tells a new release's changes, and the run ranges."""

import pandas as pd
import pytest
from dagster import instance_for_test

from xmm_pipeline.orchestration.partitions import (
    OBSERVATION_PARTITIONS_NAME,
    add_observation_partitions,
    changed_observations,
    contiguous_ranges,
    observation_manifest,
)


def detections(release: str = "DR14") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "detid": [1, 2, 3, 4, 5],
            "srcid": [10, 11, 10, 12, 13],
            "obs_id": ["0000000001", "0000000001", "0000000002", "0000000002", "0000000003"],
            "pn_8_cts": [400.0, 500.0, 600.0, 700.0, 800.0],
            "n_detections": [2, 1, 2, 1, 1],
            "release": [release] * 5,
        }
    )


def test_manifest_ignores_release_label_and_detection_count():
    before = observation_manifest(detections("DR14"))
    after_frame = detections("DR15")
    after_frame["n_detections"] += 1
    after = observation_manifest(after_frame)
    assert list(before["obs_id"]) == ["0000000001", "0000000002", "0000000003"]
    assert list(before["n_selected"]) == [2, 2, 1]
    assert changed_observations(before, after) == []


def test_changed_row_and_new_observation_are_detected():
    before = observation_manifest(detections())
    frame = detections()
    frame.loc[3, "pn_8_cts"] = 701.0
    frame = pd.concat([frame, frame.iloc[[0]].assign(detid=6, obs_id="0000000009")], ignore_index=True)
    assert changed_observations(before, observation_manifest(frame)) == ["0000000002", "0000000009"]
    assert changed_observations(None, before) == ["0000000001", "0000000002", "0000000003"]


@pytest.mark.parametrize(
    ("wanted", "max_per_range", "expected"),
    [
        (["b", "c", "e"], 10, [("b", "c"), ("e", "e")]),
        (["a", "b", "c", "d", "e"], 2, [("a", "b"), ("c", "d"), ("e", "e")]),
        ([], 5, []),
        (["a", "e"], 5, [("a", "a"), ("e", "e")]),
    ],
)
def test_contiguous_ranges_cover_exactly_the_wanted_keys(wanted, max_per_range, expected):
    keys = ["a", "b", "c", "d", "e"]
    ranges = contiguous_ranges(keys, wanted, max_per_range)
    assert ranges == expected
    covered = [k for start, end in ranges for k in keys[keys.index(start) : keys.index(end) + 1]]
    assert covered == sorted(wanted)


def test_ten_thousand_new_observations_make_few_runs():
    keys = [f"{i:010d}" for i in range(10_000)]
    assert len(contiguous_ranges(keys, keys, 500)) == 20


def test_new_partitions_are_appended_sorted_and_only_once():
    with instance_for_test() as instance:
        assert add_observation_partitions(instance, ["0000000003", "0000000001"]) == [
            "0000000001",
            "0000000003",
        ]
        assert add_observation_partitions(instance, ["0000000002", "0000000001"]) == ["0000000002"]
        assert instance.get_dynamic_partitions(OBSERVATION_PARTITIONS_NAME) == [
            "0000000001",
            "0000000003",
            "0000000002",
        ]
