"""What an index folder carries to answer a query: the query model and the category classifier.

With an ONNX runtime the folder holds ``query.onnx`` (uint8 pixels -> embedding), so loading it
builds no PyTorch model, imports no torch and depends on no cache; other runtimes rebuild the
backbone by name (:class:`~fashionrec.serving.networks.FolderNetworks`, which also writes what this
module reads).

A fine-tuned model (``<base>+head:<file>``) may carry a category classifier
(:func:`~fashionrec.models.finetuned.classifier_from_payload`). It reads one of three feature
sets, and the folder holds what computing them for a new photo takes:

* ``head``: the retrieval vector itself; nothing more;
* ``frozen``: the frozen base backbone's embedding, so ``frozen.onnx`` (the base network, not the
  fine-tuned one) runs on the same crop;
* ``frozen+views``: that embedding plus the base network's embeddings of other views of the
  photo (:mod:`fashionrec.models.views`: the whole photo squashed, the shorter side cropped),
  each L2-normalised and concatenated in the order the classifier was trained with;
* a combination's name (a model chosen by the model search, :mod:`fashionrec.experiment.search`):
  that combination's vector, computed leaf by leaf (:class:`~fashionrec.serving.networks.CombinedEncoder`).

A view is decoded with its own JPEG draft size, as when its training features were computed.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import IndexFolderError
from ..models.classifier import CategoryClassifier, multi_view_features
from ..models.preprocess import Preprocessing
from ..models.query_model import OnnxEncoder
from ..provenance import file_sha256

QUERY_MODEL = "query.onnx"
FROZEN_MODEL = "frozen.onnx"
CLASSIFIER_FILE = "classifier.npz"


def open_encoder(directory: Path, described: dict, threads: int | None, spinning: bool,
                 torch_encoder: Callable[[], object], compiled_resize: bool = True):
    """The encoder a folder describes: its ONNX query model, or the one ``torch_encoder`` builds (an eager or
    combined model: :class:`~fashionrec.serving.networks.FolderNetworks`). ``compiled_resize``: see
    :class:`~fashionrec.models.query_model.OnnxEncoder`."""
    if described["path"] != OnnxEncoder.path:
        return torch_encoder()
    path = directory / described["file"]
    if not path.is_file() or file_sha256(path) != described["sha256"]:
        raise IndexFolderError(f"{path}: missing or changed since the index was built; rebuild the index")
    return OnnxEncoder.from_file(path, Preprocessing.from_dict(described["preprocessing"]), threads, spinning,
                                 compiled_resize)


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
            features = self.frozen.encode_with(image_for)[0]
            if self.views:
                features = multi_view_features(features, [view.encode_with(image_for)[0] for view in self.views])
        probabilities = self.classifier.predict_proba(features)[0]
        best = int(np.argmax(probabilities))
        return (str(self.classifier.categories[best]), float(probabilities[best]),
                (time.perf_counter() - started) * 1000.0)


def open_predictor(directory: Path, described: dict | None, threads: int | None, spinning: bool,
                   networks: Callable[[], object], compiled_resize: bool = True) -> CategoryPredictor | None:
    """The predictor a folder describes (None when it carries no classifier); ``networks()`` gives the folder's
    :class:`~fashionrec.serving.networks.FolderNetworks` for features it holds no ONNX model of."""
    if not described:
        return None
    arrays = np.load(directory / described["file"])
    classifier = CategoryClassifier(described["categories"], described["features"], arrays["coef"],
                                    arrays["intercept"], described["c"])
    if described["frozen"] is None:
        return CategoryPredictor(classifier)
    frozen = open_encoder(directory, described["frozen"], threads, spinning,
                          lambda: networks().frozen_encoder(described["frozen"]), compiled_resize)
    views = [frozen.with_spec(Preprocessing.from_dict(view["preprocessing"]))
             if isinstance(frozen, OnnxEncoder) and view["preprocessing"] is not None
             else networks().view_encoder(view["name"]) for view in described["views"]]
    return CategoryPredictor(classifier, frozen, views)
