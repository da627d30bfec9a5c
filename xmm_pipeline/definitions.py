"""The one Dagster `Definitions` of the project (workspace.yaml and `dagster ... -m` load it).

`build_definitions` binds the resources; the module-level `defs` is the embedded default: the simulated
DR14 archive under ./data (relative to the working directory), CPU or GPU picked automatically.
Every resource value can be overridden per run (launchpad or `-c run_config.yaml`), e.g.

    resources:
      storage: {config: {root: /data/xmm}}
      archive: {config: {kind: xsa, root: /data/xmm/archive}}

Every job runs with `executors.xmm_executor`: Dagster's multiprocess executor unless the run config
chooses `in_process` or a Dask cluster (`execution: {config: {dask: {cluster: {existing: {address:
tcp://scheduler:8786}}}}}`); `build_definitions(executor=...)` binds another (e.g. that one
`.configured(...)`, for the runs the sensor and the schedule launch). It is wrapped once by
`automation.range_checked`: a run whose plan holds the partitioned `pn_spectra` and names no
observations (`dagster job execute -j ingest` or `-j all` without a range) is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

from dagster import Definitions, ExecutorDefinition, load_asset_checks_from_modules, load_assets_from_modules

from xmm_pipeline.orchestration import (
    assets_archive,
    assets_latent,
    assets_model,
    assets_spectra,
    automation,
    checks,
)
from xmm_pipeline.orchestration.executors import xmm_executor
from xmm_pipeline.orchestration.resources import (
    ArchiveResource,
    ComputeResource,
    ModelSettings,
    StorageResource,
)

DEFAULT_STORAGE_ROOT = Path("data")

ASSET_MODULES = [assets_archive, assets_spectra, assets_model, assets_latent]


def build_definitions(
    storage_root: str | Path = DEFAULT_STORAGE_ROOT,
    archive: ArchiveResource | None = None,
    model: ModelSettings | None = None,
    compute: ComputeResource | None = None,
    executor: ExecutorDefinition = xmm_executor,
) -> Definitions:
    storage = StorageResource(root=str(storage_root))
    return Definitions(
        assets=load_assets_from_modules(ASSET_MODULES),
        asset_checks=load_asset_checks_from_modules([checks]),
        jobs=automation.JOBS,
        schedules=automation.SCHEDULES,
        sensors=automation.SENSORS,
        executor=automation.range_checked(executor),
        resources={
            "storage": storage,
            "archive": archive or ArchiveResource(root=str(Path(storage_root) / "archive")),
            "model": model or ModelSettings(),
            "compute": compute or ComputeResource(),
        },
    )


defs = build_definitions()
