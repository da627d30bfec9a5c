"""The team deployment: the Dagster instance on a real PostgreSQL server, DR14 then DR15 through it.

The test starts its own server (`postgres_server.running_server`: initdb, pg_ctl, scram password on
127.0.0.1, as the `postgres` system user when run as root), writes the documented `storage:
postgres:` block into its own DAGSTER_HOME (with the project's run queue and pool settings, password
from the environment), materialises simulated DR14 there, then drives the release sensor through
DR15 with its cursor kept where the daemon keeps it (the instigator state in schedule storage).
Runs, event log, dynamic partitions, the sensor cursor and the `gpu` pool's slots all live in
PostgreSQL; the incremental outcome is the one of test_incremental.py on SQLite.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pandas as pd
import pytest
import yaml
from dagster import AssetKey, DagsterInstance
from dagster._core.definitions.run_request import InstigatorType
from dagster._core.remote_origin import (
    InProcessCodeLocationOrigin,
    RemoteInstigatorOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.scheduler.instigation import InstigatorState, InstigatorStatus, SensorInstigatorData
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

from xmm_pipeline.orchestration.automation import ReleaseCursor, catalogue_release_sensor
from xmm_pipeline.orchestration.inprocess import ingest_release, materialise_everything, tick_release_sensor
from xmm_pipeline.orchestration.partitions import changed_observations, observation_manifest
from xmm_pipeline_tests.conftest import skip_unless_ci
from xmm_pipeline_tests.orchestration.conftest import REPO_ROOT, pipeline_definitions
from xmm_pipeline_tests.orchestration.postgres_server import (
    PostgresServer,
    running_server,
    unavailable_reason,
)

pytestmark = pytest.mark.slow
PASSWORD_VARIABLE = "DAGSTER_PG_PASSWORD"
SPECTRA, MODEL = AssetKey("pn_spectra"), AssetKey("vae_model")


def selected_manifest(root: Path) -> pd.DataFrame:
    return observation_manifest(pd.read_parquet(root / "data" / "catalogue" / "selected.parquet"))


def team_instance_config(server: PostgresServer) -> dict:
    """The project's dagster.yaml with the PostgreSQL storage block of docs/ORCHESTRATION.md."""
    config = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    config["storage"] = {
        "postgres": {
            "postgres_db": {
                "hostname": server.host,
                "port": server.port,
                "username": server.username,
                "password": {"env": PASSWORD_VARIABLE},
                "db_name": server.db_name,
                # SQLAlchemy >= 2.1 maps a bare postgresql:// to psycopg 3; dagster-postgres ships psycopg2
                "scheme": "postgresql+psycopg2",
            }
        }
    }
    return config


def sensor_state(cursor: str | None) -> InstigatorState:
    origin = RemoteInstigatorOrigin(
        RemoteRepositoryOrigin(
            InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name="xmm_pipeline.definitions")),
            "__repository__",
        ),
        catalogue_release_sensor.name,
    )
    return InstigatorState(
        origin, InstigatorType.SENSOR, InstigatorStatus.RUNNING, SensorInstigatorData(cursor=cursor)
    )


@dataclass
class TeamRelease:
    storage_classes: set[str]
    full_success: bool
    gpu_slots: tuple[int, int]
    skip_messages: list[str | None]
    ingested: set[str]
    expected: set[str]
    dr15_fingerprint: str
    reembed_jobs: list[str]
    reembed_success: bool
    stored_cursor: str | None
    last_cursor: str | None
    model_materialisations: int
    partitions: int


@pytest.fixture(scope="module")
def team_release(tmp_path_factory: pytest.TempPathFactory) -> TeamRelease:
    reason = unavailable_reason()
    if reason:
        skip_unless_ci(reason)
    root = tmp_path_factory.mktemp("postgres_team")
    home = root / "dagster_home"
    home.mkdir()
    with running_server() as server, mock.patch.dict(os.environ, {PASSWORD_VARIABLE: server.password}):
        (home / "dagster.yaml").write_text(yaml.safe_dump(team_instance_config(server)))
        with DagsterInstance.from_config(str(home)) as instance:
            storages = {
                type(storage).__name__
                for storage in (instance.run_storage, instance.event_log_storage, instance.schedule_storage)
            }
            instance.event_log_storage.set_concurrency_slots("gpu", 1)
            dr14, dr15 = pipeline_definitions(root, "DR14"), pipeline_definitions(root, "DR15")
            full = materialise_everything(dr14, instance)
            gpu = instance.event_log_storage.get_concurrency_info("gpu")
            manifest14 = selected_manifest(root)

            state = instance.add_instigator_state(sensor_state(None))
            skips, outcomes = [], []
            ticks = [(dr14, ingest_release), (dr15, ingest_release)] + [(dr15, tick_release_sensor)] * 2
            for defs, drive in ticks:
                stored = instance.get_instigator_state(state.instigator_origin_id, state.selector_id)
                outcome = drive(defs, instance, stored.instigator_data.cursor)
                instance.update_instigator_state(stored.with_data(SensorInstigatorData(cursor=outcome.cursor)))
                skips.append(outcome.skip_message)
                outcomes.append(outcome)
            _, ingest, reembed, _ = outcomes
            spectra_runs = {
                result.run_id for request, result in ingest.runs if request.asset_selection == [SPECTRA]
            }
            records = instance.fetch_materializations(SPECTRA, limit=10_000).records
            stored = instance.get_instigator_state(state.instigator_origin_id, state.selector_id)
            release = TeamRelease(
                storage_classes=storages,
                full_success=full.success,
                gpu_slots=(gpu.slot_count, gpu.active_slot_count),
                skip_messages=skips,
                ingested={r.partition_key for r in records if r.run_id in spectra_runs},
                expected=set(changed_observations(manifest14, selected_manifest(root))),
                dr15_fingerprint=dr15.resources["archive"].get_archive().release_fingerprint(),
                reembed_jobs=[request.job_name for request, _ in reembed.runs],
                reembed_success=all(result.success for _, result in reembed.runs),
                stored_cursor=stored.instigator_data.cursor,
                last_cursor=outcomes[-1].cursor,
                model_materialisations=len(instance.fetch_materializations(MODEL, limit=10).records),
                partitions=len(instance.get_dynamic_partitions("observations")),
            )
    return release


def test_every_instance_storage_is_postgres(team_release: TeamRelease):
    assert team_release.storage_classes == {
        "PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"
    }


def test_dr14_trains_through_the_gpu_pool_kept_in_postgres(team_release: TeamRelease):
    assert team_release.full_success
    assert team_release.gpu_slots == (1, 0), "one slot, taken by the training and freed after it"
    assert team_release.model_materialisations == 1


def test_dr15_ingests_only_new_and_changed_observations_then_reembeds(team_release: TeamRelease):
    assert "no observation new or changed" in team_release.skip_messages[0]
    assert team_release.expected and team_release.ingested == team_release.expected
    assert team_release.reembed_jobs == ["reembed"] and team_release.reembed_success
    assert "unchanged" in team_release.skip_messages[3]
    assert team_release.partitions > len(team_release.ingested)


def test_the_sensor_cursor_is_kept_in_postgres(team_release: TeamRelease):
    assert team_release.stored_cursor == team_release.last_cursor
    stored = ReleaseCursor.parse(team_release.stored_cursor)
    assert stored.fingerprint == team_release.dr15_fingerprint and not stored.pending_fingerprint
