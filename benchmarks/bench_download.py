"""Download cost of the real-archive client against the loopback AIO server.

Measures (1) the per-request overhead of the client (HTTP round trip + temp file + gzip/FITS
verification + rename) with one request per product, and a bare `requests.get` of the same files for
comparison; (2) throughput with one tar per observation at concurrency 1, 4 and 8 (canned RMFs already
in place: an ingest fetches each once); and prints the
full-DR14 estimate the README quotes (docs/REAL_ARCHIVE.md).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_download.py [--observations 40]

Products come from the simulated archive when it is available (the closest stand-in for real
product sizes), else from the tests' small synthetic archive.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xmm_pipeline.archive.simulated import simulate_archive
from xmm_pipeline.archive.xsa import XSAArchive
from xmm_pipeline_tests.archive.servers import AioServer

# 4XMM-DR14 (BRIEF section 3): observations, detections with extracted EPIC spectra, >300-count sample.
DR14_OBSERVATIONS = 13_864
DR14_SPECTRA = 372_603
DR14_SELECTED = 100_000


def build_source(root: Path, n_observations: int) -> tuple[str, list[str]]:
    simulate_archive(root, release="DR14", n_detections=n_observations * 12, seed=7)
    obs_ids = sorted(p.parent.name for p in root.glob("*/pps"))[:n_observations]
    return "simulated archive", obs_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observations", type=int, default=40)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_download_"))
    try:
        source = work / "source"
        origin, obs_ids = build_source(source, args.observations)
        files = sorted(p for o in obs_ids for p in (source / o / "pps").glob("P*.FTZ"))
        spectra = sum(1 for p in files if "SRSPEC" in p.name)
        product_bytes = sum(p.stat().st_size for p in files)
        rmf_bytes = sum(p.stat().st_size for p in (source / "responses" / "PN").iterdir())
        n_rmfs = len(list((source / "responses" / "PN").iterdir()))
        print(f"source: {origin}, {len(obs_ids)} observations, {spectra} spectra, "
              f"{product_bytes / spectra / 1e3:.1f} kB of products per spectrum, {n_rmfs} RMFs "
              f"({rmf_bytes / max(n_rmfs, 1) / 1e6:.2f} MB each)")

        with AioServer(source) as aio:
            session = requests.Session()
            start = time.perf_counter()
            for obs_id in obs_ids[:10]:
                assert session.get(f"{aio.aio_url}?obsno={obs_id}&level=PPS&instname=PN").content
            bare_tar_ms = (time.perf_counter() - start) / min(10, len(obs_ids)) * 1e3

            catalogue = source / "catalogue.parquet"
            per_source = work / "per_source"
            per_source.mkdir()
            rows = pd.read_parquet(catalogue)
            with_spectra = {(p.name[1:11], int(p.name[-7:-4], 16)) for p in files if "SRSPEC" in p.name}
            keep = [(o, n) in with_spectra for o, n in zip(rows["obs_id"], rows["src_num"])]
            rows[keep].to_parquet(per_source / "catalogue.parquet", index=False)
            archive = XSAArchive(per_source, aio_url=aio.aio_url, rmf_url=aio.rmf_url, max_concurrency=1,
                                 product_mode="source", observations_table="")
            start = time.perf_counter()
            assert archive.fetch_observations(obs_ids) == []
            per_request_ms = (time.perf_counter() - start) / archive.stats.requests * 1e3
            print(f"per-request overhead (concurrency 1, one product per request, verified): "
                  f"{per_request_ms:.1f} ms over {archive.stats.requests} requests; "
                  f"bare GET of an observation tar: {bare_tar_ms:.1f} ms")

            rates = {}
            for concurrency in (1, 4, 8):
                target = work / f"tar_c{concurrency}"
                shutil.copytree(source / "responses", target / "responses")  # RMFs: fetched once per ingest
                archive = XSAArchive(target, aio_url=aio.aio_url, rmf_url=aio.rmf_url,
                                     max_concurrency=concurrency, observations_table="")
                start = time.perf_counter()
                assert archive.fetch_observations(obs_ids) == []
                seconds = time.perf_counter() - start
                rates[concurrency] = spectra / seconds
                print(f"concurrency {concurrency}: {len(obs_ids) / seconds:.1f} observations/s, "
                      f"{spectra / seconds:.0f} spectra/s, "
                      f"{archive.stats.bytes_received / seconds / 1e6:.1f} MB/s "
                      f"({archive.stats.requests} requests, {seconds:.2f} s)")

        per_obs_spectra = DR14_SPECTRA / DR14_OBSERVATIONS
        client_hours = DR14_SPECTRA / rates[4] / 3600
        disk_gb = DR14_SPECTRA * product_bytes / spectra / 1e9
        print(f"estimate, full DR14 ({DR14_OBSERVATIONS} observations, {DR14_SPECTRA} spectra, "
              f"{per_obs_spectra:.0f} per observation): client-side work {client_hours:.2f} h at "
              "concurrency 4; "
              f"spectral products on disk {disk_gb:.1f} GB (+ canned RMFs, ~4 MB each)")
        for latency_s in (0.5, 2.0):
            for concurrency in (4, 8):
                hours = DR14_OBSERVATIONS * latency_s / concurrency / 3600 + client_hours
                selected = 3 * DR14_SELECTED * latency_s / concurrency / 3600
                print(f"  server latency {latency_s:.1f} s/request, concurrency {concurrency}: "
                      f"tar per observation {hours:.1f} h; per-source (>300 counts, {3 * DR14_SELECTED} "
                      f"requests) {selected:.1f} h")
        print(f"RESULT bench_download: per_request_ms={per_request_ms:.1f} "
              + " ".join(f"spectra_per_s_c{c}={r:.0f}" for c, r in rates.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
