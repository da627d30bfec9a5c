"""Latent search benchmark: the project's FAISS index against brute-force numpy and scipy's cKDTree.

    .venv/bin/python benchmarks/bench_search.py --n 1000000 --dim 2
    .venv/bin/python benchmarks/bench_search.py --spectra DIR --model DIR [--copies 20]  # + embedding

Vectors: a mixture of 20 Gaussian clusters of different widths (the shape of a trained latent space).
Queries: indexed vectors jittered by 5% of the spread (new spectra near known ones). Reports index build
time, batched queries/s and recall@10 against exact search, single-query p50/p99 latency, and, with
--spectra/--model, end-to-end embedding throughput (Parquet spectra in, embeddings Parquet out).
All libraries are held to --threads threads so the comparison is like for like.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def clustered_vectors(n_rows: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (20, dim))
    widths = rng.uniform(0.1, 0.8, 20)
    member = rng.integers(0, 20, n_rows)
    return (centres[member] + rng.normal(0, 1, (n_rows, dim)) * widths[member, None]).astype(np.float32)


def numpy_knn(data: np.ndarray, queries: np.ndarray, k: int, batch: int = 16) -> np.ndarray:
    """Exact k-NN distances by brute force: squared norms expansion, argpartition per row."""
    data = data.astype(np.float64)
    data_sq = np.einsum("ij,ij->i", data, data)
    out = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), batch):
        q = queries[start:start + batch].astype(np.float64)
        squared = data_sq[None, :] - 2.0 * (q @ data.T) + np.einsum("ij,ij->i", q, q)[:, None]
        part = np.argpartition(squared, k, axis=1)[:, :k]
        nearest = np.take_along_axis(squared, part, axis=1)
        out[start:start + batch] = np.sqrt(np.maximum(np.sort(nearest, axis=1), 0))
    return out


def replicated_spectra(spectra_dir: Path, copies: int, out_dir: Path) -> Path:
    """A spectra folder holding `copies` copies of every observation file (detids and obs_ids made
    unique), so the throughput is measured at a size the session's archive does not reach."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    (out_dir / "spectra").mkdir(parents=True)
    shutil.copyfile(spectra_dir / "responses.parquet", out_dir / "responses.parquet")
    for path in sorted((spectra_dir / "spectra").glob("*.parquet")):
        table = pq.read_table(path)
        for copy in range(copies):
            detid = pa.compute.add(table["detid"], pa.scalar(copy * 10**16, pa.int64()))
            obs_id = pa.array([f"{copy:02d}{o[2:]}" for o in table["obs_id"].to_pylist()])
            renamed = table.set_column(table.schema.get_field_index("detid"), "detid", detid)
            renamed = renamed.set_column(renamed.schema.get_field_index("obs_id"), "obs_id", obs_id)
            pq.write_table(renamed, out_dir / "spectra" / f"{copy:02d}{path.stem[2:]}.parquet")
    return out_dir


def embedding_throughput(spectra_dir: str, model_dir: str, threads: int, copies: int) -> str:
    import torch

    from xmm_pipeline.latent.embed import embed_dataset, write_embeddings
    from xmm_pipeline.model.train import load_artifact
    from xmm_pipeline.spectra.dataset import load_dataset

    torch.set_num_threads(threads)
    artifact = load_artifact(model_dir)
    scratch = tempfile.TemporaryDirectory()
    if copies > 1:
        spectra_dir = replicated_spectra(Path(spectra_dir), copies, Path(scratch.name) / "spectra")
    start = time.perf_counter()
    dataset = load_dataset(spectra_dir)
    loaded = time.perf_counter()
    frame = embed_dataset(artifact, dataset)
    encoded = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_embeddings(frame, Path(tmp) / "embeddings.parquet")
    done = time.perf_counter()
    scratch.cleanup()
    total = done - start
    rate = len(frame) / total
    return (f"embedding end to end: {len(frame)} spectra in {total:.2f} s = {rate:.0f} spectra/s "
            f"(read {loaded - start:.2f} s, encode + reconstruct + deviance {encoded - loaded:.2f} s, "
            f"write {done - encoded:.2f} s), latent dim {artifact.config.latent_dim}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="indexed vectors")
    parser.add_argument("--dim", type=int, default=2, help="latent dimension")
    parser.add_argument("--queries", type=int, default=10_000, help="batched queries (index, cKDTree)")
    parser.add_argument("--numpy-queries", type=int, default=200, help="queries for brute-force numpy")
    parser.add_argument("--single", type=int, default=2_000, help="single queries for the latency figures")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spectra", help="spectra folder for the embedding throughput")
    parser.add_argument("--model", help="model artifact for the embedding throughput")
    parser.add_argument("--copies", type=int, default=1, help="replicate the spectra this many times")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import faiss
    from scipy.spatial import cKDTree

    from xmm_pipeline.latent.search import build_index, recall_at_k

    faiss.omp_set_num_threads(args.threads)
    k = args.k
    data = clustered_vectors(args.n, args.dim, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    rows = rng.choice(args.n, args.queries, replace=False)
    jitter = rng.normal(0, 1, (args.queries, args.dim)) * 0.05 * data.std(axis=0)
    queries = (data[rows] + jitter).astype(np.float32)
    cpu = platform.processor() or platform.machine()
    print(f"# {args.n:,} vectors, dim {args.dim}, k={k}, {args.threads} thread(s), {cpu}, "
          f"{os.cpu_count()} cores visible, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")

    start = time.perf_counter()
    index = build_index(data, np.arange(args.n, dtype=np.int64) + 10**12, seed=args.seed)
    build_s = time.perf_counter() - start
    info = index.info
    print(f"index: {info.kind}, nlist {info.nlist}, nprobe {info.nprobe}, build {build_s:.1f} s "
          f"(incl. the recall check: {info.recall_at_k:.4f} on 2000 jittered queries)")

    exact = faiss.IndexFlatL2(args.dim)
    exact.add(data)
    start = time.perf_counter()
    exact_squared, _ = exact.search(queries, k)
    flat_s = time.perf_counter() - start
    exact_distances = np.sqrt(np.maximum(exact_squared, 0))

    start = time.perf_counter()
    found, _ = index.search(queries, k)
    index_s = time.perf_counter() - start
    recall = recall_at_k(found, exact_distances)

    start = time.perf_counter()
    tree = cKDTree(data)
    tree_build_s = time.perf_counter() - start
    start = time.perf_counter()
    tree_distances, _ = tree.query(queries, k, workers=args.threads)
    tree_s = time.perf_counter() - start
    tree_recall = recall_at_k(tree_distances, exact_distances)

    nq = min(args.numpy_queries, args.queries)
    start = time.perf_counter()
    numpy_distances = numpy_knn(data, queries[:nq], k)
    numpy_s = time.perf_counter() - start
    numpy_recall = recall_at_k(numpy_distances, exact_distances[:nq])

    latencies = []
    for q in queries[: args.single]:
        t0 = time.perf_counter()
        index.search(q[None, :], k)
        latencies.append(time.perf_counter() - t0)
    p50, p99 = np.percentile(np.asarray(latencies) * 1e3, [50, 99])

    qps = {name: n / s for name, n, s in (("index", args.queries, index_s), ("flat", args.queries, flat_s),
                                          ("ckdtree", args.queries, tree_s), ("numpy", nq, numpy_s))}
    print(f"{'method':34s} {'queries/s':>12s} {'recall@10':>10s}")
    print(f"{'project index (' + index.info.kind + ')':34s} {qps['index']:12,.0f} {recall:10.4f}")
    print(f"{'faiss IndexFlatL2 (exact, batched)':34s} {qps['flat']:12,.0f} {1.0:10.4f}")
    tree_label = f"scipy cKDTree (build {tree_build_s:.1f} s)"
    print(f"{tree_label:34s} {qps['ckdtree']:12,.0f} {tree_recall:10.4f}")
    print(f"{'numpy brute force':34s} {qps['numpy']:12,.0f} {numpy_recall:10.4f}")
    print(f"single query through LatentIndex.search: p50 {p50:.3f} ms, p99 {p99:.3f} ms")
    print(f"RESULT search n={args.n} dim={args.dim} kind={index.info.kind} build_s={build_s:.1f} "
          f"qps={qps['index']:.0f} recall10={recall:.4f} vs_numpy={qps['index'] / qps['numpy']:.0f}x "
          f"vs_ckdtree={qps['index'] / qps['ckdtree']:.2f}x vs_flat={qps['index'] / qps['flat']:.1f}x "
          f"p50_ms={p50:.3f} p99_ms={p99:.3f}")
    if args.spectra and args.model:
        print("RESULT " + embedding_throughput(args.spectra, args.model, args.threads, args.copies))
    else:
        print("(embedding throughput skipped: pass --spectra DIR --model DIR)")


if __name__ == "__main__":
    main()
