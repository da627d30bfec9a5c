"""The Definitions object: every asset, job, check, the sensor, the schedule, and dagster.yaml."""

import json
from pathlib import Path

import yaml
from dagster import AssetKey, DagsterInstance
from dagster._core.definitions.backfill_policy import BackfillPolicyType

from xmm_pipeline.definitions import build_definitions, defs
from xmm_pipeline.orchestration.automation import ReleaseCursor
from xmm_pipeline.orchestration.resources import ComputeResource, ModelSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
ASSETS = [
    "detections",
    "selected_detections",
    "pn_spectra",
    "training_set",
    "vae_model",
    "latent_embeddings",
    "faiss_index",
    "outlier_scores",
    "latent_trajectories",
    "latent_clusters",
    "latent_map",
    "source_classes",
    "evaluation",
]


def test_every_asset_is_defined_with_a_code_version():
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert set(ASSETS) | {"catalogue_release"} <= keys
    for name in ASSETS:
        node = graph.get(AssetKey(name))
        assert node.code_version, name
        assert node.group_name in {"archive", "spectra", "model", "latent"}
    assert graph.get(AssetKey("catalogue_release")).is_observable


def test_model_trains_in_the_gpu_pool_and_spectra_run_many_observations_per_run():
    graph = defs.resolve_asset_graph()
    assets_def = graph.assets_def_for_key(AssetKey("vae_model"))
    assert assets_def.node_def.pools == {"gpu"}
    spectra = graph.assets_def_for_key(AssetKey("pn_spectra"))
    assert spectra.backfill_policy.policy_type == BackfillPolicyType.MULTI_RUN
    assert spectra.backfill_policy.max_partitions_per_run >= 100
    assert spectra.partitions_def.name == "observations"


def test_jobs_select_the_documented_assets():
    def selected(job_name: str) -> set[str]:
        job = defs.resolve_job_def(job_name)
        return {key.to_user_string() for key in job.asset_layer.selected_asset_keys}

    assert selected("ingest") == {"detections", "selected_detections", "pn_spectra"}
    retrain = selected("retrain")
    assert {"training_set", "vae_model", "latent_embeddings", "evaluation"} <= retrain
    assert "pn_spectra" not in retrain
    reembed = selected("reembed")
    assert "vae_model" not in reembed and "training_set" not in reembed
    assert {"latent_embeddings", "faiss_index", "latent_map", "source_classes"} <= reembed
    assert set(ASSETS) <= selected("all")


def test_blocking_checks_guard_the_stages():
    graph = defs.resolve_asset_graph()
    checks = {key.name: graph.get_check_spec(key) for key in graph.asset_check_keys}
    for name in (
        "detections_schema",
        "selection_rule_holds",
        "spectra_have_no_nan",
        "quarantine_share_below_threshold",
        "vae_model_beats_pca",
    ):
        assert checks[name].blocking, name
    assert not checks["model_trained_on_current_data"].blocking


def test_sensor_and_schedule_are_registered_and_off_by_default():
    assert defs.resolve_sensor_def("catalogue_release_sensor").default_status.value == "STOPPED"
    schedule = defs.resolve_schedule_def("reembed_schedule")
    assert schedule.cron_schedule == "0 6 * * *"
    assert schedule.job_name == "reembed"


def test_cursor_round_trips():
    cursor = ReleaseCursor("fp1", "fp1", [["a", "b"]])
    assert ReleaseCursor.parse(cursor.dump()) == cursor
    assert ReleaseCursor.parse(None) == ReleaseCursor()


def test_resources_point_below_the_storage_root(tmp_path):
    built = build_definitions(tmp_path)
    assert Path(built.resources["storage"].root) == tmp_path
    assert Path(built.resources["archive"].root) == tmp_path / "archive"
    assert built.resources["archive"].kind == "simulated"


def test_model_settings_default_to_the_model_package_defaults():
    from xmm_pipeline.model.train import TrainConfig
    from xmm_pipeline.model.vae import VAEConfig

    settings = ModelSettings()
    assert settings.vae_config() == VAEConfig()
    trained, defaults = settings.train_config(ComputeResource()).to_dict(), TrainConfig().to_dict()
    for key in ("max_epochs", "patience", "batch_size", "lr", "val_fraction", "seed"):
        assert trained[key] == defaults[key], key


def test_project_dagster_yaml_configures_sqlite_queue_limits_and_pools(tmp_path):
    text = (REPO_ROOT / "dagster.yaml").read_text()
    assert "postgres:" in text and "# storage:" in text  # the documented, commented team set-up
    (tmp_path / "dagster.yaml").write_text(text)
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        settings = instance.get_concurrency_config()
        assert (
            settings.run_queue_config.max_concurrent_runs
            == yaml.safe_load(text)["concurrency"]["runs"]["max_concurrent_runs"]
        )
        limits = settings.run_queue_config.tag_concurrency_limits
        assert {"key": "xmm/stage", "value": "ingest", "limit": 1} in limits
        assert settings.pool_config.default_pool_limit == 1
        assert "sqlite" in type(instance.run_storage).__name__.lower()


def test_ingest_names_its_observations_or_is_refused_with_the_range_to_give():
    from xmm_pipeline.orchestration.automation import partition_range_tags, range_refusal

    known = ["0100000101", "0100000201", "0100000301"]
    assert range_refusal("ingest", partition_range_tags(known[0], known[1]), known) is None
    assert range_refusal("ingest", {"dagster/partition": known[2]}, known) is None
    reason = range_refusal("ingest", {"xmm/stage": "ingest"}, known)
    assert "\n" not in reason and "3 known, 0100000101...0100000301" in reason
    assert json.dumps(partition_range_tags(known[0], known[-1])) in reason
    assert "none registered yet" in range_refusal("ingest", {}, [])
    from xmm_pipeline.definitions import build_definitions
    from xmm_pipeline.orchestration.executors import xmm_executor

    configured = xmm_executor.configured({"in_process": {}}, name="chosen")
    defs = build_definitions(executor=configured)
    for job in ("ingest", "all", "retrain", "reembed"):  # one executor for every job, range-checked
        assert defs.resolve_job_def(job).executor_def.name == "chosen_range_checked"
