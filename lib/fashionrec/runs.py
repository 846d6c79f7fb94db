"""The pipeline's stages over a run directory ``results/<run>/``: what each notebook calls.

Layout of a run directory:

    prepare.json, catalog.parquet, skipped.json     00-prepare-data
    embeddings/<backbone>.{npy,parquet,json}         01-embed (row i of .npy = row i of .parquet)
    backbones.json, throughput.csv                   01-embed (availability, speed)
    index_variants.csv                               02-index
    metrics.csv, metrics.json, per_category.csv      03-evaluate (no timings: byte-identical reruns)
    figures/*.png, report.md                         plots and the report

Files that hold timings are kept apart from the metrics files, so two runs with the same
parameters produce byte-identical metrics.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import config
from .embed import load_embeddings, save_embeddings
from .errors import WeightsUnavailable
from .evaluate import dataset_fingerprint, evaluate_embeddings, software_versions
from .workflow import PreparedData, embed, prepare


def run_dir(run_name: str) -> Path:
    path = config.RESULTS_DIR / run_name
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False, sort_keys=True) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def stage_prepare(run_name: str, dataset: str, data_dir=None, split_seed: int = config.DEFAULT_SEED,
                  max_per_class: int | None = None, category_map=None, progress: bool = True) -> PreparedData:
    prepared = prepare(dataset, data_dir, split_seed=split_seed, max_per_class=max_per_class,
                       category_map=category_map, progress=progress)
    out = run_dir(run_name)
    prepared.catalog.to_parquet(out / "catalog.parquet", index=False)
    write_json(out / "skipped.json", prepared.skipped)
    write_json(out / "prepare.json", prepared.describe())
    return prepared


def load_prepared(run_name: str) -> PreparedData:
    out = config.RESULTS_DIR / run_name
    if not (out / "catalog.parquet").exists():
        raise FileNotFoundError(f"{out / 'catalog.parquet'}: run 00-prepare-data for run {run_name!r} first")
    described = read_json(out / "prepare.json")
    return PreparedData(
        dataset=described["dataset"], root=Path(described["data_dir"]),
        catalog=pd.read_parquet(out / "catalog.parquet"), split_seed=described["split_seed"],
        skipped=read_json(out / "skipped.json"), too_small=described["skipped_categories"],
        max_per_class=described["max_per_class"], category_map=described["category_map"],
    )


def stage_embed(run_name: str, backbones: list[str], splits=("train", "gallery", "query"), weights_files=None,
                batch_size: int = 32, num_workers: int = 2, threads: int | None = None,
                progress: bool = True) -> pd.DataFrame:
    """Embeds the run's catalog with each backbone; an unavailable one is a reported skip.

    Returns one row per backbone: status (``ok``/``skipped``), the reason, and speed.
    """
    prepared = load_prepared(run_name)
    out = run_dir(run_name)
    rows, status = [], {}
    for name in backbones:
        try:
            embeddings = embed(prepared, name, splits=splits, weights_file=(weights_files or {}).get(name),
                               batch_size=batch_size, num_workers=num_workers, threads=threads, progress=progress)
        except WeightsUnavailable as error:
            status[name] = {"status": "skipped", "reason": str(error)}
            rows.append({"backbone": name, "status": "skipped", "reason": str(error)})
            continue
        save_embeddings(embeddings, out / "embeddings", extra={"dataset_fingerprint": dataset_fingerprint(embeddings.metadata)})
        status[name] = {"status": "ok", "dim": int(embeddings.vectors.shape[1]), "n": int(len(embeddings.vectors)),
                        "weights_sha256": embeddings.weights_sha256, "n_skipped_images": len(embeddings.skipped)}
        rows.append({
            "backbone": name, "status": "ok", "reason": "", "dim": embeddings.vectors.shape[1],
            "n_images": len(embeddings.vectors), "computed": embeddings.n_computed, "reused": embeddings.n_reused,
            "seconds": round(embeddings.seconds, 2),
            "images_per_s": round(embeddings.images_per_second, 1) if embeddings.n_computed else None,
        })
    write_json(out / "backbones.json", status)
    table = pd.DataFrame(rows)
    table.to_csv(out / "throughput.csv", index=False)
    return table


def available_backbones(run_name: str) -> list[str]:
    status = read_json(config.RESULTS_DIR / run_name / "backbones.json")
    return [name for name, entry in status.items() if entry["status"] == "ok"]


def load_run_embeddings(run_name: str, backbone: str) -> tuple[np.ndarray, pd.DataFrame, dict]:
    return load_embeddings(config.RESULTS_DIR / run_name / "embeddings", backbone)


METRIC_COLUMNS = ["precision_at_k", "hit_rate_at_k", "recall_at_k", "map_at_k", "hit_rate_at_1"]


def stage_evaluate(run_name: str, indexes: list[str], k: int = 10, metric: str = "cosine",
                   search_params: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """Scores every available backbone with every index; writes metrics.{csv,json}, per_category.csv.

    Returns the metrics table (one row per backbone x index, with 95% intervals) and the
    per-query evaluations keyed by (backbone, index) for plots and paired comparisons.
    """
    prepared = load_prepared(run_name)
    out = run_dir(run_name)
    records, evaluations, per_category = [], {}, []
    for backbone in available_backbones(run_name):
        vectors, metadata, info = load_run_embeddings(run_name, backbone)
        for index in indexes:
            params = (search_params or {}).get(index, "")
            evaluation = evaluate_embeddings(vectors, metadata, k=k, index=index, metric=metric,
                                             search_params=params, seed=prepared.split_seed)
            evaluations[(backbone, index)] = evaluation
            record = {"backbone": backbone, "weights_sha256": info["weights_sha256"],
                      "dataset_fingerprint": info["dataset_fingerprint"],
                      **evaluation.to_record(bootstrap_seed=prepared.split_seed)}
            for category, values in record.pop("per_category").items():
                per_category.append({"backbone": backbone, "index": index, "category": category, **values})
            records.append(record)
    table = pd.DataFrame(records)
    flat = table.copy()
    for column in [c for c in flat.columns if c.endswith("_ci")]:
        flat[column.replace("_ci", "_low")] = flat[column].str[0]
        flat[column.replace("_ci", "_high")] = flat[column].str[1]
    flat.drop(columns=[c for c in flat.columns if c.endswith("_ci") or c == "bootstrap"]).to_csv(
        out / "metrics.csv", index=False, float_format="%.6f")
    pd.DataFrame(per_category).to_csv(out / "per_category.csv", index=False, float_format="%.6f")
    write_json(out / "metrics.json", {
        "protocol": {**prepared.describe(), "k": k, "metric": metric, "indexes": indexes,
                     "relevance": "same category as the query", "queries": "query split", "ranked": "gallery split"},
        "versions": software_versions(),
        "results": records,
        "skipped_backbones": {name: entry["reason"] for name, entry in
                              read_json(out / "backbones.json").items() if entry["status"] != "ok"},
    })
    return table, evaluations
