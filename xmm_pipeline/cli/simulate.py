"""`xmm-pipeline simulate`: write a simulated XMM-Newton archive (catalogue + pipeline products)."""

from __future__ import annotations

import argparse
from pathlib import Path

from xmm_pipeline.errors import UserError


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--release", default="DR14", help="catalogue release to simulate: DR14 or DR15")
    parser.add_argument("--detections", type=int, default=2000, help="number of detections (DR14 part)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="archive root to write")
    parser.add_argument(
        "--odd-fraction",
        type=float,
        default=None,
        metavar="F",
        help="share of odd spectra among serendipitous sources, 0..1 (default 0.005)",
    )


def run(args: argparse.Namespace) -> int:
    from xmm_pipeline.archive.simulated import simulate_archive
    from xmm_pipeline.progress import Progress

    if args.detections <= 0:
        raise UserError(f"--detections must be a positive number, got {args.detections}")
    if args.seed < 0:
        raise UserError(f"--seed must be non-negative, got {args.seed}")
    from xmm_pipeline.archive.sources import DEFAULT_ODD_FRACTION

    odd_fraction = DEFAULT_ODD_FRACTION if args.odd_fraction is None else args.odd_fraction
    if not 0.0 <= odd_fraction <= 1.0:
        raise UserError(f"--odd-fraction must be within 0..1, got {args.odd_fraction}")
    with Progress("simulate", "detections") as progress:
        summary = simulate_archive(args.out, release=args.release, n_detections=args.detections,
                                   seed=args.seed, odd_fraction=odd_fraction, progress=progress)
    state = "already present" if summary.skipped else "written"
    print(
        f"simulated {summary.release} archive {state} in {summary.out_dir}: "
        f"{summary.n_detections} detections, {summary.n_observations} observations, "
        f"{summary.n_spectra} pn spectra, {summary.n_rmfs} canned RMFs (fingerprint {summary.fingerprint})"
    )
    return 0
