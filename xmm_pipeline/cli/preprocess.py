"""`xmm-pipeline preprocess --archive DIR --out DIR`: select, bin and unfold pn spectra into Parquet.

DIR is an archive folder: catalogue.parquet and <obs_id>/pps/ product folders, or the product folders
alone (a user's own PPS products), which are then selected on their own net counts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xmm_pipeline.cli.paths import writable_folder
from xmm_pipeline.errors import UserError


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        "--archive",
        required=True,
        type=Path,
        help="archive folder: <obs_id>/pps/ products and catalogue.parquet (without it: own net counts)",
    )
    parser.add_argument(
        "--responses",
        type=Path,
        help="folder of the canned RMFs named by RESPFILE (default: ARCHIVE/responses/PN)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder for the Parquet spectra")
    parser.add_argument(
        "--min-counts", type=float, default=300, help="keep detections with pn_8_cts above this"
    )
    parser.add_argument("--max-sum-flag", type=int, default=2, help="keep detections with SUM_FLAG <= this")
    parser.add_argument(
        "--allow-extended",
        action="store_true",
        help="keep extended detections too (default: point-like only)",
    )


def run(args: argparse.Namespace) -> int:
    from xmm_pipeline.progress import Progress
    from xmm_pipeline.spectra.preprocess import PreprocessConfig, preprocess_archive

    if not args.archive.is_dir():
        raise UserError(f"{args.archive}: archive folder not found")
    if args.responses is not None and not args.responses.is_dir():
        raise UserError(f"{args.responses}: responses folder not found")
    if args.min_counts < 0:
        raise UserError(f"--min-counts must be >= 0, got {args.min_counts}")
    config = PreprocessConfig(
        min_counts=args.min_counts, max_sum_flag=args.max_sum_flag, require_point_like=not args.allow_extended
    )
    writable_folder(args.out, "--out")
    with Progress("preprocess", "spectra") as progress:
        summary = preprocess_archive(
            args.archive, args.out, config, progress=progress, responses_dir=args.responses
        )
    for line in summary.lines():
        print(line)
    print(f"spectra in {args.out} ({summary.seconds:.1f} s)")
    return 0
