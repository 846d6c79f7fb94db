"""Shared fixtures: an isolated data directory per test session, real data paths."""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashionrec import config

REPO = Path(__file__).resolve().parents[1]
CLOTHING_DIR = Path(os.environ.get("FASHIONREC_CLOTHING_DIR", REPO.parent / "shared" / "data" / "clothing-dataset"))


@pytest.fixture(autouse=True)
def isolated_data_dirs(tmp_path_factory, monkeypatch):
    """Caches and results go to a temporary tree, never into the user's data/ or results/."""
    root = tmp_path_factory.getbasetemp() / "fashionrec-data"
    monkeypatch.setattr(config, "DATA_DIR", root)
    monkeypatch.setattr(config, "INTERIM_DIR", root / "interim")
    monkeypatch.setattr(config, "PROCESSED_DIR", root / "processed")
    monkeypatch.setattr(config, "RAW_DIR", root / "raw")
    monkeypatch.setattr(config, "RESULTS_DIR", root / "results")
    return root


@pytest.fixture
def clothing_dir() -> Path:
    if not (CLOTHING_DIR / "images.csv").exists():
        pytest.skip(f"clothing photos not found at {CLOTHING_DIR} (set FASHIONREC_CLOTHING_DIR)")
    return CLOTHING_DIR


def write_color_image(path: Path, color, size=(48, 64), fmt=None) -> Path:
    """A solid-colour image with a little seeded noise, so that images of one colour differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    pixels = np.clip(np.array(color, dtype=np.int16) + rng.integers(-20, 21, (size[1], size[0], 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(path, format=fmt)
    return path


@pytest.fixture
def color_folder(tmp_path) -> Path:
    """An ImageFolder of three colour categories, 10 images each: colour histograms separate them perfectly."""
    root = tmp_path / "colors"
    for label, color in (("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 210))):
        for i in range(10):
            write_color_image(root / label / f"{label}-{i:02d}.jpg", color)
    return root
