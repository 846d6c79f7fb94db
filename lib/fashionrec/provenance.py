"""What a number or a folder was made from: the data's fingerprint and the software's versions."""
from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd


def dataset_fingerprint(metadata: pd.DataFrame) -> str:
    """SHA-256 of (id, label, split, image digest) rows: same data and split, same fingerprint."""
    columns = [c for c in ("id", "label", "split", "digest") if c in metadata.columns]
    rows = metadata[columns].astype(str).sort_values("id")
    digest = hashlib.sha256()
    for row in rows.itertuples(index=False):
        digest.update(("\t".join(row) + "\n").encode())
    return digest.hexdigest()


# What the numbers depend on, by distribution name (read from the installed metadata: importing torch
# to learn its version would cost a serving process a gigabyte).
_DISTRIBUTIONS = {"torch": "torch", "torchvision": "torchvision", "faiss": "faiss-cpu", "scikit-learn": "scikit-learn",
                  "pillow": "pillow", "onnxruntime": "onnxruntime"}


def software_versions() -> dict:
    return {"python": platform.python_version(), "numpy": np.__version__, "pandas": pd.__version__,
            **{name: _installed_version(distribution) for name, distribution in _DISTRIBUTIONS.items()}}


def _installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
