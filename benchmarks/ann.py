"""Exact vs approximate FAISS indexes on synthetic clustered unit vectors: build time, index size,
single-query latency and recall@10 against exact search.

The vectors are a Gaussian mixture on the sphere, like photo embeddings: 1,000 topics of Zipf-like
popularity (a few big ones, many small), each photo its topic's direction plus noise, cosine to its
centre about 0.8. Uniform random vectors would be the worst case for every approximate index (no
structure to exploit: every query's neighbours are nearly as far as everything else) and no photo
collection looks like that. Queries come from the same mixture but are not in the index.

Exact and IVF indexes are built by `cliptune.deploy.vector_index.build_faiss_index`, as `cliptune index`
builds them; HNSW with its settings (M, efConstruction) but added 50,000 vectors at a time, so that a
build running longer than --hnsw-limit-s can be given up (its row says so).

    python benchmarks/ann.py                      # N = 10k, 100k, 1M, 512-d, 1,000 queries (many minutes)
    python benchmarks/ann.py --short              # N = 2k, 5k, 100 queries: seconds (tests/test_index.py)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from cliptune.deploy.vector_index import AnnSettings, build_faiss_index, ivf_lists

TOPICS = 1000
LATENCY_QUERIES = 200
SPREAD = 0.75  # noise norm relative to the unit centre: cosine to the centre 1 / sqrt(1 + 0.75^2) = 0.8


def clustered_unit_vectors(n: int, dim: int, seed: int, centres_seed: int = 0,
                           chunk: int = 100_000) -> np.ndarray:
    """(n, dim) float32 L2-normalised: a mixture of TOPICS Gaussians around unit centres (the same
    centres for every `seed`), topic k drawn with weight proportional to 1 / (k + 10)."""
    centres = np.random.default_rng(centres_seed).standard_normal((TOPICS, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / (np.arange(TOPICS) + 10.0)
    rng = np.random.default_rng(seed)
    topics = rng.choice(TOPICS, size=n, p=weights / weights.sum())
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):  # a chunk at a time: the noise of 1M x 512 at once would double the memory
        stop = min(start + chunk, n)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * np.float32(SPREAD / np.sqrt(dim))
        block = centres[topics[start:stop]] + noise
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def index_bytes(index) -> int:
    """What the index takes written to disk (vectors, lists, links), without a second copy in memory."""
    import faiss

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "index.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path)


def query_p50_ms(index, queries: np.ndarray, k: int = 10) -> float:
    """Median time of one query at a time, on one thread: how a server answers a user. (With OpenMP's
    threads on a busy machine, a 10k flat query measured 36 ms of waiting for threads, not 1 ms of work.)
    Over at most LATENCY_QUERIES queries: an exact query over 1M vectors reads 2 GB."""
    queries = queries[:LATENCY_QUERIES]
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        times = []
        for row in range(len(queries)):
            start = time.perf_counter()
            index.search(queries[row:row + 1], k)
            times.append(time.perf_counter() - start)
    finally:
        faiss.omp_set_num_threads(threads)
    return 1000 * float(np.median(times))


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found top-k ∩ true top-k| / k."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def build_hnsw_within(base: np.ndarray, settings: AnnSettings, limit_s: float, chunk: int = 50_000):
    """(index, seconds, rows added): HNSW built by adding `chunk` rows at a time, stopped once past `limit_s`."""
    import faiss

    index = faiss.IndexHNSWFlat(base.shape[1], settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = settings.ef_construction
    start = time.perf_counter()
    for row in range(0, len(base), chunk):
        index.add(base[row:row + chunk])
        print(f"hnsw: {index.ntotal:,} of {len(base):,} added, {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)
        if time.perf_counter() - start > limit_s and row + chunk < len(base):
            return None, time.perf_counter() - start, index.ntotal
    return index, time.perf_counter() - start, index.ntotal


def bench_size(n: int, dim: int, n_queries: int, nprobes: list[int], ef_searches: list[int],
               hnsw_limit_s: float, kinds: set[str]) -> list[dict]:
    """The rows for N = n, for the index `kinds` (exact is always built: it gives the true top 10)."""
    base = clustered_unit_vectors(n, dim, seed=1)
    queries = clustered_unit_vectors(n_queries, dim, seed=2)
    rows = []

    start = time.perf_counter()
    exact = build_faiss_index(base, AnnSettings())
    build_s = time.perf_counter() - start
    truth = exact.search(queries, 10)[1]
    if "exact" in kinds:
        rows.append({"n": n, "index": "exact (flat)", "params": "", "build_s": build_s,
                     "bytes": index_bytes(exact), "p50_ms": query_p50_ms(exact, queries),
                     "recall": recall_at(truth, truth)})
    del exact
    if "ivf" in kinds:
        rows += _ivf_rows(n, base, queries, truth, nprobes)
    if "hnsw" in kinds:
        rows += _hnsw_rows(n, base, queries, truth, ef_searches, hnsw_limit_s)
    return rows


def _ivf_rows(n: int, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, nprobes: list[int]) -> list[dict]:
    rows, start = [], time.perf_counter()
    ivf = build_faiss_index(base, AnnSettings("ivf"))
    build_s, size = time.perf_counter() - start, index_bytes(ivf)
    for nprobe in nprobes:
        ivf.nprobe = min(nprobe, ivf.nlist)
        rows.append({"n": n, "index": "IVF", "params": f"nlist {ivf.nlist}, nprobe {ivf.nprobe}",
                     "build_s": build_s, "bytes": size, "p50_ms": query_p50_ms(ivf, queries),
                     "recall": recall_at(ivf.search(queries, 10)[1], truth)})
    return rows


def _hnsw_rows(n: int, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, ef_searches: list[int],
               hnsw_limit_s: float) -> list[dict]:
    rows, settings = [], AnnSettings("hnsw")
    hnsw, build_s, added = build_hnsw_within(base, settings, hnsw_limit_s)
    if hnsw is None:
        return [{"n": n, "index": "HNSW", "params": f"M {settings.hnsw_m}, efConstruction "
                 f"{settings.ef_construction}", "skipped": f"build stopped after {build_s:.0f} s with "
                 f"{added:,} of {n:,} vectors added (limit {hnsw_limit_s:.0f} s)"}]
    size = index_bytes(hnsw)
    for ef in ef_searches:
        hnsw.hnsw.efSearch = ef
        rows.append({"n": n, "index": "HNSW", "params": f"M {settings.hnsw_m}, efConstruction "
                     f"{settings.ef_construction}, efSearch {ef}", "build_s": build_s, "bytes": size,
                     "p50_ms": query_p50_ms(hnsw, queries),
                     "recall": recall_at(hnsw.search(queries, 10)[1], truth)})
    return rows


def format_row(row: dict) -> str:
    if "skipped" in row:
        return f"| {row['n']:,} | {row['index']} | {row['params']} | {row['skipped']} | | | |"
    return (f"| {row['n']:,} | {row['index']} | {row['params']} | {row['build_s']:.1f} | "
            f"{row['bytes'] / 2**20:.1f} | {row['p50_ms']:.3f} | {row['recall']:.3f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated N")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--nprobe", default="8,32,128", help="IVF nprobe values to measure")
    parser.add_argument("--ef-search", default="64,128", help="HNSW efSearch values to measure")
    parser.add_argument("--hnsw-limit-s", type=float, default=300.0, help="give up an HNSW build after this long")
    parser.add_argument("--kinds", default="exact,ivf,hnsw", help="which indexes to measure")
    parser.add_argument("--short", action="store_true", help="N = 2k and 5k, 100 queries: a quick check")
    args = parser.parse_args(argv)
    sizes = [2000, 5000] if args.short else [int(s) for s in args.sizes.split(",")]
    n_queries = 100 if args.short else args.queries
    import faiss

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")),
                 "?")
    print(f"CPU: {model}, {os.cpu_count()} cores, faiss {faiss.__version__}: builds on "
          f"{faiss.omp_get_max_threads()} threads, queries one at a time on 1; load average at start "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{args.dim}-d clustered unit vectors ({TOPICS} topics), k = 10: recall over {n_queries} queries, "
          f"p50 over {min(n_queries, LATENCY_QUERIES)}; "
          f"IVF nlist = 4 * sqrt(N) clipped (here {', '.join(str(ivf_lists(n)) for n in sizes)})")
    print("| N | index | params | build s | index MiB | query p50 ms | recall@10 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in sizes:
        for row in bench_size(n, args.dim, n_queries, [int(v) for v in args.nprobe.split(",")],
                              [int(v) for v in args.ef_search.split(",")], args.hnsw_limit_s,
                              set(args.kinds.split(","))):
            print(format_row(row), flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
