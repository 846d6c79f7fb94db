"""The ranking policies: each one small object holding its parameters, composed by :mod:`fashionrec.ranking.rank`.

Row filters say which catalog rows may be returned; each gives a boolean mask over the rows,
and a ranking allows a row only when every filter does:

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
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import FashionRecError

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


def candidate_count(k: int, n_rows: int) -> int:
    """How many candidates an approximate index proposes for colour re-ranking to the top ``k``."""
    return min(n_rows, max(MIN_RERANK_CANDIDATES, RERANK_CANDIDATES_PER_RESULT * k))


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
