"""`xmm-pipeline embed | similar | outliers | trajectory | show | evaluate | export`: the latent products.

Every command reads or writes the latent folder laid out by `xmm_pipeline.latent.build`
(default data/latent, where `xmm-pipeline demo` writes it). Errors a user can fix (unknown target, missing
index, malformed spectrum) end as one line and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

DEFAULT_LATENT = "data/latent"
EXPORT_FORMATS = ("fits", "votable", "parquet", "csv")  # == latent.export.FORMATS, without its imports
EXPORT_SUFFIXES = {".fits": "fits", ".fit": "fits", ".fts": "fits", ".vot": "votable", ".votable": "votable",
                   ".xml": "votable", ".parquet": "parquet", ".csv": "csv"}
MJD_COLUMN = re.compile(r"(^|_)mjd(_|$)")
COUNT_COLUMNS = ("net_counts", "pn_8_cts", "total_counts", "counts")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    if name == "embed":
        parser.add_argument("--spectra", required=True, help="preprocessed spectra folder")
        parser.add_argument("--model", required=True, help="trained model artifact folder")
        parser.add_argument("--out", default=DEFAULT_LATENT, help="latent folder to write")
        parser.add_argument("--archive", help="archive folder; its truth.parquet gives the classes")
        parser.add_argument("--simbad-url", help="cross-match classes with SIMBAD at this TAP URL")
        parser.add_argument("--radius", type=float, default=5.0, help="SIMBAD cone radius, arcsec")
        parser.add_argument("--force", action="store_true", help="rebuild even if the inputs are unchanged")
        return
    if name == "evaluate":
        parser.add_argument("--archive", required=True, help="simulated archive folder (truth.parquet)")
        parser.add_argument("--spectra", required=True, help="preprocessed spectra folder")
        parser.add_argument("--model", required=True, help="trained model artifact folder")
        parser.add_argument("--out", default="docs", help="folder for EVALUATION.md and images/")
        parser.add_argument("--latent-dims", default="2,4,8",
                            help="latent dimensions to retrain and compare, comma-separated (default 2,4,8)")
        parser.add_argument("--skip-latent-dims", action="store_true",
                            help="skip retraining for the latent-dimension comparison")
        parser.add_argument("--epochs", type=int, default=None,
                            help="max epochs per comparison model (default: the model's own settings)")
        parser.add_argument("--seeds", type=int, default=3,
                            help="training seeds per latent dimension in the comparison (default 3)")
        parser.add_argument("--work", default="results/evaluation",
                            help="folder for the comparison and baseline models (reused by reruns)")
        return
    parser.add_argument("--latent", default=DEFAULT_LATENT, help=f"latent folder (default {DEFAULT_LATENT})")
    if name == "export":
        parser.add_argument("--format", choices=EXPORT_FORMATS, default=None,
                            help="file format (default: from the --out suffix, else votable)")
        parser.add_argument("--out", help="file to write (default: LATENT/latent_catalogue.<suffix>)")
        parser.add_argument("--samp", action="store_true",
                            help="also send the table (VOTable) to the running SAMP hub: TOPCAT, Aladin")
    elif name == "similar":
        parser.add_argument("target", nargs="?", help="IAU name (4XMM J192719.5+653354), srcid or detid")
        parser.add_argument("-k", type=int, default=20, help="neighbours per query detection (default 20)")
        parser.add_argument("--spectrum", help="a pn source spectrum (OGIP PHA) to use as the query")
        parser.add_argument("--background", help="its background spectrum (default: BACKFILE)")
        parser.add_argument("--arf", help="its ARF (default: ANCRFILE)")
        parser.add_argument("--rmf", help="its RMF (default: RESPFILE)")
        parser.add_argument("--model", help="model artifact for --spectrum (default: the one embed used)")
        parser.add_argument("--include-same-source", action="store_true",
                            help="keep the target source's other detections among the neighbours")
        _add_format(parser)
    elif name == "outliers":
        parser.add_argument("-n", type=int, default=50, help="how many (default 50)")
        _add_format(parser)
    elif name == "trajectory":
        parser.add_argument("srcid", help="source id (or IAU name)")
        parser.add_argument("--plot", help="write the path over the latent map to this PNG")
        _add_format(parser)
    elif name == "show":
        parser.add_argument("detid", type=int, help="detection id")
        parser.add_argument("--plot", required=True, help="PNG to write: the spectrum and its reconstruction")
        parser.add_argument("--spectra", help="spectra folder (default: the one embed used)")
        parser.add_argument("--model", help="model artifact (default: the one embed used)")


def _add_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=["table", "csv", "json", "votable"], default="table",
                        help="output format (votable: units and UCDs, for TOPCAT and Aladin)")
    parser.add_argument("--out", help="write the output to this file instead of stdout")


def run(args: argparse.Namespace) -> int:
    handlers = {"embed": _embed, "similar": _similar, "outliers": _outliers, "trajectory": _trajectory,
                "show": _show, "evaluate": _evaluate, "export": _export}
    return handlers[args.command](args)


def _print(frame, fmt: str, out: str | None = None, name: str = "xmm_pipeline") -> None:
    """The table of a latent command as text (readable dates and counts), CSV, JSON or a VOTable with
    units and UCDs; on stdout, or atomically into `out`."""
    if fmt == "votable":
        from xmm_pipeline.latent.export import table_from_frame, votable_bytes

        text = votable_bytes(table_from_frame(frame, name)).decode("utf-8")
    elif fmt == "csv":
        text = frame.to_csv(index=False)
    elif fmt == "json":
        text = frame.to_json(orient="records", indent=1) + "\n"
    else:
        text = (_readable(frame).to_string(index=False, float_format=lambda v: f"{v:.4g}") if len(frame)
                else "(none)") + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    from xmm_pipeline.errors import UserError
    from xmm_pipeline.storage import write_bytes_atomic

    try:
        write_bytes_atomic(out, text.encode("utf-8"))
    except OSError as error:
        raise UserError(f"{out}: cannot write ({error.strerror})") from None
    print(f"{len(frame)} rows written to {out}", file=sys.stderr)


def _readable(frame):
    """For the text table: MJDs as calendar dates (dropped beside an obs_date), counts as integers."""
    frame = frame.copy()
    for column in [c for c in frame.columns if MJD_COLUMN.search(str(c))]:
        dated = MJD_COLUMN.sub(lambda m: f"{m[1]}date{m[2]}", str(column))
        if dated == "date" and "obs_date" in frame:
            frame = frame.drop(columns=column)
            continue
        frame[column] = _obs_date(frame[column].to_numpy()).to_numpy()
        frame = frame.rename(columns={column: "obs_date" if dated == "date" else dated})
    for column in [c for c in COUNT_COLUMNS if c in frame]:
        frame[column] = frame[column].round().astype("Int64")
    return frame


def _obs_date(mjd):
    import pandas as pd

    stamps = pd.Timestamp("1858-11-17") + pd.to_timedelta(pd.Series(mjd, dtype="float64"), unit="D")
    return stamps.dt.strftime("%Y-%m-%d").fillna("")


def resolve_target(embeddings, target: str):
    from xmm_pipeline.latent.query import resolve_target as resolve

    return resolve(embeddings, target)


def _neighbour_table(embeddings, classes, latent_index, query_vectors, query_labels, exclude, k: int):
    from xmm_pipeline.latent.query import neighbour_table

    return neighbour_table(embeddings, classes, latent_index, query_vectors, query_labels, exclude, k)


def _embed(args: argparse.Namespace) -> int:
    from xmm_pipeline.cli.paths import writable_folder
    from xmm_pipeline.latent.build import embed_and_build
    from xmm_pipeline.progress import Progress

    writable_folder(args.out, "--out")
    with Progress("embed", "spectra") as progress:
        summary = embed_and_build(args.spectra, args.model, args.out, archive_dir=args.archive,
                                  tap_url=args.simbad_url, radius_arcsec=args.radius, force=args.force,
                                  progress=progress)
    state = "up to date, nothing to do" if summary.skipped else "written"
    print(f"{summary.n_detections} detections embedded with model {summary.model_version}: {state}")
    for label, path in summary.written.items():
        print(f"  {label:18s} {path}")
    return 0


def _similar(args: argparse.Namespace) -> int:
    from xmm_pipeline.errors import UserError
    from xmm_pipeline.latent.build import LatentLayout

    if args.k < 1:
        raise UserError(f"-k must be >= 1, got {args.k}")
    if (args.target is None) == (args.spectrum is None):
        raise UserError("give either a TARGET (IAU name, srcid, detid) or --spectrum FILE")
    layout = LatentLayout(Path(args.latent))
    embeddings = layout.read_embeddings()
    latent_index = layout.load_index()
    classes = layout.read_classes()
    if args.spectrum is not None:
        vectors, labels, deviance = _encode_user_spectrum(args, layout)
        exclude: list[set[int]] = [set()]
        if "deviance_per_dof" in embeddings:
            from xmm_pipeline.latent.fit_quality import fit_quality

            fit = fit_quality(deviance, embeddings["deviance_per_dof"].to_numpy())
            for line in (fit.line(), fit.warning()):
                if line:
                    print(line, file=sys.stderr)
        else:
            print(f"fit: deviance/dof {deviance:.4g} (the latent map carries no deviances to compare with)",
                  file=sys.stderr)
    else:
        from xmm_pipeline.latent.embed import latent_matrix

        rows = resolve_target(embeddings, args.target).sort_values("mjd")
        vectors = latent_matrix(rows)
        labels = [f"{d} ({s})" for d, s in zip(rows["detid"], _obs_date(rows["mjd"].to_numpy()))]
        if args.include_same_source:
            exclude = [{int(d)} for d in rows["detid"]]
        else:
            same_source = set(embeddings.loc[embeddings["srcid"].isin(rows["srcid"]), "detid"].tolist())
            exclude = [same_source] * len(rows)
    _print(_neighbour_table(embeddings, classes, latent_index, vectors, labels, exclude, args.k), args.format,
           args.out, "similar")
    return 0


def _encode_user_spectrum(args: argparse.Namespace, layout):
    """(latent mean [1, D], label, deviance/dof of the model's reconstruction) of the --spectrum file."""
    from xmm_pipeline.errors import UserError
    from xmm_pipeline.model.train import load_artifact
    from xmm_pipeline.spectra.preprocess import spectrum_to_dataset

    model_dir = args.model or layout.read_manifest().get("model_dir")
    if not model_dir:
        raise UserError("--spectrum needs --model (no model recorded in the latent folder's manifest)")
    artifact = load_artifact(model_dir)
    if not Path(args.spectrum).is_file():
        raise UserError(f"spectrum file not found: {args.spectrum}")
    dataset = spectrum_to_dataset(args.spectrum, args.background, args.arf, args.rmf, grid=artifact.grid)
    mu, _ = artifact.encode(dataset)
    return mu, [Path(args.spectrum).name], float(artifact.deviance_per_dof(dataset)[0])


def _outliers(args: argparse.Namespace) -> int:
    import pandas as pd

    from xmm_pipeline.errors import UserError
    from xmm_pipeline.latent.build import LatentLayout

    layout = LatentLayout(Path(args.latent))
    if not layout.outliers.is_file():
        raise UserError(f"{layout.outliers}: no outlier scores; run `xmm-pipeline embed` first")
    if args.n < 1:
        raise UserError(f"-n must be >= 1, got {args.n}")
    frame = pd.read_parquet(layout.outliers).head(args.n)
    classes = layout.read_classes()
    if classes is not None:
        frame["class"] = frame["detid"].map(classes.set_index("detid")["class"]).fillna("unknown")
    if "mjd" in frame:
        frame.insert(frame.columns.get_loc("mjd"), "obs_date", _obs_date(frame["mjd"].to_numpy()).to_numpy())
    if args.format != "table" and layout.embeddings.is_file():  # positions for TOPCAT, Aladin, scripts
        import pyarrow.parquet as pq

        wanted = [c for c in ("ra", "dec") if c in pq.read_schema(layout.embeddings).names]
        positions = pd.read_parquet(layout.embeddings, columns=["detid", *wanted]).set_index("detid")
        at = frame.columns.get_loc("iauname") + 1 if "iauname" in frame else 1
        for offset, column in enumerate(wanted):
            frame.insert(at + offset, column, positions[column].reindex(frame["detid"]).to_numpy())
    _print(frame, args.format, args.out, "outliers")
    return 0


def _trajectory(args: argparse.Namespace) -> int:
    from xmm_pipeline.cli.paths import writable_file
    from xmm_pipeline.errors import UserError
    from xmm_pipeline.latent.build import LatentLayout
    from xmm_pipeline.latent.embed import latent_columns
    from xmm_pipeline.latent.products import plot_trajectories, trajectory_points

    if args.plot:
        writable_file(args.plot, "--plot")
    layout = LatentLayout(Path(args.latent))
    embeddings = layout.read_embeddings()
    srcids = resolve_target(embeddings, args.srcid)["srcid"].unique()
    if len(srcids) != 1:
        raise UserError(f"{args.srcid} names {len(srcids)} sources; give one srcid")
    points = trajectory_points(embeddings, int(srcids[0]))
    columns = ["detid", "obs_id", "mjd", *latent_columns(points), "step", "cumulative_path",
               "deviance_per_dof"]
    table = points[[c for c in columns if c in points]].copy()
    table.insert(2, "obs_date", _obs_date(table["mjd"].to_numpy()).to_numpy())
    if args.plot:
        plot_trajectories(embeddings, [int(srcids[0])], args.plot, layout.read_classes())
    _print(table, args.format, args.out, f"trajectory_{int(srcids[0])}")
    if args.plot:
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    from xmm_pipeline.cli.paths import writable_file
    from xmm_pipeline.errors import UserError
    from xmm_pipeline.latent.build import LatentLayout
    from xmm_pipeline.latent.products import plot_reconstruction
    from xmm_pipeline.model.train import load_artifact
    from xmm_pipeline.spectra.dataset import load_dataset

    writable_file(args.plot, "--plot")
    layout = LatentLayout(Path(args.latent))
    manifest = layout.read_manifest()
    spectra_dir = args.spectra or manifest.get("spectra_dir")
    model_dir = args.model or manifest.get("model_dir")
    if not spectra_dir or not model_dir:
        raise UserError("show needs --spectra and --model (none recorded in the latent folder's manifest)")
    embeddings = layout.read_embeddings()
    row = embeddings[embeddings["detid"] == args.detid]
    if row.empty:
        raise UserError(f"no detection {args.detid} in the embeddings")
    dataset = load_dataset(spectra_dir, obs_ids=[str(row["obs_id"].iloc[0])])
    matches = (dataset.meta["detid"] == args.detid).to_numpy().nonzero()[0]
    if len(matches) == 0:
        raise UserError(f"detection {args.detid} not found in {spectra_dir}")
    one = dataset.subset(matches[:1])
    artifact = load_artifact(model_dir)
    expected = artifact.reconstruct(one)[0]
    deviance = float(artifact.deviance_per_dof(one, expected[None])[0])
    name = str(one.meta["iauname"].iloc[0]) if "iauname" in one.meta else str(args.detid)
    title = f"{name}  detid {args.detid}  obs {row['obs_id'].iloc[0]}  deviance/dof {deviance:.2f}"
    plot_reconstruction(one.grid.edges_kev, one.counts[0], one.background[0], expected, args.plot, title,
                        valid=one.valid[0])
    print(f"{title}\nplot written to {args.plot}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from xmm_pipeline.errors import UserError
    from xmm_pipeline.latent.evaluate import write_evaluation_report

    try:
        dims = [] if args.skip_latent_dims else [int(d) for d in args.latent_dims.split(",") if d.strip()]
    except ValueError as error:
        raise UserError(f"--latent-dims must be integers separated by commas, got {args.latent_dims!r}") \
            from error
    report = write_evaluation_report(args.archive, args.spectra, args.model, args.out, latent_dims=dims,
                                     max_epochs=args.epochs, work_dir=args.work, training_seeds=args.seeds)
    print(f"evaluation written to {report}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from xmm_pipeline.errors import UserError
    from xmm_pipeline.latent import export

    suffix_format = EXPORT_SUFFIXES.get(Path(args.out).suffix.lower()) if args.out else None
    fmt = args.format or suffix_format or "votable"
    if args.samp and fmt != "votable":
        raise UserError(f"--samp sends a VOTable; use --format votable (not {fmt})")
    out = Path(args.out) if args.out else Path(args.latent) / f"latent_catalogue{export.SUFFIXES[fmt]}"
    frame = export.latent_catalogue(args.latent)
    description = (f"XMM-Newton EPIC-pn latent catalogue of {Path(args.latent).resolve()}: one row per "
                   f"detection, model {frame.attrs.get('model_version', '')}")
    with export.samp_sender() if args.samp else nullcontext() as send:
        export.write_table(export.table_from_frame(frame, "latent_catalogue", description), out, fmt)
        print(f"{len(frame)} detections written to {out} ({fmt})")
        if send is not None:
            print(f"sent over SAMP to {', '.join(send(out, 'latent_catalogue'))}")
    return 0
