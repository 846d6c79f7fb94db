"""The Recommender: a loaded index folder that turns a photo into similar products.

    from fashionrec import Recommender
    recommender = Recommender.load("indexes/clothing")
    answer = recommender.recommend("photo.jpg", k=5, category="Shoes")
    for item in answer.results:
        print(item.score, item.label, item.path)
    recommender.similar_to(answer.results[0].id, k=5)         # "more like this", no re-embedding
    recommender.recommend("photo.jpg", k=5, colour_weight=0.4)  # the same look, in the photo's colour
    recommender.add(["new/shirt.jpg"], ["Shirt"])             # catalog updates...
    recommender.remove(["a1b2"])
    recommender.save()                                        # ...written as a new version, atomically

The command line (``python -m fashionrec recommend`` / ``index --update``), notebook 06 and
the Streamlit app all go through this class. One loaded Recommender may serve several threads
at once: queries encode without a lock (the networks and Pillow release the GIL) and only take
it to read the catalog state, which updates change under the same lock.

Ids are the catalog's own and stay stable: an update never renames or renumbers an id, and the
id map always says which file each row is. How removal works depends on the index: see
:mod:`fashionrec.serving.store` (in place for exact/row-ordered indexes; tombstones, filtered
at search time and compacted past ``TOMBSTONE_REBUILD_FRACTION``, for HNSW and IVF).
"""
from __future__ import annotations

import json
import math
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data.checks import check_files
from ..data.ledger import skipped_entry
from ..errors import BadParameter, FashionRecError, IndexFolderError, UnknownCategory, UnknownItem
from ..evaluation.protocol import dataset_fingerprint
from ..features.colour import (COLOUR_BACKBONE, aligned_colour, candidate_count, check_colour_weight,
                               colour_descriptors)
from ..features.embed import embed_catalog
from ..models.query_model import spinning_suits_this_machine
from ..models.registry import get_backbone
from ..models.runtime import with_runtime
from ..settings import InferenceSettings, StoreSettings
from .assets import open_encoder, open_predictor
from .build import (COLOUR_FILE, EMBEDDINGS_FILE, FORMAT, ITEM_COLUMNS, ITEMS_FILE, TOMBSTONE_REBUILD_FRACTION,
                    build_index_folder, item_counts, package_versions, write_version_files)
from .encoder import as_image, decode_query, encode_source
from .folder import BUILD_INFO, current_version, new_version
from .milvus import MilvusRowStore, drop_unreferenced_collections
from .store import FaissRowStore, RowStore

STAGES = ("decode", "preprocess", "embed", "search", "total")


@dataclass(frozen=True)
class Result:
    """One recommended catalog item."""

    id: str
    path: str
    label: str
    score: float


@dataclass
class Recommendation:
    """The answer to one query: results best first, the time each stage took, the predicted category."""

    results: list[Result]
    timing_ms: dict[str, float]
    predicted_category: str | None = None
    category_probability: float | None = None
    index_version: str | None = None       # the folder version that answered, e.g. "v000003"

    def to_dict(self) -> dict:
        record = {"results": [asdict(result) for result in self.results],
                  "timing_ms": {stage: round(ms, 3) for stage, ms in self.timing_ms.items()}}
        if self.index_version is not None:
            record["index_version"] = self.index_version
        if self.predicted_category is not None:
            record["predicted_category"] = self.predicted_category
            record["category_probability"] = round(self.category_probability, 4)
        return record


@dataclass
class UpdateReport:
    """What an update did: ids added and removed, files skipped (with reasons), whether the index was rebuilt."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    compacted: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class Recommender:
    """A loaded index folder: built by :meth:`build` or ``python -m fashionrec index``, opened by :meth:`load`."""

    def __init__(self, outdir: Path, version: str, info: dict, items: pd.DataFrame, vectors16: np.ndarray,
                 store: RowStore, encoder, predictor, settings: InferenceSettings, spinning: bool,
                 colour16: np.ndarray | None = None):
        self.outdir = outdir
        self.version = version
        self.info = info
        self.settings = settings
        self.spinning = spinning
        self._items = items
        self._vectors16 = vectors16
        self._colour16 = colour16          # product-colour descriptors, row-aligned; None in older folders
        self._colour_model = None
        self._store = store
        self._store.fallback_vectors = self._embedding_rows
        self._encoder = encoder
        self._predictor = predictor
        self._lock = threading.RLock()
        self._batch_backbone = None
        self._store_settings: StoreSettings | None = None
        self._reindex()

    # --- opening and building ------------------------------------------------------------------

    @classmethod
    def load(cls, outdir, settings: InferenceSettings | None = None, spinning: bool | None = None,
             store: StoreSettings | None = None) -> "Recommender":
        """Opens the CURRENT version of an index folder.

        ``settings``: threads of the query model (and batch size, workers for :meth:`add`); the
        runtime is the one the index was built with. ``spinning``: let the query model's
        threads spin during a query (lowest latency on cores nobody else needs, much higher
        on a busy machine); None decides from the machine's load average now
        (:func:`~fashionrec.models.query_model.spinning_suits_this_machine`). ``store``: None
        searches where the folder's vectors were indexed (``index.faiss`` or a Milvus collection);
        a StoreSettings must name that same store, and its ``milvus_uri`` says where the
        collection lives now (e.g. a server under another address).
        Raises IndexFolderError, saying how to build one, for a missing or broken folder.
        """
        outdir = Path(outdir)
        version = current_version(outdir)
        try:
            info = json.loads((version / BUILD_INFO).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise IndexFolderError(f"{version / BUILD_INFO}: unreadable ({error}); rebuild the index") from None
        if info.get("format") != FORMAT:
            raise IndexFolderError(f"{version}: format {info.get('format')!r}, this fashionrec reads {FORMAT!r}; "
                                   "rebuild the index")
        settings = (settings or InferenceSettings()).but(runtime=info["runtime"])
        spinning = spinning_suits_this_machine() if spinning is None else spinning
        try:
            items = pd.read_parquet(version / ITEMS_FILE)
            vectors16 = np.load(version / EMBEDDINGS_FILE, mmap_mode="r")
            colour16 = np.load(version / COLOUR_FILE, mmap_mode="r") if info.get("colour") else None
        except (OSError, ValueError) as error:
            raise IndexFolderError(f"{version}: cannot be read ({error}); rebuild the index") from None
        store_settings = store
        store = _open_store(version, info["index"], store_settings)
        if not len(items) == len(vectors16) == store.ntotal:
            raise IndexFolderError(f"{version}: {len(items)} ids, {len(vectors16)} embeddings and {store.ntotal} "
                                   "indexed vectors do not match; rebuild the index")
        if colour16 is not None and len(colour16) != len(items):
            raise IndexFolderError(f"{version}: {len(items)} ids but {len(colour16)} colour descriptors; "
                                   "rebuild the index")
        recommender = cls(outdir, version.name, info, items, vectors16, store, None, None, settings, spinning,
                          colour16)
        recommender._store_settings = store_settings
        recommender._encoder = open_encoder(version, info["query_model"], recommender._runtime_backbone,
                                            settings.threads, spinning)
        recommender._predictor = open_predictor(version, info.get("classifier"), recommender._base_backbone,
                                                info["runtime"], settings.threads, spinning)
        return recommender

    @classmethod
    def build(cls, outdir, catalog: pd.DataFrame, backbone: str, **options) -> "Recommender":
        """Builds an index folder of ``catalog`` (id, path, label) and loads it.

        ``options`` are :func:`fashionrec.serving.build.build_index_folder`'s (index, metric,
        settings, root, dataset, skipped, seed, ...).
        """
        report = build_index_folder(outdir, catalog, backbone, **options)
        return cls.load(report.outdir, options.get("settings"))

    def _runtime_backbone(self):
        """The backbone the index was embedded with, on its runtime, checked against build.json."""
        if self._batch_backbone is None:
            described = self.info["backbone"]
            eager = get_backbone(described["name"], weights_file=described["weights_file"])
            model = with_runtime(eager, self.info["runtime"], threads=self.settings.threads)
            if model.weights_sha256 != described["weights_sha256"]:
                raise IndexFolderError(f"{self.outdir}: the weights of {described['name']} differ from those the "
                                       "index was built with; rebuild the index")
            if model.cache_key != described["cache_key"]:
                raise IndexFolderError(f"{self.outdir}: {described['name']} now preprocesses or computes "
                                       "differently from when the index was built; rebuild the index")
            self._batch_backbone = model
        return self._batch_backbone

    def _base_backbone(self):
        described = self.info["backbone"]
        return get_backbone(described["base"], weights_file=described["weights_file"])

    # --- what is in it ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._row_of)

    @property
    def ids(self) -> list[str]:
        """Ids of the live items, in row order."""
        with self._lock:
            return self._items.loc[~self._items["deleted"].to_numpy(), "id"].tolist()

    @property
    def categories(self) -> list[str]:
        with self._lock:
            return sorted(self._category_rows)

    @property
    def has_classifier(self) -> bool:
        return self._predictor is not None

    @property
    def query_encoder(self):
        """This version's encoder of query photos (:mod:`fashionrec.serving.encoder`), for callers that batch."""
        return self._encoder

    @property
    def catalog(self) -> pd.DataFrame:
        """The live items (id, path, label), in row order."""
        with self._lock:
            live = self._items[~self._items["deleted"].to_numpy()]
            return live[["id", "path", "label"]].reset_index(drop=True)

    def item(self, item_id: str) -> Result:
        """The catalog item with this id (score 1.0 is its similarity to itself under cosine)."""
        with self._lock:
            return self._result(self._row(item_id), float("nan"))

    def close(self) -> None:
        """Lets go of the vector store (a Milvus Lite file is then free for another process)."""
        self._store.close()

    def __enter__(self) -> "Recommender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        """The facts a user interface shows about the index."""
        info = self.info
        return {"out": str(self.outdir), "version": self.version, "backbone": info["backbone"]["name"],
                "runtime": info["runtime"], "store": info["index"].get("store", "faiss"),
                "index": info["index"]["factory"],
                "search_params": info["index"]["search_params"], "metric": info["metric"],
                "dataset": info["dataset"].get("name"), "n_items": len(self), "categories": self.categories,
                "tombstones": int(self._items["deleted"].sum()), "classifier": self.has_classifier,
                "colour": self.has_colour}

    def refresh(self) -> bool:
        """Swaps to the version CURRENT names, when another process (or another Recommender) saved a newer one.

        The new version is loaded beside this one and swapped in under the lock: every answer
        comes wholly from one version, and says which (``Recommendation.index_version``). A
        query model or classifier the two versions share (an update keeps them) stays open.
        Returns whether it swapped; changes not yet saved here are dropped with the old state.
        Raises IndexFolderError when CURRENT names no loadable version (this one keeps serving).
        """
        if current_version(self.outdir).name == self.version:
            return False
        fresh = Recommender.load(self.outdir, self.settings, self.spinning, self._store_settings)
        with self._lock:
            if fresh.info["query_model"] == self.info["query_model"]:
                fresh._encoder = self._encoder
            if fresh.info.get("classifier") == self.info.get("classifier"):
                fresh._predictor = self._predictor
            if fresh.info["backbone"] == self.info["backbone"] and fresh.info["runtime"] == self.info["runtime"]:
                fresh._batch_backbone = self._batch_backbone
            state = dict(vars(fresh))
            del state["_lock"]
            vars(self).update(state)
            self._store.fallback_vectors = self._embedding_rows
        return True

    # --- queries ------------------------------------------------------------------------------------

    @property
    def has_colour(self) -> bool:
        """Whether the folder stores product-colour descriptors (``colour_weight`` > 0 needs them)."""
        return self._colour16 is not None

    def recommend(self, image, k: int = 10, category: str | None = None, exclude_ids=(),
                  colour_weight: float = 0.0) -> Recommendation:
        """The ``k`` catalog items most similar to ``image`` (a path, bytes, a file object or a PIL image).

        ``category``: only items of that category; ``exclude_ids``: never these items. Results
        come best first. The photo is decoded and embedded here (never looked up in a cache);
        ``timing_ms`` has decode, preprocess, embed, search and total (and classify, when the
        index carries a category classifier). Raises ImageError for an unusable image.

        A model chosen by the model search may rank with a bonus for its predicted category
        (build.json ``ranking``); without ``category``, that bonus goes to the catalog items
        *labelled* with the predicted category (a shop knows what it sells; the search's
        evaluation predicted the gallery's categories too, the harder case).

        ``colour_weight`` w in [0, 1] ranks by (1 - w) x network similarity + w x product-colour
        similarity (:mod:`fashionrec.features.colour`), the score each result then carries: over
        every item for a Flat index, over the index's ``candidate_count(k)`` nearest otherwise.
        Only the photo's own colour descriptor is computed (``timing_ms["colour"]``); the catalog's
        are in the folder. w = 0 is the plain ranking.
        """
        self._check_query(k, category, exclude_ids)
        colour_weight = self.check_colour_weight(colour_weight)
        started = time.perf_counter()
        decoded = {}

        def image_for(draft_size):
            if draft_size not in decoded:
                decoded[draft_size] = decode_query(image, draft_size, as_array=True)
            return decoded[draft_size]

        while True:   # once, unless refresh() swapped in another query model during the embedding
            encoder, predictor = self._encoder, self._predictor
            image_for(encoder.draft_size)
            decode_done = time.perf_counter()
            vector, timing = encode_source(encoder, image_for)
            timing = {"decode": (decode_done - started) * 1000.0, **timing}
            predicted = probability = None
            if predictor is not None:
                predicted, probability, timing["classify"] = predictor.predict(image_for, vector)
            colour = None
            if colour_weight > 0:
                colour_started = time.perf_counter()
                colour = (self._query_colour(image_for(None)), colour_weight)
                timing["colour"] = (time.perf_counter() - colour_started) * 1000.0
            self._lock.acquire()
            if encoder is self._encoder and predictor is self._predictor:
                break
            self._lock.release()
        search_started = time.perf_counter()
        try:
            self._check_query(k, category, exclude_ids)
            version = self.version
            excluded = [self._row(item_id) for item_id in exclude_ids]
            boost = float(self.info.get("ranking", {}).get("boost") or 0.0)
            if boost and category is None and predicted in self._category_rows and self._store.metric != "l2":
                results = self._boosted_search(vector, k, predicted, boost, excluded, colour)
            else:
                results = self._search(vector, k, category, excluded, colour)
        finally:
            self._lock.release()
        done = time.perf_counter()
        timing["search"] = (done - search_started) * 1000.0
        timing["total"] = (done - started) * 1000.0
        return Recommendation(results, timing, predicted, probability, version)

    def similar_to(self, item_id: str, k: int = 10, category: str | None = None, exclude_ids=(),
                   colour_weight: float = 0.0) -> Recommendation:
        """"More like this": the ``k`` items most similar to a catalog item, from its stored vector.

        Nothing is decoded or embedded. The item itself comes first (unless excluded or outside
        ``category``): it is the query, and it wins any tie with an identical image.
        ``colour_weight``: as in :meth:`recommend`, with the item's stored colour descriptor.
        """
        self._check_query(k, category, exclude_ids)
        colour_weight = self.check_colour_weight(colour_weight)
        started = time.perf_counter()
        with self._lock:
            self._check_query(k, category, exclude_ids)
            version = self.version
            row = self._row(item_id)
            query = self._store.stored_vectors([row])
            colour = (np.asarray(self._colour16[row], dtype=np.float32), colour_weight) if colour_weight > 0 else None
            excluded = [self._row(other) for other in exclude_ids]
            first = []
            if row not in excluded and (category is None or self._labels[row] == category):
                self_score = self._self_score(query[0])
                first = [self._result(row, self_score if colour is None else
                                      (1 - colour_weight) * self_score + colour_weight)]
            results = first + self._search(query, k - len(first), category, [*excluded, row], colour)
        done = time.perf_counter()
        timing = {"decode": 0.0, "preprocess": 0.0, "embed": 0.0, "search": (done - started) * 1000.0,
                  "total": (done - started) * 1000.0}
        return Recommendation(results, timing, index_version=version)

    def search_vector(self, vector: np.ndarray, k: int = 10, category: str | None = None,
                      exclude_ids=()) -> list[Result]:
        """The ``k`` items nearest an embedding already computed (same backbone, as the index's vectors)."""
        self._check_query(k, category, exclude_ids)
        vector = np.atleast_2d(np.asarray(vector, dtype=np.float32))
        if vector.shape != (1, self._store.dim):
            raise BadParameter(f"expected one {self._store.dim}-d vector, got shape {vector.shape}")
        with self._lock:
            return self._search(vector, k, category, [self._row(item_id) for item_id in exclude_ids])

    def check_colour_weight(self, colour_weight: float) -> float:
        """``colour_weight`` as a float in [0, 1] this folder can rank with; FashionRecError saying why not."""
        weight = check_colour_weight(colour_weight, "colour_weight")
        if weight > 0 and self._colour16 is None:
            raise BadParameter(f"{self.outdir} was built without product-colour descriptors (an index folder "
                                  "from before colour-aware ranking); rebuild it with `python -m fashionrec index "
                                  "... --out` to use a colour weight, or use colour weight 0")
        if weight > 0 and self._store.metric != "cosine":
            raise BadParameter(f"a colour weight adds cosine similarities; this index ranks by "
                                  f"{self._store.metric}: rebuild it with --metric cosine or use colour weight 0")
        return weight

    def _query_colour(self, image) -> np.ndarray:
        """The product-colour descriptor of a decoded photo (the batch path's model and preprocessing)."""
        if self._colour_model is None:
            self._colour_model = get_backbone(COLOUR_BACKBONE)
            if self._colour_model.cache_key != self.info["colour"]["cache_key"]:
                raise IndexFolderError(f"{self.outdir}: the product-colour descriptor now computes differently "
                                       "from when the index was built; rebuild the index")
        model = self._colour_model
        with torch.inference_mode():
            return model.model(model.transform(as_image(image))[None]).numpy()[0].astype(np.float32)

    def _check_query(self, k: int, category: str | None, exclude_ids) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise BadParameter(f"k must be a positive integer, got {k!r}")
        if category is not None and category not in self._category_rows:
            raise UnknownCategory(f"unknown category {category!r}; this index has: {', '.join(self.categories)}")
        unknown = [item_id for item_id in exclude_ids if item_id not in self._row_of]
        if unknown:
            raise UnknownItem(f"unknown id(s) to exclude: {', '.join(map(str, unknown[:5]))}")

    def _row(self, item_id: str) -> int:
        try:
            return self._row_of[str(item_id)]
        except KeyError:
            raise UnknownItem(f"unknown id {item_id!r}: not in the index {self.outdir}") from None

    def _self_score(self, stored: np.ndarray) -> float:
        if self._store.metric == "l2":
            return 0.0
        return float(np.dot(stored, stored))

    def _search(self, vector: np.ndarray, k: int, category: str | None, excluded: list[int],
                colour: tuple[np.ndarray, float] | None = None) -> list[Result]:
        """Top-k live rows (of ``category``, not ``excluded``); the caller holds the lock."""
        if k <= 0:
            return []
        allowed = None
        if category is not None or excluded or self._has_tombstones:
            allowed = self._category_mask(category).copy()
            allowed[excluded] = False
        return self._ranked(vector, k, allowed, colour)

    def _ranked(self, vector: np.ndarray, k: int, allowed: np.ndarray | None,
                colour: tuple[np.ndarray, float] | None) -> list[Result]:
        """Top-k of the ``allowed`` rows by the network's score, or by the fused score when ``colour`` is given.

        Fused: a Flat index scores every allowed row (exact); another proposes ``candidate_count(k)``
        rows, re-scored with their colour similarity.
        """
        if colour is None:
            scores, rows = self._store.search(vector, k, allowed)
            return [self._result(int(row), float(score)) for score, row in zip(scores[0], rows[0]) if row >= 0]
        query_colour, weight = colour
        n_rows = len(self._items)
        exact = self.info["index"].get("factory") == "Flat" and self.info["index"].get("store", "faiss") == "faiss"
        scores, rows = self._store.search(vector, n_rows if exact else candidate_count(k, n_rows), allowed)
        valid = rows[0] >= 0
        rows, network = rows[0][valid], scores[0][valid]
        stored = np.asarray(self._colour16[rows], dtype=np.float32)
        stored /= np.maximum(np.linalg.norm(stored, axis=1, keepdims=True), 1e-12)
        query_colour = query_colour / max(float(np.linalg.norm(query_colour)), 1e-12)
        fused = (1.0 - weight) * network + weight * (stored @ query_colour)
        order = np.argsort(-fused, kind="stable")[:k]
        return [self._result(int(rows[i]), float(fused[i])) for i in order]

    def _boosted_search(self, vector: np.ndarray, k: int, category: str, boost: float,
                        excluded: list[int], colour: tuple[np.ndarray, float] | None = None) -> list[Result]:
        """Top-k live rows when rows of ``category`` get ``boost`` added to their score (``inf``: those first).

        Scores in the results stay the similarities; only the order carries the bonus.
        """
        same = self._search(vector, k, category, excluded, colour)
        others_allowed = self._category_mask(None) & ~self._category_mask(category)
        others_allowed = others_allowed.copy()
        others_allowed[excluded] = False
        others = self._ranked(vector, k, others_allowed, colour)
        bonus = math.inf if math.isinf(boost) else boost
        ranked = [(result.score + bonus, 0, i, result) for i, result in enumerate(same)]
        ranked += [(result.score, 1, i, result) for i, result in enumerate(others)]
        ranked.sort(key=lambda entry: (-entry[0], entry[1], entry[2]))
        return [entry[3] for entry in ranked[:k]]

    def _category_mask(self, category: str | None) -> np.ndarray:
        key = category or ""
        if key not in self._masks:
            mask = ~self._items["deleted"].to_numpy()
            if category is not None:
                mask &= self._items["label"].to_numpy() == category
            self._masks[key] = mask
        return self._masks[key]

    def _result(self, row: int, score: float) -> Result:
        return Result(self._ids[row], self._paths[row], self._labels[row], score)

    def _embedding_rows(self, rows) -> np.ndarray:
        return np.asarray(self._vectors16[np.asarray(rows, dtype=np.int64)], dtype=np.float32)

    def _reindex(self) -> None:
        """Rebuilds the id -> row map and the per-category masks after the items changed."""
        live = ~self._items["deleted"].to_numpy()
        self._ids, self._paths, self._labels = (self._items[column].astype(str).tolist()
                                                for column in ("id", "path", "label"))
        self._row_of = {self._ids[row]: int(row) for row in np.flatnonzero(live)}
        labels = self._items["label"].to_numpy()[live]
        self._category_rows = {str(label): int(count) for label, count in zip(*np.unique(labels, return_counts=True))}
        self._has_tombstones = not live.all()
        self._masks = {}

    # --- updates ---------------------------------------------------------------------------------

    def add(self, paths, labels, ids=None) -> UpdateReport:
        """Embeds new images (batch path, same backbone and runtime as the index) and adds them.

        ``ids`` default to the paths as given. Every file is decoded in full first (verdicts
        cached by content, as the loaders do); a file that is not a usable image, or whose id
        is already in the index, is skipped with its stage and reason (the ledger of
        :mod:`fashionrec.data.ledger`); the others are added, in order, after the existing
        rows. Call :meth:`save` to write the change.
        """
        paths = [str(path) for path in paths]
        labels = [str(label) for label in labels]
        ids = [str(item_id) for item_id in ids] if ids is not None else list(paths)
        if not len(paths) == len(labels) == len(ids):
            raise FashionRecError(f"add: {len(paths)} paths, {len(labels)} labels and {len(ids)} ids differ in number")
        report = UpdateReport()
        rows, seen = [], set()
        verdicts = check_files(paths, progress=self.settings.progress)
        for path, label, item_id, verdict in zip(paths, labels, ids, verdicts):
            if item_id in self._row_of or item_id in seen:
                report.skipped.append(skipped_entry(path, "duplicate", f"id {item_id!r} is already in the index"))
            elif verdict is not None:
                report.skipped.append(skipped_entry(path, *verdict))
            else:
                seen.add(item_id)
                rows.append({"id": item_id, "path": str(Path(path).resolve()), "label": label})
        if not rows:
            return report
        backbone = self._runtime_backbone()
        embedded = embed_catalog(pd.DataFrame(rows, columns=["id", "path", "label"]), backbone, self.settings)
        report.skipped.extend(embedded.skipped)
        if len(embedded.vectors) == 0:
            return report
        new_items = embedded.metadata.assign(deleted=False)[ITEM_COLUMNS]
        new_colour = None
        if self._colour16 is not None:
            new_colour = aligned_colour(new_items, colour_descriptors(new_items[["id", "path", "label"]],
                                                                      self.settings))
        with self._lock:
            self._store.add(embedded.vectors, new_items["label"].astype(str).tolist())
            self._items = pd.concat([self._items, new_items], ignore_index=True)
            self._vectors16 = np.concatenate([np.asarray(self._vectors16), embedded.vectors.astype(np.float16)])
            if new_colour is not None:
                self._colour16 = np.concatenate([np.asarray(self._colour16), new_colour.astype(np.float16)])
            self._reindex()
        report.added = new_items["id"].tolist()
        self._record_update(report)
        return report

    def remove(self, ids) -> UpdateReport:
        """Removes items by id; an unknown id is an error and nothing is removed.

        Exact and row-ordered indexes drop the rows at once (later rows move up, so the
        result equals a build without them). HNSW and IVF keep them as tombstones that no
        search returns, and rebuild once tombstones exceed ``TOMBSTONE_REBUILD_FRACTION`` of
        the rows. Call :meth:`save` to write the change.
        """
        ids = [str(item_id) for item_id in ids]
        report = UpdateReport()
        with self._lock:
            unknown = [item_id for item_id in ids if item_id not in self._row_of]
            if unknown:
                raise UnknownItem(f"unknown id(s), nothing removed: {', '.join(unknown[:5])}"
                                      + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
            rows = np.array(sorted({self._row_of[item_id] for item_id in ids}), dtype=np.int64)
            if self._store.remove(rows):
                keep = np.setdiff1d(np.arange(len(self._items)), rows)
                self._items = self._items.iloc[keep].reset_index(drop=True)
                self._vectors16 = np.asarray(self._vectors16)[keep]
                self._colour16 = None if self._colour16 is None else np.asarray(self._colour16)[keep]
            else:
                deleted = self._items["deleted"].to_numpy().copy()
                deleted[rows] = True
                self._items = self._items.assign(deleted=deleted)
                if deleted.mean() > TOMBSTONE_REBUILD_FRACTION:
                    self._compact()
                    report.compacted = True
            self._reindex()
        report.removed = list(dict.fromkeys(ids))
        self._record_update(report)
        return report

    def compact(self) -> bool:
        """Rebuilds the index without its tombstones now; False when there were none."""
        with self._lock:
            if not self._has_tombstones:
                return False
            self._compact()
            self._reindex()
        self._record_update(UpdateReport(compacted=True))
        return True

    def _compact(self) -> None:
        keep = np.flatnonzero(~self._items["deleted"].to_numpy())
        self._store.compact(keep)
        self._items = self._items.iloc[keep].reset_index(drop=True)
        self._vectors16 = np.asarray(self._vectors16)[keep]
        self._colour16 = None if self._colour16 is None else np.asarray(self._colour16)[keep]

    def _record_update(self, report: UpdateReport) -> None:
        self.info["updates"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "added": len(report.added),
                                     "removed": len(report.removed), "skipped": report.skipped,
                                     "compacted": report.compacted})

    def save(self) -> str:
        """Writes the current state as a new version of the folder (atomically); returns its name.

        Fails without writing if another process changed the folder since this one loaded it.
        """
        with self._lock:
            version_dir = self.outdir / self.version
            with new_version(self.outdir, expected_current=self.version) as staging:
                self._store.save(staging.path)
                for copied in {self.info["query_model"].get("file"), *self._classifier_files()} - {None}:
                    _link_or_copy(version_dir / copied, staging.path / copied)
                info = {**self.info, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "index": {**self.info["index"], **self._store.describe()},
                        "versions": package_versions(),
                        "counts": item_counts(self._items, self.info["skipped"])}
                info["dataset"] = {**info["dataset"], "fingerprint": dataset_fingerprint(
                    self._items.loc[~self._items["deleted"].to_numpy(), ["id", "label", "digest"]])}
                write_version_files(staging.path, self._items, np.asarray(self._vectors16, dtype=np.float16), info,
                                    None if self._colour16 is None else np.asarray(self._colour16, dtype=np.float16))
            self.info, self.version = info, staging.version
            if isinstance(self._store, MilvusRowStore):   # the collections of versions no longer kept
                drop_unreferenced_collections(self.outdir, self._store.store.uri, self._store.store.token)
            return staging.version

    def _classifier_files(self) -> set:
        described = self.info.get("classifier") or {}
        frozen = described.get("frozen") or {}
        return {described.get("file"), frozen.get("file")}


def _open_store(version: Path, described: dict, asked: StoreSettings | None):
    """The vector store a version's build.json describes, where ``asked`` says it lives now."""
    built_with = described.get("store", "faiss")
    if asked is not None and asked.store != built_with:
        raise IndexFolderError(f"{version}: its vectors are indexed in {built_with}, not {asked.store}; rebuild it "
                               f"with `python -m fashionrec index ... --store {asked.store}`, or leave --store out")
    try:
        if built_with == "milvus":
            return MilvusRowStore.load(version, described, asked.milvus_uri if asked else None,
                                           asked.milvus_token if asked else "")
        return FaissRowStore.load(version)
    except (OSError, ValueError, RuntimeError, FashionRecError) as error:
        raise IndexFolderError(f"{version}: cannot be read ({error}); rebuild the index") from None


def _link_or_copy(source: Path, target: Path) -> None:
    """Model files never change within a folder's life, so versions may share them (hard link, else a copy)."""
    try:
        target.hardlink_to(source)
    except OSError:
        shutil.copy2(source, target)
