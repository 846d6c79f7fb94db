"""Fine-tune on the train split (or reuse the cached model) and score it on query -> gallery.

The training itself is :func:`fashionrec.training.finetune.train_model`; this module embeds
what it needs, caches the model file, and measures the fine-tuned model exactly as a frozen
backbone is measured, against that frozen backbone on the same queries.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.prepared import PreparedData
from ..errors import FashionRecError
from ..ranking import metrics
from ..evaluation.protocol import Evaluation, evaluate_embeddings
from ..features.embed import Embeddings, decoding_threads
from ..models.backbone import Backbone
from ..models.classifier import multi_view_features
from ..models.finetuned import (HEAD_SEPARATOR, ModelFile, classifier_from_payload, head_from_payload, load_model,
                                plain_values, save_model)
from ..models.projection import project
from ..models.registry import get_backbone
from ..models.views import MULTI_VIEW_FEATURES, view_backbone
from ..provenance import dataset_fingerprint
from ..settings import InferenceSettings, StoreSettings
from ..training.classify import category_aware_on_queries, category_metrics
from ..training.finetune import FinetuneConfig, TrainedModel, default_model_path, model_cache_key, train_model
from ..training.heads import HeadConfig
from ..training.trunk import BackboneTuneConfig, check_level2_backbone
from .evaluate import embed, embed_colour, embed_with, evaluation_record


@dataclass
class FinetunedEvaluation:
    """A fine-tuned model scored on query -> gallery, beside its frozen backbone.

    ``record`` is the JSON the CLI prints: the keys of a frozen evaluation, with the
    fine-tuned metrics at the top level, plus ``category_accuracy``, ``macro_f1``,
    ``baseline_precision_at_k``, ``train_seconds`` and a ``finetune`` section.
    """

    record: dict
    model_path: Path
    payload: ModelFile                 # the model file's content
    evaluation: Evaluation             # fine-tuned, query -> gallery
    baseline: Evaluation               # frozen backbone, same queries and gallery
    vectors: np.ndarray                # fine-tuned embeddings of ``metadata`` rows
    frozen: np.ndarray
    metadata: pd.DataFrame
    classification: dict
    category_aware: dict               # the boost chosen on validation, and it vs the plain ranking on the queries
    predicted: np.ndarray              # predicted category of every ``metadata`` row
    embeddings: Embeddings             # the frozen embeddings (train, gallery, query)
    trained: TrainedModel | None       # None when a cached model was reused

    @property
    def reused(self) -> bool:
        return self.trained is None


def evaluate_finetuned(prepared: PreparedData, backbone: str, cfg: FinetuneConfig | None = None, index: str = "Flat",
                       k: int = 10, metric: str = "cosine", search_params: str = "",
                       settings: InferenceSettings = InferenceSettings(), model_path=None,
                       retrain: bool = False, store: StoreSettings = StoreSettings(), relevance=("label",),
                       colour_weight: float = 0.0, category_boost: float | None = None,
                       gallery_categories: str = "predicted") -> FinetunedEvaluation:
    """Trains (or reuses) a fine-tuned model on the train split and scores it on query -> gallery.

    The model file is cached under ``data/processed/heads/<backbone>-<key>.pt``, where the
    key covers the base backbone, the fingerprint of the train rows, the level and every
    setting; ``model_path`` writes a copy there as well. A ``k`` larger than the gallery is
    refused before anything is embedded or trained. ``relevance`` and ``colour_weight`` apply to the
    fine-tuned model and its frozen baseline alike (:func:`~fashionrec.experiment.evaluate.evaluate_backbone`);
    training never sees them. ``category_boost`` ranks the fine-tuned model with a bonus for the
    query's predicted category (:class:`~fashionrec.ranking.rank.CategoryBonus`), on the
    gallery's ``predicted`` categories (the classifier's, as the protocol hides the labels) or its
    ``known`` ones; the record's ``category_ranking`` says which.
    """
    prepared.check_k(k)
    relevance = prepared.check_relevance(relevance)
    cfg = cfg or FinetuneConfig(head=HeadConfig(k=k, seed=prepared.split_seed),
                                tune=BackboneTuneConfig(seed=prepared.split_seed))
    base = get_backbone(backbone, weights_file=settings.weights_file)
    if cfg.level == 2:
        check_level2_backbone(base)
    embeddings = embed(prepared, backbone, settings=settings)
    metadata, frozen = embeddings.metadata, embeddings.vectors
    split = metadata["split"].to_numpy()
    train, evaluated = split == "train", np.isin(split, ("gallery", "query"))
    if not train.any():
        raise FashionRecError("no train rows to fine-tune on")
    train_fingerprint = dataset_fingerprint(metadata[train])
    cached = default_model_path(backbone, model_cache_key(base, train_fingerprint, cfg))
    multi_view, views_skipped = _multi_view(prepared, base, metadata, frozen, cfg, settings)
    eval_meta = metadata[evaluated].reset_index(drop=True)
    colour = None
    if colour_weight > 0:
        colour, colour_skipped = embed_colour(prepared, eval_meta, settings)
        embeddings.skipped.extend(item for item in colour_skipped if item not in embeddings.skipped)
    ranking = dict(relevance=relevance, colour_vectors=colour, colour_weight=colour_weight)
    baseline = evaluate_embeddings(frozen[evaluated], eval_meta, k=k, index=index, metric=metric,
                                   search_params=search_params, seed=prepared.split_seed, store=store, **ranking)

    trained = None
    if cached.is_file() and not retrain:
        payload = load_model(cached)
        if settings.progress:
            print(f"[finetune] reusing {cached} (same backbone, train rows and settings)", file=sys.stderr)
    else:
        trained = train_model(base, metadata[train].reset_index(drop=True), frozen[train], cfg, train_fingerprint,
                              None if multi_view is None else multi_view[train], decoding_threads(settings),
                              settings.progress)
        payload = trained.payload
        payload.embeddings_cache_key = embeddings.cache_key   # the runtime that computed the frozen inputs
        save_model(payload, cached)   # metrics are added below, once measured

    vectors = _finetuned_vectors(prepared, backbone, payload, cached, metadata, frozen, trained, settings)
    predicted = _predicted_categories(payload, frozen, vectors, multi_view, len(metadata))
    labels = metadata["label"].astype(str).to_numpy()
    bonus = {}
    if category_boost:
        gallery_side = predicted if gallery_categories == "predicted" else labels
        bonus = dict(categories=np.where(split == "query", predicted, gallery_side)[evaluated], boost=category_boost,
                     categories_source=gallery_categories)
    evaluation = evaluate_embeddings(vectors[evaluated], eval_meta, k=k, index=index, metric=metric,
                                     search_params=search_params, seed=prepared.split_seed, store=store, **ranking,
                                     **bonus)
    query, gallery = split == "query", split == "gallery"
    classification = category_metrics(labels[query], predicted[query], payload["categories"], seed=prepared.split_seed)
    classifier = classifier_from_payload(payload)
    classification["classifier"] = {
        "model": "logistic regression", "features": classifier.features if classifier else None,
        "C": classifier.c if classifier else None,
        "views": ["centre_crop", *cfg.head.classifier_views] if multi_view is not None else ["centre_crop"],
        "views_skipped": views_skipped}
    aware = _category_aware(payload, vectors[query], vectors[gallery], labels[query], labels[gallery],
                            predicted[query], k, prepared.split_seed)
    paired = metrics.paired_bootstrap(evaluation.per_query["precision_at_k"], baseline.per_query["precision_at_k"],
                                      seed=prepared.split_seed)
    measured = measured_on_queries(evaluation, baseline, classification, k, index, metric, prepared.split_seed,
                                   metadata)
    # The model file keeps the protocol of record's numbers: a colour weight or another relevance re-ranks or
    # re-judges, it does not change what the model measured (a model just trained records it all the same).
    of_record = not colour_weight and relevance == ("label",) and not category_boost
    if trained is not None and not of_record:
        measured = {**measured, "relevance": list(relevance), "colour_weight": colour_weight}
    if trained is not None or (of_record and payload.get("metrics") != measured):
        payload.metrics = measured
        save_model(payload, cached)
    if model_path is not None and Path(model_path).resolve() != cached.resolve():
        save_model(payload, model_path)

    record = {**evaluation_record(prepared, backbone, settings.runtime, embeddings, eval_meta, evaluation),
              **_finetune_record(backbone, payload, cached, model_path, trained is None, train_fingerprint,
                                 classification, baseline, paired, aware, prepared.split_seed)}
    return FinetunedEvaluation(record, Path(model_path or cached), payload, evaluation, baseline, vectors, frozen,
                               metadata, classification, aware, predicted, embeddings, trained)


def measured_on_queries(evaluation: Evaluation, baseline: Evaluation, classification: dict, k: int, index: str,
                        metric: str, split_seed: int, metadata: pd.DataFrame) -> dict:
    """What a model file records of its scores on the queries, and of how they were measured."""
    return plain_values({
        "precision_at_k": evaluation.summary["precision_at_k"],
        "baseline_precision_at_k": baseline.summary["precision_at_k"],
        "category_accuracy": classification["accuracy"], "macro_f1": classification["macro_f1"],
        "k": k, "index": index, "metric": metric, "split_seed": split_seed,
        "dataset_fingerprint": dataset_fingerprint(metadata),
    })


def _multi_view(prepared, base: Backbone, metadata: pd.DataFrame, frozen: np.ndarray, cfg: FinetuneConfig,
                settings: InferenceSettings) -> tuple[np.ndarray | None, str | None]:
    """The classifier's multi-view features of every row (None, and why, when the views do not apply)."""
    if not cfg.head.classifier_views:
        return None, None
    try:
        views = [view_embeddings(prepared, view_backbone(base, view), metadata, settings)
                 for view in cfg.head.classifier_views]
    except FashionRecError as error:   # e.g. a backbone whose transform has no centre crop
        return None, str(error)
    return multi_view_features(frozen, views), None


def view_embeddings(prepared, view: Backbone, metadata: pd.DataFrame, settings: InferenceSettings) -> np.ndarray:
    """Embeddings of ``metadata``'s rows (same order) through the view backbone ``view``; cached like any other."""
    embedded = embed_with(prepared, view, sorted(set(metadata["split"])), settings)
    position = {image_id: i for i, image_id in enumerate(embedded.metadata["id"])}
    missing = [image_id for image_id in metadata["id"] if image_id not in position]
    if missing:
        raise FashionRecError(f"{len(missing)} images embedded in the retrieval view failed in another view "
                              f"(first: {missing[0]})")
    return embedded.vectors[[position[image_id] for image_id in metadata["id"]]]


def _finetuned_vectors(prepared, backbone: str, payload: ModelFile, cached: Path, metadata: pd.DataFrame,
                       frozen: np.ndarray, trained: TrainedModel | None, settings: InferenceSettings) -> np.ndarray:
    """Fine-tuned embeddings of every row: the head on the frozen ones (level 1), or the saved model (level 2)."""
    if payload["level"] == 1:
        return project(head_from_payload(payload), frozen)
    # Level 2 changes the backbone itself: embed through the saved model, as any notebook would.
    split = metadata["split"].to_numpy()
    headed = embed(prepared, f"{backbone}{HEAD_SEPARATOR}{cached.name}", splits=("gallery", "query"),
                   settings=settings)
    by_id = dict(zip(headed.metadata["id"], headed.vectors))
    vectors = np.zeros((len(metadata), headed.vectors.shape[1]), np.float32)
    if trained is not None:   # train rows: only when just trained (their clean views, tuned blocks + head)
        vectors[split == "train"] = trained.train_vectors
    for i in np.flatnonzero(np.isin(split, ("gallery", "query"))):
        vectors[i] = by_id[metadata["id"].iloc[i]]
    return vectors


def _predicted_categories(payload: dict, frozen: np.ndarray, vectors: np.ndarray, multi_view: np.ndarray | None,
                          n: int) -> np.ndarray:
    classifier = classifier_from_payload(payload)
    if classifier is None:
        return np.full(n, payload["categories"][0], dtype=object)
    features = {"frozen": frozen, "head": vectors, MULTI_VIEW_FEATURES: multi_view}[classifier.features]
    return classifier.predict(features)


def _category_aware(payload: dict, query_vectors, gallery_vectors, query_labels, gallery_labels, query_predicted,
                    k: int, seed: int) -> dict:
    """The validation choice of the boost (from the model file) and that one setting scored on the queries."""
    choice = payload["selection"]["category_boost"]
    on_queries = category_aware_on_queries(query_vectors, gallery_vectors, query_labels, gallery_labels,
                                           query_predicted, choice["boost"], k=k, seed=seed)
    return plain_values({"boost": choice["boost"], "gallery_categories": "known (the catalog's own labels)",
                         "chosen_on": choice["chosen_on"], "validation": choice["table"],
                         "validation_gain_over_plain": choice.get("validation_gain_over_plain"),
                         "query": {"plain": on_queries["plain"], "chosen": on_queries["chosen"]},
                         "query_gain_over_plain": on_queries["gain"]})


def _finetune_record(backbone: str, payload: dict, cached: Path, model_path, reused: bool, train_fingerprint: str,
                     classification: dict, baseline: Evaluation, paired: dict, aware: dict, seed: int) -> dict:
    selection = payload.get("selection", {})
    baseline_record = {"backbone": backbone, **baseline.to_record(bootstrap_seed=seed)}
    baseline_record.pop("per_category", None)
    return {
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
            "n_selection": selection.get("n_selection"),
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
        "baseline": baseline_record,
        "precision_at_k_gain": plain_values(paired),
        "category_aware": aware,
        "train_seconds": round(float(payload["train_seconds"]), 3),
    }
