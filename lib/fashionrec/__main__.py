"""Command line: ``python -m fashionrec {evaluate,embed,backbones,pipeline} ...``.

Machine-readable results go to stdout (``--json``: exactly one JSON object); progress
and diagnostics go to stderr, so ``... --json | jq`` always works.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import config
from .errors import FashionRecError, WeightsUnavailable

EXIT_ERROR = 2
EXIT_WEIGHTS_UNAVAILABLE = 3


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="fashion-mnist, clothing, folder or catalog")
    parser.add_argument("--data-dir", default=None, help="where the dataset lies (default: the dataset's usual place)")
    parser.add_argument("--max-per-class", type=int, default=None, help="cap images per category (seeded sample)")
    parser.add_argument("--category-map", default=None, help="YAML mapping old label -> new label (null drops)")
    parser.add_argument("--split-seed", type=int, default=config.DEFAULT_SEED)


def _add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, help="a name from `python -m fashionrec backbones`")
    parser.add_argument("--weights-file", default=None, help="explicit local weights file for torchvision backbones")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="image decoding worker processes")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _print_json(record: dict) -> None:
    json.dump(record, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")


def cmd_evaluate(args) -> int:
    from .workflow import evaluate_backbone, prepare

    prepared = prepare(args.dataset, args.data_dir, split_seed=args.split_seed, max_per_class=args.max_per_class,
                       category_map=args.category_map, progress=not args.quiet)
    record, embeddings = evaluate_backbone(
        prepared, args.backbone, index=args.index, k=args.k, metric=args.metric, search_params=args.search_params,
        weights_file=args.weights_file, batch_size=args.batch_size, num_workers=args.workers,
        threads=args.threads, progress=not args.quiet,
    )
    record["timing"] = {"embedded": embeddings.n_computed, "reused_from_cache": embeddings.n_reused,
                        "embed_seconds": round(embeddings.seconds, 3)}
    if args.json:
        _print_json(record)
    else:
        print(f"{record['dataset']} | {record['backbone']} | {record['index']} ({record['metric']}) | "
              f"k={record['k']} | split seed {record['split_seed']} | "
              f"{record['n_queries']} queries -> {record['n_gallery']} gallery")
        for name in ("precision_at_k", "hit_rate_at_k", "recall_at_k", "map_at_k", "hit_rate_at_1"):
            low, high = record[f"{name}_ci"]
            print(f"  {name:<15} {record[name]:.4f}  (95% CI {low:.4f}-{high:.4f})")
    return 0


def cmd_embed(args) -> int:
    from .backbones import get_backbone
    from .datasets import load_dataset
    from .embed import embed_catalog

    # The whole catalog, unsplit: categories too small for the split are embedded too.
    loaded = load_dataset(args.dataset, args.data_dir, max_per_class=args.max_per_class, seed=args.split_seed,
                          category_map=args.category_map, progress=not args.quiet)
    model = get_backbone(args.backbone, weights_file=args.weights_file)
    embeddings = embed_catalog(loaded.catalog, model, batch_size=args.batch_size, num_workers=args.workers,
                               threads=args.threads, root=loaded.root, progress=not args.quiet)
    skipped = loaded.skipped + embeddings.skipped
    record = {
        "dataset": args.dataset,
        "data_dir": str(loaded.root),
        "backbone": args.backbone,
        "weights_sha256": embeddings.weights_sha256,
        "n_embedded": int(len(embeddings.vectors)),
        "dim": int(embeddings.vectors.shape[1]),
        "n_reused": embeddings.n_reused,
        "n_computed": embeddings.n_computed,
        "skipped": skipped,
    }
    if args.out:
        from .embed import save_embeddings

        record["output"] = str(save_embeddings(embeddings, Path(args.out), extra={"skipped": skipped}))
    if args.json:
        _print_json(record)
    else:
        print(f"embedded {record['n_embedded']} images with {args.backbone}; skipped {len(skipped)}")
        for item in skipped:
            print(f"  skipped {item['path']}: {item['reason']}")
    return 0 if record["n_embedded"] > 0 else EXIT_ERROR


def cmd_backbones(args) -> int:
    from .backbones import BACKBONES

    for name, spec in BACKBONES.items():
        print(f"{name:<20} {spec.dim:>5}-d  {spec.description}")
    return 0


def cmd_pipeline(args) -> int:
    from .pipeline import run_pipeline

    return run_pipeline(args.params, run_name=args.run_name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fashionrec", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("evaluate", help="query -> gallery retrieval metrics for one backbone and index")
    _add_data_arguments(evaluate)
    _add_backbone_arguments(evaluate)
    evaluate.add_argument("--index", default="Flat", help="FAISS factory string, e.g. Flat, HNSW32, IVF{nlist},PQ{m}")
    evaluate.add_argument("--search-params", default="", help="e.g. nprobe=16 or efSearch=128")
    evaluate.add_argument("--metric", default="cosine", choices=["cosine", "l2", "ip"])
    evaluate.add_argument("--k", type=int, default=10)
    evaluate.set_defaults(handler=cmd_evaluate)

    embed = commands.add_parser("embed", help="embed every image of a dataset and report what was skipped")
    _add_data_arguments(embed)
    _add_backbone_arguments(embed)
    embed.add_argument("--out", default=None, help="directory for <backbone>.npy/.parquet/.json")
    embed.set_defaults(handler=cmd_embed)

    backbones = commands.add_parser("backbones", help="list the backbones")
    backbones.set_defaults(handler=cmd_backbones)

    pipeline = commands.add_parser("pipeline", help="run the numbered notebooks with papermill")
    pipeline.add_argument("--params", default="params/default.yaml")
    pipeline.add_argument("--run-name", default=None)
    pipeline.set_defaults(handler=cmd_pipeline)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except WeightsUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_WEIGHTS_UNAVAILABLE
    except FashionRecError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
