"""``duplicates``: exact and near-duplicate items of an index folder, grouped.

    python -m fashionrec duplicates --index-dir OUTDIR [--threshold 0.97] [--json]

Exact duplicates share a content digest (the same file under two ids); near duplicates are
items whose stored embeddings have cosine similarity >= ``--threshold``. Pairs are grouped
transitively. With ``--json``, one object: ``{"exact": [[id, ...], ...], "near": [[id, ...],
...], "threshold", "exact_paths", "near_paths", "n_items", "seconds"}`` (the ``*_paths`` lists
mirror the groups with each item's file).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from ..errors import FashionRecError, IndexFolderError
from ..evaluation.duplicates import DEFAULT_THRESHOLD, find_duplicates
from ..serving.folder import EMBEDDINGS_FILE, current_version, read_items
from .commands import SUMMARIES

SHOWN_GROUPS = 20


def add_parser(commands) -> None:
    parser = commands.add_parser("duplicates", help=SUMMARIES["duplicates"],
                                 description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index-dir", required=True, help="an index folder (python -m fashionrec index ... --out)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="cosine similarity at or above which two items are near duplicates (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.set_defaults(handler=run)


def duplicates_record(index_dir, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """The duplicate groups of an index folder's live items, by id and by path."""
    if not 0.0 < threshold <= 1.0:
        raise FashionRecError(f"--threshold is a cosine similarity in (0, 1], got {threshold}")
    started = time.perf_counter()
    version = current_version(index_dir)
    try:
        items = read_items(version)
        vectors = np.load(version / EMBEDDINGS_FILE, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise IndexFolderError(f"{version}: cannot be read ({error}); rebuild the index") from None
    live = np.flatnonzero(~items["deleted"].to_numpy(dtype=bool))
    items = items.iloc[live].reset_index(drop=True)
    groups = find_duplicates(np.asarray(vectors[live], dtype=np.float32), items["digest"], threshold)
    ids, paths = items["id"].astype(str).tolist(), items["path"].astype(str).tolist()
    return {"index_dir": str(index_dir), "version": version.name, "n_items": len(items), "threshold": threshold,
            "exact": [[ids[row] for row in group] for group in groups.exact],
            "near": [[ids[row] for row in group] for group in groups.near],
            "exact_paths": [[paths[row] for row in group] for group in groups.exact],
            "near_paths": [[paths[row] for row in group] for group in groups.near],
            "n_near_pairs": groups.n_near_pairs, "seconds": round(time.perf_counter() - started, 3)}


def run(args) -> int:
    record = duplicates_record(args.index_dir, args.threshold)
    if args.json:   # as common.print_json, whose module would import torch for a command that needs none
        json.dump(record, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    print(f"{record['index_dir']} ({record['version']}, {record['n_items']} items): {len(record['exact'])} groups of "
          f"exact duplicates (same file content), {len(record['near'])} groups of near duplicates (cosine >= "
          f"{record['threshold']:g}); {record['seconds']:.2f} s")
    for kind in ("exact", "near"):
        for ids, paths in list(zip(record[kind], record[f"{kind}_paths"]))[:SHOWN_GROUPS]:
            print(f"  {kind}: " + ", ".join(f"{item_id} ({path})" for item_id, path in zip(ids, paths)))
        if len(record[kind]) > SHOWN_GROUPS:
            print(f"  ... and {len(record[kind]) - SHOWN_GROUPS} more {kind} groups (--json lists them all)")
    return 0
