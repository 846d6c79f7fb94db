"""Arguments and output shared by the commands."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .. import config
from ..data.catalog import parse_columns
from ..data.ledger import describe_counts
from ..errors import FashionRecError
from ..ranking.milvus import check_store
from ..settings import DEFAULT_RUNTIME, RUNTIMES, STORES, InferenceSettings, StoreSettings

MILVUS_TOKEN_ENV = "MILVUS_TOKEN"


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The dataset arguments; ``--catalog FILE`` stands for ``--dataset catalog --data-dir FILE``
    (call :func:`data_source` once the arguments are parsed)."""
    parser.add_argument("--dataset", required=False, help="fashion-mnist, clothing, folder or catalog"
                        + (" (or --catalog FILE)" if required else ""))
    parser.add_argument("--data-dir", default=None, help="where the dataset lies (default: the dataset's usual place)")
    add_catalog_arguments(parser)
    parser.set_defaults(dataset_required=required)
    parser.add_argument("--max-per-class", type=int, default=None, help="cap images per category (seeded sample)")
    parser.add_argument("--category-map", default=None, help="YAML mapping old label -> new label (null drops)")
    parser.add_argument("--split-seed", type=int, default=config.DEFAULT_SEED)


def add_catalog_arguments(parser) -> None:
    parser.add_argument("--catalog", default=None, metavar="FILE",
                        help="a shop's catalog table, .csv or .parquet (implies --dataset catalog; see docs/catalog.md)")
    parser.add_argument("--columns", default=None, metavar="ROLE=COLUMN,...",
                        help="the catalog's own column names, e.g. path=file,label=type,id=sku; every other "
                             "column is an attribute")
    parser.add_argument("--image-root", default=None, metavar="DIR",
                        help="the folder the catalog's image paths start from (default: the catalog file's folder)")


def data_source(args) -> dict:
    """Resolves ``--catalog`` into ``args.dataset``/``args.data_dir``; the loader options of
    ``--columns``/``--image-root`` (keyword arguments of ``load_dataset`` and ``prepare``)."""
    if args.catalog is not None:
        if args.dataset not in (None, "catalog"):
            raise FashionRecError(f"--catalog is --dataset catalog; it does not go with --dataset {args.dataset}")
        if args.data_dir is not None:
            raise FashionRecError("--catalog names the catalog file; leave --data-dir out (paths in it start from "
                                   "its folder, or from --image-root)")
        args.dataset, args.data_dir = "catalog", args.catalog
    if getattr(args, "dataset_required", False) and not args.dataset:
        raise FashionRecError("--dataset (or --catalog FILE) is required")
    if (args.columns or args.image_root) and args.dataset != "catalog":
        raise FashionRecError("--columns and --image-root go with --catalog FILE (or --dataset catalog)")
    if args.dataset != "catalog":
        return {}
    return {"columns": parse_columns(args.columns), "image_root": args.image_root}


def add_backbone_module_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone-module", action="append", default=[], metavar="PATH_OR_MODULE",
                        help="a .py file or importable module that registers backbones with "
                             "@register_backbone (repeatable; see docs/custom-backbones.md)")


def add_backbone_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--backbone", required=required, help="a name from `python -m fashionrec backbones`")
    add_backbone_module_argument(parser)
    parser.add_argument("--weights-file", default=None, help="explicit local weights file for torchvision backbones")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None,
                        help="threads that decode each batch (default: one per CPU; 0: the main thread)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of the inference runtime (default: torch's choice / all CPUs for ONNX)")
    parser.add_argument("--runtime", default=DEFAULT_RUNTIME, choices=RUNTIMES,
                        help="inference runtime: onnx (default; equals eager within 1e-4), eager (reference "
                             "PyTorch), onnx-int8 (quantised, changes embeddings; only when asked)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_store_arguments(parser, default: str | None = "faiss",
                        what: str = "vector store that ranks the gallery") -> None:
    """``--store`` and ``--milvus-uri``; ``default`` None: the index folder decides (recommend, app, updates)."""
    parser.add_argument("--store", default=default, choices=STORES,
                        help=f"{what}: faiss (in this process) or milvus (default: "
                             f"{default or 'where the index folder was built'})")
    parser.add_argument("--milvus-uri", default=None,
                        help="with --store milvus: a Milvus Lite file (a path ending in .db; default "
                             "results/milvus.db) or a server/cluster, http://host:19530 (token from $MILVUS_TOKEN)")


def serving_store(args) -> StoreSettings | None:
    """What ``--store``/``--milvus-uri`` ask of an index folder: None (as it was built) or the store and its URI."""
    if args.milvus_uri is not None and args.store not in (None, "milvus"):
        raise FashionRecError("--milvus-uri applies only with --store milvus")
    if args.store is None and args.milvus_uri is None:
        return None
    return StoreSettings(args.store or "milvus", args.milvus_uri, os.environ.get(MILVUS_TOKEN_ENV, ""))


def store_settings(args, metric: str, index: str, search_params: str = "") -> StoreSettings:
    """The store the arguments name, checked now (index counterpart, URI reachable) rather than after embedding."""
    if args.milvus_uri is not None and args.store != "milvus":
        raise FashionRecError("--milvus-uri applies only with --store milvus")
    settings = StoreSettings(args.store, args.milvus_uri, os.environ.get(MILVUS_TOKEN_ENV, ""))
    try:
        check_store(settings, metric, index, search_params)
    except ValueError as error:
        raise FashionRecError(f"--store {args.store} --index {index}: {error}") from None
    return settings


def inference_settings(args) -> InferenceSettings:
    return InferenceSettings(batch_size=args.batch_size, workers=args.workers, threads=args.threads,
                             runtime=args.runtime, progress=not args.quiet, weights_file=args.weights_file)


def print_metrics(record: dict) -> None:
    if "relevance_rule" in record:
        share = record["share_of_catalog"]
        print(f"  relevant = {record['relevance_rule']}; {record['n_queries']} queries ranked a {record['n_gallery']}-item "
              f"gallery" + (f" ({share:.0%} of the {record['n_catalog_images']}-image catalog together)"
                            if share is not None else ""))
        print(f"  P@{record['k']} = {record['precision_at_k_means']}")
    _print_core_metrics(record)
    if record.get("near_duplicate_queries") is not None:
        clean = record["precision_at_k_without_near_duplicates"]
        print(f"  leakage check: {record['near_duplicate_queries']} of {record['n_queries']} queries have a near "
              f"duplicate in the gallery (cosine >= {record['near_duplicate_threshold']:g}); precision_at_k without "
              f"them {'n/a' if clean is None else f'{clean:.4f}'}")


def _print_core_metrics(record: dict) -> None:
    relevance = record.get("relevance", ["label"])
    if relevance != ["label"]:
        missing = record.get("relevance_missing", {})
        print(f"  relevance: same {', '.join(relevance)} ({missing.get('queries', 0)} queries and "
              f"{missing.get('gallery', 0)} gallery items lack a value: never relevant)")
    if record.get("colour_weight"):
        print(f"  colour weight {record['colour_weight']:g}: {record['colour_fusion']}")
    for name in ("precision_at_k", "hit_rate_at_k", "recall_at_k", "map_at_k", "hit_rate_at_1"):
        low, high = record[f"{name}_ci"]
        print(f"  {name:<15} {record[name]:.4f}  (95% CI {low:.4f}-{high:.4f})")
    if relevance != ["label"] and "category_precision_at_k" in record:
        low, high = record["category_precision_at_k_ci"]
        print(f"  {'category P@k':<15} {record['category_precision_at_k']:.4f}  (95% CI {low:.4f}-{high:.4f})")


def print_json(record: dict) -> None:
    json.dump(record, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")


def print_skipped(skipped: list[dict], limit: int = 10) -> None:
    """The ledger's summary line and its first entries (``--json`` has them all)."""
    print(f"  {describe_counts(skipped)}")
    for item in skipped[:limit]:
        print(f"    ({item['stage']}) {item['path']}: {item['reason']}")
    if len(skipped) > limit:
        print(f"    ... and {len(skipped) - limit} more (--json lists them all)")
