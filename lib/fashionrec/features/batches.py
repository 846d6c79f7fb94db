"""One batch of images through a backbone: decode, stack, run, check. Shared by every engine.

The in-process engine (:mod:`fashionrec.features.embed`, DataLoader workers decoding) and the
Ray engine (:mod:`fashionrec.features.ray_engine`, actors on a cluster) call these same
functions, so an image becomes the same tensor and the same embedding wherever it is run.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.images import load_image
from ..errors import FashionRecError, ImageError
from ..models.backbone import Backbone


def decode(path, transform) -> tuple[torch.Tensor | None, str]:
    """``(transform(image), "")``, or ``(None, reason)`` when the file cannot be used.

    A transform that carries ``draft_size`` (the fast runtimes' DraftTransform) lets JPEGs much
    larger than its first resize decode at a reduced scale; its repr, and so the cache key, says so.
    """
    try:
        return transform(load_image(path, draft_size=getattr(transform, "draft_size", None))), ""
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
