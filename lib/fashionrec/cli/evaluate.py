"""``evaluate``: query -> gallery retrieval metrics for one backbone and index, frozen or fine-tuned."""
from __future__ import annotations

from ..experiment.evaluate import evaluate_backbone, prepare
from ..experiment.finetune import evaluate_finetuned
from ..training.finetune import FinetuneConfig
from ..training.heads import LOSSES, HeadConfig
from ..training.trunk import BackboneTuneConfig
from .common import (add_backbone_arguments, add_data_arguments, inference_settings, load_user_backbones, print_json,
                     print_metrics, print_skipped)


def add_parser(commands) -> None:
    parser = commands.add_parser("evaluate", help="query -> gallery retrieval metrics for one backbone and index")
    add_data_arguments(parser)
    add_backbone_arguments(parser)
    parser.add_argument("--index", default="Flat", help="FAISS factory string, e.g. Flat, HNSW32, IVF{nlist},PQ{m}")
    parser.add_argument("--search-params", default="", help="e.g. nprobe=16 or efSearch=128")
    parser.add_argument("--metric", default="cosine", choices=["cosine", "l2", "ip"])
    parser.add_argument("--k", type=int, default=10)
    finetune = parser.add_argument_group(
        "fine-tuning", "--finetune trains on the train split (or reuses the cached model for the same data and "
        "settings) and reports the fine-tuned metrics, with the frozen backbone's as baseline_*")
    finetune.add_argument("--finetune", action="store_true",
                          help="evaluate a model fine-tuned on the catalog's own categories")
    finetune.add_argument("--finetune-level", type=int, default=1, choices=[1, 2],
                          help="1: projection head on frozen embeddings (default, fast); 2: also the last "
                               "backbone block(s), on augmented views (efficientnet_lite* only)")
    finetune.add_argument("--loss", default="auto", choices=["auto", *LOSSES],
                          help="metric-learning loss; auto compares all on the validation part and keeps the best")
    finetune.add_argument("--epochs", type=int, default=None, help="maximum epochs (level 1: 100, level 2: 30)")
    finetune.add_argument("--time-budget", type=float, default=10.0,
                          help="level 2: minutes of training (after feature caching)")
    finetune.add_argument("--trainable-blocks", type=int, default=2, help="level 2: last MBConv blocks trained")
    finetune.add_argument("--head-out", default=None, help="also write the model file here, e.g. results/<run>/head.pt")
    finetune.add_argument("--retrain", action="store_true", help="train again even when a cached model fits")
    parser.set_defaults(handler=run)


def run(args) -> int:
    load_user_backbones(args)
    prepared = prepare(args.dataset, args.data_dir, split_seed=args.split_seed, max_per_class=args.max_per_class,
                       category_map=args.category_map, progress=not args.quiet)
    prepared.check_k(args.k)
    settings = inference_settings(args)
    if args.finetune:
        return _run_finetuned(args, prepared, settings)
    record, embeddings = evaluate_backbone(prepared, args.backbone, index=args.index, k=args.k, metric=args.metric,
                                           search_params=args.search_params, settings=settings)
    record["timing"] = {"embedded": embeddings.n_computed, "reused_from_cache": embeddings.n_reused,
                        "embed_seconds": round(embeddings.seconds, 3)}
    if args.json:
        print_json(record)
    else:
        print(f"{record['dataset']} | {record['backbone']} | {record['index']} ({record['metric']}) | "
              f"k={record['k']} | split seed {record['split_seed']} | "
              f"{record['n_queries']} queries -> {record['n_gallery']} gallery")
        print_metrics(record)
        print_skipped(record["skipped"])
    return 0


def _finetune_config(args, seed: int) -> FinetuneConfig:
    head = HeadConfig(k=args.k, seed=seed, **({"epochs": args.epochs} if args.epochs and args.finetune_level == 1 else {}))
    tune = BackboneTuneConfig(seed=seed, time_budget_s=args.time_budget * 60, trainable_blocks=args.trainable_blocks,
                              **({"epochs": args.epochs} if args.epochs and args.finetune_level == 2 else {}))
    return FinetuneConfig(level=args.finetune_level, head=head, tune=tune,
                          losses=LOSSES if args.loss == "auto" else (args.loss,))


def _run_finetuned(args, prepared, settings) -> int:
    result = evaluate_finetuned(prepared, args.backbone, _finetune_config(args, args.split_seed), index=args.index,
                                k=args.k, metric=args.metric, search_params=args.search_params, settings=settings,
                                model_path=args.head_out, retrain=args.retrain)
    record = result.record
    embeddings = result.embeddings
    record["timing"] = {"embedded": embeddings.n_computed, "reused_from_cache": embeddings.n_reused,
                        "embed_seconds": round(embeddings.seconds, 3), "train_seconds": record["train_seconds"]}
    if args.json:
        print_json(record)
        return 0
    tuned = record["finetune"]
    print(f"{record['dataset']} | {record['backbone']} fine-tuned (level {tuned['level']}, {tuned['loss']}) | "
          f"{record['index']} ({record['metric']}) | k={record['k']} | split seed {record['split_seed']} | "
          f"{record['n_queries']} queries -> {record['n_gallery']} gallery")
    print_metrics(record)
    print_skipped(record["skipped"])
    gain = record["precision_at_k_gain"]
    print(f"  frozen backbone precision_at_k {record['baseline_precision_at_k']:.4f}  "
          f"(gain {gain['diff']:+.4f}, 95% CI {gain['low']:+.4f} to {gain['high']:+.4f})")
    print(f"  category accuracy {record['category_accuracy']:.4f}, macro F1 {record['macro_f1']:.4f}; "
          f"trained in {record['train_seconds']:.1f} s{' (reused cached model)' if tuned['reused_cached_model'] else ''}")
    print(f"  model: {tuned['model_file']}  (backbone name {tuned['finetuned_backbone']})")
    return 0
