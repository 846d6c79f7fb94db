"""What a number or a folder was made from: the data's fingerprint and the software's versions."""
from __future__ import annotations

import hashlib
import platform

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
