"""What a model costs to embed with: seconds per image, dimensions, bytes per vector, measured in one run.

A combination costs the sum of its leaves (each leaf decodes the image and runs its own
network), so each distinct leaf is timed once, on the same seeded sample of images, in the
same process, with the embedding cache bypassed (a scratch directory); every backbone's
cost is then the sum over its leaves. A projection head is a small matrix product after
that and is not timed. Timings depend on the machine and its load: they are reported apart
from the metrics, with the number of images and the runtime they were measured with.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.prepared import PreparedData
from ..features.embed import decoding_threads, embed_catalog
from ..models.backbone import Backbone
from ..models.ensemble import CombinedBackbone
from ..models.runtime import calibration_sample, with_runtime
from ..settings import InferenceSettings

BYTES_PER_FLOAT32 = 4


def _leaves(model) -> list[Backbone]:
    """The distinct leaves of a backbone, a combination, or a list of them (what serving one model runs)."""
    found: dict[str, Backbone] = {}
    for backbone in model if isinstance(model, (list, tuple)) else [model]:
        for leaf in backbone.leaves() if isinstance(backbone, CombinedBackbone) else [backbone]:
            found.setdefault(leaf.cache_key, leaf)
    return list(found.values())


def measure_embedding_cost(prepared: PreparedData, backbones: dict[str, Backbone | CombinedBackbone | list],
                           dims: dict[str, int] | None = None, n_images: int = 64, split: str = "query",
                           settings: InferenceSettings = InferenceSettings()) -> pd.DataFrame:
    """One row per backbone: leaves, stored dimensions and bytes per float32 vector, seconds per image, images/s.

    ``backbones`` maps a label to an (eager) backbone, or to a list of them when serving runs
    several (a searched model ranking by predicted category also runs its classifier's
    features); ``dims`` the dimension of the vector each stores (default: the first
    backbone's). The sample is ``n_images`` images of ``split`` chosen with the split seed;
    each leaf first embeds two images (runtime start-up, not counted), then the sample. The
    table's ``attrs`` say how it was measured, with the 1-minute load average before and after.
    """
    rows = prepared.catalog[prepared.catalog["split"] == split].reset_index(drop=True)
    if len(rows) > n_images:
        chosen = np.sort(np.random.default_rng(prepared.split_seed).choice(len(rows), n_images, replace=False))
        rows = rows.iloc[chosen].reset_index(drop=True)
    quiet = settings.but(progress=False)
    calibration = calibration_sample(prepared.catalog.loc[prepared.catalog["split"] == "train", "path"].tolist(),
                                     seed=prepared.split_seed) if settings.runtime == "onnx-int8" else None
    seconds_per_image: dict[str, float] = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fashionrec-cost-") as scratch:
        for model in backbones.values():
            for leaf in _leaves(model):
                if leaf.cache_key in seconds_per_image:
                    continue
                model = with_runtime(leaf, settings.runtime, threads=settings.threads,
                                     calibration_paths=calibration)
                embed_catalog(rows.iloc[:2], model, quiet, cache_dir=Path(scratch) / f"warm-{leaf.cache_key}")
                timed = embed_catalog(rows, model, quiet, cache_dir=Path(scratch) / leaf.cache_key)
                seconds_per_image[leaf.cache_key] = timed.seconds / max(timed.n_computed, 1)
    table = []
    for label, model in backbones.items():
        leaves = _leaves(model)
        seconds = sum(seconds_per_image[leaf.cache_key] for leaf in leaves)
        dim = int((dims or {}).get(label, (model[0] if isinstance(model, (list, tuple)) else model).dim))
        table.append({"model": label, "leaves": len(leaves), "dim": dim,
                      "bytes_per_vector": dim * BYTES_PER_FLOAT32, "seconds_per_image": round(seconds, 5),
                      "images_per_second": round(1.0 / seconds, 2) if seconds > 0 else float("nan")})
    table = pd.DataFrame(table)
    table.attrs.update(n_images=int(len(rows)), split=split, runtime=settings.runtime,
                       workers=decoding_threads(settings),
                       batch_size=settings.batch_size,
                       load_average_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)])
    return table
