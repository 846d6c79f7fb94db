"""One experiment as plain functions: embed a prepared catalog (:mod:`fashionrec.data.prepared`), score query -> gallery.

The command line, the notebooks and the app call these same functions, so a number printed
by ``python -m fashionrec evaluate`` and the one in a pipeline report come from one code path.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..data.prepared import PreparedData
from ..data.split import SPLITS
from ..evaluation.duplicates import leakage
from ..evaluation.protocol import evaluate_embeddings
from ..features.colour import aligned_colour, colour_descriptors
from ..features.embed import Embeddings, embed_catalog
from ..models.backbone import Backbone
from ..models.registry import get_backbone
from ..models.runtime import calibration_sample, with_runtime
from ..provenance import dataset_fingerprint, software_versions
from ..settings import InferenceSettings, StoreSettings


def embed(prepared: PreparedData, backbone: str, splits=SPLITS,
          settings: InferenceSettings = InferenceSettings()) -> Embeddings:
    """Embeds the rows of the given splits; raises WeightsUnavailable before any work if needed.

    ``settings.runtime`` "onnx-int8" calibrates on a seeded sample of the training split.
    """
    return embed_with(prepared, get_backbone(backbone, weights_file=settings.weights_file), splits, settings)


def embed_with(prepared: PreparedData, model: Backbone, splits=SPLITS,
               settings: InferenceSettings = InferenceSettings()) -> Embeddings:
    """:func:`embed` for a backbone already built (e.g. another view of one, see fashionrec.models.views)."""
    calibration = None
    if settings.runtime == "onnx-int8":
        train = prepared.catalog[prepared.catalog["split"] == "train"]
        calibration = calibration_sample(train["path"].tolist(), seed=prepared.split_seed)
    model = with_runtime(model, settings.runtime, threads=settings.threads, calibration_paths=calibration,
                         progress=settings.progress)
    rows = prepared.catalog[prepared.catalog["split"].isin(splits)].reset_index(drop=True)
    return embed_catalog(rows, model, settings, root=prepared.root)


def embed_colour(prepared: PreparedData, metadata: pd.DataFrame,
                 settings: InferenceSettings = InferenceSettings()) -> tuple[np.ndarray, list[dict]]:
    """Product-colour descriptors of ``metadata``'s rows, in its order, and the files they skipped."""
    colour = colour_descriptors(metadata.drop(columns=["digest"], errors="ignore"), settings, root=prepared.root)
    return aligned_colour(metadata, colour), colour.skipped


def evaluate_backbone(prepared: PreparedData, backbone: str, index: str = "Flat", k: int = 10,
                      metric: str = "cosine", search_params: str = "",
                      settings: InferenceSettings = InferenceSettings(),
                      store: StoreSettings = StoreSettings(), relevance=("label",),
                      colour_weight: float = 0.0) -> tuple[dict, Embeddings]:
    """Embeds gallery and query images and scores query -> gallery retrieval.

    Returns the JSON-ready record (protocol, metrics with 95% intervals, per-category
    table, provenance, the ledger of files left out) and the embeddings it used. A ``k``
    larger than the gallery is refused before anything is embedded. ``store`` says which
    vector store ranks the gallery (faiss in this process, or Milvus); the record has the same
    keys for each. ``relevance``: the columns a result must share with its query to count
    (:meth:`PreparedData.check_relevance`); ``colour_weight`` > 0 fuses the product-colour
    similarity into the ranking (:mod:`fashionrec.features.colour`).
    """
    prepared.check_k(k)
    relevance = prepared.check_relevance(relevance)
    embeddings = embed(prepared, backbone, splits=("gallery", "query"), settings=settings)
    colour = None
    if colour_weight > 0:
        colour, colour_skipped = embed_colour(prepared, embeddings.metadata, settings)
        embeddings.skipped.extend(item for item in colour_skipped if item not in embeddings.skipped)
    evaluation = evaluate_embeddings(embeddings.vectors, embeddings.metadata, k=k, index=index, metric=metric,
                                     search_params=search_params, seed=prepared.split_seed, store=store,
                                     relevance=relevance, colour_vectors=colour, colour_weight=colour_weight)
    return evaluation_record(prepared, backbone, settings.runtime, embeddings, embeddings.metadata,
                             evaluation), embeddings


def evaluation_record(prepared: PreparedData, backbone: str, runtime: str, embeddings: Embeddings,
                      evaluated_metadata: pd.DataFrame, evaluation) -> dict:
    """Protocol, provenance and metrics of one evaluation, as the CLI prints them."""
    measured = {
        **prepared.describe(),
        "backbone": backbone,
        "runtime": runtime,
        "weights_sha256": embeddings.weights_sha256,
        "backbone_cache_key": embeddings.cache_key,
        "preprocessing": embeddings.preprocessing,
        "dataset_fingerprint": dataset_fingerprint(evaluated_metadata),
    }
    # What the headline means (relevance rule, share of the catalog, the leakage check) travels with
    # what was measured, so a record read back keeps it.
    measured.update(explained(prepared, embeddings, evaluation))
    return evaluation.record(prepared.split_seed, measured=measured, skipped=prepared.skipped + embeddings.skipped,
                             versions=software_versions()).to_dict()


def explained(prepared: PreparedData, embeddings: Embeddings, evaluation) -> dict:
    """What the headline numbers mean: the relevance rule, how much of the catalog was asked and
    searched, what P@k is, and the leakage check (queries with a near duplicate in the gallery)."""
    protocol = evaluation.protocol
    columns = list(evaluation.relevance)
    rule = ("same category (label)" if columns == ["label"]
            else "same " + " and same ".join(columns) + " (a row missing a value is never relevant)")
    n_catalog = int(len(prepared.catalog))
    used = protocol["n_queries"] + protocol["n_gallery"]
    record = {"relevance_rule": rule, "n_catalog_images": n_catalog,
              "share_of_catalog": round(used / n_catalog, 4) if n_catalog else None,
              "precision_at_k_means": f"the share of each query's top {protocol['k']} gallery results that are "
                                      f"relevant ({rule}), averaged over the {protocol['n_queries']} queries"}
    row_of = {item_id: row for row, item_id in enumerate(embeddings.metadata["id"])}
    query_ids, gallery_ids = evaluation.queries["id"].tolist(), evaluation.gallery["id"].tolist()
    if len(embeddings.vectors) == len(row_of) and all(item_id in row_of for item_id in query_ids + gallery_ids):
        vectors = embeddings.vectors
        record.update(leakage(vectors[[row_of[i] for i in query_ids]], vectors[[row_of[i] for i in gallery_ids]],
                              evaluation.per_query["precision_at_k"]))
    return record
