"""The model search: slices that never overlap, choices made on the select slice only, never on the queries."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from fashionrec.data.prepared import prepare
from fashionrec.experiment.evaluate import evaluate_backbone
from fashionrec.experiment.search import search_finetuned
from fashionrec.models.backbone import BuiltBackbone
from fashionrec.models.registry import get_backbone, register_backbone
from fashionrec.settings import InferenceSettings
from fashionrec.training.heads import HeadConfig
from fashionrec.training.search import SearchConfig, selection_precision, selection_slices

EAGER = InferenceSettings(batch_size=16, workers=0, progress=False, runtime="eager")
SMALL = SearchConfig(losses=("norm_softmax",), hidden_dims=(16,), classifier_c=(1.0,),
                     head=HeadConfig(hidden_dim=16, out_dim=8, epochs=15, patience=5, batch_size=16, k=3))


class BrightHalf(nn.Module):
    """Grey level of each quarter of the image, left to right: where the bright half is, whatever its colour."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grey = images.mean(dim=1)
        return torch.stack([grey[:, :, i * 8:(i + 1) * 8].mean(dim=(1, 2)) for i in range(4)], dim=1) - 0.5


@register_backbone("test_bright_half", dim=4, description="test: grey level of four vertical strips")
def _build_bright_half(weights_file):
    return BuiltBackbone(BrightHalf(), transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()]))


def _picture(path, colour, bright_left: bool, rng) -> None:
    pixels = np.full((64, 64, 3), 25, np.int16)
    half = slice(0, 32) if bright_left else slice(32, 64)
    pixels[:, half] = np.array(colour) + rng.integers(-15, 16, (64, 32, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


@pytest.fixture
def two_worlds(tmp_path):
    """A catalog whose train split says 'category = colour' and whose gallery and queries say 'category = layout'.

    Colour histograms win on any part of the train split; the bright-half backbone wins on the
    queries. A search that looked at the queries would pick the bright half.
    """
    root = tmp_path / "shop"
    rows = [{"path": f"img/{label}-{i:02d}.png", "label": label} for label in ("a", "b") for i in range(40)]
    root.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "catalog.csv", index=False)
    rng = np.random.default_rng(0)
    for row in rows:
        _picture(root / row["path"], (220, 220, 220), True, rng)
    split = prepare("catalog", root, progress=False).catalog
    red, blue = (230, 40, 40), (40, 40, 230)
    for row in split.itertuples(index=False):
        if row.split == "train":      # colour tells the category, the bright half is random
            _picture(root / row.path, red if row.label == "a" else blue, bool(rng.integers(2)), rng)
        else:                         # the bright half tells the category, the colour is random
            _picture(root / row.path, red if rng.integers(2) else blue, row.label == "a", rng)
    return root


def test_selection_slices_are_disjoint_stratified_and_seeded():
    labels = np.array(["a"] * 100 + ["b"] * 40 + ["c"] * 3 + ["d"] * 2)
    slices = selection_slices(labels, 0.15, 0.15, seed=0)
    masks = np.stack([slices.fit, slices.stop, slices.select])
    assert (masks.sum(axis=0) == 1).all()
    assert slices.select[labels == "a"].sum() == 15 and slices.stop[labels == "a"].sum() == 13
    assert not (slices.select | slices.stop)[labels == "d"].any()
    assert {e["label"] for e in slices.not_validated} >= {"d"}
    again = selection_slices(labels, 0.15, 0.15, seed=0)
    other = selection_slices(labels, 0.15, 0.15, seed=1)
    assert np.array_equal(again.select, slices.select) and not np.array_equal(other.select, slices.select)


def test_selection_precision_ranks_within_the_predicted_category():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 30)
    vectors = rng.normal(size=(90, 8)).astype(np.float32)      # no category structure at all
    slices = selection_slices(labels, 0.3, 0.15, seed=0)
    plain = selection_precision(vectors, labels, labels, slices, boost=0.0, k=5)
    within = selection_precision(vectors, labels, labels, slices, boost=math.inf, k=5)
    assert within.mean() == 1.0 > plain.mean()
    assert len(plain) == slices.select.sum()


def test_the_search_chooses_on_the_select_slice_and_never_on_the_queries(two_worlds):
    prepared = prepare("catalog", two_worlds, progress=False)
    result = search_finetuned(prepared, "ensemble:colorhist,test_bright_half", SMALL, k=3, settings=EAGER,
                              reference=False)
    chosen = result.record["finetune"]["chosen"]
    assert chosen["features"] == "ensemble:colorhist" and "bright" not in chosen["classifier"]["features"]
    candidates = pd.DataFrame(result.outcome["candidates"])
    plain = candidates[candidates["boost"] == 0].groupby("features")["select_precision_at_k"].max()
    assert plain["ensemble:colorhist"] > plain["ensemble:test_bright_half"] + 0.2
    # On the queries the other backbone is far better: the choice did not look at them.
    other, _ = evaluate_backbone(prepared, "test_bright_half", k=3, settings=EAGER)
    assert other["precision_at_k"] > result.record["precision_at_k_plain"] + 0.2
    # What the record says was measured on the queries, and what on the select slice.
    assert result.record["n_queries"] == 16 and result.record["finetune"]["slices"]["select"] >= 4
    assert "select" in result.record["selection_note"]
    # The chosen model is served by name, with its classifier and ranking in the file.
    served = get_backbone(result.record["finetune"]["finetuned_backbone"])
    assert served.dim == result.record["finetune"]["dim"] and served.name.startswith("ensemble:colorhist+head:")
    # Same inputs, same settings: the cached choice is reused and the numbers repeat.
    again = search_finetuned(prepared, "ensemble:colorhist,test_bright_half", SMALL, k=3, settings=EAGER,
                             reference=False)
    assert again.reused and again.record["precision_at_k"] == result.record["precision_at_k"]


@pytest.mark.integration
def test_cli_finetune_on_the_lite_ensemble_runs_on_another_catalog(tmp_path, capsys):
    from conftest import write_color_image
    from fashionrec.cli import main

    root = tmp_path / "catalog"
    rows = []
    for label, colour in (("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 210))):
        for i in range(10):
            rows.append({"path": f"img/{label}-{i}.jpg", "label": label})
            write_color_image(root / rows[-1]["path"], colour, size=(64, 80))
    pd.DataFrame(rows).to_csv(root / "catalog.csv", index=False)
    argv = ["evaluate", "--dataset", "catalog", "--data-dir", str(root), "--backbone",
            "ensemble:efficientnet_lite0,efficientnet_lite1,efficientnet_lite2", "--index", "Flat", "--k", "3",
            "--finetune", "--json", "--quiet", "--runtime", "eager", "--workers", "0", "--loss", "norm_softmax",
            "--epochs", "3", "--cost-images", "3"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    for key in ("precision_at_k", "precision_at_k_ci", "baseline_precision_at_k", "category_accuracy",
                "category_accuracy_ci", "precision_at_k_gain", "precision_at_k_gains", "references", "cost"):
        assert key in record, key
    assert record["baseline"]["backbone"] == "efficientnet_lite0"
    assert set(record["precision_at_k_gains"]) == {"over_frozen", "over_finetuned"}
    chosen = record["finetune"]["chosen"]
    assert chosen["features"].startswith("ensemble:efficientnet_lite")
    assert record["finetune"]["candidates_compared"] >= 21
    assert [row["model"] for row in record["cost"]["models"]] == ["chosen", "efficientnet_lite0"]


def test_search_stage_writes_the_model_of_record_and_the_report_section(two_worlds):
    from fashionrec.pipeline import report
    from fashionrec.pipeline.stages import run_dir, stage_prepare, stage_search

    stage_prepare("worlds", "catalog", data_dir=two_worlds, progress=False)
    stage = stage_search("worlds", "ensemble:colorhist,test_bright_half", k=3, losses=("norm_softmax",),
                         hidden_dims=(16, 32), cost_images=4, progress=False)
    out = run_dir("worlds")
    assert stage.served_name.startswith("ensemble:colorhist+head:") and (out / "best.pt").is_file()
    assert get_backbone(stage.served_name).dim == stage.result.record["finetune"]["dim"]
    assert list(stage.table["model"]) == ["colorhist (frozen)", "colorhist + head (--finetune)",
                                          "chosen, ranked by similarity alone", "chosen, with its ranking"]
    chosen = stage.table.iloc[-1]
    assert chosen["precision_at_k_low"] <= chosen["precision_at_k"] <= chosen["precision_at_k_high"]
    # Validation numbers for every candidate, query numbers only for the chosen one and the references.
    candidates = pd.read_csv(out / "search_candidates.csv")
    assert set(candidates.columns) >= {"features", "loss", "boost", "select_precision_at_k", "select_precision_at_k_ci"}
    assert not any("query" in column for column in candidates.columns)
    assert set(stage.cost["model"]) >= {"chosen (serving)", "ensemble:colorhist", "ensemble:test_bright_half"}
    assert (stage.cost["seconds_per_image"] > 0).all()
    section = "\n".join(report._search_section(out, 3))
    assert "**Numbers marked 'select' are validation numbers.**" in section
    assert stage.served_name in section and "Paired gain in P@3 over `colorhist` frozen" in section
    timings = "\n".join(report._timings_section(out))
    assert "measured in one run on 4 query images" in timings
    # A rerun reuses the model: the metrics files are byte-identical.
    before = {name: (out / name).read_bytes() for name in ("search.csv", "search_metrics.json",
                                                          "search_candidates.csv")}
    stage_search("worlds", "ensemble:colorhist,test_bright_half", k=3, losses=("norm_softmax",), hidden_dims=(16, 32),
                 cost_images=0, progress=False)
    assert all((out / name).read_bytes() == content for name, content in before.items())


def test_the_searched_model_serves_by_name_with_its_classifier_and_its_ranking(two_worlds, tmp_path):
    from fashionrec import Recommender
    from fashionrec.models.finetuned import load_model, save_model

    prepared = prepare("catalog", two_worlds, progress=False)
    result = search_finetuned(prepared, "ensemble:colorhist,test_bright_half", SMALL, k=3, settings=EAGER,
                              reference=False, model_path=tmp_path / "best.pt")
    payload = load_model(tmp_path / "best.pt")
    payload.ranking = {"boost": "inf", "categories": "predicted"}     # rank within the predicted category
    save_model(payload, tmp_path / "best.pt")
    catalog = prepared.catalog
    gallery = catalog[catalog["split"] == "gallery"][["id", "path", "label"]]
    recommender = Recommender.build(tmp_path / "index", gallery, f"{payload['backbone']}+head:{tmp_path / 'best.pt'}",
                                    settings=EAGER)
    assert recommender.has_classifier and recommender.info["ranking"]["boost"] == "inf"
    predicted = dict(zip(result.metadata["id"], result.predicted))
    for row in catalog[catalog["split"] == "query"].head(4).itertuples():
        answer = recommender.recommend(row.path, k=5)
        assert answer.predicted_category == predicted[row.id]      # the batch path's classifier, on one photo
        assert [item.label for item in answer.results] == [predicted[row.id]] * 5
