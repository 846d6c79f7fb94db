"""The batch path's compiled decode + preprocess gives the torchvision transform's tensor, bit for bit."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.models import ResNet50_Weights

from fashionrec.features.batches import decode, exact_preprocessing
from fashionrec.features.embed import embed_catalog
from fashionrec.models.registry import get_backbone
from fashionrec.models.runtime import DraftTransform, draft_size_for, with_runtime
from fashionrec.models.views import view_transform
from fashionrec.settings import InferenceSettings

from conftest import CLOTHING_DIR


@pytest.fixture(scope="module")
def lite0():
    return get_backbone("efficientnet_lite0")


def _transforms(lite0) -> dict:
    draft = DraftTransform(lite0.transform, draft_size_for(lite0.transform))
    return {
        "lite0": lite0.transform,
        "lite0, draft decoding": draft,
        "squash view, draft decoding": DraftTransform(view_transform(lite0.transform, "squash"), 256),
        "resnet preset": ResNet50_Weights.IMAGENET1K_V2.transforms(),
        "colour histogram (no crop)": get_backbone("colorhist").transform,
    }


def _smooth(rng, height: int, width: int) -> np.ndarray:
    return np.cumsum(rng.integers(0, 12, (height, width, 3)), axis=1).astype(np.uint8)


def _files(folder, rng) -> list:
    """Every kind of file the decoder treats differently: JPEG subsamplings, progressive, grey, large
    enough for draft scaling, EXIF-rotated, CMYK, PNG with alpha, 16-bit grey, palette GIF."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(name, image, **options):
        path = folder / name
        image.save(path, **options)
        written.append(path)

    save("420.jpg", Image.fromarray(_smooth(rng, 533, 400)), quality=90)
    save("444.jpg", Image.fromarray(_smooth(rng, 300, 457)), quality=90, subsampling=0)
    save("progressive.jpg", Image.fromarray(_smooth(rng, 410, 380)), quality=85, progressive=True)
    save("grey.jpg", Image.fromarray(_smooth(rng, 351, 260)).convert("L"), quality=90)
    save("large-draft.jpg", Image.fromarray(_smooth(rng, 1100, 900)), quality=90)
    save("small.jpg", Image.fromarray(_smooth(rng, 97, 61)), quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    save("rotated.jpg", Image.fromarray(_smooth(rng, 300, 420)), quality=90, exif=exif)
    save("cmyk.jpg", Image.fromarray(_smooth(rng, 280, 300)).convert("CMYK"), quality=90)
    rgba = np.dstack([_smooth(rng, 260, 300), rng.integers(0, 256, (260, 300), dtype=np.uint8)])
    save("alpha.png", Image.fromarray(rgba, "RGBA"))
    save("grey16.png", Image.fromarray(_smooth(rng, 240, 250)[..., 0].astype(np.uint16) * 257))
    save("palette.gif", Image.fromarray(_smooth(rng, 250, 230)).convert("P"))
    return written


def test_the_compiled_path_gives_the_transforms_tensor_bit_for_bit(lite0, tmp_path):
    paths = _files(tmp_path / "kinds", np.random.default_rng(0))
    if (CLOTHING_DIR / "images").is_dir():
        paths += sorted((CLOTHING_DIR / "images").glob("*.jpg"))[:24]
    for label, transform in _transforms(lite0).items():
        spec = exact_preprocessing(transform)
        assert spec is not None, label
        for path in paths:
            reference, reference_reason = decode(str(path), transform)
            fast, reason = decode(str(path), transform, spec)
            assert reason == reference_reason == "", (label, path.name)
            assert fast.dtype == reference.dtype and fast.shape == reference.shape, (label, path.name)
            assert torch.equal(fast, reference), (label, path.name, float((fast - reference).abs().max()))


def test_an_unusable_file_gives_the_same_reason_on_both_paths(lite0, tmp_path):
    spec = exact_preprocessing(lite0.transform)
    encoded = io.BytesIO()
    Image.fromarray(_smooth(np.random.default_rng(1), 200, 160)).save(encoded, "JPEG")
    cases = {"truncated.jpg": encoded.getvalue()[:600], "empty.jpg": b"", "page.jpg": b"<!doctype html><html>"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    for name in [*cases, "missing.jpg"]:
        reference = decode(str(tmp_path / name), lite0.transform)
        fast = decode(str(tmp_path / name), lite0.transform, spec)
        assert reference[0] is None and fast[0] is None
        assert fast[1] == reference[1] and fast[1], name


def test_a_transform_the_kernels_do_not_describe_keeps_its_own_path(tmp_path):
    grey = transforms.Compose([transforms.Resize(64), transforms.Grayscale(3), transforms.ToTensor()])
    assert exact_preprocessing(grey) is None
    path = _files(tmp_path, np.random.default_rng(3))[0]
    tensor, reason = decode(str(path), grey, exact_preprocessing(grey))
    assert reason == "" and torch.equal(tensor, grey(Image.open(path).convert("RGB")))


def test_decoding_threads_change_no_embedding(lite0, tmp_path):
    """One decoding thread, two, or the calling thread: the same batches, the same vectors."""
    paths = _files(tmp_path / "kinds", np.random.default_rng(2))
    catalog = pd.DataFrame({"id": [p.name for p in paths], "path": [str(p) for p in paths], "label": "x"})
    fast = with_runtime(lite0, "onnx", threads=1)
    results = [embed_catalog(catalog, fast, InferenceSettings(batch_size=4, workers=workers, threads=1,
                                                               progress=False), cache_dir=tmp_path / f"cache{workers}")
               for workers in (0, 1, 3)]
    assert all(result.n_computed == len(paths) for result in results)
    for result in results[1:]:
        assert np.array_equal(result.vectors, results[0].vectors)
