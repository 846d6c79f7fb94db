"""Measuring indexes: recall against exact search, speed, and the operating points of a sweep.

Kept apart from the index code (as faiss keeps ``contrib/evaluation.py`` apart from its
indexes): nothing here changes how an index is built or searched.
"""
from __future__ import annotations

import time

import faiss
import numpy as np

from .faiss_index import (DEFAULT_EF_SEARCH, MAX_TRAIN_VECTORS, as_matrix, index_components, parse_search_params,
                          build_index, default_search_params, disk_bytes_per_vector, index_bytes_per_vector,
                          resolve_factory, search)


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


def compare_rankings(ids_a, scores_a, ids_b, scores_b, atol: float = 1e-5) -> dict:
    """How far two top-k lists of the same queries (e.g. two engines' exact search) agree.

    Where the lists differ at a slot, the two engines put different items at that rank; if
    their scores there agree within ``atol``, those items tie (equal or near-equal distance)
    and either order is right. Returns rows, identical_rows (same ids in the same order),
    tied_rows (rows that differ only at tied slots), other_rows (rows that differ at a slot
    whose scores differ by more than ``atol``: a real disagreement), differing_slots, and
    max_gap_at_differing_slots / max_score_difference (largest |score_a - score_b| over the
    differing slots / over all slots; 0.0 when there are none).
    """
    ids_a, ids_b = np.asarray(ids_a), np.asarray(ids_b)
    scores_a, scores_b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if ids_a.shape != ids_b.shape or scores_a.shape != ids_a.shape or scores_b.shape != ids_b.shape:
        raise ValueError(f"shapes differ: ids {ids_a.shape} / {ids_b.shape}, "
                         f"scores {scores_a.shape} / {scores_b.shape}")
    differ = ids_a != ids_b
    gap = np.abs(scores_a - scores_b)
    real = differ & (gap > atol)
    return {
        "rows": int(len(ids_a)),
        "identical_rows": int((~differ).all(axis=1).sum()),
        "tied_rows": int((differ.any(axis=1) & ~real.any(axis=1)).sum()),
        "other_rows": int(real.any(axis=1).sum()),
        "differing_slots": int(differ.sum()),
        "max_gap_at_differing_slots": float(gap[differ].max()) if differ.any() else 0.0,
        "max_score_difference": float(gap.max()) if gap.size else 0.0,
    }


def measure_store(store, queries, k: int, exact_ids, single_queries: int = 100, min_seconds: float = 0.2) -> dict:
    """Recall against exact search and speed of one vector store (anything with ``search(queries, k)``: a row store).

    ``queries`` are searched as one batch (first searched once untimed: that is when a store
    builds or loads its index) and the batch is repeated until ``min_seconds`` have passed
    (at most 20 times): ``qps``. The first ``single_queries`` are then searched one request
    each, as an application would: ``latency_ms_p50`` / ``latency_ms_p95``. ``recall_at_k``
    compares the batch's ids with ``exact_ids`` (padding ids -1 never count).
    """
    queries = np.asarray(queries, dtype=np.float32)
    _, ids = store.search(queries, k)
    rounds, elapsed = 0, 0.0
    while rounds == 0 or (elapsed < min_seconds and rounds < 20):
        started = time.perf_counter()
        store.search(queries, k)
        elapsed += time.perf_counter() - started
        rounds += 1
    latencies = []
    for query in queries[:single_queries]:
        started = time.perf_counter()
        store.search(query[None], k)
        latencies.append(time.perf_counter() - started)
    return {"recall_at_k": recall_vs_exact(ids, exact_ids, k), "qps": rounds * len(queries) / elapsed,
            "latency_ms_p50": 1000 * float(np.percentile(latencies, 50)),
            "latency_ms_p95": 1000 * float(np.percentile(latencies, 95))}


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
    storage_dir=None,
    keep_index: bool = False,
) -> dict:
    """Build ``factory`` over ``vectors``, search all ``queries`` as one batch, and measure.

    ``params`` override the defaults of :func:`default_search_params`. Returns name (default:
    the factory as given), factory (resolved), params (all in effect), metric, n, d, k,
    build_s (train + add, and writing the vectors file of an ``,RDisk`` index, which goes to
    ``storage_dir``), bytes_per_vector (in memory), disk_bytes_per_vector (the vectors file of an
    ``,RDisk`` index, else 0), qps, and recall_at_k / recall_at_10 against ``exact_ids`` (None
    without them; recall_at_10 also when k < 10); with ``keep_index``, also the built "index". Timings use
    time.perf_counter; the batch is repeated until 0.2 s have passed (at most 20 times), so
    fast indexes are not timed on a single blip. With ``sweep``, the same index is also
    measured at every setting of :func:`search_param_grid` ("operating_points": params, qps,
    recall_at_k, recall_at_10).
    """
    vectors = as_matrix(vectors, "vectors")
    n, d = vectors.shape
    started = time.perf_counter()
    index = build_index(vectors, factory, metric, seed, threads=threads, max_train=max_train,
                        coarse_centroids=coarse_centroids, storage_dir=storage_dir)
    build_s = time.perf_counter() - started
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    in_effect = dict(parse_search_params(default_search_params(index)))
    in_effect.update(parse_search_params(params))

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
        "disk_bytes_per_vector": disk_bytes_per_vector(index),
        **_measure_search(index, queries, k, metric, exact_ids, threads),
    }
    if sweep:
        row["operating_points"] = []
        for setting in search_param_grid(index):
            faiss.ParameterSpace().set_index_parameters(index, setting)
            row["operating_points"].append({"params": setting,
                                            **_measure_search(index, queries, k, metric, exact_ids, threads)})
    if keep_index:
        row["index"] = index
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
SWEEP_REFINE_K_FACTOR = (2, 4, 8, 16, 32, 64)


def search_param_grid(index: faiss.Index) -> list[str]:
    """ParameterSpace settings that trace an index's speed/recall curve.

    IVF: nprobe in ``SWEEP_NPROBE`` up to nlist (a graph coarse quantizer gets efSearch
    >= 2*nprobe, as by default); HNSW: efSearch in ``SWEEP_EF_SEARCH``; re-ranking: every
    k_factor_rf in ``SWEEP_REFINE_K_FACTOR`` for each nprobe. Empty for indexes without
    search parameters (Flat, SQ8, PQ).
    """
    axes: list[list[str]] = []
    refine_axis = None
    for node, _ in index_components(index):
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


