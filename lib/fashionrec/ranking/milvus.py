"""The row store over a Milvus collection: rows are the collection's primary keys.

Milvus cannot renumber rows, so removed items stay as tombstones that the caller filters out
(an allowed-rows mask, :mod:`fashionrec.ranking.rank`), and compaction rewrites the
collection. A collection is never changed once a saved version names it: the first change
(an add, a compaction) copies it to a new one (``owned``), which the next version names.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from .. import config
from ..indexing.milvus_store import MilvusStore, is_lite_uri, temporary_collection_name
from ..settings import StoreSettings
from .store import checked_search

# --index auto with Milvus: Milvus's own automatic choice (HNSW in Milvus Lite).
AUTO_INDEX = "AUTOINDEX"
COPY_BATCH_ROWS = 2048


def recorded_uri(uri: str) -> str:
    """The URI as build.json keeps it: a Lite file by absolute path, so it opens from any directory."""
    return str(Path(uri).expanduser().resolve()) if is_lite_uri(uri) else uri


def milvus_uri(settings: StoreSettings) -> str:
    """The Milvus URI of ``settings``: the one given, or Milvus Lite at ``results/milvus.db``."""
    return settings.milvus_uri or str(config.RESULTS_DIR / "milvus.db")


def check_store(settings: StoreSettings, metric: str = "cosine", index: str = "Flat", search_params: str = "") -> None:
    """Fails now, with a message a user can act on, if a store of ``settings`` would fail later.

    For Milvus: the index has a Milvus counterpart that this engine can build, and the URI
    opens (a server answers, a Lite file is not held by another process; a Lite file's
    directory is created). Creates no collection.
    """
    if settings.store == "faiss":
        return
    uri = milvus_uri(settings)
    if is_lite_uri(uri):
        Path(uri).expanduser().parent.mkdir(parents=True, exist_ok=True)
    MilvusStore(uri, temporary_collection_name(), metric, index, search_params, token=settings.milvus_token).close()


def new_collection_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


class MilvusRowStore:
    """A :class:`fashionrec.ranking.store.RowStore` over a Milvus collection (rows are ids)."""

    kind = "milvus"
    removes_in_place = False
    exact_vectors = True

    def __init__(self, store: MilvusStore, prefix: str, index: str, owned: bool):
        self.store = store
        self.prefix = prefix   # new collections are named <prefix>_<random>
        self.index = index
        self.metric = store.metric
        # Whether the collection was made in this session (not yet named by a saved version): only then may it change.
        self._owned = owned

    @classmethod
    def build(cls, prefix: str, vectors: np.ndarray, labels: list[str], index: str, metric: str, search_params: str,
              uri: str, token: str = "") -> "MilvusRowStore":
        """A new collection named ``<prefix>_<random>`` holding ``vectors`` as rows 0..n-1 (``auto``: AUTOINDEX)."""
        index = AUTO_INDEX if index == "auto" else index
        store = MilvusStore(uri, new_collection_name(prefix), metric, index, search_params, token=token)
        served = cls(store, prefix, index, owned=True)
        try:
            store.add(np.arange(len(vectors)), vectors, labels)
        except Exception:
            served.discard(always=True)
            raise
        return served

    @classmethod
    def load(cls, prefix: str, described: dict, uri: str | None = None, token: str = "") -> "MilvusRowStore":
        """The collection ``described`` names (a build.json's ``index``; ``uri`` overrides where it lives)."""
        store = MilvusStore.open(uri or described["uri"], described["collection"], described.get("search_params", ""),
                                 token=token)
        return cls(store, prefix, described.get("factory", described["spec"]), owned=False)

    def save(self, directory: Path) -> dict:
        self._owned = False   # from now on a saved version names this collection
        return self.describe()

    def describe(self) -> dict:
        described = self.store.describe()
        params = ",".join(f"{key}={value}" for key, value in described.get("milvus_search_params", {}).items())
        return {"store": self.kind, "factory": self.index, "index_type": described.get("index_type"),
                "build_params": described.get("build_params", {}), "search_params": params, "metric": self.metric,
                "uri": recorded_uri(self.store.uri), "collection": self.store.collection,
                "removes_in_place": self.removes_in_place, "exact_vectors": self.exact_vectors}

    @property
    def exhaustive(self) -> bool:
        """Whether a search scores every row it may return (Milvus ``FLAT``)."""
        return self.index.upper() == "FLAT"

    @property
    def ntotal(self) -> int:
        return self.store.count()

    @property
    def dim(self) -> int:
        return int(self.store.dim)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        queries = checked_search(queries, k, self.dim)
        if allowed is None or np.all(allowed):
            return self.store.search(queries, k)
        allowed_rows = np.flatnonzero(allowed)
        # The shorter list makes the filter: a category's rows, or the few excluded and removed ones.
        if len(allowed_rows) <= len(allowed) - len(allowed_rows):
            expression = f"id in {allowed_rows.tolist()}"
        else:
            expression = f"id not in {np.flatnonzero(~np.asarray(allowed)).tolist()}"
        return self.store.search_where(queries, min(k, len(allowed_rows)), expression)

    def stored_vectors(self, rows) -> np.ndarray:
        vectors = self.store.fetch(np.asarray(rows, dtype=np.int64))[0]
        if self.metric == "cosine":
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), np.finfo(np.float32).tiny)
        return vectors

    def add(self, vectors: np.ndarray, labels: list[str] | None = None) -> None:
        self._own()
        start = self.ntotal
        self.store.add(np.arange(start, start + len(vectors)), vectors, labels or [""] * len(vectors))

    def remove(self, rows: np.ndarray) -> bool:
        return False   # ids cannot be renumbered: the Recommender keeps tombstones

    def compact(self, keep: np.ndarray) -> None:
        """A new collection holding the rows ``keep`` as rows 0..len(keep)-1, with the same index settings."""
        keep = np.asarray(keep, dtype=np.int64)
        fresh = MilvusStore(self.store.uri, new_collection_name(self.prefix), self.metric, self.store.index,
                            self.store.search_params, token=self.store.token)
        for start in range(0, len(keep), COPY_BATCH_ROWS):
            vectors, labels = self.store.fetch(keep[start:start + COPY_BATCH_ROWS])
            fresh.add(np.arange(start, start + len(vectors)), vectors, labels)
        self._replace(fresh)

    def discard(self, always: bool = False) -> None:
        """Closes the store, dropping the collection if no saved version names it (``always``: a build that
        failed before its version was written)."""
        if self._owned or always:
            self.store.drop_on_close = True
        self.store.close()

    def close(self) -> None:
        self.store.close()

    def _own(self) -> None:
        """Copy-on-write: before the first change, the rows move to a collection of the next version."""
        if self._owned:
            return
        ids = np.arange(self.ntotal)
        self.compact(ids)

    def _replace(self, fresh: MilvusStore) -> None:
        old, self.store = self.store, fresh
        if self._owned:   # an unsaved intermediate: nothing refers to it
            old.drop_on_close = True
        old.close()
        self._owned = True
