"""Drive the pipeline inside one Python process: what the demo, the tests and the benchmark use.

The daemon does the same in production (`dagster dev` with the sensor switched on); here a sensor
tick is evaluated directly, its partition requests and observations are applied to the instance, and
the runs it requests execute in process, one after another, in the order requested. A new release
takes two ticks to reach its spectra (the catalogue run, then the partition runs): `ingest_release`.

Every run started here carries the tag `xmm/process` (host, pid, process start time), so that a run
whose process was killed (SIGKILL, power loss) can be told from one still running: `clear_dead_runs`
marks such runs failed and frees the pool slots they held, which would otherwise block every later
run at "blocked by limit for pool gpu".
"""

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dagster import (
    AddDynamicPartitionsRequest,
    AssetObservation,
    DagsterInstance,
    DagsterRunStatus,
    Definitions,
    ExecuteInProcessResult,
    LoggerDefinition,
    RunRequest,
    RunsFilter,
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

PROCESS_TAG = "xmm/process"
UNFINISHED = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux /proc), '' where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_tags() -> dict[str, str]:
    """The tag that names this process: host, pid and start time (so a reused pid is not mistaken)."""
    pid = os.getpid()
    return {PROCESS_TAG: f"{socket.gethostname()}:{pid}:{_process_start(pid)}"}


def process_gone(tag: str) -> bool:
    """True when the process a PROCESS_TAG names is known to have ended (on this host only)."""
    parts = tag.split(":")
    if len(parts) < 3:
        return False
    host, pid_text, started = ":".join(parts[:-2]), parts[-2], parts[-1]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    now = _process_start(pid)
    if started and now and now != started:
        return True  # the pid now belongs to another process
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def clear_dead_runs(instance: DagsterInstance) -> list[str]:
    """Fail the unfinished runs whose process no longer exists and free every pool slot held by a
    finished run; returns the ids of the runs it failed."""
    failed = []
    for run in instance.get_runs(RunsFilter(statuses=UNFINISHED)):
        tag = run.tags.get(PROCESS_TAG)
        if tag and process_gone(tag):
            instance.report_run_failed(
                run, f"the process that ran it ({tag}) no longer exists; marked failed by xmm-pipeline"
            )
            failed.append(run.run_id)
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        for run_id in storage.get_concurrency_run_ids():
            run = instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                storage.free_concurrency_slots_for_run(run_id)
    return failed


@dataclass
class TickOutcome:
    cursor: str | None
    skip_message: str | None
    runs: list[tuple[RunRequest, ExecuteInProcessResult]] = field(default_factory=list)


def execute_run_request(
    defs: Definitions, instance: DagsterInstance, request: RunRequest
) -> ExecuteInProcessResult:
    job = defs.resolve_job_def(request.job_name)
    tags = {**request.tags, **process_tags()}
    return job.execute_in_process(
        instance=instance, tags=tags, asset_selection=request.asset_selection, raise_on_error=True
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


def materialise_everything(
    defs: Definitions, instance: DagsterInstance, logger_defs: Mapping[str, LoggerDefinition] | None = None
) -> ExecuteInProcessResult:
    """Observe the release, register its observations, and run the `all` job over all of them
    (with `logger_defs` instead of Dagster's console logger when given)."""
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
    run_config = {}
    if logger_defs is not None:
        job = job.with_logger_defs(logger_defs)
        run_config = {"loggers": {name: {} for name in logger_defs}}
    tags = {**partition_range_tags(keys[0], keys[-1]), **process_tags()}
    return job.execute_in_process(run_config=run_config, instance=instance, tags=tags)
