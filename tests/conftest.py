"""Shared fixtures: an isolated data directory per test session, real data paths."""
from __future__ import annotations

import contextlib
import os
import zlib
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fashionrec import config
from fashionrec.data.catalog import load_clothing
from fashionrec.data.fetch import locate_fashion_mnist
from fashionrec.features.embed import embed_catalog
from fashionrec.models.finetuned import save_model
from fashionrec.models.projection import project
from fashionrec.models.registry import get_backbone
from fashionrec.models.runtime import with_runtime
from fashionrec.settings import InferenceSettings
from fashionrec.training.classify import train_classifier
from fashionrec.training.finetune import head_payload
from fashionrec.training.heads import HeadConfig, fit_head

REPO = Path(__file__).resolve().parents[1]
CLOTHING_DIR = Path(os.environ.get("FASHIONREC_CLOTHING_DIR", REPO.parent / "shared" / "data" / "clothing-dataset"))
# Debian's system-wide copy, or the one `make test` fetched into data/raw (found before any test
# points config at its own temporary tree).
FASHION_MNIST_DIR = locate_fashion_mnist()


def _link_fashion_mnist(root: Path) -> None:
    """Makes a fetched Fashion-MNIST visible under a test data root, as a newcomer's data/raw holds it."""
    if FASHION_MNIST_DIR is not None and FASHION_MNIST_DIR != config.FASHION_MNIST_SYSTEM_DIR:
        link = root / "raw" / "fashion-mnist"
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(FASHION_MNIST_DIR, target_is_directory=True)


@pytest.fixture(autouse=True)
def isolated_data_dirs(tmp_path_factory, monkeypatch):
    """Caches and results go to a temporary tree, never into the user's data/ or results/."""
    root = tmp_path_factory.getbasetemp() / "fashionrec-data"
    monkeypatch.setattr(config, "DATA_DIR", root)
    monkeypatch.setattr(config, "INTERIM_DIR", root / "interim")
    monkeypatch.setattr(config, "PROCESSED_DIR", root / "processed")
    monkeypatch.setattr(config, "RAW_DIR", root / "raw")
    monkeypatch.setattr(config, "RESULTS_DIR", root / "results")
    _link_fashion_mnist(root)
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


def session_data_root(tmp_path_factory) -> Path:
    """The data root ``isolated_data_dirs`` gives every test; session fixtures build into it too."""
    return tmp_path_factory.getbasetemp() / "fashionrec-data"


@contextlib.contextmanager
def data_dirs(root: Path):
    """``config`` pointed at ``root`` for the duration (for session-scoped fixtures, which run
    before the per-test ``isolated_data_dirs``)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, path in (("DATA_DIR", root), ("INTERIM_DIR", root / "interim"), ("PROCESSED_DIR", root / "processed"),
                           ("RAW_DIR", root / "raw"), ("RESULTS_DIR", root / "results")):
            patch.setattr(config, name, path)
        _link_fashion_mnist(root)
        yield


def write_product_image(path: Path, seed: int, category: int, size=(120, 160)) -> Path:
    """A generated product shot: one category's shape, in a seeded colour, pose and size, on white."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    width, height = size
    colour = tuple(int(c) for c in rng.integers(0, 200, 3))
    cx, cy = width / 2 + rng.normal(0, 6), height / 2 + rng.normal(0, 8)
    w, h = width * rng.uniform(0.3, 0.45), height * rng.uniform(0.3, 0.45)
    box = [cx - w, cy - h, cx + w, cy + h]
    shape = category % 4
    if shape == 0:
        draw.ellipse(box, fill=colour)
    elif shape == 1:
        draw.rectangle(box, fill=colour)
    elif shape == 2:
        draw.polygon([(cx, cy - h), (cx - w, cy + h), (cx + w, cy + h)], fill=colour)
    else:
        draw.rectangle([cx - w, cy - h, cx + w, cy - h / 3], fill=colour)
        draw.rectangle([cx - w, cy - h / 3, cx - w / 3, cy + h], fill=colour)
        draw.rectangle([cx + w / 3, cy - h / 3, cx + w, cy + h], fill=colour)
    if category >= 4:   # a striped variant of each shape
        for y in range(int(cy - h), int(cy + h), 8):
            draw.line([(cx - w, y), (cx + w, y)], fill=(255, 255, 255), width=2)
    noise = rng.integers(-6, 7, (height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=92)
    return path


def fashion_mnist_available() -> bool:
    return FASHION_MNIST_DIR is not None


GENERATED_CATEGORIES = ("ellipse", "box", "triangle", "trousers", "striped ellipse", "striped box",
                        "striped triangle", "striped trousers")


@pytest.fixture(scope="session")
def generated_photos(tmp_path_factory):
    """400 generated product shots in 8 category folders (ids as the folder loader gives them),
    4 more outside the catalog, and the catalog's root folder."""
    root = tmp_path_factory.mktemp("generated")
    rows = []
    for i in range(400):
        category = i % len(GENERATED_CATEGORIES)
        relative = f"{GENERATED_CATEGORIES[category]}/item-{i:03d}.jpg"
        path = write_product_image(root / "catalog" / relative, seed=i, category=category)
        rows.append({"id": relative, "path": str(path), "label": GENERATED_CATEGORIES[category]})
    outside = [str(write_product_image(root / "outside" / f"query-{j}.jpg", seed=10_000 + j, category=j))
               for j in range(4)]
    return pd.DataFrame(rows), outside, root / "catalog"


def link_generated_catalog(generated_photos, folder: Path, n: int) -> Path:
    """The first ``n`` generated photos as an ImageFolder tree in ``folder`` (links: the same bytes,
    the same cached embeddings)."""
    catalog, _, root = generated_photos
    for path in catalog["path"].iloc[:n]:
        link = folder / os.path.relpath(path, root)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    return folder


@pytest.fixture(scope="session")
def clothing_photos():
    """A seeded sample of 400 clothing photos (catalog order), and 4 other photos outside it."""
    if not (CLOTHING_DIR / "images.csv").exists():
        pytest.skip(f"clothing photos not found at {CLOTHING_DIR} (set FASHIONREC_CLOTHING_DIR)")
    catalog = load_clothing(CLOTHING_DIR, progress=False).catalog
    sample = catalog.sample(n=404, random_state=0).reset_index(drop=True)
    return sample.iloc[:400].reset_index(drop=True), sample["path"].iloc[400:].tolist()


@pytest.fixture(scope="module")
def one_faiss_thread():
    """faiss on one thread for a test module: results that do not depend on the thread count."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(previous)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for a test: training that does not depend on the thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_head_model(catalog: pd.DataFrame, out: Path) -> str:
    """``efficientnet_lite0+head:<out>``: a small head trained on ``catalog`` (id, path, label), with a category
    classifier on its output (an index of it carries the classifier); seconds, not the real fine-tuning."""
    base = get_backbone("efficientnet_lite0")
    frozen = embed_catalog(catalog, with_runtime(base, "onnx"), InferenceSettings(batch_size=16, workers=0,
                                                                                   progress=False)).vectors
    settings = HeadConfig(hidden_dim=32, out_dim=16, epochs=5, batch_size=16, refit=False)
    fit = fit_head(frozen, catalog["label"].to_numpy(), settings, losses=("norm_softmax",), progress=False)
    classifier = train_classifier(project(fit.head, frozen), catalog["label"], features="head", c=1.0)
    model = save_model(head_payload(fit, base, settings, "fingerprint", len(catalog), classifier), out)
    return f"efficientnet_lite0+head:{model}"
