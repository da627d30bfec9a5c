"""Planning a release's partition runs from the tracked manifest and the event log's clock."""

import pandas as pd

from xmm_pipeline.orchestration.partitions import observations_to_ingest, tracked_manifest


def manifest(rows: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame(
        {"obs_id": list(rows), "n_selected": [1] * len(rows), "rows_hash": list(rows.values())}
    ).astype({"n_selected": "int64"})


def test_changed_in_records_the_run_that_changed_an_observation():
    first = tracked_manifest(None, manifest({"a": "h1", "b": "h2", "c": "h3"}), "run14")
    assert list(first["changed_in"]) == ["run14"] * 3
    second = tracked_manifest(first, manifest({"a": "h1", "b": "h2*", "d": "h4"}), "run15")
    rows = second.set_index("obs_id")
    assert rows.loc["a", "changed_in"] == "run14"
    assert rows.loc["b", "changed_in"] == "run15" and rows.loc["d", "changed_in"] == "run15"
    assert rows.loc["c", "n_selected"] == 0 and rows.loc["c", "rows_hash"] == ""
    assert rows.loc["c", "changed_in"] == "run15", "withdrawn by this release"
    again = tracked_manifest(second, manifest({"a": "h1", "b": "h2*", "d": "h4"}), "rerun15")
    pd.testing.assert_frame_equal(again, second)  # a re-executed catalogue run changes nothing


def test_an_observation_is_ingested_when_materialised_before_its_change():
    tracked = tracked_manifest(
        tracked_manifest(None, manifest({"a": "h1", "b": "h2", "c": "h3"}), "run14"),
        manifest({"a": "h1", "b": "h2*", "d": "h4"}),
        "run15",
    )
    changed_at = {"run14": 10, "run15": 50}
    ingested_at = {"a": 20, "b": 21, "c": 22}
    assert observations_to_ingest(tracked, changed_at, ingested_at) == ["b", "c", "d"]
    done = {"a": 20, "b": 60, "c": 61, "d": 62}
    assert observations_to_ingest(tracked, changed_at, done) == []


def test_a_withdrawn_observation_never_written_needs_nothing_and_an_unknown_run_counts_as_old():
    tracked = pd.DataFrame(
        {"obs_id": ["a", "b"], "n_selected": [0, 1], "rows_hash": ["", "h"], "changed_in": ["r2", "gone"]}
    )
    assert observations_to_ingest(tracked, {"r2": 5}, {}) == ["b"]
    assert observations_to_ingest(tracked, {"r2": 5}, {"b": 1}) == []
