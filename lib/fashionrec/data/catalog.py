"""Named dataset loaders that all return the same catalog table.

Every loader returns a :class:`LoadedDataset`: ``catalog`` has one row per usable image with
columns ``id`` (unique string), ``path`` (absolute) and ``label``; ``skipped`` lists every
file or row that was left out, with the path relative to the dataset root and a specific
reason. Bad input never stops a load; only a missing dataset does.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .. import config
from ..console import progress_bar
from ..errors import DatasetError, ImageError
from .fetch import FASHION_MNIST_FILES, clothing_dirs, fetch_fashion_mnist, locate_clothing, locate_fashion_mnist
from .images import probe_image
from .split import subsample

CATALOG_COLUMNS = ["id", "path", "label"]
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"})
# Labels in the clothing photos that name no category of clothing.
CLOTHING_NON_CATEGORIES = frozenset({"Not sure", "Skip", "Other"})
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass
class LoadedDataset:
    name: str
    root: Path
    catalog: pd.DataFrame
    skipped: list[dict] = field(default_factory=list)

    def counts(self) -> pd.Series:
        return self.catalog["label"].value_counts().sort_index()


def _skip(skipped: list[dict], root: Path, path, reason: str) -> None:
    skipped.append({"path": _relative(root, path), "reason": reason})


def _relative(root: Path, path) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return str(path)


def _keep_readable_images(rows: pd.DataFrame, root: Path, skipped: list[dict], progress: bool) -> pd.DataFrame:
    """Drops rows whose file fails the header check (missing, not an image, bomb...)."""
    keep = []
    for path in progress_bar(rows["path"], desc="checking images", progress=progress, leave=False):
        try:
            probe_image(path)
            keep.append(True)
        except ImageError as error:
            _skip(skipped, root, path, error.reason)
            keep.append(False)
    return rows[np.array(keep, dtype=bool)].reset_index(drop=True)


def _drop_duplicate_ids(rows: pd.DataFrame, root: Path, skipped: list[dict]) -> pd.DataFrame:
    duplicated = rows["id"].duplicated(keep="first")
    for _, row in rows[duplicated].iterrows():
        _skip(skipped, root, row["path"], f"duplicate id {row['id']!r} (first occurrence kept)")
    return rows[~duplicated].reset_index(drop=True)


def _drop_missing_labels(rows: pd.DataFrame, root: Path, skipped: list[dict]) -> pd.DataFrame:
    labels = rows["label"].astype("string").str.strip()
    missing = labels.isna() | (labels == "")
    for path in rows.loc[missing, "path"]:
        _skip(skipped, root, path, "missing label")
    rows = rows.assign(label=labels)
    return rows[~missing].reset_index(drop=True)


def _finish(name: str, root: Path, rows: pd.DataFrame, skipped: list[dict], progress: bool) -> LoadedDataset:
    rows = _drop_missing_labels(rows, root, skipped)
    rows = _drop_duplicate_ids(rows, root, skipped)
    rows = _keep_readable_images(rows, root, skipped, progress)
    rows["label"] = rows["label"].astype(str)
    rows["id"] = rows["id"].astype(str)
    return LoadedDataset(name, root, rows[CATALOG_COLUMNS].reset_index(drop=True), skipped)


# --- fashion-mnist -------------------------------------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as stream:
        data = stream.read()
    # IDX header: two zero bytes, a dtype code, the number of dimensions, then big-endian sizes.
    n_dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(n_dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * n_dims).reshape(shape)


def _find_fashion_mnist(data_dir: Path | None, progress: bool) -> Path:
    if data_dir is None:
        return locate_fashion_mnist() or fetch_fashion_mnist(progress)
    missing = [name for name in FASHION_MNIST_FILES if not (data_dir / name).is_file()]
    if missing:
        raise DatasetError(f"{data_dir}: not a Fashion-MNIST directory (missing {', '.join(missing)})")
    return data_dir


def load_fashion_mnist(data_dir=None, max_per_class: int | None = None, seed: int = config.DEFAULT_SEED,
                       progress: bool = True) -> LoadedDataset:
    """The 70,000 Fashion-MNIST articles (train and test files together: the split is ours).

    Images are written once as PNG files under ``data/interim/fashion-mnist`` so that every
    backbone reads the same files through the same decoding path as any photo catalog;
    only the sampled rows are written.
    """
    source = _find_fashion_mnist(Path(data_dir) if data_dir else None, progress)
    images, labels, ids = [], [], []
    for part, prefix in (("train", "train"), ("test", "t10k")):
        part_images = _read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
        part_labels = _read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
        images.append(part_images)
        labels.append(part_labels)
        ids.extend(f"{part}-{i:05d}" for i in range(len(part_labels)))
    images = np.concatenate(images)
    rows = pd.DataFrame({
        "id": ids,
        "label": [FASHION_MNIST_CLASSES[i] for i in np.concatenate(labels)],
        "row": np.arange(len(ids)),
    })
    rows = subsample(rows, max_per_class, seed)
    out_dir = config.INTERIM_DIR / "fashion-mnist" / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    from PIL import Image

    for item_id, row in progress_bar(zip(rows["id"], rows["row"]), total=len(rows), desc="writing fashion-mnist PNGs",
                             progress=progress, leave=False):
        path = out_dir / f"{item_id}.png"
        if not path.exists():
            tmp = path.with_suffix(".tmp.png")
            Image.fromarray(images[row], mode="L").save(tmp)
            os.replace(tmp, path)
        paths.append(str(path))
    rows = rows.assign(path=paths)
    return _finish("fashion-mnist", out_dir, rows, [], progress)


# --- clothing photos -----------------------------------------------------------------------

def find_clothing_dir(data_dir=None) -> Path:
    if data_dir is not None:
        if not (Path(data_dir) / "images.csv").is_file():
            raise DatasetError(f"{data_dir}: not the clothing dataset (no images.csv there)")
        return Path(data_dir)
    found = locate_clothing()
    if found is None:
        raise DatasetError(f"clothing dataset not found (no images.csv in: {', '.join(map(str, clothing_dirs()))}); "
                           "run `make data` or pass --data-dir")
    return found


def load_clothing(data_dir=None, progress: bool = True) -> LoadedDataset:
    """The clothing photos: ``images.csv`` (image, sender_id, label, kids) + ``images/<image>.jpg``."""
    root = find_clothing_dir(data_dir)
    table = pd.read_csv(root / "images.csv", dtype=str)
    missing_columns = {"image", "label"} - set(table.columns)
    if missing_columns:
        raise DatasetError(f"{root / 'images.csv'}: missing columns {sorted(missing_columns)}")
    table = table[~table["label"].isin(CLOTHING_NON_CATEGORIES)]
    rows = pd.DataFrame({
        "id": table["image"].values,
        "path": [str(root / "images" / f"{image}.jpg") for image in table["image"]],
        "label": table["label"].values,
    })
    return _finish("clothing", root, rows, [], progress)


# --- user catalogs -------------------------------------------------------------------------

def load_folder(data_dir, progress: bool = True) -> LoadedDataset:
    """An ImageFolder-style tree: one sub-folder per category, images anywhere below it.

    Hidden files (``.DS_Store``, ``._*``) are ignored, as ImageFolder does; every other
    file is either a catalog item or reported as skipped.
    """
    root = _existing_dir(data_dir)
    records = []
    for category in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(category.rglob("*")):
            # A directory is reported only when its name poses as an image (``look.jpg/``).
            if path.name.startswith(".") or (path.is_dir() and path.suffix.lower() not in IMAGE_SUFFIXES):
                continue
            relative = path.relative_to(root).as_posix()
            records.append({"id": relative, "path": str(path), "label": category.name})
    rows = pd.DataFrame(records, columns=CATALOG_COLUMNS)
    return _finish("folder", root, rows, [], progress)


def load_catalog_csv(data_dir, progress: bool = True) -> LoadedDataset:
    """A directory holding ``catalog.csv`` with ``path,label`` (relative paths) and optional ``id``.

    ``data_dir`` may also name the CSV file itself; its paths are then relative to its folder.
    """
    if data_dir is not None and Path(data_dir).is_file():
        csv_path = Path(data_dir)
        root = csv_path.parent
    else:
        root = _existing_dir(data_dir)
        csv_path = root / "catalog.csv"
    if not csv_path.exists():
        raise DatasetError(f"{csv_path}: not found (a catalog directory needs catalog.csv with columns path,label)")
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, na_values=[""])
    missing_columns = {"path", "label"} - set(table.columns)
    if missing_columns:
        raise DatasetError(f"{csv_path}: missing columns {sorted(missing_columns)}")
    skipped: list[dict] = []
    no_path = table["path"].isna()
    for line in table.index[no_path]:
        skipped.append({"path": f"{csv_path.name} line {line + 2}", "reason": "missing path"})
    table = table[~no_path]
    ids = table["id"] if "id" in table.columns else table["path"]
    rows = pd.DataFrame({
        "id": ids.fillna(table["path"]).values,
        "path": [str(root / p) for p in table["path"]],
        "label": table["label"].values,
    })
    return _finish("catalog", root, rows, skipped, progress)


def _existing_dir(data_dir) -> Path:
    if data_dir is None:
        raise DatasetError("this dataset needs --data-dir")
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    return root


LOADERS: dict[str, Callable[..., LoadedDataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "clothing": load_clothing,
    "folder": load_folder,
    "catalog": load_catalog_csv,
}


def load_dataset(name: str, data_dir=None, max_per_class: int | None = None, seed: int = config.DEFAULT_SEED,
                 category_map: dict | str | Path | None = None, progress: bool = True) -> LoadedDataset:
    """Loads a named dataset, optionally remaps its categories and caps the images per category.

    ``category_map`` merges or renames categories (``{"Hoodie": "Tops"}``); a category
    mapped to ``None`` is dropped. It is applied before sampling and splitting, so every
    later step sees the mapped labels.
    """
    if name not in LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(LOADERS)}")
    if name == "fashion-mnist":
        loaded = load_fashion_mnist(data_dir, max_per_class=max_per_class, seed=seed, progress=progress)
    else:
        loaded = LOADERS[name](data_dir, progress=progress)
        loaded.catalog = subsample(loaded.catalog, max_per_class, seed)
    if category_map:
        loaded.catalog = apply_category_map(loaded.catalog, read_category_map(category_map))
    if loaded.catalog.empty:
        raise DatasetError(f"{name} at {loaded.root}: no usable images ({len(loaded.skipped)} skipped)")
    return loaded


def read_category_map(category_map: dict | str | Path) -> dict:
    if isinstance(category_map, dict):
        return category_map
    import yaml

    with open(category_map) as stream:
        mapping = yaml.safe_load(stream)
    if not isinstance(mapping, dict):
        raise DatasetError(f"{category_map}: a category map is a YAML mapping of old label -> new label")
    return mapping


def apply_category_map(catalog: pd.DataFrame, mapping: dict) -> pd.DataFrame:
    labels = catalog["label"].map(lambda label: mapping.get(label, label))
    keep = labels.notna()
    return catalog.assign(label=labels)[keep].reset_index(drop=True)


