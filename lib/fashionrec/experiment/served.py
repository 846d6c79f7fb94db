"""An index folder measured as it serves: every query photo through ``Recommender.recommend``, scored by the protocol.

    python -m fashionrec evaluate --index-dir indexes/clothing-gallery --queries split --k 10 --json

Each query photo is decoded and embedded afresh by the folder's own query model and ranked
by its own store and policies, exactly as a shopper's photo would be; the per-query metrics,
their 95% intervals and the per-category table are those of :mod:`fashionrec.evaluation.protocol`.

``queries``: a folder with one sub-folder per category, a CSV (``path,label[,attributes]``,
paths relative to it), or ``split``: the query split of record of the catalog a folder built
with ``--split gallery`` came from (its build.json names the dataset and the split seed).
A query photo whose content is also in the catalog (same digest) is excluded from its own
results, and the record counts those. Files that cannot be used are skipped and listed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.catalog import load_catalog_csv, load_folder
from ..data.images import file_digest
from ..data.ledger import skipped_entry
from ..data.prepared import prepare
from ..errors import FashionRecError, ImageError
from ..ranking import metrics
from ..evaluation.protocol import Evaluation
from ..provenance import dataset_fingerprint, software_versions
from ..serving.recommender import Recommender
from ..settings import InferenceSettings, StoreSettings

QUERY_SPLIT = "split"


@dataclass
class QueryPhotos:
    """The query photos (id, path, label[, attributes]), where they came from, and the files left out."""

    catalog: pd.DataFrame
    source: dict
    skipped: list[dict] = field(default_factory=list)


def load_queries(queries, dataset: dict, progress: bool = True) -> QueryPhotos:
    """The query photos ``queries`` names (a folder, a CSV or ``split``), every file checked as the loaders do."""
    if str(queries) == QUERY_SPLIT:
        if dataset.get("split") != "gallery" or not dataset.get("name"):
            raise FashionRecError(f"--queries split needs an index folder built with --split gallery; this one holds "
                                  f"split {dataset.get('split')!r} of {dataset.get('name')!r}: give --queries a "
                                  "folder or a CSV instead")
        prepared = prepare(dataset["name"], dataset.get("data_dir"), split_seed=dataset["split_seed"],
                           max_per_class=dataset.get("max_per_class"), category_map=dataset.get("category_map"),
                           progress=progress)
        rows = prepared.catalog[prepared.catalog["split"] == "query"].drop(columns=["split"]).reset_index(drop=True)
        return QueryPhotos(rows, {"queries": QUERY_SPLIT, "dataset": dataset["name"], "data_dir": str(prepared.root),
                                  "split_seed": dataset["split_seed"]}, list(prepared.skipped))
    path = Path(queries)
    if path.is_file():
        loaded = load_catalog_csv(path, progress=progress)
    elif path.is_dir():
        loaded = load_folder(path, progress=progress)
    else:
        raise FashionRecError(f"--queries {queries}: no such folder or CSV file (or `split` for the query split of "
                              "record of a folder built with --split gallery)")
    return QueryPhotos(loaded.catalog.reset_index(drop=True), {"queries": str(path.resolve())}, list(loaded.skipped))


def evaluate_index_folder(index_dir, queries, k: int = 10, relevance=("label",), category_boost: float | None = None,
                          gallery_categories: str | None = None, colour_weight: float = 0.0,
                          settings: InferenceSettings = InferenceSettings(), store: StoreSettings | None = None,
                          seed: int = 0) -> dict:
    """The metrics record of ``index_dir`` served to ``queries`` (the keys of ``evaluate --json``, plus the policy).

    ``category_boost`` / ``gallery_categories``: the category bonus to rank with (default: the
    folder's own, on known categories; see :meth:`Recommender.set_category_bonus`).
    ``colour_weight``: as in :meth:`Recommender.recommend`. ``seed``: the bootstrap's.
    """
    with Recommender.load(index_dir, settings, store=store) as recommender:
        if category_boost is not None or gallery_categories is not None:
            folder_boost = recommender.manifest.category_boost
            recommender.set_category_bonus(folder_boost if category_boost is None else category_boost,
                                           gallery_categories or "known")
        colour_weight = recommender.check_colour_weight(colour_weight)
        gallery = recommender.items
        if k > len(gallery):
            raise FashionRecError(f"k={k} exceeds the {len(gallery)} items of {index_dir}")
        photos = load_queries(queries, recommender.manifest.dataset, settings.progress)
        relevance = _checked_relevance(relevance, photos.catalog, gallery)
        ids_of_digest = gallery.groupby("digest")["id"].apply(list).to_dict()
        position_of = {item_id: row for row, item_id in enumerate(gallery["id"])}
        answered, positions, scores, own_copies = [], [], [], []
        skipped = list(photos.skipped)
        for query in photos.catalog.itertuples(index=False):
            try:
                copies = ids_of_digest.get(file_digest(query.path), [])
                answer = recommender.recommend(query.path, k=k, exclude_ids=copies, colour_weight=colour_weight)
            except (ImageError, OSError) as error:
                skipped.append(skipped_entry(query.path, "query", str(error).splitlines()[0]))
                continue
            answered.append(query._asdict())
            own_copies.append(copies)
            positions.append([position_of[result.id] for result in answer.results])
            scores.append([result.score for result in answer.results])
        policy = {"category_bonus": recommender.category_bonus,
                  "colour_weight": colour_weight, "exclude": "the query's own copies in the catalog (same digest)"}
        described = recommender.describe()
        built_from = recommender.manifest.dataset
    if not answered:
        raise FashionRecError(f"no query photo could be used ({len(skipped)} skipped); see the skipped files")
    queried = pd.DataFrame(answered)
    evaluation = _scored(queried, gallery, positions, scores, own_copies, k, relevance)
    measured = {
        "index_dir": str(Path(index_dir).resolve()), "version": described["version"],
        "backbone": described["backbone"], "runtime": described["runtime"], "store": described["store"],
        "index": described["index"], "search_params": described["search_params"], "metric": described["metric"],
        "built_from": built_from, **photos.source, "policy": policy,
        "n_own_copies_excluded": int(sum(1 for copies in own_copies if copies)),
        "dataset_fingerprint": dataset_fingerprint(queried.assign(split="query")),
    }
    return evaluation.record(seed, measured=measured, skipped=skipped, versions=software_versions()).to_dict()


def _checked_relevance(relevance, queries: pd.DataFrame, gallery: pd.DataFrame) -> tuple[str, ...]:
    columns = tuple(relevance)
    for column in columns:
        if column not in queries.columns or column not in gallery.columns:
            where = "the queries" if column not in queries.columns else "the index folder's items"
            raise FashionRecError(f"--relevance: column {column!r} is not in {where}")
    return columns


def _scored(queries: pd.DataFrame, gallery: pd.DataFrame, positions, scores, own_copies, k: int,
            relevance: tuple[str, ...]) -> Evaluation:
    """The protocol's per-query metrics of the served lists (a copy excluded from its query's list is not counted)."""
    found = np.full((len(queries), k), -1, dtype=np.int64)
    found_scores = np.full((len(queries), k), np.nan, dtype=np.float32)
    for i, (rows, values) in enumerate(zip(positions, scores)):
        found[i, :len(rows)], found_scores[i, :len(values)] = rows, values
    query_labels = queries["label"].astype(str).to_numpy()
    gallery_labels = gallery["label"].astype(str).to_numpy()
    label_of = dict(zip(gallery["id"], gallery_labels))
    same_category = metrics.relevance_of_ranked(query_labels, gallery_labels, found)
    excluded_same = np.array([sum(label_of[item_id] == label for item_id in copies)
                              for copies, label in zip(own_copies, query_labels)])
    missing = None
    if relevance == ("label",):
        matches = same_category
        n_relevant = metrics.n_relevant_from_labels(query_labels, gallery_labels) - excluded_same
    else:
        query_keys, gallery_keys = metrics.attribute_keys(queries, gallery, relevance)
        result_keys = np.where(found >= 0, gallery_keys[np.clip(found, 0, None)], -2)
        matches = metrics.relevance_from_keys(query_keys, result_keys)
        row_of = {item_id: row for row, item_id in enumerate(gallery["id"])}
        excluded_keys = [sum(gallery_keys[row_of[item_id]] == key for item_id in copies)
                         for copies, key in zip(own_copies, query_keys)]
        n_relevant = metrics.n_relevant_from_keys(query_keys, gallery_keys) - np.asarray(excluded_keys)
        missing = {"queries": int((query_keys < 0).sum()), "gallery": int((gallery_keys < 0).sum()),
                   "rule": "a row missing a value in any relevance column is never relevant (such a query scores 0)"}
    per_query = metrics.retrieval_metrics(matches, n_relevant, k)
    protocol = {"k": k, "n_queries": int(len(queries)), "n_gallery": int(len(gallery)),
                "n_categories": int(len(np.unique(query_labels)))}
    return Evaluation(protocol, per_query, queries, gallery, found, found_scores, metrics.summarize(per_query),
                      relevance, metrics.precision_at_k(same_category, k), missing)
