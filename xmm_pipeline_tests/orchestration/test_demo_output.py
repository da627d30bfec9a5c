"""`xmm-pipeline demo` prints one line per step and its summary; Dagster's event log (DEBUG) and
Python warnings go to the log file instead of the terminal."""

import warnings
from pathlib import Path

import pytest
from dagster import DagsterInstance, Definitions, Failure, LoggerDefinition, asset, define_asset_job

from xmm_pipeline.cli.demo import log_to_file


@asset
def upstream() -> None:
    warnings.warn("a warning for the log file", UserWarning, stacklevel=1)


@asset(deps=[upstream])
def downstream() -> None:
    raise Failure(description="deliberately broken")


@asset(deps=[downstream])
def last() -> None:
    pass


def test_one_line_per_step_and_the_full_log_in_a_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    log = tmp_path / "demo.log"
    home = tmp_path / "dagster_home"  # a persistent instance, as in the demo (it reconfigures logging)
    home.mkdir()
    with log_to_file(log) as run_logger, DagsterInstance.local_temp(str(home)) as instance:
        defs = Definitions(assets=[upstream, downstream, last], jobs=[define_asset_job("steps")])
        job = defs.resolve_job_def("steps")
        job = job.with_logger_defs({"demo": LoggerDefinition(lambda _: run_logger)})
        results = [job.execute_in_process(run_config={"loggers": {"demo": {}}}, instance=instance,
                                          raise_on_error=False) for _ in range(2)]
    assert not any(r.success for r in results)
    out, err = capfd.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 6, out
    assert "upstream" in lines[0] and "done in" in lines[0]
    assert "downstream" in lines[1] and "FAILED: deliberately broken" in lines[1]
    assert "last" in lines[2] and "skipped" in lines[2]
    assert "DEBUG" not in out + err and "a warning for the log file" not in out + err
    text = log.read_text()
    assert text.count(" - DEBUG - ") > 10 and "STEP_START" in text and "a warning for the log file" in text
    assert all(r.run_id in text for r in results)  # the instance closes every handler at each run start
