"""The observation partitions of `pn_spectra` and the per-observation manifest that says what changed.

A partition is an XMM observation (obs_id): the unit the archive serves and the unit a new release
adds. The manifest holds, per observation, a hash of its selected catalogue rows and the run in which
that hash last changed (`changed_in`); an observation withdrawn by a release keeps a row with no
selected detection. An observation needs ingesting when its partition was last materialised before
the catalogue run that changed it (`observations_to_ingest`): the event log, not a second copy of
the manifest, says what has been done, so planning is the same however often the catalogue run is
re-executed.
"""

from __future__ import annotations

import hashlib

import pandas as pd
from dagster import DagsterInstance, DynamicPartitionsDefinition

OBSERVATION_PARTITIONS_NAME = "observations"
observation_partitions = DynamicPartitionsDefinition(name=OBSERVATION_PARTITIONS_NAME)

MANIFEST_COLUMNS = ["obs_id", "n_selected", "rows_hash"]
TRACKED_COLUMNS = [*MANIFEST_COLUMNS, "changed_in"]
# Columns that do not change what is computed from a row but change with every release: its label,
# and a source's detection count (a new observation of a source would otherwise redo its old ones).
NOT_HASHED = ["release", "n_detections"]


def observation_manifest(selected: pd.DataFrame) -> pd.DataFrame:
    """One row per observation with selected detections: obs_id, n_selected, rows_hash (sha256)."""
    rows = []
    for obs_id, group in selected.sort_values(["obs_id", "detid"]).groupby("obs_id", sort=True):
        rows_only = group.drop(columns=[c for c in NOT_HASHED if c in group.columns]).reset_index(drop=True)
        values = pd.util.hash_pandas_object(rows_only, index=False).to_numpy()
        rows.append((str(obs_id), len(group), hashlib.sha256(values.tobytes()).hexdigest()))
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS).astype({"obs_id": str, "n_selected": "int64"})


def changed_observations(previous: pd.DataFrame | None, current: pd.DataFrame) -> list[str]:
    """Observations of `current` that are new or whose selected rows differ from `previous`."""
    if previous is None or previous.empty:
        return sorted(current["obs_id"])
    before = dict(zip(previous["obs_id"], previous["rows_hash"]))
    return sorted(o for o, h in zip(current["obs_id"], current["rows_hash"]) if before.get(o) != h)


def tracked_manifest(previous: pd.DataFrame | None, current: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """`current` with `changed_in`: `run_id` where an observation is new or its rows changed since
    `previous`, else the run recorded there. Observations of `previous` missing from `current` stay,
    with n_selected 0 and an empty hash (withdrawn), changed in `run_id` when they were withdrawn now."""
    tracked = current[MANIFEST_COLUMNS].copy()
    if previous is None or previous.empty:
        tracked["changed_in"] = run_id
        return tracked.reset_index(drop=True)
    before = previous.set_index("obs_id")
    runs = before["changed_in"] if "changed_in" in before else pd.Series("", index=before.index)
    same = tracked["rows_hash"].to_numpy() == before["rows_hash"].reindex(tracked["obs_id"]).to_numpy()
    tracked["changed_in"] = [
        str(runs.get(obs, "")) if unchanged else run_id for obs, unchanged in zip(tracked["obs_id"], same)
    ]
    gone = before[~before.index.isin(tracked["obs_id"])]
    withdrawn = pd.DataFrame(
        {
            "obs_id": gone.index.astype(str),
            "n_selected": 0,
            "rows_hash": "",
            "changed_in": [
                run_id if was_selected else str(runs.get(obs, ""))
                for obs, was_selected in zip(gone.index, gone["rows_hash"] != "")
            ],
        }
    )
    merged = pd.concat([tracked, withdrawn], ignore_index=True) if len(withdrawn) else tracked
    return merged.sort_values("obs_id").reset_index(drop=True).astype({"n_selected": "int64"})


def observations_to_ingest(
    manifest: pd.DataFrame, changed_at: dict[str, int], ingested_at: dict[str, int]
) -> list[str]:
    """Observations whose partition was never materialised, or last materialised before the change.

    `changed_at` maps a catalogue run id to the storage id of its `selected_detections`
    materialisation, `ingested_at` an observation to the storage id of its latest `pn_spectra`
    materialisation (storage ids are the event log's clock). A withdrawn observation (no selected
    detection) is wanted only if a file of it was written before it was withdrawn.
    """
    runs = manifest["changed_in"] if "changed_in" in manifest else pd.Series("", index=manifest.index)
    wanted = []
    for obs_id, n_selected, run_id in zip(manifest["obs_id"], manifest["n_selected"], runs):
        last = ingested_at.get(obs_id)
        stale = last is not None and last < changed_at.get(str(run_id), 0)
        if (n_selected > 0 and (last is None or stale)) or (n_selected == 0 and stale):
            wanted.append(str(obs_id))
    return sorted(wanted)


def add_observation_partitions(instance: DagsterInstance, obs_ids: list[str]) -> list[str]:
    """Register the observations not yet known as partitions (sorted, so new ones are contiguous)."""
    known = set(instance.get_dynamic_partitions(OBSERVATION_PARTITIONS_NAME))
    new = sorted(set(obs_ids) - known)
    if new:
        instance.add_dynamic_partitions(OBSERVATION_PARTITIONS_NAME, new)
    return new


def contiguous_ranges(all_keys: list[str], wanted: list[str], max_per_range: int) -> list[tuple[str, str]]:
    """Cover `wanted` with runs of consecutive keys in partition order, at most `max_per_range` each.

    One run per range: 10^4 new observations added together become 10^4 / max_per_range runs, and a
    few re-processed observations scattered among the old ones one run each.
    """
    wanted_set = set(wanted)
    ranges: list[tuple[str, str]] = []
    start: str | None = None
    previous: str | None = None
    length = 0
    for key in all_keys:
        if key in wanted_set and start is not None and length < max_per_range:
            previous, length = key, length + 1
            continue
        if start is not None:
            ranges.append((start, previous))
            start = None
        if key in wanted_set:
            start, previous, length = key, key, 1
    if start is not None:
        ranges.append((start, previous))
    return ranges
