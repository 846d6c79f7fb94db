"""What an index folder needs PyTorch for: writing its models, and the models it cannot answer without torch.

A folder of an ONNX runtime answers queries from its own files (``query.onnx``, ``frozen.onnx``,
``classifier.npz``: :mod:`fashionrec.serving.assets`), so a process that only serves it never
imports this module, nor PyTorch (about 1 GB resident and seconds to import). This module is
imported, on first need, for the rest:

* writing a folder's query model and classifier (:func:`write_query_model`, :func:`write_classifier`),
  which export the backbone;
* :class:`FolderNetworks`: the backbone a folder was built with, rebuilt by name and checked against
  build.json, for what it does beyond a query on an ONNX folder: embedding items added to the
  catalog (the batch path, so that they land where a rebuild would put them), the eager and
  combined encoders (:class:`TorchEncoder`, :class:`CombinedEncoder`) of folders without a query
  model, and the product-colour descriptor of a query photo.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..data.images import as_image
from ..errors import FashionRecError, IndexFolderError
from ..features.colour import COLOUR_BACKBONE, aligned_colour, colour_descriptors
from ..features.embed import Embeddings, embed_catalog
from ..models.backbone import Backbone
from ..models.classifier import CategoryClassifier
from ..models.ensemble import CombinedBackbone, is_combined_name, preprocessing
from ..models.finetuned import classifier_from_payload, load_model, resolve_head_path, split_backbone_name
from ..models.preprocess import Preprocessing
from ..models.query_model import OnnxEncoder, uint8_query_model
from ..models.registry import get_backbone
from ..models.runtime import OnnxModel, with_runtime
from ..models.views import MULTI_VIEW_FEATURES, view_backbone
from ..provenance import file_sha256
from ..settings import InferenceSettings
from .assets import CLASSIFIER_FILE, FROZEN_MODEL, QUERY_MODEL
from .manifest import BuildManifest


def _milliseconds(start: float, end: float) -> float:
    return (end - start) * 1000.0


class TorchEncoder:
    """A backbone's own transform and model (eager PyTorch, or whatever its model runs on)."""

    path = "torch"

    def __init__(self, backbone: Backbone):
        self.backbone = backbone

    @property
    def draft_size(self) -> int | None:
        return getattr(self.backbone.transform, "draft_size", None)

    def encode(self, image: Image.Image | np.ndarray) -> tuple[np.ndarray, dict]:
        started = time.perf_counter()
        batch = self.backbone.transform(as_image(image))[None]
        prepared = time.perf_counter()
        with torch.inference_mode():
            vector = self.backbone.model(batch).float().numpy()
        done = time.perf_counter()
        return vector, {"preprocess": _milliseconds(started, prepared), "embed": _milliseconds(prepared, done)}

    def encode_with(self, image_for) -> tuple[np.ndarray, dict]:
        return self.encode(image_for(self.draft_size))


class CombinedEncoder:
    """A combination's leaves, each on its own decode of the photo, combined as the batch path combines them."""

    path = "combined"

    def __init__(self, backbone: CombinedBackbone):
        self.backbone = backbone
        self.leaves = {leaf.cache_key: TorchEncoder(leaf) for leaf in backbone.leaves()}

    @property
    def draft_size(self) -> int | None:
        return None

    def encode_with(self, image_for) -> tuple[np.ndarray, dict]:
        """The combined vector, each leaf reading ``image_for(its draft size)``."""
        vectors, timing = {}, {"preprocess": 0.0, "embed": 0.0}
        for key, encoder in self.leaves.items():
            vectors[key], leaf_timing = encoder.encode_with(image_for)
            timing = {name: timing[name] + leaf_timing[name] for name in timing}
        started = time.perf_counter()
        vector = self.backbone.combine_leaf_vectors(lambda leaf: vectors[leaf.cache_key])
        timing["embed"] += _milliseconds(started, time.perf_counter())
        return vector, timing

    def encode(self, image: Image.Image | np.ndarray) -> tuple[np.ndarray, dict]:
        return self.encode_with(lambda draft_size: image)


def torch_encoder(backbone: Backbone):
    """The encoder that runs ``backbone`` itself on one photo (its transform, its model; a combination leaf by leaf)."""
    return CombinedEncoder(backbone) if isinstance(backbone, CombinedBackbone) else TorchEncoder(backbone)


# --- writing a folder's models -------------------------------------------------------------------


def query_preprocessing(backbone: Backbone) -> Preprocessing | None:
    """The backbone's preprocessing as data when its model runs in ONNX Runtime, else None."""
    if isinstance(backbone, CombinedBackbone) or not isinstance(backbone.model, OnnxModel):
        return None
    try:
        return Preprocessing.from_transform(backbone.transform)
    except FashionRecError:
        return None


def write_query_model(directory: Path, backbone: Backbone, name: str = QUERY_MODEL) -> dict:
    """Writes the uint8 query model of ``backbone`` (runtime-wrapped) if it has one; returns its description.

    A combination has none: it is rebuilt by name and each leaf runs on its own decode of the photo.
    """
    if isinstance(backbone, CombinedBackbone):
        return {"path": CombinedEncoder.path, "file": None, "preprocessing": None,
                "leaves": [{key: row[key] for key in ("part", "backbone", "transform")} for row in preprocessing(backbone)]}
    spec = query_preprocessing(backbone)
    if spec is None:
        return {"path": TorchEncoder.path, "file": None, "preprocessing": None}
    target = uint8_query_model(backbone.model.path, directory / name, spec)
    return {"path": OnnxEncoder.path, "file": name, "sha256": file_sha256(target), "preprocessing": spec.to_dict()}


def head_classifier(backbone_name: str) -> CategoryClassifier | None:
    """The category classifier stored in a ``<base>+head:<file>`` model, if any."""
    base, reference = split_backbone_name(backbone_name)
    if reference is None:
        return None
    return classifier_from_payload(load_model(resolve_head_path(reference)))


def classifier_views(backbone_name: str) -> list[str]:
    _, reference = split_backbone_name(backbone_name)
    payload = load_model(resolve_head_path(reference))
    return list((payload.get("head_config") or {}).get("classifier_views") or [])


def write_classifier(directory: Path, backbone_name: str, eager_base: Backbone, runtime: str,
                     threads: int | None) -> dict | None:
    """Stores the classifier of a fine-tuned model and the frozen models its features need."""
    classifier = head_classifier(backbone_name)
    if classifier is None:
        return None
    np.savez(directory / CLASSIFIER_FILE, coef=classifier.coef, intercept=classifier.intercept)
    described = {"file": CLASSIFIER_FILE, "categories": list(classifier.categories), "features": classifier.features,
                 "c": classifier.c, "frozen": None, "views": []}
    if classifier.features == "head":
        return described
    if is_combined_name(classifier.features):
        combination = with_runtime(get_backbone(classifier.features), runtime, threads=threads)
        described["frozen"] = {**write_query_model(directory, combination), "backbone": classifier.features}
        return described
    frozen = with_runtime(eager_base, runtime, threads=threads)
    described["frozen"] = write_query_model(directory, frozen, FROZEN_MODEL)
    if classifier.features == MULTI_VIEW_FEATURES:
        for view in classifier_views(backbone_name):
            seen = with_runtime(view_backbone(eager_base, view), runtime, threads=threads)
            spec = query_preprocessing(seen)
            described["views"].append({"name": view, "preprocessing": spec.to_dict() if spec else None})
    return described


# --- a loaded folder's PyTorch models --------------------------------------------------------------


class FolderNetworks:
    """The networks a folder's build.json names, each built on first use (once, whichever thread asks first) and
    checked against it."""

    def __init__(self, outdir: Path, manifest: BuildManifest, settings: InferenceSettings):
        self.outdir = outdir
        self.manifest = manifest
        self.settings = settings
        self._runtime_backbone: Backbone | None = None
        self._base_backbone: Backbone | None = None
        self._colour_model: Backbone | None = None
        self._building = threading.RLock()

    def serves(self, manifest: BuildManifest) -> bool:
        """Whether these networks are also those of another version's build.json (an update keeps them)."""
        return manifest.backbone == self.manifest.backbone and manifest.runtime == self.manifest.runtime

    def runtime_backbone(self) -> Backbone:
        """The backbone the index was embedded with, on its runtime, checked against build.json."""
        with self._building:
            if self._runtime_backbone is None:
                described = self.manifest.backbone
                eager = get_backbone(described["name"], weights_file=described["weights_file"])
                model = with_runtime(eager, self.manifest.runtime, threads=self.settings.threads)
                if model.weights_sha256 != described["weights_sha256"]:
                    raise IndexFolderError(f"{self.outdir}: the weights of {described['name']} differ from those "
                                           "the index was built with; rebuild the index")
                if model.cache_key != described["cache_key"]:
                    raise IndexFolderError(f"{self.outdir}: {described['name']} now preprocesses or computes "
                                           "differently from when the index was built; rebuild the index")
                self._runtime_backbone = model
            return self._runtime_backbone

    def base_backbone(self) -> Backbone:
        """The frozen network under a fine-tuned model (eager), whose features a classifier may read."""
        with self._building:
            if self._base_backbone is None:
                described = self.manifest.backbone
                self._base_backbone = get_backbone(described["base"], weights_file=described["weights_file"])
            return self._base_backbone

    def query_encoder(self):
        """The encoder of a folder that has no ONNX query model: the runtime backbone itself."""
        return torch_encoder(self.runtime_backbone())

    def frozen_encoder(self, described: dict):
        """The encoder of a classifier's frozen features that have no ONNX model in the folder."""
        runtime, threads = self.manifest.runtime, self.settings.threads
        if described["path"] == CombinedEncoder.path:
            return torch_encoder(with_runtime(get_backbone(described["backbone"]), runtime, threads=threads))
        return torch_encoder(with_runtime(self.base_backbone(), runtime, threads=threads))

    def view_encoder(self, view: str):
        """The encoder of one extra view of the photo that a classifier reads."""
        return TorchEncoder(with_runtime(view_backbone(self.base_backbone(), view), self.manifest.runtime,
                                         threads=self.settings.threads))

    def embed_items(self, table: pd.DataFrame) -> Embeddings:
        """Embeddings of new catalog rows (id, path, label) by the batch path the index was built with."""
        return embed_catalog(table, self.runtime_backbone(), self.settings)

    def colour_rows(self, items: pd.DataFrame) -> np.ndarray:
        """Product-colour descriptors of ``items`` (id, path, label), row-aligned."""
        return aligned_colour(items, colour_descriptors(items[["id", "path", "label"]], self.settings))

    def colour_descriptor(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """The product-colour descriptor of a decoded photo (the batch path's model and preprocessing)."""
        with self._building:
            if self._colour_model is None:
                model = get_backbone(COLOUR_BACKBONE)
                if model.cache_key != self.manifest.colour["cache_key"]:
                    raise IndexFolderError(f"{self.outdir}: the product-colour descriptor now computes differently "
                                           "from when the index was built; rebuild the index")
                self._colour_model = model
            model = self._colour_model
        with torch.inference_mode():
            return model.model(model.transform(as_image(image))[None]).numpy()[0].astype(np.float32)
