"""The Milvus client behind :class:`fashionrec.ranking.milvus.MilvusRowStore`: one collection, Milvus Lite
from a local file, or a Milvus server or cluster by URI.

``uri`` decides where the rows live; nothing else in the code changes:

* a path ending in ``.db`` (``results/milvus.db``): Milvus Lite, run inside this process by
  pymilvus (its gRPC server binds 127.0.0.1 on a free port). One process at a time may open
  a given file; :meth:`MilvusStore.close` stops the server when the last store using the
  file closes.
* ``http://host:19530`` (or https, with ``token``): a Milvus server, or a cluster's proxy.

A collection has three fields: ``id`` (INT64 primary key, chosen by the caller), ``vector``
(FLOAT_VECTOR) and ``label`` (VARCHAR, the item's category, copied along when a collection is
compacted). Adding an id the collection holds is refused, never a silent overwrite. It is created with Strong consistency, so a search
sees every write made before it, on a server as on Lite.

Index types: ``"Flat"``, ``"HNSW<M>"``, ``"HNSW<M>_SQ8"``, ``"IVF<nlist>,Flat"``, ``"IVF<nlist>,SQ8"``
(and the ``{nlist}`` template) name the Milvus counterpart of a faiss factory with the parameters the
faiss store would use (see :func:`milvus_index`). Native Milvus names are accepted too, with
build parameters after a colon: ``"HNSW:M=16,efConstruction=200"``, ``"IVF_FLAT:nlist=128"``.
Milvus Lite 3.2.2 builds FLAT, HNSW, HNSW_SQ, IVF_FLAT, IVF_SQ8 and AUTOINDEX (= HNSW);
a server offers more (IVF_PQ, DISKANN, SCANN...), which are passed through to it unchecked.

Verified together with pymilvus 3.0.2 and milvus-lite 3.2.2 (tests/test_stores.py): insert,
search with COSINE, L2 and IP (scores equal faiss's: cosine similarity, squared L2 distance,
inner product), filtered search by id, count, and exact round trips of ids, vectors and labels.
Three things Milvus Lite 3.2.2 does differently from a server are handled here, each tested:

* pymilvus 3.0.2 sends each index build parameter as its own key; Milvus Lite 3.2.2 reads
  them only from one JSON ``params`` entry and otherwise builds with its defaults, silently.
  For Lite they are sent nested; after creating an index the store reads its description
  back and stops if the parameters did not arrive.
* Indexes are built in a background thread after a flush, and until one is built Milvus Lite
  scans that segment exhaustively (recall 1.0, as if the index were perfect); that thread also
  writes index files in place, so a load that meets one half-written fails. Before the first
  search after a write the store, on Lite, releases the collection (the background thread then
  builds nothing), flushes and loads it again, which builds every missing index before it
  returns (a load that fails is tried again for a while); on a server it flushes and waits
  until the index reports no pending rows. A search therefore always measures the index that
  was asked for, never rows still waiting for it.
* Lite accepts index types it cannot build (IVF_PQ, DISKANN, SCANN) and then scans
  exhaustively, silently; the store refuses them for a Lite URI.
"""
from __future__ import annotations

import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from ..errors import FashionRecError
from .faiss_index import DEFAULT_EF_SEARCH, check_metric, checked_queries, default_nprobe, resolve_factory

MILVUS_METRIC = {"cosine": "COSINE", "l2": "L2", "ip": "IP"}
LITE_INDEX_TYPES = ("FLAT", "HNSW", "HNSW_SQ", "IVF_FLAT", "IVF_SQ8", "AUTOINDEX")
# Build and search parameters the store checks by name (a typo would otherwise be ignored by Lite).
BUILD_PARAMS = {"FLAT": (), "HNSW": ("M", "efConstruction"), "HNSW_SQ": ("M", "efConstruction", "sq_type"),
                "IVF_FLAT": ("nlist",), "IVF_SQ8": ("nlist",), "AUTOINDEX": ()}
SEARCH_PARAMS = {"FLAT": (), "HNSW": ("ef",), "HNSW_SQ": ("ef",), "IVF_FLAT": ("nprobe",),
                 "IVF_SQ8": ("nprobe",), "AUTOINDEX": ("ef",)}
# faiss ParameterSpace names that mean the same as Milvus search parameters.
FAISS_SEARCH_PARAM_NAMES = {"efSearch": "ef"}

# Each store's approximate indexes that 07-scale-out measures by default: the same algorithms with the same
# parameters in both (HNSW32_SQ8 is Milvus's HNSW_SQ), then Milvus's own choice (AUTOINDEX: HNSW in Lite).
# No "=" in them: papermill cannot read a parameter cell whose strings hold one.
STORE_FAISS_INDEXES = ("HNSW32", "IVF{nlist},Flat", "IVF{nlist},SQ8", "HNSW32_SQ8")
STORE_MILVUS_INDEXES = ("HNSW32", "IVF{nlist},Flat", "IVF{nlist},SQ8", "HNSW32_SQ8", "AUTOINDEX")

DEFAULT_COLLECTION = "fashionrec"
ID_FIELD, VECTOR_FIELD, LABEL_FIELD = "id", "vector", "label"
MAX_LABEL_BYTES = 512
# Rows per insert and queries per search request: ~16 MiB of float32 vectors, far below the
# 64 MiB gRPC message limit of a default Milvus server.
REQUEST_BYTES = 16 << 20
IDS_PER_QUERY = 1000
CONNECT_TIMEOUT_S = 15.0
INDEX_WAIT_S = 600.0
LITE_LOAD_RETRY_S = 30.0
_WORST_SCORE = {"cosine": -np.finfo(np.float32).max, "ip": -np.finfo(np.float32).max,
                "l2": np.finfo(np.float32).max}

PAD_ID = -1
_LITE_USERS: dict[str, int] = {}


class DuplicateIdError(FashionRecError, ValueError):
    """An id given to ``add`` is already in the collection (or twice in one call)."""


class UnknownIdError(FashionRecError, KeyError):
    """``fetch`` was asked about an id the collection does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def checked_rows(ids, vectors, labels, dim: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``add``'s arguments as (int64 ids, float32 (n, d) vectors, str labels), or a ValueError saying what is wrong.

    ``dim`` is the collection's dimension (None while it is empty: the vectors decide it).
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
    labels = list(labels)
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


@dataclass(frozen=True)
class MilvusIndex:
    """A Milvus index: its type, build parameters and search parameters."""

    index_type: str
    build_params: dict = field(default_factory=dict)
    search_params: dict = field(default_factory=dict)


def is_lite_uri(uri: str) -> bool:
    """pymilvus's own rule: a URI ending in ``.db`` is a Milvus Lite file."""
    return str(uri).endswith(".db")


def milvus_index(index: str, n: int, d: int, search_params: str = "") -> MilvusIndex:
    """The Milvus index for ``index`` (a faiss factory with a Milvus counterpart, or a native name).

    faiss counterparts get the parameters the faiss store uses: ``HNSW32`` -> HNSW M=32,
    efConstruction as faiss's default (40), ``HNSW32_SQ8`` -> HNSW_SQ likewise; ``IVF{nlist},Flat``
    -> IVF_FLAT with nlist from :func:`~fashionrec.indexing.faiss_index.resolve_factory` for
    ``n`` x ``d``. Native names keep Milvus's build defaults unless given
    (``"HNSW:M=16,efConstruction=200"``). Search parameters default to the faiss store's: ef
    ``DEFAULT_EF_SEARCH``, nprobe :func:`~fashionrec.indexing.faiss_index.default_nprobe` (when
    nlist is known).
    ``search_params`` (``"nprobe=16"``, ``"ef=128"``; faiss's ``efSearch`` means ``ef``)
    override the search parameters. Raises ValueError for a name with no counterpart.
    """
    concrete = resolve_factory(index, n, d) if "{" in index else index
    hnsw = re.fullmatch(r"HNSW(\d+)(_SQ8)?", concrete)
    ivf = re.fullmatch(r"IVF(\d+),(Flat|SQ8)", concrete)
    if concrete == "Flat":
        index_type, build = "FLAT", {}
    elif hnsw:
        m = int(hnsw.group(1))
        index_type, build = "HNSW", {"M": m, "efConstruction": faiss.IndexHNSWFlat(1, m).hnsw.efConstruction}
        if hnsw.group(2):  # faiss's HNSW over 8-bit scalar-quantised codes, as Milvus's HNSW_SQ with SQ8
            index_type, build = "HNSW_SQ", {**build, "sq_type": "SQ8"}
    elif ivf:
        index_type, build = ("IVF_FLAT" if ivf.group(2) == "Flat" else "IVF_SQ8"), {"nlist": int(ivf.group(1))}
    elif re.fullmatch(r"[A-Z][A-Z0-9_]*(:.*)?", concrete):
        index_type, _, given = concrete.partition(":")
        build = _check_names(index_type, _parse_params(given), BUILD_PARAMS, "build")
    else:
        raise ValueError(f"index {index!r} has no Milvus counterpart; use Flat, HNSW<M>, HNSW<M>_SQ8, IVF<nlist>,Flat, "
                         f"IVF<nlist>,SQ8 or a Milvus index type ({', '.join(LITE_INDEX_TYPES)}; a server has more)")
    overrides = {FAISS_SEARCH_PARAM_NAMES.get(key, key): value for key, value in _parse_params(search_params).items()}
    overrides = _check_names(index_type, overrides, SEARCH_PARAMS, "search")
    return MilvusIndex(index_type, build, {**_default_search_params(index_type, build), **overrides})


def _default_search_params(index_type: str, build: dict) -> dict:
    """The faiss store's defaults, stated explicitly: Milvus Lite's and a server's own defaults differ."""
    if "ef" in SEARCH_PARAMS.get(index_type, ()):
        return {"ef": DEFAULT_EF_SEARCH}
    if "nprobe" in SEARCH_PARAMS.get(index_type, ()) and "nlist" in build:
        return {"nprobe": default_nprobe(int(build["nlist"]))}
    return {}


def _parse_params(text: str) -> dict:
    params = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"bad parameter {item!r}: expected name=value")
        params[key.strip()] = _number(value.strip())
    return params


def _number(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _check_names(index_type: str, params: dict, known: dict, what: str) -> dict:
    if index_type in known:
        unknown = sorted(set(params) - set(known[index_type]))
        if unknown:
            raise ValueError(f"{index_type} has no {what} parameter {', '.join(unknown)}; "
                             f"it takes {', '.join(known[index_type]) or 'none'}")
    return params


class MilvusStore:
    """One Milvus collection of (id, vector, label) rows; ids are chosen by the caller (row numbers).

    ``MilvusStore(uri, collection, metric, index, search_params)`` starts a new collection
    (created at the first ``add``, when the dimension and row count that templates such as
    ``IVF{nlist},Flat`` need are known); an existing collection of that name is an error
    unless ``replace``. :meth:`open` reopens an existing one. ``drop_on_close`` removes the
    collection when the store closes (for throwaway collections, e.g. an evaluation).
    ``token`` authenticates against a server ("user:password" or an API key).
    """

    def __init__(self, uri, collection: str = DEFAULT_COLLECTION, metric: str = "cosine", index: str = "Flat",
                 search_params: str = "", *, replace: bool = False, drop_on_close: bool = False, token: str = "",
                 _existing: bool = False):
        check_metric(metric)
        _check_collection_name(collection)
        self.uri = str(uri)
        self.collection = collection
        self.metric = metric
        self.index = index
        self.search_params = search_params
        self.drop_on_close = drop_on_close
        self.token = token
        self.lite = is_lite_uri(self.uri)
        self._spec: MilvusIndex | None = None
        self._dim: int | None = None
        self._unsearched_writes = False
        # The row count, kept until this client writes: it assumes it is the collection's only writer.
        self._count: int | None = None
        self._client = _connect(self.uri, token)
        try:
            exists = self._call("has_collection", collection)
            if _existing:
                if not exists:
                    raise FashionRecError(f"{self.uri}: no collection {collection!r} (collections: "
                                          f"{', '.join(self._call('list_collections')) or 'none'})")
                self._read_existing()
            elif exists:
                if not replace:
                    raise FashionRecError(f"{self.uri}: collection {collection!r} already exists; open it, or "
                                          "replace it explicitly")
                self._call("drop_collection", collection)
            else:
                # Fail before any expensive work: a name without a Milvus counterpart, a type Lite cannot build.
                self._check_index_type(milvus_index(index, 1 << 20, 8, search_params))
        except Exception:
            self._disconnect()
            raise

    @classmethod
    def open(cls, uri, collection: str = DEFAULT_COLLECTION, search_params: str = "", *, token: str = "",
             drop_on_close: bool = False) -> "MilvusStore":
        """An existing collection; metric, index and dimension are read from Milvus."""
        return cls(uri, collection, search_params=search_params, token=token, drop_on_close=drop_on_close,
                   _existing=True)

    @property
    def dim(self) -> int | None:
        return self._dim

    def add(self, ids, vectors, labels) -> None:
        ids, vectors, labels = checked_rows(ids, vectors, labels, self._dim)
        if len(ids) == 0:
            return
        too_long = [label for label in labels if len(label.encode()) > MAX_LABEL_BYTES]
        if too_long:
            raise ValueError(f"label {too_long[0][:40]!r}... is longer than {MAX_LABEL_BYTES} bytes")
        if self._spec is None:
            self._create(len(ids), vectors.shape[1])
        else:
            present = self._present(ids)
            if present:
                raise DuplicateIdError(f"ids already in the store: {sorted(present)[:10]}; remove them first")
        rows_per_request = max(1, REQUEST_BYTES // (4 * vectors.shape[1]))
        for start in range(0, len(ids), rows_per_request):
            stop = start + rows_per_request
            self._call("insert", self.collection, [
                {ID_FIELD: int(i), VECTOR_FIELD: vector, LABEL_FIELD: label}
                for i, vector, label in zip(ids[start:stop], vectors[start:stop], labels[start:stop])])
        self._unsearched_writes = True
        self._count = None

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` over every row (k clamped to the rows held)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = checked_queries(queries, self._dim)
        return self.search_where(queries, min(k, self.count()))

    def search_where(self, queries, k: int, expression: str = "") -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` among the rows a Milvus filter ``expression`` admits (e.g. ``id in [3, 5]``).

        Milvus-only; ``k`` is taken as given (not clamped to the rows the expression admits):
        slots beyond them hold id -1 and the worst score.
        """
        queries = checked_queries(queries, self._dim)
        if k == 0 or self._spec is None:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        self._make_searchable()
        params = dict(self._spec.search_params)
        if "ef" in params:
            params["ef"] = max(params["ef"], k)  # Milvus refuses ef < k; faiss's HNSW searches max(efSearch, k)
        scores = np.full((len(queries), k), _WORST_SCORE[self.metric], np.float32)
        ids = np.full((len(queries), k), PAD_ID, np.int64)
        queries_per_request = max(1, REQUEST_BYTES // (4 * queries.shape[1]))
        for start in range(0, len(queries), queries_per_request):
            batch = queries[start:start + queries_per_request]
            results = self._call("search", self.collection, data=list(batch), limit=k, anns_field=VECTOR_FIELD,
                                 filter=expression, output_fields=[ID_FIELD],
                                 search_params={"metric_type": MILVUS_METRIC[self.metric], "params": params})
            for row, hits in enumerate(results, start=start):
                for column, hit in enumerate(hits):
                    ids[row, column] = hit["id"]
                    scores[row, column] = hit["distance"]
        return scores, ids

    def fetch(self, ids) -> tuple[np.ndarray, list[str]]:
        """The stored vectors (float32, as added) and the labels of ``ids``, in that order."""
        rows = self._fetch(ids, [VECTOR_FIELD, LABEL_FIELD])
        vectors = np.array([vector for vector, _ in rows], dtype=np.float32).reshape(len(rows), self._dim or 0)
        return vectors, [label for _, label in rows]

    def _fetch(self, ids, fields: list[str]) -> list[tuple]:
        ids = checked_ids(ids)
        found = {}
        if self._spec is not None:
            for start in range(0, len(ids), IDS_PER_QUERY):
                batch = np.unique(ids[start:start + IDS_PER_QUERY]).tolist()
                for row in self._call("query", self.collection, ids=batch, output_fields=fields):
                    found[int(row[ID_FIELD])] = tuple(row[field] for field in fields)
        missing = [int(i) for i in ids if int(i) not in found]
        if missing:
            raise UnknownIdError(f"ids not in the store: {missing[:10]}")
        return [found[int(i)] for i in ids]

    def count(self) -> int:
        if self._spec is None:
            return 0
        if self._count is None:
            self._count = int(self._call("query", self.collection, output_fields=["count(*)"])[0]["count(*)"])
        return self._count

    def describe(self) -> dict:
        described = {"store": "milvus", "engine": "milvus-lite" if self.lite else "milvus-server",
                     "collection": self.collection, "index": self.index, "metric": self.metric,
                     "search_params": self.search_params}
        if self._spec is not None:
            described.update(index_type=self._spec.index_type, build_params=dict(self._spec.build_params),
                             milvus_search_params=dict(self._spec.search_params))
        return described

    def close(self) -> None:
        if self._client is None:
            return
        try:
            if self.drop_on_close and self._call("has_collection", self.collection):
                self._call("drop_collection", self.collection)
        finally:
            self._disconnect()

    def __enter__(self) -> "MilvusStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------------

    def _check_index_type(self, spec: MilvusIndex) -> None:
        if self.lite and spec.index_type not in LITE_INDEX_TYPES:
            raise ValueError(f"Milvus Lite cannot build {spec.index_type} (it would search exhaustively instead); "
                             f"it builds {', '.join(LITE_INDEX_TYPES)}. Use a Milvus server for other types.")

    def _create(self, n: int, dim: int) -> None:
        spec = milvus_index(self.index, n, dim, self.search_params)
        self._check_index_type(spec)
        from pymilvus import DataType

        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID_FIELD, DataType.INT64, is_primary=True)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field(LABEL_FIELD, DataType.VARCHAR, max_length=MAX_LABEL_BYTES)
        index_params = self._client.prepare_index_params()
        # See the module docstring: Milvus Lite 3.2.2 reads build parameters only from a "params" entry.
        build = {"params": spec.build_params} if self.lite and spec.build_params else spec.build_params
        index_params.add_index(field_name=VECTOR_FIELD, index_type=spec.index_type,
                               metric_type=MILVUS_METRIC[self.metric], params=build)
        self._call("create_collection", self.collection, schema=schema, consistency_level="Strong")
        # sync=False: pymilvus would otherwise poll the build with AllocTimestamp, which Milvus Lite 3.2.2 lacks
        # (it logs a traceback); an empty collection's index is ready at once, and searches wait for later builds.
        self._call("create_index", self.collection, index_params, sync=False)
        self._call("load_collection", self.collection)
        described = _index_description(self._call("describe_index", self.collection, VECTOR_FIELD))
        lost = {key: value for key, value in spec.build_params.items() if str(described.get(key)) != str(value)}
        if lost:
            raise FashionRecError(f"{self.uri}: Milvus built {spec.index_type} without the parameters {lost} "
                                  f"(it reports {described}); this pymilvus/Milvus pair does not pass them through")
        self._spec, self._dim = spec, dim

    def _read_existing(self) -> None:
        description = self._call("describe_collection", self.collection)
        fields = {item["name"]: item for item in description["fields"]}
        if set(fields) != {ID_FIELD, VECTOR_FIELD, LABEL_FIELD}:
            raise FashionRecError(f"{self.uri}: collection {self.collection!r} has fields {sorted(fields)}, not the "
                                  f"{ID_FIELD}/{VECTOR_FIELD}/{LABEL_FIELD} of a fashionrec store")
        index = _index_description(self._call("describe_index", self.collection, VECTOR_FIELD))
        metric = {value: key for key, value in MILVUS_METRIC.items()}.get(index["metric_type"])
        if metric is None:
            raise FashionRecError(f"{self.uri}: collection {self.collection!r} uses metric {index['metric_type']}")
        self.metric = metric
        index_type = index["index_type"]
        build = {key: index[key] for key in BUILD_PARAMS.get(index_type, ()) if key in index}
        self.index = index_type + (":" + ",".join(f"{k}={v}" for k, v in build.items()) if build else "")
        spec = milvus_index(self.index, 1, 1, self.search_params)
        self._call("load_collection", self.collection)  # a reopened collection is released until loaded
        self._spec, self._dim = spec, int(fields[VECTOR_FIELD]["params"]["dim"])

    def _present(self, ids: np.ndarray) -> set[int]:
        present = set()
        for start in range(0, len(ids), IDS_PER_QUERY):
            rows = self._call("query", self.collection, ids=ids[start:start + IDS_PER_QUERY].tolist(),
                              output_fields=[ID_FIELD])
            present.update(int(row[ID_FIELD]) for row in rows)
        return present

    def _make_searchable(self) -> None:
        """Flush and wait for the index over every row written since the last search (module docstring)."""
        if not self._unsearched_writes:
            return
        # Flushed rows leave Lite's row-by-row memtable for columnar segments (searched ~100x faster even for FLAT).
        if self.lite:
            # Released first, so that Lite's background thread builds no index for the new segment; the load
            # then builds every missing index itself before it returns.
            self._call("release_collection", self.collection)
            self._call("flush", self.collection)
            self._load_lite()
        else:
            self._call("flush", self.collection)
            deadline = time.monotonic() + INDEX_WAIT_S
            while self._call("describe_index", self.collection, VECTOR_FIELD).get("pending_index_rows", 0):
                if time.monotonic() > deadline:
                    raise FashionRecError(f"{self.uri}: index of {self.collection!r} still building after "
                                          f"{INDEX_WAIT_S:.0f} s")
                time.sleep(0.5)
        self._unsearched_writes = False

    def _load_lite(self) -> None:
        """load_collection, tried again while it fails: Milvus Lite 3.2.2 writes index files in place from a
        background thread, and a load that reads one half-written fails ("file seems not fully written")."""
        deadline = time.monotonic() + LITE_LOAD_RETRY_S
        while True:
            try:
                self._call("load_collection", self.collection)
                return
            except FashionRecError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _call(self, method: str, *args, **kwargs):
        from pymilvus.exceptions import MilvusException

        try:
            return getattr(self._client, method)(*args, **kwargs)
        except MilvusException as error:
            raise FashionRecError(f"Milvus at {self.uri}: {method} failed: {error.message}") from None

    def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        client.close()
        if self.lite:
            _release_lite(self.uri)


def _index_description(described: dict) -> dict:
    """describe_index's answer with build parameters at the top level (Milvus Lite nests them in ``params``)."""
    nested = described.get("params")
    return {**described, **nested} if isinstance(nested, dict) else described


def _check_collection_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", name):
        raise ValueError(f"bad collection name {name!r}: letters, digits and underscores, not starting with a digit")


def list_collections(uri: str, token: str = "") -> list[str]:
    """Names of the collections at ``uri`` (a Lite file is opened and released as a store would)."""
    client = _connect(str(uri), token)
    try:
        return sorted(client.list_collections())
    finally:
        client.close()
        if is_lite_uri(str(uri)):
            _release_lite(str(uri))


def drop_collection(uri: str, collection: str, token: str = "") -> None:
    """Drops one collection at ``uri`` (nothing happens when there is none of that name)."""
    client = _connect(str(uri), token)
    try:
        if client.has_collection(collection):
            client.drop_collection(collection)
    finally:
        client.close()
        if is_lite_uri(str(uri)):
            _release_lite(str(uri))


def temporary_collection_name(prefix: str = "fashionrec_tmp") -> str:
    """A collection name no other run uses (several evaluations may share one server)."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def _connect(uri: str, token: str):
    # pymilvus and Milvus Lite are imported where a store connects (a third of a second and 100 MB that a
    # process serving a FAISS folder does without).
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    if is_lite_uri(uri):
        parent = Path(uri).expanduser().resolve().parent
        if not parent.is_dir():
            raise FashionRecError(f"{uri}: directory {parent} does not exist; create it or choose another path")
    # Milvus Lite logs a traceback when it cannot open a file; the error below says it in one line.
    lite_logger = logging.getLogger("milvus_lite")
    level = lite_logger.level
    lite_logger.setLevel(logging.CRITICAL)
    try:
        client = MilvusClient(uri=uri, token=token, timeout=CONNECT_TIMEOUT_S)
    except MilvusException as error:
        if is_lite_uri(uri):
            raise FashionRecError(f"{uri}: cannot open Milvus Lite there ({error.message}); Milvus Lite lets one "
                                  "process at a time open a file: close the other one or use another path") from None
        raise FashionRecError(f"{uri}: cannot reach Milvus ({error.message}); is the server running and the "
                              "URI right (http://host:19530)?") from None
    finally:
        lite_logger.setLevel(level)
    if is_lite_uri(uri):
        key = os.path.abspath(uri)
        _LITE_USERS[key] = _LITE_USERS.get(key, 0) + 1
    return client


def _release_lite(uri: str) -> None:
    """Stop the in-process Milvus Lite server of ``uri`` once no store uses it (frees the file's lock)."""
    key = os.path.abspath(uri)
    _LITE_USERS[key] = _LITE_USERS.get(key, 1) - 1
    if _LITE_USERS[key] <= 0:
        del _LITE_USERS[key]
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(key)
