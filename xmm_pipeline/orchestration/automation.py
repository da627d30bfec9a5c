"""Jobs, the release sensor and the re-embedding schedule: small and declarative, logic in functions.

- `ingest`: catalogue to spectra, over a range of observation partitions per run.
- `retrain`: training set, model and everything downstream. Only ever launched by a person.
- `reembed`: embeddings, index and latent products with the current model; it also runs the check
  that shows the model stale relative to the data.
- `all`: everything.
The sensor turns a new catalogue release into `ingest` runs for the new and changed observations,
then one `reembed` run once those have succeeded. The schedule re-embeds when spectra changed since
the last embedding and skips with a reason otherwise.
"""

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import pandas as pd
from dagster import (
    AssetKey,
    AssetObservation,
    AssetSelection,
    DagsterError,
    DagsterInstance,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Executor,
    ExecutorDefinition,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    multi_or_in_process_executor,
    schedule,
    sensor,
)

from xmm_pipeline.archive.catalogue import as_canonical
from xmm_pipeline.orchestration.assets_archive import catalogue_release, detections, selected_detections
from xmm_pipeline.orchestration.assets_latent import REEMBED_ASSETS, latent_embeddings
from xmm_pipeline.orchestration.assets_model import vae_model
from xmm_pipeline.orchestration.assets_spectra import (
    INGEST_TAG,
    MAX_OBSERVATIONS_PER_RUN,
    pn_spectra,
    training_set,
)
from xmm_pipeline.orchestration.checks import model_trained_on_current_data
from xmm_pipeline.orchestration.partitions import (
    OBSERVATION_PARTITIONS_NAME,
    changed_observations,
    contiguous_ranges,
    observation_manifest,
    observation_partitions,
)
from xmm_pipeline.orchestration.resources import ArchiveResource, StorageResource

RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
PARTITION_TAG = "dagster/partition"
RELEASE_TAG = "xmm/release"
DATA_VERSION_TAG = "dagster/data_version"


class PartitionRangeRequiredError(DagsterError):
    """A run of a job over observation partitions was started without a range of observations."""


def range_refusal(job_name: str, tags: Mapping[str, str], known: list[str]) -> str | None:
    """None when the run names its observations, else the one-line reason it cannot run."""
    if (tags.get(RANGE_START_TAG) and tags.get(RANGE_END_TAG)) or tags.get(PARTITION_TAG):
        return None
    span = f"{len(known)} known, {known[0]}...{known[-1]}" if known else "none registered yet"
    first, last = (known[0], known[-1]) if known else ("FIRST_OBS_ID", "LAST_OBS_ID")
    example = json.dumps(partition_range_tags(first, last))
    return (
        f"job `{job_name}` runs over a range of observation partitions ({span}) and this run names none: "
        f"pass --tags '{example}', launch it from the UI, or let the release sensor (or `xmm-pipeline demo`) "
        "request it"
    )


class _RangeCheckingExecutor(Executor):
    """Refuses a run without observation partitions before any step, in one line, then delegates."""

    def __init__(self, inner: Executor) -> None:
        self._inner = inner

    @property
    def retries(self):  # -> RetryMode (not exported by dagster)
        return self._inner.retries

    @property
    def step_dependency_config(self):
        return self._inner.step_dependency_config

    def execute(self, plan_context, execution_plan):
        run = plan_context.dagster_run
        known = list(plan_context.instance.get_dynamic_partitions(OBSERVATION_PARTITIONS_NAME))
        reason = range_refusal(run.job_name, run.tags, known)
        if reason is not None:
            raise PartitionRangeRequiredError(reason)
        yield from self._inner.execute(plan_context, execution_plan)


def range_checked(inner: ExecutorDefinition) -> ExecutorDefinition:
    """`inner` (same config, same engines) refusing runs that name no observations before any step."""
    return ExecutorDefinition(
        name=f"{inner.name}_range_checked",
        config_schema=inner.config_schema,
        requirements=inner.get_requirements,
        executor_creation_fn=lambda context: _RangeCheckingExecutor(inner.executor_creation_fn(context)),
        description=f"{inner.description or inner.name}; refuses runs without a range of observations.",
    )


ingest_job = define_asset_job(
    "ingest",
    selection=AssetSelection.assets(detections, selected_detections, pn_spectra),
    tags=INGEST_TAG,
    executor_def=range_checked(multi_or_in_process_executor),
    description="Catalogue to spectra for a range of observations (the release sensor picks the range).",
)
retrain_job = define_asset_job(
    "retrain",
    selection=AssetSelection.assets(training_set).downstream(),
    description="Snapshot the training set, train the model, and rebuild everything downstream.",
)
reembed_job = define_asset_job(
    "reembed",
    selection=AssetSelection.assets(*REEMBED_ASSETS) | AssetSelection.checks(model_trained_on_current_data),
    description="Embeddings, index and latent products with the current model (no retraining).",
)
all_job = define_asset_job(
    "all",
    selection=AssetSelection.all() - AssetSelection.assets(catalogue_release.key),
    tags=INGEST_TAG,
    description="Everything, for a range of observations (the demo runs it over all of them).",
)


def partition_range_tags(start: str, end: str) -> dict[str, str]:
    return {RANGE_START_TAG: start, RANGE_END_TAG: end}


@dataclass
class ReleaseCursor:
    """What the release sensor remembers between ticks."""

    fingerprint: str = ""
    pending_fingerprint: str = ""
    pending_ranges: list[list[str]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str | None) -> "ReleaseCursor":
        return cls(**json.loads(text)) if text else cls()

    def dump(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def release_tag(fingerprint: str) -> str:
    return fingerprint[:63]


def plan_release(
    instance: DagsterInstance, storage: StorageResource, catalogue: pd.DataFrame
) -> tuple[list[str], list[tuple[str, str]]]:
    """New observations to register, and the partition ranges to ingest for a new release.

    An observation is ingested when it is new, when its selected catalogue rows changed since the
    last ingest (the manifest written by `selected_detections`), when it was never materialised, or
    when it lost all its selected detections (its spectra file is then removed).
    """
    from xmm_pipeline.spectra.preprocess import PreprocessConfig, select_detections

    selected, _ = select_detections(as_canonical(catalogue), PreprocessConfig())
    manifest = observation_manifest(selected)
    previous = pd.read_parquet(storage.observations_path) if storage.observations_path.exists() else None
    known = list(instance.get_dynamic_partitions(OBSERVATION_PARTITIONS_NAME))
    new = sorted(set(manifest["obs_id"]) - set(known))
    materialised = instance.get_materialized_partitions(pn_spectra.key)
    wanted = set(changed_observations(previous, manifest))
    wanted |= {o for o in manifest["obs_id"] if o not in materialised}
    if previous is not None:
        wanted |= set(previous["obs_id"]) - set(manifest["obs_id"])
    ranges = contiguous_ranges(known + new, sorted(wanted), MAX_OBSERVATIONS_PER_RUN)
    return new, ranges


def ingest_outcome(instance: DagsterInstance, fingerprint: str, ranges: list[list[str]]) -> str:
    """'succeeded' when every range has a successful ingest run, 'failed' if one failed, else 'running'."""
    runs = instance.get_runs(
        RunsFilter(job_name=ingest_job.name, tags={RELEASE_TAG: release_tag(fingerprint)})
    )
    by_range: dict[tuple[str, str], set[DagsterRunStatus]] = {}
    for run in runs:
        key = (run.tags.get(RANGE_START_TAG, ""), run.tags.get(RANGE_END_TAG, ""))
        by_range.setdefault(key, set()).add(run.status)
    statuses = [by_range.get((start, end), set()) for start, end in ranges]
    if all(DagsterRunStatus.SUCCESS in s for s in statuses):
        return "succeeded"
    if any(s and s <= {DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED} for s in statuses):
        return "failed"
    return "running"


def latest_materialization_id(instance: DagsterInstance, key: AssetKey) -> int | None:
    """Storage id of the asset's latest materialisation (any partition): a strictly increasing clock."""
    records = instance.fetch_materializations(key, limit=1, ascending=False).records
    return records[0].storage_id if records else None


def model_exists(instance: DagsterInstance) -> bool:
    return latest_materialization_id(instance, vae_model.key) is not None


@sensor(
    jobs=[ingest_job, reembed_job],
    minimum_interval_seconds=3600,
    default_status=DefaultSensorStatus.STOPPED,
    description="On a new catalogue release: ingest new and changed observations, then re-embed.",
)
def catalogue_release_sensor(
    context: SensorEvaluationContext, archive: ArchiveResource, storage: StorageResource
) -> SensorResult | SkipReason:
    cursor = ReleaseCursor.parse(context.cursor)
    if cursor.pending_fingerprint:
        outcome = ingest_outcome(context.instance, cursor.pending_fingerprint, cursor.pending_ranges)
        if outcome == "running":
            return SkipReason(f"waiting for {len(cursor.pending_ranges)} ingest run(s) of the new release")
        if outcome == "failed":
            return SkipReason("an ingest run of the new release failed: re-execute it; re-embedding waits")
        pending = cursor.pending_fingerprint
        cursor.pending_fingerprint, cursor.pending_ranges = "", []
        if not model_exists(context.instance):
            return SensorResult(
                skip_reason="release ingested; no trained model yet: launch `retrain` (never automatic)",
                cursor=cursor.dump(),
            )
        return SensorResult(
            run_requests=[
                RunRequest(
                    run_key=f"reembed:{pending}",
                    job_name=reembed_job.name,
                    tags={RELEASE_TAG: release_tag(pending)},
                )
            ],
            cursor=cursor.dump(),
        )

    source = archive.get_archive()
    fingerprint = source.release_fingerprint()
    if fingerprint == cursor.fingerprint:
        return SkipReason(f"catalogue release unchanged ({fingerprint[:24]})")
    new, ranges = plan_release(context.instance, storage, source.fetch_catalogue())
    requests = [
        RunRequest(
            run_key=f"ingest:{fingerprint}:{start}:{end}",
            job_name=ingest_job.name,
            tags={**partition_range_tags(start, end), RELEASE_TAG: release_tag(fingerprint), **INGEST_TAG},
        )
        for start, end in ranges
    ]
    observation = AssetObservation(
        asset_key=catalogue_release.key,
        metadata={"fingerprint": fingerprint, "new observations": len(new), "ingest runs": len(ranges)},
        tags={DATA_VERSION_TAG: fingerprint},
    )
    next_cursor = ReleaseCursor(fingerprint, fingerprint if ranges else "", [list(r) for r in ranges])
    return SensorResult(
        run_requests=requests,
        skip_reason=None if ranges else f"release {fingerprint[:24]}: no observation new or changed",
        dynamic_partitions_requests=[observation_partitions.build_add_request(new)] if new else [],
        asset_events=[observation],
        cursor=next_cursor.dump(),
    )


def spectra_changed_since_embedding(instance: DagsterInstance) -> str | None:
    """None when a re-embedding is due, else the reason to skip."""
    spectra = latest_materialization_id(instance, pn_spectra.key)
    if spectra is None:
        return "no spectra materialised yet"
    if not model_exists(instance):
        return "no trained model yet: launch `retrain`"
    embedded = latest_materialization_id(instance, latent_embeddings.key)
    if embedded is not None and embedded > spectra:
        return "spectra unchanged since the last embedding"
    return None


@schedule(
    cron_schedule="0 6 * * *",
    job=reembed_job,
    default_status=DefaultScheduleStatus.STOPPED,
    description="Daily: re-embed if spectra changed since the last embedding; else skip with the reason.",
)
def reembed_schedule(context: ScheduleEvaluationContext) -> RunRequest | SkipReason:
    reason = spectra_changed_since_embedding(context.instance)
    if reason is not None:
        return SkipReason(reason)
    return RunRequest(
        run_key=f"reembed:spectra@{latest_materialization_id(context.instance, pn_spectra.key)}"
    )


JOBS = [ingest_job, retrain_job, reembed_job, all_job]
SENSORS = [catalogue_release_sensor]
SCHEDULES = [reembed_schedule]
