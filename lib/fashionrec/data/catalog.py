"""Named dataset loaders that all return the same catalog table.

Every loader returns a :class:`LoadedDataset`: ``catalog`` has one row per usable image with
columns ``id`` (unique string), ``path`` (absolute) and ``label``; ``skipped`` is the ledger of
every file or row that was left out (:mod:`fashionrec.data.ledger`: path relative to the
dataset root, stage, specific reason). Bad input never stops a load; only a missing dataset,
an unreadable catalog file or a category map that names labels the catalog does not have do.

Every loader goes through the same steps, in this order: labels (missing ones, the category
map, labels that name no category), duplicate ids, then the files themselves, decoded in full
(:mod:`fashionrec.data.checks`, cached by content), and only then the ``max_per_class``
sample. So a file that cannot be used never takes a sample or split slot.
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
from ..errors import DatasetError, did_you_mean
from .checks import check_files
from .fetch import FASHION_MNIST_FILES, clothing_dirs, fetch_fashion_mnist, locate_clothing, locate_fashion_mnist
from .ledger import describe_counts, skipped_entry
from .split import subsample

CATALOG_COLUMNS = ["id", "path", "label"]
# Names the workbench itself gives catalog columns: an attribute column of a catalog may not take them.
RESERVED_COLUMNS = frozenset({*CATALOG_COLUMNS, "split", "digest", "deleted", "label_probability"})
# The roles --columns maps to a catalog's own columns (path and label required, id optional).
MAPPED_ROLES = ("path", "label", "id")
CATALOG_FILES = ("catalog.csv", "catalog.parquet")
TABLE_SUFFIXES = frozenset({".csv", ".parquet"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"})
# Labels in the clothing photos that name no category of clothing.
CLOTHING_NON_CATEGORIES = frozenset({"Not sure", "Skip", "Other"})
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
OUTSIDE_CATEGORY_FOLDER = "not inside a category sub-folder (--dataset folder reads <data-dir>/<category>/<image>)"


@dataclass
class LoadedDataset:
    name: str
    root: Path
    catalog: pd.DataFrame
    skipped: list[dict] = field(default_factory=list)
    n_not_sampled: int = 0   # images max_per_class left out (by design, so not in the ledger)

    def counts(self) -> pd.Series:
        return self.catalog["label"].value_counts().sort_index()


def _relative(root: Path, path) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return str(path)


def _leave_out(rows: pd.DataFrame, drop: np.ndarray, root: Path, skipped: list[dict], stage: str,
               reasons) -> pd.DataFrame:
    """Rows without the ``drop`` ones, each of those entered in the ledger with its reason."""
    drop = np.asarray(drop, dtype=bool)
    reasons = [reasons] * int(drop.sum()) if isinstance(reasons, str) else list(reasons)
    for path, reason in zip(rows.loc[drop, "path"], reasons):
        skipped.append(skipped_entry(_relative(root, path), stage, reason))
    return rows[~drop].reset_index(drop=True)


def _drop_missing_labels(rows: pd.DataFrame, root: Path, skipped: list[dict], unlabelled: bool = False) \
        -> pd.DataFrame:
    """Rows without a label go to the ledger, or (``unlabelled``) stay with label None."""
    labels = rows["label"].astype("string").str.strip()
    missing = (labels.isna() | (labels == "")).to_numpy(dtype=bool)
    if unlabelled:
        return rows.assign(label=[None if gone else str(label) for label, gone in zip(labels, missing)])
    return _leave_out(rows.assign(label=labels), missing, root, skipped, "label", "missing label")


def _apply_map(rows: pd.DataFrame, mapping: dict, source: str, root: Path, skipped: list[dict]) -> pd.DataFrame:
    check_category_map(mapping, rows["label"].unique(), source)
    labels = rows["label"].map(lambda label: mapping.get(label, label))
    dropped = labels.isna().to_numpy(dtype=bool)
    reasons = [f"category {label!r} dropped by the category map" for label in rows.loc[dropped, "label"]]
    return _leave_out(rows.assign(label=labels), dropped, root, skipped, "label", reasons)


def _drop_non_categories(rows: pd.DataFrame, non_categories, root: Path, skipped: list[dict]) -> pd.DataFrame:
    dropped = rows["label"].isin(non_categories).to_numpy(dtype=bool)
    reasons = [f"label {label!r} names no category" for label in rows.loc[dropped, "label"]]
    return _leave_out(rows, dropped, root, skipped, "label", reasons)


def _drop_duplicate_ids(rows: pd.DataFrame, root: Path, skipped: list[dict]) -> pd.DataFrame:
    duplicated = rows["id"].duplicated(keep="first").to_numpy(dtype=bool)
    reasons = [f"duplicate id {item_id!r} (first occurrence kept)" for item_id in rows.loc[duplicated, "id"]]
    return _leave_out(rows, duplicated, root, skipped, "duplicate", reasons)


def _keep_usable_images(rows: pd.DataFrame, root: Path, skipped: list[dict], progress: bool) -> pd.DataFrame:
    """Drops rows whose file is missing, refused from its header or not decodable in full."""
    verdicts = check_files(rows["path"], progress=progress)
    unusable = np.array([verdict is not None for verdict in verdicts], dtype=bool)
    for path, verdict in zip(rows.loc[unusable, "path"], [v for v in verdicts if v is not None]):
        skipped.append(skipped_entry(_relative(root, path), *verdict))
    return rows[~unusable].reset_index(drop=True)


def _finish(name: str, root: Path, rows: pd.DataFrame, skipped: list[dict], progress: bool,
            category_map: dict | None = None, category_map_source: str = "category map",
            non_categories=frozenset(), max_per_class: int | None = None, seed: int = config.DEFAULT_SEED,
            materialise: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
            unlabelled: bool = False) -> LoadedDataset:
    """The steps every loader shares (see the module docstring); ``materialise`` writes the
    image files of the rows it is given (Fashion-MNIST writes only the sampled ones);
    ``unlabelled`` keeps rows without a label (label None)."""
    rows = _drop_missing_labels(rows, root, skipped, unlabelled)
    if category_map:
        rows = _apply_map(rows, category_map, category_map_source, root, skipped)
    rows = _drop_non_categories(rows, non_categories, root, skipped)
    rows = _drop_duplicate_ids(rows, root, skipped)
    n_not_sampled = 0
    if materialise is not None:
        sampled = subsample(rows, max_per_class, seed)
        n_not_sampled = len(rows) - len(sampled)
        rows = materialise(sampled)
    rows = _keep_usable_images(rows, root, skipped, progress)
    capped = subsample(rows, max_per_class, seed)
    n_not_sampled += len(rows) - len(capped)
    rows = capped.copy()
    rows["label"] = [None if label is None else str(label) for label in rows["label"]]
    rows["id"] = rows["id"].astype(str)
    attributes = [column for column in rows.columns if column not in CATALOG_COLUMNS]
    return LoadedDataset(name, root, rows[CATALOG_COLUMNS + attributes].reset_index(drop=True), skipped, n_not_sampled)


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
                       progress: bool = True, category_map: dict | None = None,
                       category_map_source: str = "category map") -> LoadedDataset:
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
    out_dir = config.INTERIM_DIR / "fashion-mnist" / "images"
    rows = pd.DataFrame({
        "id": ids,
        "path": [str(out_dir / f"{item_id}.png") for item_id in ids],
        "label": [FASHION_MNIST_CLASSES[i] for i in np.concatenate(labels)],
    })

    def write_pngs(sampled: pd.DataFrame) -> pd.DataFrame:
        from PIL import Image

        out_dir.mkdir(parents=True, exist_ok=True)
        for item_id, path in progress_bar(zip(sampled["id"], sampled["path"]), total=len(sampled),
                                          desc="writing fashion-mnist PNGs", progress=progress, leave=False):
            if not os.path.exists(path):
                tmp = f"{path[:-len('.png')]}.tmp.png"
                Image.fromarray(images[_fashion_mnist_row(item_id)], mode="L").save(tmp)
                os.replace(tmp, path)
        return sampled

    return _finish("fashion-mnist", out_dir, rows, [], progress, category_map, category_map_source,
                   max_per_class=max_per_class, seed=seed, materialise=write_pngs)


def _fashion_mnist_row(item_id: str) -> int:
    """Row of the concatenated train + test arrays: ``train-00005`` -> 5, ``test-00005`` -> 60005."""
    part, number = item_id.split("-")
    return int(number) + (60000 if part == "test" else 0)


# --- clothing photos -----------------------------------------------------------------------

def find_clothing_dir(data_dir=None) -> Path:
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise DatasetError(f"{data_dir}: no such directory (--data-dir should be the clothing dataset, "
                               "the folder holding images.csv and images/)")
        if not (Path(data_dir) / "images.csv").is_file():
            raise DatasetError(f"{data_dir}: not the clothing dataset (no images.csv there)")
        return Path(data_dir)
    found = locate_clothing()
    if found is None:
        raise DatasetError(f"clothing dataset not found (no images.csv in: {', '.join(map(str, clothing_dirs()))}); "
                           "run `make data` or pass --data-dir")
    return found


def load_clothing(data_dir=None, progress: bool = True, category_map: dict | None = None,
                  category_map_source: str = "category map", max_per_class: int | None = None,
                  seed: int = config.DEFAULT_SEED) -> LoadedDataset:
    """The clothing photos: ``images.csv`` (image, sender_id, label, kids) + ``images/<image>.jpg``.

    Rows labelled ``Not sure``, ``Skip`` or ``Other`` name no category and are left out (after
    the category map, which may rename them); so are files in ``images/`` without a row.
    """
    root = find_clothing_dir(data_dir)
    table = pd.read_csv(root / "images.csv", dtype=str)
    missing_columns = {"image", "label"} - set(table.columns)
    if missing_columns:
        raise DatasetError(f"{root / 'images.csv'}: missing columns {sorted(missing_columns)}")
    rows = pd.DataFrame({
        "id": table["image"].values,
        "path": [str(root / "images" / f"{image}.jpg") for image in table["image"]],
        "label": table["label"].values,
    })
    listed = set(rows["path"])
    on_disk = sorted((root / "images").iterdir()) if (root / "images").is_dir() else []
    skipped = [skipped_entry(_relative(root, path), "label", "no row in images.csv")
               for path in on_disk if not path.name.startswith(".") and str(path) not in listed]
    return _finish("clothing", root, rows, skipped, progress, category_map, category_map_source,
                   non_categories=CLOTHING_NON_CATEGORIES, max_per_class=max_per_class, seed=seed)


# --- user catalogs -------------------------------------------------------------------------

def load_folder(data_dir, progress: bool = True, category_map: dict | None = None,
                category_map_source: str = "category map", max_per_class: int | None = None,
                seed: int = config.DEFAULT_SEED, unlabelled: bool = False) -> LoadedDataset:
    """An ImageFolder-style tree: one sub-folder per category, images anywhere below it.

    Hidden files (``.DS_Store``, ``._*``) are ignored, as ImageFolder does; every other
    file is either a catalog item or in the ledger, files lying directly in the top folder too
    (``unlabelled``: those are kept, with label None).
    """
    root = _existing_dir(data_dir, "folder", "one sub-folder per category: <data-dir>/<category>/<image>")
    records, skipped = [], []
    for entry in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        if not entry.is_dir():
            if unlabelled:
                records.append({"id": entry.name, "path": str(entry), "label": None})
            else:
                skipped.append(skipped_entry(entry.name, "label", OUTSIDE_CATEGORY_FOLDER))
            continue
        for path in sorted(entry.rglob("*")):
            # A directory is reported only when its name poses as an image (``look.jpg/``).
            if path.name.startswith(".") or (path.is_dir() and path.suffix.lower() not in IMAGE_SUFFIXES):
                continue
            relative = path.relative_to(root).as_posix()
            records.append({"id": relative, "path": str(path), "label": entry.name})
    rows = pd.DataFrame(records, columns=CATALOG_COLUMNS)
    return _finish("folder", root, rows, skipped, progress, category_map, category_map_source,
                   max_per_class=max_per_class, seed=seed, unlabelled=unlabelled)


def parse_columns(columns) -> dict[str, str]:
    """``"path=file,label=type,id=sku"`` (or that as a dict) -> ``{"path": "file", "label": "type", "id": "sku"}``.

    Keys are the workbench's roles (``path``, ``label``, ``id``); values name the catalog's own
    columns. A role left out keeps its own name as the column (``path``, ``label``, ``id``).
    """
    if columns is None or columns == "" or columns == {}:
        return {}
    if isinstance(columns, str):
        pairs = [part.split("=", 1) for part in columns.split(",") if part.strip()]
        malformed = [part for part in pairs if len(part) != 2 or not part[0].strip() or not part[1].strip()]
        if malformed:
            raise DatasetError(f"--columns {columns!r}: write role=column pairs separated by commas, "
                               "e.g. path=file,label=type,id=sku")
        columns = {role.strip(): column.strip() for role, column in pairs}
    unknown = [role for role in columns if role not in MAPPED_ROLES]
    if unknown:
        raise DatasetError(f"--columns: unknown role {unknown[0]!r}{did_you_mean(unknown[0], MAPPED_ROLES)}; "
                           f"the roles are {', '.join(MAPPED_ROLES)} (every other column is an attribute)")
    return {str(role): str(column) for role, column in columns.items()}


def find_catalog_file(data_dir) -> Path:
    """The catalog table ``data_dir`` names: a .csv or .parquet file, or a folder holding catalog.csv/.parquet."""
    if data_dir is None:
        raise DatasetError("--dataset catalog needs --data-dir or --catalog (a CSV or Parquet file, or a folder "
                           "holding catalog.csv with columns path,label)")
    path = Path(data_dir)
    if path.is_dir():
        for name in CATALOG_FILES:
            if (path / name).is_file():
                return path / name
        raise DatasetError(f"{path / CATALOG_FILES[0]}: not found (a catalog directory needs catalog.csv with "
                           "columns path,label, or name the file itself with --catalog)")
    if not path.exists():
        raise DatasetError(f"{path}: no such catalog file or folder")
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise DatasetError(f"{path}: a catalog is a .csv or .parquet file (got {path.suffix or 'no suffix'})")
    return path


def read_catalog_table(path: Path, text_columns=()) -> pd.DataFrame:
    """The table of a CSV or Parquet catalog file; ``text_columns`` are read as text, the others typed.

    A CSV's attribute columns get pandas' types (numbers stay numbers, for ranges); an empty
    cell is missing. An unreadable file is one DatasetError naming it.
    """
    try:
        if path.suffix.lower() == ".parquet":
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path, dtype={column: str for column in text_columns}, keep_default_na=False,
                                na_values=[""])
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DatasetError(f"{path}: cannot be read as a catalog table ({reason})") from None
    for column in text_columns:
        if column in table.columns:
            table[column] = table[column].map(lambda value: None if pd.isna(value) else str(value))
    return table


def load_catalog_csv(data_dir, progress: bool = True, category_map: dict | None = None,
                     category_map_source: str = "category map", max_per_class: int | None = None,
                     seed: int = config.DEFAULT_SEED, columns=None, image_root=None,
                     unlabelled: bool = False) -> LoadedDataset:
    """A catalog table: a CSV or Parquet file, or a folder holding ``catalog.csv`` (or ``catalog.parquet``).

    ``columns`` maps the workbench's roles to the table's own columns (:func:`parse_columns`,
    e.g. ``path=file,label=type,id=sku``); without it the table has ``path,label`` and optionally
    ``id``. Paths are relative to ``image_root`` when given, else to the table's folder. Every
    other column (``colour``, ``price``, ``gender``...) is an attribute, kept with its type (an
    empty cell stays missing), for filters, results and ``evaluate --relevance label,colour``; a
    column named like one the workbench adds (``split``, ``digest``, ``deleted``) is an error.
    ``unlabelled``: rows without a label (or a table without a label column) are kept with
    label None, for an index whose classifier predicts them.
    """
    mapping = parse_columns(columns)
    table_path = find_catalog_file(data_dir)
    sources = {role: mapping.get(role, role) for role in MAPPED_ROLES}
    table = read_catalog_table(table_path, text_columns=list(sources.values()))
    required = [role for role in ("path", "label", "id") if role in mapping or role == "path"
                or (role == "label" and not unlabelled)]
    missing = [role for role in required if sources[role] not in table.columns]
    if missing:
        named = ", ".join(f"{sources[role]!r}" + (f" (--columns {role}={sources[role]})" if role in mapping else "")
                          for role in missing)
        hint = "" if mapping else "; name your own with --columns path=...,label=...,id=..."
        raise DatasetError(f"{table_path}: missing column{'s' if len(missing) > 1 else ''} {named}{hint}; its "
                           f"columns: {', '.join(map(str, table.columns))}")
    root = (Path(image_root) if image_root is not None else table_path.parent).absolute()
    if image_root is not None and not root.is_dir():
        raise DatasetError(f"{root}: no such directory (--image-root, the folder the catalog's paths start from)")
    paths = table[sources["path"]]
    no_path = paths.isna().to_numpy() | (paths.astype("string").str.strip() == "").fillna(True).to_numpy()
    skipped = [skipped_entry(f"{table_path.name} line {line + 2}", "catalog", "missing path")
               for line in np.flatnonzero(no_path)]
    table = table[~no_path].reset_index(drop=True)
    attributes = [column for column in table.columns if column not in sources.values()]
    clashing = sorted(set(map(str, attributes)) & RESERVED_COLUMNS)
    if clashing:
        raise DatasetError(f"{table_path}: column(s) {clashing} are names the workbench gives its own columns; "
                           "rename them (e.g. to original_split), or map them with --columns")
    paths = table[sources["path"]].astype(str)
    ids = table[sources["id"]] if sources["id"] in table.columns else paths
    labels = table[sources["label"]] if sources["label"] in table.columns else pd.Series([None] * len(table))
    rows = pd.DataFrame({
        "id": ids.fillna(paths).astype(str).values,
        "path": [str(root / p) for p in paths],
        "label": labels.values,
        **{str(column): table[column].values for column in attributes},
    })
    return _finish("catalog", root, rows, skipped, progress, category_map, category_map_source,
                   max_per_class=max_per_class, seed=seed, unlabelled=unlabelled)


def load_additions(source, columns=None, image_root=None, progress: bool = False) -> LoadedDataset:
    """Images to add to an index: a catalog table (as :func:`load_catalog_csv`) or a folder.

    A folder holds category sub-folders and/or photos lying directly in it; photos without a
    label (directly in the folder, or a row without one) are kept with label None.
    """
    path = Path(source)
    if not path.exists():
        raise DatasetError(f"--add {source}: no such file or folder")
    if path.is_file() or any((path / name).is_file() for name in CATALOG_FILES):
        return load_catalog_csv(path, progress=progress, columns=columns, image_root=image_root, unlabelled=True)
    if columns or image_root is not None:
        raise DatasetError(f"--add {source}: --columns and --image-root go with a catalog table (CSV or Parquet)")
    return load_folder(path, progress=progress, unlabelled=True)


def _existing_dir(data_dir, dataset: str, layout: str) -> Path:
    if data_dir is None:
        raise DatasetError(f"--dataset {dataset} needs --data-dir ({layout})")
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such directory (--data-dir for --dataset {dataset} is {layout})")
    return root


LOADERS: dict[str, Callable[..., LoadedDataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "clothing": load_clothing,
    "folder": load_folder,
    "catalog": load_catalog_csv,
}


def load_dataset(name: str, data_dir=None, max_per_class: int | None = None, seed: int = config.DEFAULT_SEED,
                 category_map: dict | str | Path | None = None, progress: bool = True, columns=None,
                 image_root=None) -> LoadedDataset:
    """Loads a named dataset, optionally remaps its categories and caps the images per category.

    ``category_map`` merges or renames categories (``{"Hoodie": "Tops"}``); a category
    mapped to ``None`` is dropped; an entry that matches no label of the catalog is an
    error (naming close matches), raised before any image is checked. The map applies
    before sampling and splitting, so every later step sees the mapped labels, and
    ``max_per_class`` caps the mapped categories. ``columns`` and ``image_root`` go with the
    ``catalog`` dataset (:func:`load_catalog_csv`).
    """
    if name not in LOADERS:
        raise DatasetError(f"unknown dataset {name!r}{did_you_mean(name, LOADERS)}; available: {', '.join(LOADERS)}")
    if max_per_class is not None and max_per_class < 1:
        raise DatasetError(f"max_per_class must be a positive number or None (no cap), got {max_per_class}")
    mapping = read_category_map(category_map) if category_map else None
    source = str(category_map) if category_map and not isinstance(category_map, dict) else "category map"
    table_options = {}
    if columns or image_root is not None:
        if name != "catalog":
            raise DatasetError(f"--columns and --image-root go with --dataset catalog (a CSV or Parquet table), "
                               f"not --dataset {name}")
        table_options = {"columns": columns, "image_root": image_root}
    loaded = LOADERS[name](data_dir, progress=progress, category_map=mapping, category_map_source=source,
                           max_per_class=max_per_class, seed=seed, **table_options)
    if loaded.catalog.empty:
        raise _no_images_error(loaded)
    return loaded


def _no_images_error(loaded: LoadedDataset) -> DatasetError:
    outside = [entry for entry in loaded.skipped if entry["reason"] == OUTSIDE_CATEGORY_FOLDER]
    if loaded.name == "folder" and outside and len(outside) == len(loaded.skipped):
        return DatasetError(f"{loaded.root}: no usable images: its {len(outside)} files lie directly in it, but "
                            "--dataset folder needs one sub-folder per category "
                            f"({loaded.root}/<category>/<image>); move them into category folders")
    if not loaded.skipped:
        return DatasetError(f"{loaded.root}: no images found for --dataset {loaded.name}")
    first = loaded.skipped[0]
    return DatasetError(f"{loaded.name} at {loaded.root}: no usable images, {describe_counts(loaded.skipped)} "
                        f"(first: {first['path']}: {first['reason']})")


def read_category_map(category_map: dict | str | Path) -> dict:
    """The category map as a dict of old label -> new label (None drops), from a dict or a YAML file."""
    if isinstance(category_map, dict):
        mapping, source = category_map, "category map"
    else:
        import yaml

        source = str(category_map)
        try:
            text = Path(category_map).read_text()
        except FileNotFoundError:
            raise DatasetError(f"{category_map}: category map file not found (a YAML file of old label: new label)") \
                from None
        except OSError as error:
            raise DatasetError(f"{category_map}: cannot read the category map ({error.strerror})") from None
        try:
            mapping = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise DatasetError(f"{category_map}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(mapping, dict):
        raise DatasetError(f"{source}: a category map is a YAML mapping of old label -> new label (null drops)")
    bad = {key: value for key, value in mapping.items() if value is not None and not isinstance(value, str)}
    if bad:
        key, value = next(iter(bad.items()))
        raise DatasetError(f"{source}: {key!r} maps to {value!r}; a new label is a string, or null to drop it")
    return {str(key): value for key, value in mapping.items()}


def check_category_map(mapping: dict, labels, source: str = "category map") -> None:
    """Raises DatasetError naming every entry of ``mapping`` that matches none of ``labels``, with close matches."""
    labels = sorted({str(label) for label in labels})
    unmatched = [key for key in mapping if key not in labels]
    if not unmatched:
        return
    described = "; ".join(f"{key!r} matches no label{did_you_mean(key, labels)}" for key in unmatched)
    raise DatasetError(f"{source}: {described} (labels are case-sensitive; the catalog has: {', '.join(labels)})")
