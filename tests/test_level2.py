"""Level 2 stops by epochs and early stopping: the same settings give the same model on a fast or a slow machine."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from conftest import write_color_image
from fashionrec.data.catalog import load_folder
from fashionrec.features.embed import embed_catalog
from fashionrec.models.registry import get_backbone
from fashionrec.settings import InferenceSettings
from fashionrec.training import trunk
from fashionrec.training.heads import HeadConfig, fit_head
from fashionrec.training.trunk import BackboneTuneConfig, tune_backbone

pytestmark = pytest.mark.integration

HEAD = HeadConfig(hidden_dim=16, out_dim=8, epochs=4, patience=4, batch_size=8, k=3, refit=False)
TUNE = BackboneTuneConfig(trainable_blocks=1, n_views=1, epochs=3, patience=10, batch_size=8)


@pytest.fixture(scope="module")
def level1(tmp_path_factory):
    root = tmp_path_factory.mktemp("level2") / "shop"
    for label, colour in (("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 210))):
        for i in range(8):
            write_color_image(root / label / f"{label}-{i}.jpg", colour, size=(56, 72))
    rows = load_folder(root, progress=False).catalog
    lite = get_backbone("efficientnet_lite0")
    frozen = embed_catalog(rows, lite, InferenceSettings(workers=0, progress=False, runtime="eager"))
    rows = frozen.metadata
    fit = fit_head(frozen.vectors, rows["label"], HEAD, losses=("norm_softmax",), progress=False)
    return lite, rows, fit


def _tune(level1, cfg):
    lite, rows, fit = level1
    with torch.random.fork_rng(devices=[]):
        return tune_backbone(lite, rows, rows["label"], fit, cfg, HEAD, num_workers=0, progress=False,
                             held_out_rows=rows.iloc[:2])


def _same(first, second) -> bool:
    return all(torch.equal(first.tail_state[key], second.tail_state[key]) for key in first.tail_state) and \
        all(torch.equal(a, b) for a, b in zip(first.head.state_dict().values(), second.head.state_dict().values()))


def test_level2_gives_the_same_model_on_a_fast_and_on_a_slow_machine(level1, monkeypatch):
    fast = _tune(level1, TUNE)
    assert fast.stopped_by == "epochs" and len(fast.history) == TUNE.epochs + 1
    assert fast.held_out_vectors.shape == (2, HEAD.out_dim)
    # A machine 1,000 times slower: every clock reading an hour after the previous one.
    hours = itertools.count(0, 3600.0)
    monkeypatch.setattr(trunk.time, "perf_counter", lambda: float(next(hours)))
    slow = _tune(level1, TUNE)
    assert slow.stopped_by == "epochs" and slow.best_epoch == fast.best_epoch
    assert _same(fast, slow)
    assert np.array_equal(fast.train_vectors, slow.train_vectors)
    # The opt-in wall-clock safety net is what makes a slow machine stop early, and it says so.
    capped = _tune(level1, BackboneTuneConfig(**{**TUNE.__dict__, "time_budget_s": 60.0}))
    assert capped.stopped_by == "time budget" and capped.history[-1]["partial"]
