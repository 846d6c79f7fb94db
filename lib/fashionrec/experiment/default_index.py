"""The index the app serves when none is named: the best single network measured on the catalog at hand.

The catalog is the clothing photos when they are on this machine, else Fashion-MNIST
(``DEFAULT_FASHION_MNIST_PER_CLASS`` articles a category, fetched if needed). Its model is
EfficientNet-Lite0 fine-tuned on the catalog's train split (a projection head and the category
classifier; cached like ``evaluate --finetune``), or, when ``distil`` has trained a student on
these same train rows, the newest such student. The folder is built once, with its quality card
(:mod:`fashionrec.serving.quality`), into ``data/processed/indexes/<dataset>-default``, and reused
while it loads. The product serves it; training it is research, so it lives here.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .. import config
from ..data.fetch import ensure_dataset, locate_clothing
from ..data.prepared import prepare
from ..models.finetuned import HEAD_SEPARATOR, load_model
from ..provenance import dataset_fingerprint
from ..serving.build import index_dataset
from ..serving.folder import is_index_folder
from ..settings import InferenceSettings
from .evaluate import embed
from .finetune import evaluate_finetuned

DEFAULT_BACKBONE = "efficientnet_lite0"
# Fashion-MNIST has 70,000 images; this many per category keep the first build to a few minutes on 2 cores.
DEFAULT_FASHION_MNIST_PER_CLASS = 300
STUDENTS = ("efficientnet_lite0", "efficientnet_lite1")


def default_index_dir(dataset: str) -> Path:
    return config.PROCESSED_DIR / "indexes" / f"{dataset}-default"


def ensure_default_index(settings: InferenceSettings = InferenceSettings()) -> Path:
    """The default index folder (see the module docstring), built first if it is not there."""
    clothing = locate_clothing()
    if clothing is not None:
        dataset, data_dir, per_class = "clothing", clothing, None
    else:
        dataset, data_dir, per_class = "fashion-mnist", None, DEFAULT_FASHION_MNIST_PER_CLASS
    outdir = default_index_dir(dataset)
    if is_index_folder(outdir):
        return outdir
    if dataset == "fashion-mnist":
        ensure_dataset(dataset, progress=settings.progress)
    prepared = prepare(dataset, data_dir, max_per_class=per_class, progress=settings.progress)
    model = distilled_student(prepared, settings)
    if model is None:
        _say(settings, f"fine-tuning {DEFAULT_BACKBONE} on the train split of {dataset} (once; cached)")
        trained = evaluate_finetuned(prepared, DEFAULT_BACKBONE, settings=settings)
        model = f"{DEFAULT_BACKBONE}{HEAD_SEPARATOR}{trained.model_path}"
    _say(settings, f"building the default index of {dataset} with {model} into {outdir} (once; later runs reuse it)")
    index_dataset(outdir, dataset, model, data_dir=data_dir, max_per_class=per_class, index="auto", settings=settings,
                  split_seed=prepared.split_seed)
    return outdir


def distilled_student(prepared, settings: InferenceSettings) -> str | None:
    """``<student>+head:<file>`` of the newest student distilled on ``prepared``'s train rows, None when none is."""
    found = []
    for student in STUDENTS:
        files = sorted((config.PROCESSED_DIR / "heads").glob(f"distil-{student}-*.pt"))
        if not files:
            continue
        metadata = embed(prepared, student, settings=settings).metadata
        train_fingerprint = dataset_fingerprint(metadata[metadata["split"] == "train"])
        found += [(path.stat().st_mtime, f"{student}{HEAD_SEPARATOR}{path}") for path in files
                  if load_model(path).train_fingerprint == train_fingerprint]
    return max(found)[1] if found else None


def _say(settings: InferenceSettings, message: str) -> None:
    if settings.progress:
        print(f"[app] {message}", file=sys.stderr, flush=True)
