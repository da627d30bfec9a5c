"""A new release re-materialises only what changed: DR14 fully materialised, then DR15 (same seed)
through the release sensor and the runs it requests, one stage per tick: the catalogue run, the
partition runs, the re-embedding."""

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from dagster import AssetKey, build_schedule_context, build_sensor_context
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from xmm_pipeline.orchestration.automation import (
    CATALOGUE_ASSETS,
    ReleaseCursor,
    catalogue_release_sensor,
    reembed_schedule,
    spectra_changed_since_embedding,
)
from xmm_pipeline.orchestration.inprocess import execute_run_request, tick_release_sensor
from xmm_pipeline.orchestration.partitions import changed_observations, observation_manifest
from xmm_pipeline.spectra.preprocess import PreprocessConfig, select_detections
from xmm_pipeline_tests.orchestration.conftest import clone_pipeline, open_instance, pipeline_definitions

pytestmark = pytest.mark.slow
CATALOGUE_NAMES = ("detections", "selected_detections")


def file_states(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(folder.glob("*.parquet"))}


def materialised_partitions(instance, run_ids: list[str]) -> set[str]:
    records = instance.fetch_materializations(AssetKey("pn_spectra"), limit=10_000).records
    return {r.partition_key for r in records if r.run_id in run_ids}


def materialisation_count(instance, name: str) -> int:
    return len(instance.fetch_materializations(AssetKey(name), limit=10_000).records)


def evaluate_release_sensor(defs, instance, cursor: str | None):
    """One tick of the release sensor, evaluated only: nothing it requests is launched."""
    context = build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs, resources=defs.resources,
        sensor_name=catalogue_release_sensor.name,
    )
    return catalogue_release_sensor.evaluate_tick(context)


@dataclass
class Update:
    root: Path
    expected: set[str]
    dr14_observations: set[str]
    ingested: set[str]
    spectra_before: dict[str, tuple[int, int]]
    spectra_after: dict[str, tuple[int, int]]
    model_count: tuple[int, int]
    model_file_mtime: tuple[int, int]
    skip_messages: dict[str, str | None]
    schedule_reasons: dict[str, str | None]
    catalogue_fetched: list[bool]
    catalogue_materialisations: dict[str, int]
    ingest_selections: list[set[str]]
    reembed_succeeded: bool
    check_passed: bool | None
    stale: dict[str, StaleStatus]


@pytest.fixture(scope="module")
def dr15_update(dr14_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Update:
    root = clone_pipeline(dr14_pipeline, tmp_path_factory.mktemp("incremental"))
    spectra = root / "data" / "spectra" / "spectra"
    model_file = root / "data" / "model" / "model.pt"
    before = file_states(spectra)
    model_mtime = model_file.stat().st_mtime_ns
    catalogue14 = pd.read_parquet(root / "data" / "catalogue" / "detections.parquet")
    skips, reasons = {}, {}
    with open_instance(root) as instance:
        dr14, dr15 = pipeline_definitions(root, "DR14"), pipeline_definitions(root, "DR15")
        models_before = materialisation_count(instance, "vae_model")
        same = tick_release_sensor(dr14, instance, None)
        assert [request.asset_selection for request, _ in same.runs] == [CATALOGUE_ASSETS]
        first = tick_release_sensor(dr14, instance, same.cursor)
        skips["same release"] = first.skip_message
        reasons["before"] = spectra_changed_since_embedding(instance)
        counts_before = {name: materialisation_count(instance, name) for name in CATALOGUE_NAMES}
        catalogue = tick_release_sensor(dr15, instance, first.cursor)
        assert [request.asset_selection for request, _ in catalogue.runs] == [CATALOGUE_ASSETS]
        ingest = tick_release_sensor(dr15, instance, catalogue.cursor)
        assert ingest.runs and all(result.success for _, result in ingest.runs)
        reasons["after ingest"] = spectra_changed_since_embedding(instance)
        reembed = tick_release_sensor(dr15, instance, ingest.cursor)
        assert [request.job_name for request, _ in reembed.runs] == ["reembed"]
        reasons["after reembed"] = spectra_changed_since_embedding(instance)
        skips["after reembed"] = tick_release_sensor(dr15, instance, reembed.cursor).skip_message
        run_ids = [result.run_id for _, result in ingest.runs]
        check = [
            evaluation
            for evaluation in reembed.runs[0][1].get_asset_check_evaluations()
            if evaluation.check_name == "model_trained_on_current_data"
        ]
        resolver = CachingStaleStatusResolver(
            instance, dr15.resolve_asset_graph(), LoadingContextForTest(instance)
        )
        stale = {"training_set": resolver.get_status(AssetKey("training_set"))}
        update = Update(
            root=root,
            expected=set(),
            dr14_observations=set(catalogue14["obs_id"]),
            ingested=materialised_partitions(instance, run_ids),
            spectra_before=before,
            spectra_after=file_states(spectra),
            model_count=(models_before, materialisation_count(instance, "vae_model")),
            model_file_mtime=(model_mtime, model_file.stat().st_mtime_ns),
            skip_messages=skips,
            schedule_reasons=reasons,
            catalogue_fetched=[
                result.asset_materializations_for_node("detections")[0].metadata["fetched"].value
                for _, result in same.runs + catalogue.runs
            ],
            catalogue_materialisations={
                name: materialisation_count(instance, name) - counts_before[name] for name in CATALOGUE_NAMES
            },
            ingest_selections=[
                {event.asset_key.to_user_string() for event in result.get_asset_materialization_events()}
                for _, result in ingest.runs
            ],
            reembed_succeeded=reembed.runs[0][1].success,
            check_passed=check[0].passed if check else None,
            stale=stale,
        )
    catalogue15 = pd.read_parquet(root / "data" / "catalogue" / "detections.parquet")
    config = PreprocessConfig()
    update.expected = set(
        changed_observations(
            observation_manifest(select_detections(catalogue14, config)[0]),
            observation_manifest(select_detections(catalogue15, config)[0]),
        )
    )
    return update


def test_only_new_and_reprocessed_observations_ran(dr15_update: Update):
    assert dr15_update.ingested == dr15_update.expected
    assert dr15_update.ingested & dr15_update.dr14_observations, "a re-processed DR14 observation ran"
    assert dr15_update.ingested - dr15_update.dr14_observations, "new DR15 observations ran"
    assert len(dr15_update.ingested) < len(dr15_update.spectra_before) / 2


def test_each_release_catalogue_is_fetched_once(dr15_update: Update):
    assert dr15_update.catalogue_fetched == [False, True], "DR14 again: reused; DR15: fetched"


def test_catalogue_assets_materialise_once_per_release_not_per_partition_run(dr15_update: Update):
    assert len(dr15_update.ingest_selections) >= 2, "the update should take several partition runs"
    assert all(selection == {"pn_spectra"} for selection in dr15_update.ingest_selections)
    assert dr15_update.catalogue_materialisations == {"detections": 1, "selected_detections": 1}


def test_the_sensor_tick_only_fingerprints_the_release(dr15_update: Update, monkeypatch):
    """A tick on a new release asks the archive for its fingerprint, never for its catalogue."""
    from xmm_pipeline.archive.simulated import SimulatedArchive

    def refuse(self):
        raise AssertionError("the sensor tick fetched the catalogue")

    monkeypatch.setattr(SimulatedArchive, "fetch_catalogue", refuse)
    dr15 = pipeline_definitions(dr15_update.root, "DR15")
    with open_instance(dr15_update.root) as instance:
        stale = ReleaseCursor(fingerprint="an older release").dump()
        result = evaluate_release_sensor(dr15, instance, stale)
    (request,) = result.run_requests
    assert request.job_name == "ingest" and request.asset_selection == CATALOGUE_ASSETS
    assert ReleaseCursor.parse(result.cursor).stage == "catalogue"
    assert not result.dynamic_partitions_requests, "partitions are registered by the catalogue run"


def test_unchanged_partition_files_are_untouched(dr15_update: Update):
    unchanged = {f"{obs}.parquet" for obs in dr15_update.dr14_observations - dr15_update.ingested}
    kept = {name for name in dr15_update.spectra_before if name in unchanged}
    assert kept
    for name in kept:
        assert dr15_update.spectra_after[name] == dr15_update.spectra_before[name], name
    rewritten = {f"{obs}.parquet" for obs in dr15_update.ingested & dr15_update.dr14_observations}
    for name in rewritten & set(dr15_update.spectra_before):
        assert dr15_update.spectra_after[name] != dr15_update.spectra_before[name], name
    new = {f"{obs}.parquet" for obs in dr15_update.ingested - dr15_update.dr14_observations}
    assert new <= set(dr15_update.spectra_after)


def test_model_is_not_retrained_but_shown_stale(dr15_update: Update):
    assert dr15_update.model_count[0] == dr15_update.model_count[1] == 1
    assert dr15_update.model_file_mtime[0] == dr15_update.model_file_mtime[1]
    assert dr15_update.check_passed is False, "the model-vs-data check warns after new spectra"
    assert dr15_update.stale["training_set"] == StaleStatus.STALE


def test_embeddings_and_index_include_the_new_detections(dr15_update: Update):
    from xmm_pipeline.latent.search import load_index
    from xmm_pipeline.spectra.dataset import load_dataset

    assert dr15_update.reembed_succeeded
    data = dr15_update.root / "data"
    embeddings = pd.read_parquet(data / "latent" / "embeddings.parquet")
    spectra = load_dataset(data / "spectra").meta
    assert set(embeddings["detid"]) == set(spectra["detid"])
    new_obs = dr15_update.ingested - dr15_update.dr14_observations
    assert embeddings["obs_id"].isin(new_obs).sum() > 0
    assert embeddings["model_version"].nunique() == 1
    index = load_index(data / "latent" / "index")
    assert index.info.n_vectors == len(embeddings)


def test_sensor_and_schedule_skip_with_a_reason_when_nothing_changed(dr15_update: Update):
    assert "no observation new or changed" in dr15_update.skip_messages["same release"]
    assert "unchanged" in dr15_update.skip_messages["after reembed"]
    assert "unchanged" in dr15_update.schedule_reasons["before"]
    assert dr15_update.schedule_reasons["after ingest"] is None
    assert "unchanged" in dr15_update.schedule_reasons["after reembed"]


def test_schedule_returns_a_skip_reason(dr15_update: Update):
    with open_instance(dr15_update.root) as instance:
        result = reembed_schedule(build_schedule_context(instance=instance))
    assert "unchanged" in result.skip_message


def test_rerunning_unchanged_partitions_does_no_work(dr15_update: Update):
    from dagster import RunRequest

    from xmm_pipeline.orchestration.automation import partition_range_tags

    spectra = dr15_update.root / "data" / "spectra" / "spectra"
    with open_instance(dr15_update.root) as instance:
        keys = [k for k in instance.get_dynamic_partitions("observations") if k not in dr15_update.ingested][
            :2
        ]
        request = RunRequest(job_name="ingest", tags=partition_range_tags(keys[0], keys[1]))
        result = execute_run_request(pipeline_definitions(dr15_update.root, "DR15"), instance, request)
        metadata = result.asset_materializations_for_node("pn_spectra")[0].metadata
    assert metadata["observations unchanged (skipped)"].value == 2
    assert metadata["observations written"].value == 0
    after = file_states(spectra)
    for key in keys:
        assert after[f"{key}.parquet"] == dr15_update.spectra_after[f"{key}.parquet"]
