"""`xmm-pipeline download OBS_ID... --out DIR`: pn spectral products, their RMFs and catalogue rows.

Writes the layout the simulated archive writes (DIR/catalogue.parquet, DIR/<obs_id>/pps/...,
DIR/responses/PN/...), so `xmm-pipeline preprocess --archive DIR` reads it the same way. What could
not be had is listed and kept in DIR/download_quarantine.parquet.

Exit status: 0 done; 1 done, some products quarantined; 2 a problem with the arguments or the input
(one line on stderr); 3 a service could not be reached (one line naming the URL; an output folder
this run created is removed again when nothing was written into it).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from xmm_pipeline.errors import UserError

QUARANTINE_FILE = "download_quarantine.parquet"


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("obs_ids", nargs="+", metavar="OBS_ID", help="10-digit XMM-Newton observation ids")
    parser.add_argument("--out", required=True, type=Path, help="archive folder to fill")
    parser.add_argument("--tap-url", help="TAP service of the catalogue (default: the XSA's)")
    parser.add_argument("--table", help="catalogue table in the TAP service (default: xsa.v_epic_source_cat)")
    parser.add_argument("--catalogue-file", type=Path, help="local catalogue FITS file instead of TAP")
    parser.add_argument("--column-map", default="", metavar="CANONICAL=SERVED,...",
                        help="catalogue columns served under names no release adapter knows, "
                             "e.g. pn_8_cts=pn_counts,obs_id=obsid")
    parser.add_argument("--aio-url", help="AIO servlet serving the PPS products (default: the XSA's)")
    parser.add_argument("--rmf-url", help="folder URL of the canned pn RMFs (default: the calibration site)")
    parser.add_argument("--rmf-version", help="canned-matrix version suffix, e.g. _v22.0 "
                                              "(default: read from Version.txt beside the matrices)")
    parser.add_argument("--per-source", action="store_true",
                        help="fetch one file per product and detection instead of one tar per observation")
    parser.add_argument("--min-counts", type=float, default=0.0,
                        help="with --per-source: only detections with pn_8_cts at least this")
    parser.add_argument("--concurrency", type=int, default=4, help="parallel requests (be polite)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--retries", type=int, default=4, help="retries of a failed request")
    parser.add_argument("--release", help="release label stored with the catalogue rows (e.g. DR14)")


def run(args: argparse.Namespace) -> int:
    from xmm_pipeline.archive.download import EXIT_SERVICE_UNREACHABLE, ServiceUnreachableError
    from xmm_pipeline.archive.xsa import parse_column_map, validate_obs_id

    obs_ids = [validate_obs_id(o) for o in args.obs_ids]
    column_map = parse_column_map(args.column_map)
    created = args.out.absolute()
    while not created.parent.exists():
        created = created.parent  # the topmost folder this run creates
    created = None if created.exists() else created
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{args.out}: cannot create output folder ({error.strerror})") from None
    try:
        return _download(args, obs_ids, column_map)
    except ServiceUnreachableError as error:
        print(f"xmm-pipeline download: error: {error}", file=sys.stderr)
        return EXIT_SERVICE_UNREACHABLE
    finally:
        if created is not None and created.is_dir() and not any(p.is_file() for p in created.rglob("*")):
            shutil.rmtree(created, ignore_errors=True)


def _download(args: argparse.Namespace, obs_ids: list[str], column_map: dict[str, str]) -> int:
    import pandas as pd

    from xmm_pipeline.archive.xsa import XSAArchive
    from xmm_pipeline.progress import Progress
    from xmm_pipeline.storage import quarantine_frame, write_parquet_atomic

    endpoints = {
        "tap_url": args.tap_url, "table": args.table, "aio_url": args.aio_url, "rmf_url": args.rmf_url,
    }
    archive = XSAArchive(
        args.out, timeout_s=args.timeout, max_concurrency=args.concurrency, retries=args.retries,
        catalogue_file=args.catalogue_file, product_mode="source" if args.per_source else "observation",
        release=args.release, min_pn_counts=args.min_counts, column_map=column_map,
        rmf_version=args.rmf_version,
        **{key: value for key, value in endpoints.items() if value},
    )
    start = time.perf_counter()
    rows = archive.fetch_catalogue_rows(obs_ids)
    found = set(rows["obs_id"])
    missing = [o for o in obs_ids if o not in found]
    with Progress("download", "observations") as progress:
        records = archive.fetch_observations(obs_ids, progress=progress)
    frame = quarantine_frame(records)
    path = args.out / QUARANTINE_FILE
    if len(frame):
        write_parquet_atomic(path, frame)
    else:
        path.unlink(missing_ok=True)
    for record in records:
        print(f"quarantined {record.obs_id}: {record.reason}")
    if missing:
        print(f"no catalogue rows for: {', '.join(missing)}")
    for warning in archive.warnings:
        print(f"warning: {warning}")
    for reason, skipped in sorted(archive.skipped.items()):
        print(f"skipped {len(skipped)} {reason.replace('_', ' ')}: {', '.join(skipped)}")
    stats = archive.stats
    n_rows = len(pd.read_parquet(args.out / "catalogue.parquet"))
    print(
        f"{len(obs_ids)} observations, {n_rows} catalogue rows in {args.out}; {stats.requests} requests, "
        f"{stats.bytes_received / 1e6:.1f} MB, {stats.retries} retries, {len(records)} quarantined "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 1 if records else 0
