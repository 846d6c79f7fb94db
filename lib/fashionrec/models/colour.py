"""The product's colour, not the background's: a foreground-weighted, soft-binned CIELab histogram.

Catalog photos stand the product on white, street photos on clutter; a plain colour
histogram (``colorhist``) describes both the product and whatever surrounds it. This one
first estimates which pixels are the product:

1. The image border (``BORDER_FRACTION`` of each side) is a sample of the background: its
   colour histogram ``H_b`` is the background colour model (the "border prior" of salient
   object detection).
2. The interior, weighted by a centred Gaussian (``CENTRE_SIGMA``; products are photographed
   in the middle), gives ``H_c``, a mixture of product and background colours. The largest
   background share ``lam`` with ``H_c - lam * H_b >= 0`` in every bin the border really uses is
   removed, leaving the product's colour model ``H_f`` (``H_c`` itself when nothing is left:
   a white shirt on white).
3. A pixel's foreground probability is ``H_f(x) / (H_f(x) + H_b(x))`` (equal priors), times the
   centre prior; the descriptor is the histogram of the pixels under those weights.

Colours are binned in CIELab (D65), where distances follow perceived differences, with few
lightness bins (shading and exposure move L most) and finer chroma bins; every pixel is
spread over its 8 neighbouring bin centres (trilinear soft binning), so a colour near a bin
edge does not jump between bins. The output is the square root of the normalised histogram
(Hellinger, as ``colorhist``): unit L2 norm, and the dot product of two descriptors is their
Bhattacharyya coefficient, so cosine similarity compares colour distributions.
"""
from __future__ import annotations

import torch
from torch import nn

INPUT_SIZE = 128
L_BINS, A_BINS, B_BINS = 4, 9, 9
L_RANGE = (0.0, 100.0)
AB_RANGE = (-80.0, 80.0)   # garment colours rarely exceed |a|, |b| = 80; beyond it, the outer bins
BORDER_FRACTION = 0.08
CENTRE_SIGMA = 0.25        # of the image side
BACKGROUND_BIN_FLOOR = 0.02   # border bins below this share are noise, not background, for the de-mixing
_EPS = 1e-8

_SRGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                             [0.2126729, 0.7151522, 0.0721750],
                             [0.0193339, 0.1191920, 0.9503041]])
_D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883])


def rgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], shape (B, 3, H, W) -> CIELab (D65), same shape (L in [0, 100])."""
    rgb = images.clamp(0.0, 1.0)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,bjhw->bihw", _SRGB_TO_XYZ.to(images), linear) / _D65_WHITE.to(images)[None, :, None, None]
    delta = 6.0 / 29.0
    f = torch.where(xyz > delta**3, xyz.clamp(min=_EPS) ** (1.0 / 3.0), xyz / (3 * delta**2) + 4.0 / 29.0)
    return torch.stack([116.0 * f[:, 1] - 16.0, 500.0 * (f[:, 0] - f[:, 1]), 200.0 * (f[:, 1] - f[:, 2])], dim=1)


def _channel_bins(values: torch.Tensor, n_bins: int, value_range: tuple[float, float]):
    """Lower neighbouring bin centre and the weight of the upper one, for soft (linear) binning."""
    low, high = value_range
    position = ((values - low) / (high - low) * (n_bins - 1)).clamp(0.0, n_bins - 1)
    lower = position.floor().clamp(max=n_bins - 2)
    return lower.long(), position - lower


def soft_bins(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint bin indices and weights of every pixel's 8 neighbouring bin centres: shapes (B, 8, N)."""
    flat = lab.flatten(2)
    (l0, lw), (a0, aw), (b0, bw) = (_channel_bins(flat[:, 0], L_BINS, L_RANGE),
                                    _channel_bins(flat[:, 1], A_BINS, AB_RANGE),
                                    _channel_bins(flat[:, 2], B_BINS, AB_RANGE))
    indices, weights = [], []
    for dl in (0, 1):
        for da in (0, 1):
            for db in (0, 1):
                indices.append(((l0 + dl) * A_BINS + (a0 + da)) * B_BINS + (b0 + db))
                weights.append((lw if dl else 1 - lw) * (aw if da else 1 - aw) * (bw if db else 1 - bw))
    return torch.stack(indices, dim=1), torch.stack(weights, dim=1)


def _histogram(indices: torch.Tensor, weights: torch.Tensor, pixel_weights: torch.Tensor) -> torch.Tensor:
    """Normalised histograms (B, bins) of the pixels under ``pixel_weights`` (B, N)."""
    counts = torch.zeros(indices.shape[0], L_BINS * A_BINS * B_BINS, dtype=weights.dtype, device=weights.device)
    counts.scatter_add_(1, indices.flatten(1), (weights * pixel_weights[:, None, :]).flatten(1))
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=_EPS)


def _lookup(histograms: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each pixel's value under ``histograms`` (B, bins), soft-binned as it was counted: (B, N)."""
    values = torch.gather(histograms, 1, indices.flatten(1)).view(indices.shape)
    return (values * weights).sum(dim=1)


def border_and_centre(height: int, width: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened masks: the border band (bool) and the centre prior (a Gaussian, 0 on the border band)."""
    band = max(1, round(BORDER_FRACTION * min(height, width)))
    border = torch.ones(height, width, dtype=torch.bool, device=device)
    border[band:height - band, band:width - band] = False
    ys = (torch.arange(height, device=device) + 0.5) / height - 0.5
    xs = (torch.arange(width, device=device) + 0.5) / width - 0.5
    prior = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * CENTRE_SIGMA**2))
    return border.flatten(), (prior * ~border).flatten()


def foreground_weights(lab: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-pixel product weight (B, H*W): foreground probability from the border/centre colour models x centre prior.

    ``indices``, ``weights``: the pixels' soft bins, :func:`soft_bins` of ``lab``.
    """
    batch, _, height, width = lab.shape
    border, prior = border_and_centre(height, width, lab.device)
    background = _histogram(indices, weights, border.to(lab.dtype).expand(batch, -1))
    centre = _histogram(indices, weights, prior.to(lab.dtype).expand(batch, -1))
    used = background > BACKGROUND_BIN_FLOOR
    share = torch.where(used, centre / background.clamp(min=_EPS), torch.full_like(centre, float("inf")))
    lam = share.min(dim=1, keepdim=True).values.clamp(0.0, 1.0)
    product = (centre - lam * background).clamp(min=0.0)
    # Nothing left after removing the background (the product has the background's colours): keep the centre model.
    product = torch.where(product.sum(dim=1, keepdim=True) > 0.05, product, centre)
    product = product / product.sum(dim=1, keepdim=True).clamp(min=_EPS)
    in_product, in_background = _lookup(product, indices, weights), _lookup(background, indices, weights)
    probability = in_product / (in_product + in_background).clamp(min=_EPS)
    return probability * prior.to(lab.dtype)[None, :]


class ProductColour(nn.Module):
    """Images in [0, 1] (B, 3, H, W) -> product-colour descriptors (B, L_BINS * A_BINS * B_BINS), unit L2 norm."""

    def extra_repr(self) -> str:
        return (f"lab_bins=({L_BINS}, {A_BINS}, {B_BINS}), ab_range={AB_RANGE}, soft=trilinear, "
                f"border={BORDER_FRACTION}, centre_sigma={CENTRE_SIGMA}, floor={BACKGROUND_BIN_FLOOR}, "
                "output=sqrt(frequency)")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        lab = rgb_to_lab(images)
        indices, weights = soft_bins(lab)
        return _histogram(indices, weights, foreground_weights(lab, indices, weights)).sqrt()
