"""A catalog ready for the protocol of record: loaded, validated (every image decoded) and split (seeded).

Both towers stand on it: the experiments evaluate its query split against its gallery, and an
index folder built with ``--split gallery`` records the dataset and split seed, so that its
query split of record can be found again (``evaluate --index-dir ... --queries split``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .. import config
from ..errors import FashionRecError
from .catalog import load_dataset
from .ledger import count_by_stage, skipped_entry
from .split import SPLIT_FRACTIONS, SPLITS, split_catalog

_NOT_ATTRIBUTES = frozenset({"id", "path", "label", "split", "digest"})


@dataclass
class PreparedData:
    """A loaded, validated and split catalog, with the ledger of every file left out.

    ``catalog`` holds the images used (each in one split); ``skipped`` every file left out,
    at any stage up to the split (:mod:`fashionrec.data.ledger`); ``n_not_sampled`` the
    images that ``max_per_class`` did not sample (Fashion-MNIST: never decoded; others: usable).
    """

    dataset: str
    root: Path
    catalog: pd.DataFrame  # id, path, label, split
    split_seed: int
    skipped: list[dict] = field(default_factory=list)
    too_small: list[dict] = field(default_factory=list)
    max_per_class: int | None = None
    category_map: str | None = None
    n_not_sampled: int = 0

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
            "n_skipped_by_stage": count_by_stage(self.skipped),
            "n_not_sampled": self.n_not_sampled,
            "skipped_categories": self.too_small,
        }

    def attribute_columns(self) -> list[str]:
        """Columns a relevance may name: ``label`` and the catalog's own attribute columns (colour, ...)."""
        return ["label", *[column for column in self.catalog.columns if column not in _NOT_ATTRIBUTES]]

    def check_relevance(self, relevance) -> tuple[str, ...]:
        """The relevance columns as a tuple; FashionRecError naming an unknown one and those available."""
        columns = tuple(relevance)
        if not columns:
            raise FashionRecError("--relevance needs at least one column, e.g. label or label,colour")
        available = self.attribute_columns()
        for column in columns:
            if column not in available:
                raise FashionRecError(f"--relevance: column {column!r} is not in the catalog ({self.dataset} at "
                                      f"{self.root}); available: {', '.join(available)} (attribute columns come "
                                      "from a catalog table's other columns: --catalog FILE)")
        return columns

    def check_k(self, k: int) -> None:
        """Raises FashionRecError when ``k`` exceeds the gallery, so it is said before any embedding."""
        n_gallery = int((self.catalog["split"] == "gallery").sum())
        if k < 1 or k > n_gallery:
            raise FashionRecError(f"k={k} does not fit this catalog: its gallery split holds {n_gallery} images "
                                  f"(20% of each category of {len(self.catalog)} images); use a k between 1 and "
                                  f"{n_gallery}, or a larger catalog")


def prepare(dataset: str, data_dir=None, split_seed: int = config.DEFAULT_SEED, max_per_class: int | None = None,
            category_map=None, progress: bool = True, columns=None, image_root=None) -> PreparedData:
    """Loads and validates a named dataset (every image decoded in full), then splits it (seeded).

    The images of a category too small to fill train, gallery and query enter the ledger
    with stage ``split``. ``columns``, ``image_root``: a catalog table's own columns and image
    folder (:func:`fashionrec.data.catalog.load_catalog_csv`).
    """
    loaded = load_dataset(dataset, data_dir, max_per_class=max_per_class, seed=split_seed,
                          category_map=category_map, progress=progress, columns=columns, image_root=image_root)
    catalog, too_small = split_catalog(loaded.catalog, seed=split_seed)
    left_out = {entry["label"]: entry for entry in too_small}
    split_skips = [skipped_entry(_relative(loaded.root, path), "split",
                                 f"category {label!r} has only {left_out[label]['n_images']} usable image(s): "
                                 "too few to fill train, gallery and query")
                   for path, label in zip(loaded.catalog["path"], loaded.catalog["label"]) if label in left_out]
    if catalog.empty:
        raise FashionRecError(f"{dataset} at {loaded.root}: no category has the 3 usable images it needs to fill "
                              f"train, gallery and query ({len(too_small)} categories, {len(loaded.catalog)} images)")
    return PreparedData(dataset, loaded.root, catalog, split_seed, loaded.skipped + split_skips, too_small,
                        max_per_class, str(category_map) if category_map and not isinstance(category_map, dict)
                        else None, loaded.n_not_sampled)


def _relative(root: Path, path: str) -> str:
    return str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else path
