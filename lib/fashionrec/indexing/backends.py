"""Opening a vector store by name: the one place that knows every backend.

A new backend (Pinecone, Weaviate, ...) is one module implementing
:class:`fashionrec.indexing.stores.VectorStore`, plus a branch in :func:`open_store` and its
name in ``fashionrec.settings.STORES``.
"""
from __future__ import annotations

from pathlib import Path

from .. import config
from ..settings import StoreSettings
from .milvus_store import MilvusStore, is_lite_uri, temporary_collection_name
from .stores import FaissStore, VectorStore


def milvus_uri(settings: StoreSettings) -> str:
    """The Milvus URI of ``settings``: the one given, or Milvus Lite at ``results/milvus.db``."""
    return settings.milvus_uri or str(config.RESULTS_DIR / "milvus.db")


def open_store(settings: StoreSettings, metric: str = "cosine", index: str = "Flat", search_params: str = "",
               seed: int = 0, *, collection: str | None = None, replace: bool = False,
               drop_on_close: bool = False) -> VectorStore:
    """A new, empty store of the kind ``settings`` names.

    ``index`` and ``search_params`` are faiss's (``"HNSW32"``, ``"nprobe=16"``); for Milvus they
    are translated (:func:`fashionrec.indexing.milvus_store.milvus_index`), or may be native
    Milvus names. ``collection`` names the Milvus collection (default: a fresh throwaway name,
    which ``drop_on_close`` should accompany); ``replace`` drops an existing one of that name.
    ``seed`` seeds faiss's index training (Milvus trains with its own).
    """
    if settings.store == "faiss":
        return FaissStore(metric, index, search_params, seed=seed)
    uri = milvus_uri(settings)
    if is_lite_uri(uri):
        Path(uri).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return MilvusStore(uri, collection or temporary_collection_name(), metric, index, search_params,
                       replace=replace, drop_on_close=drop_on_close, token=settings.milvus_token)


def check_store(settings: StoreSettings, metric: str = "cosine", index: str = "Flat", search_params: str = "") -> None:
    """Fails now, with a message a user can act on, if :func:`open_store` would fail later.

    For Milvus: the index has a Milvus counterpart that this engine can build, and the URI
    opens (a server answers, a Lite file is not held by another process). Creates nothing.
    """
    if settings.store == "faiss":
        return
    open_store(settings, metric, index, search_params).close()
