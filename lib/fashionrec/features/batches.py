"""One batch of images through a backbone: decode, stack, run, check. Shared by every engine.

The in-process engine (:mod:`fashionrec.features.embed`, decoding threads) and the Ray engine
(:mod:`fashionrec.features.ray_engine`, actors on a cluster) call these same functions, so an
image becomes the same tensor and the same embedding wherever it is run.

A transform of the form resize -> centre crop -> ``ToTensor`` -> ``Normalize`` (every network
backbone's) is not run as torchvision steps on a PIL image: the file is decoded by libjpeg-turbo
straight into an array (:func:`~fashionrec.data.images.decode_rgb_array`), resized and cropped by
the compiled exact kernels (:func:`~fashionrec.models.preprocess.crop_pixels`) and scaled by
:func:`~fashionrec.models.preprocess.input_array`: the single query's path, giving the very
tensor the transform gives (same pixels, same float operations; tested), in about a third of
the time. Most of that work runs outside the GIL, so threads decode in parallel.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.images import decode_rgb_array, load_image
from ..errors import FashionRecError, ImageError
from ..models.backbone import Backbone
from ..models.preprocess import Preprocessing, crop_pixels, geometry_is_exact, input_array


def exact_preprocessing(transform) -> Preprocessing | None:
    """``transform`` as data when the compiled path computes exactly its tensor; None where only the
    transform itself can (another form, or a Pillow whose resampling the kernels do not match)."""
    try:
        spec = Preprocessing.from_transform(transform)
    except FashionRecError:
        return None
    return spec if geometry_is_exact(spec) else None


def decode(path, transform, spec: Preprocessing | None = None) -> tuple[torch.Tensor | None, str]:
    """``(transform(image), "")``, or ``(None, reason)`` when the file cannot be used.

    A transform that carries ``draft_size`` (the fast runtimes' DraftTransform) lets JPEGs much
    larger than its first resize decode at a reduced scale; its repr, and so the cache key, says so.
    ``spec``: :func:`exact_preprocessing` of ``transform``, to compute the same tensor on the
    compiled path (see the module docstring).
    """
    try:
        if spec is None:
            return transform(load_image(path, draft_size=getattr(transform, "draft_size", None))), ""
        pixels = crop_pixels(decode_rgb_array(path, draft_size=spec.draft_size), spec, split=False)
        return torch.from_numpy(input_array(pixels, spec)), ""
    except ImageError as error:
        return None, error.reason


def collate(items) -> tuple[torch.Tensor | None, list[str]]:
    """Decoded items -> (the usable tensors stacked, or None; every item's reason, "" when usable)."""
    tensors = [tensor for tensor, _ in items if tensor is not None]
    reasons = [reason for _, reason in items]
    return (torch.stack(tensors) if tensors else None), reasons


def embed_batch(backbone: Backbone, batch: torch.Tensor | None, reasons: list[str]) -> np.ndarray:
    """(len(reasons), dim) float32 embeddings; rows of unusable images stay zero (their reason says why)."""
    vectors = np.zeros((len(reasons), backbone.dim), dtype=np.float32)
    if batch is not None:
        usable = np.flatnonzero([not reason for reason in reasons])
        with torch.inference_mode():
            vectors[usable] = checked_output(backbone, backbone.model(batch))
    return vectors


def checked_output(backbone: Backbone, output: torch.Tensor) -> np.ndarray:
    """The model's output as float32 rows, after checking it has the width the backbone declares."""
    if output.ndim != 2 or output.shape[1] != backbone.dim:
        raise FashionRecError(f"backbone {backbone.name!r} declares dim={backbone.dim} but its model returned "
                              f"features of shape {tuple(output.shape)}; fix the dim it was registered with")
    return output.float().numpy()
