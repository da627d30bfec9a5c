"""Drive the pipeline inside one Python process: what the demo, the tests and the benchmark use.

The daemon does the same in production (`dagster dev` with the sensor switched on); here a sensor
tick is evaluated directly, its partition requests and observations are applied to the instance, and
the runs it requests execute in process, one after another, in the order requested. A new release
takes two ticks to reach its spectra (the catalogue run, then the partition runs): `ingest_release`.
"""

from dataclasses import dataclass, field

from dagster import (
    AddDynamicPartitionsRequest,
    AssetObservation,
    DagsterInstance,
    Definitions,
    ExecuteInProcessResult,
    RunRequest,
    build_sensor_context,
)

from xmm_pipeline.orchestration.assets_archive import catalogue_release
from xmm_pipeline.orchestration.automation import (
    CATALOGUE_STEP,
    DATA_VERSION_TAG,
    ReleaseCursor,
    all_job,
    catalogue_release_sensor,
    partition_range_tags,
    release_observations,
)
from xmm_pipeline.orchestration.partitions import OBSERVATION_PARTITIONS_NAME, add_observation_partitions
from xmm_pipeline.orchestration.resources import ArchiveResource


@dataclass
class TickOutcome:
    cursor: str | None
    skip_message: str | None
    runs: list[tuple[RunRequest, ExecuteInProcessResult]] = field(default_factory=list)


def execute_run_request(
    defs: Definitions, instance: DagsterInstance, request: RunRequest
) -> ExecuteInProcessResult:
    job = defs.resolve_job_def(request.job_name)
    return job.execute_in_process(
        instance=instance,
        tags=dict(request.tags),
        asset_selection=request.asset_selection,
        raise_on_error=True,
    )


def tick_release_sensor(defs: Definitions, instance: DagsterInstance, cursor: str | None) -> TickOutcome:
    """One tick of the release sensor, with everything it asks for carried out."""
    context = build_sensor_context(
        instance=instance,
        cursor=cursor,
        definitions=defs,
        resources=defs.resources,
        sensor_name=catalogue_release_sensor.name,
    )
    data = catalogue_release_sensor.evaluate_tick(context)
    for request in data.dynamic_partitions_requests or []:
        if isinstance(request, AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    for event in data.asset_events:
        instance.report_runless_asset_event(event)
    outcome = TickOutcome(cursor=data.cursor or cursor, skip_message=data.skip_message)
    for request in data.run_requests or []:
        outcome.runs.append((request, execute_run_request(defs, instance, request)))
    return outcome


def ingest_release(defs: Definitions, instance: DagsterInstance, cursor: str | None) -> TickOutcome:
    """The ticks that take a new release to its spectra: the one that requests the catalogue run, then
    the one that plans and requests the partition runs; the runs of both, in order, in one outcome."""
    first = tick_release_sensor(defs, instance, cursor)
    if not first.runs or ReleaseCursor.parse(first.cursor).stage != CATALOGUE_STEP:
        return first
    second = tick_release_sensor(defs, instance, first.cursor)
    return TickOutcome(cursor=second.cursor, skip_message=second.skip_message, runs=first.runs + second.runs)


def materialise_everything(defs: Definitions, instance: DagsterInstance) -> ExecuteInProcessResult:
    """Observe the release, register its observations, and run the `all` job over all of them."""
    archive: ArchiveResource = defs.resources["archive"]
    source = archive.get_archive()
    fingerprint = source.release_fingerprint()
    instance.report_runless_asset_event(
        AssetObservation(
            catalogue_release.key, metadata={"fingerprint": fingerprint}, tags={DATA_VERSION_TAG: fingerprint}
        )
    )
    add_observation_partitions(instance, release_observations(source.fetch_catalogue()))
    keys = instance.get_dynamic_partitions(OBSERVATION_PARTITIONS_NAME)
    job = defs.resolve_job_def(all_job.name)
    return job.execute_in_process(instance=instance, tags=partition_range_tags(keys[0], keys[-1]))
