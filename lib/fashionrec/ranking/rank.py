"""The ranking core both towers run: the ranking policies, and :func:`rank`, which applies them to a store.

``evaluate`` ranks a whole query split in one call, the :class:`~fashionrec.serving.recommender.Recommender`
one shopper's photo; both call :func:`rank` with a :class:`Ranking` of the policies below, so
what the protocol measures is what the product serves.

The policies: each one small object holding its parameters. Row filters say which catalog rows
may be returned; each gives a boolean mask over the rows, and a ranking allows a row only when
every filter does:

* :class:`LiveRows`: not removed (an index folder's tombstones);
* :class:`CategoryFilter`: of one category;
* :class:`ExcludedRows`: never these rows (the query's own copies, ids a caller excludes);
* :class:`AllowedRows`: any other mask a caller computes, e.g. attribute filters over the items table.

Two policies change the order:

* :class:`CategoryBonus`: ``boost`` added to the similarity of the rows whose category is the
  query's (predicted) one; ``inf`` ranks those first. Whether the rows' categories are the
  catalog's labels (``known``: a shop knows what it sells) or a classifier's predictions
  (``predicted``: the protocol of record, where the gallery's labels stay hidden) is the
  policy's ``gallery`` parameter: the same code ranks both.
* :class:`ColourFusion`: ranks by ``(1 - w) x network similarity + w x product-colour similarity``.

With a :class:`CategoryBonus` each query searches twice, over the allowed rows of its category
and over the other allowed rows, and the two lists merge after the bonus: with an exhaustive
store that is exactly "similarity + boost x same category" over every allowed row, and
``boost = inf`` puts the query's category first without ever returning fewer than k results.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import BadParameter, FashionRecError
from ..indexing.faiss_index import resolve_factory
from ..indexing.milvus_store import temporary_collection_name
from ..settings import StoreSettings
from .milvus import MilvusRowStore, milvus_uri
from .store import FaissRowStore

GALLERY_CATEGORIES = ("known", "predicted")
# Larger than any difference of two cosine scores: where scores are added up at once (the model
# search's validation sweep), a bonus of inf is written as this.
HARD_BOOST = 4.0
# Candidates an approximate index proposes for colour re-ranking: enough that a colour match ranked
# 100th by the network alone can still reach the top k, few enough to re-score in microseconds.
RERANK_CANDIDATES_PER_RESULT = 10
MIN_RERANK_CANDIDATES = 100


class RowFilter(Protocol):
    """Which rows a ranking may return."""

    def mask(self, n_rows: int) -> np.ndarray:
        """A boolean array over the ``n_rows`` rows: True where the row is allowed."""


@dataclass(frozen=True)
class LiveRows:
    """Rows not removed: ``deleted`` marks the tombstones."""

    deleted: np.ndarray

    def mask(self, n_rows: int) -> np.ndarray:
        return ~np.asarray(self.deleted, dtype=bool)


@dataclass(frozen=True)
class CategoryFilter:
    """Only rows of ``category``; ``row_categories`` holds each row's."""

    category: str
    row_categories: np.ndarray

    def mask(self, n_rows: int) -> np.ndarray:
        return np.asarray(self.row_categories) == self.category


@dataclass(frozen=True)
class ExcludedRows:
    """Never these rows."""

    rows: tuple[int, ...]

    def mask(self, n_rows: int) -> np.ndarray:
        allowed = np.ones(n_rows, dtype=bool)
        allowed[list(self.rows)] = False
        return allowed


@dataclass(frozen=True)
class AllowedRows:
    """Only the rows ``allowed`` marks True (a mask a caller computed, e.g. from attribute columns)."""

    allowed: np.ndarray

    def mask(self, n_rows: int) -> np.ndarray:
        allowed = np.asarray(self.allowed, dtype=bool)
        if allowed.shape != (n_rows,):
            raise FashionRecError(f"an allowed-rows mask needs one value per row ({n_rows}), got shape {allowed.shape}")
        return allowed


def allowed_mask(filters, n_rows: int) -> np.ndarray | None:
    """The rows every filter allows (None: no filter, every row)."""
    allowed = None
    for row_filter in filters:
        mask = row_filter.mask(n_rows)
        allowed = mask.copy() if allowed is None else allowed & mask
    return allowed


@dataclass(frozen=True)
class CategoryBonus:
    """``boost`` added to the similarity of rows of the query's category (``inf``: those first, by similarity).

    ``row_categories``: each row's category, the catalog's labels (``gallery="known"``) or a
    classifier's predictions (``gallery="predicted"``). Scores stay similarities; only the order
    carries the bonus. Similarities only: the l2 metric cannot take a bonus.
    """

    boost: float
    row_categories: np.ndarray
    gallery: str = "known"

    def __post_init__(self):
        if self.gallery not in GALLERY_CATEGORIES:
            raise FashionRecError(f"gallery categories must be one of {', '.join(GALLERY_CATEGORIES)}, "
                                  f"got {self.gallery!r}")
        if not self.boost >= 0:
            raise FashionRecError(f"a category boost must be >= 0 (inf: the category first), got {self.boost!r}")

    def describe(self) -> dict:
        return {"boost": "inf" if math.isinf(self.boost) else float(self.boost), "categories": self.gallery}


@dataclass(frozen=True)
class ColourFusion:
    """Ranks by ``(1 - weight) x network cosine + weight x colour cosine``; ``row_colour``: each row's descriptor.

    An exhaustive store scores every allowed row; an approximate one proposes
    :meth:`candidates` rows by the network alone, which the fused score re-ranks.
    """

    weight: float
    row_colour: np.ndarray

    def __post_init__(self):
        if not 0.0 < self.weight <= 1.0:
            raise FashionRecError(f"a colour fusion weight must be in (0, 1], got {self.weight!r} (0: no fusion)")

    @staticmethod
    def candidates(k: int, n_rows: int) -> int:
        return candidate_count(k, n_rows)

    def fused(self, network_scores: np.ndarray, rows: np.ndarray, query_colour: np.ndarray) -> np.ndarray:
        """The fused score of ``rows`` (valid rows only) given their network similarities."""
        stored = unit_rows(np.asarray(self.row_colour[rows], dtype=np.float32))
        query = unit_rows(np.asarray(query_colour, dtype=np.float32)[None])[0]
        return (1.0 - self.weight) * network_scores + self.weight * (stored @ query)

    def describe(self, exhaustive: bool, n_candidates: int) -> dict:
        return {"colour_weight": float(self.weight),
                "colour_fusion": "exact (every allowed row scored)" if exhaustive else
                f"re-ranked: the network index's {n_candidates} nearest, re-scored with the fused score"}


def check_colour_weight(weight: float, name: str = "--colour-weight") -> float:
    """``weight`` as a float in [0, 1]; BadParameter otherwise."""
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise BadParameter(f"{name} must be a number between 0 and 1, got {weight!r}") from None
    if not 0.0 <= value <= 1.0:
        raise BadParameter(f"{name} must be between 0 (network only) and 1 (colour only), got {weight!r}")
    return value


def candidate_count(k: int, n_rows: int) -> int:
    """How many candidates an approximate index proposes for colour re-ranking to the top ``k``."""
    return min(n_rows, max(MIN_RERANK_CANDIDATES, RERANK_CANDIDATES_PER_RESULT * k))


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


PAD_ROW = -1


@dataclass(frozen=True)
class Ranking:
    """The policies of one ranking: row filters (all must allow a row), a category bonus, a colour fusion.

    Another filter (attribute filters over the items table, say) is one more entry of ``filters``:
    any object with ``mask(n_rows)``, e.g. :class:`AllowedRows`.
    """

    filters: tuple = field(default_factory=tuple)
    bonus: CategoryBonus | None = None
    fusion: ColourFusion | None = None


def rank(store, queries: np.ndarray, k: int, ranking: Ranking = Ranking(), query_categories=None,
         query_colour: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows), each (n_queries, k), best first; slots beyond the allowed rows hold row -1 and score NaN.

    ``query_categories``: each query's category for the bonus (the classifier's prediction; a
    query without one, None, is ranked without the bonus). ``query_colour``: each query's
    colour descriptor, for the fusion. Scores are the similarities (fused, with a fusion); the
    bonus only orders.
    """
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    n_rows = store.ntotal
    allowed = allowed_mask(ranking.filters, n_rows)
    scores = np.full((len(queries), k), np.nan, dtype=np.float32)
    rows = np.full((len(queries), k), PAD_ROW, dtype=np.int64)
    bonus = ranking.bonus
    if bonus is not None and store.metric == "l2":
        raise ValueError("a category bonus adds to similarities: use the cosine or ip metric")
    if bonus is None or query_categories is None:
        groups = {None: np.arange(len(queries))}
    else:
        query_categories = np.asarray(query_categories, dtype=object)
        groups = {category: np.flatnonzero(query_categories == category)
                  for category in dict.fromkeys(query_categories.tolist())}
    for category, members in groups.items():
        colour = None if query_colour is None else np.asarray(query_colour)[members]
        if category is None:
            found = _ranked(store, queries[members], k, allowed, ranking.fusion, colour)
        else:
            same = np.asarray(bonus.row_categories) == category
            all_rows = np.ones(n_rows, dtype=bool) if allowed is None else allowed
            found = _merged(_ranked(store, queries[members], k, all_rows & same, ranking.fusion, colour),
                            _ranked(store, queries[members], k, all_rows & ~same, ranking.fusion, colour),
                            bonus.boost, k)
        scores[members, :found[0].shape[1]], rows[members, :found[1].shape[1]] = found
    return scores, rows


def _ranked(store, queries: np.ndarray, k: int, allowed: np.ndarray | None, fusion: ColourFusion | None,
            query_colour: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the allowed rows by network similarity, or by the fused score with ``fusion``."""
    n_allowed = store.ntotal if allowed is None else int(allowed.sum())
    if n_allowed == 0:
        return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
    if allowed is not None and n_allowed == len(allowed):
        allowed = None
    if fusion is None:
        return _padded(*store.search(queries, min(k, n_allowed), allowed))
    n_searched = n_allowed if store.exhaustive else fusion.candidates(k, n_allowed)
    network, candidates = store.search(queries, n_searched, allowed)
    out_scores = np.full((len(queries), min(k, n_allowed)), np.nan, dtype=np.float32)
    out_rows = np.full(out_scores.shape, PAD_ROW, dtype=np.int64)
    for i in range(len(queries)):
        valid = candidates[i] >= 0
        proposed = candidates[i][valid]
        fused = fusion.fused(network[i][valid], proposed, query_colour[i])
        order = np.argsort(-fused, kind="stable")[:out_scores.shape[1]]
        out_scores[i, :len(order)], out_rows[i, :len(order)] = fused[order], proposed[order]
    return out_scores, out_rows


def _padded(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float32).copy()
    scores[rows < 0] = np.nan
    return scores, np.asarray(rows, dtype=np.int64)


def _merged(same: tuple[np.ndarray, np.ndarray], others: tuple[np.ndarray, np.ndarray], boost: float,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the top k of both lists after ``boost`` is added to ``same``'s scores (ties: ``same`` first)."""
    scores = np.concatenate([same[0], others[0]], axis=1)
    rows = np.concatenate([same[1], others[1]], axis=1)
    group = np.concatenate([np.zeros(same[1].shape, np.int64), np.ones(others[1].shape, np.int64)], axis=1)
    valid = rows >= 0
    if math.isinf(boost):   # the category's rows first, each list by similarity
        primary, value = np.where(valid, group, 2), np.where(valid, scores, -np.inf)
    else:
        primary, value = np.where(valid, 0, 2), np.where(valid, scores + boost * (group == 0), -np.inf)
    position = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((position, group, -value, primary), axis=1)[:, :min(k, scores.shape[1])]
    return _padded(np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1))


@contextlib.contextmanager
def gallery_store(settings: StoreSettings, vectors: np.ndarray, labels, index: str = "Flat", metric: str = "cosine",
                  search_params: str = "", seed: int = 0):
    """A throwaway store of ``vectors`` (row i = vector i) of the kind ``settings`` names, closed (dropped) after.

    FAISS: in this process (``index`` a factory string or template, resolved for the size).
    Milvus: a temporary collection where ``settings`` says, dropped when the block ends.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if settings.store == "faiss":
        factory = resolve_factory(index, *vectors.shape)
        store = FaissRowStore.build(vectors, factory, metric, seed=seed, search_params=search_params,
                                    fallback_vectors=lambda rows: vectors[np.asarray(rows, dtype=np.int64)])
        yield store
        return
    store = MilvusRowStore.build(temporary_collection_name(), vectors, [str(label) for label in labels], index,
                                 metric, search_params, milvus_uri(settings), settings.milvus_token)
    try:
        yield store
    finally:
        store.discard(always=True)
