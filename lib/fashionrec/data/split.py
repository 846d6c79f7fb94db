"""The split of record: stratified train / gallery / query per category, seeded.

Each category is shuffled by its own generator seeded from (seed, category), so adding a
category never moves the images of the others.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from .. import config

SPLITS = ("train", "gallery", "query")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


def subsample(rows: pd.DataFrame, max_per_class: int | None, seed: int) -> pd.DataFrame:
    """At most ``max_per_class`` rows per label, chosen reproducibly, in the original order."""
    if not max_per_class:
        return rows.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted(rows["label"].unique()):
        positions = np.flatnonzero(rows["label"].to_numpy() == label)
        if len(positions) > max_per_class:
            positions = rng.choice(positions, size=max_per_class, replace=False)
        chosen.append(positions)
    return rows.iloc[np.sort(np.concatenate(chosen))].reset_index(drop=True)


def split_catalog(catalog: pd.DataFrame, seed: int = config.DEFAULT_SEED,
                  fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> tuple[pd.DataFrame, list[dict]]:
    """Stratified train/gallery/query split, the same for a given catalog and seed.

    Each category is shuffled by its own generator seeded from (seed, category), so that
    adding a category never changes the split of the others. A category needs at least
    one image per split; smaller ones are returned in the second value and left out.
    """
    if not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    split = np.empty(len(catalog), dtype=object)
    too_small = []
    labels = catalog["label"].to_numpy()
    for label in sorted(set(labels)):
        positions = np.flatnonzero(labels == label)
        if len(positions) < len(SPLITS):
            too_small.append({"label": label, "n_images": int(len(positions)),
                              "reason": f"fewer than {len(SPLITS)} images: cannot fill train, gallery and query"})
            continue
        label_seed = int.from_bytes(hashlib.sha256(f"{seed}:{label}".encode()).digest()[:8], "little")
        order = positions[np.random.default_rng(label_seed).permutation(len(positions))]
        n_gallery = max(1, round(fractions[1] * len(order)))
        n_query = max(1, round(fractions[2] * len(order)))
        n_train = len(order) - n_gallery - n_query
        if n_train < 1:
            n_gallery -= 1 if n_gallery > 1 else 0
            n_train = len(order) - n_gallery - n_query
        split[order[:n_train]] = "train"
        split[order[n_train:n_train + n_gallery]] = "gallery"
        split[order[n_train + n_gallery:]] = "query"
    result = catalog.assign(split=split)
    return result[result["split"].notna()].reset_index(drop=True), too_small


def split_counts(catalog: pd.DataFrame) -> pd.DataFrame:
    """Images per category and split, with totals: the table a run reports first."""
    table = pd.crosstab(catalog["label"], catalog["split"], margins=True, margins_name="total")
    return table.reindex(columns=[*SPLITS, "total"], fill_value=0)


def validation_split(labels, fraction: float = 0.15, seed: int = config.DEFAULT_SEED,
                     purpose: str = "val") -> tuple[np.ndarray, list[dict]]:
    """Boolean mask of a stratified validation part of the train rows, and the left-out categories.

    A category gets ``round(fraction * n)`` validation rows (at least one) only when it
    has at least 3 train rows, so at least two stay to train on; smaller categories are
    trained on entirely and listed. Each category is shuffled by its own generator seeded
    from (purpose, seed, category), as in :func:`split_catalog`; another ``purpose`` draws
    another slice (the model search's selection slice is ``"select"``).
    """
    labels = np.asarray(labels).astype(str)
    val = np.zeros(len(labels), dtype=bool)
    not_validated = []
    if fraction <= 0:
        return val, not_validated
    for label in sorted(set(labels)):
        positions = np.flatnonzero(labels == label)
        if len(positions) < 3:
            not_validated.append({"label": str(label), "n_train": int(len(positions)),
                                  "reason": "fewer than 3 train images: all used for training, none for validation"})
            continue
        label_seed = int.from_bytes(hashlib.sha256(f"{purpose}:{seed}:{label}".encode()).digest()[:8], "little")
        order = positions[np.random.default_rng(label_seed).permutation(len(positions))]
        n_val = min(len(order) - 2, max(1, round(fraction * len(order))))
        val[order[:n_val]] = True
    return val, not_validated
