"""The protocol of record: each query image ranks the gallery; same category = relevant.

``relevance`` may name more columns of the catalog (``("label", "colour")``): a result is then
relevant only when every named column equals the query's, and the record keeps the category
precision beside it (``category_precision_at_k``). ``colour_weight`` fuses the network's
similarity with the product-colour similarity (:mod:`fashionrec.features.colour`).

Query and gallery come from the stratified split (seed recorded), both unseen by any
training. Every result carries what is needed to reproduce it: dataset and its
fingerprint, split seed, k, backbone and its weights checksum, index and its parameters.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.ledger import count_by_stage
from ..errors import FashionRecError
from ..ranking import metrics
from ..ranking.rank import CategoryBonus, ColourFusion, Ranking, gallery_store, rank
from ..settings import StoreSettings

N_BOOTSTRAP = 1000
# The keys of an evaluation record (:meth:`Evaluation.to_record`); raised when a key changes meaning or goes.
RECORD_SCHEMA_VERSION = 1


@dataclass
class Evaluation:
    """Per-query metrics and the ranked lists they came from."""

    protocol: dict
    per_query: dict[str, np.ndarray]
    queries: pd.DataFrame
    gallery: pd.DataFrame
    result_positions: np.ndarray  # (n_queries, k) row positions into ``gallery``
    result_scores: np.ndarray
    summary: dict = field(default_factory=dict)
    relevance: tuple[str, ...] = ("label",)
    category_precision: np.ndarray | None = None   # per query, same-category relevance (= precision_at_k for label)
    relevance_missing: dict | None = None           # rows lacking a value in a relevance column (attributes only)

    def sample_queries(self, n: int, seed: int = 0) -> np.ndarray:
        """Positions of ``n`` queries chosen reproducibly, for grids of examples."""
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(len(self.queries), size=min(n, len(self.queries)), replace=False))

    def record(self, bootstrap_seed: int = 0, n_boot: int = N_BOOTSTRAP, measured: dict | None = None,
               skipped: list | None = None, versions: dict | None = None) -> "EvaluationRecord":
        """The record of this evaluation: ``measured`` says what was measured (dataset, backbone, index,
        folder...) beside the protocol; ``skipped`` lists the files left out; ``versions`` the software."""
        intervals = metrics.bootstrap_cis(self.per_query, n_boot=n_boot, seed=bootstrap_seed)
        category_precision = category_precision_ci = None
        if self.category_precision is not None:
            # Same seed, so the same resampled queries as the intervals above.
            low, high = metrics.bootstrap_ci(self.category_precision, n_boot=n_boot, seed=bootstrap_seed)
            category_precision = round(float(np.mean(self.category_precision)), 6)
            category_precision_ci = [round(float(low), 6), round(float(high), 6)]
        table = metrics.per_category(self.per_query, self.queries["label"].to_numpy())
        return EvaluationRecord(
            measured={**(measured or {}), **self.protocol}, means=_rounded(self.summary),
            intervals={name: [round(float(low), 6), round(float(high), 6)] for name, (low, high) in intervals.items()},
            relevance=list(self.relevance), relevance_missing=self.relevance_missing,
            category_precision_at_k=category_precision, category_precision_at_k_ci=category_precision_ci,
            bootstrap={"n_boot": n_boot, "seed": bootstrap_seed, "level": 0.95, "resampled": "queries"},
            per_category={category: {**_rounded(row.drop("support").to_dict()), "support": int(row["support"])}
                          for category, row in table.iterrows()},
            skipped=skipped, versions=versions)

    def to_record(self, bootstrap_seed: int = 0, n_boot: int = N_BOOTSTRAP) -> dict:
        """One flat, JSON-ready row: protocol, means, 95% intervals, per-category table."""
        return self.record(bootstrap_seed, n_boot).to_dict()


@dataclass
class EvaluationRecord:
    """What ``evaluate --json`` prints and metrics files keep, written (:meth:`to_dict`) and read
    (:meth:`from_dict`, :meth:`read`) here only.

    The JSON is flat: ``schema_version``, what was measured, each mean (``precision_at_k``...),
    its 95% interval (``<mean>_ci``), ``relevance``, the category precision where relevance
    names more than the category, ``bootstrap``, ``per_category``, and, where the files left
    out are known, ``n_skipped``, ``n_skipped_by_stage``, ``skipped``, then ``versions``. A record
    of a newer version than this code reads is refused with one line naming both.
    """

    measured: dict                  # dataset, split seed, k, backbone, index, store, policy, ... (keys as they are)
    means: dict                     # metric name -> mean over the queries
    intervals: dict                 # metric name -> [low, high], the bootstrap 95% interval
    relevance: list
    bootstrap: dict
    per_category: dict = field(default_factory=dict)
    relevance_missing: dict | None = None
    category_precision_at_k: float | None = None
    category_precision_at_k_ci: list | None = None
    skipped: list | None = None     # files left out (None: not part of this record)
    versions: dict | None = None
    schema_version: int = RECORD_SCHEMA_VERSION

    def to_dict(self) -> dict:
        record = {"schema_version": RECORD_SCHEMA_VERSION, **self.measured, **self.means}
        record.update({f"{name}_ci": list(interval) for name, interval in self.intervals.items()})
        record["relevance"] = list(self.relevance)
        if self.relevance_missing is not None:
            record["relevance_missing"] = self.relevance_missing
        if self.category_precision_at_k is not None:
            record["category_precision_at_k"] = self.category_precision_at_k
            record["category_precision_at_k_ci"] = self.category_precision_at_k_ci
        record["bootstrap"] = self.bootstrap
        record["per_category"] = self.per_category
        if self.skipped is not None:
            record.update(n_skipped=len(self.skipped), n_skipped_by_stage=count_by_stage(self.skipped),
                          skipped=self.skipped)
        if self.versions is not None:
            record["versions"] = self.versions
        return record

    @classmethod
    def from_dict(cls, record: dict, where: str) -> "EvaluationRecord":
        """A record from its JSON; FashionRecError naming ``where`` for a newer version or a record without means."""
        version = int(record.get("schema_version", 1))
        if version > RECORD_SCHEMA_VERSION:
            raise FashionRecError(f"{where}: evaluation record schema version {version}; this fashionrec reads "
                                  f"versions up to {RECORD_SCHEMA_VERSION}: upgrade fashionrec or evaluate again")
        if "bootstrap" not in record or "relevance" not in record:
            raise FashionRecError(f"{where}: not an evaluation record (no bootstrap or relevance)")
        names = [key[:-len("_ci")] for key in record if key.endswith("_ci") and key[:-len("_ci")] in record
                 and key != "category_precision_at_k_ci"]
        own = {"schema_version", "relevance", "relevance_missing", "category_precision_at_k",
               "category_precision_at_k_ci", "bootstrap", "per_category", "n_skipped", "n_skipped_by_stage",
               "skipped", "versions", *names, *(f"{name}_ci" for name in names)}
        return cls(measured={key: value for key, value in record.items() if key not in own},
                   means={name: record[name] for name in names},
                   intervals={name: list(record[f"{name}_ci"]) for name in names},
                   relevance=list(record["relevance"]), bootstrap=record["bootstrap"],
                   per_category=record.get("per_category", {}), relevance_missing=record.get("relevance_missing"),
                   category_precision_at_k=record.get("category_precision_at_k"),
                   category_precision_at_k_ci=record.get("category_precision_at_k_ci"),
                   skipped=record.get("skipped"), versions=record.get("versions"), schema_version=version)

    @classmethod
    def read(cls, path) -> "EvaluationRecord":
        """A record saved from ``evaluate --json`` (or one entry of a metrics file, as a JSON object)."""
        path = Path(path)
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise FashionRecError(f"{path}: unreadable ({error})") from None
        if not isinstance(record, dict):
            raise FashionRecError(f"{path}: not an evaluation record (a JSON object)")
        return cls.from_dict(record, str(path))


def _rounded(values: dict) -> dict:
    # Six decimals: far below any difference a bootstrap interval can resolve, and stable
    # across BLAS builds so metrics files compare byte for byte.
    return {name: round(float(value), 6) for name, value in values.items()}


def evaluate_embeddings(vectors: np.ndarray, metadata: pd.DataFrame, k: int = 10, index: str = "Flat",
                        metric: str = "cosine", search_params: str = "", seed: int = 0,
                        query_split: str = "query", gallery_split: str = "gallery",
                        store: StoreSettings = StoreSettings(), categories: np.ndarray | None = None,
                        boost: float = 0.0, categories_source: str = "predicted",
                        relevance: tuple[str, ...] | list[str] = ("label",), colour_vectors: np.ndarray | None = None,
                        colour_weight: float = 0.0) -> Evaluation:
    """Ranks the gallery for every query and scores the top ``k`` by category match.

    The gallery goes into a throwaway store of the kind ``store`` names (faiss in this process by
    default, or a Milvus collection dropped afterwards), row i = gallery row i, and is ranked by
    :func:`fashionrec.ranking.rank.rank`, the ranking a served index folder runs; the protocol
    record says which store ranked it.

    With ``categories`` (one per ``metadata`` row, e.g. a classifier's predictions) and a
    non-zero ``boost``, gallery items of the query's category get that score bonus
    (:class:`fashionrec.ranking.rank.CategoryBonus`, ``categories_source`` saying whether
    they are ``predicted`` or ``known``; ``inf``: that category first).
    Relevance is the true ``label`` by default; ``relevance`` names the metadata columns that must
    all equal the query's (a row missing any of them is never relevant, see
    :func:`fashionrec.ranking.metrics.attribute_keys`; the record counts them).

    ``colour_weight`` w > 0 (needs ``colour_vectors``, one product-colour descriptor per
    ``metadata`` row, and the cosine metric) ranks by (1 - w) x network cosine + w x colour cosine
    (:class:`fashionrec.ranking.rank.ColourFusion`): exactly for ``Flat``, and for an
    approximate index by re-ranking its nearest candidates. w = 0 is the plain ranking.
    """
    split = metadata["split"].to_numpy()
    query_rows = np.flatnonzero(split == query_split)
    gallery_rows = np.flatnonzero(split == gallery_split)
    if len(query_rows) == 0 or len(gallery_rows) == 0:
        raise ValueError(f"need both {query_split!r} and {gallery_split!r} rows; got {len(query_rows)} and {len(gallery_rows)}")
    if k > len(gallery_rows):
        raise ValueError(f"k={k} exceeds the gallery size {len(gallery_rows)}")
    queries = metadata.iloc[query_rows].reset_index(drop=True)
    gallery = metadata.iloc[gallery_rows].reset_index(drop=True)
    relevance = tuple(relevance)
    unknown = [column for column in relevance if column not in metadata.columns]
    if unknown:
        raise ValueError(f"relevance column(s) {unknown} not in the metadata (columns: {list(metadata.columns)})")
    ranked = bool(boost) and categories is not None
    fused = colour_weight > 0
    if fused:
        if colour_vectors is None or len(colour_vectors) != len(metadata):
            raise ValueError("colour_weight > 0 needs one colour descriptor per metadata row")
        if metric != "cosine":
            raise ValueError(f"colour fusion adds cosine similarities; use metric 'cosine', not {metric!r}")
    categories = np.asarray(categories).astype(str) if ranked else None
    ranking = Ranking(bonus=CategoryBonus(float(boost), categories[gallery_rows], categories_source) if ranked else None,
                      fusion=ColourFusion(float(colour_weight), colour_vectors[gallery_rows]) if fused else None)
    with gallery_store(store, vectors[gallery_rows], gallery["label"].astype(str), index, metric, search_params,
                       seed) as searched:
        scores, positions = rank(searched, vectors[query_rows], k, ranking,
                                 query_categories=categories[query_rows] if ranked else None,
                                 query_colour=colour_vectors[query_rows] if fused else None)
        built = searched.describe().get("factory")
        exhaustive = searched.exhaustive

    query_labels = queries["label"].to_numpy()
    gallery_labels = gallery["label"].to_numpy()
    same_category = metrics.relevance_of_ranked(query_labels, gallery_labels, positions)
    missing = None
    if relevance == ("label",):
        matches = same_category
        n_relevant = metrics.n_relevant_from_labels(query_labels, gallery_labels)
    else:
        query_keys, gallery_keys = metrics.attribute_keys(queries, gallery, relevance)
        result_keys = np.where(positions >= 0, gallery_keys[np.clip(positions, 0, None)], -2)
        matches = metrics.relevance_from_keys(query_keys, result_keys)
        n_relevant = metrics.n_relevant_from_keys(query_keys, gallery_keys)
        missing = {"queries": int((query_keys < 0).sum()), "gallery": int((gallery_keys < 0).sum()),
                   "rule": "a row missing a value in any relevance column is never relevant (such a query scores 0)"}
    per_query = metrics.retrieval_metrics(matches, n_relevant, k)
    category_precision = metrics.precision_at_k(same_category, k)
    protocol = {
        "k": k,
        "store": store.store,
        "index": index,
        # A template ("IVF{nlist},Flat") becomes a factory for the gallery's size: say which.
        **({"index_resolved": built} if built and built != index else {}),
        "metric": metric,
        "search_params": search_params,
        "n_queries": int(len(queries)),
        "n_gallery": int(len(gallery)),
        "n_categories": int(len(np.unique(query_labels))),
        **({"category_ranking": ranking.bonus.describe()} if ranked else {}),
        **(ranking.fusion.describe(exhaustive, ranking.fusion.candidates(k, len(gallery))) if fused else {}),
    }
    return Evaluation(protocol, per_query, queries, gallery, positions, scores, metrics.summarize(per_query),
                      relevance, category_precision, missing)
