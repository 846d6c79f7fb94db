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
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of the inference runtime (default: torch's choice / all CPUs for ONNX)")
    parser.add_argument("--runtime", default="onnx", choices=["eager", "onnx", "onnx-int8"],
                        help="inference runtime: onnx (default; equals eager within 1e-4), eager (reference "
                             "PyTorch), onnx-int8 (quantised, changes embeddings; only when asked)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _print_metrics(record: dict) -> None:
    for name in ("precision_at_k", "hit_rate_at_k", "recall_at_k", "map_at_k", "hit_rate_at_1"):
        low, high = record[f"{name}_ci"]
        print(f"  {name:<15} {record[name]:.4f}  (95% CI {low:.4f}-{high:.4f})")


def _print_json(record: dict) -> None:
    json.dump(record, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")


def cmd_evaluate(args) -> int:
    from .workflow import evaluate_backbone, prepare

    prepared = prepare(args.dataset, args.data_dir, split_seed=args.split_seed, max_per_class=args.max_per_class,
                       category_map=args.category_map, progress=not args.quiet)
    if args.finetune:
        return _evaluate_finetuned(args, prepared)
    record, embeddings = evaluate_backbone(
        prepared, args.backbone, index=args.index, k=args.k, metric=args.metric, search_params=args.search_params,
        weights_file=args.weights_file, batch_size=args.batch_size, num_workers=args.workers,
        threads=args.threads, progress=not args.quiet, runtime=args.runtime,
    )
    record["timing"] = {"embedded": embeddings.n_computed, "reused_from_cache": embeddings.n_reused,
                        "embed_seconds": round(embeddings.seconds, 3)}
    if args.json:
        _print_json(record)
    else:
        print(f"{record['dataset']} | {record['backbone']} | {record['index']} ({record['metric']}) | "
              f"k={record['k']} | split seed {record['split_seed']} | "
              f"{record['n_queries']} queries -> {record['n_gallery']} gallery")
        _print_metrics(record)
    return 0


def _evaluate_finetuned(args, prepared) -> int:
    from .finetune import LOSSES, BackboneTuneConfig, HeadConfig
    from .workflow import evaluate_finetuned

    head_config = HeadConfig(k=args.k, seed=args.split_seed,
                             **({"epochs": args.epochs} if args.epochs and args.finetune_level == 1 else {}))
    tune_config = BackboneTuneConfig(seed=args.split_seed, time_budget_s=args.time_budget * 60,
                                     trainable_blocks=args.trainable_blocks,
                                     **({"epochs": args.epochs} if args.epochs and args.finetune_level == 2 else {}))
    record, result = evaluate_finetuned(
        prepared, args.backbone, level=args.finetune_level, index=args.index, k=args.k, metric=args.metric,
        search_params=args.search_params, weights_file=args.weights_file, head_config=head_config,
        tune_config=tune_config, losses=LOSSES if args.loss == "auto" else (args.loss,), model_path=args.head_out,
        retrain=args.retrain, batch_size=args.batch_size, num_workers=args.workers, threads=args.threads,
        progress=not args.quiet, runtime=args.runtime,
    )
    embeddings = result.extra["embeddings"]
    record["timing"] = {"embedded": embeddings.n_computed, "reused_from_cache": embeddings.n_reused,
                        "embed_seconds": round(embeddings.seconds, 3), "train_seconds": record["train_seconds"]}
    if args.json:
        _print_json(record)
    else:
        tuned = record["finetune"]
        print(f"{record['dataset']} | {record['backbone']} fine-tuned (level {tuned['level']}, {tuned['loss']}) | "
              f"{record['index']} ({record['metric']}) | k={record['k']} | split seed {record['split_seed']} | "
              f"{record['n_queries']} queries -> {record['n_gallery']} gallery")
        _print_metrics(record)
        gain = record["precision_at_k_gain"]
        print(f"  frozen backbone precision_at_k {record['baseline_precision_at_k']:.4f}  "
              f"(gain {gain['diff']:+.4f}, 95% CI {gain['low']:+.4f} to {gain['high']:+.4f})")
        print(f"  category accuracy {record['category_accuracy']:.4f}, macro F1 {record['macro_f1']:.4f}; "
              f"trained in {record['train_seconds']:.1f} s"
              f"{' (reused cached model)' if tuned['reused_cached_model'] else ''}")
        print(f"  model: {tuned['model_file']}  (backbone name {tuned['finetuned_backbone']})")
    return 0


def cmd_embed(args) -> int:
    from .backbones import get_backbone
    from .datasets import load_dataset
    from .embed import embed_catalog

    # The whole catalog, unsplit: categories too small for the split are embedded too.
    loaded = load_dataset(args.dataset, args.data_dir, max_per_class=args.max_per_class, seed=args.split_seed,
                          category_map=args.category_map, progress=not args.quiet)
    from .runtime import calibration_sample, with_runtime

    model = get_backbone(args.backbone, weights_file=args.weights_file)
    # No split here: int8 calibrates on a seeded sample of the whole catalog.
    calibration = calibration_sample(loaded.catalog["path"].tolist(), seed=args.split_seed) \
        if args.runtime == "onnx-int8" else None
    model = with_runtime(model, args.runtime, threads=args.threads, calibration_paths=calibration,
                         progress=not args.quiet)
    embeddings = embed_catalog(loaded.catalog, model, batch_size=args.batch_size, num_workers=args.workers,
                               threads=args.threads, root=loaded.root, progress=not args.quiet)
    skipped = loaded.skipped + embeddings.skipped
    record = {
        "dataset": args.dataset,
        "data_dir": str(loaded.root),
        "backbone": args.backbone,
        "runtime": args.runtime,
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
    finetune = evaluate.add_argument_group(
        "fine-tuning", "--finetune trains on the train split (or reuses the cached model for the same data and "
        "settings) and reports the fine-tuned metrics, with the frozen backbone's as baseline_*")
    finetune.add_argument("--finetune", action="store_true",
                          help="evaluate a model fine-tuned on the catalog's own categories")
    finetune.add_argument("--finetune-level", type=int, default=1, choices=[1, 2],
                          help="1: projection head on frozen embeddings (default, fast); 2: also the last "
                               "backbone block(s), on augmented views (efficientnet_lite* only)")
    finetune.add_argument("--loss", default="auto", choices=["auto", "proxy_anchor", "norm_softmax", "supcon"],
                          help="metric-learning loss; auto compares all on the validation part and keeps the best")
    finetune.add_argument("--epochs", type=int, default=None, help="maximum epochs (level 1: 100, level 2: 30)")
    finetune.add_argument("--time-budget", type=float, default=10.0,
                          help="level 2: minutes of training (after feature caching)")
    finetune.add_argument("--trainable-blocks", type=int, default=2, help="level 2: last MBConv blocks trained")
    finetune.add_argument("--head-out", default=None, help="also write the model file here, e.g. results/<run>/head.pt")
    finetune.add_argument("--retrain", action="store_true", help="train again even when a cached model fits")
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
