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

A factory ending in ``,RDisk`` (e.g. ``"PCA256,IVF{nlist},PQ48,RDisk"``) keeps only the index
before it in memory and re-ranks its candidates exactly with float16 vectors memory-mapped
from a file (``storage_dir``); see :mod:`fashionrec.indexing.disk_rerank`. Such an index is a
faiss ``IndexRefine``: searched, tuned, saved and loaded through the same functions here.

Every built index carries usable search parameters (see :func:`default_search_params`), so
``search(index, q, k)`` without ``params`` already gives sensible recall.
"""
from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from ..console import warn_once
from ..errors import FashionRecError, IndexBuildError
from . import disk_rerank

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
# Candidates re-ranked from disk per result: MEASURED_LATER
DISK_REFINE_K_FACTOR = 10

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
        return template.format(nlist=nlist_for(n), m=pq_m_for(d))
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"bad factory template {template!r}: only {{nlist}} and {{m}} placeholders are known"
        ) from exc


def nlist_for(n: int) -> int:
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    while nlist > 1 and n < MIN_POINTS_PER_CENTROID * nlist:
        nlist //= 2
    return nlist


def pq_m_for(d: int) -> int:
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
    storage_dir=None,
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
    A factory ending in ``,RDisk`` builds the index before it in memory, writes the vectors
    (normalised for cosine) as float16 to ``storage_dir``/vectors.f16 (replacing an older one
    there; without ``storage_dir``, to an unnamed temporary file) and returns the two joined
    (see :mod:`fashionrec.indexing.disk_rerank`); ``storage_dir`` is ignored otherwise.
    Raises IndexBuildError when the data cannot train the factory: 8-bit PQ needs at least
    256 vectors, IVF at least nlist, OPQ at least as many vectors as dimensions.
    """
    check_metric(metric)
    vectors = as_matrix(vectors, "vectors")
    n, d = vectors.shape
    if n == 0:
        raise ValueError("cannot build an index from zero vectors")
    concrete = resolve_factory(factory, n, d)
    index, projection_dim, on_disk = _empty_index(concrete, d, metric)
    projection = None
    if projection_dim:
        projection = faiss.LinearTransform(d, projection_dim, False)
        index = faiss.IndexPreTransform(projection, index)
    _refuse_opq_without_enough_vectors(index, min(n, max_train), concrete)
    with _omp_threads(threads):
        _seed_training(index, seed)
        if coarse_centroids is not None:
            _install_coarse_centroids(index, coarse_centroids)
        _warn_once_about_small_training_sets(index, min(n, max_train), concrete)
        if projection is not None or not index.is_trained:
            sample = _prepared(_training_sample(vectors, max_train, seed), metric)
            if projection is not None:
                _fit_uncentred_pca(projection, sample, seed)
            try:
                index.train(sample)
            except RuntimeError as error:  # faiss's own check, e.g. fewer vectors than PQ centroids
                reason = str(error).splitlines()[0].split("failed: ")[-1]
                raise IndexBuildError(f"{concrete}: cannot train on {n} vectors: {reason}") from None
        for start in range(0, n, ADD_BATCH_ROWS):
            index.add(_prepared(vectors[start:start + ADD_BATCH_ROWS], metric))
    if on_disk:
        index = _with_vectors_on_disk(index, vectors, metric, storage_dir)
    defaults = default_search_params(index)
    if defaults:
        faiss.ParameterSpace().set_index_parameters(index, defaults)
    return index


def check_factory(factory: str, d: int, n: int = 100_000, metric: str = "cosine") -> str:
    """The concrete spec ``factory`` gives for ``n`` vectors of dimension ``d``, or IndexBuildError
    (ValueError for a bad template) saying why it cannot be built: checks a user's spec, including
    ``PCAU<dim>,`` and ``,RDisk``, before any expensive work."""
    check_metric(metric)
    concrete = resolve_factory(factory, n, d)
    _empty_index(concrete, d, metric)
    return concrete


def _empty_index(concrete: str, d: int, metric: str) -> tuple[faiss.Index, int | None, bool]:
    """(the untrained in-memory index of a concrete spec, its PCAU dimension or None, whether it re-ranks from disk)."""
    try:
        in_memory, on_disk = disk_rerank.split_disk_spec(concrete)
    except ValueError as error:
        raise IndexBuildError(str(error)) from None
    projection_dim, inner = _split_uncentred_pca(in_memory, d)
    try:
        index = faiss.index_factory(projection_dim or d, inner, _FAISS_METRIC[metric])
    except RuntimeError as error:
        raise IndexBuildError(f"{concrete}: not a faiss factory string ({str(error).splitlines()[0]})") from None
    return index, projection_dim, on_disk


_UNCENTRED_PCA = re.compile(r"PCAU(\d+),(.+)")


def _split_uncentred_pca(factory: str, d: int) -> tuple[int | None, str]:
    """(output dimension, the rest) for a factory that starts with ``PCAU<dim>,``; (None, factory) otherwise."""
    match = _UNCENTRED_PCA.fullmatch(factory)
    if match is None:
        if factory.startswith("PCAU"):
            raise IndexBuildError(f"{factory}: PCAU<dim> needs an index after it, e.g. 'PCAU256,IVF1024,PQ32'")
        return None, factory
    dim = int(match.group(1))
    if not 0 < dim < d:
        raise IndexBuildError(f"{factory}: PCAU{dim} must reduce the {d} dimensions to fewer")
    return dim, match.group(2)


def _fit_uncentred_pca(projection: faiss.LinearTransform, sample: np.ndarray, seed: int) -> None:
    """Top eigenvectors of the sample's second-moment matrix, then a seeded random rotation.

    No mean is subtracted: x -> A x keeps inner products <Aq, Ax> an estimate of <q, x>
    (A has orthonormal rows). faiss's PCA subtracts the mean, which adds -<A m, A x> to every
    inner product: a per-vector bias far larger than the gaps between near neighbours of
    non-negative CNN features (candidate recall of PQ32 codes among the top 100 fell from
    0.85 to 0.64 on 200k grown efficientnet_lite0 vectors). The rotation spreads the variance,
    concentrated in the first components, evenly over PQ sub-vectors.
    """
    if len(sample) < projection.d_out:
        raise IndexBuildError(f"PCAU{projection.d_out} needs at least {projection.d_out} training vectors, "
                              f"got {len(sample)}")
    moment = np.zeros((projection.d_in, projection.d_in))
    for start in range(0, len(sample), ADD_BATCH_ROWS):
        block = sample[start:start + ADD_BATCH_ROWS]
        moment += (block.T @ block).astype(np.float64)
    _, eigenvectors = np.linalg.eigh(moment)
    top = eigenvectors[:, ::-1][:, :projection.d_out].T
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((projection.d_out, projection.d_out)))
    faiss.copy_array_to_vector(np.ascontiguousarray(rotation @ top, dtype=np.float32).ravel(), projection.A)
    projection.is_trained = True


def _with_vectors_on_disk(index: faiss.Index, vectors: np.ndarray, metric: str, storage_dir) -> faiss.IndexRefine:
    if storage_dir is None:
        path = disk_rerank.temporary_vectors_path()
    else:
        Path(storage_dir).mkdir(parents=True, exist_ok=True)
        path = Path(storage_dir) / disk_rerank.VECTORS_FILE_NAME
    blocks = (_prepared(vectors[start:start + ADD_BATCH_ROWS], metric) for start in range(0, len(vectors), ADD_BATCH_ROWS))
    try:
        disk_rerank.write_vectors_file(path, blocks, *vectors.shape, _FAISS_METRIC[metric])
    except BaseException:
        if storage_dir is None:
            path.unlink(missing_ok=True)
        raise
    stored, source = disk_rerank.open_vectors(path, delete=storage_dir is None)
    return disk_rerank.attach(index, stored, source, DISK_REFINE_K_FACTOR)


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
    check_metric(metric)
    vectors = as_matrix(vectors, "vectors")
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
    for node, _ in index_components(index):
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
    if disk_rerank.is_disk_backed(refine):
        return DISK_REFINE_K_FACTOR
    fast_scan = any("FastScan" in type(node).__name__ for node, _ in index_components(refine.base_index))
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
    check_metric(metric)
    if _FAISS_METRIC[metric] != index.metric_type:
        raise ValueError(f"metric {metric!r} does not match the index's faiss metric {index.metric_type}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    queries = as_matrix(queries, "queries")
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
    """Bytes the index holds in memory, divided by the number of stored vectors.

    This is what ``faiss.serialize_index`` would produce (codes, ids, graph links, plus
    centroids and codebooks amortised over the vectors), counted through a writer that keeps
    no copy, so it is safe for multi-gigabyte indexes. For an index that re-ranks from disk
    (``,RDisk``) only the in-memory part counts; :func:`disk_bytes_per_vector` gives the rest.
    """
    if index.ntotal == 0:
        raise ValueError("index is empty")
    if disk_rerank.is_disk_backed(index):
        return disk_rerank.memory_bytes(index) / index.ntotal
    return disk_rerank.serialised_size(index) / index.ntotal


def disk_bytes_per_vector(index: faiss.Index) -> float:
    """Bytes of the vectors file an ``,RDisk`` index maps, per stored vector (0 for other indexes)."""
    if index.ntotal == 0:
        raise ValueError("index is empty")
    return disk_rerank.disk_bytes(index) / index.ntotal if disk_rerank.is_disk_backed(index) else 0.0


def save_index(index: faiss.Index, path, build_info: dict) -> Path:
    """Write ``index`` to ``path`` and ``<path>.json`` describing how it was built.

    ``build_info`` must hold at least ``factory`` and ``metric`` (search needs the metric);
    params, seed and anything else given are kept. n, d and faiss_version are taken from the
    index and the running faiss. Returns the JSON path.

    An index that re-ranks from disk writes only its in-memory part to ``path``; its vectors
    file is referenced where it already lies in ``path``'s folder, else hard-linked or copied
    to ``<path>.f16``; the JSON says which (``vectors_file``) and holds ``k_factor_rf``.
    """
    missing = {"factory", "metric"} - set(build_info)
    if missing:
        raise ValueError(f"build_info lacks {sorted(missing)}")
    check_metric(build_info["metric"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {**build_info, "n": int(index.ntotal), "d": int(index.d), "faiss_version": faiss.__version__}
    if disk_rerank.is_disk_backed(index):
        info.update(_save_disk_backed(index, path))
    else:
        faiss.write_index(index, str(path))
    info_path = _info_path(path)
    info_path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info_path


def _save_disk_backed(index: faiss.IndexRefine, path: Path) -> dict:
    base, _ = disk_rerank.disk_parts(index)
    faiss.write_index(base, str(path))
    source = disk_rerank.vectors_source(index)
    if source is not None and source.still_there() and source.path.parent == path.parent.resolve():
        vectors_file = source.path
    else:
        vectors_file = path.with_name(path.name + ".f16")
        if source is not None and source.still_there():
            disk_rerank.link_or_copy(source.path, vectors_file)
        else:
            disk_rerank.copy_vectors_file(index, vectors_file)
    return {"storage": "disk", "vectors_file": vectors_file.name, "k_factor_rf": float(faiss.downcast_index(index).k_factor),
            "vectors_header_bytes": disk_rerank.header_bytes(index)}


def load_index(path) -> tuple[faiss.Index, dict]:
    """Read an index written by :func:`save_index`: (index, build info).

    An index that re-ranks from disk maps its vectors file (``vectors_file`` in the JSON,
    beside ``path``) again, read-only.
    """
    path = Path(path)
    info_path = _info_path(path)
    for needed in (path, info_path):
        if not needed.is_file():
            raise FashionRecError(f"{needed}: no such file (indexes are written by save_index)")
    info = json.loads(info_path.read_text())
    index = faiss.read_index(str(path))
    if info.get("storage") == "disk":
        stored, source = disk_rerank.open_vectors(path.parent / info["vectors_file"])
        index = disk_rerank.attach(index, stored, source, info["k_factor_rf"])
    if (index.ntotal, index.d) != (info.get("n"), info.get("d")):
        raise FashionRecError(
            f"{path}: index holds {index.ntotal} x {index.d} but {info_path.name} says "
            f"{info.get('n')} x {info.get('d')}; the two files do not belong together")
    return index, info


def parse_search_params(params: str) -> list[tuple[str, str]]:
    return [tuple(item.strip().split("=", 1)) for item in params.split(",") if item.strip()]


def _info_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def as_matrix(values, what: str) -> np.ndarray:
    matrix = np.asarray(values, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (n, d), got shape {matrix.shape}")
    return matrix


def checked_queries(queries, dim: int | None) -> np.ndarray:
    """Query vectors as float32 (n, d), or a ValueError saying what is wrong (``dim``: the store's, None if empty)."""
    queries = as_matrix(queries, "queries")
    if dim is not None and queries.shape[1] != dim:
        raise ValueError(f"queries have dimension {queries.shape[1]}, the store holds dimension {dim}")
    if not np.isfinite(queries).all():
        raise ValueError("queries contain NaN or infinite values")
    return queries


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


def index_components(index: faiss.Index):
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
    for node, _ in index_components(index):
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
    for node, _ in index_components(index):
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
    for node, _ in index_components(index):
        if isinstance(node, faiss.IndexPreTransform):
            for position in range(node.chain.size()):
                transform = faiss.downcast_VectorTransform(node.chain.at(position))
                if isinstance(transform, faiss.OPQMatrix) and n_train < transform.d_in:
                    raise IndexBuildError(f"{concrete}: OPQ needs at least as many training vectors as "
                                          f"dimensions ({transform.d_in}), got {n_train}")


def _install_coarse_centroids(index: faiss.Index, centroids: np.ndarray) -> None:
    ivfs = [(node, behind) for node, behind in index_components(index) if isinstance(node, faiss.IndexIVF)]
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
