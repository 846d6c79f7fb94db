"""Fine-tuning: the head learns category structure, is seeded, saves and loads as a backbone name,
and a catalog of many tiny categories is reported rather than crashed on."""
from __future__ import annotations

import dataclasses

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import write_color_image
from fashionrec import config
from fashionrec.errors import FashionRecError
from fashionrec.models.classifier import CategoryClassifier
from fashionrec.models.finetuned import head_from_payload, load_model, save_model
from fashionrec.models.projection import project
from fashionrec.models.classifier import multi_view_features
from fashionrec.models.views import MULTI_VIEW_FEATURES, view_backbone, view_transform
from fashionrec.training.classify import (category_aware_on_queries, category_metrics, choose_category_boost,
                                         select_classifier, train_classifier)
from fashionrec.training.finetune import head_payload
from fashionrec.training.heads import (LOSSES, HeadConfig, fit_head, leave_one_out_precision, train_head,
                                       validation_precision, validation_split, validation_uses_fit_rows)
from fashionrec.models.registry import get_backbone
from fashionrec.errors import WeightsUnavailable

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = HeadConfig(hidden_dim=64, out_dim=32, epochs=40, patience=8, batch_size=64, k=10,
                            classifier_c=(0.1,))


def clusters(n_per_class=60, n_classes=6, dim=48, seed=0):
    """Gaussian categories hidden in 8 informative dimensions, swamped by 16 loud nuisance ones:
    raw cosine neighbours mostly come from other categories, a learnt projection separates them."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 1.0, (n_classes, 8)) * 1.5
    vectors, labels = [], []
    for c in range(n_classes):
        x = rng.normal(0.0, 1.0, (n_per_class, dim))
        x[:, :8] += means[c]
        x[:, 8:24] *= 4.0
        vectors.append(x)
        labels += [f"cat{c}"] * n_per_class
    vectors = np.concatenate(vectors).astype(np.float32)
    labels = np.array(labels)
    order = np.random.default_rng(seed + 1).permutation(len(labels))
    return vectors[order], labels[order]


def test_validation_split_is_stratified_and_reports_small_categories():
    labels = np.array(["a"] * 20 + ["b"] * 10 + ["c"] * 2 + ["d"])
    val, not_validated = validation_split(labels, 0.2, seed=0)
    assert val[labels == "a"].sum() == 4 and val[labels == "b"].sum() == 2
    assert not val[np.isin(labels, ["c", "d"])].any()
    assert [entry["label"] for entry in not_validated] == ["c", "d"]
    again, _ = validation_split(labels, 0.2, seed=0)
    assert np.array_equal(val, again)
    # Validation images rank each other, unless most have no other image of their category.
    assert not validation_uses_fit_rows(labels[val])
    assert validation_uses_fit_rows(["a", "b", "c", "c"]) is False
    assert validation_uses_fit_rows(["a", "b", "c", "d", "d"]) is True


def test_validation_precision_with_one_image_per_category_ranks_the_fit_rows():
    vectors, labels = clusters(n_per_class=12, n_classes=5)
    val = np.zeros(len(labels), dtype=bool)
    for label in set(labels):
        val[np.flatnonzero(labels == label)[0]] = True
    within = leave_one_out_precision(vectors[val], labels[val], k=3)
    ranked = validation_precision(vectors[val], labels[val], vectors[~val], labels[~val], k=3)
    assert within == 0.0 < ranked


def test_head_improves_precision_on_held_out_clusters():
    vectors, labels = clusters()
    train, test = slice(0, 240), slice(240, None)
    raw = leave_one_out_precision(vectors[test], labels[test], k=10)
    fit = fit_head(vectors[train], labels[train], SMALL, losses=("norm_softmax", "supcon"), progress=False)
    trained = leave_one_out_precision(project(fit.head, vectors[test]), labels[test], k=10)
    assert set(fit.comparison["loss"]) == {"norm_softmax", "supcon"}
    assert fit.loss_name == fit.comparison.sort_values("val_precision_at_k").iloc[-1]["loss"]
    assert trained > raw + 0.15, (raw, trained)
    out = project(fit.head, vectors[:5])
    assert out.shape == (5, 32) and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_and_is_deterministic(loss):
    vectors, labels = clusters(n_per_class=30, n_classes=4, dim=24)
    categories = sorted(set(labels))
    cfg = HeadConfig(hidden_dim=32, out_dim=16, epochs=4, batch_size=32, seed=3)
    first = train_head(vectors, labels, categories, loss, cfg, progress=False)
    second = train_head(vectors, labels, categories, loss, cfg, progress=False)
    other = train_head(vectors, labels, categories, loss, HeadConfig(
        hidden_dim=32, out_dim=16, epochs=4, batch_size=32, seed=4), progress=False)
    for key, value in first.head.state_dict().items():
        assert torch.equal(value, second.head.state_dict()[key]), key
    assert not torch.equal(first.head.layers[1].weight, other.head.layers[1].weight)
    assert np.isfinite([entry["loss"] for entry in first.history]).all()
    assert first.history[-1]["loss"] < first.history[0]["loss"]


def test_classifier_selection_and_metrics():
    vectors, labels = clusters(n_per_class=40, n_classes=3)
    val, _ = validation_split(labels, 0.2)
    classifier, table, val_predicted = select_classifier(vectors, labels, val, cs=(0.1, 1.0))
    assert len(table) == 2 and classifier.features == "frozen"
    # The validation predictions come from a classifier fitted without the validation rows.
    best = table["val_accuracy"].max()
    assert len(val_predicted) == val.sum() and (val_predicted == labels[val]).mean() == pytest.approx(best)
    metrics = category_metrics(labels, classifier.predict(vectors), classifier.categories)
    assert metrics["accuracy"] > 0.9 and 0 < metrics["macro_f1"] <= 1
    low, high = metrics["accuracy_ci"]
    assert low < metrics["accuracy"] <= high <= 1.0
    half = category_metrics(["a", "b"] * 50, ["a", "a"] * 50)
    assert half["accuracy"] == 0.5 and half["accuracy_ci"][0] < 0.5 < half["accuracy_ci"][1]
    matrix = np.array(metrics["confusion_matrix"]["matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == len(labels)
    restored = CategoryClassifier.from_payload(classifier.to_payload())
    assert np.array_equal(restored.predict(vectors), classifier.predict(vectors))
    # Two categories and one category still give a usable classifier.
    two = train_classifier(vectors[labels != "cat2"], labels[labels != "cat2"])
    assert set(two.predict(vectors)) <= {"cat0", "cat1"}
    one = train_classifier(vectors[:5], ["only"] * 5)
    assert set(one.predict(vectors)) == {"only"}


def test_category_boost_is_chosen_on_validation_and_kept_only_when_it_helps():
    vectors, labels = clusters(n_per_class=30, n_classes=4)
    order = np.random.default_rng(0).permutation(len(labels))
    validation, ranked = order[:40], order[40:]
    table, choice = choose_category_boost(vectors[validation], vectors[ranked], labels[validation], labels[ranked],
                                          labels[validation], k=10)
    assert list(table["boost"]) == [0.0, 0.05, 0.1, 0.2, "inf"]
    assert choice["boost"] == choice["best_on_validation"] and choice["boost"] != 0.0
    assert choice["validation_gain_over_plain"]["low"] > 0 and table["chosen"].sum() == 1
    # Predictions that are always wrong never help: the plain ranking stays.
    wrong = np.roll(labels[validation], 1)
    wrong[wrong == labels[validation]] = "nowhere"
    _, none = choose_category_boost(vectors[validation], vectors[ranked], labels[validation], labels[ranked], wrong,
                                    k=10)
    assert none["boost"] == 0.0

    on_queries = category_aware_on_queries(vectors[validation], vectors[ranked], labels[validation], labels[ranked],
                                           labels[validation], "inf", k=10)
    assert on_queries["chosen"]["precision_at_k"] == 1.0 > on_queries["plain"]["precision_at_k"]
    low, high = on_queries["plain"]["precision_at_k_ci"]
    assert low <= on_queries["plain"]["precision_at_k"] <= high
    assert on_queries["gain"]["diff"] == pytest.approx(1.0 - on_queries["plain"]["precision_at_k"])


def _colorhist_head(tmp_path, folder):
    """A tiny head on colour histograms of the conftest colour folder, saved as a model file."""
    base = get_backbone("colorhist")
    from fashionrec.data.images import load_image

    paths = sorted(folder.rglob("*.jpg"))
    labels = np.array([p.parent.name for p in paths])
    with torch.no_grad():
        frozen = base.model(torch.stack([base.transform(load_image(p)) for p in paths])).numpy()
    cfg = HeadConfig(hidden_dim=16, out_dim=8, epochs=3, batch_size=16, refit=False)
    fit = fit_head(frozen, labels, cfg, losses=("norm_softmax",), progress=False)
    payload = head_payload(fit, base, cfg, "fingerprint", len(labels), metrics={"precision_at_k": 1.0})
    return base, paths, frozen, fit, payload


def test_model_file_round_trip_and_head_backbone_name(tmp_path, color_folder, monkeypatch):
    base, paths, frozen, fit, payload = _colorhist_head(tmp_path, color_folder)
    path = save_model(payload, tmp_path / "head.pt")
    loaded = load_model(path)
    assert loaded["train_fingerprint"] == "fingerprint" and loaded["metrics"]["precision_at_k"] == 1.0
    assert loaded["backbone"] == "colorhist" and loaded["level"] == 1
    head = head_from_payload(loaded)
    assert np.allclose(project(head, frozen), project(fit.head, frozen), atol=1e-6)

    headed = get_backbone(f"colorhist+head:{path}")
    assert headed.dim == 8 and headed.cache_key != base.cache_key
    assert headed.weights_sha256 != base.weights_sha256
    from fashionrec.data.images import load_image

    with torch.no_grad():
        out = headed.model(torch.stack([headed.transform(load_image(p)) for p in paths[:4]])).numpy()
    assert np.allclose(out, project(fit.head, frozen[:4]), atol=1e-5)

    # A run name resolves to results/<run>/head.pt; the name stays a valid file name.
    save_model(payload, config.RESULTS_DIR / "my-run" / "head.pt")
    assert get_backbone("colorhist+head:my-run").dim == 8
    # Other parameters -> another cache key; metadata alone (metrics) leaves it unchanged.
    save_model(dataclasses.replace(payload, metrics={"precision_at_k": 0.5}), path)
    assert get_backbone(f"colorhist+head:{path}").cache_key == headed.cache_key
    changed = {k: v + 1 if k.endswith("bias") else v for k, v in payload["state_dict"].items()}
    save_model(dataclasses.replace(payload, state_dict=changed), path)
    assert get_backbone(f"colorhist+head:{path}").cache_key != headed.cache_key

    with pytest.raises(WeightsUnavailable, match="not found"):
        get_backbone("colorhist+head:no-such-run")
    with pytest.raises(WeightsUnavailable, match="not for"):
        get_backbone(f"efficientnet_lite0+head:{path}")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(WeightsUnavailable):
        get_backbone(f"colorhist+head:{tmp_path / 'junk.pt'}")


def _tiny_category_catalog(root):
    """Four colour categories with 10 images each, plus categories of 1, 2, 3 and 4 images."""
    colors = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210), "yellow": (230, 220, 40)}
    rows = []
    for label, color in colors.items():
        for i in range(10):
            rows.append({"path": f"img/{label}-{i}.png", "label": label})
            write_color_image(root / rows[-1]["path"], color)
    for n, color in zip((1, 2, 3, 4), ((120, 120, 120), (250, 250, 250), (10, 10, 10), (200, 100, 0))):
        for i in range(n):
            rows.append({"path": f"img/tiny{n}-{i}.png", "label": f"tiny{n}"})
            write_color_image(root / rows[-1]["path"], color)
    pd.DataFrame(rows).to_csv(root / "catalog.csv", index=False)
    return root


def test_cli_finetune_on_many_small_categories(tmp_path, capsys):
    from fashionrec.cli import main

    root = _tiny_category_catalog(tmp_path / "shop")
    argv = ["evaluate", "--dataset", "catalog", "--data-dir", str(root), "--backbone", "colorhist", "--index",
            "Flat", "--k", "5", "--finetune", "--epochs", "5", "--loss", "norm_softmax", "--json", "--quiet",
            "--workers", "0", "--head-out", str(tmp_path / "run" / "head.pt")]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    # The keys evaluate always prints, with the fine-tuned metrics at the top level.
    for key in ("precision_at_k", "precision_at_k_ci", "hit_rate_at_k", "map_at_k", "per_category", "n_queries",
                "dataset_fingerprint", "backbone", "timing", "versions"):
        assert key in record, key
    for key in ("category_accuracy", "macro_f1", "baseline_precision_at_k", "train_seconds", "finetune"):
        assert key in record, key
    assert {entry["label"] for entry in record["skipped_categories"]} == {"tiny1", "tiny2"}
    assert {entry["label"] for entry in record["finetune"]["categories_without_validation"]} >= {"tiny3", "tiny4"}
    assert 0.0 <= record["category_accuracy"] <= 1.0
    matrix = np.array(record["classification"]["confusion_matrix"]["matrix"])
    assert matrix.sum() == record["n_queries"]
    assert (tmp_path / "run" / "head.pt").is_file()
    assert record["finetune"]["reused_cached_model"] is False

    # Same data and settings: the cached model is reused, and the numbers are the same.
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["finetune"]["reused_cached_model"] is True
    assert again["precision_at_k"] == record["precision_at_k"]
    assert again["category_accuracy"] == record["category_accuracy"]
    saved = load_model(tmp_path / "run" / "head.pt")
    assert saved["metrics"]["precision_at_k"] == pytest.approx(record["precision_at_k"], abs=1e-6)
    assert saved["train_fingerprint"] == record["finetune"]["train_fingerprint"]


def test_finetune_stage_writes_the_model_of_record_and_the_report_section(tmp_path):
    from fashionrec.pipeline import report
    from fashionrec.pipeline.stages import run_dir, stage_finetune, stage_prepare

    root = _tiny_category_catalog(tmp_path / "shop")
    stage_prepare("tiny", "catalog", data_dir=root, progress=False)
    stage = stage_finetune("tiny", "colorhist", k=5, losses=("norm_softmax",), progress=False)
    out = run_dir("tiny")
    assert stage.level2 is None and stage.chosen is stage.level1
    assert stage.headed_name == "colorhist+head:tiny" and get_backbone(stage.headed_name).dim == stage.level1.vectors.shape[1]

    table = pd.read_csv(out / "finetune.csv")
    assert list(table["level"]) == [0, 1]
    frozen, tuned = table.iloc[0], table.iloc[1]
    assert frozen["precision_at_k"] == pytest.approx(stage.level1.record["baseline_precision_at_k"], abs=1e-6)
    assert tuned["precision_at_k_low"] <= tuned["precision_at_k"] <= tuned["precision_at_k_high"]
    assert tuned["gain_vs_frozen"] == pytest.approx(tuned["precision_at_k"] - frozen["precision_at_k"], abs=1e-6)
    assert tuned["category_accuracy"] == stage.level1.record["category_accuracy"]
    metrics = json.loads((out / "finetune_metrics.json").read_text())
    assert metrics["chosen_level"] == 1 and metrics["level2"] is None
    assert "train_seconds" not in (out / "finetune.csv").read_text()

    section = "\n".join(report._finetune_section(out, 5))
    assert "Model of record: level 1" in section and "colorhist+head:tiny" in section
    assert f"accuracy {metrics['level1']['classification']['accuracy']:.3f}" in section
    aware = metrics["level1"]["category_aware"]
    assert "Category-aware ranking" in section and f"Chosen on: {aware['chosen_on']}" in section
    assert set(aware["query"]) == {"plain", "chosen"}   # one setting on the queries, chosen on validation
    timings = "\n".join(report._timings_section(out))
    assert f"{json.loads((out / 'finetune_timing.json').read_text())['level1_train_seconds']:.1f} s" in timings


def test_classifier_views_change_only_the_geometry_of_the_lite_transform():
    from PIL import Image
    from torchvision import transforms

    lite = get_backbone("efficientnet_lite0")
    # A portrait photo: 12-pixel red left edge, blue right edge, grey elsewhere.
    pixels = np.full((400, 300, 3), 128, np.uint8)
    pixels[:, :12] = (255, 0, 0)
    pixels[:, -12:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    centre = lite.transform(image)
    squash = view_transform(lite.transform, "squash")(image)
    shorter = view_transform(lite.transform, "shorter_side")(image)
    assert centre.shape == squash.shape == shorter.shape == (3, 224, 224)
    red = lambda x: float(x[0, 112, :4].mean() - x[2, 112, :4].mean())  # noqa: E731  (left edge: red minus blue)
    # The retrieval view (resize 256, crop 224) cuts the edges; both extra views keep the whole width.
    assert red(centre) < 0.5 < red(squash) and red(shorter) > 0.5
    # The squash view also keeps the whole height: the image is not cropped at all.
    steps = view_transform(lite.transform, "squash").transforms
    assert not any(isinstance(step, transforms.CenterCrop) for step in steps)
    assert isinstance(steps[-1], transforms.Normalize) and steps[-1].mean == lite.transform.transforms[-1].mean
    view = view_backbone(lite, "squash")
    assert view.cache_key != lite.cache_key and view.model is lite.model
    with pytest.raises(FashionRecError, match="Resize -> CenterCrop"):
        view_transform(get_backbone("colorhist").transform, "squash")
    with pytest.raises(ValueError, match="unknown classifier view"):
        view_transform(lite.transform, "zoom")


def test_multi_view_classifier_is_a_candidate_chosen_on_validation():
    vectors, labels = clusters(n_per_class=50)
    rng = np.random.default_rng(0)
    # A second "view" that carries the category cleanly: the multi-view features must win on validation.
    informative = np.eye(6)[[int(label[-1]) for label in labels]] + rng.normal(0, 0.05, (len(labels), 6))
    multi = multi_view_features(vectors, [informative.astype(np.float32)])
    assert multi.shape == (len(labels), vectors.shape[1] + 6)
    assert np.allclose(np.linalg.norm(multi[:, :vectors.shape[1]], axis=1), 1, atol=1e-5)
    val_mask, _ = validation_split(labels, seed=0)
    classifier, table, _ = select_classifier(vectors, labels, val_mask, cs=(1.0,), multi_view=multi)
    assert set(table["features"]) == {"frozen", MULTI_VIEW_FEATURES}
    assert classifier.features == MULTI_VIEW_FEATURES
    assert (classifier.predict(multi) == labels).mean() > 0.95
