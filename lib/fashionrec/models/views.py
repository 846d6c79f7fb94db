"""Other views of the same image through the same network: another geometry, another cache key.

The retrieval view is the backbone's own centre crop. A product photo often holds more than
that crop shows (the whole width of a portrait photo, a full-length dress), so the category
classifier may also look at the whole image squashed to the input size and at the shorter
side resized with a centre crop; ``flip`` is the centre crop mirrored left to right (a
product seen in a mirror is the same product). Each view is a backbone of its own
(``dataclasses.replace`` of the transform, same name and network), so its embeddings are
cached like any other backbone's, under a key of its own.
"""
from __future__ import annotations

import dataclasses

from torchvision import transforms
from torchvision.transforms import functional

from ..errors import FashionRecError

CLASSIFIER_VIEWS = {
    "squash": "the whole image resized to the input size, aspect ratio not kept",
    "shorter_side": "shorter side resized to the input size, centre crop: the whole width of a portrait photo",
}
MULTI_VIEW_FEATURES = "frozen+views"
RETRIEVAL_VIEW = "centre_crop"
VIEWS = {
    RETRIEVAL_VIEW: "the backbone's own preprocessing (for the EfficientNet-Lite family: resize, centre crop)",
    "flip": "the backbone's own preprocessing, mirrored left to right",
    **CLASSIFIER_VIEWS,
}


class HorizontalFlip:
    """Mirrors a PIL image or a (..., H, W) tensor left to right; deterministic, so a view, not an augmentation."""

    def __call__(self, image):
        return functional.hflip(image)

    def __repr__(self) -> str:
        return "HorizontalFlip()"


def view_transform(transform, view: str):
    """The backbone's transform with its resize + centre crop replaced by ``view``'s geometry.

    Only for transforms of the form Resize(s) -> CenterCrop(c) -> tensor steps (the
    EfficientNet-Lite family); anything else raises FashionRecError, so the classifier
    falls back to the retrieval view alone.
    """
    steps = list(getattr(transform, "transforms", []))
    kinds = [type(step) for step in steps]
    if len(steps) < 2 or kinds[:2] != [transforms.Resize, transforms.CenterCrop]:
        raise FashionRecError(f"classifier views need a Resize -> CenterCrop transform, not {transform!r}")
    if view not in CLASSIFIER_VIEWS:
        raise ValueError(f"unknown classifier view {view!r}; choose from {', '.join(CLASSIFIER_VIEWS)}")
    resize, crop, rest = steps[0], steps[1], steps[2:]
    height, width = crop.size
    if view == "squash":
        geometry = [transforms.Resize((height, width), interpolation=resize.interpolation, antialias=True)]
    else:
        geometry = [transforms.Resize(min(height, width), interpolation=resize.interpolation, antialias=True),
                    transforms.CenterCrop((height, width))]
    return transforms.Compose([*geometry, *rest])


def flipped_transform(transform):
    """``transform`` followed by a left-right mirror (a Compose stays one flat Compose, so that the
    decoder's draft size is still read from its first resize)."""
    steps = list(transform.transforms) if isinstance(transform, transforms.Compose) else [transform]
    return transforms.Compose([*steps, HorizontalFlip()])


def view_backbone(backbone, view: str):
    """The same network seeing another view (one of ``VIEWS``): its own transform, so its own cache key.

    ``centre_crop`` is the backbone itself. The name stays the backbone's, so the embeddings of
    a view are shared by every feature set that uses it (the classifier's views, ensembles).
    """
    if not hasattr(backbone, "transform"):
        raise FashionRecError(f"{backbone.name!r} combines several backbones; name its members' views instead "
                              "(see docs/ensembles.md)")
    if view == RETRIEVAL_VIEW:
        return backbone
    if view == "flip":
        return dataclasses.replace(backbone, transform=flipped_transform(backbone.transform))
    if view not in VIEWS:
        raise FashionRecError(f"unknown view {view!r}; choose from {', '.join(VIEWS)}")
    return dataclasses.replace(backbone, transform=view_transform(backbone.transform, view))
