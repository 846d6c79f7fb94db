"""The fine-tuned model file and the ``<backbone>+head:<file>`` backbone name.

A trained model is one file (``torch.save`` of plain tensors and values, loadable with
``weights_only=True``): parameters, hyper-parameters, the fingerprint of its training rows,
its base backbone and weights checksum, its category classifier, its metrics and its
training time. The backbone name ``<base>+head:<file>`` (for example
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


def save_model(payload: dict, path) -> Path:
    """Writes a model file atomically (plain values and tensors only, at this code's schema version); returns its path.

    The one writer of model files: fine-tuning and the model search both save through it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    torch.save({**_loadable(payload), "schema_version": MODEL_SCHEMA_VERSION}, temporary)
    os.replace(temporary, path)
    return path


def load_model(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailable(f"head file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsUnavailable(f"{path}: cannot be read as a fashionrec head file ({type(error).__name__}: {error})") \
            from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise WeightsUnavailable(f"{path}: not a fashionrec head file (format {FORMAT})")
    version = int(payload.get("schema_version", 1))
    if version > MODEL_SCHEMA_VERSION:
        raise WeightsUnavailable(f"{path}: model file schema version {version}; this fashionrec reads versions up to "
                                 f"{MODEL_SCHEMA_VERSION}: upgrade fashionrec or train the model again")
    return {**payload, "schema_version": version}


def head_from_payload(payload: dict) -> ProjectionHead:
    """The projection head a model file holds (a searched model that chose frozen features has none: no state_dict)."""
    config = payload["head_config"]
    head = ProjectionHead(payload["in_dim"], config["hidden_dim"], payload["out_dim"], config["input_dropout"],
                          config["dropout"])
    head.load_state_dict(payload["state_dict"], strict=True)
    return head.eval()


def classifier_from_payload(payload: dict) -> CategoryClassifier | None:
    return CategoryClassifier.from_payload(payload["classifier"]) if payload.get("classifier") else None


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


def parameters_sha256(payload: dict) -> str:
    """Digest of what determines a fine-tuned model's output: base weights, architecture, every tensor.

    Metrics, timings and other metadata in the file are left out, so writing measured
    metrics into a model file does not invalidate the embeddings cached for it.
    """
    digest = hashlib.sha256()
    head_cfg = payload["head_config"]
    architecture = {"backbone": payload["backbone"], "base": payload.get("base_weights_sha256"),
                    "in_dim": payload["in_dim"], "out_dim": payload["out_dim"], "hidden_dim": head_cfg["hidden_dim"]}
    digest.update(json.dumps(architecture, sort_keys=True).encode())
    for part in ("state_dict", "trunk_state_dict"):
        for key, tensor in sorted((payload.get(part) or {}).items()):
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
    payload = load_model(path)
    if payload["backbone"] != base_name:
        raise WeightsUnavailable(f"{path}: a head for {payload['backbone']!r}, not for {base_name!r}")
    if payload.get("base_weights_sha256") != base.weights_sha256:
        raise WeightsUnavailable(f"{path}: trained on {base_name} weights with sha256 "
                                 f"{str(payload.get('base_weights_sha256'))[:16]}..., but the weights in use have "
                                 f"{str(base.weights_sha256)[:16]}...")
    level = payload.get("level", 1)
    head = head_from_payload(payload) if payload.get("state_dict") is not None else None
    description = (f"{base_name} + level-{level} fine-tuned head ({payload['loss']}, {payload['out_dim']}-d, "
                   f"unit norm) from {path}") if head is not None else \
        f"{base_name} with the category classifier and ranking of {path} (no head: frozen features)"
    if isinstance(base, CombinedBackbone):
        if payload.get("trunk_state_dict"):
            raise WeightsUnavailable(f"{path}: holds fine-tuned backbone blocks, which a combination cannot take")
        return base.with_head(name, head, parameters_sha256(payload), description)
    if head is None:
        return dataclasses.replace(base, name=name, weights_sha256=parameters_sha256(payload), description=description)
    model = base.model
    if payload.get("trunk_state_dict"):
        model = copy.deepcopy(model)
        trunk_state = payload["trunk_state_dict"]
        own = model.state_dict()
        unknown = sorted(set(trunk_state) - set(own))
        if unknown:
            raise WeightsUnavailable(f"{path}: fine-tuned parameters {unknown[:3]} do not fit {base_name}")
        own.update(trunk_state)
        model.load_state_dict(own, strict=True)
    headed = HeadedModel(model, head).eval()
    return Backbone(name=name, dim=int(payload["out_dim"]), transform=base.transform, model=headed, classifier=None,
                    weights_sha256=parameters_sha256(payload), description=description)
