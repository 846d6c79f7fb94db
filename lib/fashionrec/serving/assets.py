"""What an index folder carries to answer a query: the query model and the category classifier.

With an ONNX runtime the folder holds ``query.onnx`` (uint8 pixels -> embedding), so loading it
builds no PyTorch model and depends on no cache; other runtimes rebuild the backbone by name.

A fine-tuned model (``<base>+head:<file>``) may carry a category classifier
(:func:`~fashionrec.models.finetuned.classifier_from_payload`). It reads one of three feature
sets, and the folder holds what computing them for a new photo takes:

* ``head``: the retrieval vector itself; nothing more;
* ``frozen``: the frozen base backbone's embedding, so ``frozen.onnx`` (the base network, not the
  fine-tuned one) runs on the same crop;
* ``frozen+views``: that embedding plus the base network's embeddings of other views of the
  photo (:mod:`fashionrec.models.views`: the whole photo squashed, the shorter side cropped),
  each L2-normalised and concatenated in the order the classifier was trained with.

A view is decoded with its own JPEG draft size, as when its training features were computed.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import FashionRecError, IndexFolderError
from ..models.backbone import Backbone, file_sha256
from ..models.classifier import CategoryClassifier
from ..models.finetuned import classifier_from_payload, load_model, resolve_head_path, split_backbone_name
from ..models.preprocess import Preprocessing
from ..models.query_model import uint8_query_model
from ..models.runtime import OnnxModel, with_runtime
from ..models.views import MULTI_VIEW_FEATURES, multi_view_features, view_backbone
from .encoder import OnnxEncoder, TorchEncoder

QUERY_MODEL = "query.onnx"
FROZEN_MODEL = "frozen.onnx"
CLASSIFIER_FILE = "classifier.npz"


def query_preprocessing(backbone: Backbone) -> Preprocessing | None:
    """The backbone's preprocessing as data when its model runs in ONNX Runtime, else None."""
    if not isinstance(backbone.model, OnnxModel):
        return None
    try:
        return Preprocessing.from_transform(backbone.transform)
    except FashionRecError:
        return None


def write_query_model(directory: Path, backbone: Backbone, name: str = QUERY_MODEL) -> dict:
    """Writes the uint8 query model of ``backbone`` (runtime-wrapped) if it has one; returns its description."""
    spec = query_preprocessing(backbone)
    if spec is None:
        return {"path": TorchEncoder.path, "file": None, "preprocessing": None}
    target = uint8_query_model(backbone.model.path, directory / name, spec)
    return {"path": OnnxEncoder.path, "file": name, "sha256": file_sha256(target), "preprocessing": spec.to_dict()}


def open_encoder(directory: Path, described: dict, rebuild: Callable[[], Backbone], threads: int | None,
                 spinning: bool):
    """The encoder a folder describes: its ONNX query model, or the backbone ``rebuild`` builds."""
    if described["path"] == OnnxEncoder.path:
        path = directory / described["file"]
        if not path.is_file() or file_sha256(path) != described["sha256"]:
            raise IndexFolderError(f"{path}: missing or changed since the index was built; rebuild the index")
        return OnnxEncoder.from_file(path, Preprocessing.from_dict(described["preprocessing"]), threads, spinning)
    return TorchEncoder(rebuild())


class CategoryPredictor:
    """A classifier and the encoders of the features it reads (None: the retrieval vector)."""

    def __init__(self, classifier: CategoryClassifier, frozen=None, views=()):
        self.classifier = classifier
        self.frozen = frozen
        self.views = list(views)

    def predict(self, image_for: Callable, retrieval_vector: np.ndarray) -> tuple[str, float, float]:
        """(category, its probability, milliseconds); ``image_for(draft_size)`` decodes the query."""
        started = time.perf_counter()
        if self.frozen is None:
            features = retrieval_vector
        else:
            features = self.frozen.encode(image_for(self.frozen.draft_size))[0]
            if self.views:
                features = multi_view_features(features, [view.encode(image_for(view.draft_size))[0]
                                                          for view in self.views])
        probabilities = self.classifier.predict_proba(features)[0]
        best = int(np.argmax(probabilities))
        return (str(self.classifier.categories[best]), float(probabilities[best]),
                (time.perf_counter() - started) * 1000.0)


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
    frozen = with_runtime(eager_base, runtime, threads=threads)
    described["frozen"] = write_query_model(directory, frozen, FROZEN_MODEL)
    if classifier.features == MULTI_VIEW_FEATURES:
        for view in classifier_views(backbone_name):
            seen = with_runtime(view_backbone(eager_base, view), runtime, threads=threads)
            spec = query_preprocessing(seen)
            described["views"].append({"name": view, "preprocessing": spec.to_dict() if spec else None})
    return described


def open_predictor(directory: Path, described: dict | None, rebuild_base: Callable[[], Backbone], runtime: str,
                   threads: int | None, spinning: bool) -> CategoryPredictor | None:
    """The predictor a folder describes (None when it carries no classifier)."""
    if not described:
        return None
    arrays = np.load(directory / described["file"])
    classifier = CategoryClassifier(described["categories"], described["features"], arrays["coef"],
                                    arrays["intercept"], described["c"])
    if described["frozen"] is None:
        return CategoryPredictor(classifier)
    base: list[Backbone] = []

    def eager_base() -> Backbone:
        if not base:
            base.append(rebuild_base())
        return base[0]

    frozen = open_encoder(directory, described["frozen"], lambda: with_runtime(eager_base(), runtime, threads=threads),
                          threads, spinning)
    views = []
    for view in described["views"]:
        if isinstance(frozen, OnnxEncoder) and view["preprocessing"] is not None:
            views.append(frozen.with_spec(Preprocessing.from_dict(view["preprocessing"])))
        else:
            views.append(TorchEncoder(with_runtime(view_backbone(eager_base(), view["name"]), runtime,
                                                   threads=threads)))
    return CategoryPredictor(classifier, frozen, views)
