"""The product-colour descriptors of a catalog, which colour-aware ranking fuses with a network's similarity.

The descriptor is the ``product_colour`` backbone (:mod:`fashionrec.models.colour`: a CIELab
histogram of the product's pixels, its background discounted), embedded and cached like
any other backbone, from the same decoded files (a file that cannot be decoded is skipped
and listed, stage ``embed``).

The fusion itself, ``(1 - w) x network cosine + w x colour cosine``, is one ranking policy,
:class:`fashionrec.ranking.rank.ColourFusion`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import FashionRecError
from ..models.registry import get_backbone
from ..settings import InferenceSettings
from .embed import Embeddings, embed_catalog

COLOUR_BACKBONE = "product_colour"


def colour_descriptors(catalog: pd.DataFrame, settings: InferenceSettings = InferenceSettings(),
                       root: Path | None = None, cache_dir: Path | None = None) -> Embeddings:
    """Product-colour descriptors of ``catalog``'s rows (eager under every runtime; cached by image content)."""
    return embed_catalog(catalog, get_backbone(COLOUR_BACKBONE), settings, cache_dir=cache_dir, root=root)


def aligned_colour(metadata: pd.DataFrame, colour: Embeddings) -> np.ndarray:
    """The colour descriptor of each ``metadata`` row (matched by id); FashionRecError if one is missing."""
    position = {item_id: row for row, item_id in enumerate(colour.metadata["id"].astype(str))}
    missing = [item_id for item_id in metadata["id"].astype(str) if item_id not in position]
    if missing:
        raise FashionRecError(f"{len(missing)} images have a network embedding but no colour descriptor "
                              f"(first: {missing[0]}); see the skipped files")
    return colour.vectors[[position[item_id] for item_id in metadata["id"].astype(str)]]
