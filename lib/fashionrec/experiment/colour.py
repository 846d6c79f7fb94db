"""The colour-weight sweep: category P@k against attribute P@k for each w, and a w suggested on validation.

For every colour weight w the queries rank the gallery by the fused score (the protocol of
record, :func:`fashionrec.evaluation.protocol.evaluate_embeddings`), scored twice: with the
relevance asked for (e.g. ``label,colour``) and by category alone. The suggestion never looks
at the queries: a validation slice of the train split (``validation_split``, purpose
``"colour"``) ranks the rest of the train split, and the w with the best P@k under the asked
relevance there is suggested (the smallest such w on a tie). The user picks the point.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..data.prepared import PreparedData
from ..data.split import validation_split
from ..errors import FashionRecError
from ..ranking import metrics
from ..evaluation.protocol import evaluate_embeddings
from ..ranking.rank import check_colour_weight
from ..settings import InferenceSettings, StoreSettings
from .evaluate import embed, embed_colour

VALIDATION_FRACTION = 0.2
VALIDATION_PURPOSE = "colour"
_VAL_QUERY, _VAL_GALLERY = "colour_val_query", "colour_val_gallery"


@dataclass
class ColourSweep:
    """One row per colour weight (metrics on the queries, and on validation) and the suggested weight."""

    table: pd.DataFrame
    suggested: dict
    protocol: dict

    def to_record(self) -> dict:
        return {"protocol": self.protocol, "suggested": self.suggested,
                "rows": json_rows(self.table)}


def json_rows(table: pd.DataFrame) -> list[dict]:
    rows = []
    for row in table.to_dict(orient="records"):
        rows.append({key: (list(value) if isinstance(value, tuple) else value) for key, value in row.items()})
    return rows


def _paired(values, reference, seed: int) -> dict:
    change = metrics.paired_bootstrap(values, reference, seed=seed)
    return {"diff": round(float(change["diff"]), 6), "low": round(float(change["low"]), 6),
            "high": round(float(change["high"]), 6), "significant": bool(change["significant"])}


def parse_colour_weights(text: str) -> list[float]:
    """``"0,0.25,0.5"`` -> [0.0, 0.25, 0.5]; FashionRecError for a value outside [0, 1] or no value."""
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    if not parts:
        raise FashionRecError("--colour-weights needs comma-separated weights in [0, 1], e.g. 0,0.25,0.5,0.75,1")
    weights = [check_colour_weight(part, "--colour-weights") for part in parts]
    return sorted(set(weights))


def colour_sweep(prepared: PreparedData, backbone: str, weights, k: int = 10, index: str = "Flat",
                 search_params: str = "", relevance=("label",), settings: InferenceSettings = InferenceSettings(),
                 store: StoreSettings = StoreSettings()) -> ColourSweep:
    """Evaluates ``backbone`` (frozen) fused with the product colour at each of ``weights`` (cosine)."""
    prepared.check_k(k)
    relevance = prepared.check_relevance(relevance)
    weights = sorted({check_colour_weight(weight, "--colour-weights") for weight in weights})
    embeddings = embed(prepared, backbone, settings=settings)
    metadata = embeddings.metadata
    colour, _ = embed_colour(prepared, metadata, settings)
    split = metadata["split"].to_numpy()
    evaluated = np.isin(split, ("gallery", "query"))
    train = np.flatnonzero(split == "train")
    is_val, not_validated = validation_split(metadata["label"].to_numpy()[train], VALIDATION_FRACTION,
                                             seed=prepared.split_seed, purpose=VALIDATION_PURPOSE)
    if not is_val.any():
        raise FashionRecError("the train split is too small for a validation slice (a category needs 3 train "
                              "images); the sweep cannot suggest a colour weight")
    val_split = np.where(is_val, _VAL_QUERY, _VAL_GALLERY)
    val_meta = metadata.iloc[train].assign(split=val_split).reset_index(drop=True)
    eval_meta = metadata[evaluated].reset_index(drop=True)
    rows, first = [], None
    for weight in weights:
        common = dict(k=k, index=index, metric="cosine", search_params=search_params, seed=prepared.split_seed,
                      store=store, relevance=relevance, colour_weight=weight)
        evaluation = evaluate_embeddings(embeddings.vectors[evaluated], eval_meta, colour_vectors=colour[evaluated],
                                         **common)
        on_queries = evaluation.to_record(bootstrap_seed=prepared.split_seed)
        first = first or evaluation
        on_validation = evaluate_embeddings(embeddings.vectors[train], val_meta, colour_vectors=colour[train],
                                            query_split=_VAL_QUERY, gallery_split=_VAL_GALLERY,
                                            **{**common, "k": min(k, len(train) - int(is_val.sum()))})
        rows.append({"colour_weight": weight,
                     "precision_at_k": on_queries["precision_at_k"],
                     "precision_at_k_ci": on_queries["precision_at_k_ci"],
                     "category_precision_at_k": on_queries["category_precision_at_k"],
                     "category_precision_at_k_ci": on_queries["category_precision_at_k_ci"],
                     "map_at_k": on_queries["map_at_k"], "map_at_k_ci": on_queries["map_at_k_ci"],
                     # Paired over the same queries against the smallest weight (usually 0: the network alone).
                     "precision_at_k_change": _paired(evaluation.per_query["precision_at_k"],
                                                      first.per_query["precision_at_k"], prepared.split_seed),
                     "category_precision_at_k_change": _paired(evaluation.category_precision, first.category_precision,
                                                               prepared.split_seed),
                     "validation_precision_at_k": round(float(on_validation.summary["precision_at_k"]), 6),
                     "validation_category_precision_at_k":
                         round(float(np.mean(on_validation.category_precision)), 6)})
    table = pd.DataFrame(rows)
    best = table["validation_precision_at_k"].max()
    suggested_weight = float(table.loc[table["validation_precision_at_k"] == best, "colour_weight"].min())
    n_val = int(is_val.sum())
    suggested = {"colour_weight": suggested_weight, "validation_precision_at_k": float(best),
                 "chosen_on": f"validation: {n_val} train images as queries -> the other {len(train) - n_val} "
                              f"train images (seed {prepared.split_seed}, purpose {VALIDATION_PURPOSE!r}); "
                              "the queries were not looked at",
                 "rule": "highest validation P@k under the asked relevance; the smallest weight on a tie",
                 "categories_without_validation": not_validated}
    protocol = {"dataset": prepared.dataset, "backbone": backbone, "runtime": settings.runtime, "index": index,
                "k": k, "metric": "cosine",
                "relevance": list(relevance), "split_seed": prepared.split_seed,
                "n_queries": int((split == "query").sum()), "n_gallery": int((split == "gallery").sum()),
                "colour_backbone": "product_colour",
                "fusion": "(1 - w) x network cosine + w x colour cosine; " +
                          ("exact (Flat)" if index == "Flat" else "network candidates re-ranked")}
    return ColourSweep(table, suggested, protocol)
