"""The stages of a run as plain functions: prepare -> embed -> evaluate.

The command line and the notebooks call these same functions, so a number printed by
``python -m fashionrec evaluate`` and the one in a pipeline report come from one code path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import config
from .backbones import Backbone, get_backbone
from .datasets import load_dataset, split_catalog
from .embed import Embeddings, embed_catalog
from .evaluate import dataset_fingerprint, evaluate_embeddings, software_versions
from .runtime import DEFAULT_RUNTIME, calibration_sample, with_runtime


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
            "split_fractions": {"train": 0.6, "gallery": 0.2, "query": 0.2},
            "max_per_class": self.max_per_class,
            "category_map": self.category_map,
            "n_images": int(len(self.catalog)),
            "n_skipped": len(self.skipped),
            "skipped_categories": self.too_small,
        }


def prepare(dataset: str, data_dir=None, split_seed: int = config.DEFAULT_SEED, max_per_class: int | None = None,
            category_map=None, progress: bool = True) -> PreparedData:
    loaded = load_dataset(dataset, data_dir, max_per_class=max_per_class, seed=split_seed,
                          category_map=category_map, progress=progress)
    catalog, too_small = split_catalog(loaded.catalog, seed=split_seed)
    return PreparedData(dataset, loaded.root, catalog, split_seed, loaded.skipped, too_small, max_per_class,
                        str(category_map) if category_map and not isinstance(category_map, dict) else None)


def embed(prepared: PreparedData, backbone: str, splits=("train", "gallery", "query"), weights_file=None,
          batch_size: int = 32, num_workers: int = 2, threads: int | None = None, progress: bool = True,
          runtime: str = DEFAULT_RUNTIME) -> Embeddings:
    """Embeds the rows of the given splits; raises WeightsUnavailable before any work if needed.

    ``runtime`` is one of fashionrec.runtime.RUNTIMES; "onnx-int8" calibrates on a seeded
    sample of the training split.
    """
    return embed_with(prepared, get_backbone(backbone, weights_file=weights_file), splits, batch_size, num_workers,
                      threads, progress, runtime)


def embed_with(prepared: PreparedData, model: Backbone, splits=("train", "gallery", "query"), batch_size: int = 32,
               num_workers: int = 2, threads: int | None = None, progress: bool = True,
               runtime: str = DEFAULT_RUNTIME) -> Embeddings:
    """:func:`embed` for a backbone already built (e.g. a view of one, see fashionrec.classify)."""
    calibration = None
    if runtime == "onnx-int8":
        train = prepared.catalog[prepared.catalog["split"] == "train"]
        calibration = calibration_sample(train["path"].tolist(), seed=prepared.split_seed)
    model = with_runtime(model, runtime, threads=threads, calibration_paths=calibration, progress=progress)
    rows = prepared.catalog[prepared.catalog["split"].isin(splits)].reset_index(drop=True)
    return embed_catalog(rows, model, batch_size=batch_size, num_workers=num_workers, threads=threads,
                         root=prepared.root, progress=progress)


def evaluate_backbone(prepared: PreparedData, backbone: str, index: str = "Flat", k: int = 10,
                      metric: str = "cosine", search_params: str = "", weights_file=None,
                      batch_size: int = 32, num_workers: int = 2, threads: int | None = None,
                      progress: bool = True, runtime: str = DEFAULT_RUNTIME) -> tuple[dict, Embeddings]:
    """Embeds gallery and query images and scores query -> gallery retrieval.

    Returns the JSON-ready record (protocol, metrics with 95% intervals, per-category
    table, provenance) and the embeddings it used.
    """
    embeddings = embed(prepared, backbone, splits=("gallery", "query"), weights_file=weights_file,
                       batch_size=batch_size, num_workers=num_workers, threads=threads, progress=progress,
                       runtime=runtime)
    evaluation = evaluate_embeddings(embeddings.vectors, embeddings.metadata, k=k, index=index, metric=metric,
                                     search_params=search_params, seed=prepared.split_seed)
    return _record(prepared, backbone, runtime, embeddings, embeddings.metadata, evaluation), embeddings


def evaluate_finetuned(prepared: PreparedData, backbone: str, level: int = 1, index: str = "Flat", k: int = 10,
                       metric: str = "cosine", search_params: str = "", weights_file=None, head_config=None,
                       tune_config=None, losses=None, model_path=None, retrain: bool = False, batch_size: int = 32,
                       num_workers: int = 2, threads: int | None = None, progress: bool = True,
                       runtime: str = DEFAULT_RUNTIME):
    """Fine-tunes on the train split (or reuses the cached model) and scores query -> gallery.

    The record has the keys of :func:`evaluate_backbone`, with the fine-tuned metrics at the
    top level, plus ``category_accuracy``, ``macro_f1``, ``baseline_precision_at_k`` (the
    frozen backbone on the same split), ``train_seconds`` and a ``finetune`` section.
    """
    from . import finetune

    result = finetune.run_finetune(
        prepared, backbone, level=level, head_cfg=head_config, tune_cfg=tune_config,
        losses=tuple(losses) if losses else finetune.LOSSES, index=index, k=k, metric=metric,
        search_params=search_params, weights_file=weights_file, batch_size=batch_size, num_workers=num_workers,
        threads=threads, model_path=model_path, retrain=retrain, runtime=runtime, progress=progress)
    embeddings = result.extra["embeddings"]
    evaluated = embeddings.metadata["split"].isin(["gallery", "query"]).to_numpy()
    record = _record(prepared, backbone, runtime, embeddings, embeddings.metadata[evaluated], result.evaluation)
    return {**record, **result.record}, result


def _record(prepared: PreparedData, backbone: str, runtime: str, embeddings: Embeddings,
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
