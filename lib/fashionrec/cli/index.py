"""``index``: build a servable index folder of a catalog, or update one in place.

    python -m fashionrec index --dataset D [--data-dir DIR] --backbone NAME [--index SPEC|auto] --out OUTDIR [--json]
        [--store faiss|milvus --milvus-uri URI]     (vectors in index.faiss, or in a Milvus collection)
    python -m fashionrec index --update OUTDIR [--add DIR_OR_CSV] [--remove ID [ID ...]] [--json]

``--add`` takes an ImageFolder tree (one sub-folder per category), a folder holding
``catalog.csv``, or a CSV file (columns path,label and optionally id; paths relative to the
CSV's folder). The update is written as a new version of the folder; the previous one stays
loadable until the new one is complete.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..data.catalog import load_catalog_csv, load_folder
from ..data.ledger import describe_counts
from ..errors import FashionRecError
from ..indexing.faiss_index import METRICS
from ..serving.build import (DEFAULT_MEMORY_BUDGET_BYTES, DEFAULT_RECALL_TARGET, SPLIT_CHOICES, index_dataset)
from ..serving.folder import current_version
from ..serving.recommender import Recommender
from ..settings import StoreSettings
from .commands import SUMMARIES
from .common import (add_backbone_arguments, add_data_arguments, add_store_arguments, inference_settings,
                     load_user_backbones, print_json, serving_store)


def add_parser(commands) -> None:
    parser = commands.add_parser("index", help=SUMMARIES["index"],
                                 description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser, required=False)
    add_backbone_arguments(parser, required=False)
    build = parser.add_argument_group("build")
    build.add_argument("--index", default="Flat",
                       help="faiss factory string or template (Flat, HNSW32, IVF{nlist},PQ{m}, ...) or auto "
                            "(chosen for the catalog size, --memory-budget and --recall-target)")
    build.add_argument("--search-params", default="", help="e.g. efSearch=128 or nprobe=32 (default: the index's)")
    build.add_argument("--metric", default="cosine", choices=METRICS)
    build.add_argument("--split", default="all", choices=SPLIT_CHOICES,
                       help="all: the whole catalog (default); gallery: only the evaluation gallery of the split")
    build.add_argument("--memory-budget", type=float, default=DEFAULT_MEMORY_BUDGET_BYTES / 2**30,
                       help="--index auto: GiB the index may take (default %(default)s)")
    build.add_argument("--recall-target", type=float, default=DEFAULT_RECALL_TARGET,
                       help="--index auto: recall@10 the index must reach (default %(default)s)")
    build.add_argument("--out", default=None, help="the index folder to write (replaced atomically if it exists)")
    add_store_arguments(build, default=None, what="where the vectors are indexed (an update: where they are)")
    update = parser.add_argument_group("update")
    update.add_argument("--update", default=None, metavar="OUTDIR", help="update this index folder")
    update.add_argument("--add", default=None, metavar="DIR_OR_CSV", help="images to add (see above)")
    update.add_argument("--remove", nargs="+", default=None, metavar="ID", help="ids to remove")
    parser.set_defaults(handler=run)


def run(args) -> int:
    if args.update:
        return _update(args)
    missing = [flag for flag, value in (("--dataset", args.dataset), ("--backbone", args.backbone), ("--out", args.out))
               if not value]
    if missing:
        raise FashionRecError(f"index: {', '.join(missing)} required to build an index (or --update OUTDIR to "
                              "update one)")
    if args.add or args.remove:
        raise FashionRecError("index: --add and --remove go with --update OUTDIR")
    load_user_backbones(args)
    settings = inference_settings(args)
    report = index_dataset(args.out, args.dataset, args.backbone, data_dir=args.data_dir, split=args.split,
                           max_per_class=args.max_per_class, category_map=args.category_map,
                           split_seed=args.split_seed, index=args.index, metric=args.metric,
                           search_params=args.search_params, settings=settings,
                           memory_budget_bytes=args.memory_budget * 2**30, recall_target=args.recall_target,
                           store=serving_store(args) or StoreSettings())
    record = report.to_record()
    if args.json:
        print_json(record)
        return 0
    index = record["index"]
    print(f"indexed {record['n_items']} images of {args.dataset} with {record['backbone']} ({record['runtime']}) "
          f"into {record['out']} ({record['version']}): {index['factory']} {index['search_params']} "
          f"({record['metric']}), {record['dim']}-d; {describe_counts(record['skipped'])}; {record['seconds']:.1f} s")
    if index.get("auto"):
        print(f"  index chosen: {index['auto']['rationale']}")
    for item in record["skipped"][:20]:
        print(f"  ({item['stage']}) {item['path']}: {item['reason']}")
    if len(record["skipped"]) > 20:
        print(f"  ... and {len(record['skipped']) - 20} more (all listed in build.json)")
    return 0


def _catalog_to_add(source: str):
    """(paths, labels, ids, skipped) from an ImageFolder tree, a folder with catalog.csv, or a CSV file."""
    path = Path(source)
    if not path.exists():
        raise FashionRecError(f"--add {source}: no such file or folder")
    if path.is_file() or (path / "catalog.csv").is_file():
        loaded = load_catalog_csv(path, progress=False)
    else:
        loaded = load_folder(path, progress=False)
    catalog = loaded.catalog
    return catalog["path"].tolist(), catalog["label"].tolist(), catalog["id"].tolist(), loaded.skipped


def _update(args) -> int:
    if args.add is None and not args.remove:
        raise FashionRecError("index --update: nothing to do; give --add DIR_OR_CSV and/or --remove ID [ID ...]")
    if args.dataset or args.out:
        raise FashionRecError("index --update: --dataset and --out build a new index; an update takes only "
                              "--add / --remove")
    store = serving_store(args)
    current_version(args.update)   # a clear error for a missing or broken folder before anything else
    load_user_backbones(args)
    to_add = _catalog_to_add(args.add) if args.add else None
    with Recommender.load(args.update, inference_settings(args), store=store) as recommender:
        record = _apply_update(recommender, args, to_add)
    if args.json:
        print_json(record)
        return 0
    print(f"updated {record['out']} ({record['version']}): added {len(record['added'])}, removed {len(record['removed'])}, "
          f"{describe_counts(record['skipped'])}; {record['n_items']} items"
          + (f", {record['n_tombstones']} tombstones" if record["n_tombstones"] else "")
          + (" (index rebuilt without its tombstones)" if record["compacted"] else ""))
    for item in record["skipped"]:
        print(f"  ({item['stage']}) {item['path']}: {item['reason']}")
    return 0


def _apply_update(recommender: Recommender, args, to_add) -> dict:
    """Removes, adds and saves a new version; the update's record."""
    if args.remove:
        unknown = [item_id for item_id in args.remove if item_id not in set(recommender.ids)]
        if unknown:
            raise FashionRecError(f"index --update: unknown id(s) {', '.join(unknown[:5])}; nothing was changed")
    removed = recommender.remove(args.remove) if args.remove else None
    added = recommender.add(*to_add[:3]) if to_add else None
    version = recommender.save()
    return {"out": str(args.update), "version": version,
            "added": added.added if added else [], "removed": removed.removed if removed else [],
            "skipped": [*(to_add[3] if to_add else []), *(added.skipped if added else [])],
            "compacted": bool(removed and removed.compacted),
            "n_items": len(recommender), "n_tombstones": recommender.describe()["tombstones"],
            "index": recommender.info["index"]["factory"]}
