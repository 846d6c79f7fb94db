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

# Where Debian puts Fashion-MNIST (fashionrec.data.fetch lists every place a dataset is looked for).
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

# Local weight files for torchvision backbones (file names as torchvision publishes them).
WEIGHTS_DIR = Path(os.environ.get("FASHIONREC_WEIGHTS_DIR", DATA_DIR / "weights"))

DEFAULT_SEED = 0
