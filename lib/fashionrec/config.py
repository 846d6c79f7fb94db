"""Paths of the workbench, built from the project root rather than the working directory.

Raw data is immutable and never edited; everything under ``interim``/``processed`` and
``results`` is derived and may be deleted and rebuilt by ``make``.
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(os.environ.get("FASHIONREC_ROOT", Path(__file__).resolve().parents[2]))
DATA_DIR = Path(os.environ.get("FASHIONREC_DATA", PROJECT_ROOT / "data"))
RAW_DIR = DATA_DIR / "raw"
INTERIM_DIR = DATA_DIR / "interim"
PROCESSED_DIR = DATA_DIR / "processed"
RESULTS_DIR = Path(os.environ.get("FASHIONREC_RESULTS", PROJECT_ROOT / "results"))

# Where each named dataset is looked for when no --data-dir is given.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CLOTHING_DEFAULT_DIRS = (
    Path(os.environ["FASHIONREC_CLOTHING_DIR"]) if os.environ.get("FASHIONREC_CLOTHING_DIR") else None,
    RAW_DIR / "clothing-dataset",
    PROJECT_ROOT.parent / "shared" / "data" / "clothing-dataset",
)

# Local weight files for torchvision backbones (file names as torchvision publishes them).
WEIGHTS_DIR = Path(os.environ.get("FASHIONREC_WEIGHTS_DIR", DATA_DIR / "weights"))

DEFAULT_SEED = 0
