"""Simulated-archive throughput: detections simulated (folded, Poisson-sampled, written as gzipped OGIP
products + catalogue) per second.

    .venv/bin/python benchmarks/bench_simulate.py --detections 20000

The aim (issue 2): 20,000 detections in under two minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from xmm_pipeline.archive.simulated import simulate_archive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detections", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--release", default="DR14")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: automatic)")
    parser.add_argument("--out", type=Path, default=None, help="keep the archive here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_simulate_") as scratch:
        out = args.out or Path(scratch) / "archive"
        start = time.perf_counter()
        summary = simulate_archive(out, args.release, args.detections, args.seed, workers=args.workers)
        elapsed = time.perf_counter() - start
        size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    print(
        f"bench_simulate: {summary.n_detections} detections, {summary.n_spectra} spectra, "
        f"{summary.n_observations} observations in {elapsed:.1f} s = {summary.n_detections / elapsed:.0f} "
        f"detections/s ({summary.n_spectra / elapsed:.0f} spectra/s), {size_mb:.0f} MB; "
        f"workers={args.workers or 'auto'}, {os.cpu_count()} CPUs, {platform.machine()}"
    )


if __name__ == "__main__":
    main()
