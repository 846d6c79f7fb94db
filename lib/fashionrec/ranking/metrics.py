"""Retrieval metrics and bootstrap confidence intervals, per query, in pure numpy.

Protocol: every query ranks the gallery; a result is relevant when its category equals the
query's (or, with :func:`attribute_keys`, when all named attribute columns, e.g. category and
colour, equal the query's). Inputs are per-query arrays:

* ``relevance``: array of shape ``(n_queries, n_results)``, bool (or 0/1); row ``i`` says which of
  query ``i``'s ranked results are relevant. Only the first ``k`` columns are scored.
* ``n_relevant``: int array of shape ``(n_queries,)``, the number of relevant items in the whole
  gallery for each query (the recall denominator).

Conventions shared by every function:

* ``k`` must be an integer with ``1 <= k <= relevance.shape[1]``.
* Zero queries is valid input: per-query functions return an empty float array, means and
  bootstrap bounds are NaN.
* A query with ``n_relevant == 0`` (its category is absent from the gallery) scores recall 0 and
  AP 0 rather than NaN, so that it counts as a failure in every mean instead of silently dropping
  out of it.
* A query may not have more relevant results in ``relevance`` than ``n_relevant`` says exist: that
  usually means the query retrieved itself but was not counted in the gallery, and it would push
  recall above 1, so it raises ``ValueError``.

"Hit rate@k" is what the metric-learning literature calls "Recall@k" (Song et al. 2016, Stanford
Online Products): the share of queries with at least one relevant result in the top k. Here
``recall_at_k`` is the information-retrieval recall, relevant results found over relevant items
that exist; the two names are kept apart on purpose.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

# Upper bound on the number of resampled indices held in memory at once (64 MiB of int64).
# Results do not depend on it: numpy's Generator draws the same stream in chunks as in one call.
_BOOTSTRAP_CHUNK_ELEMENTS = 8_000_000

__all__ = [
    "precision_at_k",
    "hit_rate_at_k",
    "recall_at_k",
    "average_precision_at_k",
    "map_at_k",
    "retrieval_metrics",
    "relevance_from_labels",
    "n_relevant_from_labels",
    "attribute_keys",
    "relevance_from_keys",
    "n_relevant_from_keys",
    "summarize",
    "per_category",
    "bootstrap_ci",
    "bootstrap_cis",
    "paired_bootstrap",
    "retrieval_confusion",
]


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def _is_integer(value) -> bool:
    # bool is an Integral in Python, but k=True is always a bug.
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _check_k(k, n_results: int) -> int:
    if not _is_integer(k):
        raise ValueError(f"k must be an integer, got {k!r} ({type(k).__name__})")
    if not 1 <= k <= n_results:
        raise ValueError(f"k must satisfy 1 <= k <= {n_results} (results per query), got k={k}")
    return int(k)


def _as_relevance(relevance: ArrayLike) -> np.ndarray:
    array = np.asarray(relevance)
    if array.ndim != 2:
        raise ValueError(
            f"relevance must be 2-D (n_queries, n_results), got shape {array.shape}"
        )
    if array.dtype == bool:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"relevance must be boolean or 0/1 numbers, got dtype {array.dtype}")
    if not np.isin(array, (0, 1)).all():
        raise ValueError("relevance must contain only 0/1 (or True/False) values")
    return array.astype(bool)


def _as_top_k_relevance(relevance: ArrayLike, k) -> np.ndarray:
    array = _as_relevance(relevance)
    k = _check_k(k, array.shape[1])
    return array[:, :k]


def _as_n_relevant(n_relevant: ArrayLike, relevance: np.ndarray) -> np.ndarray:
    counts = np.asarray(n_relevant)
    n_queries = relevance.shape[0]
    if counts.shape != (n_queries,):
        raise ValueError(
            f"n_relevant must have shape ({n_queries},) to match relevance, got {counts.shape}"
        )
    if counts.size and not (
        np.issubdtype(counts.dtype, np.integer)
        or (np.issubdtype(counts.dtype, np.floating) and np.isfinite(counts).all()
            and (counts == np.round(counts)).all())
    ):
        raise ValueError(f"n_relevant must hold whole numbers (counts), got {counts.dtype} values")
    counts = counts.astype(np.int64)
    if (counts < 0).any():
        raise ValueError("n_relevant must be >= 0")
    hits_in_results = relevance.sum(axis=1)
    inconsistent = np.flatnonzero(hits_in_results > counts)
    if inconsistent.size:
        first = inconsistent[0]
        raise ValueError(
            f"{inconsistent.size} queries have more relevant results than n_relevant allows "
            f"(e.g. query {first}: {hits_in_results[first]} relevant results, "
            f"n_relevant={counts[first]}); was the query itself retrieved but not counted?"
        )
    return counts


def _as_values(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D per-query array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _as_per_query_table(per_query: Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
    if not isinstance(per_query, Mapping):
        raise ValueError(f"per_query must be a mapping name -> array, got {type(per_query).__name__}")
    if not per_query:
        raise ValueError("per_query is empty: no metrics given")
    table = {name: _as_values(values, f"per_query[{name!r}]") for name, values in per_query.items()}
    lengths = {name: len(values) for name, values in table.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-query arrays must all have the same length, got {lengths}")
    return table


def _as_labels(labels: ArrayLike, name: str, ndim: int) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    return array


def _as_query_and_result_labels(query_labels, result_labels_matrix):
    queries = _as_labels(query_labels, "query_labels", 1)
    results = _as_labels(result_labels_matrix, "result_labels_matrix", 2)
    if results.shape[0] != queries.shape[0]:
        raise ValueError(
            f"result_labels_matrix has {results.shape[0]} rows but there are "
            f"{queries.shape[0]} query labels"
        )
    return queries, results


# --------------------------------------------------------------------------------------------
# Per-query metrics
# --------------------------------------------------------------------------------------------


def precision_at_k(relevance: ArrayLike, k: int) -> np.ndarray:
    """Share of the top ``k`` results that are relevant, per query."""
    top_k = _as_top_k_relevance(relevance, k)
    return top_k.sum(axis=1) / top_k.shape[1]


def hit_rate_at_k(relevance: ArrayLike, k: int) -> np.ndarray:
    """1.0 where at least one of the top ``k`` results is relevant, else 0.0, per query.

    This is "Recall@k" in the metric-learning literature (Song et al. 2016, SOP).
    """
    top_k = _as_top_k_relevance(relevance, k)
    return top_k.any(axis=1).astype(float)


def recall_at_k(relevance: ArrayLike, n_relevant: ArrayLike, k: int) -> np.ndarray:
    """Relevant results in the top ``k`` over relevant items in the gallery, per query.

    A query with ``n_relevant == 0`` scores 0. Recall cannot reach 1 when ``n_relevant > k``.
    """
    full = _as_relevance(relevance)
    top_k = _as_top_k_relevance(full, k)
    counts = _as_n_relevant(n_relevant, full)
    hits = top_k.sum(axis=1)
    return np.divide(hits, counts, out=np.zeros(len(counts)), where=counts > 0)


def average_precision_at_k(relevance: ArrayLike, n_relevant: ArrayLike, k: int) -> np.ndarray:
    """AP@k per query: ``sum_{i<=k} P@i * rel_i / min(k, n_relevant)``.

    Normaliser: ``min(k, n_relevant)`` is the most relevant results a top-k list can hold, so a
    ranking that is as good as possible within k scores exactly 1, whatever the gallery size.
    The alternatives were rejected: dividing by ``n_relevant`` caps AP below 1 whenever a category
    has more than k items (so AP@10 on a 500-item category would measure category size, not
    ranking quality); dividing by the hits found ignores missed items entirely (one lucky hit at
    rank 1 scores 1). A query with ``n_relevant == 0`` scores 0.
    """
    full = _as_relevance(relevance)
    top_k = _as_top_k_relevance(full, k)
    counts = _as_n_relevant(n_relevant, full)
    ranks = np.arange(1, top_k.shape[1] + 1)
    precision_at_each_rank = np.cumsum(top_k, axis=1) / ranks
    precision_sum = (precision_at_each_rank * top_k).sum(axis=1)
    normaliser = np.minimum(counts, top_k.shape[1])
    return np.divide(
        precision_sum, normaliser, out=np.zeros(len(counts)), where=normaliser > 0
    )


def map_at_k(relevance: ArrayLike, n_relevant: ArrayLike, k: int) -> float:
    """Mean of :func:`average_precision_at_k` over queries (NaN for zero queries)."""
    return _mean(average_precision_at_k(relevance, n_relevant, k))


def retrieval_metrics(relevance: ArrayLike, n_relevant: ArrayLike, k: int) -> dict[str, np.ndarray]:
    """All per-query metrics at ``k`` in one dict (``map_at_k`` holds per-query AP@k).

    Keys: ``precision_at_k``, ``hit_rate_at_k``, ``recall_at_k``, ``map_at_k``, ``hit_rate_at_1``.
    Per-query arrays rather than means, so that :func:`bootstrap_cis`, :func:`paired_bootstrap`
    and :func:`per_category` can be applied to the result.
    """
    return {
        "precision_at_k": precision_at_k(relevance, k),
        "hit_rate_at_k": hit_rate_at_k(relevance, k),
        "recall_at_k": recall_at_k(relevance, n_relevant, k),
        "map_at_k": average_precision_at_k(relevance, n_relevant, k),
        "hit_rate_at_1": hit_rate_at_k(relevance, 1),
    }


# --------------------------------------------------------------------------------------------
# From category labels to relevance
# --------------------------------------------------------------------------------------------


def relevance_from_labels(query_labels: ArrayLike, result_labels_matrix: ArrayLike) -> np.ndarray:
    """Bool matrix: ``result_labels_matrix[i, j] == query_labels[i]``.

    ``result_labels_matrix`` holds the category of each ranked result (gallery labels indexed by
    the search ids), shape ``(n_queries, n_results)``.
    """
    queries, results = _as_query_and_result_labels(query_labels, result_labels_matrix)
    return np.asarray(results == queries[:, None], dtype=bool)


def relevance_of_ranked(query_labels: ArrayLike, gallery_labels: ArrayLike, positions: np.ndarray) -> np.ndarray:
    """Bool matrix: the gallery item ranked at ``positions[i, j]`` has query ``i``'s label.

    A slot holding -1 (an approximate index found fewer than k allowed items) is not relevant.
    """
    gallery_labels = np.asarray(gallery_labels)
    result_labels = np.where(positions >= 0, gallery_labels[np.clip(positions, 0, None)], None)
    return relevance_from_labels(query_labels, result_labels)


def n_relevant_from_labels(query_labels: ArrayLike, gallery_labels: ArrayLike) -> np.ndarray:
    """Number of gallery items sharing each query's category (0 if the category is absent).

    The count includes the query itself when it is also in the gallery; when it is excluded
    from its own results (leave-one-out), subtract 1 for those queries.
    """
    queries = _as_labels(query_labels, "query_labels", 1)
    gallery = _as_labels(gallery_labels, "gallery_labels", 1)
    if gallery.size == 0:
        return np.zeros(len(queries), dtype=np.int64)
    categories, counts = np.unique(gallery, return_counts=True)
    positions = np.searchsorted(categories, queries)
    in_range = positions < len(categories)
    found = np.zeros(len(queries), dtype=bool)
    found[in_range] = categories[positions[in_range]] == queries[in_range]
    return np.where(found, counts[np.minimum(positions, len(categories) - 1)], 0).astype(np.int64)


# --------------------------------------------------------------------------------------------
# From several attribute columns (category, colour, ...) to relevance
# --------------------------------------------------------------------------------------------

MISSING_KEY = -1


def attribute_keys(queries: pd.DataFrame, gallery: pd.DataFrame,
                   columns: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """One integer key per query and per gallery row: equal keys = equal values in every one of ``columns``.

    A row with a missing value (NaN, None or an empty string) in any of ``columns`` gets
    ``MISSING_KEY`` (-1), which :func:`relevance_from_keys` and :func:`n_relevant_from_keys` never
    count as a match: an item whose colour nobody recorded cannot be judged the right colour.
    Values are compared as stripped strings, so ``"red"`` and ``"red "`` match, ``"Red"`` does not.
    """
    columns = list(columns)
    if not columns:
        raise ValueError("relevance needs at least one column")
    missing = [column for column in columns if column not in queries.columns or column not in gallery.columns]
    if missing:
        raise ValueError(f"relevance column(s) {missing} not in the query/gallery tables")
    both = pd.concat([queries[columns], gallery[columns]], ignore_index=True)
    text = both.apply(lambda column: column.astype("string").str.strip())
    lacking = (text.isna() | (text == "")).any(axis=1).to_numpy()
    # The unit separator cannot occur in a CSV cell a person typed, so joined values are unambiguous.
    joined = text.fillna("").agg("\x1f".join, axis=1)
    codes = np.asarray(pd.factorize(joined)[0], dtype=np.int64)
    codes[lacking] = MISSING_KEY
    return codes[:len(queries)], codes[len(queries):]


def relevance_from_keys(query_keys: ArrayLike, result_keys_matrix: ArrayLike) -> np.ndarray:
    """Bool matrix: ``result_keys_matrix[i, j] == query_keys[i]``, never true for a negative key.

    Keys come from :func:`attribute_keys`; a result position an index could not fill is any
    negative number (e.g. -2), so it never matches either.
    """
    queries, results = _as_query_and_result_labels(query_keys, result_keys_matrix)
    return np.asarray((results == queries[:, None]) & (queries[:, None] >= 0), dtype=bool)


def n_relevant_from_keys(query_keys: ArrayLike, gallery_keys: ArrayLike) -> np.ndarray:
    """Number of gallery items with each query's key (0 for a query whose key is missing)."""
    queries = _as_labels(query_keys, "query_keys", 1)
    gallery = _as_labels(gallery_keys, "gallery_keys", 1)
    counts = n_relevant_from_labels(queries, gallery)
    return np.where(queries >= 0, counts, 0).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def _mean(values: np.ndarray) -> float:
    # np.mean of an empty array warns and returns NaN; NaN is the intended answer, the warning is noise.
    return float(values.mean()) if values.size else float("nan")


def summarize(per_query: Mapping[str, ArrayLike]) -> dict[str, float]:
    """Mean of each per-query metric, as plain floats (NaN when there are zero queries)."""
    table = _as_per_query_table(per_query)
    return {name: _mean(values) for name, values in table.items()}


def per_category(per_query: Mapping[str, ArrayLike], query_labels: ArrayLike) -> pd.DataFrame:
    """Mean of each metric per query category, plus ``support`` (number of queries).

    Indexed by category (index name ``category``), sorted by category name; columns are the
    metrics in ``per_query`` order followed by ``support``.
    """
    table = _as_per_query_table(per_query)
    labels = _as_labels(query_labels, "query_labels", 1)
    n_queries = len(next(iter(table.values())))
    if len(labels) != n_queries:
        raise ValueError(
            f"query_labels has {len(labels)} entries but the per-query arrays have {n_queries}"
        )
    if "support" in table:
        raise ValueError("a metric named 'support' would clash with the support column")
    frame = pd.DataFrame(table)
    grouped = frame.groupby(pd.Index(labels, name="category"), sort=True)
    result = grouped.mean()
    result["support"] = grouped.size().astype(np.int64)
    return result


# --------------------------------------------------------------------------------------------
# Bootstrap over queries
# --------------------------------------------------------------------------------------------


def _check_bootstrap_args(n_boot, seed, alpha) -> None:
    if not _is_integer(n_boot) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not _is_integer(seed) or seed < 0:
        # None would draw fresh OS entropy and make every report unreproducible.
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")


def _bootstrap_means(rows: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``rows`` (shape ``(n_metrics, n)``) over ``n_boot`` resamples of the n columns.

    Every metric row is resampled with the same indices, so metrics of one resample describe
    the same set of queries. Returns shape ``(n_boot, n_metrics)``.
    """
    n = rows.shape[1]
    rng = np.random.default_rng(seed)
    resamples_per_chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    chunks = []
    for start in range(0, n_boot, resamples_per_chunk):
        indices = rng.integers(0, n, size=(min(resamples_per_chunk, n_boot - start), n))
        # One metric at a time: a joint (n_metrics, chunk, n) reduction rounds differently,
        # so a metric's interval would shift in the last bits with the other metrics passed.
        chunks.append(np.stack([values[indices].mean(axis=1) for values in rows], axis=1))
    return np.concatenate(chunks)


def _percentile_interval(boot_means: np.ndarray, alpha: float) -> np.ndarray:
    """Rows ``(low, high)`` of the percentile interval, one column per metric."""
    return np.quantile(boot_means, [alpha / 2, 1 - alpha / 2], axis=0)


def bootstrap_cis(
    per_query: Mapping[str, ArrayLike], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap ``(1 - alpha)`` interval for the mean of each per-query metric.

    Queries are resampled with replacement; all metrics share the same resampled indices, so
    their intervals come from the same pseudo-datasets. Deterministic for a given ``seed``.
    Zero queries give ``(nan, nan)``.
    """
    _check_bootstrap_args(n_boot, seed, alpha)
    table = _as_per_query_table(per_query)
    rows = np.stack(list(table.values()))
    if rows.shape[1] == 0:
        return {name: (float("nan"), float("nan")) for name in table}
    bounds = _percentile_interval(_bootstrap_means(rows, n_boot, seed), alpha)
    return {name: (float(bounds[0, i]), float(bounds[1, i])) for i, name in enumerate(table)}


def bootstrap_ci(
    values: ArrayLike, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile-bootstrap ``(1 - alpha)`` interval ``(low, high)`` for the mean of ``values``.

    Same resampling as :func:`bootstrap_cis` (identical result for the same seed).
    Zero values give ``(nan, nan)``.
    """
    return bootstrap_cis({"values": values}, n_boot=n_boot, seed=seed, alpha=alpha)["values"]


def paired_bootstrap(
    a: ArrayLike, b: ArrayLike, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict:
    """Paired bootstrap of ``mean(a - b)``, where ``a[i]`` and ``b[i]`` score the same query.

    Resampling the per-query differences resamples the same queries for both systems, which
    cancels the (usually large) query-difficulty variance an unpaired comparison would keep.
    Returns ``diff`` (observed mean difference), ``low``/``high`` (percentile interval) and
    ``significant`` (the interval excludes 0). Zero queries give NaNs and not significant.
    """
    first = _as_values(a, "a")
    second = _as_values(b, "b")
    if first.shape != second.shape:
        raise ValueError(
            f"a and b must score the same queries: lengths {len(first)} and {len(second)} differ"
        )
    differences = first - second
    low, high = bootstrap_ci(differences, n_boot=n_boot, seed=seed, alpha=alpha)
    return {
        "diff": _mean(differences),
        "low": low,
        "high": high,
        # NaN bounds (no queries) compare False both ways, which would read as significant.
        "significant": bool(differences.size and not low <= 0 <= high),
    }


# --------------------------------------------------------------------------------------------
# Which categories come back for which
# --------------------------------------------------------------------------------------------


def retrieval_confusion(
    query_labels: ArrayLike,
    result_labels_matrix: ArrayLike,
    k: int,
    categories: Sequence | None = None,
) -> pd.DataFrame:
    """Share of top-``k`` results of each category, per query category (rows sum to 1).

    Rows (index ``query_category``) are the categories that have at least one query, columns
    (``retrieved_category``) are all categories, both in ``categories`` order. By default
    ``categories`` is the sorted union of query labels and top-k result labels; pass it
    explicitly to give several models' heatmaps the same columns. Every query weighs the same,
    since each contributes exactly k results.
    """
    queries, results = _as_query_and_result_labels(query_labels, result_labels_matrix)
    k = _check_k(k, results.shape[1])
    top_k = results[:, :k]
    if categories is None:
        axis = pd.Index(np.unique(np.concatenate([queries, top_k.ravel()])))
    else:
        axis = pd.Index(list(categories))
        if axis.has_duplicates:
            raise ValueError("categories contains duplicates")
    query_codes = axis.get_indexer(queries)
    result_codes = axis.get_indexer(top_k.ravel())
    unknown = np.concatenate([queries[query_codes < 0], top_k.ravel()[result_codes < 0]])
    if unknown.size:
        raise ValueError(f"labels missing from categories: {sorted(set(unknown.tolist()), key=str)}")
    n_categories = len(axis)
    pair_codes = np.repeat(query_codes, k) * n_categories + result_codes
    counts = np.bincount(pair_codes, minlength=n_categories * n_categories).reshape(
        n_categories, n_categories
    )
    has_queries = np.bincount(query_codes, minlength=n_categories) > 0
    counts = counts[has_queries]
    shares = counts / counts.sum(axis=1, keepdims=True)
    return pd.DataFrame(
        shares,
        index=pd.Index(axis[has_queries], name="query_category"),
        columns=pd.Index(axis, name="retrieved_category"),
    )
