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
:mod:`fashionrec.ranking.store` (in place for exact/row-ordered indexes; tombstones, filtered
at search time and compacted past ``TOMBSTONE_REBUILD_FRACTION``, for HNSW and IVF).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import shutil
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.attributes import attribute_kinds, filter_mask, json_value
from ..data.checks import check_files
from ..data.images import check_box, crop_box, decode_query, tiny_image_warnings
from ..data.ledger import skipped_entry
from ..errors import BadParameter, FashionRecError, IndexFolderError, UnknownCategory, UnknownItem
from ..models.query_model import spinning_suits_this_machine
from ..provenance import dataset_fingerprint
from ..ranking.milvus import MilvusRowStore
from ..ranking.rank import (GALLERY_CATEGORIES, AllowedRows, CategoryBonus, CategoryFilter, ColourFusion, ExcludedRows,
                            LiveRows, Ranking, check_colour_weight, rank)
from ..ranking.store import TOMBSTONE_REBUILD_FRACTION, FaissRowStore, RowStore
from ..settings import InferenceSettings, StoreSettings
from .assets import open_encoder, open_predictor
from .folder import COLOUR_FILE, EMBEDDINGS_FILE, ITEM_COLUMNS, current_version, new_version, read_items
from .manifest import BuildManifest, item_counts, package_versions, write_version_files
from .milvus import collection_prefix, drop_unreferenced_collections

STAGES = ("decode", "preprocess", "embed", "search", "total")


def _torch_side(module: str):
    """``fashionrec.serving.<module>`` (``build``, ``networks``), imported the first time a folder needs PyTorch.

    Building a folder, embedding added items, an eager or combined model and a colour-weighted
    query need it; a query on an ONNX folder does not, and a process that only answers those never
    loads torch (about 1 GB resident, seconds to import). This is the one place the product defers
    an import of its own code (the packages' lazy public names aside).
    """
    return importlib.import_module(f"{__package__}.{module}")


@dataclass(frozen=True)
class Result:
    """One recommended catalog item.

    ``attributes``: the catalog's other columns for it (colour, price...), missing values None.
    ``label_probability``: None for a label the catalog gave; for one the index's classifier
    predicted (an unlabelled new arrival), the probability it gave it.
    """

    id: str
    path: str
    label: str
    score: float
    attributes: dict = field(default_factory=dict)
    label_probability: float | None = None


@dataclass
class Recommendation:
    """The answer to one query: results best first, the time each stage took, the predicted category."""

    results: list[Result]
    timing_ms: dict[str, float]
    predicted_category: str | None = None
    category_probability: float | None = None
    warnings: list[str] = field(default_factory=list)
    index_version: str | None = None       # the folder version that answered, e.g. "v000003"

    def to_dict(self) -> dict:
        record = {"results": [asdict(result) for result in self.results],
                  "timing_ms": {stage: round(ms, 3) for stage, ms in self.timing_ms.items()}}
        if self.index_version is not None:
            record["index_version"] = self.index_version
        if self.predicted_category is not None:
            record["predicted_category"] = self.predicted_category
            record["category_probability"] = round(self.category_probability, 4)
        if self.warnings:
            record["warnings"] = list(self.warnings)
        return record


@dataclass
class UpdateReport:
    """What an update did: ids added and removed, files skipped (with reasons), whether the index was rebuilt;
    ``predicted``: the added items whose category the classifier gave (id, label, probability)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    compacted: bool = False
    predicted: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Recommender:
    """A loaded index folder: built by :meth:`build` or ``python -m fashionrec index``, opened by :meth:`load`."""

    def __init__(self, outdir: Path, version: str, manifest: BuildManifest, items: pd.DataFrame, vectors16: np.ndarray,
                 store: RowStore, encoder, predictor, settings: InferenceSettings, spinning: bool,
                 colour16: np.ndarray | None = None):
        self.outdir = outdir
        self.version = version
        self.manifest = manifest
        self.settings = settings
        self.spinning = spinning
        self._items = items
        self._vectors16 = vectors16
        self._colour16 = colour16          # product-colour descriptors, row-aligned; None in older folders
        self._store = store
        self._store.fallback_vectors = _weakly(self._embedding_rows)
        self._encoder = encoder
        self._predictor = predictor
        self._lock = threading.RLock()
        self._torch_networks = None   # serving.networks.FolderNetworks, made on first need
        # The category bonus of the folder's model (build.json ``ranking``), on the catalog's own labels.
        self._bonus_setting = (manifest.category_boost, "known")
        self._predicted_by_id: dict[str, str] = {}
        self._store_settings: StoreSettings | None = None
        self._reindex()

    # --- opening and building ------------------------------------------------------------------

    @classmethod
    def load(cls, outdir, settings: InferenceSettings | None = None, spinning: bool | None = None,
             store: StoreSettings | None = None, reuse: "Recommender | None" = None) -> "Recommender":
        """Opens the CURRENT version of an index folder.

        ``settings``: threads of the query model (and batch size, workers for :meth:`add`); the
        runtime is the one the index was built with. ``spinning``: let the query model's
        threads spin during a query (lowest latency on cores nobody else needs, much higher
        on a busy machine); None decides from the machine's load average now
        (:func:`~fashionrec.models.query_model.spinning_suits_this_machine`). ``store``: None
        searches where the folder's vectors were indexed (``index.faiss`` or a Milvus collection);
        a StoreSettings must name that same store, and its ``milvus_uri`` says where the
        collection lives now (e.g. a server under another address). ``reuse``: a Recommender of
        another version of the folder (the one serving until now), whose query model, classifier
        and PyTorch networks this version shares where its build.json describes the same ones
        (an update keeps them), rather than opening them again.
        Raises IndexFolderError, saying how to build one, for a missing or broken folder.
        """
        outdir = Path(outdir)
        version = current_version(outdir)
        manifest = BuildManifest.read(version)
        settings = (settings or InferenceSettings()).but(runtime=manifest.runtime)
        spinning = spinning_suits_this_machine() if spinning is None else spinning
        try:
            items = read_items(version)
            vectors16 = np.load(version / EMBEDDINGS_FILE, mmap_mode="r")
            colour16 = np.load(version / COLOUR_FILE, mmap_mode="r") if manifest.colour else None
        except (OSError, ValueError) as error:
            raise IndexFolderError(f"{version}: cannot be read ({error}); rebuild the index") from None
        store_settings = store
        store = _open_store(version, manifest.index, store_settings)
        if not len(items) == len(vectors16) == store.ntotal:
            raise IndexFolderError(f"{version}: {len(items)} ids, {len(vectors16)} embeddings and {store.ntotal} "
                                   "indexed vectors do not match; rebuild the index")
        if colour16 is not None and len(colour16) != len(items):
            raise IndexFolderError(f"{version}: {len(items)} ids but {len(colour16)} colour descriptors; "
                                   "rebuild the index")
        recommender = cls(outdir, version.name, manifest, items, vectors16, store, None, None, settings, spinning,
                          colour16)
        recommender._store_settings = store_settings
        same_runtime = reuse is not None and (reuse.settings, reuse.spinning) == (settings, spinning)
        if reuse is not None and reuse._torch_networks is not None and reuse._torch_networks.serves(manifest):
            recommender._torch_networks = reuse._torch_networks
        if same_runtime and reuse.manifest.query_model == manifest.query_model:
            recommender._encoder = reuse._encoder
        else:
            recommender._encoder = open_encoder(version, manifest.query_model, settings.threads, spinning,
                                                lambda: recommender._networks().query_encoder(),
                                                settings.compiled_resize)
        if same_runtime and reuse.manifest.classifier == manifest.classifier:
            recommender._predictor = reuse._predictor
        else:
            recommender._predictor = open_predictor(version, manifest.classifier, settings.threads, spinning,
                                                    recommender._networks, settings.compiled_resize)
        return recommender

    @classmethod
    def build(cls, outdir, catalog: pd.DataFrame, backbone: str, **options) -> "Recommender":
        """Builds an index folder of ``catalog`` (id, path, label) and loads it.

        ``options`` are :func:`fashionrec.serving.build.build_index_folder`'s (index, metric,
        settings, root, dataset, skipped, seed, ...).
        """
        report = _torch_side("build").build_index_folder(outdir, catalog, backbone, **options)
        return cls.load(report.outdir, options.get("settings"))

    def _networks(self):
        """The folder's PyTorch networks (:class:`~fashionrec.serving.networks.FolderNetworks`), made on first need."""
        with self._lock:
            if self._torch_networks is None:
                self._torch_networks = _torch_side("networks").FolderNetworks(self.outdir, self.manifest,
                                                                              self.settings)
            return self._torch_networks

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
        """This version's encoder of query photos, for callers that batch
        (:class:`~fashionrec.models.query_model.OnnxEncoder` for an ONNX folder)."""
        return self._encoder

    @property
    def catalog(self) -> pd.DataFrame:
        """The live items (id, path, label and the attribute columns), in row order."""
        with self._lock:
            live = self._items[~self._items["deleted"].to_numpy()]
            return live[["id", "path", "label", *self.attribute_columns]].reset_index(drop=True)

    @property
    def attribute_columns(self) -> list[str]:
        """The catalog's attribute columns (colour, price...), which filters may name."""
        return [column for column in self._items.columns if column not in ITEM_COLUMNS]

    def attribute_mask(self, filters) -> np.ndarray | None:
        """Bool per row: the item passes every filter (:mod:`fashionrec.data.attributes`); None: no filters."""
        with self._lock:
            return filter_mask(self._items, filters, self.attribute_columns)

    @property
    def info(self) -> dict:
        """build.json of the loaded version, as a dict (:attr:`manifest` is the typed form)."""
        return self.manifest.to_dict()

    @property
    def items(self) -> pd.DataFrame:
        """The live items with every column of the items table (id, path, label, digest, ...), in row order."""
        with self._lock:
            live = self._items[~self._items["deleted"].to_numpy()]
            return live.drop(columns=["deleted"]).reset_index(drop=True)

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
        built = self.manifest
        return {"out": str(self.outdir), "version": self.version, "backbone": built.backbone["name"],
                "runtime": built.runtime, "store": built.store, "index": built.index["factory"],
                "search_params": built.index["search_params"], "metric": built.metric,
                "dataset": built.dataset.get("name"), "n_items": len(self), "categories": self.categories,
                "tombstones": int(self._items["deleted"].sum()), "classifier": self.has_classifier,
                "colour": self.has_colour, "attributes": attribute_kinds(self._items, self.attribute_columns),
                "quality": built.quality}

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
        fresh = Recommender.load(self.outdir, self.settings, self.spinning, self._store_settings, reuse=self)
        with self._lock:
            bonus_setting, predicted_by_id = self._bonus_setting, self._predicted_by_id
            state = dict(vars(fresh))
            del state["_lock"]
            vars(self).update(state)
            self._store.fallback_vectors = _weakly(self._embedding_rows)
            # A bonus the caller set (set_category_bonus) holds for the new version too.
            self._bonus_setting, self._predicted_by_id = bonus_setting, predicted_by_id
            self._bonus = self._category_bonus()
        return True

    # --- queries ------------------------------------------------------------------------------------

    @property
    def has_colour(self) -> bool:
        """Whether the folder stores product-colour descriptors (``colour_weight`` > 0 needs them)."""
        return self._colour16 is not None

    def recommend(self, image, k: int = 10, category: str | None = None, exclude_ids=(),
                  colour_weight: float = 0.0, filters=None, box=None) -> Recommendation:
        """The ``k`` catalog items most similar to ``image`` (a path, bytes, a file object or a PIL image).

        ``category``: only items of that category; ``exclude_ids``: never these items. Results
        come best first. The photo is decoded and embedded here (never looked up in a cache);
        ``timing_ms`` has decode, preprocess, embed, search and total (and classify, when the
        index carries a category classifier). Raises ImageError for an unusable image.

        A model chosen by the model search may rank with a bonus for its predicted category
        (build.json ``ranking``); without ``category``, that bonus goes to the catalog items
        *labelled* with the predicted category (a shop knows what it sells; the search's
        evaluation predicted the gallery's categories too, the harder case: see
        :meth:`set_category_bonus`).

        ``colour_weight`` w in [0, 1] ranks by (1 - w) x network similarity + w x product-colour
        similarity (:class:`fashionrec.ranking.rank.ColourFusion`), the score each result then
        carries: over every item for a Flat index, over the index's nearest candidates otherwise.
        Only the photo's own colour descriptor is computed (``timing_ms["colour"]``); the catalog's
        are in the folder. w = 0 is the plain ranking.

        ``filters``: only items whose attributes pass them, e.g. ``["colour=Red", "price=10..50"]``
        or ``{"colour": ["Red", "Blue"]}`` (:mod:`fashionrec.data.attributes`); applied inside the
        search, so k results come back while k items pass. ``box``: ``(x, y, width, height)`` in
        the photo's pixels, the product to search for (:func:`~fashionrec.data.images.crop_box`).
        A photo (or box) under ``TINY_IMAGE_SIDE`` pixels on a side gets a warning in ``warnings``.
        """
        self._check_query(k, category, exclude_ids)
        colour_weight = self.check_colour_weight(colour_weight)
        with self._lock:   # a bad filter is refused before the photo is decoded
            restrict, masked_version = self.attribute_mask(filters), self.version
        box = check_box(box)
        started = time.perf_counter()
        decoded = {}

        def image_for(draft_size):
            # A box is in the photo's own pixels: decode it whole (no draft) and crop.
            draft_size = None if box is not None else draft_size
            if draft_size not in decoded:
                decoded[draft_size] = crop_box(decode_query(image, draft_size, as_array=True), box)
            return decoded[draft_size]

        while True:   # once, unless refresh() swapped in another query model during the embedding
            encoder, predictor = self._encoder, self._predictor
            warnings = tiny_image_warnings(image_for(encoder.draft_size), box)
            decode_done = time.perf_counter()
            vector, timing = encoder.encode_with(image_for)
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
            if self.version != masked_version:   # refresh() swapped versions during the embedding
                restrict = self.attribute_mask(filters)
            results = self._ranked(vector, k, category, excluded, colour, predicted, restrict)
        finally:
            self._lock.release()
        done = time.perf_counter()
        timing["search"] = (done - search_started) * 1000.0
        timing["total"] = (done - started) * 1000.0
        return Recommendation(results, timing, predicted, probability, warnings, version)

    def similar_to(self, item_id: str, k: int = 10, category: str | None = None, exclude_ids=(),
                   colour_weight: float = 0.0, filters=None) -> Recommendation:
        """"More like this": the ``k`` items most similar to a catalog item, from its stored vector.

        Nothing is decoded or embedded. The item itself comes first (unless excluded, outside
        ``category`` or not passing ``filters``): it is the query, and it wins any tie with an
        identical image. ``colour_weight``, ``filters``: as in :meth:`recommend`.
        """
        self._check_query(k, category, exclude_ids)
        colour_weight = self.check_colour_weight(colour_weight)
        started = time.perf_counter()
        with self._lock:
            self._check_query(k, category, exclude_ids)
            version = self.version
            restrict = self.attribute_mask(filters)
            row = self._row(item_id)
            query = self._store.stored_vectors([row])
            colour = (np.asarray(self._colour16[row], dtype=np.float32), colour_weight) if colour_weight > 0 else None
            excluded = [self._row(other) for other in exclude_ids]
            first = []
            if row not in excluded and (category is None or self._labels[row] == category) \
                    and (restrict is None or restrict[row]):
                self_score = self._self_score(query[0])
                first = [self._result(row, self_score if colour is None else
                                      (1 - colour_weight) * self_score + colour_weight)]
            results = first + self._ranked(query, k - len(first), category, [*excluded, row], colour,
                                           restrict=restrict)
        done = time.perf_counter()
        timing = {"decode": 0.0, "preprocess": 0.0, "embed": 0.0, "search": (done - started) * 1000.0,
                  "total": (done - started) * 1000.0}
        return Recommendation(results, timing, index_version=version)

    def search_vector(self, vector: np.ndarray, k: int = 10, category: str | None = None, exclude_ids=(),
                      predicted_category: str | None = None, colour: np.ndarray | None = None,
                      colour_weight: float = 0.0, filters=None) -> list[Result]:
        """The ``k`` items an embedding already computed gets (same backbone, as the index's vectors).

        The ranking :meth:`recommend` runs, given what it would compute from the photo:
        ``predicted_category`` (for the category bonus) and ``colour`` (the photo's colour
        descriptor, for ``colour_weight`` > 0). ``filters``: as in :meth:`recommend`.
        """
        self._check_query(k, category, exclude_ids)
        colour_weight = self.check_colour_weight(colour_weight)
        vector = np.atleast_2d(np.asarray(vector, dtype=np.float32))
        if vector.shape != (1, self._store.dim):
            raise BadParameter(f"expected one {self._store.dim}-d vector, got shape {vector.shape}")
        if colour_weight > 0 and colour is None:
            raise BadParameter("a colour weight needs the query's colour descriptor (colour=...)")
        fusion = (np.asarray(colour, dtype=np.float32).ravel(), colour_weight) if colour_weight > 0 else None
        with self._lock:
            return self._ranked(vector, k, category, [self._row(item_id) for item_id in exclude_ids], fusion,
                                predicted_category, self.attribute_mask(filters))

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
        return self._networks().colour_descriptor(image)

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

    def _ranked(self, vector: np.ndarray, k: int, category: str | None, excluded: list[int],
                colour: tuple[np.ndarray, float] | None = None, predicted: str | None = None,
                restrict: np.ndarray | None = None) -> list[Result]:
        """Top-k live rows (of ``category``, not ``excluded``) under the folder's ranking; the caller holds the lock.

        ``predicted``: the query's predicted category, which the category bonus (if any) favours.
        ``colour``: (the query's colour descriptor, its weight) for colour fusion. ``restrict``: the
        rows the attribute filters allow (:meth:`attribute_mask`).
        """
        if k <= 0:
            return []
        filters = []
        if self._has_tombstones:
            filters.append(LiveRows(self._deleted))
        if category is not None:
            filters.append(CategoryFilter(category, self._label_array))
        if excluded:
            filters.append(ExcludedRows(tuple(excluded)))
        if restrict is not None:
            filters.append(AllowedRows(restrict))
        bonus = None
        if category is None and predicted is not None and self._bonus is not None and self._store.metric != "l2":
            bonus = self._bonus
        fusion = ColourFusion(colour[1], self._colour16) if colour is not None else None
        scores, rows = rank(self._store, vector, k, Ranking(tuple(filters), bonus, fusion),
                            query_categories=[predicted] if bonus is not None else None,
                            query_colour=colour[0][None] if colour is not None else None)
        return [self._result(int(row), float(score)) for score, row in zip(scores[0], rows[0]) if row >= 0]

    def set_category_bonus(self, boost, gallery_categories: str = "known") -> None:
        """Ranks with ``boost`` added for the catalog items of the query's predicted category (``inf``: those first).

        ``gallery_categories``: ``known`` ranks by the items' labels (a shop knows what it sells);
        ``predicted`` by the categories the folder's classifier predicts for them (the protocol of
        record, which hides the gallery's labels: each item's category is predicted once, from its
        stored embedding and, for classifiers on other features, its photo). ``boost`` 0: no bonus.
        """
        boost = float(boost)
        if gallery_categories not in GALLERY_CATEGORIES:
            raise FashionRecError(f"gallery categories must be one of {', '.join(GALLERY_CATEGORIES)}, "
                                  f"got {gallery_categories!r}")
        if boost and self._predictor is None:
            raise FashionRecError(f"{self.outdir}: a category bonus needs the query's predicted category, and this "
                                  "folder has no classifier (build it from a fine-tuned model, +head:...)")
        with self._lock:
            self._bonus_setting = (boost, gallery_categories)
            self._bonus = self._category_bonus()

    @property
    def category_bonus(self) -> dict | None:
        """The category bonus the ranking applies (boost, whose categories), None without one."""
        return None if self._bonus is None else self._bonus.describe()

    def _category_bonus(self) -> CategoryBonus | None:
        boost, gallery = self._bonus_setting
        if not boost:
            return None
        if gallery == "known":
            return CategoryBonus(boost, self._label_array, gallery)
        missing = [row for row, item_id in enumerate(self._ids) if item_id not in self._predicted_by_id]
        for row in missing:
            path = self._paths[row]
            category, _, _ = self._predictor.predict(
                lambda draft_size: decode_query(path, draft_size, as_array=True), self._embedding_rows([row]))
            self._predicted_by_id[self._ids[row]] = category
        return CategoryBonus(boost, np.asarray([self._predicted_by_id[item_id] for item_id in self._ids], dtype=str),
                             gallery)

    def _result(self, row: int, score: float) -> Result:
        probability = self._label_probabilities[row]
        return Result(self._ids[row], self._paths[row], self._labels[row], score,
                      {column: json_value(values[row]) for column, values in self._attribute_values.items()},
                      None if np.isnan(probability) else float(probability))

    def _embedding_rows(self, rows) -> np.ndarray:
        return np.asarray(self._vectors16[np.asarray(rows, dtype=np.int64)], dtype=np.float32)

    def _reindex(self) -> None:
        """Rebuilds the id -> row map and the per-category masks after the items changed."""
        live = ~self._items["deleted"].to_numpy()
        self._ids, self._paths, self._labels = (self._items[column].astype(str).tolist()
                                                for column in ("id", "path", "label"))
        self._label_probabilities = self._items["label_probability"].to_numpy(dtype=float)
        self._attribute_values = {column: self._items[column].to_numpy() for column in self.attribute_columns}
        self._row_of = {self._ids[row]: int(row) for row in np.flatnonzero(live)}
        labels = self._items["label"].to_numpy()[live]
        self._category_rows = {str(label): int(count) for label, count in zip(*np.unique(labels, return_counts=True))}
        self._has_tombstones = not live.all()
        self._deleted = ~live
        self._label_array = np.asarray(self._labels, dtype=str)
        self._bonus = self._category_bonus()

    # --- updates ---------------------------------------------------------------------------------

    def add(self, paths, labels, ids=None, attributes: pd.DataFrame | None = None) -> UpdateReport:
        """Embeds new images (batch path, same backbone and runtime as the index) and adds them.

        ``ids`` default to the paths as given. A label None asks the index's category classifier:
        the item gets the predicted category, and its probability in the id map's
        ``label_probability`` (FashionRecError before anything is embedded when the index has no
        classifier). ``attributes``: a table row-aligned with ``paths`` (colour, price...).
        Every file is decoded in full first (verdicts cached by content, as the loaders do); a
        file that is not a usable image, or whose id is already in the index, is skipped with its
        stage and reason (the ledger of :mod:`fashionrec.data.ledger`); the others are added, in
        order, after the existing rows. Call :meth:`save` to write the change.
        """
        paths = [str(path) for path in paths]
        labels = [None if label is None or (isinstance(label, float) and math.isnan(label)) else str(label)
                  for label in labels]
        ids = [str(item_id) for item_id in ids] if ids is not None else list(paths)
        if not len(paths) == len(labels) == len(ids):
            raise FashionRecError(f"add: {len(paths)} paths, {len(labels)} labels and {len(ids)} ids differ in number")
        if attributes is not None and len(attributes) != len(paths):
            raise FashionRecError(f"add: {len(paths)} paths but {len(attributes)} rows of attributes")
        self.check_can_label(labels)
        report = UpdateReport()
        rows, seen = [], set()
        verdicts = check_files(paths, progress=self.settings.progress)
        for position, (path, label, item_id, verdict) in enumerate(zip(paths, labels, ids, verdicts)):
            if item_id in self._row_of or item_id in seen:
                report.skipped.append(skipped_entry(path, "duplicate", f"id {item_id!r} is already in the index"))
            elif verdict is not None:
                report.skipped.append(skipped_entry(path, *verdict))
            else:
                seen.add(item_id)
                rows.append({"id": item_id, "path": str(Path(path).resolve()), "label": label,
                             **({} if attributes is None else attributes.iloc[position].to_dict())})
        if not rows:
            return report
        networks = self._networks()
        table = pd.DataFrame(rows)
        embedded = networks.embed_items(table.assign(label=table["label"].fillna("")))
        report.skipped.extend(embedded.skipped)
        if len(embedded.vectors) == 0:
            return report
        new_items = self._labelled(embedded.metadata.assign(deleted=False, label_probability=np.nan),
                                   table.set_index("id")["label"], embedded.vectors)
        new_items = new_items[[*ITEM_COLUMNS, *[c for c in new_items.columns if c not in ITEM_COLUMNS]]]
        new_colour = None
        if self._colour16 is not None:
            new_colour = networks.colour_rows(new_items)
        with self._lock:
            self._store.add(embedded.vectors, new_items["label"].astype(str).tolist())
            self._items = pd.concat([self._items, new_items], ignore_index=True)
            self._vectors16 = np.concatenate([np.asarray(self._vectors16), embedded.vectors.astype(np.float16)])
            if new_colour is not None:
                self._colour16 = np.concatenate([np.asarray(self._colour16), new_colour.astype(np.float16)])
            self._reindex()
        report.added = new_items["id"].tolist()
        guessed = new_items[new_items["label_probability"].notna()]
        report.predicted = [{"id": item_id, "label": label, "probability": round(float(probability), 4)}
                            for item_id, label, probability in zip(guessed["id"], guessed["label"],
                                                                   guessed["label_probability"])]
        self._record_update(report)
        return report

    def check_can_label(self, labels) -> None:
        """FashionRecError when some labels are None and the index has no category classifier to predict them."""
        unlabelled = sum(label is None for label in labels)
        if unlabelled and self._predictor is None:
            raise FashionRecError(f"{unlabelled} image(s) to add have no label and {self.outdir} has no category "
                                  "classifier to predict one (an index of a fine-tuned model has one: "
                                  "`index --backbone NAME+head:FILE`); give them labels (a category sub-folder, or "
                                  "a label column)")

    def _labelled(self, items: pd.DataFrame, given: pd.Series, vectors: np.ndarray) -> pd.DataFrame:
        """``items`` with the classifier's category (and its probability) where the catalog gave no label."""
        labels, probabilities = items["label"].tolist(), items["label_probability"].to_numpy(dtype=float, copy=True)
        for row, (item_id, path) in enumerate(zip(items["id"], items["path"])):
            if given[item_id] is not None:
                continue
            decoded = {}

            def image_for(draft_size, path=path, decoded=decoded):
                if draft_size not in decoded:
                    decoded[draft_size] = decode_query(path, draft_size, as_array=True)
                return decoded[draft_size]

            labels[row], probabilities[row], _ = self._predictor.predict(image_for, vectors[row:row + 1])
        return items.assign(label=labels, label_probability=probabilities)

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
        self.manifest.updates.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "added": len(report.added),
                                     "removed": len(report.removed), "skipped": report.skipped,
                                     "compacted": report.compacted, "predicted": len(report.predicted)})

    def save(self) -> str:
        """Writes the current state as a new version of the folder (atomically); returns its name.

        Fails without writing if another process changed the folder since this one loaded it.
        """
        with self._lock:
            version_dir = self.outdir / self.version
            with new_version(self.outdir, expected_current=self.version) as staging:
                self._store.save(staging.path)
                for copied in {self.manifest.query_model.get("file"), *self._classifier_files()} - {None}:
                    _link_or_copy(version_dir / copied, staging.path / copied)
                manifest = dataclasses.replace(
                    self.manifest, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    index={**self.manifest.index, **self._store.describe()}, versions=package_versions(),
                    counts=item_counts(self._items, self.manifest.skipped),
                    dataset={**self.manifest.dataset, "fingerprint": dataset_fingerprint(
                        self._items.loc[~self._items["deleted"].to_numpy(), ["id", "label", "digest"]])})
                write_version_files(staging.path, self._items, np.asarray(self._vectors16, dtype=np.float16), manifest,
                                    None if self._colour16 is None else np.asarray(self._colour16, dtype=np.float16))
            self.manifest, self.version = manifest, staging.version
            if isinstance(self._store, MilvusRowStore):   # the collections of versions no longer kept
                drop_unreferenced_collections(self.outdir, self._store.store.uri, self._store.store.token)
            return staging.version

    def _classifier_files(self) -> set:
        described = self.manifest.classifier or {}
        frozen = described.get("frozen") or {}
        return {described.get("file"), frozen.get("file")}


def _weakly(method):
    """``method`` (of a Recommender), called through a weak reference.

    The store calls back for stored vectors; a strong reference would make a cycle, and an old
    version (its ONNX session, its index) would wait for the cyclic garbage collector instead of
    going as soon as the last request using it ends: a server taking catalog writes grew by a
    version's memory per write.
    """
    reference = weakref.WeakMethod(method)
    return lambda rows: reference()(rows)


def _open_store(version: Path, described: dict, asked: StoreSettings | None):
    """The vector store a version's build.json describes, where ``asked`` says it lives now."""
    built_with = described.get("store", "faiss")
    if asked is not None and asked.store != built_with:
        raise IndexFolderError(f"{version}: its vectors are indexed in {built_with}, not {asked.store}; rebuild it "
                               f"with `python -m fashionrec index ... --store {asked.store}`, or leave --store out")
    try:
        if built_with == "milvus":
            return MilvusRowStore.load(collection_prefix(version.parent), described, asked.milvus_uri if asked else None,
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
