"""One query image -> one vector, stage by stage: decode, preprocess, embed.

Two encoders give the vectors the index was built from:

* :class:`OnnxEncoder`, for the ONNX runtimes: Pillow's exact geometry
  (:func:`~fashionrec.models.preprocess.crop_pixels`) and the index folder's uint8 query model
  (:mod:`fashionrec.models.query_model`): no torch in the query path;
* :class:`TorchEncoder`, for anything else (the eager runtime, backbones that stay eager such
  as ``colorhist``): the backbone's own transform and model;
* :class:`CombinedEncoder`, for a combination of backbones and views
  (:mod:`fashionrec.models.ensemble`): each leaf decodes the photo at its own JPEG draft size
  and runs its own preprocessing and network, as the batch path did, then they are combined.

:func:`encode_source` encodes with any of them from ``image_for(draft_size)``, which decodes
the photo (once per draft size).

Both are safe to call from several threads at once.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.images import decode_rgb_array, ensure_rgb, load_image, open_image_bytes
from ..errors import FashionRecError
from ..models.backbone import Backbone
from ..models.ensemble import CombinedBackbone
from ..models.preprocess import Preprocessing, crop_pixels, geometry_is_exact
from ..models.query_model import query_session, run_query_model


def decode_query(image, draft_size: int | None = None, as_array: bool = False) -> Image.Image | np.ndarray:
    """An upright RGB image from a path, bytes, a file-like object (an upload) or a PIL image.

    ``as_array``: a file's pixels as (height, width, 3) uint8 instead of a PIL image, the same
    pixels decoded faster (:func:`~fashionrec.data.images.decode_rgb_array`); every encoder here
    takes either. A PIL image given stays one. Raises ImageError naming the file (or the
    upload's name) and the reason.
    """
    if isinstance(image, Image.Image):
        return ensure_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return decode_rgb_array(image, draft_size=draft_size) if as_array else load_image(image, draft_size=draft_size)
    if hasattr(image, "read"):
        name = str(getattr(image, "name", "<upload>"))
        if hasattr(image, "seek"):
            image.seek(0)
        image = image.read()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        name = "<bytes>"
    else:
        raise TypeError(f"expected an image path, bytes, a file object or a PIL image, got {type(image).__name__}")
    data = bytes(image)
    return (decode_rgb_array(data, name, draft_size=draft_size) if as_array
            else open_image_bytes(data, name, draft_size=draft_size))


# A photo (or a box of one) smaller than this on a side holds too little of a product to compare.
TINY_IMAGE_SIDE = 32


def check_box(box) -> tuple[int, int, int, int] | None:
    """``(x, y, width, height)`` (or ``"x,y,w,h"``) as four whole pixel numbers; FashionRecError saying why not."""
    if box is None:
        return None
    parts = box.split(",") if isinstance(box, str) else list(box)
    try:
        numbers = [float(part) for part in parts]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != 4 or not all(np.isfinite(numbers)) or any(n != int(n) for n in numbers):
        raise FashionRecError(f"box {box!r}: give x,y,width,height as four whole pixel numbers, e.g. 40,60,200,300")
    x, y, width, height = (int(n) for n in numbers)
    if x < 0 or y < 0 or width < 1 or height < 1:
        raise FashionRecError(f"box {box!r}: x and y start at 0 (the photo's top-left corner) and width and "
                              "height are at least 1")
    return x, y, width, height


def crop_box(picture: Image.Image | np.ndarray, box: tuple[int, int, int, int] | None):
    """The part of a decoded photo inside ``box`` (cut at the photo's edges); the photo when box is None."""
    if box is None:
        return picture
    x, y, width, height = box
    picture_width, picture_height = (picture.shape[1], picture.shape[0]) if isinstance(picture, np.ndarray) \
        else picture.size
    if x >= picture_width or y >= picture_height:
        raise FashionRecError(f"box {x},{y},{width},{height} starts outside the {picture_width}x{picture_height} "
                              "photo")
    right, bottom = min(x + width, picture_width), min(y + height, picture_height)
    if isinstance(picture, np.ndarray):
        return np.ascontiguousarray(picture[y:bottom, x:right])
    return picture.crop((x, y, right, bottom))


def tiny_image_warnings(picture: Image.Image | np.ndarray, box=None) -> list[str]:
    """A warning when the photo (or its box) is under TINY_IMAGE_SIDE pixels on a side; else none.

    Called on the photo as decoded for the query model, which a JPEG draft may have shrunk; the
    draft never shrinks below the model's input size, far above this limit.
    """
    width, height = (picture.shape[1], picture.shape[0]) if isinstance(picture, np.ndarray) else picture.size
    if min(width, height) >= TINY_IMAGE_SIDE:
        return []
    what = "the box" if box is not None else "the photo"
    return [f"{what} is {width}x{height} pixels, under {TINY_IMAGE_SIDE} on a side: too small to show a product's "
            "detail, so these results say little"]


def as_image(picture: Image.Image | np.ndarray) -> Image.Image:
    """A PIL image of what :func:`decode_query` gave (the backbones' own transforms take PIL images)."""
    return Image.fromarray(picture) if isinstance(picture, np.ndarray) else picture


def _milliseconds(start: float, end: float) -> float:
    return (end - start) * 1000.0


class OnnxEncoder:
    """Exact Pillow geometry + the uint8 query model. ``session`` may be shared with other views."""

    path = "onnx-uint8"

    def __init__(self, spec: Preprocessing, session):
        self.spec = spec
        self.session = session
        self.exact_shortcut = geometry_is_exact(spec)

    @classmethod
    def from_file(cls, model_path: Path, spec: Preprocessing, threads: int | None = None,
                  spinning: bool = False) -> "OnnxEncoder":
        return cls(spec, query_session(model_path, threads, spinning))

    @property
    def draft_size(self) -> int | None:
        return self.spec.draft_size

    def encode(self, image: Image.Image | np.ndarray) -> tuple[np.ndarray, dict]:
        started = time.perf_counter()
        pixels = crop_pixels(image, self.spec, self.exact_shortcut)
        prepared = time.perf_counter()
        vector = run_query_model(self.session, pixels)
        done = time.perf_counter()
        return vector, {"preprocess": _milliseconds(started, prepared), "embed": _milliseconds(prepared, done)}

    def with_spec(self, spec: Preprocessing) -> "OnnxEncoder":
        """The same network and threads seeing another view of the image."""
        return OnnxEncoder(spec, self.session)


class TorchEncoder:
    """A backbone's own transform and model (eager PyTorch, or whatever its model runs on)."""

    path = "torch"

    def __init__(self, backbone: Backbone):
        self.backbone = backbone

    @property
    def draft_size(self) -> int | None:
        return getattr(self.backbone.transform, "draft_size", None)

    def encode(self, image: Image.Image | np.ndarray) -> tuple[np.ndarray, dict]:
        started = time.perf_counter()
        batch = self.backbone.transform(as_image(image))[None]
        prepared = time.perf_counter()
        with torch.inference_mode():
            vector = self.backbone.model(batch).float().numpy()
        done = time.perf_counter()
        return vector, {"preprocess": _milliseconds(started, prepared), "embed": _milliseconds(prepared, done)}


class CombinedEncoder:
    """A combination's leaves, each on its own decode of the photo, combined as the batch path combines them."""

    path = "combined"

    def __init__(self, backbone: CombinedBackbone):
        self.backbone = backbone
        self.leaves = {leaf.cache_key: TorchEncoder(leaf) for leaf in backbone.leaves()}

    @property
    def draft_size(self) -> int | None:
        return None

    def encode_with(self, image_for) -> tuple[np.ndarray, dict]:
        """The combined vector, each leaf reading ``image_for(its draft size)``."""
        vectors, timing = {}, {"preprocess": 0.0, "embed": 0.0}
        for key, encoder in self.leaves.items():
            vectors[key], leaf_timing = encoder.encode(image_for(encoder.draft_size))
            timing = {name: timing[name] + leaf_timing[name] for name in timing}
        started = time.perf_counter()
        vector = self.backbone.combine_leaf_vectors(lambda leaf: vectors[leaf.cache_key])
        timing["embed"] += _milliseconds(started, time.perf_counter())
        return vector, timing

    def encode(self, image: Image.Image | np.ndarray) -> tuple[np.ndarray, dict]:
        return self.encode_with(lambda draft_size: image)


def encode_source(encoder, image_for) -> tuple[np.ndarray, dict]:
    """``encoder``'s vector of a photo that ``image_for(draft_size)`` decodes (once per draft size)."""
    if isinstance(encoder, CombinedEncoder):
        return encoder.encode_with(image_for)
    return encoder.encode(image_for(encoder.draft_size))
