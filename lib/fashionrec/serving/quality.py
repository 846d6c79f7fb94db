"""An index folder's quality card: its model measured on the catalog's split of record, kept in build.json.

When a labelled catalog is indexed whole, its split of record (:func:`~fashionrec.data.split.split_catalog`,
the split seed of build.json) names query and gallery items among the folder's own rows. Each
query item is ranked as the folder serves it: its vector (the batch path's, which the query path
equals within the export tolerance) searched in the folder's own store with the folder's
ranking (the category bonus of a searched model, the query's category predicted from its photo
by the folder's classifier, the gallery's categories known, as a shop serves), allowed to
return gallery items only. Relevant: the same label. The card holds P@k, its 95% bootstrap
interval over queries (seeded), and what was measured; ``index`` writes it, ``recommend --json``
and the app show it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..data.images import decode_query
from ..data.split import SPLIT_FRACTIONS, split_catalog
from ..ranking import metrics
from ..ranking.rank import AllowedRows, CategoryBonus, Ranking, rank

QUALITY_K = 10


def describe_quality(card: dict) -> str:
    """One line for people: ``P@10 0.571 [0.550, 0.591] on 1020 queries (split seed 0), ranking by similarity``."""
    low, high = card["precision_at_k_ci"]
    return (f"P@{card['k']} {card['precision_at_k']:.3f} [{low:.3f}, {high:.3f}] on {card['n_queries']} held-out "
            f"queries against {card['n_gallery']} gallery items (split seed {card['split']['seed']}), ranking by "
            f"{card['ranking']}")


def split_of_record(catalog: pd.DataFrame, ids: list[str], split_seed: int) -> tuple[list[int], list[int]] | None:
    """(query rows, gallery rows) among ``ids`` (the folder's rows) of the catalog's seeded split; None when the
    catalog has no labels to measure with (fewer than two categories) or a gallery smaller than ``QUALITY_K``
    (``evaluate`` refuses such a k too)."""
    labelled = catalog[catalog["label"].notna() & (catalog["label"].astype(str) != "")]
    if labelled["label"].nunique() < 2:
        return None
    split, _ = split_catalog(labelled.reset_index(drop=True), seed=split_seed)
    role = dict(zip(split["id"].astype(str), split["split"]))
    queries = [row for row, item_id in enumerate(ids) if role.get(item_id) == "query"]
    gallery = [row for row, item_id in enumerate(ids) if role.get(item_id) == "gallery"]
    return (queries, gallery) if queries and len(gallery) >= QUALITY_K else None


def quality_card(store, vectors: np.ndarray, labels: np.ndarray, paths: list[str], query_rows: list[int],
                 gallery_rows: list[int], *, boost: float = 0.0, predictor=None, k: int = QUALITY_K,
                 split_seed: int = 0, seed: int = 0) -> dict:
    """The card of a folder's ``store`` (row-aligned ``vectors``, ``labels``, ``paths``); see the module docstring.

    ``predictor``: the folder's category predictor (:class:`~fashionrec.serving.assets.CategoryPredictor`),
    whose prediction for each query photo the ``boost`` favours; None or boost 0: similarity alone.
    """
    labels = np.asarray(labels, dtype=str)
    allowed = np.zeros(len(labels), dtype=bool)
    allowed[gallery_rows] = True
    queries = np.asarray(vectors[query_rows], dtype=np.float32)
    bonus, predicted = None, None
    if boost and predictor is not None and store.metric != "l2":
        bonus = CategoryBonus(boost, labels, "known")
        predicted = [predictor.predict(lambda draft_size, path=paths[row]: decode_query(path, draft_size, as_array=True),
                                       queries[position:position + 1])[0]
                     for position, row in enumerate(query_rows)]
    _, rows = rank(store, queries, k, Ranking((AllowedRows(allowed),), bonus), query_categories=predicted)
    per_query = metrics.precision_at_k(metrics.relevance_of_ranked(labels[query_rows], labels, rows), k)
    low, high = metrics.bootstrap_ci(per_query, seed=seed)
    return {"precision_at_k": round(float(per_query.mean()), 6), "precision_at_k_ci": [round(low, 6), round(high, 6)],
            "k": k, "n_queries": len(query_rows), "n_gallery": len(gallery_rows), "relevance": "label",
            "split": {"seed": split_seed, "fractions": list(SPLIT_FRACTIONS)},
            "ranking": ("similarity + category bonus (query category predicted from the photo, gallery "
                        f"categories known), boost {boost}") if bonus is not None else "similarity",
            "index": store.describe().get("factory"), "bootstrap": {"n": 1000, "seed": seed}}
