"""build.json, typed: how a version of an index folder was built, written and read here only.

``schema_version`` says which fields a manifest has. Version 1 is a folder written before the
field existed (``format`` ``fashionrec-index/1``, no ``schema_version``): it reads as it is.
A manifest of a newer version than this code reads is refused with one line naming both.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..errors import IndexFolderError
from ..provenance import software_versions
from .folder import ATTRIBUTES_FILE, BUILD_INFO, COLOUR_FILE, EMBEDDINGS_FILE, ITEM_COLUMNS, ITEMS_FILE

FORMAT = "fashionrec-index/1"
BUILD_SCHEMA_VERSION = 2


@dataclass
class BuildManifest:
    """How one version of an index folder was built (see :mod:`fashionrec.serving.build` for the files)."""

    backbone: dict            # name, base, head_file, weights_file, weights_sha256, cache_key, dim, description
    runtime: str
    metric: str
    index: dict               # spec, store, factory, search_params, seed, ... (the store's own description)
    query_model: dict
    dataset: dict             # name, data_dir, split, split_seed, ..., fingerprint
    preprocessing: dict = field(default_factory=dict)
    ranking: dict = field(default_factory=lambda: {"boost": 0.0, "categories": None})
    versions: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    classifier: dict | None = None
    colour: dict | None = None   # the product-colour descriptors (None: a folder built without them)
    quality: dict | None = None  # the quality card (fashionrec.serving.quality); None: not measured
    updates: list = field(default_factory=list)
    created: str = ""
    updated: str | None = None
    format: str = FORMAT
    schema_version: int = BUILD_SCHEMA_VERSION

    @property
    def store(self) -> str:
        return self.index.get("store", "faiss")

    @property
    def category_boost(self) -> float:
        """The bonus the folder's model ranks with for its predicted category (0: none)."""
        return float((self.ranking or {}).get("boost") or 0.0)

    def to_dict(self) -> dict:
        record = asdict(self)
        if record["updated"] is None:
            del record["updated"]
        return record

    @classmethod
    def from_dict(cls, record: dict, where: str) -> "BuildManifest":
        """A manifest from build.json's contents; IndexFolderError naming ``where`` for another format or version."""
        version = int(record.get("schema_version", 1))
        if record.get("format") != FORMAT:
            raise IndexFolderError(f"{where}: format {record.get('format')!r}, this fashionrec reads {FORMAT!r}; "
                                   "rebuild the index")
        if version > BUILD_SCHEMA_VERSION:
            raise IndexFolderError(f"{where}: build.json schema version {version}; this fashionrec reads versions up "
                                   f"to {BUILD_SCHEMA_VERSION}: upgrade fashionrec or rebuild the index")
        known = {item.name for item in fields(cls)}
        missing = [item.name for item in fields(cls) if item.default is MISSING and item.default_factory is MISSING
                   and item.name not in record]
        if missing:
            raise IndexFolderError(f"{where}: build.json lacks {', '.join(missing)}; rebuild the index")
        return cls(**{key: value for key, value in record.items() if key in known} | {"schema_version": version})

    @classmethod
    def read(cls, version_dir: Path) -> "BuildManifest":
        path = Path(version_dir) / BUILD_INFO
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise IndexFolderError(f"{path}: unreadable ({error}); rebuild the index") from None
        return cls.from_dict(record, str(path))

    def write(self, version_dir: Path) -> None:
        """Writes build.json at this code's schema version."""
        self.schema_version = BUILD_SCHEMA_VERSION
        (Path(version_dir) / BUILD_INFO).write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")


def write_version_files(directory: Path, items: pd.DataFrame, vectors16: np.ndarray, manifest: BuildManifest,
                        colour16: np.ndarray | None = None) -> None:
    """``items``: the id map's columns and the attributes, written to the id map and the attributes table."""
    items[ITEM_COLUMNS].to_parquet(directory / ITEMS_FILE, index=False)
    attributes = [column for column in items.columns if column not in ITEM_COLUMNS]
    if attributes:
        items[attributes].to_parquet(directory / ATTRIBUTES_FILE, index=False)
    np.save(directory / EMBEDDINGS_FILE, vectors16)
    if colour16 is not None:
        np.save(directory / COLOUR_FILE, colour16)
    manifest.write(directory)


def item_counts(items: pd.DataFrame, skipped) -> dict:
    live = items[~items["deleted"]]
    return {"items": int(len(live)), "rows": int(len(items)), "tombstones": int(items["deleted"].sum()),
            "skipped": len(skipped), "categories": {str(k): int(v) for k, v in live["label"].value_counts()
                                                                                .sort_index().items()}}


def package_versions() -> dict:
    return {"fashionrec": __version__, **software_versions()}
