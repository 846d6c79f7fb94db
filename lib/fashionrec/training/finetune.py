"""Training a fine-tuned model on the catalog's own categories, from the train split only.

Frozen ImageNet features know more about the catalog's categories than a raw cosine
ranking uses: a linear classifier on them is right far more often than the nearest
neighbours share the query's category. Two levels close that gap:

* **Level 1** - a projection head on the cached frozen embeddings (:mod:`.heads`).
* **Level 2** - the last MBConv block(s) of an EfficientNet-Lite trained together with
  the head (:mod:`.trunk`).

Then a category classifier, and the category-aware ranking boost that uses it, are chosen
(:mod:`.classify`) on a *selection* slice of the train split that neither training nor early
stopping has seen: level 2's head is early-stopped on its validation part, so choosing the
classifier's features there would flatter the head's outputs (it picked them at 0.832
validation accuracy; they reached 0.804 on the queries).
:func:`train_model` returns a :class:`TrainedModel` whose ``payload`` is the content of a
model file (:mod:`fashionrec.models.finetuned`); scoring it on query -> gallery is
:mod:`fashionrec.experiment.finetune`'s business.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import config
from ..data.split import validation_split
from ..models.backbone import Backbone
from ..models.classifier import CategoryClassifier
from ..models.finetuned import FORMAT, ModelFile, plain_values
from ..models.projection import project
from .classify import choose_category_boost, select_classifier
from .heads import LOSSES, HeadConfig, HeadFit, fit_head, torch_threads, train_head
from .trunk import BackboneTuneConfig, TunedBackbone, text_digest, tune_backbone

# Part of the model cache key: bump when training changes, so no stale model is reused.
TRAINING_VERSION = 6


@dataclass(frozen=True)
class FinetuneConfig:
    """What to train: the level, the settings of each level, the losses to choose from."""

    level: int = 1
    head: HeadConfig = field(default_factory=HeadConfig)
    tune: BackboneTuneConfig = field(default_factory=BackboneTuneConfig)
    losses: tuple[str, ...] = LOSSES
    # Training threads: the head's matrices are small, and extra threads only spin (see torch_threads).
    train_threads: int | None = 1

    def __post_init__(self):
        if self.level not in (1, 2):
            raise ValueError("level is 1 (head on frozen embeddings) or 2 (last blocks + head)")
        unknown = set(self.losses) - set(LOSSES)
        if not self.losses or unknown:
            raise ValueError(f"losses must be among {', '.join(LOSSES)}, got {list(self.losses)}")


@dataclass
class TrainedModel:
    """A freshly trained model: the model file's content and how it was chosen."""

    payload: dict
    fit: HeadFit
    tuned: TunedBackbone | None
    classifier_selection: pd.DataFrame
    seconds: float
    train_vectors: np.ndarray          # every train row through the final model (level 2: its clean view)


def head_payload(fit: HeadFit, backbone, head_cfg: HeadConfig, train_fingerprint: str, n_train: int,
                 classifier: CategoryClassifier | None = None, tuned: TunedBackbone | None = None,
                 tune_cfg: BackboneTuneConfig | None = None, metrics: dict | None = None,
                 train_seconds: float | None = None) -> ModelFile:
    """Everything a model file holds (:func:`fashionrec.models.finetuned.save_model` writes it)."""
    head = tuned.head if tuned is not None else fit.head
    return ModelFile(
        backbone=backbone.name,
        backbone_cache_key=backbone.cache_key,
        base_weights_sha256=backbone.weights_sha256,
        level=2 if tuned is not None else 1,
        loss=fit.loss_name,
        head_config=plain_values(asdict(head_cfg)),
        tune_config=plain_values(asdict(tune_cfg)) if tune_cfg is not None else None,
        in_dim=int(head.in_dim),
        out_dim=int(head.out_dim),
        state_dict={k: v.detach().clone() for k, v in head.state_dict().items()},
        trunk_state_dict=dict(tuned.tail_state) if tuned is not None else None,
        trainable_blocks=int(tuned.trainable_blocks) if tuned is not None else 0,
        categories=[str(c) for c in fit.categories],
        classifier=classifier.to_payload() if classifier is not None else None,
        train_fingerprint=train_fingerprint,
        n_train=int(n_train),
        epochs=int(tuned.best_epoch if tuned is not None else fit.epochs),
        metrics=plain_values(metrics or {}),
        train_seconds=float(train_seconds if train_seconds is not None else fit.seconds),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        torch=torch.__version__,
    )


def train_model(base: Backbone, train_rows: pd.DataFrame, frozen: np.ndarray, cfg: FinetuneConfig,
                train_fingerprint: str, multi_view: np.ndarray | None = None, num_workers: int = 2,
                progress: bool = True, extra_loss=None) -> TrainedModel:
    """Trains level 1 (and level 2 if asked) and the category classifier on the train rows.

    ``train_rows`` (id, path, label, digest, in ``frozen``'s row order) are the train split;
    ``frozen`` their embeddings by ``base``; ``multi_view`` their multi-view features, if any.
    Model selection uses parts of these rows only (see the module docstring).
    ``extra_loss(embeddings, rows)`` (level 2) adds a term to each batch's loss, ``rows`` being
    positions in ``train_rows`` (see :func:`~fashionrec.training.trunk.tune_backbone`).
    """
    labels = train_rows["label"].astype(str).to_numpy()
    head_cfg, tune_cfg = cfg.head, cfg.tune
    started = time.perf_counter()
    # Three slices: heads train on the fit part of ``develop`` and stop early on its validation
    # part; the classifier's features and C are chosen on ``select``, which neither has seen.
    select, _ = validation_split(labels, head_cfg.val_fraction, head_cfg.seed, purpose="select")
    develop = np.flatnonzero(~select)
    with torch_threads(cfg.train_threads):
        fit = fit_head(frozen[develop], labels[develop], dataclasses.replace(head_cfg, refit=False), cfg.losses,
                       progress=progress)
        if head_cfg.refit and select.any():
            fit.head = train_head(frozen, labels, fit.categories, fit.loss_name, head_cfg, epochs=fit.epochs,
                                  progress=progress,
                                  desc=f"level 1 head, {fit.loss_name}, refit on all train rows").head
    tuned = None
    if cfg.level == 2:
        tuned = tune_backbone(base, train_rows.iloc[develop].reset_index(drop=True), labels[develop], fit, tune_cfg,
                              head_cfg, num_workers=num_workers, train_threads=cfg.train_threads, progress=progress,
                              held_out_rows=train_rows[select].reset_index(drop=True),
                              extra_loss=None if extra_loss is None else
                              (lambda embedded, rows: extra_loss(embedded, develop[rows])))
        # Trained on the fit part only (no refit); the select rows went through it only after training.
        head_train = np.zeros((len(labels), tuned.head.out_dim), np.float32)
        head_train[develop], head_train[select] = tuned.train_vectors, tuned.held_out_vectors
        head_selection = head_train
        augmented, augmented_rows = tuned.augmented_vectors, develop[tuned.augmented_rows]
    else:
        head_train, head_selection = project(fit.head, frozen), project(fit.selection_head, frozen)
        augmented = augmented_rows = None
    classifier, classifier_table, select_predicted = select_classifier(
        frozen, labels, select, head_vectors=head_train, head_selection_vectors=head_selection,
        cs=head_cfg.classifier_c, seed=head_cfg.seed, head_augmented=augmented, head_augmented_rows=augmented_rows,
        multi_view=multi_view)
    boost = _choose_boost(head_selection, labels, select, select_predicted, head_cfg)
    seconds = time.perf_counter() - started
    payload = head_payload(fit, base, head_cfg, train_fingerprint, len(train_rows), classifier, tuned,
                           tune_cfg if tuned is not None else None, train_seconds=seconds)
    payload.selection = plain_values({
        "loss_comparison": fit.comparison.to_dict(orient="records"),
        "histories": {name: [{"epoch": h["epoch"], "loss": h["loss"], "val_precision": h.get("val_precision")}
                             for h in history] for name, history in fit.histories.items()},
        "classifier_selection": classifier_table.to_dict(orient="records"),
        "not_validated": fit.not_validated,
        "n_validation": int(fit.val_mask.sum()),
        "n_selection": int(select.sum()),
        "category_boost": boost,
        "level2": None if tuned is None else {
            "history": tuned.history, "best_epoch": tuned.best_epoch,
            "best_val_precision": tuned.best_val_precision, "stopped_by": tuned.stopped_by,
            "train_seconds": tuned.seconds, "feature_seconds": tuned.feature_seconds},
    })
    return TrainedModel(payload, fit, tuned, classifier_table, seconds, head_train)


def _choose_boost(selection_vectors: np.ndarray, labels: np.ndarray, val_mask: np.ndarray,
                  val_predicted: np.ndarray | None, head_cfg: HeadConfig) -> dict:
    """The category-aware boost chosen on the selection slice (0, the plain ranking, when there is none).

    Its images rank the rest of the train split through the head that never saw them (nor
    stopped on them), with categories predicted by the classifier that never saw them either.
    """
    n_fit = int((~val_mask).sum())
    if val_predicted is None or head_cfg.k > n_fit:
        return {"boost": 0.0, "table": [], "chosen_on": "no validation part (too few train images), so no bonus"}
    table, choice = choose_category_boost(selection_vectors[val_mask], selection_vectors[~val_mask], labels[val_mask],
                                          labels[~val_mask], val_predicted, k=head_cfg.k, seed=head_cfg.seed)
    return {**choice, "table": table.to_dict(orient="records"),
            "chosen_on": f"selection slice of the train split ({choice['n_validation']} images ranking "
                         f"{choice['n_ranked']})"}


def model_cache_key(backbone: Backbone, train_fingerprint: str, cfg: FinetuneConfig) -> str:
    """Digest of what determines a trained model: base backbone, train rows, level and every setting."""
    level, head_cfg, tune_cfg, losses = cfg.level, cfg.head, cfg.tune, cfg.losses
    settings = {"format": FORMAT, "training_version": TRAINING_VERSION, "backbone": backbone.name, "cache_key": backbone.cache_key,
                "train": train_fingerprint, "level": level, "losses": list(losses),
                "head": plain_values(asdict(head_cfg)), "tune": plain_values(asdict(tune_cfg)) if level == 2 else None}
    return text_digest(json.dumps(settings, sort_keys=True))[:16]


def default_model_path(backbone_name: str, key: str) -> Path:
    return config.PROCESSED_DIR / "heads" / f"{backbone_name}-{key}.pt"
