"""The single-query path: exact Pillow geometry and the uint8 ONNX query model equal the batch path."""
from __future__ import annotations

import dataclasses
import multiprocessing

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.models import ResNet50_Weights

from fashionrec import config
from fashionrec.data.catalog import load_fashion_mnist
from fashionrec.data.images import load_image
from fashionrec.errors import FashionRecError
from fashionrec.models.preprocess import (Preprocessing, crop_pixels, geometry_is_exact, pillow_geometry,
                                         resize_and_crop)
from fashionrec.models import preprocess, query_model
from fashionrec.models.query_model import query_session, run_query_model, uint8_query_model
from fashionrec.models.registry import get_backbone
from fashionrec.models.runtime import onnx_backbone, with_runtime
from fashionrec.models.views import view_transform
from fashionrec.serving.networks import query_preprocessing

from conftest import CLOTHING_DIR, fashion_mnist_available


@pytest.fixture(scope="module")
def lite0():
    return get_backbone("efficientnet_lite0")


def _specs(lite0) -> dict[str, Preprocessing]:
    return {
        "lite0": Preprocessing.from_transform(lite0.transform),
        "squash view": Preprocessing.from_transform(view_transform(lite0.transform, "squash")),
        "shorter-side view": Preprocessing.from_transform(view_transform(lite0.transform, "shorter_side")),
        "resnet preset": Preprocessing.from_transform(ResNet50_Weights.IMAGENET1K_V2.transforms()),
        "lanczos, no crop": Preprocessing.from_transform(transforms.Compose(
            [transforms.Resize((96, 80), interpolation=transforms.InterpolationMode.LANCZOS), transforms.ToTensor()])),
    }


def test_transforms_are_described_as_data(lite0):
    spec = Preprocessing.from_transform(lite0.transform)
    assert (spec.resize, spec.interpolation, spec.crop, spec.scale) == (256, "bicubic", (224, 224), True)
    assert spec.mean == pytest.approx((127 / 255,) * 3) and spec.std == pytest.approx((128 / 255,) * 3)
    assert Preprocessing.from_dict(spec.to_dict()) == spec
    resnet = Preprocessing.from_transform(ResNet50_Weights.IMAGENET1K_V2.transforms())
    assert (resnet.resize, resnet.crop, resnet.interpolation) == (232, (224, 224), "bilinear")
    with pytest.raises(FashionRecError, match="cannot describe"):
        Preprocessing.from_transform(transforms.Compose([transforms.ToTensor(), transforms.RandomHorizontalFlip()]))


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_the_fast_geometry_equals_torchvision_pixel_for_pixel(lite0, seed, mode):
    """Random sizes cover both of Pillow's pass orders (tall images shrink vertically first),
    upscaling, one-axis resizes and odd sizes."""
    rng = np.random.default_rng(seed)
    sizes = [(400, 533), (533, 400), (400, 822), (224, 224), (256, 300), (40, 30), (3000, 90), (90, 3000), (1, 1),
             (1, 500), (500, 1), (2, 3)]
    sizes += [tuple(int(v) for v in rng.integers(20, 1200, 2)) for _ in range(40)]
    for name, spec in _specs(lite0).items():
        reference = spec.reference_geometry()
        for width, height in sizes:
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
            expected = np.asarray(reference(image))
            actual = resize_and_crop(image, spec)
            assert actual.shape == expected.shape and np.array_equal(actual, expected), (name, width, height)
            from_array = resize_and_crop(np.asarray(image), spec)   # what decode_rgb_array hands a query
            assert np.array_equal(from_array, expected), (name, width, height, "array")
        assert geometry_is_exact(spec)


def test_pillows_own_geometry_is_torchvisions_and_crop_pixels_gives_it_without_the_compiled_kernels(lite0):
    """What the start-up check compares with, and what a one-photo command uses, is torchvision's transform."""
    rng = np.random.default_rng(5)
    for name, spec in _specs(lite0).items():
        reference = spec.reference_geometry()
        for width, height in [*preprocess._CHECK_SHAPES, (3000, 90), (90, 3000), (20, 20), (1, 1)]:
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            expected = np.asarray(reference(image))
            assert np.array_equal(pillow_geometry(image, spec), expected), (name, width, height)
            assert np.array_equal(crop_pixels(np.asarray(image), spec, exact_shortcut=False), expected), name


@pytest.mark.parametrize("cpus", [1, 2])
def test_the_crop_is_the_same_whole_or_in_two_halves_on_two_threads(lite0, cpus, monkeypatch):
    monkeypatch.setattr(preprocess, "available_threads", lambda: cpus)
    spec = Preprocessing.from_transform(lite0.transform)
    assert spec.crop[0] >= preprocess.SPLIT_MIN_ROWS
    rng = np.random.default_rng(3)
    reference = spec.reference_geometry()
    for width, height in [(400, 533), (533, 400), (400, 900), (300, 1200), (256, 256)]:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        assert np.array_equal(resize_and_crop(pixels, spec), np.asarray(reference(Image.fromarray(pixels))))
    assert (preprocess._row_helper() is None) == (cpus == 1)


def _crop_in_a_forked_child(spec: Preprocessing, pixels: np.ndarray, answers) -> None:
    answers.put(resize_and_crop(pixels, spec))


def test_a_forked_process_gets_its_own_helper_thread(lite0):
    """A child inherits the parent's pool object but not its thread; reusing it would wait forever."""
    spec = Preprocessing.from_transform(lite0.transform)
    pixels = np.random.default_rng(4).integers(0, 256, (533, 400, 3), dtype=np.uint8)
    expected = resize_and_crop(pixels, spec)   # the parent's helper exists from here on
    context = multiprocessing.get_context("fork")
    answers = context.Queue()
    child = context.Process(target=_crop_in_a_forked_child, args=(spec, pixels, answers))
    child.start()
    try:
        assert np.array_equal(answers.get(timeout=60), expected)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()


def _real_photos(n: int) -> list[str]:
    if (CLOTHING_DIR / "images.csv").exists():
        table = pd.read_csv(CLOTHING_DIR / "images.csv", dtype=str)
        names = table["image"].sample(n=n * 2, random_state=0)
        paths = [CLOTHING_DIR / "images" / f"{name}.jpg" for name in names]
        return [str(p) for p in paths if p.exists()][:n]
    if fashion_mnist_available():
        return load_fashion_mnist(max_per_class=1, progress=False).catalog["path"].tolist()[:n]
    pytest.skip(f"no real photos: clothing photos not at {CLOTHING_DIR} and Debian's dataset-fashion-mnist not "
                f"installed in {config.FASHION_MNIST_SYSTEM_DIR}")


def _relative_error(actual, expected) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def test_the_uint8_query_model_equals_the_batch_and_eager_paths_on_real_photos(lite0, tmp_path):
    photos = _real_photos(8)
    fast = onnx_backbone(lite0, threads=2)
    spec = Preprocessing.from_transform(fast.transform)
    session = query_session(uint8_query_model(fast.model.path, tmp_path / "query.onnx", spec), threads=2)
    for path in photos:
        image = load_image(path, draft_size=spec.draft_size)
        with torch.inference_mode():
            batch_path = fast.model(fast.transform(image)[None]).numpy()
            eager = lite0.model(lite0.transform(load_image(path))[None]).numpy()
        query = run_query_model(session, crop_pixels(image, spec))
        assert query.shape == (1, lite0.dim)
        # Same crop pixels, same float operations, same network nodes: the batch path's vector.
        assert _relative_error(query, batch_path) < 1e-6, path
        assert _relative_error(query, eager) < 1e-4, path


def test_per_channel_normalisation_in_the_uint8_model_equals_torchvision(lite0, tmp_path):
    """Lite's mean and std are one value for all channels (scalar constants); ImageNet's are not."""
    fast = onnx_backbone(lite0, threads=2)
    imagenet = dataclasses.replace(Preprocessing.from_transform(fast.transform),
                                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    session = query_session(uint8_query_model(fast.model.path, tmp_path / "query.onnx", imagenet), threads=2)
    normalise = transforms.Compose([transforms.ToTensor(), transforms.Normalize(imagenet.mean, imagenet.std)])
    rng = np.random.default_rng(5)
    for _ in range(3):
        crop = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        with torch.inference_mode():
            expected = fast.model(normalise(Image.fromarray(crop))[None]).numpy()
        assert _relative_error(run_query_model(session, crop), expected) < 1e-6


def test_a_backbone_without_a_describable_transform_keeps_the_torch_path():
    colorhist = with_runtime(get_backbone("colorhist"), "onnx")
    assert query_preprocessing(colorhist) is None


@pytest.mark.parametrize("load, spins", [(0.2, True), (1.0, True), (1.5, False), (9.0, False)])
def test_query_threads_spin_only_when_the_cpus_are_idle_enough(load, spins, monkeypatch):
    monkeypatch.setattr(query_model.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(query_model, "available_threads", lambda: 2)
    assert query_model.spinning_suits_this_machine() is spins
