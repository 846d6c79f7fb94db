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
import torch

from .. import config
from ..evaluation import metrics
from ..models.classifier import CategoryClassifier
from ..models.projection import l2_normalize
from ..models.views import MULTI_VIEW_FEATURES

DEFAULT_BOOSTS = (0.0, 0.05, 0.1, 0.2, math.inf)
# A score bonus larger than any cosine difference: "rank within the category first".
_HARD_BOOST = 4.0


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
                      multi_view: np.ndarray | None = None) -> tuple[CategoryClassifier, pd.DataFrame]:
    """Chooses the features (frozen / frozen+views / head) and C on the validation part, then refits on all train rows.

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
    rows = []
    if val_mask.any() and len(set(labels[~val_mask])) > 1:
        for features, (vectors, _) in candidates.items():
            for c in cs:
                fitted = train_classifier(np.concatenate([vectors[~val_mask], extra[features][0]]),
                                          np.concatenate([labels[~val_mask], extra[features][1]]), features, c, seed)
                accuracy = float((fitted.predict(vectors[val_mask]) == labels[val_mask]).mean())
                rows.append({"features": features, "c": c, "val_accuracy": accuracy})
        table = pd.DataFrame(rows)
        best = table.sort_values("val_accuracy", ascending=False, kind="stable").iloc[0]
        features, c = best["features"], float(best["c"])
    else:
        table = pd.DataFrame(columns=["features", "c", "val_accuracy"])
        features, c = "frozen", float(cs[len(cs) // 2])
    final = np.concatenate([candidates[features][1], extra[features][0]])
    return train_classifier(final, np.concatenate([labels, extra[features][1]]), features, c, seed), table


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


def rank(query_vectors: np.ndarray, gallery_vectors: np.ndarray, k: int, query_category=None,
         gallery_category=None, boost: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-``k`` with an optional bonus for gallery items of the query's (predicted) category.

    ``boost=inf`` ranks the gallery items of that category first (by similarity) and the
    others after them: "rank within the predicted category", never fewer than k results.
    """
    q = torch.from_numpy(l2_normalize(query_vectors))
    g = torch.from_numpy(l2_normalize(gallery_vectors))
    scores = q @ g.T
    if boost and query_category is not None:
        same = torch.from_numpy(np.asarray(gallery_category)[None, :] == np.asarray(query_category)[:, None])
        scores = scores + (_HARD_BOOST if math.isinf(boost) else float(boost)) * same.float()
    top = torch.topk(scores, min(k, g.shape[0]), dim=1)
    return top.values.numpy(), top.indices.numpy()


def category_aware_effect(query_vectors, gallery_vectors, query_labels, gallery_labels, query_predicted,
                          gallery_predicted=None, k: int = 10, boosts=DEFAULT_BOOSTS) -> pd.DataFrame:
    """P@k and friends when gallery items of the query's predicted category get a score bonus.

    ``gallery`` = ``known`` uses the catalog's own labels for gallery items (a shop knows
    the category of what it sells); ``predicted`` uses the classifier for them too. Boost
    0 is the plain ranking; ``inf`` ranks within the predicted category first.
    """
    query_labels = np.asarray(query_labels).astype(str)
    gallery_labels = np.asarray(gallery_labels).astype(str)
    n_relevant = metrics.n_relevant_from_labels(query_labels, gallery_labels)
    sources = {"known": gallery_labels}
    if gallery_predicted is not None:
        sources["predicted"] = np.asarray(gallery_predicted).astype(str)
    rows = []
    for source, gallery_category in sources.items():
        for boost in boosts:
            if boost == 0 and source != "known":
                continue
            _, positions = rank(query_vectors, gallery_vectors, k, query_predicted, gallery_category, boost)
            relevance = metrics.relevance_from_labels(query_labels, gallery_labels[positions])
            summary = metrics.summarize(metrics.retrieval_metrics(relevance, n_relevant, k))
            rows.append({"gallery_category": source if boost else "-", "boost": boost,
                         **{name: round(float(v), 6) for name, v in summary.items()}})
    return pd.DataFrame(rows)
