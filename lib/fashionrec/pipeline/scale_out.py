"""07-scale-out: FAISS and Milvus on the same embeddings, exact search compared slot by slot, ANN indexes measured.

The embeddings are the run's own (01-embed), of the first of its backbones that was available: the
catalog is every image outside the query split (train + gallery), the queries are the query
split. Both stores (the ranking core's row stores, :func:`fashionrec.ranking.rank.gallery_store`)
get the same float32 vectors as the same rows.

* Exact search (FAISS ``Flat`` and Milvus ``FLAT``): the top-k lists are compared slot by slot
  (:func:`fashionrec.indexing.measure.compare_rankings`); where they differ, the scores say
  whether the items tie (then either order is right) or one engine is wrong.
* ANN indexes, each store its own list: recall@k against exact search, batch queries per
  second, and the latency of single-query requests (:func:`fashionrec.indexing.measure.measure_store`).

Writes ``store_exact.json`` (the comparison), ``store_exact_differences.csv`` (every differing
slot with both scores) and ``store_ann.csv`` (measured on this machine, timings included).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import config
from ..errors import FashionRecError
from ..indexing.measure import compare_rankings, measure_store
from ..indexing.milvus_store import STORE_FAISS_INDEXES, STORE_MILVUS_INDEXES, is_lite_uri
from ..ranking.rank import gallery_store
from ..settings import StoreSettings
from .stages import MIN_GALLERY_FOR_INDEX_VARIANTS, available_backbones, load_prepared, load_run_embeddings, \
    run_dir, write_json

# Scores of two engines closer than this are the same distance computed in another order.
TIE_TOLERANCE = 1e-5
SINGLE_QUERIES = 100


@dataclass
class StoreComparison:
    """What 07-scale-out shows: exact agreement, the differing slots, and each ANN index measured."""

    backbone: str
    exact: dict
    differences: pd.DataFrame
    ann: pd.DataFrame

    def small_catalog_caveat(self) -> str | None:
        """What ANN measurements cannot show on this catalog; None on a large one."""
        n = self.exact["n_catalog"]
        if n >= MIN_GALLERY_FOR_INDEX_VARIANTS:
            return None
        return (f"The catalog holds only {n} vectors: exact search scans it in about a millisecond, the IVF "
                "indexes get a handful of lists, and recall near 1.0 says little about a catalog of realistic "
                f"size. Compare indexes on a catalog of {MIN_GALLERY_FOR_INDEX_VARIANTS:,}+ images.")


def stage_store_comparison(run_name: str, backbones: list[str], k: int = 10, metric: str = "cosine",
                           faiss_indexes=STORE_FAISS_INDEXES, milvus_indexes=STORE_MILVUS_INDEXES,
                           milvus_uri: str | None = None, single_queries: int = SINGLE_QUERIES) -> StoreComparison:
    """Both stores over the run's catalog, embedded with the first of ``backbones`` that 01-embed could run.

    ``milvus_uri`` None: Milvus Lite at ``results/<run>/milvus.db``; a relative Lite path starts
    at the repository root (as every path of a parameter file does).
    """
    out = run_dir(run_name)
    seed = load_prepared(run_name).split_seed
    available = available_backbones(run_name)
    backbone = next((name for name in backbones if name in available), None)
    if backbone is None:
        raise FashionRecError(f"run {run_name!r} has embeddings of {available or 'no backbone'}, none of {backbones}")
    vectors, metadata, _ = load_run_embeddings(run_name, backbone)
    is_query = (metadata["split"] == "query").to_numpy()
    catalog_vectors, query_vectors = vectors[~is_query], vectors[is_query]
    milvus = StoreSettings("milvus", _milvus_uri(milvus_uri, out))
    labels = metadata.loc[~is_query, "label"].astype(str).tolist()

    @contextlib.contextmanager
    def opened(settings: StoreSettings, index: str):
        started = time.perf_counter()
        with gallery_store(settings, catalog_vectors, labels, index, metric, seed=seed) as store:
            store.search(query_vectors[:1], k)  # where a store builds (faiss) or flushes and indexes (Milvus)
            yield store, time.perf_counter() - started

    rows = []
    with opened(StoreSettings(), "Flat") as (faiss_flat, build_s):
        exact_scores, exact_ids = faiss_flat.search(query_vectors, k)
        rows.append(_measured(faiss_flat, "Flat", build_s, query_vectors, k, exact_ids, single_queries))
    with opened(milvus, "Flat") as (milvus_flat, build_s):
        milvus_scores, milvus_ids = milvus_flat.search(query_vectors, k)
        rows.append(_measured(milvus_flat, "Flat", build_s, query_vectors, k, exact_ids, single_queries))
    exact = compare_rankings(exact_ids, exact_scores, milvus_ids, milvus_scores, atol=TIE_TOLERANCE)
    exact.update(backbone=backbone, k=k, metric=metric, n_catalog=len(catalog_vectors), n_queries=len(query_vectors),
                 dim=int(catalog_vectors.shape[1]), tie_tolerance=TIE_TOLERANCE)
    differences = _differing_slots(exact_ids, exact_scores, milvus_ids, milvus_scores)

    for settings, indexes in ((StoreSettings(), faiss_indexes), (milvus, milvus_indexes)):
        for index in indexes:
            with opened(settings, index) as (store, build_s):
                rows.append(_measured(store, index, build_s, query_vectors, k, exact_ids, single_queries))
    ann = pd.DataFrame(rows)
    write_json(out / "store_exact.json", exact)
    differences.to_csv(out / "store_exact_differences.csv", index=False)
    ann.to_csv(out / "store_ann.csv", index=False)
    return StoreComparison(backbone, exact, differences, ann)


def _measured(store, index: str, build_s: float, queries: np.ndarray, k: int, exact_ids, single_queries: int) -> dict:
    described = store.describe()
    engine_index = described["index_type"] if described["store"] == "milvus" else described["factory"]
    return {"store": described["store"], "index": index, "engine_index": engine_index,
            "build_params": described.get("build_params", ""), "search_params": described["search_params"],
            "n": store.ntotal, "build_s": round(build_s, 3),
            **measure_store(store, queries, k, exact_ids, single_queries=single_queries)}


def _milvus_uri(given: str | None, run_directory: Path) -> str:
    if given is None:
        return str(run_directory / "milvus.db")
    if is_lite_uri(given) and not Path(given).expanduser().is_absolute():
        return str(config.PROJECT_ROOT / given)
    return given


def _differing_slots(ids_a, scores_a, ids_b, scores_b) -> pd.DataFrame:
    queries, ranks = np.nonzero(np.asarray(ids_a) != np.asarray(ids_b))
    return pd.DataFrame({"query": queries, "rank": ranks + 1,
                         "faiss_id": ids_a[queries, ranks], "faiss_score": scores_a[queries, ranks],
                         "milvus_id": ids_b[queries, ranks], "milvus_score": scores_b[queries, ranks],
                         "score_gap": np.abs(scores_a[queries, ranks].astype(np.float64)
                                             - scores_b[queries, ranks].astype(np.float64))})
