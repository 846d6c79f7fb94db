"""Embedding extraction with a content-addressed, crash-safe cache.

The cache for one backbone lives in ``data/interim/embeddings/<backbone cache key>/`` as
shards, each an ``.npz`` holding the digests of the image files it covers, their
embeddings, and the decoding error (if any) of each. An image is looked up by the digest
of its bytes, so a rerun costs nothing, a changed image recomputes only itself, and a
changed weight file or preprocessing gives a new cache key. Shards are written to a
temporary name and renamed into place: a run killed at any moment leaves only complete
shards, and the next run resumes from them.

Work is cut into shards in catalog order over the images still missing from the cache,
so an interrupted-then-resumed run sees the very same batches as an uninterrupted one and
produces bit-identical embeddings.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from .. import config
from ..console import progress_bar
from ..data.images import file_digest, load_image
from ..data.ledger import skipped_entry
from ..errors import FashionRecError, ImageError
from ..models.backbone import Backbone
from ..settings import InferenceSettings

# Images per cache shard: the most work a kill can lose. Overridable so tests can kill
# a real run between shards without embedding thousands of images.
SHARD_SIZE = int(os.environ.get("FASHIONREC_SHARD_SIZE", 256))


@dataclass
class Embeddings:
    """Embeddings of a catalog: row i of ``vectors`` is row i of ``metadata``."""

    vectors: np.ndarray
    metadata: pd.DataFrame
    backbone: str
    cache_key: str
    weights_sha256: str | None
    skipped: list[dict] = field(default_factory=list)
    n_reused: int = 0
    n_computed: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.n_computed / self.seconds if self.seconds > 0 else float("nan")


class _ImageFiles(Dataset):
    def __init__(self, paths: list[str], transform):
        self.paths = paths
        self.transform = transform
        # Set by fashionrec.runtime.DraftTransform (the fast runtimes): JPEGs much larger
        # than the first resize are decoded at a reduced scale. The transform's repr says
        # so, and with it the cache key.
        self.draft_size = getattr(transform, "draft_size", None)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, position):
        try:
            return self.transform(load_image(self.paths[position], draft_size=self.draft_size)), ""
        except ImageError as error:
            return None, error.reason


def _collate(items):
    tensors = [tensor for tensor, _ in items if tensor is not None]
    reasons = [reason for _, reason in items]
    return (torch.stack(tensors) if tensors else None), reasons


class EmbeddingCache:
    """All shards of one backbone's cache directory, indexed by image digest."""

    def __init__(self, directory: Path, dim: int):
        self.directory = directory
        self.dim = dim
        self.directory.mkdir(parents=True, exist_ok=True)
        self.vectors: dict[str, np.ndarray] = {}
        self.errors: dict[str, str] = {}
        for shard in sorted(self.directory.glob("shard-*.npz")):
            with np.load(shard, allow_pickle=False) as data:
                for digest, vector, error in zip(data["digests"], data["vectors"], data["errors"]):
                    if error:
                        self.errors[str(digest)] = str(error)
                    else:
                        self.vectors[str(digest)] = vector

    def __contains__(self, digest: str) -> bool:
        return digest in self.vectors or digest in self.errors

    def write_shard(self, digests: list[str], vectors: np.ndarray, errors: list[str]) -> Path:
        name = hashlib.sha256("".join(digests).encode()).hexdigest()[:24]
        final = self.directory / f"shard-{name}.npz"
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=".partial-", suffix=".npz")
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, digests=np.array(digests), vectors=vectors, errors=np.array(errors))
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, final)
        for digest, vector, error in zip(digests, vectors, errors):
            if error:
                self.errors[digest] = error
            else:
                self.vectors[digest] = vector
        return final


def cache_dir_for(backbone: Backbone) -> Path:
    return config.INTERIM_DIR / "embeddings" / f"{backbone.name}-{backbone.cache_key[:16]}"


def embed_catalog(catalog: pd.DataFrame, backbone: Backbone, settings: InferenceSettings = InferenceSettings(),
                  cache_dir: Path | None = None, root: Path | None = None) -> Embeddings:
    """Embeds every image of ``catalog`` (columns id, path, label, ...) with ``backbone``.

    Images that fail to decode are left out of the result and listed in ``skipped`` with
    their reason and stage ``embed`` (paths relative to ``root`` when given); the other rows
    keep their order. A catalog from :func:`fashionrec.data.catalog.load_dataset` has had
    every image decoded already, so this happens only when a file changed since.
    ``n_reused + n_computed`` is the number of vectors returned. ``settings`` supplies batch
    size, decoding workers, threads and progress (the backbone already runs on its runtime).
    """
    if settings.threads:
        torch.set_num_threads(settings.threads)
    cache = EmbeddingCache(cache_dir or cache_dir_for(backbone), backbone.dim)
    skipped: list[dict] = []
    digests: list[str | None] = []
    for path in catalog["path"]:
        try:
            digests.append(file_digest(path))
        except OSError as error:
            digests.append(None)
            skipped.append(skipped_entry(_display_path(path, root), "embed", f"cannot read file: {error.strerror}"))

    pending = []
    seen = set()
    for position, digest in enumerate(digests):
        if digest is not None and digest not in cache and digest not in seen:
            pending.append(position)
            seen.add(digest)
    n_cached = sum(digest is not None for digest in digests) - len(pending)
    if settings.progress and n_cached:
        print(f"[{backbone.name}] {n_cached} images found in the cache, computing {len(pending)}", file=sys.stderr)

    started = time.perf_counter()
    if pending:
        _compute_missing(catalog, backbone, cache, digests, pending, settings)
    seconds = time.perf_counter() - started

    keep = []
    for position, digest in enumerate(digests):
        if digest is None:
            continue
        if digest in cache.errors:
            path = _display_path(catalog["path"].iloc[position], root)
            skipped.append(skipped_entry(path, "embed", cache.errors[digest]))
        else:
            keep.append(position)
    metadata = catalog.iloc[keep].reset_index(drop=True).assign(digest=[digests[p] for p in keep])
    vectors = np.stack([cache.vectors[digests[p]] for p in keep]) if keep else np.zeros((0, backbone.dim), np.float32)
    computed_now = {digests[p] for p in pending}
    n_computed = sum(digests[p] in computed_now for p in keep)
    return Embeddings(vectors.astype(np.float32, copy=False), metadata, backbone.name, backbone.cache_key,
                      backbone.weights_sha256, skipped, len(keep) - n_computed, n_computed, seconds)


def _shard_batches(n_pending: int, batch_size: int) -> list[list[int]]:
    """Batches that never straddle a shard: the same batches whether or not a run resumed."""
    batches = []
    for shard_start in range(0, n_pending, SHARD_SIZE):
        shard_end = min(shard_start + SHARD_SIZE, n_pending)
        batches.extend(list(range(start, min(start + batch_size, shard_end)))
                       for start in range(shard_start, shard_end, batch_size))
    return batches


def _compute_missing(catalog, backbone: Backbone, cache: EmbeddingCache, digests, pending, settings: InferenceSettings):
    paths = catalog["path"].to_numpy()
    batch_size, num_workers = settings.batch_size, settings.workers
    bar = progress_bar(total=len(pending), desc=f"embedding with {backbone.name}", unit="img",
                       progress=settings.progress)
    # One loader for all shards: its worker processes start once and keep decoding the
    # next shard's images while the current shard is written.
    loader = DataLoader(
        _ImageFiles([paths[p] for p in pending], backbone.transform),
        batch_sampler=_shard_batches(len(pending), batch_size), num_workers=min(num_workers, len(pending)),
        collate_fn=_collate,
    )
    batches = iter(loader)
    with torch.inference_mode():
        for start in range(0, len(pending), SHARD_SIZE):
            shard_positions = pending[start:start + SHARD_SIZE]
            vectors = np.zeros((len(shard_positions), backbone.dim), dtype=np.float32)
            errors: list[str] = []
            offset = 0
            while offset < len(shard_positions):
                batch, reasons = next(batches)
                ok = np.array([not reason for reason in reasons])
                if batch is not None:
                    vectors[offset + np.flatnonzero(ok)] = _checked_output(backbone, backbone.model(batch))
                errors.extend(reasons)
                offset += len(reasons)
                bar.update(len(reasons))
            cache.write_shard([digests[p] for p in shard_positions], vectors, errors)
    bar.close()


def _checked_output(backbone: Backbone, output: torch.Tensor) -> np.ndarray:
    """The model's output as float32 rows, after checking it has the width the backbone declares."""
    if output.ndim != 2 or output.shape[1] != backbone.dim:
        raise FashionRecError(f"backbone {backbone.name!r} declares dim={backbone.dim} but its model returned "
                              f"features of shape {tuple(output.shape)}; fix the dim it was registered with")
    return output.float().numpy()


def _display_path(path, root: Path | None) -> str:
    return os.path.relpath(path, root) if root else str(path)
