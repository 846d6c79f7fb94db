"""What a backbone is, and how its weights are read and checksummed.

A :class:`Backbone` bundles a network, the preprocessing its weights were trained with, and
its output size, so an embedding is only ever computed with matching preprocessing.
Embeddings are the penultimate features, returned un-normalised; normalisation is the
index's business.

Weight files are loaded strictly (no missing or unexpected key) and checked against the
sha256 prefix that torchvision-style names carry (``resnet50-11ad3fa6.pth``). Every
backbone has a weights checksum that goes into its cache key: the file's sha256, or, for
weights that come from no file (a seeded initialisation, a user's model built in code), the
sha256 of its state dict. Two different weight sets therefore never share cached embeddings.
"""
from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsUnavailable
from ..provenance import file_sha256

# torch.hub's convention: the part after the last '-' of a weights file name is a prefix
# of the file's sha256. At least 8 hex digits, so that ordinary names are not mistaken for one.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


@dataclass(frozen=True)
class Backbone:
    """A ready-to-use backbone: ``model(transform(image)[None])`` is a (1, dim) embedding."""

    name: str
    dim: int
    transform: Callable[..., torch.Tensor]
    model: nn.Module
    classifier: nn.Module | None
    weights_sha256: str | None
    description: str

    @functools.cached_property
    def cache_key(self) -> str:
        """Digest of everything that determines the embedding of an image.

        The transform's and the model's reprs list every preprocessing setting and every
        layer, so changing a resize size, a normalisation or the feature layer changes the key.
        """
        canonical = "\n".join(
            [self.name, str(self.dim), str(self.weights_sha256), repr(self.transform), repr(self.model)]
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BuiltBackbone:
    """What a builder returns; the registry adds the spec's name, dim and description.

    ``model`` maps a batch of ``transform``-ed images (B, C, H, W) to (B, dim) features;
    ``classifier`` is the ImageNet head that was detached to get them (None if there is
    none); ``weights_sha256`` identifies the weights (None: the registry hashes the state dict).
    """

    model: nn.Module
    transform: Callable[..., torch.Tensor]
    classifier: nn.Module | None = None
    weights_sha256: str | None = None


@dataclass(frozen=True)
class BackboneSpec:
    """A named way to build a backbone: ``builder(weights_file or None) -> BuiltBackbone``."""

    name: str
    family: str
    dim: int
    input_size: int | None
    description: str
    builder: Callable[[Path | None], BuiltBackbone]



def verified_sha256(path: Path) -> str:
    sha256 = file_sha256(path)
    match = _HASH_IN_NAME.search(path.name)
    if match and not sha256.startswith(match.group(1)):
        raise WeightsUnavailable(
            f"{path}: sha256 {sha256[:16]}... does not start with {match.group(1)}, the hash in "
            "its name; the file is corrupt, truncated or a different file. Replace it (or rename "
            "it if that suffix is not a hash)."
        )
    return sha256


def read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises anything from UnpicklingError to EOFError
        raise WeightsUnavailable(f"{path}: cannot be read as a state_dict ({type(err).__name__}: {err})") from err
    if not isinstance(state_dict, Mapping):
        raise WeightsUnavailable(f"{path}: holds a {type(state_dict).__name__}, expected a state_dict")
    return state_dict


def load_state_dict_exactly(model: nn.Module, path: Path, architecture: str) -> str:
    """Load ``path`` into ``model`` with no missing or unexpected key; return its sha256."""
    if not path.is_file():
        raise WeightsUnavailable(f"weights file {path} does not exist")
    sha256 = verified_sha256(path)
    try:
        model.load_state_dict(read_state_dict(path), strict=True)
    except RuntimeError as err:
        raise WeightsUnavailable(f"{path}: does not fit the {architecture} architecture: {err}") from err
    return sha256


def reject_weights_file(name: str, weights_file: Path | None) -> None:
    if weights_file is not None:
        raise ValueError(f"backbone {name!r} has no pretrained weights; weights_file does not apply")



def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over a model's parameters and buffers (sorted by name): its weights' identity."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
