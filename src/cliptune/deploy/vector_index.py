"""The FAISS index over a photo index's embeddings: exact (flat) or approximate (IVF, HNSW), and the
settings each takes.

Every kind searches inner product over L2-normalised float32 vectors, i.e. cosine. Exact search is one
pass over all vectors per query and returns the true best; IVF and HNSW visit a part of them and trade
a little recall for speed once there are some hundred thousand photos (docs/indexing.md has the
measured build times, memory, query times and recall@10 at 10k, 100k and 1M vectors).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cliptune.config import UsageError
from cliptune.extras import require

KINDS = ("ivf", "hnsw")  # besides None: exact

# faiss's k-means asks for at least 39 training points per list (it warns below that) and samples
# down to 256 per list itself; 64 per list trains 4,000 lists of 512-d vectors in about a minute on
# two cores, where all of 1M vectors would take four times as long for centroids no better for search.
MIN_POINTS_PER_LIST = 39
TRAIN_POINTS_PER_LIST = 64
DEFAULT_NPROBE = 32


def ivf_lists(n: int) -> int:
    """IVF's number of lists for `n` vectors: about 4 * sqrt(n) (faiss's guidelines say 4..16 * sqrt(n)),
    at most n / 39 so that every list gets the training points k-means asks for, at least 1."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


@dataclass(frozen=True)
class AnnSettings:
    """Which FAISS index to build, and how an approximate one searches."""

    kind: str | None = None      # None: exact (IndexFlatIP); "ivf" (IndexIVFFlat) or "hnsw" (IndexHNSWFlat)
    nprobe: int | None = None    # IVF: lists searched per query; more finds more of the true best, slower.
                                 # None: 32 (or every list when there are fewer)
    nlist: int | None = None     # IVF: number of lists; None: ivf_lists(n), about 4 * sqrt(n)
    train_points: int | None = None  # IVF: k-means sample size; None: 64 per list, all vectors when fewer
    hnsw_m: int = 32             # HNSW: links per vector; faiss's usual for vectors of some hundred dims
    ef_construction: int = 80    # HNSW: candidates kept while linking; above faiss's 40 for a better graph
    ef_search: int = 64          # HNSW: candidates kept per query (>= k); more: better recall, slower
    seed: int = 0                # IVF's training sample and k-means

    def __post_init__(self) -> None:
        if self.kind not in (None, *KINDS):
            raise UsageError(f"approximate: {self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("nprobe", "nlist", "train_points"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{name}: {value!r} must be an integer >= 1")
        for name in ("hnsw_m", "ef_construction", "ef_search"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name}: {value!r} must be an integer >= 1")
        if self.nprobe is not None and self.kind != "ivf":
            raise UsageError(f"nprobe: {self.nprobe} applies to an IVF index (approximate: ivf), not to "
                             f"{self.kind or 'an exact one'}")

    def describe(self, index: Any) -> str:
        """'exact', 'ivf (nlist 4000, nprobe 32)' or 'hnsw (M 32, efSearch 64)': the built `index`'s."""
        if self.kind == "ivf":
            return f"ivf (nlist {index.nlist}, nprobe {index.nprobe})"
        if self.kind == "hnsw":
            return f"hnsw (M {self.hnsw_m}, efSearch {index.hnsw.efSearch})"
        return "exact"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def training_sample(embeddings: np.ndarray, points: int, seed: int) -> np.ndarray:
    """`points` rows of `embeddings`, chosen at random without replacement (all of them when fewer)."""
    if points >= len(embeddings):
        return embeddings
    rows = np.sort(np.random.default_rng(seed).choice(len(embeddings), size=points, replace=False))
    return np.ascontiguousarray(embeddings[rows])


def build_faiss_index(embeddings: np.ndarray, settings: AnnSettings):
    """A FAISS index holding `embeddings` (N, D) float32, L2-normalised, row i as id i."""
    faiss = require("faiss", "search")

    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = embeddings.shape
    if settings.kind is None:
        index = faiss.IndexFlatIP(dim)
    elif settings.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.ef_construction
        index.hnsw.efSearch = settings.ef_search
    else:
        nlist = min(settings.nlist or ivf_lists(n), n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = settings.seed
        if nlist == 1:  # a folder of under 39 photos: one list, whose centroid needs no 39 points
            index.cp.min_points_per_centroid = 1
        points = settings.train_points or TRAIN_POINTS_PER_LIST * nlist
        # At least faiss's minimum per list, so it never warns; it samples above 256 per list by itself.
        points = max(points, MIN_POINTS_PER_LIST * nlist)
        index.train(training_sample(embeddings, points, settings.seed))
        index.nprobe = min(settings.nprobe or DEFAULT_NPROBE, nlist)
    index.add(embeddings)
    return index


def apply_search_settings(index: Any, meta: dict[str, Any]) -> None:
    """Set the query-time knobs that `meta.json` records (nprobe, efSearch) on a loaded index."""
    if meta.get("nprobe") and hasattr(index, "nprobe"):
        index.nprobe = int(meta["nprobe"])
    ef_search = (meta.get("ann") or {}).get("ef_search")
    if ef_search and hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(ef_search)


def index_bytes(index: Any) -> int:
    """Size of the index as FAISS writes it to disk (vectors, lists or graph links included)."""
    faiss = require("faiss", "search")

    return int(faiss.serialize_index(index).nbytes)
