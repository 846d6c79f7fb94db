"""Category classifier on frozen (or fine-tuned) embeddings, and category-aware recommendation.

Frozen ImageNet features know more about the catalog's categories than a raw cosine
ranking uses: a linear classifier on them is right far more often than the nearest
neighbours share the query's category. Giving gallery items of the query's predicted
category a score bonus measures what that knowledge is worth to the ranking.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .. import config
from ..ranking import metrics
from ..models.classifier import CategoryClassifier, l2_normalize
from ..models.views import MULTI_VIEW_FEATURES
from ..ranking.rank import CategoryBonus, Ranking, gallery_store, rank
from ..settings import StoreSettings

DEFAULT_BOOSTS = (0.0, 0.05, 0.1, 0.2, math.inf)


# --------------------------------------------------------------------------------------------
# Category classifier
# --------------------------------------------------------------------------------------------


def train_classifier(vectors: np.ndarray, labels, features: str = "frozen", c: float = 10.0,
                     seed: int = config.DEFAULT_SEED) -> CategoryClassifier:
    """Logistic regression (sklearn, lbfgs, seeded) on L2-normalised features."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    labels = np.asarray(labels).astype(str)
    categories = sorted({str(label) for label in labels})
    x = l2_normalize(vectors).astype(np.float64)
    if len(categories) == 1:
        # Nothing to learn: every image is of the one category.
        return CategoryClassifier(categories, features, np.zeros((1, x.shape[1])), np.zeros(1), c)
    model = LogisticRegression(C=c, max_iter=3000, random_state=seed)
    with threadpool_limits(1):   # small problem: extra BLAS threads only spin on a busy machine
        model.fit(x, labels)
    coef, intercept = model.coef_, model.intercept_
    if len(categories) == 2:  # sklearn keeps one row for two classes: logit of the second one
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    order = [list(model.classes_).index(category) for category in categories]
    return CategoryClassifier(categories, features, coef[order], intercept[order], c)


def select_classifier(frozen: np.ndarray, labels, val_mask: np.ndarray, head_vectors: np.ndarray | None = None,
                      head_selection_vectors: np.ndarray | None = None, cs=(1.0, 10.0, 100.0),
                      seed: int = config.DEFAULT_SEED, head_augmented: np.ndarray | None = None,
                      head_augmented_rows: np.ndarray | None = None,
                      multi_view: np.ndarray | None = None
                      ) -> tuple[CategoryClassifier, pd.DataFrame, np.ndarray | None]:
    """Chooses the features (frozen / frozen+views / head) and C on the validation part, then refits on all train rows.

    Returns the refitted classifier, the validation table, and the chosen candidate's
    predictions for the validation rows (made before the refit, so by a classifier that never
    saw them; None without a validation part): what the category-aware boost is chosen with.

    ``multi_view`` are :func:`multi_view_features` of the train rows (a frozen function of
    each image, like ``frozen``).

    ``head_selection_vectors`` are the train rows through a head that never saw the
    validation part (the one trained on the fit part); ``head_vectors`` through the final
    head, for the refit. Without the former, the head features are not considered.
    ``head_augmented`` (with the train row each comes from, ``head_augmented_rows``) are
    extra training examples for the head-feature classifier: augmented views of fit rows
    (level 2), never of validation rows.
    """
    labels = np.asarray(labels).astype(str)
    candidates = {"frozen": (frozen, frozen)}
    if multi_view is not None:
        candidates[MULTI_VIEW_FEATURES] = (multi_view, multi_view)
    if head_vectors is not None and head_selection_vectors is not None:
        candidates["head"] = (head_selection_vectors, head_vectors)
    extra = {name: (np.zeros((0, vectors[0].shape[1]), np.float32), np.zeros(0, dtype=str))
             for name, vectors in candidates.items()}
    if head_augmented is not None and len(head_augmented) and "head" in candidates:
        if val_mask[head_augmented_rows].any():
            raise ValueError("augmented views of validation rows would leak into classifier selection")
        extra["head"] = (head_augmented, labels[head_augmented_rows])
    rows, predictions = [], []
    if val_mask.any() and len(set(labels[~val_mask])) > 1:
        for features, (vectors, _) in candidates.items():
            for c in cs:
                fitted = train_classifier(np.concatenate([vectors[~val_mask], extra[features][0]]),
                                          np.concatenate([labels[~val_mask], extra[features][1]]), features, c, seed)
                predictions.append(fitted.predict(vectors[val_mask]))
                accuracy = float((predictions[-1] == labels[val_mask]).mean())
                rows.append({"features": features, "c": c, "val_accuracy": accuracy})
        table = pd.DataFrame(rows)
        best_row = int(table["val_accuracy"].to_numpy().argmax())   # the first of equals, as a stable sort would
        features, c = table.iloc[best_row]["features"], float(table.iloc[best_row]["c"])
        validation_predicted = predictions[best_row]
    else:
        table = pd.DataFrame(columns=["features", "c", "val_accuracy"])
        features, c = "frozen", float(cs[len(cs) // 2])
        validation_predicted = None
    final = np.concatenate([candidates[features][1], extra[features][0]])
    classifier = train_classifier(final, np.concatenate([labels, extra[features][1]]), features, c, seed)
    return classifier, table, validation_predicted


def category_metrics(true_labels, predicted_labels, categories: list[str] | None = None, seed: int = 0) -> dict:
    """Accuracy with its 95% bootstrap interval over queries (``seed``), macro F1 (over the
    categories with queries or predictions) and the confusion matrix."""
    from sklearn.metrics import confusion_matrix, f1_score

    true_labels = np.asarray(true_labels).astype(str)
    predicted_labels = np.asarray(predicted_labels).astype(str)
    categories = list(categories) if categories is not None else sorted(set(true_labels) | set(predicted_labels))
    present = [c for c in categories if c in set(true_labels) | set(predicted_labels)]
    matrix = confusion_matrix(true_labels, predicted_labels, labels=categories)
    per_f1 = f1_score(true_labels, predicted_labels, labels=categories, average=None, zero_division=0)
    support = matrix.sum(axis=1)
    return {
        "accuracy": float((true_labels == predicted_labels).mean()) if len(true_labels) else float("nan"),
        "accuracy_ci": [round(bound, 6) for bound in metrics.bootstrap_ci(true_labels == predicted_labels, seed=seed)],
        "macro_f1": float(f1_score(true_labels, predicted_labels, labels=present, average="macro", zero_division=0)),
        "n": int(len(true_labels)),
        "confusion_matrix": {"labels": categories, "rows": "true category", "columns": "predicted category",
                             "matrix": matrix.tolist()},
        "per_category_f1": {c: {"f1": round(float(f), 6), "support": int(s)}
                            for c, f, s in zip(categories, per_f1, support)},
    }


# --------------------------------------------------------------------------------------------
# Category-aware recommendation
# --------------------------------------------------------------------------------------------


def boost_label(boost) -> float | str:
    """A boost as JSON can hold it: ``"inf"`` for ranking within the predicted category first."""
    boost = float(boost)
    return "inf" if math.isinf(boost) else boost


def _boosted_precision(query_vectors, gallery_vectors, query_labels, gallery_labels, query_predicted, k: int,
                       boost: float) -> dict[str, np.ndarray]:
    """Per-query metrics of the ranking with ``boost`` for gallery items of the query's predicted category."""
    bonus = CategoryBonus(float(boost), gallery_labels, "known") if float(boost) else None
    with gallery_store(StoreSettings(), gallery_vectors, gallery_labels) as gallery:
        _, positions = rank(gallery, query_vectors, k, Ranking(bonus=bonus), query_categories=query_predicted)
    relevance = metrics.relevance_from_labels(query_labels, gallery_labels[positions])
    return metrics.retrieval_metrics(relevance, metrics.n_relevant_from_labels(query_labels, gallery_labels), k)


def choose_category_boost(query_vectors, gallery_vectors, query_labels, gallery_labels, query_predicted,
                          k: int = 10, boosts=DEFAULT_BOOSTS, seed: int = config.DEFAULT_SEED
                          ) -> tuple[pd.DataFrame, dict]:
    """The category-aware boost, chosen on validation: every boost scored, the best kept only if it helps.

    The queries are the validation part of the train split, ranking the rest of it, with
    vectors and predicted categories from models that never saw the validation part; the
    gallery's categories are its own labels (a shop knows what it sells). The best boost
    replaces 0 (the plain ranking) only when its paired gain in P@k over the validation
    images is significant (95% bootstrap interval above zero).

    Returns the validation table (one row per boost) and the choice with that paired gain.
    """
    query_labels, gallery_labels = np.asarray(query_labels).astype(str), np.asarray(gallery_labels).astype(str)
    per_boost, rows = {}, []
    for boost in boosts:
        per_boost[boost] = _boosted_precision(query_vectors, gallery_vectors, query_labels, gallery_labels,
                                              query_predicted, k, boost)
        summary = metrics.summarize(per_boost[boost])
        rows.append({"boost": boost_label(boost), "val_precision_at_k": round(summary["precision_at_k"], 6),
                     "val_map_at_k": round(summary["map_at_k"], 6)})
    best = max(boosts, key=lambda boost: (float(per_boost[boost]["precision_at_k"].mean()), boost == 0))
    gain = metrics.paired_bootstrap(per_boost[best]["precision_at_k"], per_boost[0.0]["precision_at_k"], seed=seed)
    chosen = best if best != 0 and gain["low"] > 0 else 0.0
    table = pd.DataFrame(rows).assign(chosen=[boost == chosen for boost in boosts])
    return table, {"boost": boost_label(chosen), "best_on_validation": boost_label(best),
                   "validation_gain_over_plain": gain,
                   "n_validation": int(len(query_labels)), "n_ranked": int(len(gallery_labels))}


def category_aware_on_queries(query_vectors, gallery_vectors, query_labels, gallery_labels, query_predicted,
                              boost: float, k: int = 10, seed: int = config.DEFAULT_SEED) -> dict:
    """The plain ranking and the chosen ``boost`` on query -> gallery: metrics with 95% intervals and their paired
    difference in P@k (one number each: the boost was chosen on validation, not here)."""
    query_labels, gallery_labels = np.asarray(query_labels).astype(str), np.asarray(gallery_labels).astype(str)
    scored = {name: _boosted_precision(query_vectors, gallery_vectors, query_labels, gallery_labels, query_predicted,
                                       k, value) for name, value in (("plain", 0.0), ("chosen", boost))}
    result = {}
    for name, per_query in scored.items():
        intervals = metrics.bootstrap_cis(per_query, seed=seed)
        result[name] = {**{metric: round(float(value), 6) for metric, value in metrics.summarize(per_query).items()},
                        **{f"{metric}_ci": [round(float(low), 6), round(float(high), 6)]
                           for metric, (low, high) in intervals.items()}}
    result["gain"] = metrics.paired_bootstrap(scored["chosen"]["precision_at_k"], scored["plain"]["precision_at_k"],
                                              seed=seed)
    return result
