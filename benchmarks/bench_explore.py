"""Explorer benchmark: time from a click to the spectrum panel, at 10^5 and 10^6 detections.

    .venv/bin/python benchmarks/bench_explore.py --base data/latent --sizes 100000,1000000 [--browser]

The large folders are synthetic, made by replicating a real latent folder (--base, with the spectra
folder and model its manifest names): copy c of base row i keeps i's catalogue columns and class, moves
its latent mean by 2% of the spread (c > 0), and gets fresh detid and srcid and a place in a synthetic
observation of 7 detections (about the spectra per observation of a >300-count 4XMM sample). Embeddings,
FAISS index (IVF above 200,000 rows, as `embed` builds it) and outlier ranks are built for all N rows;
outlier scores are the base row's (the explorer only shows them). Spectra files are written only for the
observations a timed click reads (the clicked detection's and its neighbours'), each with all 7 of its
rows, so a click reads the same files as in a full folder; the rest of the folder never exists.

Timed per click (a new detection each time, k = 10 neighbours): server time (ExplorerData.detection
in-process: catalogue row, reconstruction as `show`, neighbour search, neighbour spectra), HTTP time
(GET /api/detection against uvicorn on 127.0.0.1, JSON included), and with --browser the page's time
from `pick(row)` (what a click on the map calls) to the spectrum, neighbour table and overlay drawn,
in headless Chromium. The first click (model load) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xmm_pipeline.explore.data import ExplorerData
from xmm_pipeline.latent.build import LatentLayout
from xmm_pipeline.latent.embed import latent_columns, latent_matrix, write_embeddings
from xmm_pipeline.latent.search import build_index, save_index
from xmm_pipeline.spectra.dataset import RESPONSES_FILE, SPECTRA_SUBDIR, spectra_files
from xmm_pipeline.storage import write_json_atomic, write_parquet_atomic

PER_OBSERVATION = 7
K = 10


def replicate(base: LatentLayout, n_rows: int, out: Path, seed: int = 0) -> LatentLayout:
    """A latent folder of n_rows detections made of jittered copies of the base folder's rows."""
    embeddings = base.read_embeddings()
    classes = base.read_classes()
    n_base = len(embeddings)
    source = np.arange(n_rows) % n_base
    copy = np.arange(n_rows) // n_base
    frame = embeddings.iloc[source].reset_index(drop=True)
    columns = latent_columns(embeddings)
    spread = latent_matrix(embeddings).std(axis=0)
    rng = np.random.default_rng(seed)
    jitter = rng.normal(0, 1, (n_rows, len(columns))) * 0.02 * spread * (copy > 0)[:, None]
    frame[columns] = frame[columns].to_numpy() + jitter.astype(np.float32)
    source_code = pd.factorize(frame["srcid"])[0]
    frame["srcid"] = 3_000_000_000_000_000 + copy * 1_000_000 + source_code
    frame["detid"] = 4_000_000_000_000_000 + np.arange(n_rows)
    frame["obs_id"] = [f"9{j // PER_OBSERVATION:09d}" for j in range(n_rows)]
    frame["src_num"] = np.arange(n_rows) % PER_OBSERVATION + 1
    frame["base_detid"] = embeddings["detid"].to_numpy()[source]
    layout = LatentLayout(out)
    out.mkdir(parents=True, exist_ok=True)
    write_embeddings(frame.drop(columns="base_detid"), layout.embeddings)
    frame[["detid", "base_detid", "obs_id", "src_num", "srcid"]].to_parquet(out / "replicas.parquet")
    start = time.perf_counter()
    index = build_index(latent_matrix(frame), frame["detid"].to_numpy())
    print(f"  index {index.info.kind} built in {time.perf_counter() - start:.1f} s")
    save_index(index, layout.index_dir)
    class_of = classes.set_index("detid")["class"].reindex(frame["base_detid"]).to_numpy()
    write_parquet_atomic(layout.classes, pd.DataFrame({"detid": frame["detid"], "srcid": frame["srcid"],
                                                       "class": class_of, "source": "truth"}))
    base_outliers = pd.read_parquet(base.outliers).set_index("detid")
    outliers = frame[["detid", "srcid", "iauname", "obs_id", "mjd"]].copy()
    for name in ("deviance_per_dof", "knn_mean_distance", "outlier_score"):
        outliers[name] = base_outliers[name].reindex(frame["base_detid"]).to_numpy()
    outliers = outliers.sort_values(["outlier_score", "detid"], ascending=[False, True])
    outliers.insert(0, "rank", np.arange(1, n_rows + 1))
    write_parquet_atomic(layout.outliers, outliers.reset_index(drop=True))
    manifest = base.read_manifest()
    spectra = out / "spectra"
    (spectra / SPECTRA_SUBDIR).mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(manifest["spectra_dir"]) / RESPONSES_FILE, spectra / RESPONSES_FILE)
    write_json_atomic(layout.manifest, {"n_detections": n_rows, "model_dir": manifest["model_dir"],
                                        "spectra_dir": str(spectra), "base": str(base.root)})
    return layout


def write_spectra(layout: LatentLayout, base_spectra: Path, rows: set[int]) -> int:
    """Spectra files of the synthetic observations holding these rows (all 7 rows of each)."""
    replicas = pd.read_parquet(layout.root / "replicas.parquet")
    base = pa.concat_tables([pq.read_table(f) for f in spectra_files(base_spectra)],
                            promote_options="default")
    position = pd.Index(base["detid"].to_numpy())
    observations = sorted({str(replicas["obs_id"].iloc[r]) for r in rows})
    folder = Path(layout.read_manifest()["spectra_dir"]) / SPECTRA_SUBDIR
    for obs_id in observations:
        members = replicas[replicas["obs_id"] == obs_id]
        table = base.take(pa.array(position.get_indexer(members["base_detid"].to_numpy())))
        for name in ("detid", "srcid", "src_num", "obs_id"):
            values = members[name].to_numpy()
            column = pa.array(values, type=table.schema.field(name).type)
            table = table.set_column(table.schema.get_field_index(name), name, column)
        pq.write_table(table, folder / f"{obs_id}.parquet")
    return len(observations)


def neighbour_rows(data: ExplorerData, row: int) -> set[int]:
    srcid = data.embeddings["srcid"].iloc[row]
    same = set(data.detids[data.embeddings["srcid"].to_numpy() == srcid].tolist())
    table = data.neighbours(latent_matrix(data.embeddings.iloc[[row]])[0], same, K, "q")
    return {row, *table["row"].tolist()}


def serve(data: ExplorerData) -> tuple[str, object]:
    import uvicorn

    from xmm_pipeline.explore.app import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(create_app(data), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def browser_times(url: str, rows: list[int]) -> tuple[float, list[float], list[float]]:
    """Map load time, and per pick: (fetch + JSON) ms and total ms to everything drawn."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1500,1000", f"--user-data-dir={tempfile.mkdtemp(prefix='bench-chromium-')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        start = time.perf_counter()
        driver.get(url + "/")
        while not driver.execute_script("return document.body.dataset.ready === '1'"):
            time.sleep(0.05)
        map_s = time.perf_counter() - start
        server_ms, total_ms = [], []
        for row in rows:
            timing = driver.execute_async_script(
                "const done = arguments[arguments.length - 1];"
                f"window.explorer.pick({row}).then(() => done(window.explorer.state.timings.last_pick));")
            server_ms.append(timing["server_ms"])
            total_ms.append(timing["total_ms"])
        return map_s, server_ms, total_ms
    finally:
        driver.quit()


def summary(values: list[float]) -> str:
    return f"median {np.median(values):.0f} ms, p90 {np.percentile(values, 90):.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True,
                        help="latent folder to replicate (its manifest names the spectra and model)")
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--clicks", type=int, default=15)
    parser.add_argument("--browser", action="store_true", help="also time the page in headless Chromium")
    parser.add_argument("--work", help="folder for the synthetic latent folders (default: a temporary one)")
    args = parser.parse_args()
    base = LatentLayout(Path(args.base))
    base_spectra = Path(base.read_manifest()["spectra_dir"])
    print(f"{platform.node()} {platform.machine()}, python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; base {base.root} "
          f"({len(base.read_embeddings())} detections)")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-explore-"))
    for n_rows in [int(s) for s in args.sizes.split(",")]:
        print(f"N = {n_rows:,}")
        start = time.perf_counter()
        layout = replicate(base, n_rows, work / f"latent_{n_rows}")
        print(f"  synthetic folder in {time.perf_counter() - start:.1f} s")
        rng = np.random.default_rng(n_rows)
        rows = [int(r) for r in rng.choice(n_rows, args.clicks + 1, replace=False)]
        probe = ExplorerData(layout.root)
        needed = set().union(*(neighbour_rows(probe, r) for r in rows))
        print(f"  {write_spectra(layout, base_spectra, needed)} observation files written for the clicks")
        start = time.perf_counter()
        data = ExplorerData(layout.root)
        print(f"  open the folder: {time.perf_counter() - start:.2f} s")
        timings = []
        for row in rows:
            start = time.perf_counter()
            detail = data.detection(row, K)
            timings.append(1000 * (time.perf_counter() - start))
            assert "spectrum" in detail and len(detail["neighbours"]) == K, detail.get("spectrum_error")
        print(f"  first click {timings[0]:.0f} ms (model load); server: {summary(timings[1:])}")
        data = ExplorerData(layout.root)
        data.detection(rows[0], K)
        url, server = serve(data)
        http = []
        for row in rows[1:]:
            start = time.perf_counter()
            with urllib.request.urlopen(f"{url}/api/detection?row={row}&k={K}") as response:
                json.loads(response.read())
            http.append(1000 * (time.perf_counter() - start))
        print(f"  HTTP /api/detection (fresh server, spectra not cached): {summary(http)}")
        if args.browser:
            map_s, fetch_ms, total_ms = browser_times(url, rows[1:])
            print(f"  browser: map of {n_rows:,} points drawn in {map_s:.1f} s; pick -> spectrum, neighbours "
                  f"and overlay drawn {summary(total_ms)} (of which fetch + JSON {summary(fetch_ms)}; "
                  "spectra cached by the HTTP pass)")
        server.should_exit = True
        time.sleep(0.5)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
