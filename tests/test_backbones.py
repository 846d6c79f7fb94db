"""Tests of the backbone registry: real-photo sanity of the pretrained models, output
contract of every backbone, and the rules for finding and trusting weight files."""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import os
import socket
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image, ImageOps
from torch import nn
from torchvision import transforms

from fashionrec import config
from fashionrec.models.backbone import Backbone
from fashionrec.models.builtin import imagenet_class_names
from fashionrec.models.registry import BACKBONES, get_backbone, list_backbones
from fashionrec.errors import WeightsUnavailable

torch.set_num_threads(2)

REPO_ROOT = Path(__file__).resolve().parents[1]
CLOTHING_DIR = Path(
    os.environ.get("FASHIONREC_CLOTHING_DIR") or REPO_ROOT.parent / "shared" / "data" / "clothing-dataset"
)

# One unambiguous photo per label (checked by eye); each is top-1 correct for all three
# EfficientNet-Lite models, so a failure points at the pipeline rather than at the photo.
RECOGNISABLE_PHOTOS = {
    "49d3b29c-54b9-4cae-b918-504cf24ce128": "Shoes",  # pair of children's boots on a shoe box
    "755595ad-51a0-419f-b132-b412c2523ae4": "Hat",  # knitted beanie
    "97074b7f-706a-4c17-b875-bd9baa5bed0e": "Pants",  # light-blue jeans
    "dd0ff00d-5ce3-4150-b4ee-05da2c0a6555": "Dress",  # black strapless tulle dress
    "ea7b6656-3f84-4eb3-9099-23e623fc1018": "T-Shirt",  # plain red T-shirt
}
PLAUSIBLE_IMAGENET_CLASSES = {
    "Shoes": {"running shoe", "sandal", "clog", "Loafer", "cowboy boot", "shoe shop"},
    "Hat": {"cowboy hat", "sombrero", "bonnet", "mortarboard", "shower cap", "bathing cap"},
    "Pants": {"jean"},
    "Dress": {"gown", "overskirt", "hoopskirt"},
    "T-Shirt": {"jersey", "sweatshirt"},
}
LITE_BACKBONES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
TORCHVISION_BACKBONES = {
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
    "vgg16": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
    "efficientnet_b0": torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1,
}


@functools.cache
def cached_backbone(name: str) -> Backbone:
    return get_backbone(name)


@pytest.fixture
def offline(monkeypatch):
    """No network, whatever the machine: a download attempt fails at name resolution."""

    def refuse(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def empty_weight_locations(monkeypatch, tmp_path):
    """WEIGHTS_DIR and the torch hub cache point at empty directories."""
    monkeypatch.setattr(config, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    assert Path(torch.hub.get_dir()).is_relative_to(tmp_path), "torch.hub.set_dir() was called elsewhere"
    return tmp_path / "weights"


def load_photo(image_id: str) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(CLOTHING_DIR / "images" / f"{image_id}.jpg")).convert("RGB")


def catalog_labels() -> dict[str, str]:
    with open(CLOTHING_DIR / "images.csv", newline="") as stream:
        return {row["image"]: row["label"] for row in csv.DictReader(stream)}


def features_and_first_batchnorm_input(
    model: nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, nn.BatchNorm2d]:
    batchnorm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    captured = []
    hook = batchnorm.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
    try:
        with torch.no_grad():
            features = model(images)
    finally:
        hook.remove()
    return features, captured[0], batchnorm


@pytest.mark.parametrize("name", LITE_BACKBONES)
def test_lite_recognises_clothing_photos(name):
    if not (CLOTHING_DIR / "images.csv").is_file():
        pytest.skip(f"clothing dataset not found at {CLOTHING_DIR} (set FASHIONREC_CLOTHING_DIR)")
    labels = catalog_labels()
    for image_id, label in RECOGNISABLE_PHOTOS.items():
        assert labels.get(image_id) == label, f"{image_id} is not labelled {label} in images.csv"
    backbone = cached_backbone(name)
    class_names = imagenet_class_names()
    images = torch.stack([backbone.transform(load_photo(image_id)) for image_id in RECOGNISABLE_PHOTOS])
    features, batchnorm_input, batchnorm = features_and_first_batchnorm_input(backbone.model, images)

    with torch.no_grad():
        top5 = backbone.classifier(features).topk(5).indices.tolist()
    for (image_id, label), indices in zip(RECOGNISABLE_PHOTOS.items(), top5):
        predicted = [class_names[i] for i in indices]
        # An off-by-one class order (a phantom background class) fails here.
        assert PLAUSIBLE_IMAGENET_CLASSES[label] & set(predicted), f"{name} on {label} {image_id}: top-5 {predicted}"

    # Clear photos are still recognised under a wrongly scaled input, so the input scaling
    # is checked where it shows: the first BatchNorm sees activations whose statistics match
    # its running statistics only when the input is scaled as in training. Measured on these
    # photos (mean over channels of |log variance ratio|, |mean shift| in running std):
    # (pixel-127)/128: ~0.32, ~0.14; ImageNet mean/std: ~1.37, ~0.24; [0, 1]: ~1.54, ~0.50;
    # pixel/128 without the offset: ~0.26, ~0.92.
    live = batchnorm.running_var > 1e-3  # channels that were (nearly) constant in training say nothing
    running_mean, running_var = batchnorm.running_mean[live], batchnorm.running_var[live]
    variance_ratio = batchnorm_input.var(dim=(0, 2, 3))[live] / running_var
    mean_shift = (batchnorm_input.mean(dim=(0, 2, 3))[live] - running_mean) / running_var.sqrt()
    assert variance_ratio.log().abs().mean() < 0.8, "input scale differs from the one the weights were trained with"
    assert mean_shift.abs().mean() < 0.4, "input offset differs from the one the weights were trained with"


@pytest.mark.parametrize("name", list_backbones())
def test_features_have_declared_shape_and_are_deterministic(name, offline):
    try:
        backbone = cached_backbone(name)
    except WeightsUnavailable as err:
        pytest.skip(f"weights not available offline: {err}")
    spec = BACKBONES[name]
    generator = torch.Generator().manual_seed(0)
    noise_photos = [
        Image.fromarray(torch.randint(0, 256, (300, 260, 3), dtype=torch.uint8, generator=generator).numpy())
        for _ in range(2)
    ]
    batch = torch.stack([backbone.transform(photo) for photo in noise_photos])
    assert batch.dtype == torch.float32
    assert batch.shape == (2, 3, spec.input_size, spec.input_size)

    assert not backbone.model.training
    with torch.no_grad():
        first, second = backbone.model(batch), backbone.model(batch)
    assert first.shape == (2, spec.dim) == (2, backbone.dim)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    if backbone.classifier is not None:
        assert backbone.classifier(first).shape == (2, 1000)


def test_registry_and_unknown_name():
    assert list_backbones() == list(BACKBONES)
    assert set(TORCHVISION_BACKBONES) | set(LITE_BACKBONES) | {"colorhist", "random_resnet50"} <= set(BACKBONES)
    assert "untrained control" in BACKBONES["random_resnet50"].description
    with pytest.raises(ValueError, match="efficientnet_lite0") as raised:
        get_backbone("resnet51")
    assert "resnet51" in str(raised.value)


def test_imagenet_class_names_have_no_background_class():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert (names[0], names[999]) == ("tench", "toilet tissue")


def test_random_resnet50_is_reproducible_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = get_backbone("random_resnet50")
    assert torch.equal(torch.rand(3), expected_draw)

    second = get_backbone("random_resnet50")
    assert first.weights_sha256 == second.weights_sha256
    assert first.cache_key == second.cache_key
    for (key, tensor), other in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(tensor, other), key
    assert first.classifier is None


def test_colorhist_puts_a_solid_colour_in_one_bin():
    backbone = get_backbone("colorhist")
    red = backbone.transform(Image.new("RGB", (50, 70), (255, 0, 0)))
    embedding = backbone.model(red[None])[0]
    assert embedding.shape == (512,)
    assert embedding.count_nonzero() == 1
    assert embedding.argmax() == 7 * 64  # top red bin, bottom green and blue bins
    assert embedding.max() == 1.0
    assert backbone.weights_sha256 is None and backbone.classifier is None


def test_colorhist_embeddings_have_unit_norm():
    backbone = get_backbone("colorhist")
    noise = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    norms = backbone.model(noise).norm(dim=1)
    assert torch.allclose(norms, torch.ones(2))


@pytest.mark.parametrize("name", list(TORCHVISION_BACKBONES))
def test_missing_torchvision_weights_raise_an_actionable_error(name, offline, empty_weight_locations):
    weights = TORCHVISION_BACKBONES[name]
    file_name = Path(weights.url).name
    with pytest.raises(WeightsUnavailable) as raised:
        get_backbone(name)
    message = str(raised.value)
    for expected in (file_name, weights.url, str(weights), str(empty_weight_locations), "--weights-file"):
        assert expected in message


def save_random_efficientnet_b0(path: Path) -> Path:
    torch.save(torchvision.models.efficientnet_b0(weights=None).state_dict(), path)
    return path


def test_explicit_weights_file_without_hash_in_name_is_trusted_and_recorded(tmp_path, offline):
    weights_file = save_random_efficientnet_b0(tmp_path / "efficientnet_b0_own_training.pth")
    backbone = get_backbone("efficientnet_b0", weights_file=weights_file)
    assert backbone.weights_sha256 == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert backbone.dim == 1280 and backbone.classifier is not None


def test_weights_whose_content_contradicts_the_hash_in_their_name_are_rejected(
    tmp_path, offline, empty_weight_locations
):
    weights = TORCHVISION_BACKBONES["efficientnet_b0"]
    empty_weight_locations.mkdir()
    impostor = save_random_efficientnet_b0(empty_weight_locations / Path(weights.url).name)
    with pytest.raises(WeightsUnavailable, match="sha256"):
        get_backbone("efficientnet_b0")
    with pytest.raises(WeightsUnavailable, match="sha256"):
        get_backbone("efficientnet_b0", weights_file=impostor)


def test_weights_file_of_another_architecture_is_rejected(tmp_path):
    wrong = tmp_path / "not_efficientnet.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(WeightsUnavailable, match="does not fit"):
        get_backbone("efficientnet_lite0", weights_file=wrong)
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        get_backbone("efficientnet_lite0", weights_file=tmp_path / "absent.pth")


def test_backbones_without_pretrained_weights_refuse_a_weights_file(tmp_path):
    with pytest.raises(ValueError, match="weights_file"):
        get_backbone("colorhist", weights_file=tmp_path / "any.pth")


def test_cache_key_follows_weights_and_preprocessing():
    backbone = get_backbone("colorhist")
    assert backbone.cache_key == get_backbone("colorhist").cache_key
    other_resize = transforms.Compose([transforms.Resize((64, 64)), transforms.ToTensor()])
    assert dataclasses.replace(backbone, transform=other_resize).cache_key != backbone.cache_key
    assert dataclasses.replace(backbone, weights_sha256="0" * 64).cache_key != backbone.cache_key
