"""One experiment as plain functions: prepare a catalog, embed it, score query -> gallery.

The command line, the notebooks and the app call these same functions, so a number printed
by ``python -m fashionrec evaluate`` and the one in a pipeline report come from one code path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .. import config
from ..data.catalog import load_dataset
from ..data.split import SPLIT_FRACTIONS, SPLITS, split_catalog
from ..evaluation.protocol import dataset_fingerprint, evaluate_embeddings, software_versions
from ..features.embed import Embeddings, embed_catalog
from ..models.backbone import Backbone
from ..models.registry import get_backbone
from ..models.runtime import calibration_sample, with_runtime
from ..settings import InferenceSettings, StoreSettings


@dataclass
class PreparedData:
    """A loaded, validated and split catalog, with everything that was left out."""

    dataset: str
    root: Path
    catalog: pd.DataFrame  # id, path, label, split
    split_seed: int
    skipped: list[dict] = field(default_factory=list)
    too_small: list[dict] = field(default_factory=list)
    max_per_class: int | None = None
    category_map: str | None = None

    def describe(self) -> dict:
        return {
            "dataset": self.dataset,
            "data_dir": str(self.root),
            "split_seed": self.split_seed,
            "split_fractions": dict(zip(SPLITS, SPLIT_FRACTIONS)),
            "max_per_class": self.max_per_class,
            "category_map": self.category_map,
            "n_images": int(len(self.catalog)),
            "n_skipped": len(self.skipped),
            "skipped_categories": self.too_small,
        }


def prepare(dataset: str, data_dir=None, split_seed: int = config.DEFAULT_SEED, max_per_class: int | None = None,
            category_map=None, progress: bool = True) -> PreparedData:
    """Loads and validates a named dataset, then splits it (seeded)."""
    loaded = load_dataset(dataset, data_dir, max_per_class=max_per_class, seed=split_seed,
                          category_map=category_map, progress=progress)
    catalog, too_small = split_catalog(loaded.catalog, seed=split_seed)
    return PreparedData(dataset, loaded.root, catalog, split_seed, loaded.skipped, too_small, max_per_class,
                        str(category_map) if category_map and not isinstance(category_map, dict) else None)


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


def evaluate_backbone(prepared: PreparedData, backbone: str, index: str = "Flat", k: int = 10,
                      metric: str = "cosine", search_params: str = "",
                      settings: InferenceSettings = InferenceSettings(),
                      store: StoreSettings = StoreSettings()) -> tuple[dict, Embeddings]:
    """Embeds gallery and query images and scores query -> gallery retrieval.

    Returns the JSON-ready record (protocol, metrics with 95% intervals, per-category
    table, provenance) and the embeddings it used. ``store`` says which vector store ranks
    the gallery (faiss in this process, or Milvus); the record has the same keys for each.
    """
    embeddings = embed(prepared, backbone, splits=("gallery", "query"), settings=settings)
    evaluation = evaluate_embeddings(embeddings.vectors, embeddings.metadata, k=k, index=index, metric=metric,
                                     search_params=search_params, seed=prepared.split_seed, store=store)
    return evaluation_record(prepared, backbone, settings.runtime, embeddings, embeddings.metadata,
                             evaluation), embeddings


def evaluation_record(prepared: PreparedData, backbone: str, runtime: str, embeddings: Embeddings,
                      evaluated_metadata: pd.DataFrame, evaluation) -> dict:
    """Protocol, provenance and metrics of one evaluation, as the CLI prints them."""
    return {
        **prepared.describe(),
        "backbone": backbone,
        "runtime": runtime,
        "weights_sha256": embeddings.weights_sha256,
        "backbone_cache_key": embeddings.cache_key,
        "dataset_fingerprint": dataset_fingerprint(evaluated_metadata),
        **evaluation.to_record(bootstrap_seed=prepared.split_seed),
        "n_skipped": len(prepared.skipped) + len(embeddings.skipped),
        "versions": software_versions(),
    }
