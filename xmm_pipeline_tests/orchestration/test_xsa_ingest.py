"""End to end over loopback TAP and AIO servers that serve the session's simulated DR14 archive.

The `ingest` runs that the release sensor launches with `ArchiveResource(kind="xsa")` write the same
Parquet spectra as with the simulated archive read directly, except on observations with an injected
fault, each of which is in the quarantine table with its reason. The second run (faults gone) asks the
AIO server again only for what failed, leaves every complete observation's file untouched, and ends
with every observation as the simulated ingest has it. The sensor does nothing while the served
catalogue stays the same, and requests ingest runs when it changes from DR14 to DR15.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pandas as pd
import pytest
from dagster import DagsterInstance, Definitions, SensorResult, build_sensor_context

from xmm_pipeline.archive.catalogue import as_canonical
from xmm_pipeline.definitions import build_definitions
from xmm_pipeline.orchestration.automation import RELEASE_TAG, catalogue_release_sensor
from xmm_pipeline.orchestration.inprocess import execute_run_request, ingest_release, tick_release_sensor
from xmm_pipeline.orchestration.resources import ArchiveResource
from xmm_pipeline.spectra.dataset import SPECTRA_SUBDIR
from xmm_pipeline.spectra.preprocess import PreprocessConfig, select_detections
from xmm_pipeline_tests.archive.servers import AioServer, TapCatalogue, TapServer, as_4xmm_table
from xmm_pipeline_tests.conftest import SIM_DETECTIONS, SIM_SEED

pytestmark = pytest.mark.slow

TABLE = "xsa.v_epic_source_cat"
DESCRIPTION = "4XMM detections"
TIMEOUT_S = 4.0  # generous for TAP answers on a loaded machine; "slow" waits one second longer
RETRIES = 1
# Whole-observation faults: the observation's tar never arrives (or is refused).
OBSERVATION_FAULTS = {
    "401": "proprietary data (HTTP 401)",
    "500": f"HTTP 500 after {RETRIES + 1} attempts",
    "reset": "connection failed",
    "slow": f"timed out after {TIMEOUT_S:g} s after {RETRIES + 1} attempts",
    "unsafe-tar": "unsafe tar member",
}
# Member faults: the first product in the tar is broken, the others arrive intact.
MEMBER_FAULTS = {
    "truncated-gzip": "gzip stream is corrupt or truncated",
    "corrupt-fits": "not a readable FITS file",
}


@dataclass
class Served:
    catalogue: pd.DataFrame
    tap: TapServer
    aio: AioServer


@pytest.fixture(scope="module")
def served(sim_archive: Path):
    catalogue = pd.read_parquet(sim_archive / "catalogue.parquet")
    with TapServer(TapCatalogue(TABLE, as_4xmm_table(catalogue), DESCRIPTION)) as tap, \
            AioServer(sim_archive) as aio:
        aio.faults.slow_s = TIMEOUT_S + 1.0
        yield Served(catalogue, tap, aio)


def xsa_definitions(root: Path, served: Served) -> Definitions:
    release = str(served.catalogue["release"].iloc[0])
    archive = ArchiveResource(
        kind="xsa", root=str(root / "archive"), tap_url=served.tap.tap_url, tap_table=TABLE,
        aio_url=served.aio.aio_url, rmf_url=served.aio.rmf_url, xsa_release=release,
        timeout_s=TIMEOUT_S, retries=RETRIES, backoff_s=0.01, max_concurrency=4,
    )
    return build_definitions(root, archive)


def simulated_definitions(root: Path, sim_archive: Path) -> Definitions:
    """The simulated archive read in place (same parameters: nothing is re-simulated or written)."""
    archive = ArchiveResource(
        root=str(sim_archive), release="DR14", n_detections=SIM_DETECTIONS, seed=SIM_SEED
    )
    return build_definitions(root, archive)


def evaluate_release_sensor(defs: Definitions, instance: DagsterInstance, cursor: str | None) -> SensorResult:
    """One tick of the release sensor, evaluated only: what it would request, nothing launched."""
    context = build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs, resources=defs.resources,
        sensor_name=catalogue_release_sensor.name,
    )
    return catalogue_release_sensor.evaluate_tick(context)


def choose_faults(sim_archive: Path, catalogue: pd.DataFrame) -> dict[str, str]:
    """A fault per observation, each on an observation with selected detections. A member fault goes
    where the broken first product belongs to a selected detection and another one survives."""
    selected, _ = select_detections(as_canonical(catalogue), PreprocessConfig())
    by_obs = selected.groupby("obs_id")["src_num"].apply(set)
    faults: dict[str, str] = {}
    candidates = sorted(by_obs.index)
    for fault in MEMBER_FAULTS:
        for obs_id in candidates:
            products = sorted((sim_archive / obs_id / "pps").glob("P*.FTZ"))
            if obs_id in faults or len(by_obs[obs_id]) < 2 or not products:
                continue
            if int(products[0].stem[-3:], 16) in by_obs[obs_id]:
                faults[obs_id] = fault
                break
    remaining = [o for o in candidates if o not in faults and any((sim_archive / o / "pps").glob("*SRSPEC*"))]
    for index, fault in enumerate(OBSERVATION_FAULTS):
        faults[remaining[(index + 1) * len(remaining) // (len(OBSERVATION_FAULTS) + 1)]] = fault
    assert len(faults) == len(OBSERVATION_FAULTS) + len(MEMBER_FAULTS)
    return faults


def spectra_frames(spectra_root: Path) -> dict[str, pd.DataFrame]:
    return {p.stem: pd.read_parquet(p) for p in sorted((spectra_root / SPECTRA_SUBDIR).glob("*.parquet"))}


def quarantine(spectra_root: Path) -> pd.DataFrame:
    return pd.read_parquet(spectra_root / "quarantine.parquet")


def aio_requests(aio: AioServer) -> list[str]:
    """The observation (obsno) or RMF name of every request the AIO server has answered so far."""
    keys = []
    for _, path in list(aio.log):
        parts = urlsplit(path)
        keys.append(parse_qs(parts.query).get("obsno", [parts.path.rsplit("/", 1)[-1]])[-1])
    return keys


@dataclass
class Ingest:
    faults: dict[str, str]
    simulated: dict[str, pd.DataFrame]
    simulated_quarantine: pd.DataFrame
    first: dict[str, pd.DataFrame]
    first_quarantine: pd.DataFrame
    second: dict[str, pd.DataFrame]
    second_quarantine: pd.DataFrame
    second_requests: list[str]
    untouched: bool
    ingest_runs: list[tuple[str, bool]]
    skip_messages: list[str | None]
    run_counts: list[int]
    new_release: SensorResult
    dr15_registered: set[str]
    dr15_new_observations: set[str]


@pytest.fixture(scope="module")
def ingest(sim_archive: Path, served: Served, tmp_path_factory: pytest.TempPathFactory) -> Ingest:
    """The simulated ingest; the XSA ingest with faults injected, launched by the sensor's first tick;
    two more ticks on the same catalogue; a second XSA ingest once the faults are gone; a tick on DR15."""
    from xmm_pipeline.archive.simulated import simulate_archive

    simulated_data = tmp_path_factory.mktemp("simulated_ingest") / "data"
    with DagsterInstance.ephemeral() as instance:
        baseline = ingest_release(simulated_definitions(simulated_data, sim_archive), instance, None)
        assert baseline.runs and all(result.success for _, result in baseline.runs)

    faults = choose_faults(sim_archive, served.catalogue)
    data = tmp_path_factory.mktemp("xsa_ingest") / "data"
    defs = xsa_definitions(data, served)
    spectra = data / "spectra"
    served.aio.faults.by_key.update(faults)
    try:
        with DagsterInstance.ephemeral() as instance:
            first = ingest_release(defs, instance, None)
            first_frames, first_quarantine = spectra_frames(spectra), quarantine(spectra)
            completed = tick_release_sensor(defs, instance, first.cursor)
            unchanged = tick_release_sensor(defs, instance, completed.cursor)

            served.aio.faults.by_key.clear()
            files = {p: p.stat().st_mtime_ns for p in (spectra / SPECTRA_SUBDIR).glob("*.parquet")}
            before = len(served.aio.log)
            for request, _ in first.runs:
                assert execute_run_request(defs, instance, request).success
            second_requests = aio_requests(served.aio)[before:]
            untouched = all(
                p.stat().st_mtime_ns == mtime for p, mtime in files.items() if p.stem not in faults
            )

            dr15_root = tmp_path_factory.mktemp("sim_dr15")
            simulate_archive(dr15_root, release="DR15", n_detections=SIM_DETECTIONS, seed=SIM_SEED)
            dr15 = pd.read_parquet(dr15_root / "catalogue.parquet")
            served.tap.catalogue = TapCatalogue(TABLE, as_4xmm_table(dr15), DESCRIPTION)
            new_release = evaluate_release_sensor(defs, instance, unchanged.cursor)
            known = set(instance.get_dynamic_partitions("observations"))
            assert execute_run_request(defs, instance, new_release.run_requests[0]).success
            dr15_registered = set(instance.get_dynamic_partitions("observations")) - known
    finally:
        served.aio.faults.by_key.clear()
        served.tap.catalogue = TapCatalogue(TABLE, as_4xmm_table(served.catalogue), DESCRIPTION)

    config = PreprocessConfig()
    dr14_selected = set(select_detections(as_canonical(served.catalogue), config)[0]["obs_id"])
    dr15_selected = set(select_detections(as_canonical(dr15), config)[0]["obs_id"])
    return Ingest(
        faults=faults,
        simulated=spectra_frames(simulated_data / "spectra"),
        simulated_quarantine=quarantine(simulated_data / "spectra"),
        first=first_frames,
        first_quarantine=first_quarantine,
        second=spectra_frames(spectra),
        second_quarantine=quarantine(spectra),
        second_requests=second_requests,
        untouched=untouched,
        ingest_runs=[(request.job_name, result.success) for request, result in first.runs],
        skip_messages=[completed.skip_message, unchanged.skip_message],
        run_counts=[len(completed.runs), len(unchanged.runs)],
        new_release=new_release,
        dr15_registered=dr15_registered,
        dr15_new_observations=dr15_selected - dr14_selected,
    )


def assert_same_spectra(
    mine: pd.DataFrame, expected: pd.DataFrame, obs_id: str, ignore: tuple[str, ...] = ()
) -> None:
    assert len(mine) == len(expected), obs_id
    pd.testing.assert_frame_equal(
        mine.drop(columns=list(ignore)).reset_index(drop=True),
        expected.drop(columns=list(ignore)).reset_index(drop=True),
        obj=obs_id,
    )


def test_xsa_ingest_reproduces_the_simulated_spectra_except_the_faults(ingest: Ingest) -> None:
    assert ingest.ingest_runs and all(job == "ingest" and ok for job, ok in ingest.ingest_runs)
    assert set(ingest.first) == set(ingest.simulated)
    clean = [o for o in ingest.simulated if o not in ingest.faults]
    assert sum(len(ingest.simulated[o]) for o in clean) > 300
    for obs_id in clean:
        assert_same_spectra(ingest.first[obs_id], ingest.simulated[obs_id], obs_id)
    for obs_id, fault in ingest.faults.items():
        expected = ingest.simulated[obs_id]
        assert not expected.empty, obs_id
        if fault in OBSERVATION_FAULTS:
            assert ingest.first[obs_id].empty, (obs_id, fault)
        else:
            broken = set(ingest.first_quarantine.loc[ingest.first_quarantine["obs_id"] == obs_id, "detid"])
            survivors = expected[~expected["detid"].isin(broken)]
            assert 0 < len(survivors) < len(expected), (obs_id, fault)
            # input_hash covers the observation's product files, one of which is missing here
            assert_same_spectra(ingest.first[obs_id], survivors, obs_id, ignore=("input_hash",))


def test_every_fault_is_in_quarantine_with_its_reason(ingest: Ingest) -> None:
    records = ingest.first_quarantine
    without_products = set(ingest.simulated_quarantine["obs_id"])
    assert set(ingest.simulated_quarantine["stage"]) == {"download"}
    assert set(records["obs_id"]) == set(ingest.faults) | without_products
    for obs_id in without_products:
        (reason,) = records.loc[records["obs_id"] == obs_id, "reason"]
        assert "HTTP 404" in reason, reason
    for obs_id, fault in ingest.faults.items():
        rows = records[records["obs_id"] == obs_id]
        downloads = rows[rows["stage"] == "download"]
        assert len(downloads) == 1, (fault, rows)
        reason = downloads["reason"].iloc[0]
        assert (OBSERVATION_FAULTS | MEMBER_FAULTS)[fault] in reason, (fault, reason)
        assert f"obsno={obs_id}" in downloads["path"].iloc[0]
        if fault in OBSERVATION_FAULTS:
            assert downloads["detid"].iloc[0] == -1 and len(rows) == 1
        else:
            detid = downloads["detid"].iloc[0]
            assert detid in set(ingest.simulated[obs_id]["detid"]), "the broken product is not a selected one"
            later = rows[rows["stage"] == "preprocess"]
            assert list(later["detid"]) == [detid] and "file not found" in later["reason"].iloc[0]


def test_second_run_downloads_only_what_failed_and_then_matches(ingest: Ingest) -> None:
    failed = set(ingest.faults) | set(ingest.simulated_quarantine["obs_id"])
    observations = [key for key in ingest.second_requests if key.isdigit()]
    assert sorted(observations) == sorted(failed)
    assert ingest.untouched, "a spectra file of a complete observation was rewritten"
    assert set(ingest.second) == set(ingest.simulated)
    for obs_id, expected in ingest.simulated.items():
        assert_same_spectra(ingest.second[obs_id], expected, obs_id)
    assert set(ingest.second_quarantine["obs_id"]) == set(ingest.simulated_quarantine["obs_id"])
    assert set(ingest.second_quarantine["stage"]) == {"download"}


def test_release_sensor_follows_the_served_catalogue(ingest: Ingest) -> None:
    assert ingest.run_counts == [0, 0]
    assert "no trained model yet" in ingest.skip_messages[0]
    assert "catalogue release unchanged" in ingest.skip_messages[1]
    result = ingest.new_release
    assert result.run_requests and {r.job_name for r in result.run_requests} == {"ingest"}
    (observation,) = result.asset_events
    new_fingerprint = observation.metadata["fingerprint"].value
    assert new_fingerprint[:24] not in ingest.skip_messages[1]  # the message names the old one, 24 chars
    assert {r.tags[RELEASE_TAG] for r in result.run_requests} == {new_fingerprint[:63]}
    assert len(result.run_requests) == 1, "the catalogue run: the tick itself fetches no catalogue"
    assert not result.dynamic_partitions_requests
    assert ingest.dr15_registered == ingest.dr15_new_observations, "registered by the catalogue run"
