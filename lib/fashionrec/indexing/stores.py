"""Vector stores: where a catalog's embeddings live and are searched, behind one small interface.

A store holds (id, vector, label) rows. ``id`` is an int64 that the caller chooses (a row
number of its catalog), ``label`` the item's category, kept so that a search can be limited
to one category and so that what comes back can be shown without another lookup.

Every store promises the same things, and the tests hold both backends to them together:

* ``add(ids, vectors, labels)``: ids are new (adding an id the store holds is an error, never
  a silent overwrite); all vectors have the store's dimension and are finite.
* ``remove(ids)``: removes those that are present and says how many that was.
* ``search(queries, k, category=None)``: ``(scores, ids)``, both (n_queries, k') with
  k' = min(k, rows searched); best first. Scores follow the metric (see
  :mod:`fashionrec.indexing.faiss_index`): cosine similarity (higher is closer), squared
  Euclidean distance (lower is closer) or inner product. An approximate index may find fewer
  than k' rows; those slots hold id -1 and a score worse than any real one.
* ``labels_of(ids)`` and the ids ``search`` returns round-trip exactly what was added.
* ``count(category=None)``, ``describe()`` (how it searches, for provenance), ``close()``.

Backends: :class:`FaissStore` (here; in-process, the default) and
:class:`fashionrec.indexing.milvus_store.MilvusStore` (Milvus Lite from a local file, or a
Milvus server or cluster by URI). :mod:`fashionrec.indexing.backends` opens one by name;
a new backend is one module implementing :class:`VectorStore` plus one line there.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd

from ..console import warn_once
from ..errors import FashionRecError, IndexBuildError
from .faiss_index import METRICS, build_index, resolve_factory, search

PAD_ID = -1


@runtime_checkable
class VectorStore(Protocol):
    """What every backend offers (see the module docstring for the promises)."""

    metric: str

    def add(self, ids, vectors, labels) -> None: ...

    def remove(self, ids) -> int: ...

    def search(self, queries, k: int, category: str | None = None) -> tuple[np.ndarray, np.ndarray]: ...

    def labels_of(self, ids) -> list[str]: ...

    def count(self, category: str | None = None) -> int: ...

    def describe(self) -> dict: ...

    def close(self) -> None: ...


class DuplicateIdError(FashionRecError, ValueError):
    """An id given to ``add`` is already in the store (or twice in one call)."""


class UnknownIdError(FashionRecError, KeyError):
    """``labels_of`` was asked about an id the store does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def checked_rows(ids, vectors, labels, dim: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``add``'s arguments as (int64 ids, float32 (n, d) vectors, str labels), or a ValueError saying what is wrong.

    ``dim`` is the store's dimension (None while it is empty: the vectors decide it).
    """
    ids = checked_ids(ids)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DuplicateIdError(f"ids repeat within one add: {unique[counts > 1][:10].tolist()}")
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"vectors must be ({len(ids)}, d) for {len(ids)} ids, got shape {vectors.shape}")
    if dim is not None and vectors.shape[1] != dim:
        raise ValueError(f"vectors have dimension {vectors.shape[1]}, the store holds dimension {dim}")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or infinite values")
    labels = [label for label in labels]
    if len(labels) != len(ids):
        raise ValueError(f"{len(labels)} labels for {len(ids)} ids")
    for label in labels:
        if not isinstance(label, str):
            raise ValueError(f"labels must be strings, got {type(label).__name__} {label!r}")
    return ids, vectors, labels


def checked_ids(ids) -> np.ndarray:
    """Ids as a 1-D int64 array; -1 is reserved for "no result"."""
    array = np.asarray(ids)
    if array.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {array.shape}")
    if len(array) and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if (array == PAD_ID).any():
        raise ValueError(f"id {PAD_ID} is reserved for empty result slots")
    return array


def checked_queries(queries, dim: int | None) -> np.ndarray:
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim != 2:
        raise ValueError(f"queries must be a 2-D array (n, d), got shape {queries.shape}")
    if dim is not None and queries.shape[1] != dim:
        raise ValueError(f"queries have dimension {queries.shape[1]}, the store holds dimension {dim}")
    if not np.isfinite(queries).all():
        raise ValueError("queries contain NaN or infinite values")
    return queries


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def empty_results(n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty((n_queries, 0), np.float32), np.empty((n_queries, 0), np.int64)


class FaissStore:
    """Rows kept in memory, searched with a faiss index from :func:`~fashionrec.indexing.faiss_index.build_index`.

    ``index`` is a faiss factory string or template (``"Flat"``, ``"HNSW32"``,
    ``"IVF{nlist},Flat"``...), ``search_params`` a faiss ParameterSpace string, ``seed`` the
    build seed. The index is (re)built from the kept vectors on the first search after a change:
    faiss's graph indexes cannot remove rows, and a rebuild gives the same index a fresh build
    on the final catalog would (identical results, which the Milvus comparison relies on).
    A category search uses an index of the same kind over that category's rows; a category
    too small to train it (e.g. fewer than 256 rows for 8-bit PQ) is searched exactly, and
    the store says so once.
    """

    def __init__(self, metric: str = "cosine", index: str = "Flat", search_params: str = "", seed: int = 0,
                 threads: int | None = None):
        check_metric(metric)
        self.metric = metric
        self.factory = index
        self.search_params = search_params
        self.seed = seed
        self.threads = threads
        self._ids = np.empty(0, np.int64)
        self._vectors: np.ndarray | None = None
        self._labels = np.empty(0, object)
        self._indexes: dict[str | None, tuple] = {}  # category (None: all rows) -> (faiss index, row positions)

    @property
    def dim(self) -> int | None:
        return None if self._vectors is None else int(self._vectors.shape[1])

    def add(self, ids, vectors, labels) -> None:
        ids, vectors, labels = checked_rows(ids, vectors, labels, self.dim)
        present = np.isin(ids, self._ids)
        if present.any():
            raise DuplicateIdError(f"ids already in the store: {ids[present][:10].tolist()}; remove them first")
        self._ids = np.concatenate([self._ids, ids])
        self._vectors = vectors.copy() if self._vectors is None else np.concatenate([self._vectors, vectors])
        self._labels = np.concatenate([self._labels, np.array(labels, dtype=object)])
        self._indexes.clear()

    def remove(self, ids) -> int:
        gone = np.isin(self._ids, checked_ids(ids))
        if gone.any():
            keep = ~gone
            self._ids, self._labels = self._ids[keep], self._labels[keep]
            self._vectors = self._vectors[keep]
            self._indexes.clear()
        return int(gone.sum())

    def search(self, queries, k: int, category: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = checked_queries(queries, self.dim)
        index, positions = self._index_for(category)
        if index is None:
            return empty_results(len(queries))
        scores, found = search(index, queries, k, metric=self.metric, params=self.search_params, threads=self.threads)
        ids = np.where(found >= 0, self._ids[positions[np.clip(found, 0, None)]], PAD_ID)
        return scores, ids

    def labels_of(self, ids) -> list[str]:
        ids = checked_ids(ids)
        positions = pd.Index(self._ids).get_indexer(ids)
        if (positions < 0).any():
            raise UnknownIdError(f"ids not in the store: {ids[positions < 0][:10].tolist()}")
        return self._labels[positions].tolist()

    def count(self, category: str | None = None) -> int:
        return len(self._ids) if category is None else int((self._labels == category).sum())

    def describe(self) -> dict:
        described = {"store": "faiss", "index": self.factory, "metric": self.metric,
                     "search_params": self.search_params}
        if len(self._ids):
            described["factory"] = resolve_factory(self.factory, *self._vectors.shape)
        return described

    def close(self) -> None:
        self._indexes.clear()

    def __enter__(self) -> "FaissStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _index_for(self, category: str | None):
        if category in self._indexes:
            return self._indexes[category]
        positions = np.arange(len(self._ids)) if category is None else np.flatnonzero(self._labels == category)
        if len(positions) == 0:
            return None, positions
        rows = self._vectors[positions]
        try:
            index = build_index(rows, factory=self.factory, metric=self.metric, seed=self.seed, threads=self.threads)
        except IndexBuildError as error:
            if category is None:
                raise
            warn_once(f"category {category!r}: {error}; its {len(positions)} rows are searched exactly")
            index = build_index(rows, factory="Flat", metric=self.metric, seed=self.seed)
        self._indexes[category] = (index, positions)
        return index, positions
