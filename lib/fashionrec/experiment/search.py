"""``--finetune`` on a combination: search its members, views, heads and rankings on validation, score the choice once.

``evaluate --backbone ensemble:a,b,c --finetune`` does not train one model on the whole
concatenation: it asks which model to ship from these backbones. The candidates
(:func:`candidate_feature_sets`: subsets of the members, each seen through one of a few view
options; a head or none; a loss and a hidden width; a ranking within the predicted category
or not; the classifier's features and strength) are compared on a selection slice of the
train split that neither training nor early stopping ever sees
(:mod:`fashionrec.training.search`). Only the chosen one is scored on the queries, beside
the references a user compares it with: the first member frozen (``baseline_*``) and the
first member fine-tuned as ``--finetune`` does for it alone (``references``).

Each (network, view) *leaf* is embedded once, through its own cache; every candidate
feature set is combined from those in memory.
"""
from __future__ import annotations

import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import config
from ..data.prepared import PreparedData
from ..errors import FashionRecError
from ..ranking import metrics
from ..evaluation.protocol import Evaluation, evaluate_embeddings
from ..features.embed import Embeddings
from ..models.backbone import Backbone
from ..models.ensemble import (ENSEMBLE_PREFIX, CombinedBackbone, MemberSpec, combined_backbone, ensemble_name,
                               is_combined_name, parse_combined_name, preprocessing)
from ..models.finetuned import (FORMAT, HEAD_SEPARATOR, ModelFile, classifier_from_payload, head_from_payload,
                                load_model, plain_values, save_model, split_backbone_name)
from ..models.projection import project
from ..models.registry import get_backbone
from ..models.views import RETRIEVAL_VIEW, view_backbone
from ..provenance import dataset_fingerprint
from ..settings import InferenceSettings, StoreSettings
from ..training.classify import category_metrics
from ..training.heads import HeadConfig
from ..training.search import SearchConfig, SearchOutcome, refit_chosen, search_models
from ..training.trunk import text_digest
from .evaluate import embed_with, evaluation_record
from .finetune import FinetunedEvaluation, evaluate_finetuned, measured_on_queries

# Part of the model cache key: bump when the search changes, so no stale choice is reused.
SEARCH_VERSION = 1
# The view options a member is searched over when its name does not fix its views: its own
# preprocessing; that and its mirror image, averaged; and all four views, averaged.
VIEW_OPTIONS = ((RETRIEVAL_VIEW,), (RETRIEVAL_VIEW, "flip"), (RETRIEVAL_VIEW, "flip", "squash", "shorter_side"))


@dataclass
class FeatureSets:
    """The feature sets a search compares, by name (cheapest first), and the views left out, with why."""

    retrieval: list[str]
    classifier: list[str]
    views_skipped: dict[str, str]


def _member_subsets(members: list[MemberSpec]) -> list[tuple[MemberSpec, ...]]:
    """Every non-empty subset of up to three members; beyond that each alone, all but one, and all."""
    n = len(members)
    if n <= 3:
        return [subset for size in range(1, n + 1) for subset in itertools.combinations(members, size)]
    singles = [(member,) for member in members]
    all_but_one = [tuple(m for m in members if m is not left_out) for left_out in members]
    return singles + all_but_one + [tuple(members)]


def candidate_feature_sets(members: list[MemberSpec], bases: dict[str, Backbone]) -> FeatureSets:
    """Retrieval and classifier feature sets to compare, as combination names (cheapest first).

    Retrieval: every subset of the members (:func:`_member_subsets`) seen through each of
    :data:`VIEW_OPTIONS` (views averaged per member, so a member adds 1,280 dimensions whatever
    its views). Classifier: every subset with its views *concatenated* (the centre crop and its
    mirror averaged, then squash, then shorter side: a linear classifier weighs each view), and
    all members through their centre crop alone. A member whose name fixed its views keeps
    them; a view its preprocessing cannot take (squash and shorter_side need a resize + centre
    crop) is left out and reported.
    """
    usable, skipped = {}, {}
    for member in members:
        if member.views_named:
            usable[member.backbone] = member.views
            continue
        views = []
        for view in VIEW_OPTIONS[-1]:
            try:
                view_backbone(bases[member.backbone], view)
                views.append(view)
            except FashionRecError as error:
                skipped[f"{member.backbone}@{view}"] = str(error)
        usable[member.backbone] = tuple(views)

    def seen(member: MemberSpec, option: tuple[str, ...]) -> MemberSpec:
        if member.views_named:
            return member
        return MemberSpec(member.backbone, tuple(v for v in option if v in usable[member.backbone]))

    def concatenated(member: MemberSpec) -> list[MemberSpec]:
        if member.views_named:
            return [member]
        views = usable[member.backbone]
        centre = tuple(v for v in (RETRIEVAL_VIEW, "flip") if v in views)
        return [MemberSpec(member.backbone, centre)] + [MemberSpec(member.backbone, (v,)) for v in views
                                                         if v not in centre]

    retrieval = list(dict.fromkeys(ensemble_name([seen(member, option) for member in subset])
                                   for option in VIEW_OPTIONS for subset in _member_subsets(members)))
    order = {name: i for i, name in enumerate(retrieval)}
    retrieval.sort(key=lambda name: (_n_leaves(name), order[name]))
    classifier = list(dict.fromkeys(
        [ensemble_name([part for member in subset for part in concatenated(member)])
         for subset in _member_subsets(members)] + [ensemble_name([seen(m, (RETRIEVAL_VIEW,)) for m in members])]))
    return FeatureSets(retrieval, classifier, skipped)


def _n_leaves(name: str) -> int:
    return sum(len(member.views) for member in parse_combined_name(name)[1])


# --------------------------------------------------------------------------------------------
# Leaves: each (network, view) embedded once
# --------------------------------------------------------------------------------------------


@dataclass
class LeafEmbeddings:
    """Every leaf's embeddings of the same rows (``metadata``), by the leaf's (eager) cache key."""

    metadata: pd.DataFrame
    vectors: dict[str, np.ndarray]
    skipped: list[dict]
    runtime_keys: dict[str, str]       # eager cache key -> the key of the cache it was read from
    runtime_transforms: dict[str, str]  # eager cache key -> its transform under the runtime (decoding included)

    def preprocessing(self, combination: CombinedBackbone) -> list[dict]:
        """:func:`fashionrec.models.ensemble.preprocessing` of ``combination`` as it ran (runtime, decoding)."""
        return [{**row, "transform": self.runtime_transforms[row["cache_key"]],
                 "cache_key": self.runtime_keys[row["cache_key"]]} for row in preprocessing(combination)]

    def combine(self, combination: CombinedBackbone, rows: np.ndarray | None = None) -> np.ndarray:
        rows = slice(None) if rows is None else rows
        return combination.combine_leaf_vectors(lambda leaf: self.vectors[leaf.cache_key][rows])


def embed_leaves(prepared: PreparedData, combinations: list[CombinedBackbone],
                 settings: InferenceSettings = InferenceSettings()) -> LeafEmbeddings:
    """Embeds every distinct leaf of ``combinations`` once (all splits), keeping the rows every leaf embedded."""
    leaves: dict[str, Backbone] = {}
    for combination in combinations:
        for leaf in combination.leaves():
            leaves.setdefault(leaf.cache_key, leaf)
    embedded = {key: embed_with(prepared, leaf, settings=settings) for key, leaf in leaves.items()}
    common = set.intersection(*(set(e.metadata["id"]) for e in embedded.values()))
    first = next(iter(embedded.values())).metadata
    metadata = first[first["id"].isin(common)].reset_index(drop=True)
    vectors = {}
    for key, embeddings in embedded.items():
        position = {image_id: i for i, image_id in enumerate(embeddings.metadata["id"])}
        vectors[key] = embeddings.vectors[[position[image_id] for image_id in metadata["id"]]]
    skipped = list({item["path"]: item for e in embedded.values() for item in e.skipped}.values())
    return LeafEmbeddings(metadata, vectors, skipped, {key: e.cache_key for key, e in embedded.items()},
                          {key: e.preprocessing[0]["transform"] for key, e in embedded.items()})


# --------------------------------------------------------------------------------------------
# The search, its model file and its evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class SearchedEvaluation:
    """The chosen model scored on query -> gallery, beside the references; ``record`` is the CLI's JSON."""

    record: dict
    model_path: Path
    payload: dict
    outcome: dict                      # the search's tables and choice, as stored in the model file
    evaluation: Evaluation             # the chosen model with its ranking (categories predicted)
    plain: Evaluation                  # the chosen model's vectors ranked by similarity alone
    baseline: Evaluation               # the first member, frozen
    reference: FinetunedEvaluation | None   # the first member fine-tuned on its own (``--finetune``)
    vectors: np.ndarray                # the chosen model's embeddings of ``metadata`` rows
    predicted: np.ndarray              # predicted category of every ``metadata`` row
    metadata: pd.DataFrame
    classification: dict
    reused: bool
    chosen_backbone: CombinedBackbone        # the chosen feature set (eager, without its head)
    classifier_backbone: CombinedBackbone    # the classifier's feature set
    baseline_backbone: Backbone              # the first member
    bases: dict[str, Backbone]               # every member, eager, by name

    @property
    def serving_backbones(self) -> list:
        """What embedding one image with the chosen model runs: its features, and the classifier's when it
        ranks by category."""
        ranked = float(self.payload["ranking"]["boost"]) != 0
        return [self.chosen_backbone, self.classifier_backbone] if ranked else [self.chosen_backbone]


def _search_key(name: str, leaves: LeafEmbeddings, train_fingerprint: str, cfg: SearchConfig) -> str:
    settings = {"format": FORMAT, "search_version": SEARCH_VERSION, "backbone": name,
                "leaves": sorted(leaves.runtime_keys.values()), "train": train_fingerprint,
                "config": plain_values(asdict(cfg))}
    return text_digest(json.dumps(settings, sort_keys=True, default=str))[:16]


def _payload(outcome: SearchOutcome, final, chosen_set: CombinedBackbone, classifier_set: CombinedBackbone,
             cfg: SearchConfig, train_fingerprint: str, n_train: int, categories: list[str], searched: str,
             feature_sets: FeatureSets, chosen_preprocessing: list[dict]) -> ModelFile:
    chosen = plain_values(outcome.chosen)
    head = final.head
    return ModelFile(
        backbone=chosen_set.name,
        backbone_cache_key=chosen_set.cache_key,
        base_weights_sha256=chosen_set.weights_sha256,
        level=1 if head is not None else 0,
        loss=chosen["loss"],
        head_config=plain_values(asdict(final.head_config)) if head is not None else {"hidden_dim": None},
        tune_config=None,
        in_dim=int(chosen_set.dim),
        out_dim=int(head.out_dim) if head is not None else int(chosen_set.dim),
        state_dict={k: v.detach().clone() for k, v in head.state_dict().items()} if head is not None else None,
        trunk_state_dict=None,
        trainable_blocks=0,
        categories=categories,
        classifier=final.classifier.to_payload(),
        classifier_backbone=classifier_set.name,
        ranking={"boost": "inf" if math.isinf(chosen["boost"]) else chosen["boost"], "categories": "predicted"},
        preprocessing=chosen_preprocessing,
        train_fingerprint=train_fingerprint,
        n_train=int(n_train),
        epochs=int(chosen["epochs"]),
        metrics={},
        train_seconds=float(outcome.seconds + final.seconds),
        selection=plain_values({
            "searched": searched,
            "chosen": chosen,
            "classifier": outcome.classifier,
            "classifier_selection": outcome.classifier_table.to_dict(orient="records"),
            "candidates": outcome.candidates.to_dict(orient="records"),
            "slices": outcome.slices.sizes(),
            "not_validated": outcome.slices.not_validated,
            "feature_sets": {"retrieval": feature_sets.retrieval, "classifier": feature_sets.classifier,
                             "views_skipped": feature_sets.views_skipped},
            "config": asdict(cfg),
            "search_seconds": outcome.seconds,
            "search_processes": outcome.processes,
            "refit_seconds": final.seconds,
        }),
    )


def search_finetuned(prepared: PreparedData, backbone: str, cfg: SearchConfig | None = None, index: str = "Flat",
                     k: int = 10, metric: str = "cosine", search_params: str = "",
                     settings: InferenceSettings = InferenceSettings(), model_path=None, retrain: bool = False,
                     reference: bool = True, store: StoreSettings = StoreSettings(),
                     processes: int | None = None) -> SearchedEvaluation:
    """Searches the combination ``backbone`` on the train split, refits the choice, scores it on query -> gallery.

    The model file (the chosen feature set's head, its classifier, its ranking and every
    candidate's validation numbers) is cached under ``data/processed/heads/search-<key>.pt``,
    the key covering the name, every leaf's cache key, the train rows and the settings;
    ``model_path`` gets a copy. Its backbone name is ``<chosen feature set>+head:<file>``.
    ``processes``: candidates trained side by side (None: one process per CPU); the choice and
    every number are the same for any count.
    """
    base_name, reference_file = split_backbone_name(backbone)
    if reference_file is not None or not is_combined_name(base_name):
        raise FashionRecError(f"{backbone!r}: the model search takes a combination of backbones, e.g. "
                              f"{ENSEMBLE_PREFIX}efficientnet_lite0,efficientnet_lite1 (docs/ensembles.md)")
    cfg = cfg or SearchConfig(head=HeadConfig(k=k, seed=prepared.split_seed))
    _, members = parse_combined_name(base_name)
    bases = {member.backbone: get_backbone(member.backbone) for member in members}
    feature_sets = candidate_feature_sets(members, bases)
    combinations = {name: combined_backbone(name, bases.__getitem__)
                    for name in dict.fromkeys(feature_sets.retrieval + feature_sets.classifier)}
    leaves = embed_leaves(prepared, list(combinations.values()), settings)
    metadata = leaves.metadata
    split = metadata["split"].to_numpy()
    train, evaluated = split == "train", np.isin(split, ("gallery", "query"))
    if not train.any():
        raise FashionRecError("no train rows to fine-tune on")
    labels = metadata["label"].astype(str).to_numpy()
    train_fingerprint = dataset_fingerprint(metadata[train])
    cached = config.PROCESSED_DIR / "heads" / f"search-{_search_key(base_name, leaves, train_fingerprint, cfg)}.pt"

    reused = cached.is_file() and not retrain
    if reused:
        payload = load_model(cached)
        if settings.progress:
            print(f"[search] reusing {cached} (same backbones, train rows and settings)", file=sys.stderr)
    else:
        train_rows = np.flatnonzero(train)
        features = {name: leaves.combine(combinations[name], train_rows) for name in feature_sets.retrieval}
        classifier_features = {name: leaves.combine(combinations[name], train_rows)
                               for name in feature_sets.classifier}
        outcome = search_models(features, classifier_features, labels[train], cfg, settings.progress, processes)
        chosen_name, classifier_name = outcome.chosen["features"], outcome.classifier["features"]
        final = refit_chosen(features[chosen_name], classifier_features[classifier_name], labels[train], outcome, cfg,
                             settings.progress)
        del features, classifier_features
        payload = _payload(outcome, final, combinations[chosen_name], combinations[classifier_name], cfg,
                           train_fingerprint, int(train.sum()), sorted(set(labels[train])), base_name, feature_sets,
                           leaves.preprocessing(combinations[chosen_name]))
        save_model(payload, cached)

    chosen_set = combinations[payload["backbone"]]
    classifier_set = combinations[payload["classifier_backbone"]]
    frozen = leaves.combine(chosen_set)
    vectors = project(head_from_payload(payload), frozen) if payload["state_dict"] is not None else frozen
    classifier = classifier_from_payload(payload)
    predicted = classifier.predict(leaves.combine(classifier_set))
    boost = float(payload["ranking"]["boost"])
    eval_meta = metadata[evaluated].reset_index(drop=True)
    evaluation = evaluate_embeddings(vectors[evaluated], eval_meta, k=k, index=index, metric=metric,
                                     search_params=search_params, seed=prepared.split_seed, store=store,
                                     categories=predicted[evaluated], boost=boost)
    plain = evaluate_embeddings(vectors[evaluated], eval_meta, k=k, index=index, metric=metric,
                                search_params=search_params, seed=prepared.split_seed, store=store)
    first = members[0].backbone
    baseline = evaluate_embeddings(leaves.vectors[bases[first].cache_key][evaluated], eval_meta, k=k, index=index,
                                   metric=metric, search_params=search_params, seed=prepared.split_seed, store=store)
    finetuned_first = None
    if reference:
        finetuned_first = evaluate_finetuned(prepared, first, k=k, index=index, metric=metric,
                                             search_params=search_params, settings=settings, store=store)
    query = split == "query"
    classification = category_metrics(labels[query], predicted[query], payload["categories"], seed=prepared.split_seed)
    classification["classifier"] = {"model": "logistic regression", "features": payload["classifier_backbone"],
                                    "C": classifier.c}

    measured = measured_on_queries(evaluation, baseline, classification, k, index, metric, prepared.split_seed,
                                   metadata)
    if payload.get("metrics") != measured:
        payload.metrics = measured
        save_model(payload, cached)
    if model_path is not None and Path(model_path).resolve() != cached.resolve():
        save_model(payload, model_path)

    chosen_embeddings = Embeddings(vectors, metadata, payload["backbone"], chosen_set.cache_key,
                                   chosen_set.weights_sha256, leaves.skipped,
                                   preprocessing=leaves.preprocessing(chosen_set))
    record = {**evaluation_record(prepared, backbone, settings.runtime, chosen_embeddings, eval_meta, evaluation),
              **_search_record(payload, cached, model_path, reused, classification, evaluation, plain, baseline,
                               finetuned_first, first, prepared.split_seed)}
    return SearchedEvaluation(record, Path(model_path or cached), payload, payload["selection"], evaluation, plain,
                              baseline, finetuned_first, vectors, predicted, metadata, classification, reused,
                              chosen_set, classifier_set, bases[first], bases)


def _short_record(evaluation: Evaluation, seed: int, **extra) -> dict:
    record = {**extra, **evaluation.to_record(bootstrap_seed=seed)}
    record.pop("per_category", None)
    return record


def _search_record(payload: dict, cached: Path, model_path, reused: bool, classification: dict,
                   evaluation: Evaluation, plain: Evaluation, baseline: Evaluation,
                   finetuned_first: FinetunedEvaluation | None, first: str, seed: int) -> dict:
    selection = payload["selection"]
    chosen = selection["chosen"]
    model_file = str(model_path or cached)
    served_name = f"{payload['backbone']}{HEAD_SEPARATOR}{model_path or cached.name}"
    gains = {"over_frozen": metrics.paired_bootstrap(evaluation.per_query["precision_at_k"],
                                                     baseline.per_query["precision_at_k"], seed=seed)}
    references = {"frozen": _short_record(baseline, seed, backbone=first)}
    if finetuned_first is not None:
        gains["over_finetuned"] = metrics.paired_bootstrap(
            evaluation.per_query["precision_at_k"], finetuned_first.evaluation.per_query["precision_at_k"], seed=seed)
        references["finetuned"] = _short_record(
            finetuned_first.evaluation, seed, backbone=finetuned_first.record["finetune"]["finetuned_backbone"],
            category_accuracy=finetuned_first.record["category_accuracy"],
            category_accuracy_ci=finetuned_first.record["category_accuracy_ci"])
    return {
        "finetune": {
            "search": True,
            "chosen": {
                "features": payload["backbone"],
                "head": None if payload["state_dict"] is None else {
                    "loss": payload["loss"], "hidden_dim": payload["head_config"]["hidden_dim"],
                    "out_dim": payload["out_dim"], "epochs": payload["epochs"]},
                "ranking": payload["ranking"],
                "classifier": {"features": payload["classifier_backbone"], "C": classification["classifier"]["C"]},
                "select_precision_at_k": chosen["select_precision_at_k"],
                "select_precision_at_k_ci": chosen["select_precision_at_k_ci"],
            },
            "level": payload["level"],
            "loss": payload["loss"],
            "model_file": model_file,
            "cache_file": str(cached),
            "finetuned_backbone": served_name,
            "reused_cached_model": reused,
            "train_fingerprint": payload["train_fingerprint"],
            "n_train": payload["n_train"],
            "slices": selection["slices"],
            "candidates_compared": len(selection["candidates"]),
            "search_seconds": round(selection["search_seconds"], 1),
            "search_processes": selection.get("search_processes", 1),
            "classifier_selection": selection["classifier_selection"],
            "categories_without_validation": selection["not_validated"],
            "preprocessing": payload["preprocessing"],
            "dim": int(payload["out_dim"]),
            "bytes_per_vector": 4 * int(payload["out_dim"]),
        },
        "selection_note": ("every choice was made on the 'select' slice of the train split (validation numbers, "
                           "select_*); only the chosen model and the references were scored on the queries"),
        "category_accuracy": round(classification["accuracy"], 6),
        "category_accuracy_ci": classification["accuracy_ci"],
        "macro_f1": round(classification["macro_f1"], 6),
        "classification": classification,
        "baseline_precision_at_k": round(baseline.summary["precision_at_k"], 6),
        "baseline": references["frozen"],
        "precision_at_k_gain": plain_values(gains["over_frozen"]),
        "precision_at_k_gains": plain_values(gains),
        "precision_at_k_plain": round(plain.summary["precision_at_k"], 6),
        "references": references,
        "train_seconds": round(float(payload["train_seconds"]), 3),
    }
