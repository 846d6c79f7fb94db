"""fashionrec.runtime: ONNX Runtime backbones equal eager ones, never share their cache, int8 only on request."""
from __future__ import annotations

import argparse
import inspect

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fashionrec import config
from fashionrec.models import runtime
from fashionrec.settings import InferenceSettings
from fashionrec.cli import build_parser
from fashionrec.models.registry import get_backbone
from fashionrec.features.embed import SHARD_SIZE, _shard_batches, cache_dir_for, embed_catalog
from fashionrec.data.images import load_image

N_PHOTOS = 8


@pytest.fixture(scope="module")
def lite0():
    return get_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def interim(tmp_path_factory):
    """One derived-data dir for the whole module, so the ~10 s export runs once."""
    return tmp_path_factory.mktemp("interim")


@pytest.fixture(autouse=True)
def shared_interim(isolated_data_dirs, interim, monkeypatch):
    monkeypatch.setattr(config, "INTERIM_DIR", interim)


@pytest.fixture(scope="module")
def lite0_onnx(lite0, interim):
    saved, config.INTERIM_DIR = config.INTERIM_DIR, interim
    try:
        return runtime.onnx_backbone(lite0, threads=2)
    finally:
        config.INTERIM_DIR = saved


@pytest.fixture
def photos(clothing_dir) -> list[str]:
    table = pd.read_csv(clothing_dir / "images.csv", dtype=str)
    return [str(clothing_dir / "images" / f"{name}.jpg") for name in table["image"].iloc[:N_PHOTOS]]


def _relative_error(actual, expected) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def test_onnx_lite0_equals_eager_on_real_photos(lite0, lite0_onnx, photos):
    fast = lite0_onnx
    batch = torch.stack([lite0.transform(load_image(path)) for path in photos])
    with torch.inference_mode():
        expected = lite0.model(batch).numpy()
        actual = fast.model(batch).numpy()
        single = fast.model(batch[:1]).numpy()  # the batch axis is dynamic
    assert actual.shape == expected.shape == (N_PHOTOS, lite0.dim)
    assert _relative_error(actual, expected) < 1e-4
    assert _relative_error(single, expected[:1]) < 1e-4


def test_the_fast_path_end_to_end_equals_eager_on_real_photos(lite0, lite0_onnx, photos, tmp_path):
    fast = lite0_onnx
    catalog = pd.DataFrame({"id": photos, "path": photos, "label": "x"})
    eager = embed_catalog(catalog, lite0, InferenceSettings(batch_size=4, workers=1, progress=False))
    onnx = embed_catalog(catalog, fast, InferenceSettings(batch_size=4, workers=1, progress=False))
    assert _relative_error(onnx.vectors, eager.vectors) < 1e-4
    assert onnx.cache_key != eager.cache_key
    assert cache_dir_for(fast) != cache_dir_for(lite0)


def test_colorhist_stays_eager_and_exports_correctly_if_asked(photos):
    colorhist = get_backbone("colorhist")
    fast = runtime.with_runtime(colorhist, "onnx")
    assert fast.model is colorhist.model and runtime.runtime_of(fast) == "eager"
    # Draft decoding still applies, so it is a different cache.
    assert fast.transform.draft_size == 128 and fast.cache_key != colorhist.cache_key
    assert runtime.with_runtime(colorhist, "onnx", draft=False).cache_key == colorhist.cache_key


def test_cache_keys_differ_between_runtimes_and_eager_is_untouched(lite0, lite0_onnx):
    fast = lite0_onnx
    eager = runtime.with_runtime(lite0, "eager")
    assert eager is lite0 and eager.cache_key == lite0.cache_key
    undrafted = runtime.onnx_backbone(lite0, draft=False)
    keys = {lite0.cache_key, fast.cache_key, undrafted.cache_key,
            runtime.with_runtime(lite0, "eager", draft=True).cache_key}
    assert len(keys) == 4
    # Threads change speed, not results: same key.
    assert runtime.onnx_backbone(lite0, threads=1).cache_key == fast.cache_key
    assert runtime.runtime_of(fast) == "onnx" and runtime.runtime_of(lite0) == "eager"


def test_the_export_is_cached_and_reused(lite0, lite0_onnx, interim, monkeypatch):
    fast = lite0_onnx
    exported = [path for path in (interim / "onnx").glob("*.onnx") if "int8" not in path.name]
    assert [path.name for path in exported] == [runtime.onnx_path_for(lite0).name]
    assert not list((interim / "onnx").glob(".partial-*"))

    def no_export(*args, **kwargs):
        raise AssertionError("exported again instead of reusing the cached file")

    monkeypatch.setattr(runtime, "export_onnx", no_export)
    again = runtime.onnx_backbone(lite0)
    assert again.model.path == fast.model.path and again.cache_key == fast.cache_key


def test_int8_is_never_the_default(lite0):
    assert runtime.DEFAULT_RUNTIME == "onnx" and InferenceSettings().runtime == "onnx"
    assert inspect.signature(runtime.with_runtime).parameters["runtime"].default != "onnx-int8"
    parser = build_parser()
    for command in ("evaluate", "embed"):
        args = parser.parse_args([command, "--dataset", "folder", "--backbone", "efficientnet_lite0"])
        assert args.runtime == "onnx"
    with pytest.raises(ValueError, match="calibration"):
        runtime.with_runtime(lite0, "onnx-int8")
    with pytest.raises(ValueError, match="unknown runtime"):
        runtime.with_runtime(lite0, "int8")


@pytest.mark.integration
def test_int8_runs_and_stays_close_to_fp32(lite0, lite0_onnx, photos):
    quantized = runtime.with_runtime(lite0, "onnx-int8", threads=2, calibration_paths=photos[:4])
    assert runtime.runtime_of(quantized) == "onnx-int8"
    assert quantized.cache_key not in {lite0.cache_key, runtime.onnx_backbone(lite0).cache_key}
    batch = torch.stack([lite0.transform(load_image(path)) for path in photos[4:]])
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(lite0.model(batch), dim=1)
        actual = torch.nn.functional.normalize(quantized.model(batch), dim=1)
    assert (actual * expected).sum(dim=1).min() > 0.9  # cosine similarity to fp32


def test_draft_size_follows_the_first_resize(lite0):
    assert runtime.draft_size_for(lite0.transform) == 256  # Resize(224 + 32) then CenterCrop(224)
    assert runtime.draft_size_for(get_backbone("colorhist").transform) == 128
    assert runtime.draft_size_for(argparse.Namespace()) is None


def test_draft_decoding_keeps_at_least_the_requested_size(tmp_path):
    rng = np.random.default_rng(0)
    big = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 256, (1200, 1000, 3), dtype=np.uint8)).save(big)
    assert load_image(big).size == (1000, 1200)
    # Scale: the largest power of two <= min(1000 // size, 1200 // size), at most 8.
    assert load_image(big, draft_size=120).size == (125, 150)   # 1/8
    assert load_image(big, draft_size=200).size == (250, 300)   # 1/4 (5 -> 4)
    assert load_image(big, draft_size=400).size == (500, 600)   # 1/2
    assert load_image(big, draft_size=600).size == (1000, 1200)  # 1000 < 2 * 600: full size
    png = tmp_path / "big.png"
    Image.open(big).save(png)
    assert load_image(png, draft_size=256).size == (1000, 1200)  # only JPEGs are drafted


def test_batches_never_straddle_a_shard():
    batches = _shard_batches(2 * SHARD_SIZE + 5, 30)
    assert [i for batch in batches for i in batch] == list(range(2 * SHARD_SIZE + 5))
    for batch in batches:
        assert batch[0] // SHARD_SIZE == batch[-1] // SHARD_SIZE
        assert len(batch) <= 30
