"""Distil a teacher into one EfficientNet-Lite (or reuse the cached student) and score both on query -> gallery.

The training is :func:`fashionrec.training.distil.distil_model`; this module gets the
teacher's embeddings of the train split (any backbone name, a ``+head:`` file included, or
with ``teacher_finetune`` the model ``evaluate --finetune`` chooses for it, reused from its
cache), writes the student's model file with the existing writer, and measures the student
exactly as any model is measured: embedded through its own file by name
(``<student>+head:<file>``), ranked with its own classifier and ranking, beside the
teacher and the student network's own fine-tuned head on the same queries.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import config
from ..errors import FashionRecError
from ..ranking import metrics
from ..evaluation.protocol import Evaluation, evaluate_embeddings
from ..features.embed import decoding_threads
from ..models.classifier import multi_view_features
from ..models.ensemble import is_combined_name
from ..models.finetuned import (HEAD_SEPARATOR, classifier_from_payload, load_model, plain_values, resolve_head_path,
                                save_model, split_backbone_name)
from ..models.registry import get_backbone
from ..models.views import MULTI_VIEW_FEATURES, view_backbone
from ..provenance import dataset_fingerprint
from ..settings import InferenceSettings, StoreSettings
from ..training.classify import category_metrics, train_classifier
from ..training.distil import DistilConfig, distil_model, student_cache_key
from ..training.finetune import FinetuneConfig
from ..training.heads import HeadConfig
from ..training.trunk import BackboneTuneConfig, check_level2_backbone
from .evaluate import PreparedData, embed, evaluation_record
from .finetune import evaluate_finetuned, measured_on_queries, view_embeddings
from .search import search_finetuned

STUDENTS = ("efficientnet_lite0", "efficientnet_lite1")


@dataclass
class Teacher:
    """The teacher as the student sees it (embeddings by image id) and as the queries score it."""

    name: str                          # the name that loads it (its ``+head:`` file included)
    vectors: dict                      # image id -> embedding, every split it embedded
    evaluation: Evaluation
    classification: dict
    how: str                           # how it was obtained (given, or chosen by --finetune)


@dataclass
class DistilResult:
    record: dict
    model_path: Path
    payload: dict
    evaluation: Evaluation             # the student, query -> gallery, with its ranking
    teacher: Teacher
    head_reference: Evaluation         # the student network fine-tuned on its own (level-1 head)
    reused: bool


def check_models(teacher: str, student: str, teacher_finetune: bool) -> None:
    """Refuses, before any work, a student that is not a Lite network and a teacher whose weights are missing."""
    if student not in STUDENTS:
        raise FashionRecError(f"--student {student!r}: the student is one of {', '.join(STUDENTS)}")
    if teacher_finetune and split_backbone_name(teacher)[1] is not None:
        raise FashionRecError(f"--teacher {teacher!r} --teacher-finetune: the search chooses the teacher's head; "
                              "name the backbone (or combination) without +head:")
    get_backbone(teacher)   # WeightsUnavailable (one line) when the teacher is not on this machine


def _teacher(prepared: PreparedData, name: str, finetune: bool, k: int, index: str, metric: str, search_params: str,
             settings: InferenceSettings, store: StoreSettings) -> Teacher:
    seed = prepared.split_seed
    if finetune:
        if is_combined_name(name):
            result = search_finetuned(prepared, name, k=k, index=index, metric=metric, search_params=search_params,
                                      settings=settings, reference=False, store=store)
        else:
            result = evaluate_finetuned(prepared, name, k=k, index=index, metric=metric, search_params=search_params,
                                        settings=settings, store=store)
        vectors = dict(zip(result.metadata["id"], result.vectors))
        return Teacher(result.record["finetune"]["finetuned_backbone"], vectors, result.evaluation,
                       result.classification, f"chosen by `evaluate --backbone {name} --finetune` on this catalog's "
                                              f"train split ({'reused' if result.reused else 'trained'})")
    embeddings = embed(prepared, name, settings=settings)
    metadata, vectors = embeddings.metadata, embeddings.vectors
    split = metadata["split"].to_numpy()
    evaluated = np.isin(split, ("gallery", "query"))
    evaluation = evaluate_embeddings(vectors[evaluated], metadata[evaluated].reset_index(drop=True), k=k, index=index,
                                     metric=metric, search_params=search_params, seed=seed, store=store)
    labels = metadata["label"].astype(str).to_numpy()
    train, query = split == "train", split == "query"
    # Category accuracy of a given teacher: a logistic regression on its own embeddings of the train split.
    classifier = train_classifier(vectors[train], labels[train], "head", seed=seed)
    classification = category_metrics(labels[query], classifier.predict(vectors[query]), classifier.categories,
                                      seed=seed)
    classification["classifier"] = {"model": "logistic regression on the teacher's embeddings of the train split",
                                    "C": classifier.c}
    return Teacher(name, dict(zip(metadata["id"], vectors)), evaluation, classification, "given")


def _multi_view(prepared, base, metadata: pd.DataFrame, frozen: np.ndarray, cfg: DistilConfig,
                settings: InferenceSettings) -> np.ndarray | None:
    views = cfg.finetune.head.classifier_views
    if not views:
        return None
    try:
        return multi_view_features(frozen, [view_embeddings(prepared, view_backbone(base, view), metadata, settings)
                                            for view in views])
    except FashionRecError:   # a transform without a centre crop: the classifier does without the views
        return None


def _short(evaluation: Evaluation, seed: int, **extra) -> dict:
    record = {**extra, **evaluation.to_record(bootstrap_seed=seed)}
    record.pop("per_category", None)
    return record


def distil_student(prepared: PreparedData, teacher: str, student: str = "efficientnet_lite0",
                   cfg: DistilConfig | None = None, teacher_finetune: bool = False, k: int = 10, index: str = "Flat",
                   metric: str = "cosine", search_params: str = "", settings: InferenceSettings = InferenceSettings(),
                   run: str | None = None, retrain: bool = False, store: StoreSettings = StoreSettings()
                   ) -> DistilResult:
    """Distils ``teacher`` into ``student`` on the train split (or reuses the cached student) and scores both.

    The student's model file is cached under ``data/processed/heads/distil-<student>-<key>.pt``
    (the key covers the student network, the train rows, the teacher's embeddings of them
    and every setting); ``run`` also writes it to ``results/<run>/head.pt`` and the record to
    ``results/<run>/distil.json``, so ``<student>+head:<run>`` loads it anywhere.
    """
    prepared.check_k(k)
    check_models(teacher, student, teacher_finetune)
    seed = prepared.split_seed
    cfg = cfg or default_config(k, seed)
    base = get_backbone(student, weights_file=settings.weights_file)
    check_level2_backbone(base)

    taught = _teacher(prepared, teacher, teacher_finetune, k, index, metric, search_params, settings, store)
    embeddings = embed(prepared, student, settings=settings)
    metadata, frozen = embeddings.metadata, embeddings.vectors
    split = metadata["split"].to_numpy()
    train, evaluated = split == "train", np.isin(split, ("gallery", "query"))
    missing = [image_id for image_id in metadata["id"][train] if image_id not in taught.vectors]
    if missing:
        raise FashionRecError(f"the teacher {taught.name} has no embedding of {len(missing)} train images the student "
                              f"embedded (first: {missing[0]})")
    teacher_train = np.stack([taught.vectors[image_id] for image_id in metadata["id"][train]])
    train_fingerprint = dataset_fingerprint(metadata[train])
    key = student_cache_key(base, train_fingerprint, teacher_digest(teacher_train), cfg)
    cached = config.PROCESSED_DIR / "heads" / f"distil-{student}-{key}.pt"
    multi_view = _multi_view(prepared, base, metadata, frozen, cfg, settings)

    reused = cached.is_file() and not retrain
    if reused:
        payload = load_model(cached)
        if settings.progress:
            print(f"[distil] reusing {cached} (same student, train rows, teacher and settings)", file=sys.stderr)
    else:
        distilled = distil_model(base, metadata[train].reset_index(drop=True), frozen[train], teacher_train, cfg,
                                 train_fingerprint, {"name": taught.name, "how": taught.how,
                                                     "dim": int(teacher_train.shape[1])},
                                 None if multi_view is None else multi_view[train], decoding_threads(settings),
                                 settings.progress)
        payload = distilled.payload
        payload.embeddings_cache_key = embeddings.cache_key
        save_model(payload, cached)

    served = f"{student}{HEAD_SEPARATOR}{cached.name}"
    headed = embed(prepared, served, splits=("gallery", "query"), settings=settings)
    by_id = dict(zip(headed.metadata["id"], headed.vectors))
    eval_meta = metadata[evaluated].reset_index(drop=True)
    vectors = np.stack([by_id[image_id] for image_id in eval_meta["id"]])
    classifier = classifier_from_payload(payload)
    features = {"frozen": frozen, MULTI_VIEW_FEATURES: multi_view}
    predicted = classifier.predict(vectors if classifier.features == "head" else features[classifier.features][evaluated])
    boost = float(payload["ranking"]["boost"])
    ranking = dict(k=k, index=index, metric=metric, search_params=search_params, seed=seed, store=store)
    evaluation = evaluate_embeddings(vectors, eval_meta, categories=predicted, boost=boost, **ranking)
    plain = evaluate_embeddings(vectors, eval_meta, **ranking) if boost else evaluation
    frozen_evaluation = evaluate_embeddings(frozen[evaluated], eval_meta, **ranking)
    query = eval_meta["split"].to_numpy() == "query"
    labels = eval_meta["label"].astype(str).to_numpy()
    classification = category_metrics(labels[query], predicted[query], payload["categories"], seed=seed)
    head_reference = evaluate_finetuned(prepared, student, k=k, index=index, metric=metric,
                                        search_params=search_params, settings=settings, store=store)

    measured = measured_on_queries(evaluation, frozen_evaluation, classification, k, index, metric, seed, metadata)
    student_queries = _aligned(evaluation, taught.evaluation, head_reference.evaluation)
    on_queries = plain_values({
        "k": k, "index": index, "metric": metric, "split_seed": seed,
        "dataset_fingerprint": dataset_fingerprint(eval_meta), "query_ids": list(evaluation.queries["id"]),
        "own_head": {"name": head_reference.record["finetune"]["finetuned_backbone"],
                     "precision_at_k": student_queries[0][1].tolist()},
        "teacher": {"name": taught.name, "precision_at_k": student_queries[1][1].tolist()}})
    if payload.get("metrics") != measured or payload["distillation"].get("on_queries") != on_queries:
        payload.metrics = measured
        payload["distillation"]["on_queries"] = on_queries
        save_model(payload, cached)
    model_path, backbone = cached, served
    if run is not None:
        model_path = config.RESULTS_DIR / run / "head.pt"
        save_model(payload, model_path)
        backbone = f"{student}{HEAD_SEPARATOR}{run}"

    distillation = payload["distillation"]
    record = {
        **evaluation_record(prepared, backbone, settings.runtime, headed, eval_meta, evaluation),
        "category_accuracy": round(classification["accuracy"], 6),
        "category_accuracy_ci": classification["accuracy_ci"],
        "macro_f1": round(classification["macro_f1"], 6),
        "teacher": {**_short(taught.evaluation, seed, name=taught.name, how=taught.how),
                    "category_accuracy": round(taught.classification["accuracy"], 6),
                    "category_accuracy_ci": taught.classification["accuracy_ci"]},
        "student": student,
        "model_file": str(model_path),
        "cache_file": str(cached),
        "reused_cached_model": reused,
        "losses": distillation["losses"],
        "choices": {**distillation["choices"], "level1_loss": payload["loss"],
                    "level2_epochs": payload["epochs"],
                    "classifier": {"features": classifier.features, "C": classifier.c},
                    "category_boost": payload["ranking"]["boost"]},
        "train_seconds": round(float(payload["train_seconds"]), 3),
        "precision_at_k_plain": round(plain.summary["precision_at_k"], 6),
        "precision_at_k_gains": plain_values({
            "over_own_head": metrics.paired_bootstrap(*student_queries[0], seed=seed),
            "over_own_head_by_similarity": metrics.paired_bootstrap(
                _aligned(plain, taught.evaluation, head_reference.evaluation)[0][0], student_queries[0][1], seed=seed),
            "to_teacher": metrics.paired_bootstrap(*student_queries[1], seed=seed)}),
        "gains_note": ("each model ranked as it is served: the student with the category ranking its select slice "
                       "chose (category_boost), its network's own head and a given teacher by similarity alone; "
                       "over_own_head_by_similarity ranks both by similarity alone"),
        "references": {
            "frozen": _short(frozen_evaluation, seed, backbone=student),
            "head": {**_short(head_reference.evaluation, seed,
                              backbone=head_reference.record["finetune"]["finetuned_backbone"]),
                     "category_accuracy": head_reference.record["category_accuracy"],
                     "category_accuracy_ci": head_reference.record["category_accuracy_ci"],
                     "with_its_category_boost": {
                         "boost": head_reference.record["category_aware"]["boost"],
                         "precision_at_k": head_reference.record["category_aware"]["query"]["chosen"]["precision_at_k"],
                         "precision_at_k_ci":
                             head_reference.record["category_aware"]["query"]["chosen"]["precision_at_k_ci"]}}},
    }
    if run is not None:
        out = config.RESULTS_DIR / run / "distil.json"
        out.write_text(json.dumps(plain_values(record), indent=1) + "\n")
        record["record_file"] = str(out)
    return DistilResult(record, model_path, payload, evaluation, taught, head_reference.evaluation, reused)


def _aligned(student: Evaluation, teacher: Evaluation, head: Evaluation) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-query P@k pairs (student, own head) and (student, teacher), checked to score the same queries."""
    ids = list(student.queries["id"])
    pairs = []
    for other in (head, teacher):
        position = {image_id: i for i, image_id in enumerate(other.queries["id"])}
        if set(position) != set(ids):
            raise FashionRecError("the student and its references scored different queries (images left out by one "
                                  "of them); see the skipped files of each")
        order = [position[image_id] for image_id in ids]
        pairs.append((student.per_query["precision_at_k"], other.per_query["precision_at_k"][order]))
    return pairs


def distillation_gains(backbone: str, embeddings, k: int, index: str, metric: str, search_params: str, seed: int,
                       store: StoreSettings = StoreSettings()) -> dict | None:
    """A distilled student's paired P@k gains over its own network's head and to its teacher, or None.

    ``embeddings`` are the student's gallery and query embeddings as ``evaluate`` computed
    them. The references' per-query P@k were stored in the student's model file when it was
    distilled; they pair only on the same queries, k, index and metric, otherwise None. The
    student is ranked as ``evaluate`` ranks, by similarity alone.
    """
    reference = split_backbone_name(backbone)[1]
    if reference is None:
        return None
    stored = (load_model(resolve_head_path(reference)).get("distillation") or {}).get("on_queries")
    if not stored or (stored["k"], stored["index"], stored["metric"]) != (k, index, metric):
        return None
    evaluation = evaluate_embeddings(embeddings.vectors, embeddings.metadata, k=k, index=index, metric=metric,
                                     search_params=search_params, seed=seed, store=store)
    position = {image_id: i for i, image_id in enumerate(evaluation.queries["id"])}
    if set(position) != set(stored["query_ids"]):
        return None
    mine = evaluation.per_query["precision_at_k"][[position[image_id] for image_id in stored["query_ids"]]]
    gains = {}
    for name, key in (("own_head", "over_own_head"), ("teacher", "to_teacher")):
        other = np.asarray(stored[name]["precision_at_k"], dtype=float)
        gains[key] = {"reference": stored[name]["name"], **metrics.paired_bootstrap(mine, other, seed=seed)}
    return plain_values({"precision_at_k_gains": gains, "ranking": "by similarity alone, as evaluate ranks",
                         "references_measured": "when the student was distilled, on these same queries"})


def teacher_digest(vectors: np.ndarray) -> str:
    """Digest of the teacher's train embeddings (rounded to float16, so float noise does not retrain)."""
    return hashlib.sha256(np.ascontiguousarray(vectors.astype(np.float16)).tobytes()).hexdigest()[:16]


def default_config(k: int, seed: int) -> DistilConfig:
    """The default candidates, with the protocol's k and the split seed as training seed."""
    return DistilConfig(finetune=FinetuneConfig(level=2, head=HeadConfig(k=k, seed=seed),
                                                tune=BackboneTuneConfig(seed=seed)))
