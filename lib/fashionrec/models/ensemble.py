"""Feature combinations as backbones: several networks, several views of one image, one vector.

Names (they work wherever a backbone name does; see docs/ensembles.md)::

    ensemble:efficientnet_lite0,efficientnet_lite1,efficientnet_lite2   members side by side
    efficientnet_lite1@centre_crop+flip                                  views of one member, averaged
    ensemble:efficientnet_lite0@centre_crop+flip,efficientnet_lite1      both
    ensemble:efficientnet_lite0@centre_crop,efficientnet_lite0@squash    views concatenated (as members)
    ensemble:efficientnet_lite0,efficientnet_lite1+head:<file>           a head trained on the combination

``,`` separates members, whose embeddings are **concatenated**; ``@`` gives a member its
views (:data:`fashionrec.models.views.VIEWS`), joined by ``+``, whose embeddings are
**averaged**. Every part is L2-normalised before it is combined and the result is
L2-normalised again, so each member weighs the same in a cosine similarity (the cosine
of two concatenations of k unit vectors is the mean of the k members' cosines).

A combination is not one transform and one network: members have their own input sizes
(224, 240, 260 px) and preprocessing. A :class:`CombinedBackbone` therefore holds its
parts, and everything below embeds each *leaf* (one network, one view) on its own, under
the leaf's own cache key (the same key the classifier's views and a plain backbone use),
then combines: :func:`fashionrec.features.embed.embed_catalog` for catalogs,
:func:`embed_images` for single images (the serving path).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data.images import load_image
from ..errors import UnknownBackbone
from .backbone import Backbone
from .classifier import l2_normalize
from .projection import project
from .views import RETRIEVAL_VIEW, VIEWS, view_backbone

ENSEMBLE_PREFIX = "ensemble:"
MEMBER_SEPARATOR = ","
VIEW_SEPARATOR = "@"
VIEW_JOINER = "+"
COMBINE_MODES = {"concat": "parts side by side", "mean": "parts averaged"}


@dataclass(frozen=True)
class MemberSpec:
    """One member of a combination name: a registered backbone and the views it is seen through.

    ``views_named`` says whether the name chose the views (``@...``) or left the default.
    """

    backbone: str
    views: tuple[str, ...]
    views_named: bool = True

    @property
    def name(self) -> str:
        """``<backbone>@<view>+<view>``; the bare backbone name when it is seen through its own preprocessing only."""
        if self.views == (RETRIEVAL_VIEW,):
            return self.backbone
        return f"{self.backbone}{VIEW_SEPARATOR}{VIEW_JOINER.join(self.views)}"


def is_combined_name(name: str) -> bool:
    """Whether ``name`` (without any ``+head:`` part) names a combination or a view."""
    return name.startswith(ENSEMBLE_PREFIX) or VIEW_SEPARATOR in name


def parse_combined_name(name: str) -> tuple[str, list[MemberSpec]]:
    """``("concat", members)`` for ``ensemble:...``; ``("mean", [member])`` for ``<backbone>@<views>``.

    Raises UnknownBackbone (one line, with the syntax) for an empty member, an unknown view or
    a view named twice.
    """
    if name.startswith(ENSEMBLE_PREFIX):
        combine, members = "concat", name[len(ENSEMBLE_PREFIX):].split(MEMBER_SEPARATOR)
    else:
        combine, members = "mean", [name]
    specs = []
    for member in members:
        backbone, _, views = member.strip().partition(VIEW_SEPARATOR)
        chosen = tuple(view.strip() for view in views.split(VIEW_JOINER)) if views else (RETRIEVAL_VIEW,)
        if not backbone.strip():
            raise UnknownBackbone(f"{name!r}: empty member; write ensemble:<backbone>[@<view>+<view>],<backbone>... "
                                  "(docs/ensembles.md)")
        unknown = [view for view in chosen if view not in VIEWS]
        if unknown:
            raise UnknownBackbone(f"{name!r}: unknown view {unknown[0]!r}; views are {', '.join(VIEWS)}")
        if len(set(chosen)) != len(chosen):
            raise UnknownBackbone(f"{name!r}: a view is named twice in {member!r}")
        specs.append(MemberSpec(backbone.strip(), chosen, bool(views)))
    return combine, specs


def ensemble_name(members: Sequence[MemberSpec | str]) -> str:
    """The canonical name of the concatenation of ``members`` (specs or member names)."""
    return ENSEMBLE_PREFIX + MEMBER_SEPARATOR.join(m.name if isinstance(m, MemberSpec) else m for m in members)


@dataclass(frozen=True)
class CombinedBackbone:
    """Parts (backbones, or combinations of views of one) combined into one unit-norm embedding.

    ``combine`` is ``concat`` (members side by side) or ``mean`` (views of one member averaged);
    each part is L2-normalised first and the result again. ``head`` (a fine-tuned projection
    head, trained on the combined vectors) maps the combination to its output when present.
    ``part_names`` say what each part is (``efficientnet_lite1@flip``), for the record.
    """

    name: str
    parts: tuple
    part_names: tuple[str, ...]
    combine: str
    head: nn.Module | None = None
    head_sha256: str | None = None
    description: str = ""

    def __post_init__(self):
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine is one of {', '.join(COMBINE_MODES)}, got {self.combine!r}")
        if not self.parts or len(self.parts) != len(self.part_names):
            raise ValueError("a combination needs at least one part, and one name per part")
        if self.combine == "mean" and len({part.dim for part in self.parts}) > 1:
            raise ValueError(f"{self.name}: averaged parts must have one dimension, got {[p.dim for p in self.parts]}")

    @property
    def combined_dim(self) -> int:
        """Dimension of the combination before any head."""
        dims = [part.dim for part in self.parts]
        return sum(dims) if self.combine == "concat" else dims[0]

    @property
    def dim(self) -> int:
        return int(self.head.out_dim) if self.head is not None else self.combined_dim

    @property
    def classifier(self):
        return None

    @functools.cached_property
    def cache_key(self) -> str:
        """Digest of the combination rule, every part's cache key (preprocessing, weights, runtime) and the head."""
        canonical = "\n".join(["combined", self.combine, *(part.cache_key for part in self.parts),
                               str(self.head_sha256)])
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @functools.cached_property
    def weights_sha256(self) -> str:
        digest = hashlib.sha256()
        for part in self.parts:
            digest.update(str(part.weights_sha256).encode())
        digest.update(str(self.head_sha256).encode())
        return digest.hexdigest()

    def leaves(self) -> list[Backbone]:
        """Every (network, view) this combination embeds with, depth first, each once per occurrence."""
        found = []
        for part in self.parts:
            found.extend(part.leaves() if isinstance(part, CombinedBackbone) else [part])
        return found

    def map_leaves(self, change: Callable[[Backbone], Backbone]) -> "CombinedBackbone":
        """The same combination with ``change`` applied to every leaf (e.g. another runtime)."""
        parts = tuple(part.map_leaves(change) if isinstance(part, CombinedBackbone) else change(part)
                      for part in self.parts)
        return dataclasses.replace(self, parts=parts)

    def combine_vectors(self, part_vectors: Sequence[np.ndarray]) -> np.ndarray:
        """The combination of the parts' embeddings of the same rows (each part: (n, part dim)), head applied."""
        if len(part_vectors) != len(self.parts):
            raise ValueError(f"{self.name}: {len(self.parts)} parts, got {len(part_vectors)} arrays")
        normalised = [l2_normalize(vectors) for vectors in part_vectors]
        combined = np.hstack(normalised) if self.combine == "concat" else np.mean(normalised, axis=0)
        combined = l2_normalize(combined)
        return project(self.head, combined) if self.head is not None else combined

    def combine_leaf_vectors(self, leaf_vectors: Callable[[Backbone], np.ndarray]) -> np.ndarray:
        """The combination computed from its leaves' embeddings of the same rows (``leaf_vectors(leaf)``),
        e.g. looked up by each leaf's cache key: many combinations of a few leaves cost one pass each."""
        return self.combine_vectors([part.combine_leaf_vectors(leaf_vectors) if isinstance(part, CombinedBackbone)
                                     else leaf_vectors(part) for part in self.parts])

    def embed_images(self, images: Sequence) -> np.ndarray:
        """(n, dim) embeddings of images (PIL images or file paths), each part with its own preprocessing."""
        return self.combine_vectors([embed_images(part, images) for part in self.parts])

    def preprocessing(self) -> list[dict]:
        """What every leaf does to an image: its name (``efficientnet_lite1@flip``), network, transform, cache key."""
        rows = []
        for part, part_name in zip(self.parts, self.part_names):
            if isinstance(part, CombinedBackbone):
                rows.extend(part.preprocessing())
                continue
            if self.combine == "mean" and part_name != RETRIEVAL_VIEW:   # part names are views here
                part_name = f"{part.name}{VIEW_SEPARATOR}{part_name}"
            elif self.combine == "mean":
                part_name = part.name
            rows.append({"part": part_name, "backbone": part.name, "transform": repr(part.transform),
                         "cache_key": part.cache_key})
        return rows

    def with_head(self, name: str, head: nn.Module | None, head_sha256: str, description: str) -> "CombinedBackbone":
        """This combination followed by a fine-tuned projection head (None: the combination itself, renamed)."""
        return CombinedBackbone(name, self.parts, self.part_names, self.combine,
                                head.eval() if head is not None else None, head_sha256, description)


def combined_backbone(name: str, build: Callable[[str], Backbone]) -> CombinedBackbone:
    """The combination ``name`` names, its members built by ``build(registered name)`` (once each)."""
    combine, members = parse_combined_name(name)
    built: dict[str, Backbone] = {}

    def base(backbone_name: str) -> Backbone:
        if backbone_name not in built:
            found = build(backbone_name)
            if isinstance(found, CombinedBackbone):
                raise UnknownBackbone(f"{name!r}: member {backbone_name!r} is itself a combination; list its "
                                      "members instead")
            built[backbone_name] = found
        return built[backbone_name]

    def member_part(member: MemberSpec, part_name: str):
        views = [view_backbone(base(member.backbone), view) for view in member.views]
        if combine == "mean" or len(views) > 1:
            return CombinedBackbone(part_name, tuple(views), member.views, "mean",
                                    description=f"{member.backbone}, views {', '.join(member.views)} averaged")
        return views[0]

    if combine == "mean":
        return member_part(members[0], name)
    parts = tuple(member_part(member, member.name) for member in members)
    names = tuple(member.name for member in members)
    description = ("normalised concatenation of the normalised embeddings of "
                   + " | ".join(names))
    return CombinedBackbone(name, parts, names, "concat", description=description)


def embed_images(backbone, images: Sequence) -> np.ndarray:
    """(n, dim) float32 embeddings of ``images`` (PIL images, or paths decoded as the catalog's are).

    The single-image path of any backbone: a plain one runs ``model(transform(image))``; a
    :class:`CombinedBackbone` runs each leaf with its own preprocessing and combines them.
    """
    if isinstance(backbone, CombinedBackbone):
        return backbone.embed_images(images)
    draft_size = getattr(backbone.transform, "draft_size", None)
    decoded = [load_image(image, draft_size=draft_size) if not hasattr(image, "convert") else image.convert("RGB")
               for image in images]
    if not decoded:
        return np.zeros((0, backbone.dim), np.float32)
    with torch.inference_mode():
        batch = torch.stack([backbone.transform(image) for image in decoded])
        return backbone.model(batch).float().numpy()


def preprocessing(backbone) -> list[dict]:
    """What every network that embeds for ``backbone`` does to an image (one row per leaf)."""
    if isinstance(backbone, CombinedBackbone):
        return backbone.preprocessing()
    return [{"part": backbone.name, "backbone": backbone.name, "transform": repr(backbone.transform),
             "cache_key": backbone.cache_key}]
