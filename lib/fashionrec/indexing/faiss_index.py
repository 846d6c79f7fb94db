"""FAISS index variants for searching image embeddings: build, search, save and load.

Vectors go in as float arrays of shape (n, d); the metric says how they are compared:

* ``"cosine"``: copies of vectors and queries are L2-normalised, then compared by inner
  product, so scores are cosine similarities (higher is closer). Zero vectors stay zero.
* ``"ip"``: raw inner product (higher is closer).
* ``"l2"``: squared Euclidean distance (lower is closer).

Index structures are named by faiss ``index_factory`` strings. Templates may contain
``{nlist}`` (number of IVF lists) and ``{m}`` (number of PQ sub-quantizers), which
:func:`resolve_factory` fills from the gallery size and dimension. ``SPINE_FACTORIES`` are
the variants of record; ``SCALE_FACTORIES`` are the ones that matter for millions of vectors
(graph coarse quantizer, 4-bit fast-scan PQ, re-ranking of compressed candidates).

Every built index carries usable search parameters (see :func:`default_search_params`), so
``search(index, q, k)`` without ``params`` already gives sensible recall.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from ..console import warn_once
from ..errors import FashionRecError, IndexBuildError

METRICS = ("cosine", "l2", "ip")
_FAISS_METRIC = {
    "cosine": faiss.METRIC_INNER_PRODUCT,
    "ip": faiss.METRIC_INNER_PRODUCT,
    "l2": faiss.METRIC_L2,
}

SPINE_FACTORIES = (
    "Flat",
    "HNSW32",
    "IVF{nlist},Flat",
    "IVF{nlist},PQ{m}",
    "OPQ{m},IVF{nlist},PQ{m}",
    "SQ8",
)
SCALE_FACTORIES = (
    "IVF{nlist}_HNSW32,Flat",
    "IVF{nlist},PQ{m}x4fs",
    "IVF{nlist},PQ{m}x4fs,RFlat",
    "IVF{nlist},PQ{m},RFlat",
    "OPQ{m},IVF{nlist},PQ{m},Refine(SQ8)",
)

# faiss warns below 39 training points per centroid: fewer make centroids mostly noise.
MIN_POINTS_PER_CENTROID = 39
PQ_M_CANDIDATES = (64, 48, 32, 24, 16, 12, 8, 4, 2)
# Narrower sub-vectors spend code bytes without a matching gain in accuracy.
MIN_PQ_SUBVECTOR_DIM = 4

# Training on more than this many vectors barely moves k-means / PQ codebooks but costs
# minutes at a million vectors; the sample is drawn with the build seed.
MAX_TRAIN_VECTORS = 200_000
# Adding in batches keeps the normalised (or OPQ-rotated) copy small at millions of vectors.
ADD_BATCH_ROWS = 65_536

DEFAULT_EF_SEARCH = 64
DEFAULT_REFINE_K_FACTOR = 4
# 4-bit fast-scan codes rank candidates coarsely. On 20k vectors synthesised from
# efficientnet_lite0 features (IVF512,PQ64x4fs,RFlat), recall@10 was 0.75 / 0.90 / 0.985
# re-ranking the top 16 / 32 / 64 x k; 8-bit PQ needed 4 x k for 0.92 (SQ8 re-rank).
FAST_SCAN_REFINE_K_FACTOR = 32

def resolve_factory(template: str, n: int, d: int) -> str:
    """Fill ``{nlist}`` and ``{m}`` in a factory template for ``n`` vectors of dimension ``d``.

    nlist: 4*sqrt(n) rounded to a power of two, then halved until every list can get at least
    ``MIN_POINTS_PER_CENTROID`` training vectors (minimum 1). 1M vectors -> 4096, 20k -> 512,
    1000 -> 16.
    m: the largest of ``PQ_M_CANDIDATES`` that divides d and leaves sub-vectors of at least
    ``MIN_PQ_SUBVECTOR_DIM`` dimensions (1280 -> 64, 512 -> 64, 64 -> 16); 1 if none does.
    Templates without placeholders come back unchanged.
    """
    if n < 1 or d < 1:
        raise ValueError(f"need n >= 1 and d >= 1, got n={n}, d={d}")
    try:
        return template.format(nlist=_nlist_for(n), m=_pq_m_for(d))
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"bad factory template {template!r}: only {{nlist}} and {{m}} placeholders are known"
        ) from exc


def _nlist_for(n: int) -> int:
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    while nlist > 1 and n < MIN_POINTS_PER_CENTROID * nlist:
        nlist //= 2
    return nlist


def _pq_m_for(d: int) -> int:
    for m in PQ_M_CANDIDATES:
        if d % m == 0 and d // m >= MIN_PQ_SUBVECTOR_DIM:
            return m
    return 1


def build_index(
    vectors,
    factory: str = "Flat",
    metric: str = "cosine",
    seed: int = 0,
    *,
    threads: int | None = None,
    max_train: int = MAX_TRAIN_VECTORS,
    coarse_centroids: np.ndarray | None = None,
) -> faiss.Index:
    """Build and fill a faiss index over ``vectors`` (n, d).

    ``factory`` is a faiss factory string or a template (see :func:`resolve_factory`).
    Training uses at most ``max_train`` vectors sampled with ``seed``; ``seed`` also seeds
    every k-means (IVF lists, PQ codebooks) and the HNSW level draws, so the same input gives
    a byte-identical index (checked with 1 and 2 threads; HNSW inserts in parallel, so that is
    observed rather than promised by faiss). OPQ's rotation starts from faiss's fixed seed.
    ``coarse_centroids`` (nlist, d), from :func:`train_coarse_centroids` with the same
    metric, replaces the IVF k-means, so several IVF variants can share one training; the
    result is identical to training here with the same seed, sample and nlist. It cannot be
    used when the IVF sits behind a transform such as OPQ (its lists live in rotated space).
    ``threads`` sets faiss's OpenMP threads for the build (None: leave faiss's setting).

    PQ codebooks are trained without polysemous re-ordering: it only serves Hamming-threshold
    filtering, which :func:`search` never enables, and costs minutes even on small data.
    Raises IndexBuildError when the data cannot train the factory: 8-bit PQ needs at least
    256 vectors, IVF at least nlist, OPQ at least as many vectors as dimensions.
    """
    _check_metric(metric)
    vectors = _as_matrix(vectors, "vectors")
    n, d = vectors.shape
    if n == 0:
        raise ValueError("cannot build an index from zero vectors")
    concrete = resolve_factory(factory, n, d)
    index = faiss.index_factory(d, concrete, _FAISS_METRIC[metric])
    _refuse_opq_without_enough_vectors(index, min(n, max_train), concrete)
    with _omp_threads(threads):
        _seed_training(index, seed)
        if coarse_centroids is not None:
            _install_coarse_centroids(index, coarse_centroids)
        _warn_once_about_small_training_sets(index, min(n, max_train), concrete)
        if not index.is_trained:
            try:
                index.train(_prepared(_training_sample(vectors, max_train, seed), metric))
            except RuntimeError as error:  # faiss's own check, e.g. fewer vectors than PQ centroids
                reason = str(error).splitlines()[0].split("failed: ")[-1]
                raise IndexBuildError(f"{concrete}: cannot train on {n} vectors: {reason}") from None
        for start in range(0, n, ADD_BATCH_ROWS):
            index.add(_prepared(vectors[start:start + ADD_BATCH_ROWS], metric))
    defaults = default_search_params(index)
    if defaults:
        faiss.ParameterSpace().set_index_parameters(index, defaults)
    return index


def train_coarse_centroids(
    vectors,
    nlist: int,
    metric: str = "cosine",
    seed: int = 0,
    *,
    threads: int | None = None,
    max_train: int = MAX_TRAIN_VECTORS,
) -> np.ndarray:
    """The IVF centroids (nlist, d) that :func:`build_index` would train for ``vectors``."""
    _check_metric(metric)
    vectors = _as_matrix(vectors, "vectors")
    index = faiss.index_factory(vectors.shape[1], f"IVF{nlist},Flat", _FAISS_METRIC[metric])
    with _omp_threads(threads):
        _seed_training(index, seed)
        index.train(_prepared(_training_sample(vectors, max_train, seed), metric))
    return faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, nlist)


def default_search_params(index: faiss.Index) -> str:
    """The ParameterSpace string :func:`build_index` applies, e.g. ``"nprobe=64"``.

    IVF: nprobe = sqrt(nlist), at least 16, at most nlist (4096 lists -> 64). A graph coarse
    quantizer searches with efSearch >= 2*nprobe so it returns nprobe good lists.
    HNSW: efSearch = ``DEFAULT_EF_SEARCH``. Re-ranking: the compressed index proposes
    ``DEFAULT_REFINE_K_FACTOR`` * k candidates for re-scoring, ``FAST_SCAN_REFINE_K_FACTOR``
    * k when it holds 4-bit fast-scan codes. Empty when nothing applies.
    """
    params = []
    for node, _ in _components(index):
        if isinstance(node, faiss.IndexIVF):
            nprobe = default_nprobe(node.nlist)
            params.append(f"nprobe={nprobe}")
            if isinstance(faiss.downcast_index(node.quantizer), faiss.IndexHNSW):
                params.append(f"quantizer_efSearch={max(DEFAULT_EF_SEARCH, 2 * nprobe)}")
        elif isinstance(node, faiss.IndexHNSW):
            params.append(f"efSearch={DEFAULT_EF_SEARCH}")
        elif isinstance(node, faiss.IndexRefine):
            params.append(f"k_factor_rf={_refine_k_factor(node)}")
    return ",".join(params)


def default_nprobe(nlist: int) -> int:
    """Lists an IVF index visits by default: sqrt(nlist), at least 16, at most nlist."""
    return min(nlist, max(16, int(math.sqrt(nlist))))


def _refine_k_factor(refine: faiss.IndexRefine) -> int:
    fast_scan = any("FastScan" in type(node).__name__ for node, _ in _components(refine.base_index))
    return FAST_SCAN_REFINE_K_FACTOR if fast_scan else DEFAULT_REFINE_K_FACTOR


def search(
    index: faiss.Index,
    queries,
    k: int,
    metric: str = "cosine",
    params: str = "",
    *,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` neighbours of each query: (scores, ids), both of shape (n_queries, k').

    ``metric`` must be the one the index was built with (queries are normalised for cosine).
    k' = min(k, index.ntotal): asking for more neighbours than stored vectors returns all of
    them rather than padding. Approximate indexes may still find fewer than k' (e.g. IVF with
    a small nprobe); those slots hold id -1. ``params`` (e.g. ``"nprobe=16,efSearch=64"``)
    are set on the index with faiss.ParameterSpace and stay set for later searches.
    """
    _check_metric(metric)
    if _FAISS_METRIC[metric] != index.metric_type:
        raise ValueError(f"metric {metric!r} does not match the index's faiss metric {index.metric_type}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    queries = _as_matrix(queries, "queries")
    if queries.shape[1] != index.d:
        raise ValueError(f"queries have dimension {queries.shape[1]}, index has {index.d}")
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    k = min(k, index.ntotal)
    if k == 0:
        return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
    with _omp_threads(threads):
        return index.search(_prepared(queries, metric), k)


def index_bytes_per_vector(index: faiss.Index) -> float:
    """Serialised size of the index divided by the number of stored vectors.

    This is what ``faiss.serialize_index`` would produce (codes, ids, graph links, plus
    centroids and codebooks amortised over the vectors), counted through a writer that keeps
    no copy, so it is safe for multi-gigabyte indexes.
    """
    if index.ntotal == 0:
        raise ValueError("index is empty")
    total = 0

    def count(chunk: bytes) -> int:
        nonlocal total
        total += len(chunk)
        return len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total / index.ntotal


def save_index(index: faiss.Index, path, build_info: dict) -> Path:
    """Write ``index`` to ``path`` and ``<path>.json`` describing how it was built.

    ``build_info`` must hold at least ``factory`` and ``metric`` (search needs the metric);
    params, seed and anything else given are kept. n, d and faiss_version are taken from the
    index and the running faiss. Returns the JSON path.
    """
    missing = {"factory", "metric"} - set(build_info)
    if missing:
        raise ValueError(f"build_info lacks {sorted(missing)}")
    _check_metric(build_info["metric"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path))
    info = {**build_info, "n": int(index.ntotal), "d": int(index.d), "faiss_version": faiss.__version__}
    info_path = _info_path(path)
    info_path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info_path


def load_index(path) -> tuple[faiss.Index, dict]:
    """Read an index written by :func:`save_index`: (index, build info)."""
    path = Path(path)
    info_path = _info_path(path)
    for needed in (path, info_path):
        if not needed.is_file():
            raise FashionRecError(f"{needed}: no such file (indexes are written by save_index)")
    info = json.loads(info_path.read_text())
    index = faiss.read_index(str(path))
    if (index.ntotal, index.d) != (info.get("n"), info.get("d")):
        raise FashionRecError(
            f"{path}: index holds {index.ntotal} x {index.d} but {info_path.name} says "
            f"{info.get('n')} x {info.get('d')}; the two files do not belong together")
    return index, info


def _parse_params(params: str) -> list[tuple[str, str]]:
    return [tuple(item.strip().split("=", 1)) for item in params.split(",") if item.strip()]


def _info_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def _as_matrix(values, what: str) -> np.ndarray:
    matrix = np.asarray(values, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (n, d), got shape {matrix.shape}")
    return matrix


def _prepared(rows: np.ndarray, metric: str) -> np.ndarray:
    """A contiguous float32 block as faiss wants it, normalised (on a copy) for cosine."""
    if not np.isfinite(rows).all():
        raise ValueError("vectors contain NaN or infinite values")
    if metric != "cosine":
        return np.ascontiguousarray(rows, dtype=np.float32)
    normalised = np.array(rows, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(normalised)
    return normalised


def _training_sample(vectors: np.ndarray, max_train: int, seed: int) -> np.ndarray:
    if len(vectors) <= max_train:
        return vectors
    rows = np.random.default_rng(seed).choice(len(vectors), size=max_train, replace=False)
    return vectors[np.sort(rows)]


def _components(index: faiss.Index):
    """Yield (node, behind_transform) for the index and every index it wraps, downcast."""
    stack = [(index, False)]
    while stack:
        node, behind_transform = stack.pop()
        node = faiss.downcast_index(node)
        yield node, behind_transform
        if isinstance(node, faiss.IndexPreTransform):
            stack.append((node.index, True))
        elif isinstance(node, faiss.IndexRefine):
            stack += [(node.base_index, behind_transform), (node.refine_index, behind_transform)]


def _seed_training(index: faiss.Index, seed: int) -> None:
    for node, _ in _components(index):
        if isinstance(node, faiss.IndexIVF):
            node.cp.seed = seed
            quantizer = faiss.downcast_index(node.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):
                quantizer.hnsw.rng = faiss.RandomGenerator(seed)
        if isinstance(node, faiss.IndexHNSW):
            node.hnsw.rng = faiss.RandomGenerator(seed)
        if hasattr(node, "pq"):
            node.pq.cp.seed = seed
        if hasattr(node, "do_polysemous_training"):
            node.do_polysemous_training = False


def _warn_once_about_small_training_sets(index: faiss.Index, n_train: int, concrete: str) -> None:
    """One line per index kind instead of faiss's line per k-means (64 of them for PQ64).

    faiss prints "WARNING clustering N points to K centroids" from every k-means it runs
    with fewer than ``min_points_per_centroid`` points per centroid; that setting changes
    nothing but the warning, so it is lowered here and the situation reported once.
    """
    for node, _ in _components(index):
        quantizers = []
        if isinstance(node, faiss.IndexIVF) and node.quantizer.ntotal == 0:
            quantizers.append(("coarse quantizer", node.cp, node.nlist))
        if hasattr(node, "pq"):
            quantizers.append(("PQ sub-quantizers", node.pq.cp, node.pq.ksub))
        for what, clustering, centroids in quantizers:
            recommended = centroids * clustering.min_points_per_centroid
            if n_train < recommended:
                warn_once(f"{concrete}: {what} trained on {n_train} vectors for {centroids} centroids each "
                          f"(faiss recommends at least {recommended}); its recall is measured, not assumed")
                clustering.min_points_per_centroid = 1


def _refuse_opq_without_enough_vectors(index: faiss.Index, n_train: int, concrete: str) -> None:
    # With fewer training vectors than dimensions, faiss 1.15's OPQ training corrupts the heap
    # and aborts the process (measured: d=1280 fails at n=1279, d=512 at n=511) instead of
    # raising the RuntimeError that build_index turns into IndexBuildError.
    for node, _ in _components(index):
        if isinstance(node, faiss.IndexPreTransform):
            for position in range(node.chain.size()):
                transform = faiss.downcast_VectorTransform(node.chain.at(position))
                if isinstance(transform, faiss.OPQMatrix) and n_train < transform.d_in:
                    raise IndexBuildError(f"{concrete}: OPQ needs at least as many training vectors as "
                                          f"dimensions ({transform.d_in}), got {n_train}")


def _install_coarse_centroids(index: faiss.Index, centroids: np.ndarray) -> None:
    ivfs = [(node, behind) for node, behind in _components(index) if isinstance(node, faiss.IndexIVF)]
    if not ivfs:
        raise ValueError("coarse_centroids given but the factory has no IVF stage")
    ivf, behind_transform = ivfs[0]
    if behind_transform:
        raise ValueError("coarse_centroids cannot be shared with an IVF behind a transform (e.g. OPQ)")
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if centroids.shape != (ivf.nlist, ivf.d):
        raise ValueError(f"coarse_centroids have shape {centroids.shape}, the IVF needs {(ivf.nlist, ivf.d)}")
    # faiss skips k-means when the quantizer already holds nlist centroids.
    ivf.quantizer.add(centroids)


@contextmanager
def _omp_threads(threads: int | None):
    if threads is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)
