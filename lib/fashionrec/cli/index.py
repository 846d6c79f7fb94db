"""``index``: build a servable index folder of a catalog, or update one in place.

    python -m fashionrec index --dataset D [--data-dir DIR] --backbone NAME [--index SPEC|auto] --out OUTDIR [--json]
        [--store faiss|milvus --milvus-uri URI]     (vectors in index.faiss, or in a Milvus collection)
    python -m fashionrec index --catalog products.csv --columns path=file,label=type,id=sku --backbone NAME --out OUTDIR
    python -m fashionrec index --update OUTDIR [--add DIR_OR_TABLE [--columns ...]] [--remove ID [ID ...]] [--json]

``--add`` takes a folder (category sub-folders, and/or unlabelled photos lying in it), a folder
holding ``catalog.csv``, or a CSV or Parquet table (``--columns`` and ``--image-root`` as for a
build; its other columns are the new items' attributes). Photos without a label get the
category the index's classifier predicts, marked as predicted with its probability; an index
without a classifier refuses them before anything is embedded. An update that adds nothing,
or leaves out more than ``--max-skipped-fraction`` of the files, writes nothing and exits 1,
with one summary line and the ledger of left-out files in a JSON file (``--ledger``).
The update is written as a new version of the folder; the previous one stays loadable until
the new one is complete.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .. import config
from ..data.catalog import load_additions, parse_columns
from ..data.ledger import describe_counts
from ..errors import FashionRecError
from ..indexing.faiss_index import METRICS
from ..models.registry import load_user_backbones
from ..serving.build import DEFAULT_MEMORY_BUDGET_BYTES, DEFAULT_RECALL_TARGET, SPLIT_CHOICES, index_dataset
from ..serving.folder import current_version
from ..serving.quality import describe_quality
from ..serving.recommender import Recommender
from ..settings import StoreSettings
from .commands import SUMMARIES
from .common import (add_backbone_arguments, add_data_arguments, add_store_arguments, data_source, inference_settings,
                     print_json, serving_store)

UPDATE_FAILED = 1


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
    build.add_argument("--no-quality", action="store_true",
                       help="skip the quality card (P@10 of the folder on the catalog's split of record, measured "
                            "when a whole labelled catalog is indexed)")
    add_store_arguments(build, default=None, what="where the vectors are indexed (an update: where they are)")
    update = parser.add_argument_group("update")
    update.add_argument("--update", default=None, metavar="OUTDIR", help="update this index folder")
    update.add_argument("--add", default=None, metavar="DIR_OR_TABLE", help="images to add (see above)")
    update.add_argument("--max-skipped-fraction", type=float, default=0.0,
                        help="the share of --add's files that may be left out before the update fails "
                             "(default %(default)s: any left-out file fails it)")
    update.add_argument("--ledger", default=None, metavar="FILE",
                        help="where an update writes its ledger of left-out files (default: "
                             "results/index-updates/<folder>-<time>.json)")
    update.add_argument("--remove", nargs="+", default=None, metavar="ID", help="ids to remove")
    parser.set_defaults(handler=run)


def run(args) -> int:
    if args.update:
        return _update(args)
    catalog_options = data_source(args)
    missing = [flag for flag, value in (("--dataset", args.dataset), ("--backbone", args.backbone), ("--out", args.out))
               if not value]
    if missing:
        raise FashionRecError(f"index: {', '.join(missing)} required to build an index (or --update OUTDIR to "
                              "update one)")
    if args.add or args.remove:
        raise FashionRecError("index: --add and --remove go with --update OUTDIR")
    load_user_backbones(args.backbone_module, getattr(args, "backbone", None))
    settings = inference_settings(args)
    report = index_dataset(args.out, args.dataset, args.backbone, data_dir=args.data_dir, split=args.split,
                           **catalog_options,
                           max_per_class=args.max_per_class, category_map=args.category_map,
                           split_seed=args.split_seed, index=args.index, metric=args.metric,
                           search_params=args.search_params, settings=settings,
                           memory_budget_bytes=args.memory_budget * 2**30, recall_target=args.recall_target,
                           store=serving_store(args) or StoreSettings(), quality=not args.no_quality)
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
    if record["quality"]:
        print(f"  quality: {describe_quality(record['quality'])}")
    for item in record["skipped"][:20]:
        print(f"  ({item['stage']}) {item['path']}: {item['reason']}")
    if len(record["skipped"]) > 20:
        print(f"  ... and {len(record['skipped']) - 20} more (all listed in build.json)")
    return 0


def _update(args) -> int:
    if args.add is None and not args.remove:
        raise FashionRecError("index --update: nothing to do; give --add DIR_OR_TABLE and/or --remove ID [ID ...]")
    if args.dataset or args.out or args.catalog:
        raise FashionRecError("index --update: --dataset, --catalog and --out build a new index; an update takes "
                              "only --add / --remove")
    if (args.columns or args.image_root) and not args.add:
        raise FashionRecError("index --update: --columns and --image-root describe the table --add names")
    if not 0.0 <= args.max_skipped_fraction <= 1.0:
        raise FashionRecError(f"--max-skipped-fraction is a share between 0 and 1, got {args.max_skipped_fraction}")
    store = serving_store(args)
    current_version(args.update)   # a clear error for a missing or broken folder before anything else
    load_user_backbones(args.backbone_module, getattr(args, "backbone", None))
    to_add = load_additions(args.add, parse_columns(args.columns), args.image_root) if args.add else None
    with Recommender.load(args.update, inference_settings(args), store=store) as recommender:
        if to_add is not None:
            recommender.check_can_label(to_add.catalog["label"].tolist())   # before anything is embedded
        record = _apply_update(recommender, args, to_add)
    ledger = _write_ledger(args, record) if record["skipped"] or record["failed"] else None
    record["ledger"] = str(ledger) if ledger else None
    if args.json:
        print_json(record)
    else:
        _print_update(record)
    return UPDATE_FAILED if record["failed"] else 0


def _apply_update(recommender: Recommender, args, to_add) -> dict:
    """Removes, adds and (unless the add failed its checks) saves a new version; the update's record."""
    if args.remove:
        unknown = [item_id for item_id in args.remove if item_id not in set(recommender.ids)]
        if unknown:
            raise FashionRecError(f"index --update: unknown id(s) {', '.join(unknown[:5])}; nothing was changed")
    removed = recommender.remove(args.remove) if args.remove else None
    added = None
    if to_add is not None:
        catalog = to_add.catalog
        attributes = catalog.drop(columns=["id", "path", "label"])
        added = recommender.add(catalog["path"].tolist(), catalog["label"].tolist(), catalog["id"].tolist(),
                                attributes if len(attributes.columns) else None)
    skipped = [*(to_add.skipped if to_add else []), *(added.skipped if added else [])]
    failed = _add_failure(args, added, skipped) if to_add is not None else None
    version = None if failed else recommender.save()
    return {"out": str(args.update), "version": version or recommender.version, "saved": version is not None,
            "failed": failed,
            "added": added.added if added and not failed else [], "removed": removed.removed if removed else [],
            "predicted": added.predicted if added and not failed else [],
            "skipped": skipped, "compacted": bool(removed and removed.compacted),
            "n_items": len(recommender), "n_tombstones": recommender.describe()["tombstones"],
            "index": recommender.info["index"]["factory"]}


def _add_failure(args, added, skipped: list[dict]) -> str | None:
    """Why an add fails (it then writes nothing): it added nothing, or left out too many files; None if it passed."""
    n_added = len(added.added) if added else 0
    looked_at = n_added + len(skipped)
    if n_added == 0:
        return f"--add {args.add} added nothing ({looked_at} file(s) looked at)"
    share = len(skipped) / looked_at
    if share > args.max_skipped_fraction:
        return (f"--add {args.add} left out {len(skipped)} of {looked_at} files ({share:.0%}), more than "
                f"--max-skipped-fraction {args.max_skipped_fraction:g}")
    return None


def _write_ledger(args, record: dict) -> Path:
    """The update's left-out files (path, stage, reason) and its outcome, as a JSON file."""
    if args.ledger:
        path = Path(args.ledger)
    else:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = config.RESULTS_DIR / "index-updates" / f"{Path(args.update).resolve().name}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {key: record[key] for key in ("out", "version", "saved", "failed")}
    path.write_text(json.dumps({**summary, "n_added": len(record["added"]), "skipped": record["skipped"]},
                               indent=1, ensure_ascii=False) + "\n")
    return path


def _print_update(record: dict) -> None:
    tail = f"; ledger: {record['ledger']}" if record["ledger"] else ""
    if record["failed"]:
        print(f"update failed, nothing written to {record['out']} (still {record['version']}): {record['failed']}; "
              f"{describe_counts(record['skipped'])}{tail}")
        return
    predicted = f" ({len(record['predicted'])} with a predicted category)" if record["predicted"] else ""
    print(f"updated {record['out']} ({record['version']}): added {len(record['added'])}{predicted}, removed "
          f"{len(record['removed'])}, {describe_counts(record['skipped'])}; {record['n_items']} items"
          + (f", {record['n_tombstones']} tombstones" if record["n_tombstones"] else "")
          + (" (index rebuilt without its tombstones)" if record["compacted"] else "") + tail)
