"""The fine-tuned model file and the ``<backbone>+head:<file>`` backbone name.

A trained model is one file (``torch.save`` of plain tensors and values, loadable with
``weights_only=True``): parameters, hyper-parameters, the fingerprint of its training rows,
its base backbone and weights checksum, its category classifier, its metrics and its
training time, typed as :class:`ModelFile`. The backbone name ``<base>+head:<file>`` (for example
``efficientnet_lite0+head:results/clothing/head.pt``) loads it through
:func:`fashionrec.models.registry.get_backbone`, so every stage accepts it. Nothing here
imports the training code.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from .. import config
from ..errors import WeightsUnavailable
from .backbone import Backbone
from .classifier import CategoryClassifier
from .ensemble import CombinedBackbone
from .projection import HeadedModel, ProjectionHead

FORMAT = "fashionrec-head/1"
# Which metadata a model file holds; 1: files written before the field existed (they read as they are).
MODEL_SCHEMA_VERSION = 2
HEAD_SEPARATOR = "+head:"


def plain_values(value):
    """JSON-style values only (dicts, lists, str, float, int, bool, None) for a weights_only file."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _loadable(value):
    """Plain containers, str/int/float/bool/None and tensors only: what ``weights_only`` loads."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, dict):
        return {str(k): _loadable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_loadable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or type(value) in (bool, int, float, str):
        return value
    for plain in (str, bool, int, float):   # subclasses (TorchVersion, IntEnum...) -> the plain type
        if isinstance(value, plain):
            return plain(value)
    raise TypeError(f"cannot store a {type(value).__name__} in a model file")


@dataclass(eq=False)   # tensors inside: compare files by their contents, not with ==
class ModelFile:
    """What a model file holds, written and read here only (:func:`save_model`, :func:`load_model`).

    ``schema_version`` says which fields a file has; version 1 is a file written before the
    field existed (it reads as it is). Keys an older file holds that no field names stay in
    ``extra`` and are written back. Reading as a mapping (``model["loss"]``, ``model.get(...)``)
    gives the same values as the attributes and the ``extra`` keys, for code that reads a file by its keys.
    """

    backbone: str
    format: str = FORMAT
    backbone_cache_key: str | None = None
    base_weights_sha256: str | None = None
    level: int = 1
    loss: str | None = None
    head_config: dict = field(default_factory=dict)
    tune_config: dict | None = None
    in_dim: int | None = None
    out_dim: int | None = None
    state_dict: dict | None = None          # the projection head (None: a searched model that kept frozen features)
    trunk_state_dict: dict | None = None    # fine-tuned backbone blocks (level 2)
    trainable_blocks: int = 0
    categories: list = field(default_factory=list)
    classifier: dict | None = None
    classifier_backbone: str | None = None
    ranking: dict | None = None             # {"boost", "categories"} of a searched model
    preprocessing: list | None = None
    train_fingerprint: str | None = None
    embeddings_cache_key: str | None = None
    n_train: int | None = None
    epochs: int | None = None
    metrics: dict = field(default_factory=dict)
    train_seconds: float | None = None
    selection: dict | None = None
    created: str | None = None
    torch: str | None = None
    extra: dict = field(default_factory=dict)
    schema_version: int = MODEL_SCHEMA_VERSION

    def to_payload(self) -> dict:
        """The file's contents: every field (None included) and the ``extra`` keys, as plain values and tensors."""
        record = {item.name: getattr(self, item.name) for item in fields(self) if item.name != "extra"}
        return _loadable({**self.extra, **record})

    @classmethod
    def from_payload(cls, payload: dict, where: str) -> "ModelFile":
        """A model file's contents; WeightsUnavailable naming ``where`` for another format, version or no backbone."""
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise WeightsUnavailable(f"{where}: not a fashionrec head file (format {FORMAT})")
        version = int(payload.get("schema_version", 1))
        if version > MODEL_SCHEMA_VERSION:
            raise WeightsUnavailable(f"{where}: model file schema version {version}; this fashionrec reads versions "
                                     f"up to {MODEL_SCHEMA_VERSION}: upgrade fashionrec or train the model again")
        if "backbone" not in payload:
            raise WeightsUnavailable(f"{where}: model file lacks backbone; train the model again")
        known = {item.name for item in fields(cls)} - {"extra", "schema_version"}
        return cls(**{key: value for key, value in payload.items() if key in known},
                   extra={key: value for key, value in payload.items() if key not in known | {"schema_version"}},
                   schema_version=version)

    def __getitem__(self, key: str):
        if key in self.extra:
            return self.extra[key]
        if key == "extra" or key not in {item.name for item in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        try:
            value = self[key]
        except KeyError:
            return default
        return default if value is None else value


def save_model(model: ModelFile, path) -> Path:
    """Writes a model file atomically, at this code's schema version; returns its path.

    The one writer of model files: fine-tuning and the model search both save through it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.schema_version = MODEL_SCHEMA_VERSION
    temporary = path.with_name(f".{path.name}.partial")
    torch.save(model.to_payload(), temporary)
    os.replace(temporary, path)
    return path


def load_model(path) -> ModelFile:
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailable(f"head file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsUnavailable(f"{path}: cannot be read as a fashionrec head file ({type(error).__name__}: {error})") \
            from error
    return ModelFile.from_payload(payload, str(path))


def head_from_payload(model: ModelFile) -> ProjectionHead:
    """The projection head a model file holds (a searched model that chose frozen features has none: no state_dict)."""
    config = model.head_config
    head = ProjectionHead(model.in_dim, config["hidden_dim"], model.out_dim, config["input_dropout"],
                          config["dropout"])
    head.load_state_dict(model.state_dict, strict=True)
    return head.eval()


def classifier_from_payload(model: ModelFile) -> CategoryClassifier | None:
    return CategoryClassifier.from_payload(model.classifier) if model.classifier else None


def resolve_head_path(reference: str) -> Path:
    """Finds the model file a ``+head:`` reference names.

    ``<file>`` as given (absolute, or relative to the working directory or the project
    root); a bare ``<name>.pt`` also in ``data/processed/heads`` (the CLI's cache); a bare
    run name is ``results/<run>/head.pt``. The bare forms contain no ``/``, so a backbone
    name built from them is also a valid file name (embedding files, caches, exports).
    """
    candidates = [Path(reference)]
    if not Path(reference).is_absolute():
        candidates.append(config.PROJECT_ROOT / reference)
        if "/" not in reference:
            candidates.append(config.PROCESSED_DIR / "heads" / reference)
            candidates.append(config.RESULTS_DIR / reference / "head.pt")
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise WeightsUnavailable(f"head file {reference!r} not found (looked at: {', '.join(map(str, candidates))}); "
                             "train one with notebook 04-finetune or `python -m fashionrec evaluate ... --finetune`")


def split_backbone_name(name: str) -> tuple[str, str | None]:
    if HEAD_SEPARATOR in name:
        base, reference = name.split(HEAD_SEPARATOR, 1)
        return base, reference
    return name, None


def parameters_sha256(model: ModelFile) -> str:
    """Digest of what determines a fine-tuned model's output: base weights, architecture, every tensor.

    Metrics, timings and other metadata in the file are left out, so writing measured
    metrics into a model file does not invalidate the embeddings cached for it.
    """
    digest = hashlib.sha256()
    architecture = {"backbone": model.backbone, "base": model.base_weights_sha256, "in_dim": model.in_dim,
                    "out_dim": model.out_dim, "hidden_dim": model.head_config["hidden_dim"]}
    digest.update(json.dumps(architecture, sort_keys=True).encode())
    for part in ("state_dict", "trunk_state_dict"):
        for key, tensor in sorted((getattr(model, part) or {}).items()):
            digest.update(f"{part}/{key}".encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def headed_backbone(name: str, base: Backbone | CombinedBackbone) -> Backbone | CombinedBackbone:
    """``<base>+head:<file>``: the base backbone, its fine-tuned blocks (level 2) and the head, as a Backbone.

    ``base`` is the base backbone, already built (the registry builds it from the name). A
    combination (``ensemble:...+head:<file>``) stays a CombinedBackbone whose head maps the
    combined vector; level-2 blocks do not apply to it.
    """
    base_name, reference = split_backbone_name(name)
    if not reference:
        raise ValueError(f"{name!r}: expected <backbone>{HEAD_SEPARATOR}<head file>")
    path = resolve_head_path(reference)
    model_file = load_model(path)
    if model_file.backbone != base_name:
        raise WeightsUnavailable(f"{path}: a head for {model_file.backbone!r}, not for {base_name!r}")
    if model_file.base_weights_sha256 != base.weights_sha256:
        raise WeightsUnavailable(f"{path}: trained on {base_name} weights with sha256 "
                                 f"{str(model_file.base_weights_sha256)[:16]}..., but the weights in use have "
                                 f"{str(base.weights_sha256)[:16]}...")
    level = model_file.level
    head = head_from_payload(model_file) if model_file.state_dict is not None else None
    description = (f"{base_name} + level-{level} fine-tuned head ({model_file.loss}, {model_file.out_dim}-d, "
                   f"unit norm) from {path}") if head is not None else \
        f"{base_name} with the category classifier and ranking of {path} (no head: frozen features)"
    if isinstance(base, CombinedBackbone):
        if model_file.trunk_state_dict:
            raise WeightsUnavailable(f"{path}: holds fine-tuned backbone blocks, which a combination cannot take")
        return base.with_head(name, head, parameters_sha256(model_file), description)
    if head is None:
        return dataclasses.replace(base, name=name, weights_sha256=parameters_sha256(model_file), description=description)
    model = base.model
    if model_file.trunk_state_dict:
        model = copy.deepcopy(model)
        trunk_state = model_file.trunk_state_dict
        own = model.state_dict()
        unknown = sorted(set(trunk_state) - set(own))
        if unknown:
            raise WeightsUnavailable(f"{path}: fine-tuned parameters {unknown[:3]} do not fit {base_name}")
        own.update(trunk_state)
        model.load_state_dict(own, strict=True)
    headed = HeadedModel(model, head).eval()
    return Backbone(name=name, dim=int(model_file.out_dim), transform=base.transform, model=headed, classifier=None,
                    weights_sha256=parameters_sha256(model_file), description=description)
