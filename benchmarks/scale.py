"""Time and peak memory of retrieval evaluation and of an exact FAISS index as the collection grows.

    python benchmarks/scale.py [--markdown] [--out FILE]   # about an hour on 2 cores (100k x 500k, 1M vectors)
    python benchmarks/scale.py --short                     # tiny sizes, seconds (what the tests run)
    python benchmarks/scale.py --parts index --threads 1   # only the index cases, one thread

Embeddings are synthetic: L2-normalised Gaussian image vectors (D=512) and, for each image, 5 captions
that are the image's vector plus Gaussian noise, renormalised, so recalls are neither 0 nor 100 %.
Cost does not depend on the values, only on the shapes.

- metric: `cliptune.evaluation.metrics.retrieval_metrics` (default chunk_size) on N images x 5N
  captions, N = 1k, 5k (COCO 5K: 5,000 images x 25,000 captions), 10k, 100k: wall and CPU time and
  the peak memory the call adds on top of its inputs. At the sanity size (1k) the six recalls are
  checked against a brute-force numpy computation on the full float64 similarity matrix (an assertion).
- index: faiss `IndexFlatIP` (exact inner product = cosine on unit vectors) over N image vectors,
  N = 1k, 5k, 10k, 100k, 1M: build time and peak memory added, index bytes, top-10 query latency p50
  for single queries (up to 200) and for a batch of 1,000 queries (up to 3 batches), each within 30 s.

Peak memory: every case runs in a fresh Python process, so no case reuses memory another freed.
Right before the measured call the process returns freed heap pages to the OS (glibc malloc_trim)
and writes "5" to /proc/self/clear_refs, which resets its peak resident set size (VmHWM) to the
current one; after the call, VmHWM minus the RSS before is the most memory the call added, every
page counted whoever allocated it (torch, MKL, faiss, numpy), with no sampling gap. The inputs exist
before the call and are listed apart ("embeddings_bytes"). Where /proc/self/clear_refs is missing
(not Linux) the peak is reported as null.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DIM = 512
CAPTIONS_PER_IMAGE = 5
# Per-coordinate noise added to an image vector to make its captions: the matched cosine is about
# 1 / sqrt(1 + DIM * noise^2) = 0.15, against a spread of about 0.044 for unrelated pairs: R@1 near
# COCO-like levels (tens of percent) rather than 0 or 100.
CAPTION_NOISE = 0.3
TOP_K = 10
PARTS = ("metric", "index")
SEED = 0
GENERATION_BLOCK = 65_536  # rows generated/normalised at a time: bounded temporaries at 1M rows


@dataclass(frozen=True)
class Plan:
    metric_cases: tuple[tuple[str, int], ...]  # (name, images)
    index_sizes: tuple[int, ...]
    sanity_images: int          # the metric case checked against brute-force numpy
    single_queries: int         # at most this many timed one at a time (at least 20); p50 reported
    batch_queries: int          # queries in the timed batch
    batch_repeats: int          # at most this many timed batches (at least 1); p50 reported
    budget_s: float             # stop repeating single queries, and batches, after this long


FULL = Plan(metric_cases=(("1k", 1_000), ("COCO 5K", 5_000), ("10k", 10_000), ("100k", 100_000)),
            index_sizes=(1_000, 5_000, 10_000, 100_000, 1_000_000), sanity_images=1_000,
            single_queries=200, batch_queries=1_000, batch_repeats=3, budget_s=30.0)
SHORT = Plan(metric_cases=(("200", 200),), index_sizes=(200, 2_000), sanity_images=200,
             single_queries=20, batch_queries=100, batch_repeats=2, budget_s=1.0)


# -- synthetic embeddings ---------------------------------------------------------------------------


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    """In place, a block of rows at a time (np.linalg.norm over all rows would copy 2 GB at 1M)."""
    for start in range(0, len(x), GENERATION_BLOCK):
        block = x[start:start + GENERATION_BLOCK]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return x


def synthetic_images(n_images: int, seed: int = SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return _normalise_rows(rng.standard_normal((n_images, DIM), dtype=np.float32))


def synthetic_captions(images: np.ndarray, image_ids: np.ndarray, seed: int = SEED + 1) -> np.ndarray:
    """(len(image_ids), DIM) unit vectors: image_ids[t]'s vector plus noise."""
    rng = np.random.default_rng(seed)
    captions = np.empty((len(image_ids), images.shape[1]), dtype=np.float32)
    for start in range(0, len(image_ids), GENERATION_BLOCK):
        rows = image_ids[start:start + GENERATION_BLOCK]
        noise = rng.standard_normal((len(rows), images.shape[1]), dtype=np.float32)
        captions[start:start + len(rows)] = images[rows] + CAPTION_NOISE * noise
    return _normalise_rows(captions)


# -- peak memory ------------------------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) * 1024


@dataclass(frozen=True)
class Measurement:
    result: Any
    seconds: float            # wall clock
    cpu_seconds: float        # this process's CPU time, all threads: what the work costs, busy machine or not
    peak_bytes: int | None    # peak resident memory the call added; None where it cannot be measured


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim), so that memory the set-up freed but
    kept resident is not counted as "already there" when the measured call reuses it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to release, the peak may read low
        pass


def measure(call: Any) -> Measurement:
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
        before: int | None = _status_bytes("VmRSS")
    except OSError:
        before = None
    start, start_cpu = time.perf_counter(), time.process_time()
    result = call()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    return Measurement(result, seconds, cpu_seconds, None if before is None else _status_bytes("VmHWM") - before)


def repeat_timed(call: Any, at_most: int, at_least: int, budget_s: float) -> tuple[list[float], list[float], Any]:
    """Wall and CPU seconds of `call(i)` repeated `at_most` times, or fewer (not under `at_least`) once
    `budget_s` is spent (a 1M-vector batch takes seconds, a 1k single query microseconds); and the
    last call's result."""
    walls: list[float] = []
    cpus: list[float] = []
    result = None
    started = time.perf_counter()
    while len(walls) < at_most and (len(walls) < at_least or time.perf_counter() - started < budget_s):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = call(len(walls))
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    return walls, cpus, result


# -- the cases, each run in its own process ---------------------------------------------------------


def brute_force_recalls(images: np.ndarray, captions: np.ndarray, image_ids: np.ndarray) -> dict[str, float]:
    """R@K from the full float64 similarity matrix and a full argsort: no chunks, no topk."""
    scores = captions.astype(np.float64) @ images.astype(np.float64).T  # (n_captions, n_images)
    captions_by_rank = np.argsort(-scores, axis=0, kind="stable").T  # (n_images, n_captions)
    images_by_rank = np.argsort(-scores, axis=1, kind="stable")  # (n_captions, n_images)
    recalls = {}
    for k in (1, 5, 10):
        hits = (image_ids[captions_by_rank[:, :k]] == np.arange(len(images))[:, None]).any(axis=1)
        recalls[f"image_to_text_R@{k}"] = 100.0 * hits.mean()
    for k in (1, 5, 10):
        hits = (images_by_rank[:, :k] == image_ids[:, None]).any(axis=1)
        recalls[f"text_to_image_R@{k}"] = 100.0 * hits.mean()
    return recalls


def metric_case(n_images: int, sanity: bool, threads: int | None = None) -> dict[str, Any]:
    import torch

    from cliptune.evaluation.metrics import RECALL_KEYS, retrieval_metrics

    if threads:
        torch.set_num_threads(threads)

    images = synthetic_images(n_images)
    image_ids = np.repeat(np.arange(n_images), CAPTIONS_PER_IMAGE)
    captions = synthetic_captions(images, image_ids)
    image_emb, text_emb, index = torch.from_numpy(images), torch.from_numpy(captions), torch.from_numpy(image_ids)
    # Once on a slice first: one-time set-up (thread pool, MKL buffers) is not what the sizes cost.
    warm = 64 * CAPTIONS_PER_IMAGE
    retrieval_metrics(image_emb[:64], text_emb[:warm], index[:warm])
    measured = measure(lambda: retrieval_metrics(image_emb, text_emb, index))
    metrics = measured.result
    row: dict[str, Any] = {
        "images": n_images, "captions": len(image_ids), "seconds": round(measured.seconds, 3),
        "cpu_seconds": round(measured.cpu_seconds, 3), "peak_bytes": measured.peak_bytes,
        "embeddings_bytes": images.nbytes + captions.nbytes,
        "recalls": {key: round(metrics[key], 2) for key in RECALL_KEYS},
        "torch_threads": torch.get_num_threads(),
        "chunk_size": inspect.signature(retrieval_metrics).parameters["chunk_size"].default,
    }
    if sanity:
        # Counts, not percentages, so a single miss shows; no ties exist among random float scores.
        want = brute_force_recalls(images, captions, image_ids)
        for key in RECALL_KEYS:
            n = n_images if key.startswith("image_to_text") else len(image_ids)
            got_hits, want_hits = round(metrics[key] * n / 100), round(want[key] * n / 100)
            assert got_hits == want_hits, (f"sanity check: retrieval_metrics {key} = {got_hits}/{n} hits, "
                                           f"brute-force numpy = {want_hits}/{n}")
        row["sanity_check"] = {"images": n_images, "recalls_equal_brute_force": True,
                               "brute_force_recalls": {key: round(want[key], 2) for key in RECALL_KEYS}}
    return row


def index_case(n_images: int, plan: Plan, threads: int | None = None) -> dict[str, Any]:
    from cliptune.extras import require

    faiss = require("faiss", "search")
    if threads:
        faiss.omp_set_num_threads(threads)
    images = synthetic_images(n_images)
    query_images = np.random.default_rng(SEED + 2).integers(0, n_images, plan.batch_queries)
    queries = synthetic_captions(images, query_images, seed=SEED + 3)  # captions of random photos

    def build():
        index = faiss.IndexFlatIP(DIM)
        index.add(images)
        return index

    built = measure(build)
    index = built.result
    index.search(queries[:1], TOP_K)  # warm-up, not timed
    single, single_cpu, _ = repeat_timed(lambda i: index.search(queries[i % len(queries)][None, :], TOP_K),
                                      plan.single_queries, at_least=20, budget_s=plan.budget_s)
    batch, batch_cpu, (_, found) = repeat_timed(lambda _: index.search(queries, TOP_K), plan.batch_repeats, at_least=1,
                                    budget_s=plan.budget_s)
    return {
        "images": n_images, "vectors_bytes": images.nbytes, "index_bytes": index.ntotal * index.code_size,
        "build_seconds": round(built.seconds, 4), "build_cpu_seconds": round(built.cpu_seconds, 4),
        "build_peak_bytes": built.peak_bytes,
        "single_query_p50_ms": round(1e3 * statistics.median(single), 3),
        "single_query_cpu_p50_ms": round(1e3 * statistics.median(single_cpu), 3), "single_queries": len(single),
        "batch_queries": plan.batch_queries, "batch_p50_ms": round(1e3 * statistics.median(batch), 2),
        "batch_cpu_p50_ms": round(1e3 * statistics.median(batch_cpu), 2), "batches": len(batch),
        "batch_p50_ms_per_query": round(1e3 * statistics.median(batch) / plan.batch_queries, 4),
        "batch_true_image_in_top10_pct": round(100.0 * float((found == query_images[:, None]).any(axis=1).mean()), 1),
        "faiss_threads": faiss.omp_get_max_threads(),
    }


# -- the parent: plan, processes, report ------------------------------------------------------------


def cpu_model() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def run_case(args: list[str]) -> dict[str, Any]:
    """This script in a fresh interpreter, importing the same cliptune as this process does."""
    spec = importlib.util.find_spec("cliptune")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scale: cliptune is not importable (pip install -e . or PYTHONPATH=src)")
    source_root = str(Path(next(iter(spec.submodule_search_locations))).parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([source_root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"scale: case {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_plan(plan: Plan, short: bool, parts: tuple[str, ...] = PARTS, threads: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    common = [*(["--short"] if short else []), *(["--threads", str(threads)] if threads else [])]
    metric_rows, index_rows = [], []
    # Index cases first: they take seconds, the 100k metric case takes the longest. Each finished row
    # goes to stderr at once, so a run stopped early still leaves what it measured.
    for n_images in plan.index_sizes if "index" in parts else ():
        row = run_case(["--case", "index", "--images", str(n_images), *common])
        index_rows.append(row)
        if progress:
            print(f"scale: index {json.dumps(row)}", file=sys.stderr, flush=True)
    for name, n_images in plan.metric_cases if "metric" in parts else ():
        sanity = n_images == plan.sanity_images
        row = {"name": name, **run_case(["--case", "metric", "--images", str(n_images), *common,
                                         *(["--sanity"] if sanity else [])])}
        metric_rows.append(row)
        if progress:
            print(f"scale: metric {json.dumps(row)}", file=sys.stderr, flush=True)
    sanity = next((row.pop("sanity_check") for row in metric_rows if "sanity_check" in row), None)
    peaks = [row.get("peak_bytes", row.get("build_peak_bytes")) for row in metric_rows + index_rows]
    return {
        "benchmark": "scale", "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": metric_rows[0]["torch_threads"] if metric_rows else None,
        "faiss_threads": index_rows[0]["faiss_threads"] if index_rows else None,
        "dim": DIM, "captions_per_image": CAPTIONS_PER_IMAGE, "chunk_size": metric_rows[0]["chunk_size"] if metric_rows else None,
        "top_k": TOP_K, "peak_memory_method": "VmHWM after /proc/self/clear_refs reset, fresh process per case"
        if peaks and peaks[0] is not None else None,
        "short": short, "parts": list(parts), "sanity_check": sanity, "metric": metric_rows, "index": index_rows,
        "seconds": round(time.perf_counter() - started, 1),
        # Other work on the machine slows multi-threaded BLAS/OpenMP most: say how busy it was.
        "load_average_1min": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
    }


def _size(n_bytes: int | None) -> str:
    if n_bytes is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.{2 if unit == 'GB' else 0}f} {unit}"
    return f"{n_bytes / 1e3:.0f} kB"


def _duration(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.1f} s"
    return f"{seconds * 1e3:.0f} ms" if seconds >= 0.01 else f"{seconds * 1e3:.2f} ms"


def markdown(result: dict[str, Any]) -> str:
    load = result["load_average_1min"]
    lines = [f"CPU: {result['cpu_model']} ({result['cpu_count']} CPUs; torch threads {result['torch_threads']}, "
             f"faiss threads {result['faiss_threads']}; 1-min load average {load['start']} at start, "
             f"{load['end']} at end); D = {result['dim']}, float32; kB/MB/GB = 10^3/10^6/10^9 bytes; "
             "times are wall / CPU (all threads)."]
    if result["metric"]:
        lines += ["", f"retrieval_metrics (chunk_size {result['chunk_size']}):", "",
                  "| case | images | captions | embeddings | time | peak memory added | i2t R@1 | t2i R@1 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in result["metric"]:
            lines.append(f"| {row['name']} | {row['images']:,} | {row['captions']:,} "
                         f"| {_size(row['embeddings_bytes'])} | {_duration(row['seconds'])} / "
                         f"{_duration(row['cpu_seconds'])} | {_size(row['peak_bytes'])} "
                         f"| {row['recalls']['image_to_text_R@1']} | {row['recalls']['text_to_image_R@1']} |")
    if result["index"]:
        batch = result["index"][0]["batch_queries"]
        lines += ["", f"faiss IndexFlatIP (exact), top-{result['top_k']}:", "",
                  f"| images | index size | build | build peak added | one query, p50 | {batch:,} queries at once, "
                  "p50 | per query in the batch (wall) |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in result["index"]:
            lines.append(
                f"| {row['images']:,} | {_size(row['index_bytes'])} "
                f"| {_duration(row['build_seconds'])} / {_duration(row['build_cpu_seconds'])} "
                f"| {_size(row['build_peak_bytes'])} "
                f"| {_duration(row['single_query_p50_ms'] / 1e3)} / {_duration(row['single_query_cpu_p50_ms'] / 1e3)} "
                f"| {_duration(row['batch_p50_ms'] / 1e3)} / {_duration(row['batch_cpu_p50_ms'] / 1e3)} "
                f"| {_duration(row['batch_p50_ms_per_query'] / 1e3)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="tiny sizes, seconds (for the test)")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as markdown after the JSON")
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (both)")
    parser.add_argument("--threads", type=int, help="torch and faiss threads (default: theirs, one per core)")
    parser.add_argument("--case", choices=["metric", "index"], help=argparse.SUPPRESS)  # one case, in a child
    parser.add_argument("--images", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sanity", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    plan = SHORT if args.short else FULL
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.case == "metric":
        print(json.dumps(metric_case(args.images, args.sanity, args.threads)))
        return 0
    if args.case == "index":
        print(json.dumps(index_case(args.images, plan, args.threads)))
        return 0
    result = run_plan(plan, args.short, tuple(args.parts), args.threads)
    result["command"] = " ".join(["python benchmarks/scale.py", *(argv if argv is not None else sys.argv[1:])])
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    if args.markdown:
        print()
        print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
