"""The pipeline's stages over a run directory ``results/<run>/``: what each notebook calls.

Layout of a run directory:

    prepare.json, catalog.parquet, skipped.json     00-prepare-data
    embeddings/<backbone>.{npy,parquet,json}         01-embed (row i of .npy = row i of .parquet)
    backbones.json, throughput.csv                   01-embed (availability, speed)
    index_variants.csv                               02-index
    metrics.csv, metrics.json, per_category.csv      03-evaluate (no timings: byte-identical reruns)
    head.pt, finetune.csv, finetune_metrics.json     04-finetune (finetune_timing.json: its timings)
    best.pt, search_*.csv, search_metrics.json       04-finetune's model search (search_cost.csv, search_timing.json)
    index/<backbone>-<index>/                        06-recommend (an index folder of the run's catalog)
    figures/*.png, report.md                         plots and the report

Files that hold timings are kept apart from the metrics files, so two runs with the same
parameters produce byte-identical metrics.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from .. import config
from ..data.catalog import parse_columns
from ..data.prepared import PreparedData, prepare
from ..errors import FashionRecError, IndexBuildError, WeightsUnavailable
from ..evaluation.analysis import distance_and_dimension, umap_2d
from ..evaluation.compare import paired_comparisons, winners
from ..evaluation.protocol import evaluate_embeddings
from ..experiment.colour import colour_sweep
from ..experiment.evaluate import embed
from ..experiment.cost import measure_embedding_cost
from ..experiment.distil import DistilResult, default_config, distil_student
from ..experiment.finetune import FinetunedEvaluation, evaluate_finetuned
from ..experiment.search import SearchedEvaluation, search_finetuned
from ..features.files import load_embeddings, save_embeddings
from ..indexing.faiss_index import build_index, index_bytes_per_vector, resolve_factory, search
from ..indexing.measure import recall_vs_exact
from ..models.ensemble import combined_backbone
from ..models.finetuned import HEAD_SEPARATOR
from ..models.registry import get_backbone
from ..provenance import dataset_fingerprint, software_versions
from ..serving.recommender import Recommender
from ..settings import InferenceSettings
from ..training.distil import DistilConfig
from ..training.finetune import FinetuneConfig
from ..training.heads import HeadConfig
from ..training.search import NO_HEAD, SearchConfig
from ..training.trunk import BackboneTuneConfig
from . import plots


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
                  max_per_class: int | None = None, category_map=None, k: int | None = None,
                  progress: bool = True, columns=None, image_root=None) -> PreparedData:
    """Loads, checks and splits the catalog; writes ``catalog.parquet``, the ledger ``skipped.json`` and
    ``prepare.json``. With ``k``, a gallery smaller than k is an error now, before anything is embedded.
    ``columns``, ``image_root``: a catalog table's own columns and image folder."""
    prepared = prepare(dataset, data_dir, split_seed=split_seed, max_per_class=max_per_class,
                       category_map=category_map, progress=progress, columns=parse_columns(columns),
                       image_root=image_root)
    if k is not None:
        prepared.check_k(k)
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
        n_not_sampled=described["n_not_sampled"],
    )


def stage_embed(run_name: str, backbones: list[str], splits=("train", "gallery", "query"), weights_files=None,
                settings: InferenceSettings = InferenceSettings()) -> pd.DataFrame:
    """Embeds the run's catalog with each backbone; an unavailable one is a reported skip.

    Returns one row per backbone: status (``ok``/``skipped``), the reason, and speed.
    ``backbones.json`` also lists, per backbone, the images that failed at embedding (none,
    unless a file changed after 00-prepare-data checked it).
    """
    prepared = load_prepared(run_name)
    out = run_dir(run_name)
    rows, status = [], {}
    for name in backbones:
        try:
            embeddings = embed(prepared, name, splits=splits,
                               settings=settings.but(weights_file=(weights_files or {}).get(name)))
        except WeightsUnavailable as error:
            status[name] = {"status": "skipped", "reason": str(error)}
            rows.append({"backbone": name, "status": "skipped", "reason": str(error)})
            continue
        save_embeddings(embeddings, out / "embeddings", extra={"dataset_fingerprint": dataset_fingerprint(embeddings.metadata)})
        status[name] = {"status": "ok", "dim": int(embeddings.vectors.shape[1]), "n": int(len(embeddings.vectors)),
                        "weights_sha256": embeddings.weights_sha256, "runtime": settings.runtime,
                        "weights_file": (weights_files or {}).get(name),
                        "n_skipped_images": len(embeddings.skipped), "skipped": embeddings.skipped}
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


def stage_index(run_name: str, indexes: list[str], k: int = 10, metric: str = "cosine",
                search_params: dict | None = None, threads: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Each index variant over each backbone's gallery, queried with the query split.

    Writes ``index_variants.csv`` (bytes per vector, recall@k against exact search: stable
    across reruns) and ``index_timings.csv`` (the same rows with build seconds and queries/s).
    """
    if threads:
        faiss.omp_set_num_threads(threads)
    out = run_dir(run_name)
    rows = []
    for backbone in available_backbones(run_name):
        vectors, metadata, _ = load_run_embeddings(run_name, backbone)
        split = metadata["split"].to_numpy()
        gallery, queries = vectors[split == "gallery"], vectors[split == "query"]
        exact = build_index(gallery, factory="Flat", metric=metric, seed=seed)
        _, exact_ids = search(exact, queries, k, metric=metric)
        for template in indexes:
            params = (search_params or {}).get(template, "")
            row = {"backbone": backbone, "index": template,
                   "factory": resolve_factory(template, len(gallery), gallery.shape[1]), "search_params": params,
                   "n_gallery": len(gallery), "dim": gallery.shape[1], "status": "ok"}
            started = time.perf_counter()
            try:
                built = build_index(gallery, factory=template, metric=metric, seed=seed)
            except IndexBuildError as error:
                rows.append({**row, "status": f"not built: {error}"})
                continue
            build_s = time.perf_counter() - started
            started = time.perf_counter()
            _, ids = search(built, queries, k, metric=metric, params=params)
            search_s = time.perf_counter() - started
            rows.append({**row, "bytes_per_vector": round(index_bytes_per_vector(built), 1),
                         "recall_vs_exact": round(recall_vs_exact(ids, exact_ids, k), 4),
                         "build_s": round(build_s, 4), "qps": round(len(queries) / search_s, 1)})
    table = pd.DataFrame(rows)
    table.to_csv(out / "index_timings.csv", index=False)
    table.drop(columns=["build_s", "qps"]).to_csv(out / "index_variants.csv", index=False)
    return table


# Below this many gallery vectors exact search scans the gallery in a millisecond or less per query
# (10,000 x 1280 floats: 13M multiply-adds), so what tells index variants apart (speed, memory,
# recall lost to approximation) does not show.
MIN_GALLERY_FOR_INDEX_VARIANTS = 10_000


def small_gallery_caveat(table: pd.DataFrame) -> str | None:
    """What index variants cannot show on this gallery (from a :func:`stage_index` table); None on a large one."""
    if table.empty or "n_gallery" not in table:
        return None
    n_gallery = int(table["n_gallery"].max())
    if n_gallery >= MIN_GALLERY_FOR_INDEX_VARIANTS:
        return None
    lists = sorted({int(match) for factory in table["factory"].dropna() for match in re.findall(r"IVF(\d+)", factory)})
    caveat = (f"The gallery holds only {n_gallery} vectors, too few for index variants to mean anything: exact search "
              "already scans it in a millisecond or less per query, so queries/s measure call overhead, and "
              "recall against exact search says nothing about a catalog of realistic size")
    if lists == [1]:
        caveat += "; the IVF variants get a single list, i.e. IVF1 is exhaustive search"
    elif lists:
        caveat += f"; the IVF variants get only {' or '.join(map(str, lists))} lists"
    return caveat + (f". Compare indexes on {MIN_GALLERY_FOR_INDEX_VARIANTS:,}+ vectors, e.g. with "
                     "benchmarks/index_scale.py.")


METRIC_COLUMNS = ["precision_at_k", "hit_rate_at_k", "recall_at_k", "map_at_k", "hit_rate_at_1"]


def stage_evaluate(run_name: str, indexes: list[str], k: int = 10, metric: str = "cosine",
                   search_params: dict | None = None, relevance=("label",)) -> tuple[pd.DataFrame, dict]:
    """Scores every available backbone with every index; writes metrics.{csv,json}, per_category.csv.

    Returns the metrics table (one row per backbone x index, with 95% intervals) and the
    per-query evaluations keyed by (backbone, index) for plots and paired comparisons.
    ``relevance``: the catalog columns a result must share with its query (default: the category).
    """
    prepared = load_prepared(run_name)
    relevance = prepared.check_relevance(relevance)
    out = run_dir(run_name)
    records, evaluations, per_category, not_built = [], {}, [], {}
    for backbone in available_backbones(run_name):
        vectors, metadata, info = load_run_embeddings(run_name, backbone)
        for index in indexes:
            params = (search_params or {}).get(index, "")
            try:
                evaluation = evaluate_embeddings(vectors, metadata, k=k, index=index, metric=metric,
                                                 search_params=params, seed=prepared.split_seed, relevance=relevance)
            except IndexBuildError as error:
                not_built[f"{backbone} / {index}"] = str(error)
                continue
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
                     "relevance": "same category as the query" if relevance == ("label",) else
                     f"same {', '.join(relevance)} as the query", "queries": "query split", "ranked": "gallery split"},
        "versions": software_versions(),
        "results": records,
        "indexes_not_built": not_built,
        "skipped_backbones": {name: entry["reason"] for name, entry in
                              read_json(out / "backbones.json").items() if entry["status"] != "ok"},
    })
    return table, evaluations


def stage_colour_sweep(run_name: str, weights, k: int = 10, relevance=("label",),
                       settings: InferenceSettings = InferenceSettings(progress=False)) -> dict | None:
    """The colour-weight sweep of the run's first backbone (Flat, cosine) into colour_sweep.json and its figure.

    The backbone runs as 01-embed ran it (its runtime and weights file, from backbones.json), so
    the sweep's w = 0 row is the run's own evaluation; ``settings`` gives the rest (batch size,
    workers, threads). None when ``weights`` is empty. The report (05-report) shows the table
    and the plot.
    """
    if not weights:
        return None
    backbones = available_backbones(run_name)
    if not backbones:
        raise FashionRecError(f"run {run_name!r}: no backbone was embedded, nothing to sweep")
    embedded = read_json(config.RESULTS_DIR / run_name / "backbones.json")[backbones[0]]
    settings = settings.but(runtime=embedded.get("runtime", settings.runtime),
                            weights_file=embedded.get("weights_file"))
    record = colour_sweep(load_prepared(run_name), backbones[0], weights, k=k, relevance=relevance,
                          settings=settings).to_record()
    write_colour_sweep_files(run_dir(run_name), record)
    return record


COLOUR_SWEEP_FILE = "colour_sweep.json"
COLOUR_SWEEP_FIGURE = "colour_sweep.png"


def write_colour_sweep_files(out: Path, record: dict) -> None:
    """``colour_sweep.json`` and ``figures/colour_sweep.png`` of a sweep record, in the run directory ``out``."""
    write_json(out / COLOUR_SWEEP_FILE, record)
    figure = plots.colour_tradeoff(record["rows"], record["protocol"]["relevance"], record["protocol"]["k"],
                                   record["suggested"]["colour_weight"], path=out / "figures" / COLOUR_SWEEP_FIGURE)
    plots.plt.close(figure)


def stage_compare(run_name: str, table: pd.DataFrame, evaluations: dict, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Paired bootstrap differences between backbones and the winner per metric."""
    comparisons = paired_comparisons(evaluations, seed=seed)
    best = winners(table, comparisons)
    out = run_dir(run_name)
    comparisons.to_csv(out / "paired_comparisons.csv", index=False, float_format="%.6f")
    best.to_csv(out / "winners.csv", index=False, float_format="%.6f")
    return comparisons, best


def stage_distance_dimension(run_name: str, k: int = 10, dims=(64, 128, 256), seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Distance and PCA dimension per backbone, chosen on validation and scored once on the queries.

    Writes ``distance_dimension.csv`` (every variant on the validation part of the train
    split) and ``distance_dimension.json`` (per backbone: the chosen setting and, on
    query -> gallery, it and the reference with intervals and their paired difference).
    """
    tables, summaries = [], {}
    for backbone in available_backbones(run_name):
        vectors, metadata, _ = load_run_embeddings(run_name, backbone)
        table, summaries[backbone] = distance_and_dimension(vectors, metadata, k=k, dims=dims, seed=seed)
        tables.append(table.assign(backbone=backbone))
    table = pd.concat(tables, ignore_index=True)
    table = table[["backbone", *[c for c in table.columns if c != "backbone"]]]
    out = run_dir(run_name)
    table.to_csv(out / "distance_dimension.csv", index=False, float_format="%.6f")
    write_json(out / "distance_dimension.json", summaries)
    return table, summaries


def stage_umap(run_name: str, split: str = "gallery", seed: int = 0, thumbnails: int = 12):
    """Side-by-side 2-D UMAP of each backbone's ``split`` embeddings, coloured by category."""
    points, labels, paths = {}, {}, {}
    for backbone in available_backbones(run_name):
        vectors, metadata, _ = load_run_embeddings(run_name, backbone)
        rows = metadata["split"].to_numpy() == split
        points[backbone] = umap_2d(vectors[rows], seed=seed)
        labels[backbone] = metadata.loc[rows, "label"].to_numpy()
        paths[backbone] = metadata.loc[rows, "path"].to_numpy()
    return plots.umap_side_by_side(points, labels, paths, thumbnails_per_plot=thumbnails, seed=seed,
                                   path=run_dir(run_name) / "figures" / "umap.png")


@dataclass
class FinetuneStage:
    """Both levels of 04-finetune and the one kept as the run's model of record."""

    level1: FinetunedEvaluation
    level2: FinetunedEvaluation | None
    chosen: FinetunedEvaluation
    headed_name: str                   # backbone name of the model of record, e.g. "efficientnet_lite0+head:run"
    table: pd.DataFrame                # frozen vs fine-tuned, query -> gallery (also finetune.csv)
    level2_skipped: str | None = None


def _finetune_row(model: str, level: int, result, record: dict) -> dict:
    """One row of finetune.csv from ``record``, an Evaluation.to_record of that model."""
    row = {"model": model, "level": level, "loss": result.payload["loss"] if level else ""}
    for name in ("precision_at_k", "hit_rate_at_1", "map_at_k"):
        row[name] = record[name]
    row["precision_at_k_low"], row["precision_at_k_high"] = record["precision_at_k_ci"]
    if level:
        gain = result.record["precision_at_k_gain"]
        row.update(category_accuracy=result.record["category_accuracy"], macro_f1=result.record["macro_f1"],
                   gain_vs_frozen=gain["diff"], gain_low=gain["low"], gain_high=gain["high"],
                   gain_significant=gain["significant"])
    return row


def stage_finetune(run_name: str, backbone: str, k: int = 10, metric: str = "cosine",
                   losses=("proxy_anchor", "norm_softmax", "supcon"), level2: bool = False,
                   time_budget_min: float | None = None, trainable_blocks: int = 2, n_views: int = 2,
                   progress: bool = True) -> FinetuneStage:
    """Level 1 (head on frozen embeddings), optionally level 2 (last blocks + head), model of record.

    The level with the better *validation* P@k becomes ``head.pt``. Writes
    ``finetune_metrics.json`` and ``finetune.csv`` (metrics only) and ``finetune_timing.json``
    (training seconds, machine-dependent). A rerun reuses the cached models, so its metrics
    are byte-identical; level 2 stops by epochs and early stopping (``time_budget_min``, off by
    default, is a wall-clock safety net; a run it stops is reported and may differ between machines).
    """
    prepared = load_prepared(run_name)
    out = run_dir(run_name)
    settings = InferenceSettings(progress=progress)
    head_config = HeadConfig(k=k, seed=prepared.split_seed)
    first = evaluate_finetuned(prepared, backbone, FinetuneConfig(level=1, head=head_config, losses=tuple(losses)),
                               k=k, metric=metric, settings=settings, model_path=out / "head-level1.pt")
    second, skipped = None, None
    if level2:
        tune_config = BackboneTuneConfig(seed=prepared.split_seed,
                                         time_budget_s=time_budget_min * 60 if time_budget_min else None,
                                         trainable_blocks=trainable_blocks, n_views=n_views)
        try:
            second = evaluate_finetuned(prepared, backbone, FinetuneConfig(level=2, head=head_config, tune=tune_config,
                                                                           losses=(first.payload["loss"],)),
                                        k=k, metric=metric, settings=settings, model_path=out / "head-level2.pt")
        except FashionRecError as error:  # e.g. a backbone other than efficientnet_lite*
            skipped = str(error)
    val_first = max(row["val_precision_at_k"] for row in first.payload["selection"]["loss_comparison"])
    val_second = second.payload["selection"]["level2"]["best_val_precision"] if second is not None else None
    chosen = second if val_second is not None and val_second > val_first else first
    shutil.copyfile(chosen.model_path, out / "head.pt")
    headed_name = f"{backbone}{HEAD_SEPARATOR}{run_name}"

    seed = prepared.split_seed
    first_metrics = first.evaluation.to_record(bootstrap_seed=seed)
    second_metrics = None if second is None else second.evaluation.to_record(bootstrap_seed=seed)
    rows = [_finetune_row(f"{backbone} (frozen)", 0, first, first.record["baseline"]),
            _finetune_row(f"{backbone} + head (level 1, {first.payload['loss']})", 1, first, first_metrics)]
    if second is not None:
        rows.append(_finetune_row(f"{backbone} tuned + head (level 2)", 2, second, second_metrics))
    table = pd.DataFrame(rows)
    table.to_csv(out / "finetune.csv", index=False, float_format="%.6f")

    def summary(result):
        return {key: result.record[key] for key in ("category_accuracy", "macro_f1", "precision_at_k_gain",
                                                      "category_aware", "classification")}

    write_json(out / "finetune_metrics.json", {
        "backbone": backbone, "finetuned_backbone": headed_name, "chosen_level": chosen.payload["level"],
        "validation_precision_at_k": {"level 1": val_first, "level 2": val_second},
        "frozen": first.record["baseline"],
        "level1": summary(first), "level1_metrics": first_metrics,
        "level2": None if second is None else summary(second), "level2_metrics": second_metrics,
        "level2_skipped": skipped,
        "train_fingerprint": chosen.payload["train_fingerprint"],
    })
    write_json(out / "finetune_timing.json", {
        "level1_train_seconds": first.payload["train_seconds"],
        "level2_train_seconds": None if second is None else second.payload["train_seconds"],
        "level2": None if second is None else second.payload["selection"]["level2"]})
    return FinetuneStage(first, second, chosen, headed_name, table, skipped)


@dataclass
class SearchStage:
    """The model search of a run: the chosen model, its candidates and what serving it costs."""

    result: SearchedEvaluation
    served_name: str                   # the chosen model's backbone name: "<features>+head:results/<run>/best.pt"
    candidates: pd.DataFrame           # every candidate x boost: select-slice P@k [95% CI] (search_candidates.csv)
    table: pd.DataFrame                # query -> gallery: the references and the chosen model (search.csv)
    cost: pd.DataFrame | None          # seconds per image, measured in one run (search_cost.csv)


def _query_row(model: str, evaluation, seed: int, accuracy=None, accuracy_ci=None, gains=None) -> dict:
    record = evaluation.to_record(bootstrap_seed=seed)
    row = {"model": model}
    for name in ("precision_at_k", "hit_rate_at_1", "map_at_k"):
        row[name] = record[name]
    row["precision_at_k_low"], row["precision_at_k_high"] = record["precision_at_k_ci"]
    row["category_accuracy"] = accuracy
    row["category_accuracy_low"], row["category_accuracy_high"] = accuracy_ci or (None, None)
    for name, gain in (gains or {}).items():
        row[f"gain_{name}"], row[f"gain_{name}_low"], row[f"gain_{name}_high"] = gain["diff"], gain["low"], gain["high"]
    return row


def stage_search(run_name: str, backbone: str, k: int = 10, metric: str = "cosine", losses=None,
                 hidden_dims=(512, 1024), cost_images: int = 64, progress: bool = True) -> SearchStage:
    """The model search over the combination ``backbone`` (see fashionrec.experiment.search), its model of record.

    Writes ``best.pt`` (served as ``<chosen feature set>+head:results/<run>/best.pt``),
    ``search_candidates.csv`` (every candidate x boost, select slice), ``search_classifier.csv``
    (select slice), ``search.csv`` and ``search_metrics.json`` (the chosen model and the
    references on the queries, paired gains) and, machine-dependent, ``search_cost.csv`` and
    ``search_timing.json``. A rerun reuses the cached model: its metrics files are byte-identical.
    """
    prepared = load_prepared(run_name)
    out = run_dir(run_name)
    settings = InferenceSettings(progress=progress)
    seed = prepared.split_seed
    cfg = SearchConfig(head=HeadConfig(k=k, seed=seed), hidden_dims=tuple(hidden_dims),
                       **({"losses": tuple(losses)} if losses else {}))
    model_file = out / "best.pt"
    result = search_finetuned(prepared, backbone, cfg, k=k, metric=metric, settings=settings, model_path=model_file)
    reference = model_file.relative_to(config.PROJECT_ROOT) if model_file.is_relative_to(config.PROJECT_ROOT) \
        else model_file
    served = f"{result.payload['backbone']}{HEAD_SEPARATOR}{reference}"
    selection = result.outcome
    candidates = pd.DataFrame(selection["candidates"])
    candidates.to_csv(out / "search_candidates.csv", index=False, float_format="%.6f")
    pd.DataFrame(selection["classifier_selection"]).drop(columns=["seconds", "cpu_seconds"], errors="ignore").to_csv(
        out / "search_classifier.csv", index=False, float_format="%.6f")
    record = result.record
    rows = [_query_row(f"{result.baseline_backbone.name} (frozen)", result.baseline, seed)]
    if result.reference is not None:
        rows.append(_query_row(f"{result.baseline_backbone.name} + head (--finetune)", result.reference.evaluation,
                               seed, result.reference.record["category_accuracy"],
                               result.reference.record["category_accuracy_ci"]))
    rows.append(_query_row("chosen, ranked by similarity alone", result.plain, seed))
    rows.append(_query_row("chosen, with its ranking", result.evaluation, seed, record["category_accuracy"],
                           record["category_accuracy_ci"], record["precision_at_k_gains"]))
    table = pd.DataFrame(rows)
    table.to_csv(out / "search.csv", index=False, float_format="%.6f")
    write_json(out / "search_metrics.json", {
        "searched": backbone, "served_name": served, "chosen": record["finetune"]["chosen"],
        "slices": record["finetune"]["slices"], "categories_without_validation":
            record["finetune"]["categories_without_validation"],
        "config": selection["config"], "feature_sets": selection["feature_sets"],
        "preprocessing": [{key: row[key] for key in ("part", "backbone", "transform")}
                          for row in record["finetune"]["preprocessing"]],
        "query": {key: record[key] for key in ("precision_at_k", "precision_at_k_ci", "precision_at_k_plain",
                                               "category_accuracy", "category_accuracy_ci", "macro_f1",
                                               "baseline_precision_at_k", "precision_at_k_gains", "references")},
        "classification": record["classification"],
        "dim": record["finetune"]["dim"], "bytes_per_vector": record["finetune"]["bytes_per_vector"],
        "train_fingerprint": record["finetune"]["train_fingerprint"],
    })
    cost = None
    if cost_images:
        backbones = {"chosen (serving)": result.serving_backbones}
        backbones.update({name: combination for name, combination in _feature_set_backbones(result).items()})
        dims = {"chosen (serving)": record["finetune"]["dim"]}
        dims.update(_stored_dims(candidates))
        cost = measure_embedding_cost(prepared, backbones, dims=dims, n_images=cost_images, settings=settings)
        cost.to_csv(out / "search_cost.csv", index=False, float_format="%.6f")
    write_json(out / "search_timing.json", {
        "search_seconds": selection["search_seconds"], "refit_seconds": selection["refit_seconds"],
        "reused_cached_model": result.reused, "cost_measured_on": None if cost is None else cost.attrs})
    return SearchStage(result, served, candidates, table, cost)


def stage_distil(run_name: str, teacher: str, student: str = "efficientnet_lite0", teacher_finetune: bool = False,
                 k: int = 10, metric: str = "cosine", relational_weights=(1.0, 10.0), cost_images: int = 32,
                 progress: bool = True) -> tuple[DistilResult, pd.DataFrame]:
    """Distils ``teacher`` into ``student`` on the run's train split (fashionrec.experiment.distil).

    Writes ``student.pt`` (served as ``<student>+head:results/<run>/student.pt``),
    ``distil_candidates.csv`` (every candidate, select slice), ``distil.csv`` (student, teacher,
    the student network frozen and with its own head, on the queries; with ``cost_images``, also
    milliseconds per photo, measured for the four in one run) and ``distil_metrics.json``.
    Returns the result and that table.
    """
    prepared = load_prepared(run_name)
    out = run_dir(run_name)
    seed = prepared.split_seed
    defaults = default_config(k, seed)
    cfg = DistilConfig(finetune=defaults.finetune, relational=defaults.relational,
                       weights=tuple(float(w) for w in relational_weights), trainable_blocks=defaults.trainable_blocks)
    result = distil_student(prepared, teacher, student, cfg, teacher_finetune=teacher_finetune, k=k, metric=metric,
                            settings=InferenceSettings(progress=progress))
    record = result.record
    model_file = out / "student.pt"
    shutil.copyfile(result.model_path, model_file)
    reference = model_file.relative_to(config.PROJECT_ROOT) if model_file.is_relative_to(config.PROJECT_ROOT) \
        else model_file
    served = f"{student}{HEAD_SEPARATOR}{reference}"
    pd.DataFrame(record["choices"]["candidates"]).to_csv(out / "distil_candidates.csv", index=False,
                                                         float_format="%.6f")
    head, frozen = record["references"]["head"], record["references"]["frozen"]
    rows = [{"model": f"{student} (frozen)", "precision_at_k": frozen["precision_at_k"],
             "precision_at_k_low": frozen["precision_at_k_ci"][0], "precision_at_k_high": frozen["precision_at_k_ci"][1],
             "category_accuracy": None}]
    for name, row in ((f"{student} + head (--finetune)", head), (f"teacher: {record['teacher']['name']}",
                                                                  record["teacher"]),
                      (f"student: {student} distilled", record)):
        rows.append({"model": name, "precision_at_k": row["precision_at_k"],
                     "precision_at_k_low": row["precision_at_k_ci"][0],
                     "precision_at_k_high": row["precision_at_k_ci"][1], "category_accuracy": row["category_accuracy"]})
    table = pd.DataFrame(rows)
    if cost_images:
        names = [student, head["backbone"], record["teacher"]["name"], record["backbone"]]
        cost = measure_embedding_cost(prepared, {name: get_backbone(name) for name in dict.fromkeys(names)},
                                      n_images=cost_images, settings=InferenceSettings(progress=False))
        per_image = dict(zip(cost["model"], cost["seconds_per_image"]))
        table["ms_per_image"] = [round(1000 * per_image[name], 3) for name in names]
        table.attrs.update(cost.attrs)
    table.to_csv(out / "distil.csv", index=False, float_format="%.6f")
    write_json(out / "distil_metrics.json", {
        "served_name": served, "teacher": record["teacher"]["name"], "student": student,
        "losses": record["losses"], "choices": record["choices"],
        "query": {key: record[key] for key in ("precision_at_k", "precision_at_k_ci", "category_accuracy",
                                               "category_accuracy_ci", "precision_at_k_gains")}})
    return result, table


def _feature_set_backbones(result: SearchedEvaluation) -> dict:
    """Every retrieval feature set the search compared, as eager combinations of its members (for their cost)."""
    return {name: combined_backbone(name, result.bases.__getitem__)
            for name in result.outcome["feature_sets"]["retrieval"]}


def _stored_dims(candidates: pd.DataFrame) -> dict:
    """The dimension of a feature set's vectors as stored without a head (the head's output is 128-d or so)."""
    frozen = candidates[candidates["loss"] == NO_HEAD]
    return {row.features: int(row.dim) for row in frozen.drop_duplicates("features").itertuples(index=False)}


def stage_recommender(run_name: str, backbone: str, index: str = "Flat", dataset: str = "fashion-mnist",
                      data_dir=None, split_seed: int = config.DEFAULT_SEED, max_per_class: int | None = None,
                      category_map=None, settings: InferenceSettings = InferenceSettings(), columns=None,
                      image_root=None) -> Recommender:
    """An index folder of the run's whole catalog (``results/<run>/index/...``), built now and loaded.

    The catalog is the one 00-prepare-data wrote for this run; a run without it loads
    ``dataset`` with these parameters. Embeddings come from the cache, so a rebuild is quick.
    """
    out = run_dir(run_name)
    if (out / "catalog.parquet").exists():
        prepared = load_prepared(run_name)
    else:
        prepared = prepare(dataset, data_dir, split_seed=split_seed, max_per_class=max_per_class,
                           category_map=category_map, progress=settings.progress, columns=parse_columns(columns),
                           image_root=image_root)
    folder = out / "index" / "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{backbone}-{index}")
    return Recommender.build(folder, prepared.catalog.drop(columns=["split"]), backbone, index=index,
                             settings=settings, root=prepared.root, skipped=prepared.skipped, seed=prepared.split_seed,
                             dataset={**prepared.describe(), "name": prepared.dataset, "split": "all"})
