"""Fixtures of the explorer tests: a latent folder embedded from the session's simulated archive, spectra
and trained model (conftest.py one level up), and the explorer served from it on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def explore_latent(sim_archive: Path, spectra_dir: Path, trained_artifact: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xmm_pipeline.latent.build import embed_and_build

    out = tmp_path_factory.mktemp("explore_latent")
    embed_and_build(spectra_dir, trained_artifact, out, archive_dir=sim_archive)
    return out


@pytest.fixture(scope="session")
def explorer_data(explore_latent: Path):
    from xmm_pipeline.explore.data import ExplorerData

    return ExplorerData(explore_latent)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def explorer_url(explorer_data) -> Iterator[str]:
    """The real app under uvicorn in a background thread, stopped at the end of the session."""
    import uvicorn

    from xmm_pipeline.explore.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(explorer_data), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the explorer server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def archive_product(archive: Path, obs_id: str, src_num: int, kind: str) -> Path:
    """A detection's PPS product in the simulated archive (SRSPEC, BGSPEC, SRCARF)."""
    return next((archive / obs_id / "pps").glob(f"P{obs_id}PN*{kind}0{src_num:03X}.FTZ"))


def archive_rmf(archive: Path, spectrum: Path) -> Path:
    """The canned RMF a simulated spectrum's RESPFILE names."""
    from astropy.io import fits

    respfile = fits.getheader(spectrum, "SPECTRUM")["RESPFILE"]
    return next((archive / "responses" / "PN").glob(Path(respfile).stem + "*"))
