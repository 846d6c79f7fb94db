"""Colour-aware ranking: the product-colour descriptors of a catalog and their fusion with a network.

The descriptor is the ``product_colour`` backbone (:mod:`fashionrec.models.colour`: a CIELab
histogram of the product's pixels, its background discounted), embedded and cached like
any other backbone, from the same decoded files (a file that cannot be decoded is skipped
and listed, stage ``embed``).

Fusion with weight ``w`` in [0, 1] scores a gallery item by

    (1 - w) * cosine(network vectors) + w * cosine(colour descriptors)

:func:`fuse_vectors` writes that as one vector per image, ``[sqrt(1 - w) * n / |n|, sqrt(w) * c / |c|]``,
whose inner products are exactly the fused scores, so an exact (Flat) index ranks by it
unchanged. An approximate index cannot be rebuilt for every w a user tries (the app's slider),
so there the network index proposes :func:`candidate_count` candidates and
:func:`rerank_fused` re-scores them exactly. ``w = 0`` is never fused: callers keep the plain path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import BadParameter, FashionRecError
from ..models.registry import get_backbone
from ..settings import InferenceSettings
from .embed import Embeddings, embed_catalog

COLOUR_BACKBONE = "product_colour"
# Candidates an approximate index proposes for re-ranking: enough that a colour match ranked
# 100th by the network alone can still reach the top k, few enough to re-score in microseconds.
RERANK_CANDIDATES_PER_RESULT = 10
MIN_RERANK_CANDIDATES = 100


def check_colour_weight(weight: float, name: str = "--colour-weight") -> float:
    """``weight`` as a float in [0, 1]; BadParameter otherwise."""
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise BadParameter(f"{name} must be a number between 0 and 1, got {weight!r}") from None
    if not 0.0 <= value <= 1.0:
        raise BadParameter(f"{name} must be between 0 (network only) and 1 (colour only), got {weight!r}")
    return value


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


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def fuse_vectors(network: np.ndarray, colour: np.ndarray | None, weight: float) -> np.ndarray:
    """Rows whose inner product is (1 - w) x network cosine + w x colour cosine (``network`` itself for w = 0)."""
    if weight == 0:
        return network
    return np.hstack([np.sqrt(1.0 - weight) * _unit(network), np.sqrt(weight) * _unit(colour)]).astype(np.float32)


def fused_scores(query_network: np.ndarray, query_colour: np.ndarray, gallery_network: np.ndarray,
                 gallery_colour: np.ndarray, weight: float) -> np.ndarray:
    """(n_queries, n_gallery) fused scores, computed directly (the re-ranking's arithmetic)."""
    return ((1.0 - weight) * (_unit(query_network) @ _unit(gallery_network).T)
            + weight * (_unit(query_colour) @ _unit(gallery_colour).T))


def candidate_count(k: int, n_gallery: int) -> int:
    """How many candidates an approximate index proposes for re-ranking to the top ``k``."""
    return min(n_gallery, max(MIN_RERANK_CANDIDATES, RERANK_CANDIDATES_PER_RESULT * k))


def rerank_fused(candidates: np.ndarray, query_network: np.ndarray, query_colour: np.ndarray,
                 gallery_network: np.ndarray, gallery_colour: np.ndarray, weight: float,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of each query's candidate positions (-1: none) by fused score: (scores, positions), best first.

    Ties keep the candidates' order. Rows with fewer than ``k`` valid candidates end in -1 / -inf.
    """
    candidates = np.asarray(candidates)
    scores = np.full((len(candidates), k), -np.inf, dtype=np.float32)
    positions = np.full((len(candidates), k), -1, dtype=np.int64)
    query_network, query_colour = _unit(query_network), _unit(query_colour)
    gallery_network, gallery_colour = _unit(gallery_network), _unit(gallery_colour)
    for row, proposed in enumerate(candidates):
        proposed = proposed[proposed >= 0]
        fused = ((1.0 - weight) * (gallery_network[proposed] @ query_network[row])
                 + weight * (gallery_colour[proposed] @ query_colour[row]))
        order = np.argsort(-fused, kind="stable")[:k]
        scores[row, :len(order)] = fused[order]
        positions[row, :len(order)] = proposed[order]
    return scores, positions
