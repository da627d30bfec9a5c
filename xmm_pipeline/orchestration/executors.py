"""The executor every job runs with: Dagster's own multiprocess or in-process executor, or a Dask cluster.

One executor definition for the whole code location whose run config picks the engine, so that a
user moves `ingest` or `reembed` onto Dask from the launchpad (or a run-config file) without a
second set of jobs:

    execution: {config: {multiprocess: {}}}                                    # the default
    execution: {config: {in_process: {}}}
    execution: {config: {dask: {cluster: {existing: {address: "tcp://scheduler:8786"}}}}}

`dask` takes dagster-dask's own configuration (`cluster: existing | local | slurm | kube | ...`);
the other two are Dagster's `multi_or_in_process_executor` unchanged.

`PoolSafeDaskExecutor` is dagster-dask's executor with two defects of dagster-dask 0.29.27 fixed:
under dask >= 2025 a run with a step in a concurrency pool (`pn_spectra`: `ingest`, `vae_model`:
`gpu`) fails before any step starts, because dask's `client.submit` walks into the run's named tuple
down to Dagster's `RunOpConcurrency` record, which forbids iteration ("Iteration is not allowed on
`@record` RunOpConcurrency"); and tasks are keyed `job.step`, so two concurrent runs of one job on a
shared cluster collapse into one (dagster-io/dagster#21418). Here each step's arguments travel in
one object dask does not inspect, and task keys carry the run id. Pools are not enforced on Dask
(dagster-dask never did); the run queue's tag limits still are.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from dagster import (
    Executor,
    ExecutorRequirement,
    Field,
    InitExecutorContext,
    Selector,
    executor,
    multi_or_in_process_executor,
    multiple_process_executor_requirements,
)

DASK = "dask"
# dagster-dask's cluster types other than `existing` and `local`: (module, class)
CLUSTER_CLASSES = {
    "yarn": ("dask_yarn", "YarnCluster"),
    "ssh": ("dask.distributed", "SSHCluster"),
    "pbs": ("dask_jobqueue", "PBSCluster"),
    "moab": ("dask_jobqueue", "MoabCluster"),
    "sge": ("dask_jobqueue", "SGECluster"),
    "lsf": ("dask_jobqueue", "LSFCluster"),
    "slurm": ("dask_jobqueue", "SLURMCluster"),
    "oar": ("dask_jobqueue", "OARCluster"),
    "kube": ("dask_kubernetes", "KubeCluster"),
}


class StepArguments:
    """One step's arguments for the worker, in an object dask passes through without walking into it."""

    def __init__(self, **arguments: Any) -> None:
        self.arguments = arguments


def execute_step_on_worker(dependencies: list[Any], step: StepArguments) -> list[Any]:
    """Run on a Dask worker: dagster-dask's own step execution (dependencies only order the tasks)."""
    from dagster_dask.executor import query_on_dask_worker

    return list(query_on_dask_worker(dependencies, **step.arguments))


def _dask_executor_class():
    from dagster_dask.executor import DaskExecutor, get_dask_resource_requirements

    class PoolSafeDaskExecutor(DaskExecutor):
        """dagster-dask's executor, safe for runs with pooled steps and for concurrent runs of a job."""

        def _cluster(self, job_name: str) -> Any:
            if self.cluster_type == "existing":
                return self.cluster_configuration["address"]
            if self.cluster_type == "local":
                from dask.distributed import LocalCluster

                return LocalCluster(**self.build_dict(job_name))
            if self.cluster_type not in CLUSTER_CLASSES:
                raise ValueError(f"dask cluster type {self.cluster_type!r} is not one of dagster-dask's")
            module, name = CLUSTER_CLASSES[self.cluster_type]
            return getattr(importlib.import_module(module), name)(**self.build_dict(job_name))

        def execute(self, plan_context, execution_plan) -> Iterator[Any]:
            import dask.distributed
            from dagster._core.errors import raise_execution_interrupts
            from dagster._utils import iterate_with_context

            if not plan_context.instance.is_persistent:
                raise ValueError("Dask execution requires a persistent DagsterInstance")
            with dask.distributed.Client(self._cluster(plan_context.job_name)) as client:
                futures: dict[str, Any] = {}
                for level in execution_plan.get_steps_to_execute_by_level():
                    for step in level:
                        futures[step.key] = self._submit(client, plan_context, execution_plan, step, futures)
                completed = dask.distributed.as_completed(list(futures.values()), with_results=True)
                for _, events in iterate_with_context(raise_execution_interrupts, completed):
                    yield from events

        @staticmethod
        def _submit(client, plan_context, execution_plan, step, futures: dict[str, Any]) -> Any:
            """One step as a task that waits for the tasks of the steps it depends on."""
            dependencies = [futures[key] for put in step.step_inputs for key in put.dependency_keys]
            arguments = StepArguments(
                recon_job=plan_context.reconstructable_job,
                dagster_run=plan_context.dagster_run,
                run_config=plan_context.run_config,
                step_keys=[step.key],
                instance_ref=plan_context.instance.get_ref(),
                known_state=execution_plan.known_state,
            )
            return client.submit(
                execute_step_on_worker,
                dependencies,
                arguments,
                key=f"{plan_context.job_name}.{step.key}.{plan_context.dagster_run.run_id}",
                resources=get_dask_resource_requirements(step.tags),
            )

    return PoolSafeDaskExecutor


def _engine_configs() -> dict[str, Field]:
    from dagster_dask import dask_executor

    own = multi_or_in_process_executor.config_schema.config_type.fields
    return {**own, DASK: Field(dask_executor.config_schema.config_type, is_required=True)}


def _requirements(config: Mapping[str, Any]) -> Sequence[ExecutorRequirement]:
    if DASK in config or "multiprocess" in config:
        return multiple_process_executor_requirements()
    return []


@executor(
    name="multiprocess_in_process_or_dask",
    config_schema=Field(Selector(_engine_configs()), default_value={"multiprocess": {}}),
    requirements=_requirements,
)
def xmm_executor(init_context: InitExecutorContext) -> Executor:
    """Multiprocess (default), in-process, or dagster-dask's executor, chosen by the run config."""
    config = init_context.executor_config
    if DASK in config:
        ((cluster_type, cluster_configuration),) = config[DASK]["cluster"].items()
        return _dask_executor_class()(cluster_type, cluster_configuration)
    return multi_or_in_process_executor.executor_creation_fn(init_context)


def dask_run_config(scheduler_address: str) -> dict[str, Any]:
    """The run config that sends a run's steps to the Dask scheduler at `scheduler_address`."""
    return {"execution": {"config": {DASK: {"cluster": {"existing": {"address": scheduler_address}}}}}}
