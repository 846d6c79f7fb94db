"""Combinations as backbones: members and views embedded and cached on their own, combined as documented."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import write_color_image
from fashionrec.data.catalog import load_folder
from fashionrec.errors import FashionRecError, UnknownBackbone
from fashionrec.data.prepared import prepare
from fashionrec.experiment.evaluate import embed
from fashionrec.features.embed import cache_dir_for, embed_catalog
from fashionrec.models.ensemble import (CombinedBackbone, embed_images, parse_combined_name, preprocessing)
from fashionrec.models.finetuned import save_model
from fashionrec.models.classifier import l2_normalize
from fashionrec.models.projection import project
from fashionrec.models.registry import check_backbone_name, get_backbone
from fashionrec.models.runtime import with_runtime
from fashionrec.models.views import HorizontalFlip, view_backbone
from fashionrec.settings import InferenceSettings
from fashionrec.training.finetune import head_payload
from fashionrec.training.heads import HeadConfig, fit_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EAGER = InferenceSettings(batch_size=8, workers=0, progress=False, runtime="eager")
LITE_AND_HIST = "ensemble:colorhist,efficientnet_lite0"


@pytest.fixture
def shop(tmp_path):
    """A folder catalog of three colours, 6 images each: enough for a split, small enough for a real network."""
    root = tmp_path / "shop"
    for label, color in (("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 210))):
        for i in range(6):
            write_color_image(root / label / f"{label}-{i}.jpg", color, size=(64, 80))
    return root


def test_names_parse_into_members_and_views_and_bad_names_say_why():
    combine, members = parse_combined_name("ensemble:efficientnet_lite0@centre_crop+flip,efficientnet_lite1")
    assert combine == "concat"
    assert [(m.backbone, m.views, m.views_named) for m in members] == [
        ("efficientnet_lite0", ("centre_crop", "flip"), True), ("efficientnet_lite1", ("centre_crop",), False)]
    assert members[0].name == "efficientnet_lite0@centre_crop+flip" and members[1].name == "efficientnet_lite1"
    assert parse_combined_name("efficientnet_lite0@squash")[0] == "mean"
    check_backbone_name("ensemble:colorhist,efficientnet_lite2@flip+squash")
    check_backbone_name(f"{LITE_AND_HIST}+head:somewhere.pt")
    with pytest.raises(UnknownBackbone, match="unknown view 'zoom'"):
        check_backbone_name("ensemble:efficientnet_lite0@zoom")
    with pytest.raises(UnknownBackbone, match="empty member"):
        check_backbone_name("ensemble:efficientnet_lite0,")
    with pytest.raises(UnknownBackbone, match="named twice"):
        check_backbone_name("efficientnet_lite0@flip+flip")
    with pytest.raises(UnknownBackbone, match="unknown backbone 'nope'"):
        check_backbone_name("ensemble:efficientnet_lite0,nope")
    with pytest.raises(FashionRecError, match="weights-file"):
        get_backbone(LITE_AND_HIST, weights_file="x.pth")


def test_ensemble_is_the_normalised_concatenation_of_its_members_each_cached_once(shop):
    prepared = prepare("folder", shop, progress=False)
    combined = embed(prepared, LITE_AND_HIST, settings=EAGER)
    hist = embed(prepared, "colorhist", settings=EAGER)
    lite = embed(prepared, "efficientnet_lite0", settings=EAGER)
    assert combined.vectors.shape == (18, 512 + 1280)
    expected = l2_normalize(np.hstack([l2_normalize(hist.vectors), l2_normalize(lite.vectors)]))
    assert np.allclose(combined.vectors, expected, atol=1e-6)
    assert combined.metadata["id"].tolist() == hist.metadata["id"].tolist()
    # The members were computed once, by the ensemble, in their own caches; asked alone, they were reused.
    assert combined.n_computed == 18 and (hist.n_computed, lite.n_computed) == (0, 0)
    assert cache_dir_for(get_backbone("efficientnet_lite0")).is_dir()
    assert embed(prepared, LITE_AND_HIST, settings=EAGER).n_computed == 0
    # Cosine of two concatenations of unit members = the mean of the members' cosines.
    cosine = combined.vectors[0] @ combined.vectors[1]
    members = [l2_normalize(v.vectors) for v in (hist, lite)]
    assert cosine == pytest.approx(np.mean([m[0] @ m[1] for m in members]), abs=1e-5)

    backbone = get_backbone(LITE_AND_HIST)
    assert isinstance(backbone, CombinedBackbone) and backbone.dim == 1792
    assert backbone.cache_key != get_backbone("ensemble:efficientnet_lite0,colorhist").cache_key
    rows = [row["part"] for row in preprocessing(backbone)]
    assert rows == ["colorhist", "efficientnet_lite0"]
    assert "CenterCrop(size=(224, 224))" in preprocessing(backbone)[1]["transform"]
    # The single-image path (serving): PIL images and paths give the catalog's vectors.
    paths = combined.metadata["path"].tolist()[:3]
    from_paths = embed_images(backbone, paths)
    from_images = embed_images(backbone, [Image.open(p) for p in paths])
    assert np.allclose(from_paths, combined.vectors[:3], atol=1e-5)
    assert np.allclose(from_images, combined.vectors[:3], atol=1e-5)


def test_views_of_one_member_are_averaged_and_flip_is_the_mirror_image(tmp_path):
    lite = get_backbone("efficientnet_lite0")
    pixels = np.zeros((300, 240, 3), np.uint8)
    pixels[:, :120] = (230, 40, 40)      # red left half, blue right half: not mirror-symmetric
    pixels[:, 120:] = (40, 40, 230)
    image, mirrored = Image.fromarray(pixels), Image.fromarray(pixels[:, ::-1].copy())
    flip = view_backbone(lite, "flip")
    assert isinstance(flip.transform.transforms[-1], HorizontalFlip)
    assert torch.allclose(flip.transform(image), lite.transform(mirrored), atol=1e-6)
    assert flip.cache_key != lite.cache_key and flip.name == lite.name

    averaged = get_backbone("efficientnet_lite0@centre_crop+flip")
    assert averaged.dim == 1280 and averaged.combine == "mean"
    both = embed_images(averaged, [image])
    centre, mirror = embed_images(lite, [image]), embed_images(lite, [mirrored])
    assert np.allclose(both, l2_normalize(l2_normalize(centre) + l2_normalize(mirror)), atol=1e-5)
    # Views concatenated are members of an ensemble; their leaves share caches with the classifier's views.
    concatenated = get_backbone("ensemble:efficientnet_lite0@centre_crop,efficientnet_lite0@squash")
    assert concatenated.dim == 2560
    assert concatenated.leaves()[1].cache_key == view_backbone(lite, "squash").cache_key
    with pytest.raises(FashionRecError, match="Resize -> CenterCrop"):
        get_backbone("colorhist@squash")


def test_runtime_applies_to_every_leaf_and_changes_the_key(shop):
    backbone = get_backbone(LITE_AND_HIST)
    eager = with_runtime(backbone, "eager")
    assert [leaf.cache_key for leaf in eager.leaves()] == [leaf.cache_key for leaf in backbone.leaves()]
    drafted = with_runtime(backbone, "eager", draft=True)
    assert drafted.cache_key != backbone.cache_key
    assert all(getattr(leaf.transform, "draft_size", None) for leaf in drafted.leaves())


def test_a_head_on_a_combination_loads_by_name(shop, tmp_path):
    catalog = load_folder(shop, progress=False).catalog
    base = get_backbone(LITE_AND_HIST)
    frozen = embed_catalog(catalog, base, EAGER)
    cfg = HeadConfig(hidden_dim=16, out_dim=8, epochs=3, batch_size=8, refit=False)
    fit = fit_head(frozen.vectors, frozen.metadata["label"], cfg, losses=("norm_softmax",), progress=False)
    path = save_model(head_payload(fit, base, cfg, "fingerprint", len(catalog)), tmp_path / "head.pt")
    headed = get_backbone(f"{LITE_AND_HIST}+head:{path}")
    assert isinstance(headed, CombinedBackbone) and headed.dim == 8
    assert headed.cache_key != base.cache_key
    out = embed_catalog(catalog, headed, EAGER)
    assert out.n_computed == 0   # the members' caches serve the fine-tuned combination too
    assert np.allclose(out.vectors, project(fit.head, frozen.vectors), atol=1e-5)
    assert np.allclose(embed_images(headed, catalog["path"].tolist()[:2]), out.vectors[:2], atol=1e-5)


def test_cli_evaluates_an_ensemble_and_refuses_a_bad_view_in_one_line(shop, capsys):
    from fashionrec.cli import main

    argv = ["evaluate", "--dataset", "folder", "--data-dir", str(shop), "--backbone", LITE_AND_HIST, "--k", "3",
            "--runtime", "eager", "--workers", "0", "--json", "--quiet"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["backbone"] == LITE_AND_HIST and record["n_queries"] == 3
    assert [row["part"] for row in record["preprocessing"]] == ["colorhist", "efficientnet_lite0"]
    assert main([*argv[:5], "--backbone", "ensemble:efficientnet_lite0@zoom", *argv[7:]]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "unknown view 'zoom'" in error[0]


@pytest.mark.integration
def test_an_index_of_a_combination_answers_single_photos_as_the_batch_path_embedded_them(tmp_path):
    """ONNX runtime, large JPEGs: every leaf decodes the query at its own draft size, as the catalog was."""
    from conftest import write_product_image
    from fashionrec import Recommender

    rows = []
    for i in range(24):
        path = write_product_image(tmp_path / "shop" / f"item-{i:02d}.jpg", seed=i, category=i % 3, size=(560, 640))
        rows.append({"id": path.name, "path": str(path), "label": f"shape{i % 3}"})
    catalog = pd.DataFrame(rows)
    name = "ensemble:colorhist,efficientnet_lite0@centre_crop+squash"
    settings = InferenceSettings(batch_size=8, workers=0, progress=False)
    recommender = Recommender.build(tmp_path / "index", catalog, name, settings=settings)
    info = recommender.info
    assert info["query_model"]["path"] == "combined" and info["query_model"]["check"]["max_relative_difference"] <= 1e-4
    assert [leaf["part"] for leaf in info["preprocessing"]["leaves"]] == [
        "colorhist", "efficientnet_lite0", "efficientnet_lite0@squash"]
    assert info["backbone"]["dim"] == 512 + 1280
    answer = Recommender.load(tmp_path / "index").recommend(rows[5]["path"], k=3)
    assert answer.results[0].id == rows[5]["id"] and answer.results[0].score == pytest.approx(1.0, abs=1e-3)

