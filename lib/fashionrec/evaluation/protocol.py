"""The protocol of record: each query image ranks the gallery; same category = relevant.

Query and gallery come from the stratified split (seed recorded), both unseen by any
training. Every result carries what is needed to reproduce it: dataset and its
fingerprint, split seed, k, backbone and its weights checksum, index and its parameters.
"""
from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import metrics
from ..indexing.backends import open_store
from ..indexing.category import category_aware_search
from ..settings import StoreSettings

N_BOOTSTRAP = 1000


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

    def sample_queries(self, n: int, seed: int = 0) -> np.ndarray:
        """Positions of ``n`` queries chosen reproducibly, for grids of examples."""
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(len(self.queries), size=min(n, len(self.queries)), replace=False))

    def to_record(self, bootstrap_seed: int = 0, n_boot: int = N_BOOTSTRAP) -> dict:
        """One flat, JSON-ready row: protocol, means, 95% intervals, per-category table."""
        intervals = metrics.bootstrap_cis(self.per_query, n_boot=n_boot, seed=bootstrap_seed)
        record = {**self.protocol, **_rounded(self.summary)}
        for name, (low, high) in intervals.items():
            record[f"{name}_ci"] = [round(float(low), 6), round(float(high), 6)]
        record["bootstrap"] = {"n_boot": n_boot, "seed": bootstrap_seed, "level": 0.95, "resampled": "queries"}
        table = metrics.per_category(self.per_query, self.queries["label"].to_numpy())
        record["per_category"] = {
            category: {**_rounded(row.drop("support").to_dict()), "support": int(row["support"])}
            for category, row in table.iterrows()
        }
        return record


def _rounded(values: dict) -> dict:
    # Six decimals: far below any difference a bootstrap interval can resolve, and stable
    # across BLAS builds so metrics files compare byte for byte.
    return {name: round(float(value), 6) for name, value in values.items()}


def dataset_fingerprint(metadata: pd.DataFrame) -> str:
    """SHA-256 of (id, label, split, image digest) rows: same data and split, same fingerprint."""
    columns = [c for c in ("id", "label", "split", "digest") if c in metadata.columns]
    rows = metadata[columns].astype(str).sort_values("id")
    digest = hashlib.sha256()
    for row in rows.itertuples(index=False):
        digest.update(("\t".join(row) + "\n").encode())
    return digest.hexdigest()


def evaluate_embeddings(vectors: np.ndarray, metadata: pd.DataFrame, k: int = 10, index: str = "Flat",
                        metric: str = "cosine", search_params: str = "", seed: int = 0,
                        query_split: str = "query", gallery_split: str = "gallery",
                        store: StoreSettings = StoreSettings(), categories: np.ndarray | None = None,
                        boost: float = 0.0, categories_source: str = "predicted") -> Evaluation:
    """Ranks the gallery for every query and scores the top ``k`` by category match.

    The gallery goes into a throwaway vector store of the kind ``store`` names (faiss in this
    process by default, or a Milvus collection dropped afterwards), with gallery row positions
    as ids; the protocol record says which store ranked it.

    With ``categories`` (one per ``metadata`` row, e.g. a classifier's predictions) and a
    non-zero ``boost``, gallery items of the query's category get that score bonus
    (:func:`fashionrec.indexing.category.category_aware_search`; ``inf``: that category first).
    Relevance is always the true ``label``.
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
    ranked = bool(boost) and categories is not None
    stored_labels = np.asarray(categories).astype(str)[gallery_rows] if ranked else gallery["label"].astype(str)
    with open_store(store, metric, index, search_params, seed=seed, drop_on_close=True) as gallery_store:
        gallery_store.add(np.arange(len(gallery)), vectors[gallery_rows], list(stored_labels))
        if ranked:
            scores, positions = category_aware_search(
                gallery_store, vectors[query_rows], np.asarray(categories).astype(str)[query_rows],
                sorted(set(stored_labels)), k, boost, metric)
        else:
            scores, positions = gallery_store.search(vectors[query_rows], k)
    ranking = {"boost": "inf" if np.isinf(boost) else float(boost), "categories": categories_source} \
        if ranked else None

    query_labels = queries["label"].to_numpy()
    gallery_labels = gallery["label"].to_numpy()
    # An approximate index may return fewer than k hits (-1); they count as not relevant.
    result_labels = np.where(positions >= 0, gallery_labels[np.clip(positions, 0, None)], None)
    relevance = metrics.relevance_from_labels(query_labels, result_labels)
    n_relevant = metrics.n_relevant_from_labels(query_labels, gallery_labels)
    per_query = metrics.retrieval_metrics(relevance, n_relevant, k)
    protocol = {
        "k": k,
        "store": store.store,
        "index": index,
        "metric": metric,
        "search_params": search_params,
        "n_queries": int(len(queries)),
        "n_gallery": int(len(gallery)),
        "n_categories": int(len(np.unique(query_labels))),
        **({"category_ranking": ranking} if ranking else {}),
    }
    return Evaluation(protocol, per_query, queries, gallery, positions, scores, metrics.summarize(per_query))


def software_versions() -> dict:
    import faiss
    import PIL
    import sklearn
    import torch
    import torchvision

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "faiss": faiss.__version__,
        "scikit-learn": sklearn.__version__,
        "pillow": PIL.__version__,
    }
