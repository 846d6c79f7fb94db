"""The on-disk contract of a run's embeddings: ``<backbone>.npy`` + ``.parquet`` + ``.json``.

Row i of the ``.npy`` is row i of the metadata parquet (id, path, label, split, digest);
the JSON says how they were made (backbone, cache key, weights checksum, skipped files).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .embed import Embeddings


def embedding_files(directory, backbone: str) -> dict[str, Path]:
    """``.npy``, ``.parquet`` and ``.json`` paths for a backbone name, which may hold a path
    (``efficientnet_lite0+head:runs/x/head.pt``) and so is made safe as a file name."""
    stem = re.sub(r"[^A-Za-z0-9._+-]", "_", backbone)
    return {suffix: Path(directory) / f"{stem}.{suffix}" for suffix in ("npy", "parquet", "json")}


def save_embeddings(embeddings: Embeddings, directory: Path, extra: dict | None = None) -> Path:
    """Writes ``<backbone>.npy`` + ``<backbone>.parquet`` (same row order) + a JSON of provenance."""
    directory.mkdir(parents=True, exist_ok=True)
    files = embedding_files(directory, embeddings.backbone)
    np.save(files["npy"], embeddings.vectors)
    embeddings.metadata.to_parquet(files["parquet"], index=False)
    info = {
        "backbone": embeddings.backbone,
        "cache_key": embeddings.cache_key,
        "weights_sha256": embeddings.weights_sha256,
        "n": int(len(embeddings.vectors)),
        "dim": int(embeddings.vectors.shape[1]),
        "preprocessing": embeddings.preprocessing,
        "n_skipped": len(embeddings.skipped),
        "skipped": embeddings.skipped,
        **(extra or {}),
    }
    files["json"].write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    return files["npy"]


def load_embeddings(directory: Path, backbone: str) -> tuple[np.ndarray, pd.DataFrame, dict]:
    files = embedding_files(directory, backbone)
    vectors = np.load(files["npy"])
    metadata = pd.read_parquet(files["parquet"])
    info = json.loads(files["json"].read_text())
    if len(vectors) != len(metadata):
        raise ValueError(f"{files['npy']}: {len(vectors)} vectors but {len(metadata)} metadata rows")
    return vectors, metadata, info
