"""Building an index folder from a catalog: embed every image, index the vectors, write it all atomically.

What a version of the folder holds (:mod:`fashionrec.serving.folder` for the layout):

    build.json        how it was built: backbone (a fine-tuned ``+head:`` model too), preprocessing,
                      runtime, metric, index factory and search parameters, dataset and its
                      fingerprint, package versions, counts, skipped files with reasons, updates
    index.faiss       the faiss index (+ index.faiss.json), row i = id-map row i
    ids.parquet       the id map: id, path, label, digest, deleted (tombstones), label_probability (the
                      classifier's probability of a predicted label; missing for a catalog's own), in row order
    attributes.parquet  the catalog's attribute columns (colour, price, ...), typed, in row order (none: no file)
    embeddings.npy    the embeddings as float16 (memory-mapped when loaded), in row order
    colour.npy        the product-colour descriptors (float16, row order), for colour-aware ranking
                      (``colour_weight``; folders built before it have none and refuse a weight > 0)
    query.onnx        the single-query model (ONNX runtimes), see fashionrec.models.query_model
    classifier.npz, frozen.onnx   the category classifier of a fine-tuned model and its features
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import config
from ..data.catalog import load_dataset
from ..data.images import decode_query
from ..data.prepared import prepare
from ..errors import FashionRecError, IndexBuildError
from ..features.colour import COLOUR_BACKBONE, aligned_colour, colour_descriptors
from ..features.embed import embed_catalog
from ..indexing.choose import choose_index
from ..indexing.faiss_index import METRICS, check_factory, resolve_factory
from ..models.ensemble import is_combined_name, parse_combined_name
from ..models.finetuned import load_model, resolve_head_path, split_backbone_name
from ..models.registry import backbone_spec, check_backbone_name, get_backbone
from ..models.runtime import EXPORT_RTOL, calibration_sample, with_runtime
from ..provenance import dataset_fingerprint
from ..ranking.milvus import AUTO_INDEX, MilvusRowStore, check_store, milvus_uri
from ..ranking.store import TOMBSTONE_REBUILD_FRACTION, FaissRowStore
from ..settings import InferenceSettings, StoreSettings
from .assets import open_encoder, open_predictor
from .folder import COLOUR_FILE, ITEM_COLUMNS, check_output_folder, new_version
from .manifest import BuildManifest, item_counts, package_versions, write_version_files
from .milvus import collection_prefix, drop_unreferenced_collections
from .networks import FolderNetworks, torch_encoder, write_classifier, write_query_model
from .quality import quality_card, split_of_record

SPLIT_CHOICES = ("all", "train", "gallery", "query")
# --index auto: the memory an index may take when nothing else is said, and the recall it must reach.
DEFAULT_MEMORY_BUDGET_BYTES = 4 * 2**30
DEFAULT_RECALL_TARGET = 0.95
QUERY_CHECK_IMAGES = 3


@dataclass
class BuildReport:
    """What a build did: the folder and version written, and the numbers the CLI prints."""

    outdir: Path
    version: str
    manifest: BuildManifest
    n_computed: int
    n_reused: int
    seconds: float

    def to_record(self) -> dict:
        built = self.manifest
        return {"out": str(self.outdir), "version": self.version, "backbone": built.backbone["name"],
                "runtime": built.runtime, "metric": built.metric, "index": built.index,
                "dim": built.backbone["dim"], "n_items": built.counts["items"],
                "n_skipped": built.counts["skipped"], "skipped": built.skipped,
                "categories": built.counts["categories"], "embedded": self.n_computed,
                "reused_from_cache": self.n_reused, "seconds": round(self.seconds, 3), "quality": built.quality}


def backbone_dim(backbone: str) -> int:
    """The embedding size a backbone name gives, without building it (a head file is read)."""
    base, reference = split_backbone_name(backbone)
    if reference is not None:
        return int(load_model(resolve_head_path(reference))["out_dim"])
    if is_combined_name(base):
        combine, members = parse_combined_name(base)
        dims = [backbone_spec(member.backbone).dim for member in members]
        return sum(dims) if combine == "concat" else dims[0]
    return backbone_spec(base).dim


def check_index_spec(index: str, dim: int) -> None:
    """Raises FashionRecError for a factory string faiss cannot parse, before any image is embedded."""
    if index == "auto":
        return
    try:
        check_factory(index, dim)
    except ValueError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FashionRecError(f"--index {index!r}: not a faiss factory string or template ({reason}); "
                              "try Flat, HNSW32, IVF{nlist},Flat, IVF{nlist},PQ{m} or auto") from None


def resolve_index(index: str, n: int, dim: int, search_params: str, memory_budget_bytes: float,
                  recall_target: float) -> tuple[str, str, dict | None]:
    """(factory, search params, the auto choice or None) for ``n`` vectors of ``dim`` dimensions."""
    if index == "auto":
        # No index that re-ranks from a float16 file on disk: it is read-only, and a folder takes updates.
        choice = choose_index(n, dim, memory_budget_bytes, recall_target, disk_budget_bytes=0)
        auto = {key: choice[key] for key in ("rationale", "recall_ceiling", "estimated_total_bytes")}
        auto.update(memory_budget_bytes=memory_budget_bytes, recall_target=recall_target)
        return choice["factory"], search_params or choice["params"], auto
    return resolve_factory(index, n, dim), search_params, None


def build_index_folder(outdir, catalog: pd.DataFrame, backbone: str, *, index: str = "Flat", metric: str = "cosine",
                       search_params: str = "", settings: InferenceSettings = InferenceSettings(), root=None,
                       dataset: dict | None = None, skipped=(), seed: int = config.DEFAULT_SEED,
                       memory_budget_bytes: float = DEFAULT_MEMORY_BUDGET_BYTES,
                       recall_target: float = DEFAULT_RECALL_TARGET,
                       store: StoreSettings = StoreSettings(), quality_split_seed: int | None = None) -> BuildReport:
    """Embeds ``catalog`` (id, path, label, and any attribute columns) with ``backbone`` and writes a new
    version of ``outdir``.

    ``index``: a faiss factory string or template, or ``auto`` (:func:`choose_index` for the
    catalog's size under ``memory_budget_bytes`` and ``recall_target``). ``dataset``: provenance
    for build.json (name, data_dir, split...); ``skipped``: files the loader left out, kept in
    build.json with those the embedding skipped. Everything that can be checked without
    embedding is checked first. The previous version, if any, stays loadable throughout.
    ``store``: where the vectors are indexed, ``index.faiss`` (default) or a Milvus collection
    (:mod:`fashionrec.ranking.milvus`; ``auto`` is then Milvus's AUTOINDEX). ``quality_split_seed``:
    measure the quality card on the catalog's split of record with this seed
    (:mod:`fashionrec.serving.quality`; None, or a catalog without labels: no card).
    """
    started = time.perf_counter()
    outdir = Path(outdir)
    check_output_folder(outdir)
    if metric not in METRICS:
        raise FashionRecError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    check_backbone_name(backbone)
    check_folder_store(index, metric, search_params, store)
    if store.store == "faiss":
        check_index_spec(index, backbone_dim(backbone))
    eager = get_backbone(backbone, weights_file=settings.weights_file)
    calibration = calibration_sample(catalog["path"].tolist(), seed=seed) if settings.runtime == "onnx-int8" else None
    model = with_runtime(eager, settings.runtime, threads=settings.threads, calibration_paths=calibration,
                         progress=settings.progress)
    embeddings = embed_catalog(catalog, model, settings, root=root)
    if len(embeddings.vectors) == 0:
        raise FashionRecError(f"no image of the catalog could be embedded ({len(embeddings.skipped)} skipped)")
    vectors = embeddings.vectors
    colour = colour_descriptors(embeddings.metadata[["id", "path", "label"]], settings, root=root)
    colour_vectors = aligned_colour(embeddings.metadata, colour)
    attributes = [column for column in embeddings.metadata.columns if column not in (*ITEM_COLUMNS, "split")]
    items = embeddings.metadata.assign(path=[str(Path(p).resolve()) for p in embeddings.metadata["path"]],
                                       deleted=False, label_probability=np.nan)[ITEM_COLUMNS + attributes]
    if store.store == "milvus":
        auto = None
        vector_store = MilvusRowStore.build(collection_prefix(outdir), vectors, items["label"].astype(str).tolist(),
                                            index, metric, search_params, milvus_uri(store), store.milvus_token)
    else:
        factory, params, auto = resolve_index(index, len(vectors), vectors.shape[1], search_params,
                                              memory_budget_bytes, recall_target)
        try:
            vector_store = FaissRowStore.build(vectors, factory, metric, seed=seed, search_params=params,
                                            threads=settings.threads)
        except IndexBuildError as error:
            raise FashionRecError(f"{error}; choose another --index (Flat always works)") from None
    all_skipped = [*skipped, *embeddings.skipped]
    roles = (None if quality_split_seed is None
             else split_of_record(catalog, items["id"].astype(str).tolist(), quality_split_seed))
    base_name, reference = split_backbone_name(backbone)
    try:
        staged = _write_build(outdir, vector_store, model, eager, embeddings, vectors, items, all_skipped, backbone,
                              base_name, reference, index, metric, seed, auto, dataset, settings,
                              (colour, colour_vectors), (roles, quality_split_seed))
    except BaseException:
        if store.store == "milvus":
            vector_store.discard(always=True)
        raise
    if store.store == "milvus":
        vector_store.store.close()
        drop_unreferenced_collections(outdir, milvus_uri(store), store.milvus_token)
    return BuildReport(outdir, staged.version, staged.manifest, embeddings.n_computed, embeddings.n_reused,
                       time.perf_counter() - started)


def check_folder_store(index: str, metric: str, search_params: str, store: StoreSettings) -> None:
    """For a Milvus-backed folder: the index has a Milvus counterpart and the URI opens (before any embedding)."""
    if store.store == "milvus":
        try:
            check_store(store, metric, AUTO_INDEX if index == "auto" else index, search_params)
        except ValueError as error:
            raise FashionRecError(f"--store milvus --index {index}: {error}") from None


@dataclass
class _Staged:
    version: str
    manifest: BuildManifest


def _write_build(outdir, vector_store, model, eager, embeddings, vectors, items, all_skipped, backbone, base_name,
                 reference, index, metric, seed, auto, dataset, settings, colour, quality) -> _Staged:
    colour_embeddings, colour_vectors = colour
    roles, split_seed = quality
    with new_version(outdir) as staging:
        query = write_query_model(staging.path, model)
        query["check"] = check_query_path(staging.path, query, model, embeddings.metadata, vectors, settings.threads)
        base = get_backbone(base_name, weights_file=settings.weights_file) if reference else eager
        classifier = write_classifier(staging.path, backbone, base, settings.runtime, settings.threads)
        described = vector_store.save(staging.path)
        manifest = BuildManifest(
            created=_now(),
            backbone={"name": backbone, "base": base_name,
                      "head_file": str(resolve_head_path(reference)) if reference else None,
                      "weights_file": settings.weights_file, "weights_sha256": embeddings.weights_sha256,
                      "cache_key": embeddings.cache_key, "dim": int(vectors.shape[1]),
                      "description": eager.description},
            runtime=settings.runtime,
            preprocessing={"transform": repr(model.transform) if hasattr(model, "transform") else None,
                           "leaves": embeddings.preprocessing, "query": query["preprocessing"]},
            ranking=_ranking(reference),
            query_model=query,
            metric=metric,
            index={"spec": index, **described, "seed": seed, "auto": auto,
                   "tombstone_rebuild_fraction": TOMBSTONE_REBUILD_FRACTION},
            dataset={**(dataset or {}), "fingerprint": dataset_fingerprint(embeddings.metadata)},
            versions=package_versions(),
            counts=item_counts(items, all_skipped),
            skipped=all_skipped,
            classifier=classifier,
            colour={"backbone": COLOUR_BACKBONE, "cache_key": colour_embeddings.cache_key,
                    "dim": int(colour_vectors.shape[1]), "file": COLOUR_FILE},
        )
        if roles is not None:
            predictor = open_predictor(staging.path, classifier, settings.threads, False,
                                       lambda: FolderNetworks(outdir, manifest, settings))
            manifest.quality = quality_card(vector_store, vectors, items["label"].to_numpy(), items["path"].tolist(),
                                            *roles, boost=manifest.category_boost, predictor=predictor,
                                            split_seed=split_seed, seed=seed)
        write_version_files(staging.path, items, vectors.astype(np.float16), manifest,
                            colour_vectors.astype(np.float16))
    return _Staged(staging.version, manifest)


def check_query_path(directory: Path, query: dict, model, metadata: pd.DataFrame, vectors: np.ndarray,
                     threads: int | None) -> dict:
    """Embeds a few catalog images through the single-query path and compares them with the index's vectors.

    The query path (exact geometry, uint8 model) must equal the batch path within the ONNX
    export tolerance; anything else would search the index with vectors from another space.
    """
    encoder = open_encoder(directory, query, threads, False, lambda: torch_encoder(model))
    rows = np.random.default_rng(0).choice(len(metadata), size=min(QUERY_CHECK_IMAGES, len(metadata)), replace=False)
    worst = 0.0
    for row in sorted(rows):
        path = metadata["path"].iloc[row]
        vector, _ = encoder.encode_with(lambda draft_size: decode_query(path, draft_size, as_array=True))
        expected = vectors[row]
        worst = max(worst, float(np.abs(vector[0] - expected).max() / max(np.abs(expected).max(), 1e-12)))
    if not worst <= EXPORT_RTOL:
        raise FashionRecError(f"the single-query path differs from the batch embeddings by {worst:.2e} relative "
                              f"(limit {EXPORT_RTOL:.0e}); build with --runtime eager and report this")
    return {"images": int(len(rows)), "max_relative_difference": worst, "limit": EXPORT_RTOL}


def _ranking(reference: str | None) -> dict:
    """How the model ranks: by similarity, or (a searched model) with its predicted category first."""
    payload = load_model(resolve_head_path(reference)) if reference else {}
    return payload.get("ranking") or {"boost": 0.0, "categories": None}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def index_dataset(outdir, dataset: str, backbone: str, *, data_dir=None, split: str = "all",
                  max_per_class: int | None = None, category_map=None, split_seed: int = config.DEFAULT_SEED,
                  columns=None, image_root=None, quality: bool = True, **build) -> BuildReport:
    """Loads a named dataset (the whole catalog, or one split of record) and builds an index folder of it.

    ``quality``: a whole labelled catalog gets its quality card (:mod:`fashionrec.serving.quality`)
    measured on its split of record with ``split_seed``.

    ``columns``, ``image_root``: a catalog table's own columns and image folder; its other
    columns travel into the folder as attributes. ``build`` are :func:`build_index_folder`'s
    keyword arguments.
    """
    if split not in SPLIT_CHOICES:
        raise FashionRecError(f"unknown split {split!r}; choose from {', '.join(SPLIT_CHOICES)}")
    progress = build.get("settings", InferenceSettings()).progress
    check_output_folder(Path(outdir))
    check_backbone_name(backbone)
    store = build.get("store", StoreSettings())
    check_folder_store(build.get("index", "Flat"), build.get("metric", "cosine"), build.get("search_params", ""), store)
    if store.store == "faiss":
        check_index_spec(build.get("index", "Flat"), backbone_dim(backbone))
    if split == "all":
        loaded = load_dataset(dataset, data_dir, max_per_class=max_per_class, seed=split_seed,
                              category_map=category_map, progress=progress, columns=columns, image_root=image_root)
        catalog, root, skipped = loaded.catalog, loaded.root, loaded.skipped
    else:
        prepared = prepare(dataset, data_dir, split_seed=split_seed, max_per_class=max_per_class,
                           category_map=category_map, progress=progress, columns=columns, image_root=image_root)
        catalog = prepared.catalog[prepared.catalog["split"] == split].reset_index(drop=True)
        root, skipped = prepared.root, prepared.skipped
    provenance = {"name": dataset, "data_dir": str(root), "split": split, "split_seed": split_seed,
                  "max_per_class": max_per_class,
                  "category_map": category_map if isinstance(category_map, (dict, type(None))) else str(category_map)}
    if columns:
        provenance["columns"] = dict(columns)
    return build_index_folder(outdir, catalog.drop(columns=["split"], errors="ignore"), backbone, root=root,
                              dataset=provenance,
                              skipped=skipped, seed=build.pop("seed", split_seed),
                              quality_split_seed=split_seed if quality and split == "all" else None, **build)
