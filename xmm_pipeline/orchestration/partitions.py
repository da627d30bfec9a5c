"""The observation partitions of `pn_spectra` and the per-observation manifest that says what changed.

A partition is an XMM observation (obs_id): the unit the archive serves and the unit a new release
adds. The manifest holds, per observation, a hash of its selected catalogue rows; comparing the
manifest of a new release with the previous one gives the observations to (re)process.
"""

from __future__ import annotations

import hashlib

import pandas as pd
from dagster import DagsterInstance, DynamicPartitionsDefinition

OBSERVATION_PARTITIONS_NAME = "observations"
observation_partitions = DynamicPartitionsDefinition(name=OBSERVATION_PARTITIONS_NAME)

MANIFEST_COLUMNS = ["obs_id", "n_selected", "rows_hash"]
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
