"""Jobs, the release sensor and the re-embedding schedule: small and declarative, logic in functions.

- `ingest`: catalogue to spectra, over a range of observation partitions per run.
- `retrain`: training set, model and everything downstream. Only ever launched by a person.
- `reembed`: embeddings, index and latent products with the current model; it also runs the check
  that shows the model stale relative to the data.
- `all`: everything.
The sensor turns a new catalogue release into one `ingest` run of its catalogue (the tick itself
only fingerprints the release), then `ingest` runs of `pn_spectra` for the new and changed
observations, then one `reembed` run once those have succeeded. The schedule re-embeds when spectra
changed since the last embedding and skips with a reason otherwise.
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
    DagsterEventType,
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
    contiguous_ranges,
    observation_manifest,
    observations_to_ingest,
)
from xmm_pipeline.orchestration.resources import ArchiveResource, StorageResource

RANGE_START_TAG = "dagster/asset_partition_range_start"
STEP_TAG = "xmm/ingest-step"
CATALOGUE_STEP, SPECTRA_STEP = "catalogue", "spectra"
CATALOGUE_ASSETS = [detections.key, selected_detections.key]
# The sensor advances a release one stage per tick; idle ticks only fingerprint the release.
SENSOR_INTERVAL_S = 600
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
        partitioned = pn_spectra.key.to_python_identifier() in execution_plan.step_keys_to_execute
        known = list(plan_context.instance.get_dynamic_partitions(OBSERVATION_PARTITIONS_NAME))
        reason = range_refusal(run.job_name, run.tags, known) if partitioned else None
        if reason is not None:  # the catalogue-only run the release sensor requests names no range
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
    """What the release sensor remembers between ticks.

    `stage` says what the pending release waits for: its catalogue run (`catalogue`), then its
    partition runs (`spectra`, the ranges in `pending_ranges`).
    """

    fingerprint: str = ""
    pending_fingerprint: str = ""
    pending_ranges: list[list[str]] = field(default_factory=list)
    stage: str = ""

    @classmethod
    def parse(cls, text: str | None) -> "ReleaseCursor":
        return cls(**json.loads(text)) if text else cls()

    def dump(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def release_tag(fingerprint: str) -> str:
    return fingerprint[:63]


def release_observations(catalogue: pd.DataFrame) -> list[str]:
    """The observations with at least one selected detection in a catalogue (sorted)."""
    from xmm_pipeline.spectra.preprocess import PreprocessConfig, select_detections

    selected, _ = select_detections(as_canonical(catalogue), PreprocessConfig())
    return sorted(set(observation_manifest(selected)["obs_id"]))


def catalogue_clock(instance: DagsterInstance, run_ids: set[str]) -> dict[str, int]:
    """Storage id of the `selected_detections` materialisation of each of these runs."""
    clock: dict[str, int] = {}
    cursor = None
    while run_ids - set(clock):
        result = instance.fetch_materializations(
            selected_detections.key, limit=1000, cursor=cursor, ascending=False
        )
        clock.update({r.run_id: r.storage_id for r in result.records if r.run_id in run_ids})
        if not result.has_more:
            break
        cursor = result.cursor
    return clock


def plan_ingest(instance: DagsterInstance, storage: StorageResource) -> list[tuple[str, str]]:
    """Partition ranges to ingest after a catalogue run: from the manifest it wrote and the event log.

    An observation is ingested when it is new or was never materialised, when its selected rows
    changed after its partition was last materialised, or when it lost all its selected detections
    since (its spectra file is then removed). Reads one small table and asks the instance two
    questions: cheap enough for a sensor tick at 10^4 observations.
    """
    manifest = pd.read_parquet(storage.observations_path)
    runs = set(manifest["changed_in"]) - {""} if "changed_in" in manifest else set()
    ingested = instance.event_log_storage.get_latest_storage_id_by_partition(
        pn_spectra.key, DagsterEventType.ASSET_MATERIALIZATION
    )
    wanted = observations_to_ingest(manifest, catalogue_clock(instance, runs), dict(ingested))
    known = list(instance.get_dynamic_partitions(OBSERVATION_PARTITIONS_NAME))
    return contiguous_ranges(known, wanted, MAX_OBSERVATIONS_PER_RUN)


def ingest_outcome(instance: DagsterInstance, fingerprint: str, ranges: list[list[str]]) -> str:
    """'succeeded' when every range has a successful ingest run, 'failed' if one failed, else 'running'.

    The catalogue run of a release is the range ("", ""): it carries no partition tags.
    """
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


def catalogue_run_request(fingerprint: str) -> RunRequest:
    """The `ingest` run of a release's catalogue only: `detections` and `selected_detections`."""
    return RunRequest(
        run_key=f"catalogue:{fingerprint}",
        job_name=ingest_job.name,
        asset_selection=CATALOGUE_ASSETS,
        tags={RELEASE_TAG: release_tag(fingerprint), STEP_TAG: CATALOGUE_STEP, **INGEST_TAG},
    )


def spectra_run_requests(fingerprint: str, ranges: list[tuple[str, str]]) -> list[RunRequest]:
    """One `ingest` run of `pn_spectra` only per partition range (the catalogue is already there)."""
    return [
        RunRequest(
            run_key=f"ingest:{fingerprint}:{start}:{end}",
            job_name=ingest_job.name,
            asset_selection=[pn_spectra.key],
            tags={
                **partition_range_tags(start, end),
                RELEASE_TAG: release_tag(fingerprint),
                STEP_TAG: SPECTRA_STEP,
                **INGEST_TAG,
            },
        )
        for start, end in ranges
    ]


def _after_catalogue(context: SensorEvaluationContext, storage: StorageResource, cursor: ReleaseCursor):
    pending = cursor.pending_fingerprint
    outcome = ingest_outcome(context.instance, pending, [["", ""]])
    if outcome == "running":
        return SkipReason(f"waiting for the catalogue run of release {pending[:24]}")
    if outcome == "failed":
        return SkipReason(f"the catalogue run of release {pending[:24]} failed: re-execute it")
    ranges = plan_ingest(context.instance, storage)
    if not ranges:
        cursor.pending_fingerprint, cursor.pending_ranges, cursor.stage = "", [], ""
        return SensorResult(
            skip_reason=f"release {pending[:24]}: no observation new or changed", cursor=cursor.dump()
        )
    cursor.pending_ranges, cursor.stage = [list(r) for r in ranges], SPECTRA_STEP
    return SensorResult(run_requests=spectra_run_requests(pending, ranges), cursor=cursor.dump())


def _after_spectra(context: SensorEvaluationContext, cursor: ReleaseCursor):
    outcome = ingest_outcome(context.instance, cursor.pending_fingerprint, cursor.pending_ranges)
    if outcome == "running":
        return SkipReason(f"waiting for {len(cursor.pending_ranges)} ingest run(s) of the new release")
    if outcome == "failed":
        return SkipReason("an ingest run of the new release failed: re-execute it; re-embedding waits")
    pending = cursor.pending_fingerprint
    cursor.pending_fingerprint, cursor.pending_ranges, cursor.stage = "", [], ""
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


@sensor(
    jobs=[ingest_job, reembed_job],
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=DefaultSensorStatus.STOPPED,
    description="On a new catalogue release: fetch its catalogue, ingest new and changed observations, "
    "then re-embed (one run stage per tick).",
)
def catalogue_release_sensor(
    context: SensorEvaluationContext, archive: ArchiveResource, storage: StorageResource
) -> SensorResult | SkipReason:
    """Fingerprints the release, and only that: the catalogue is fetched by the run it requests.

    A new release goes through three stages, one per tick: the catalogue run (`detections`,
    `selected_detections`, which also registers the new observation partitions), then one `pn_spectra`
    run per range of observations to ingest (planned from the manifest that run wrote), then `reembed`.
    """
    cursor = ReleaseCursor.parse(context.cursor)
    if cursor.pending_fingerprint and cursor.stage == CATALOGUE_STEP:
        return _after_catalogue(context, storage, cursor)
    if cursor.pending_fingerprint:
        return _after_spectra(context, cursor)

    fingerprint = archive.get_archive().release_fingerprint()
    if fingerprint == cursor.fingerprint:
        return SkipReason(f"catalogue release unchanged ({fingerprint[:24]})")
    observation = AssetObservation(
        asset_key=catalogue_release.key,
        metadata={"fingerprint": fingerprint},
        tags={DATA_VERSION_TAG: fingerprint},
    )
    return SensorResult(
        run_requests=[catalogue_run_request(fingerprint)],
        asset_events=[observation],
        cursor=ReleaseCursor(fingerprint, fingerprint, [], CATALOGUE_STEP).dump(),
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
