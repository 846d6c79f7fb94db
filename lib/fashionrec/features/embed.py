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

A combination (:class:`~fashionrec.models.ensemble.CombinedBackbone`: an ensemble, or views
of one backbone) has no cache of its own: each of its leaves (one network, one view) is
embedded and cached under its own key, and the combination is computed from them.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import config
from ..console import progress_bar
from ..data.images import file_digest
from ..data.ledger import skipped_entry
from ..errors import FashionRecError
from ..models.backbone import Backbone
from ..models.ensemble import CombinedBackbone, preprocessing
from ..settings import InferenceSettings, available_threads
from .batches import collate, decode, embed_batch, exact_preprocessing
from .ray_engine import embed_on_ray

# Images per cache shard: the most work a kill can lose. Overridable so tests can kill
# a real run between shards without embedding thousands of images.
SHARD_SIZE = int(os.environ.get("FASHIONREC_SHARD_SIZE", 256))
# Catalog position of each row while a combination's parts are embedded and aligned.
_ROW = "_combined_row"


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
    computed: np.ndarray | None = None     # per row: computed now (True) or found in the cache
    preprocessing: list[dict] = field(default_factory=list)   # what each network did to an image (one row per leaf)

    @property
    def images_per_second(self) -> float:
        return self.n_computed / self.seconds if self.seconds > 0 else float("nan")


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


def embed_catalog(catalog: pd.DataFrame, backbone: Backbone | CombinedBackbone,
                  settings: InferenceSettings = InferenceSettings(), cache_dir: Path | None = None,
                  root: Path | None = None) -> Embeddings:
    """Embeds every image of ``catalog`` (columns id, path, label, ...) with ``backbone``.

    Images that fail to decode are left out of the result and listed in ``skipped`` with
    their reason and stage ``embed`` (paths relative to ``root`` when given); the other rows
    keep their order. A catalog from :func:`fashionrec.data.catalog.load_dataset` has had
    every image decoded already, so this happens only when a file changed since.
    ``n_reused + n_computed`` is the number of vectors returned. ``settings`` supplies batch
    size, decoding threads, runtime threads and progress (the backbone already runs on its runtime).
    A combination is embedded part by part (see :func:`embed_combined`).
    """
    if isinstance(backbone, CombinedBackbone):
        return embed_combined(catalog, backbone, settings, cache_dir, root)
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
        compute = _compute_missing_on_ray if settings.engine == "ray" else _compute_missing
        compute(catalog, backbone, cache, digests, pending, settings)
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
    computed = np.array([digests[p] in computed_now for p in keep], dtype=bool)
    n_computed = int(computed.sum())
    return Embeddings(vectors.astype(np.float32, copy=False), metadata, backbone.name, backbone.cache_key,
                      backbone.weights_sha256, skipped, len(keep) - n_computed, n_computed, seconds, computed,
                      preprocessing(backbone))


def embed_combined(catalog: pd.DataFrame, backbone: CombinedBackbone, settings: InferenceSettings = InferenceSettings(),
                   cache_dir: Path | None = None, root: Path | None = None) -> Embeddings:
    """:func:`embed_catalog` for a combination: each part embedded (and cached) on its own, then combined.

    A row is kept when every part embedded it; an image that failed in any part is listed
    once in ``skipped``. ``seconds`` is the parts' total, ``n_computed`` the rows that any
    part had to compute, so ``images_per_second`` is the combination's own throughput.
    ``cache_dir`` (tests) holds one sub-directory per leaf.
    """
    nested = _ROW in catalog.columns
    rows = catalog.reset_index(drop=True).assign(**{_ROW: np.arange(len(catalog))})
    parts = []
    for position, part in enumerate(backbone.parts):
        part_dir = None if cache_dir is None else Path(cache_dir) / f"part{position}-{part.cache_key}"
        parts.append(embed_catalog(rows, part, settings, part_dir, root))
    kept = set.intersection(*(set(part.metadata[_ROW]) for part in parts))
    metadata = parts[0].metadata[parts[0].metadata[_ROW].isin(kept)].reset_index(drop=True)
    order = metadata[_ROW].tolist()
    aligned, computed = [], np.zeros(len(order), dtype=bool)
    for part in parts:
        position = {row: i for i, row in enumerate(part.metadata[_ROW])}
        taken = [position[row] for row in order]
        aligned.append(part.vectors[taken] if order else np.zeros((0, part.vectors.shape[1]), np.float32))
        computed |= part.computed[taken]
    vectors = backbone.combine_vectors(aligned) if order else np.zeros((0, backbone.dim), np.float32)
    skipped = list({item["path"]: item for part in parts for item in part.skipped}.values())
    return Embeddings(vectors.astype(np.float32, copy=False), metadata if nested else metadata.drop(columns=_ROW),
                      backbone.name, backbone.cache_key, backbone.weights_sha256, skipped, int((~computed).sum()),
                      int(computed.sum()), sum(part.seconds for part in parts), computed, preprocessing(backbone))


def _shard_batches(n_pending: int, batch_size: int) -> list[list[int]]:
    """Batches that never straddle a shard: the same batches whether or not a run resumed."""
    batches = []
    for shard_start in range(0, n_pending, SHARD_SIZE):
        shard_end = min(shard_start + SHARD_SIZE, n_pending)
        batches.extend(list(range(start, min(start + batch_size, shard_end)))
                       for start in range(shard_start, shard_end, batch_size))
    return batches


def _compute_missing(catalog, backbone: Backbone, cache: EmbeddingCache, digests, pending, settings: InferenceSettings):
    """Embeds the pending images shard by shard: each batch decoded by every decoding thread, then run.

    Decoding and the network take turns, each on every core: on a small machine the two
    overlapping only make the runtime's threads wait for cores that decoding holds, while
    taking turns costs each image the two stages' times on all cores, which is the limit
    benchmarks/embed_throughput.py compares the pipeline with.
    """
    paths = catalog["path"].to_numpy()
    decoders = min(decoding_threads(settings), len(pending))
    spec = exact_preprocessing(backbone.transform)
    bar = progress_bar(total=len(pending), desc=f"embedding with {backbone.name}", unit="img",
                       progress=settings.progress)
    decode_one = functools.partial(decode, transform=backbone.transform, spec=spec)
    with ThreadPoolExecutor(max(decoders, 1), thread_name_prefix="fashionrec-decode") as pool:
        mapper = pool.map if decoders > 1 else map
        batches = (collate(list(mapper(decode_one, [paths[pending[i]] for i in batch])))
                   for batch in _shard_batches(len(pending), settings.batch_size))
        for start in range(0, len(pending), SHARD_SIZE):
            shard_positions = pending[start:start + SHARD_SIZE]
            vectors = np.zeros((len(shard_positions), backbone.dim), dtype=np.float32)
            errors: list[str] = []
            offset = 0
            while offset < len(shard_positions):
                batch, reasons = next(batches)
                vectors[offset:offset + len(reasons)] = embed_batch(backbone, batch, reasons)
                errors.extend(reasons)
                offset += len(reasons)
                bar.update(len(reasons))
            cache.write_shard([digests[p] for p in shard_positions], vectors, errors)
    bar.close()


def decoding_threads(settings: InferenceSettings) -> int:
    """Threads that decode each batch: ``settings.workers``, or one per CPU this process may use."""
    return available_threads() if settings.workers is None else settings.workers


def _compute_missing_on_ray(catalog, backbone: Backbone, cache: EmbeddingCache, digests, pending,
                            settings: InferenceSettings):
    """The same shards as :func:`_compute_missing`, computed by a Ray Data job (fashionrec.features.ray_engine).

    Rows come back in any order; each shard (the same cut of ``pending`` as in-process) is
    written as soon as all its rows are in, so a killed job loses at most the shards in flight.
    """
    paths = catalog["path"].to_numpy()
    shards = [pending[start:start + SHARD_SIZE] for start in range(0, len(pending), SHARD_SIZE)]
    vectors = [np.zeros((len(shard), backbone.dim), dtype=np.float32) for shard in shards]
    errors = [[""] * len(shard) for shard in shards]
    missing = [len(shard) for shard in shards]
    bar = progress_bar(total=len(pending), desc=f"embedding with {backbone.name} on Ray", unit="img",
                       progress=settings.progress)
    for positions, batch_vectors, reasons in embed_on_ray([paths[p] for p in pending], backbone, settings):
        for position, vector, reason in zip(positions.tolist(), batch_vectors, reasons):
            shard, row = divmod(position, SHARD_SIZE)
            vectors[shard][row], errors[shard][row] = vector, reason
            missing[shard] -= 1
            if missing[shard] == 0:
                cache.write_shard([digests[p] for p in shards[shard]], vectors[shard], errors[shard])
        bar.update(len(reasons))
    bar.close()
    unfinished = sum(count > 0 for count in missing)
    if unfinished:
        raise FashionRecError(f"the Ray job returned no result for some images of {unfinished} cache shard(s)")


def _display_path(path, root: Path | None) -> str:
    return os.path.relpath(path, root) if root else str(path)
