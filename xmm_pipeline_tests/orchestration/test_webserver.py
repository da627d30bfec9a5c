"""The UI for real: dagster-webserver (and the daemon that dequeues runs) on 127.0.0.1 with the
project's workspace.yaml and dagster.yaml; every asset and job visible over GraphQL; a small
selection launched over GraphQL runs to success."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from xmm_pipeline.orchestration.automation import JOBS
from xmm_pipeline_tests.orchestration.conftest import REPO_ROOT, clone_pipeline
from xmm_pipeline_tests.orchestration.test_definitions import ASSETS

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 180
RUN_TIMEOUT_S = 240

ASSETS_AND_JOBS = """
{
  assetNodes { assetKey { path } groupName }
  repositoriesOrError {
    ... on RepositoryConnection {
      nodes { name location { name } jobs { name } sensors { name } schedules { name } }
    }
  }
}
"""
LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""
RUN_STATUS = """
query Status($runId: ID!) { runOrError(runId: $runId) { __typename ... on Run { status } } }
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"{url}/graphql", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        payload = json.loads(response.read())
    assert "errors" not in payload, payload
    return payload["data"]


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def webserver(dr14_pipeline: Path, tmp_path: Path) -> Iterator[str]:
    root = clone_pipeline(dr14_pipeline, tmp_path / "project")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(root / "dagster_home"),
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",
    }
    port = free_port()
    workspace = str(REPO_ROOT / "workspace.yaml")
    logs = [open(tmp_path / name, "w") for name in ("webserver.log", "daemon.log")]  # noqa: SIM115
    processes = [
        subprocess.Popen(
            [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", workspace],
            cwd=root,
            env=env,
            stdout=logs[0],
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", workspace],
            cwd=root,
            env=env,
            stdout=logs[1],
            stderr=subprocess.STDOUT,
        ),
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert processes[0].poll() is None, (tmp_path / "webserver.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "webserver did not start"
                time.sleep(1)
        yield url
    finally:
        for process in processes:
            stop(process)
        for log in logs:
            log.close()


def test_graphql_shows_every_asset_and_job_and_runs_a_selection(webserver: str):
    data = graphql(webserver, ASSETS_AND_JOBS)
    assets = {"/".join(node["assetKey"]["path"]) for node in data["assetNodes"]}
    assert set(ASSETS) | {"catalogue_release"} <= assets
    (repository,) = data["repositoriesOrError"]["nodes"]
    assert repository["location"]["name"] == "xmm_pipeline"
    assert {job.name for job in JOBS} <= {job["name"] for job in repository["jobs"]}
    assert [s["name"] for s in repository["sensors"]] == ["catalogue_release_sensor"]
    assert [s["name"] for s in repository["schedules"]] == ["reembed_schedule"]

    params = {
        "selector": {
            "repositoryLocationName": "xmm_pipeline",
            "repositoryName": repository["name"],
            "jobName": "reembed",
            "assetSelection": [{"path": ["faiss_index"]}, {"path": ["latent_map"]}],
        },
        "runConfigData": {"execution": {"config": {"in_process": {}}}},
    }
    launched = graphql(webserver, LAUNCH, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    status = ""
    while time.monotonic() < deadline:
        status = graphql(webserver, RUN_STATUS, {"runId": run_id})["runOrError"]["status"]
        if status in {"SUCCESS", "FAILURE", "CANCELED"}:
            break
        time.sleep(2)
    assert status == "SUCCESS"
