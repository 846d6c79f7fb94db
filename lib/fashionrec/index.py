"""FAISS index variants for searching image embeddings, and the tools to compare them.

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
import time
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from fashionrec.errors import FashionRecError, IndexBuildError

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

# choose_index: exhaustive search is preferred while one query scans at most this many
# floats (about 100k vectors of 1280 dimensions: a few ms per query on two cores).
EXACT_SCAN_MAX_FLOATS = 128_000_000
# Measured size of faiss's HNSW32 graph per vector: 2*32 level-0 links plus upper levels
# (expected 32/31 extra links), as int32, plus level and offset bookkeeping.
HNSW32_LINK_BYTES = 272
# Bytes per stored id in inverted lists (faiss idx_t).
IVF_ID_BYTES = 8
FAST_SCAN_BLOCK = 32


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
            nprobe = min(node.nlist, max(16, int(math.sqrt(node.nlist))))
            params.append(f"nprobe={nprobe}")
            if isinstance(faiss.downcast_index(node.quantizer), faiss.IndexHNSW):
                params.append(f"quantizer_efSearch={max(DEFAULT_EF_SEARCH, 2 * nprobe)}")
        elif isinstance(node, faiss.IndexHNSW):
            params.append(f"efSearch={DEFAULT_EF_SEARCH}")
        elif isinstance(node, faiss.IndexRefine):
            params.append(f"k_factor_rf={_refine_k_factor(node)}")
    return ",".join(params)


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


def recall_vs_exact(ids, exact_ids, k: int) -> float:
    """Mean over queries of |top-k found ∩ exact top-k| / k (padding ids -1 never count).

    When the exact lists are shorter than k (k was clamped to a small index), k is their length.
    """
    exact_ids = np.asarray(exact_ids)[:, :k]
    k = exact_ids.shape[1]
    ids = np.asarray(ids)[:, :k]
    if ids.shape[0] != exact_ids.shape[0]:
        raise ValueError(f"{ids.shape[0]} result rows vs {exact_ids.shape[0]} exact rows")
    hits = [len(np.intersect1d(found[found >= 0], exact)) for found, exact in zip(ids, exact_ids)]
    return float(np.mean(hits)) / k


def benchmark_index(
    vectors,
    queries,
    factory: str,
    metric: str = "cosine",
    k: int = 10,
    params: str = "",
    exact_ids=None,
    *,
    name: str | None = None,
    seed: int = 0,
    threads: int | None = None,
    max_train: int = MAX_TRAIN_VECTORS,
    coarse_centroids: np.ndarray | None = None,
    sweep: bool = False,
) -> dict:
    """Build ``factory`` over ``vectors``, search all ``queries`` as one batch, and measure.

    ``params`` override the defaults of :func:`default_search_params`. Returns name (default:
    the factory as given), factory (resolved), params (all in effect), metric, n, d, k,
    build_s (train + add), bytes_per_vector, qps, and recall_at_k / recall_at_10 against
    ``exact_ids`` (None without them; recall_at_10 also when k < 10). Timings use
    time.perf_counter; the batch is repeated until 0.2 s have passed (at most 20 times), so
    fast indexes are not timed on a single blip. With ``sweep``, the same index is also
    measured at every setting of :func:`search_param_grid` ("operating_points": params, qps,
    recall_at_k, recall_at_10).
    """
    vectors = _as_matrix(vectors, "vectors")
    n, d = vectors.shape
    started = time.perf_counter()
    index = build_index(vectors, factory, metric, seed, threads=threads, max_train=max_train,
                        coarse_centroids=coarse_centroids)
    build_s = time.perf_counter() - started
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    in_effect = dict(_parse_params(default_search_params(index)))
    in_effect.update(_parse_params(params))

    row = {
        "name": name or factory,
        "factory": resolve_factory(factory, n, d),
        "params": ",".join(f"{key}={value}" for key, value in in_effect.items()),
        "metric": metric,
        "n": n,
        "d": d,
        "k": k,
        "build_s": build_s,
        "bytes_per_vector": index_bytes_per_vector(index),
        **_measure_search(index, queries, k, metric, exact_ids, threads),
    }
    if sweep:
        row["operating_points"] = []
        for setting in search_param_grid(index):
            faiss.ParameterSpace().set_index_parameters(index, setting)
            row["operating_points"].append({"params": setting,
                                            **_measure_search(index, queries, k, metric, exact_ids, threads)})
    return row


def _measure_search(index, queries, k: int, metric: str, exact_ids, threads: int | None) -> dict:
    """qps of one batch search (repeated until 0.2 s have passed, at most 20 times) and recall."""
    rounds, elapsed = 0, 0.0
    while rounds == 0 or (elapsed < 0.2 and rounds < 20):
        started = time.perf_counter()
        _, ids = search(index, queries, k, metric, threads=threads)
        elapsed += time.perf_counter() - started
        rounds += 1
    recall_at_k = recall_at_10 = None
    if exact_ids is not None:
        recall_at_k = recall_vs_exact(ids, exact_ids, k)
        if k >= 10:
            recall_at_10 = recall_vs_exact(ids, exact_ids, 10)
    return {"qps": rounds * len(ids) / elapsed, "recall_at_k": recall_at_k, "recall_at_10": recall_at_10}


SWEEP_NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SWEEP_EF_SEARCH = (16, 32, 64, 128, 256)
SWEEP_REFINE_K_FACTOR = (2, 4, 8, 16, 32)


def search_param_grid(index: faiss.Index) -> list[str]:
    """ParameterSpace settings that trace an index's speed/recall curve.

    IVF: nprobe in ``SWEEP_NPROBE`` up to nlist (a graph coarse quantizer gets efSearch
    >= 2*nprobe, as by default); HNSW: efSearch in ``SWEEP_EF_SEARCH``; re-ranking: every
    k_factor_rf in ``SWEEP_REFINE_K_FACTOR`` for each nprobe. Empty for indexes without
    search parameters (Flat, SQ8, PQ).
    """
    axes: list[list[str]] = []
    refine_axis = None
    for node, _ in _components(index):
        if isinstance(node, faiss.IndexIVF):
            graph = isinstance(faiss.downcast_index(node.quantizer), faiss.IndexHNSW)
            axes.append([f"nprobe={p}" + (f",quantizer_efSearch={max(DEFAULT_EF_SEARCH, 2 * p)}" if graph else "")
                         for p in SWEEP_NPROBE if p <= node.nlist])
        elif isinstance(node, faiss.IndexHNSW):
            axes.append([f"efSearch={ef}" for ef in SWEEP_EF_SEARCH])
        elif isinstance(node, faiss.IndexRefine):
            refine_axis = [f"k_factor_rf={f}" for f in SWEEP_REFINE_K_FACTOR]
    if refine_axis:
        axes.append(refine_axis)   # varies fastest: "nprobe=4,k_factor_rf=2", "nprobe=4,k_factor_rf=4", ...
    settings = [""]
    for axis in axes:
        settings = [",".join(part for part in (done, value) if part) for done in settings for value in axis]
    return [setting for setting in settings if setting]


# choose_index candidates, from most memory (fastest / most accurate) to least. Each entry:
# template, bytes per vector as f(d, m), recall@10 ceiling (the best any search setting of
# search_param_grid reached), and whether it carries a d*d OPQ matrix. Ceilings were measured
# by benchmarks/index_scale.py at N = 1,000,000 vectors grown from efficientnet_lite0 features
# (1280-d, PQ64, nlist 4096, cosine): HNSW32 not built there (0.999 at 20k), PQ64 + exact
# re-rank 0.979, PQ64x4fs + exact re-rank 0.69 (4-bit codes rank too coarsely for k_factor 32
# to recover), PQ64 alone 0.36, PQ64x4fs alone 0.12. OPQ variants were not built at 1M: their
# ceilings are 20k priors, capped by what SQ8 (0.967 at 1M) and PQ64 can give. A ceiling is a
# prior, not a promise: tune_search_params measures the chosen index on held-out queries.
_CHOICE_CANDIDATES = (
    ("HNSW32", lambda d, m: 4 * d + HNSW32_LINK_BYTES, 0.99, False),
    ("IVF{nlist},PQ{m},RFlat", lambda d, m: 4 * d + m + IVF_ID_BYTES, 0.979, False),
    ("IVF{nlist},PQ{m}x4fs,RFlat", lambda d, m: 4 * d + m / 2 + IVF_ID_BYTES, 0.69, False),
    ("OPQ{m},IVF{nlist},PQ{m},Refine(SQ8)", lambda d, m: d + m + IVF_ID_BYTES, 0.96, True),
    ("OPQ{m},IVF{nlist},PQ{m}", lambda d, m: m + IVF_ID_BYTES, 0.45, True),
    ("IVF{nlist},PQ{m}x4fs", lambda d, m: m / 2 + IVF_ID_BYTES, 0.12, False),
)


def choose_index(n: int, d: int, memory_budget_bytes: float, recall_target: float = 0.95) -> dict:
    """Pick an index for ``n`` vectors of dimension ``d`` (autofaiss-style rules).

    1. Flat (exact) when a query scans at most ``EXACT_SCAN_MAX_FLOATS`` floats and the raw
       vectors fit the budget: small galleries need no approximation.
    2. Otherwise the first candidate, from most to least memory (HNSW32, IVF-PQ with exact
       re-ranking, IVF-PQ fast-scan with exact re-ranking, OPQ IVF-PQ re-ranked from SQ8, OPQ
       IVF-PQ, IVF-PQ fast-scan),
       whose estimated size fits the budget and whose recall ceiling reaches the target.
    3. If none that fits can reach the target, the fitting one with the highest ceiling
       (Flat, when it fits, is exact however slow); the rationale says the target is at risk.
    4. If nothing fits, ValueError with the smallest footprint on offer.

    Search parameters grow with the target (efSearch 64/128/256, nprobe x1/x2/x4 the
    default, re-rank factor x1/x2/x4 its default, for targets below 0.9 / below 0.97 / above).
    Estimated size = per-vector bytes * n + centroids (nlist*d floats) + OPQ matrix (d*d
    floats) + PQ codebooks (256*d or 16*d floats) + fast-scan block padding: the serialised
    size. IVF-PQ searched with metric "l2" also precomputes nlist*m*256 floats in RAM.
    Returns factory (resolved), params, rationale, estimated_bytes_per_vector,
    estimated_total_bytes, recall_ceiling. The params are a starting point: once the index is
    built, :func:`tune_search_params` finds the cheapest setting that meets the target.
    """
    if n < 1 or d < 1:
        raise ValueError(f"need n >= 1 and d >= 1, got n={n}, d={d}")
    nlist, m = _nlist_for(n), _pq_m_for(d)
    tier = 0 if recall_target < 0.9 else 1 if recall_target < 0.97 else 2
    nprobe = min(nlist, max(16, int(math.sqrt(nlist))) * 2 ** tier)

    def option(template, per_vector, ceiling, has_opq):
        fixed = (nlist * d * 4 if "IVF" in template else 0) + (d * d * 4 if has_opq else 0)
        if "x4fs" in template:
            # 16 centroids per sub-quantizer; lists are stored in blocks of 32 codes, so about
            # half a block per list is padding
            fixed += 16 * d * 4 + FAST_SCAN_BLOCK / 2 * nlist * m / 2
        elif "PQ" in template:
            fixed += 256 * d * 4
        params = []
        if "IVF" in template:
            params.append(f"nprobe={nprobe}")
        if template.startswith("HNSW"):
            params.append(f"efSearch={DEFAULT_EF_SEARCH * 2 ** tier}")
        if "RFlat" in template or "Refine" in template:
            k_factor = FAST_SCAN_REFINE_K_FACTOR if "fs" in template else DEFAULT_REFINE_K_FACTOR
            params.append(f"k_factor_rf={k_factor * 2 ** tier}")
        total = per_vector * n + fixed
        return {
            "factory": resolve_factory(template, n, d),
            "params": ",".join(params),
            "rationale": "",
            "estimated_bytes_per_vector": total / n,
            "estimated_total_bytes": total,
            "recall_ceiling": ceiling,
        }

    flat = option("Flat", 4 * d, 1.0, False)
    if flat["estimated_total_bytes"] <= memory_budget_bytes and n * d <= EXACT_SCAN_MAX_FLOATS:
        flat["rationale"] = (f"exact search: {n} x {d} floats fit the budget and one query scans "
                             f"at most {EXACT_SCAN_MAX_FLOATS:.3g} floats")
        return flat

    candidates = [option(t, bytes_fn(d, m), c, o) for t, bytes_fn, c, o in _CHOICE_CANDIDATES]
    candidates.append(flat)

    def fits(candidate):
        return candidate["estimated_total_bytes"] <= memory_budget_bytes

    fitting = [c for c in candidates if fits(c)]
    if not fitting:
        smallest = min(c["estimated_total_bytes"] for c in candidates)
        raise ValueError(f"no index for {n} x {d} fits {memory_budget_bytes:.4g} bytes; "
                         f"the smallest candidate needs about {smallest:.4g}")
    skipped = []
    for candidate in candidates:
        size = f"~{candidate['estimated_bytes_per_vector']:.0f} B/vector"
        if not fits(candidate):
            skipped.append(f"{candidate['factory']} ({size}) exceeds the budget")
        elif candidate["recall_ceiling"] < recall_target:
            skipped.append(f"{candidate['factory']} caps recall near {candidate['recall_ceiling']}")
        else:
            candidate["rationale"] = "; ".join(skipped + [
                f"{candidate['factory']} fits {memory_budget_bytes / 2**20:.0f} MiB at {size} "
                f"and its recall ceiling {candidate['recall_ceiling']} reaches {recall_target}"])
            return candidate
    best = max(fitting, key=lambda c: c["recall_ceiling"])
    best["rationale"] = "; ".join(skipped + [
        f"nothing that fits is expected to reach recall {recall_target}: taking the highest "
        f"ceiling ({best['recall_ceiling']}), target at risk"])
    return best


def tune_search_params(operating_points: list[dict], recall_target: float) -> dict:
    """The fastest measured setting that reaches ``recall_target``, else the most accurate one.

    ``operating_points`` are dicts with params, qps and recall_at_k, as
    ``benchmark_index(..., sweep=True)`` measures them on held-out queries against exact
    search (autofaiss's tuning step). Returns that point plus ``meets_target``.
    """
    if not operating_points:
        raise ValueError("no operating points to tune from")
    reaching = [point for point in operating_points if point["recall_at_k"] >= recall_target]
    if reaching:
        return {**max(reaching, key=lambda point: point["qps"]), "meets_target": True}
    return {**max(operating_points, key=lambda point: (point["recall_at_k"], point["qps"])), "meets_target": False}


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
