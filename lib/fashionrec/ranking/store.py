"""Where the vectors live and are searched: the one store interface of the ranking core.

A :class:`RowStore` holds one vector per row of a catalog (an index folder's id map, or an
evaluation's gallery), in that order, and answers top-k queries restricted to the rows a
caller allows (live items of the chosen category, say). :class:`FaissRowStore` is the FAISS
implementation; :class:`fashionrec.ranking.milvus.MilvusRowStore` offers the same methods over
a Milvus collection. Rows, not catalog ids: the catalog's table owns the ids and their order.

Removing rows, by index type (faiss decides what it can do):

* indexes that keep their codes in row order (``Flat``, ``SQ8``, ``PQ``: faiss
  ``IndexFlatCodes``) remove in place: later rows move up by one, exactly as if the index had
  been built without them (:meth:`FaissRowStore.remove` returns True);
* graph and inverted-list indexes (``HNSW32``, ``IVF...``) cannot: faiss's ``IndexHNSW`` has no
  ``remove_ids`` at all, and ``IndexIVF`` would leave gaps in the row numbers. The caller then
  keeps the rows as tombstones and excludes them at search time; :meth:`FaissRowStore.compact`
  rebuilds the index from the live rows' stored vectors (no image is embedded again).

Filtered search: faiss's ID selector filters during the search itself (in HNSW the excluded
nodes still route the graph walk, they are only kept out of the results), so k results come
back without over-fetching in the common case. When the allowed rows are few, or an
approximate index still returns fewer than k of them, the allowed rows are searched exactly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import faiss
import numpy as np

from ..indexing.faiss_index import build_index, default_search_params, load_index, save_index

INDEX_FILE = "index.faiss"
# HNSW / IVF keep removed rows as tombstones until they are this share of all rows, then rebuild.
TOMBSTONE_REBUILD_FRACTION = 0.2
# A small part of the index (at most this many rows, and under half of it) is searched exactly:
# a gather and one matrix product (about a millisecond for 4096 x 1280), where a graph walk
# restricted to a few rows would mostly visit rows it cannot return.
EXACT_SUBSET_MAX_ROWS = 4096
# A selective filter widens the HNSW beam in proportion (k / share of allowed rows), up to this.
MAX_FILTERED_EF_SEARCH = 2048


def checked_search(queries, k: int, dim: int | None) -> np.ndarray:
    """A search's queries as float32 (n, d), or a ValueError saying what is wrong with them or with ``k``.

    Checked here rather than by the faiss helpers of :mod:`fashionrec.indexing`, so that a query's
    search runs in this module alone.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if queries.ndim != 2:
        raise ValueError(f"queries must be a 2-D array (n, d), got shape {queries.shape}")
    if dim is not None and queries.shape[1] != dim:
        raise ValueError(f"queries have dimension {queries.shape[1]}, the store holds dimension {dim}")
    if not np.isfinite(queries).all():
        raise ValueError("queries contain NaN or infinite values")
    return queries


class RowStore(Protocol):
    """What a Recommender needs from the place its vectors live. Rows are id-map positions."""

    kind: str
    metric: str

    @property
    def ntotal(self) -> int: ...

    @property
    def exhaustive(self) -> bool:
        """Whether a search scores every row it may return (exact search, no index to miss one)."""

    @property
    def dim(self) -> int: ...

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (n_queries, min(k, allowed rows)), best first; missing slots are row -1."""

    def add(self, vectors: np.ndarray, labels: list[str] | None = None) -> None:
        """Appends rows; ``labels`` (their categories) for stores that keep them."""

    def remove(self, rows: np.ndarray) -> bool:
        """True if the rows were removed and later rows moved up; False if this store cannot remove."""

    def compact(self, keep: np.ndarray) -> None:
        """Keep only the rows ``keep`` (sorted), renumbered from 0 in that order."""

    def stored_vectors(self, rows) -> np.ndarray:
        """The vectors of ``rows`` as the store compares them (unit length for cosine)."""

    def save(self, directory: Path) -> dict: ...

    def describe(self) -> dict: ...

    def close(self) -> None: ...


class FaissRowStore:
    """A faiss index whose row i is id-map row i.

    ``fallback_vectors(rows)`` returns stored embeddings (the index folder's float16 copy)
    for indexes that cannot give their vectors back exactly (compressed codes); they serve
    exact searches over few allowed rows and compaction.
    """

    kind = "faiss"

    def __init__(self, index: faiss.Index, metric: str, factory: str, search_params: str = "",
                 fallback_vectors: Callable[[np.ndarray], np.ndarray] | None = None):
        self.index = index
        self.metric = metric
        self.factory = factory
        self.search_params = search_params or default_search_params(index)
        self.fallback_vectors = fallback_vectors
        if self.search_params:
            faiss.ParameterSpace().set_index_parameters(index, self.search_params)
        self._node = faiss.downcast_index(index)

    @classmethod
    def build(cls, vectors: np.ndarray, factory: str, metric: str = "cosine", seed: int = 0,
              search_params: str = "", threads: int | None = None,
              fallback_vectors: Callable[[np.ndarray], np.ndarray] | None = None) -> "FaissRowStore":
        index = build_index(vectors, factory=factory, metric=metric, seed=seed, threads=threads)
        return cls(index, metric, factory, search_params, fallback_vectors)

    @classmethod
    def load(cls, directory: Path, fallback_vectors: Callable[[np.ndarray], np.ndarray] | None = None) -> "FaissRowStore":
        index, info = load_index(Path(directory) / INDEX_FILE)
        return cls(index, info["metric"], info["factory"], info.get("search_params", ""), fallback_vectors)

    def save(self, directory: Path) -> dict:
        save_index(self.index, Path(directory) / INDEX_FILE,
                   {"factory": self.factory, "metric": self.metric, "search_params": self.search_params})
        return self.describe()

    def close(self) -> None:
        """Nothing to let go of: the index lives in this process."""

    def describe(self) -> dict:
        return {"store": self.kind, "factory": self.factory, "faiss_class": type(self._node).__name__,
                "search_params": self.search_params, "metric": self.metric, "removes_in_place": self.removes_in_place,
                "exact_vectors": self.exact_vectors}

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def exhaustive(self) -> bool:
        """Whether a search scores every row it may return (``Flat``)."""
        return self.factory == "Flat"

    @property
    def removes_in_place(self) -> bool:
        """Row-ordered codes (IndexFlatCodes) shift later rows up on removal; nothing else keeps rows dense."""
        return isinstance(self._node, faiss.IndexFlatCodes)

    @property
    def exact_vectors(self) -> bool:
        """Whether the index holds the very vectors it searches (flat storage, no compression)."""
        node = self._node
        if isinstance(node, faiss.IndexHNSW):
            node = faiss.downcast_index(node.storage)
        return isinstance(node, (faiss.IndexFlat, faiss.IndexIVFFlat))

    # --- queries ---------------------------------------------------------------------------

    def prepare(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors as the index compares them: float32, unit length for cosine (on a copy)."""
        prepared = np.array(vectors, dtype=np.float32, order="C", copy=True)
        if self.metric == "cosine":
            faiss.normalize_L2(prepared)
        return prepared

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        queries = checked_search(queries, k, self.dim)
        if allowed is None:
            return self._search(queries, k)
        allowed_rows = np.flatnonzero(allowed)
        k = min(k, len(allowed_rows))
        if k == 0:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        if len(allowed_rows) <= EXACT_SUBSET_MAX_ROWS and len(allowed_rows) < 0.5 * len(allowed):
            return self._exact_subset(queries, k, allowed_rows)
        scores, rows = self._selector_search(queries, k, allowed, len(allowed_rows) / len(allowed))
        if (rows < 0).any():   # an approximate index found fewer than k allowed rows
            return self._exact_subset(queries, k, allowed_rows)
        return scores, rows

    def _search(self, queries, k: int):
        """The index's top min(k, rows) for each query (an approximate index may fill fewer: row -1)."""
        k = min(k, self.ntotal)
        if k == 0:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        return self.index.search(self.prepare(queries), k)

    def _selector_search(self, queries, k: int, allowed: np.ndarray, share: float):
        bitmap = np.packbits(allowed, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
        node = self._node
        if isinstance(node, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW()
            params.efSearch = int(min(max(node.hnsw.efSearch, k, np.ceil(node.hnsw.efSearch / share)),
                                      max(MAX_FILTERED_EF_SEARCH, k)))
        elif isinstance(node, faiss.IndexIVF):
            params = faiss.SearchParametersIVF()
            params.nprobe = node.nprobe
        else:
            params = faiss.SearchParameters()
        params.sel = selector
        try:
            scores, rows = self.index.search(self.prepare(queries), k, params=params)
        except RuntimeError:   # this index type takes no selector: over-fetch and filter instead
            return self._overfetch_search(queries, k, allowed)
        del bitmap, selector   # both had to outlive the search call
        return scores, rows

    def _overfetch_search(self, queries, k: int, allowed: np.ndarray):
        fetch = k + int((~allowed).sum())
        scores, rows = self._search(queries, fetch)
        out_scores = np.full((len(queries), k), np.nan, np.float32)
        out_rows = np.full((len(queries), k), -1, np.int64)
        for i in range(len(queries)):
            keep = (rows[i] >= 0) & allowed[np.clip(rows[i], 0, None)]
            kept = np.flatnonzero(keep)[:k]
            out_scores[i, :len(kept)], out_rows[i, :len(kept)] = scores[i, kept], rows[i, kept]
        return out_scores, out_rows

    def _exact_subset(self, queries, k: int, rows: np.ndarray):
        stored = self.stored_vectors(rows)
        prepared = self.prepare(queries)
        if self.metric == "l2":
            scores = (prepared ** 2).sum(axis=1, keepdims=True) - 2 * prepared @ stored.T + (stored ** 2).sum(axis=1)
            order = np.argsort(scores, axis=1, kind="stable")[:, :k]
        else:
            scores = prepared @ stored.T
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1).astype(np.float32), rows[order].astype(np.int64)

    def stored_vectors(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if isinstance(self._node, faiss.IndexIVF) and self.exact_vectors:
            # Inverted lists find a row's vector only through a direct map (8 bytes per row), built when first asked.
            if self._node.direct_map.type == faiss.DirectMap.NoMap:
                self._node.make_direct_map()
        if self.exact_vectors:
            return self.index.reconstruct_batch(rows)
        if self.fallback_vectors is None:
            raise ValueError(f"{self.factory}: compressed vectors and no stored copy to fall back on")
        return self.prepare(self.fallback_vectors(rows))

    # --- updates ---------------------------------------------------------------------------

    def add(self, vectors: np.ndarray, labels: list[str] | None = None) -> None:
        self.index.add(self.prepare(vectors))

    def remove(self, rows: np.ndarray) -> bool:
        if not self.removes_in_place:
            return False
        self.index.remove_ids(faiss.IDSelectorBatch(np.asarray(rows, dtype=np.int64)))
        return True

    def compact(self, keep: np.ndarray) -> None:
        """A copy of the index (its training kept: IVF centroids, PQ codebooks), emptied and refilled with ``keep``."""
        vectors = self.stored_vectors(keep)
        fresh = faiss.clone_index(self.index)
        fresh.reset()
        fresh.add(vectors)   # already prepared: adding them as they are keeps their exact values
        self.index, self._node = fresh, faiss.downcast_index(fresh)
        if self.search_params:
            faiss.ParameterSpace().set_index_parameters(fresh, self.search_params)
