"""Transfer learning on the catalog's own categories: model files and the whole procedure.

Frozen ImageNet features know more about the catalog's categories than a raw cosine
ranking uses: a linear classifier on them is right far more often than the nearest
neighbours share the query's category. Two levels close that gap, both trained on the
train split only (query and gallery stay unseen) and both measured against the frozen
backbone on the same split:

* **Level 1** - a projection head on the cached frozen embeddings: :mod:`fashionrec.heads`.
* **Level 2** - the last MBConv block(s) of an EfficientNet-Lite trained together with
  the head: :mod:`fashionrec.trunk`.

The category classifier and category-aware ranking are in :mod:`fashionrec.classify`.
This module re-exports what callers use as ``finetune.<name>``.

A trained model is one file (``torch.save`` of plain tensors and values, loadable with
``weights_only=True``): parameters, hyper-parameters, the fingerprint of its training
rows, its base backbone and weights checksum, its metrics and its training time. The
backbone name ``<base>+head:<file>`` (for example
``efficientnet_lite0+head:results/clothing/head.pt``) loads it through
:func:`fashionrec.backbones.get_backbone`, so every notebook accepts it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import config
from .classify import (MULTI_VIEW_FEATURES, CategoryClassifier, category_aware_effect, category_metrics,
                       classifier_view_embeddings, multi_view_features, select_classifier, train_classifier,
                       view_backbone, view_transform)
from .errors import FashionRecError, WeightsUnavailable
from .heads import (LOSSES, HeadConfig, HeadedModel, HeadFit, ProjectionHead, fit_head, leave_one_out_precision,
                    project, torch_threads, train_head, validation_precision, validation_split,
                    validation_uses_fit_rows)
from .trunk import BackboneTuneConfig, TunedBackbone, _digest, _lite_net, tune_backbone

__all__ = [
    "FORMAT", "TRAINING_VERSION", "HEAD_SEPARATOR", "head_payload", "save_model", "load_model", "head_from_payload",
    "classifier_from_payload", "resolve_head_path", "split_backbone_name", "parameters_sha256",
    "load_headed_backbone", "cache_key", "default_model_path", "FinetuneResult", "run_finetune",
    # re-exported from heads, classify and trunk
    "LOSSES", "HeadConfig", "HeadedModel", "HeadFit", "ProjectionHead", "fit_head", "leave_one_out_precision",
    "project", "torch_threads", "train_head", "validation_precision", "validation_split", "validation_uses_fit_rows",
    "MULTI_VIEW_FEATURES", "CategoryClassifier", "category_aware_effect", "category_metrics",
    "classifier_view_embeddings", "multi_view_features", "select_classifier", "train_classifier", "view_backbone",
    "view_transform", "BackboneTuneConfig", "TunedBackbone", "tune_backbone",
]

FORMAT = "fashionrec-head/1"
# Part of the CLI's model cache key: bump when training changes, so no stale model is reused.
TRAINING_VERSION = 3
HEAD_SEPARATOR = "+head:"


# --------------------------------------------------------------------------------------------
# Model files and the "<base>+head:<file>" backbone name
# --------------------------------------------------------------------------------------------


def head_payload(fit: HeadFit, backbone, head_cfg: HeadConfig, train_fingerprint: str, n_train: int,
                 classifier: CategoryClassifier | None = None, tuned: TunedBackbone | None = None,
                 tune_cfg: BackboneTuneConfig | None = None, metrics: dict | None = None,
                 train_seconds: float | None = None) -> dict:
    """Everything a model file holds, as plain values and tensors (``weights_only``-loadable)."""
    head = tuned.head if tuned is not None else fit.head
    return {
        "format": FORMAT,
        "backbone": backbone.name,
        "backbone_cache_key": backbone.cache_key,
        "base_weights_sha256": backbone.weights_sha256,
        "level": 2 if tuned is not None else 1,
        "loss": fit.loss_name,
        "head_config": _plain(asdict(head_cfg)),
        "tune_config": _plain(asdict(tune_cfg)) if tune_cfg is not None else None,
        "in_dim": int(head.in_dim),
        "out_dim": int(head.out_dim),
        "state_dict": {k: v.detach().clone() for k, v in head.state_dict().items()},
        "trunk_state_dict": dict(tuned.tail_state) if tuned is not None else None,
        "trainable_blocks": int(tuned.trainable_blocks) if tuned is not None else 0,
        "categories": [str(c) for c in fit.categories],
        "classifier": classifier.to_payload() if classifier is not None else None,
        "train_fingerprint": train_fingerprint,
        "n_train": int(n_train),
        "epochs": int(tuned.best_epoch if tuned is not None else fit.epochs),
        "metrics": _plain(metrics or {}),
        "train_seconds": float(train_seconds if train_seconds is not None else fit.seconds),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
    }


def _plain(value):
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
    """Writes a model file atomically (plain values and tensors only); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    torch.save(_loadable(payload), temporary)
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
    return payload


def head_from_payload(payload: dict) -> ProjectionHead:
    cfg = HeadConfig.from_dict(payload["head_config"])
    head = ProjectionHead(payload["in_dim"], cfg.hidden_dim, payload["out_dim"], cfg.input_dropout, cfg.dropout)
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


def load_headed_backbone(name: str, weights_file=None):
    """``<base>+head:<file>``: the base backbone, its fine-tuned blocks (level 2) and the head, as a Backbone."""
    from .backbones import Backbone, get_backbone

    base_name, reference = split_backbone_name(name)
    if not reference:
        raise ValueError(f"{name!r}: expected <backbone>{HEAD_SEPARATOR}<head file>")
    path = resolve_head_path(reference)
    payload = load_model(path)
    if payload["backbone"] != base_name:
        raise WeightsUnavailable(f"{path}: a head for {payload['backbone']!r}, not for {base_name!r}")
    base = get_backbone(base_name, weights_file=weights_file)
    if payload.get("base_weights_sha256") != base.weights_sha256:
        raise WeightsUnavailable(f"{path}: trained on {base_name} weights with sha256 "
                                 f"{str(payload.get('base_weights_sha256'))[:16]}..., but the weights in use have "
                                 f"{str(base.weights_sha256)[:16]}...")
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
    headed = HeadedModel(model, head_from_payload(payload)).eval()
    level = payload.get("level", 1)
    return Backbone(
        name=name,
        dim=int(payload["out_dim"]),
        transform=base.transform,
        model=headed,
        classifier=None,
        weights_sha256=parameters_sha256(payload),
        description=(f"{base_name} + level-{level} fine-tuned head ({payload['loss']}, {payload['out_dim']}-d, "
                     f"unit norm) from {path}"),
    )


# --------------------------------------------------------------------------------------------
# The whole procedure on a prepared dataset (CLI and notebook)
# --------------------------------------------------------------------------------------------


def cache_key(backbone, train_fingerprint: str, level: int, head_cfg: HeadConfig, losses,
              tune_cfg: BackboneTuneConfig | None) -> str:
    settings = {"format": FORMAT, "training_version": TRAINING_VERSION, "backbone": backbone.name, "cache_key": backbone.cache_key,
                "train": train_fingerprint, "level": level, "losses": list(losses),
                "head": _plain(asdict(head_cfg)), "tune": _plain(asdict(tune_cfg)) if level == 2 else None}
    return _digest(json.dumps(settings, sort_keys=True))[:16]


def default_model_path(backbone_name: str, key: str) -> Path:
    return config.PROCESSED_DIR / "heads" / f"{backbone_name}-{key}.pt"


@dataclass
class FinetuneResult:
    """What :func:`run_finetune` produced: the JSON record and the pieces for plots."""

    record: dict
    model_path: Path
    payload: dict
    evaluation: object                 # fine-tuned Evaluation (query -> gallery)
    baseline: object                   # frozen-backbone Evaluation
    vectors: np.ndarray                # fine-tuned embeddings of ``metadata`` rows
    frozen: np.ndarray
    metadata: pd.DataFrame
    classification: dict
    category_aware: pd.DataFrame
    comparison: pd.DataFrame | None = None
    level2: TunedBackbone | None = None
    reused: bool = False
    extra: dict = field(default_factory=dict)


def run_finetune(prepared, backbone: str, level: int = 1, head_cfg: HeadConfig | None = None,
                 tune_cfg: BackboneTuneConfig | None = None, losses=LOSSES, index: str = "Flat", k: int = 10,
                 metric: str = "cosine", search_params: str = "", weights_file=None, batch_size: int = 32,
                 num_workers: int = 2, threads: int | None = None, model_path=None, retrain: bool = False,
                 runtime: str | None = None, train_threads: int | None = 1, progress: bool = True) -> FinetuneResult:
    """Trains (or reuses) a fine-tuned model on the train split and scores it on query -> gallery.

    The model file is cached under ``data/processed/heads/<backbone>-<key>.pt``, where the
    key covers the base backbone, the fingerprint of the train rows, the level and every
    setting; ``model_path`` writes (a copy) there as well.
    """
    from . import metrics as metric_fns
    from .backbones import get_backbone
    from .evaluate import dataset_fingerprint, evaluate_embeddings
    from .workflow import embed

    head_cfg = head_cfg or HeadConfig(k=k, seed=prepared.split_seed)
    tune_cfg = tune_cfg or BackboneTuneConfig(seed=prepared.split_seed)
    if level not in (1, 2):
        raise ValueError("level is 1 (head on frozen embeddings) or 2 (last blocks + head)")
    base = get_backbone(backbone, weights_file=weights_file)
    if level == 2:
        _lite_net(base.model)
    runtime_arg = {"runtime": runtime} if runtime else {}
    embeddings = embed(prepared, backbone, splits=("train", "gallery", "query"), weights_file=weights_file,
                       batch_size=batch_size, num_workers=num_workers, threads=threads, progress=progress,
                       **runtime_arg)
    metadata = embeddings.metadata
    frozen = embeddings.vectors
    split = metadata["split"].to_numpy()
    labels = metadata["label"].astype(str).to_numpy()
    train = split == "train"
    evaluated = np.isin(split, ("gallery", "query"))
    if not train.any():
        raise FashionRecError("no train rows to fine-tune on")
    train_fingerprint = dataset_fingerprint(metadata[train])
    key = cache_key(base, train_fingerprint, level, head_cfg, losses, tune_cfg)
    cached = default_model_path(backbone, key)
    eval_meta = metadata[evaluated].reset_index(drop=True)
    multi_view, views_skipped = None, None
    if head_cfg.classifier_views:
        try:
            views = [classifier_view_embeddings(prepared, view_backbone(base, view), metadata, runtime, batch_size,
                                                num_workers, threads, progress) for view in head_cfg.classifier_views]
            multi_view = multi_view_features(frozen, views)
        except FashionRecError as error:   # e.g. a backbone whose transform has no centre crop
            views_skipped = str(error)
    baseline = evaluate_embeddings(frozen[evaluated], eval_meta, k=k, index=index, metric=metric,
                                   search_params=search_params, seed=prepared.split_seed)

    fit = tuned = None
    comparison = None
    reused = cached.is_file() and not retrain
    if reused:
        payload = load_model(cached)
        if progress:
            print(f"[finetune] reusing {cached} (same backbone, train rows and settings)", file=sys.stderr)
    else:
        started = time.perf_counter()
        with torch_threads(train_threads):
            fit = fit_head(frozen[train], labels[train], head_cfg, losses, progress=progress)
        comparison = fit.comparison
        if level == 2:
            tuned = tune_backbone(base, metadata[train].reset_index(drop=True), labels[train], fit, tune_cfg,
                                  head_cfg, num_workers=num_workers, train_threads=train_threads, progress=progress)
            # Trained on the fit part only (no refit), so its validation features are honest.
            head_train, head_selection = tuned.train_vectors, tuned.train_vectors
            augmented, augmented_rows = tuned.augmented_vectors, tuned.augmented_rows
        else:
            head_train, head_selection = project(fit.head, frozen[train]), project(fit.selection_head, frozen[train])
            augmented = augmented_rows = None
        classifier, classifier_table = select_classifier(
            frozen[train], labels[train], fit.val_mask, head_vectors=head_train,
            head_selection_vectors=head_selection, cs=head_cfg.classifier_c, seed=head_cfg.seed,
            head_augmented=augmented, head_augmented_rows=augmented_rows,
            multi_view=None if multi_view is None else multi_view[train])
        train_seconds = time.perf_counter() - started
        payload = head_payload(fit, base, head_cfg, train_fingerprint, int(train.sum()), classifier, tuned,
                               tune_cfg if level == 2 else None, train_seconds=train_seconds)
        payload["embeddings_cache_key"] = embeddings.cache_key   # the runtime that computed the frozen inputs
        payload["selection"] = _plain({
            "loss_comparison": comparison.to_dict(orient="records"),
            "histories": {name: [{"epoch": h["epoch"], "loss": h["loss"], "val_precision": h.get("val_precision")}
                                 for h in history] for name, history in fit.histories.items()},
            "classifier_selection": classifier_table.to_dict(orient="records"),
            "not_validated": fit.not_validated,
            "n_validation": int(fit.val_mask.sum()),
            "level2": None if tuned is None else {
                "history": tuned.history, "best_epoch": tuned.best_epoch,
                "best_val_precision": tuned.best_val_precision, "stopped_by": tuned.stopped_by,
                "train_seconds": tuned.seconds, "feature_seconds": tuned.feature_seconds},
        })
        save_model(payload, cached)   # metrics are added below, once measured

    head = head_from_payload(payload)
    classifier = classifier_from_payload(payload)
    headed_name = f"{backbone}{HEAD_SEPARATOR}{cached.name}"
    if payload["level"] == 1:
        vectors = project(head, frozen)
    else:
        # Level 2 changes the backbone itself: embed through the saved model, as any notebook would.
        headed = embed(prepared, headed_name, splits=("gallery", "query"), weights_file=weights_file,
                       batch_size=batch_size, num_workers=num_workers, threads=threads, progress=progress,
                       **runtime_arg)
        by_id = dict(zip(headed.metadata["id"], headed.vectors))
        vectors = np.zeros((len(metadata), headed.vectors.shape[1]), np.float32)
        if tuned is not None:   # train rows: only when just trained (their clean views, tuned blocks + head)
            vectors[train] = tuned.train_vectors
        for i in np.flatnonzero(evaluated):
            vectors[i] = by_id[metadata["id"].iloc[i]]
    evaluation = evaluate_embeddings(vectors[evaluated], eval_meta, k=k, index=index, metric=metric,
                                     search_params=search_params, seed=prepared.split_seed)

    query = split == "query"
    gallery = split == "gallery"
    feature_of = {"frozen": frozen, "head": vectors, MULTI_VIEW_FEATURES: multi_view}
    if classifier is not None:
        predicted = classifier.predict(feature_of[classifier.features])
    else:
        predicted = np.full(len(labels), payload["categories"][0], dtype=object)
    classification = category_metrics(labels[query], predicted[query], payload["categories"], seed=prepared.split_seed)
    classification["classifier"] = {
        "model": "logistic regression", "features": classifier.features if classifier else None,
        "C": classifier.c if classifier else None,
        "views": ["centre_crop", *head_cfg.classifier_views] if multi_view is not None else ["centre_crop"],
        "views_skipped": views_skipped}
    aware = category_aware_effect(vectors[query], vectors[gallery], labels[query], labels[gallery], predicted[query],
                                  predicted[gallery], k=k)

    paired = metric_fns.paired_bootstrap(evaluation.per_query["precision_at_k"],
                                         baseline.per_query["precision_at_k"], seed=prepared.split_seed)
    measured = {
        "precision_at_k": evaluation.summary["precision_at_k"],
        "baseline_precision_at_k": baseline.summary["precision_at_k"],
        "category_accuracy": classification["accuracy"],
        "macro_f1": classification["macro_f1"],
        "k": k, "index": index, "metric": metric, "split_seed": prepared.split_seed,
        "dataset_fingerprint": dataset_fingerprint(metadata),
    }
    if not reused or payload.get("metrics") != _plain(measured):
        payload["metrics"] = _plain(measured)
        save_model(payload, cached)
    if model_path is not None and Path(model_path).resolve() != cached.resolve():
        save_model(payload, model_path)

    selection = payload.get("selection", {})
    record = {
        "finetune": {
            "level": payload["level"],
            "loss": payload["loss"],
            "model_file": str(model_path or cached),
            "cache_file": str(cached),
            "finetuned_backbone": f"{backbone}{HEAD_SEPARATOR}{model_path or cached.name}",
            "reused_cached_model": reused,
            "train_fingerprint": train_fingerprint,
            "n_train": payload["n_train"],
            "n_validation": selection.get("n_validation"),
            "epochs": payload["epochs"],
            "head_config": payload["head_config"],
            "tune_config": payload["tune_config"],
            "loss_comparison": selection.get("loss_comparison"),
            "classifier_selection": selection.get("classifier_selection"),
            "level2": selection.get("level2"),
            "categories_without_validation": selection.get("not_validated", []),
            "dim": int(payload["out_dim"]),
        },
        "category_accuracy": round(classification["accuracy"], 6),
        "category_accuracy_ci": classification["accuracy_ci"],
        "macro_f1": round(classification["macro_f1"], 6),
        "classification": classification,
        "baseline_precision_at_k": round(baseline.summary["precision_at_k"], 6),
        "baseline": {"backbone": backbone, **baseline.to_record(bootstrap_seed=prepared.split_seed)},
        "precision_at_k_gain": _plain(paired),
        "category_aware": _plain(aware.replace({math.inf: "inf"}).to_dict(orient="records")),
        "train_seconds": round(float(payload["train_seconds"]), 3),
    }
    record["baseline"].pop("per_category", None)
    return FinetuneResult(record, Path(model_path or cached), payload, evaluation, baseline, vectors, frozen,
                          metadata, classification, aware, comparison, tuned, reused,
                          {"embeddings": embeddings, "predicted": predicted})
