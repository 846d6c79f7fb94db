"""``evaluate``: query -> gallery retrieval metrics for one backbone and index, frozen or fine-tuned, or an index folder as served."""
from __future__ import annotations

from ..data.prepared import prepare
from ..errors import FashionRecError
from ..experiment.colour import colour_sweep, parse_colour_weights
from ..experiment.cost import measure_embedding_cost
from ..experiment.distil import distillation_gains
from ..experiment.evaluate import evaluate_backbone
from ..experiment.finetune import evaluate_finetuned
from ..experiment.search import search_finetuned
from ..experiment.served import evaluate_index_folder
from ..models.ensemble import is_combined_name
from ..models.finetuned import split_backbone_name
from ..models.registry import check_backbone_name, load_user_backbones
from ..pipeline.report import colour_sweep_text, write_colour_sweep
from ..ranking.rank import GALLERY_CATEGORIES, check_colour_weight
from ..training.finetune import FinetuneConfig
from ..training.heads import LOSSES, HeadConfig
from ..training.search import SearchConfig
from ..training.trunk import BackboneTuneConfig
from .commands import SUMMARIES
from .common import (add_backbone_arguments, add_data_arguments, add_store_arguments, data_source, inference_settings,
                     print_json, print_metrics, print_skipped, serving_store, store_settings)


def add_parser(commands) -> None:
    parser = commands.add_parser("evaluate", help=SUMMARIES["evaluate"])
    add_data_arguments(parser, required=False)
    add_backbone_arguments(parser, required=False)
    served = parser.add_argument_group(
        "served", "an index folder measured as it serves: every query photo through Recommender.recommend "
                  "(instead of --dataset and --backbone)")
    served.add_argument("--index-dir", default=None, help="the index folder (built by `python -m fashionrec index`)")
    served.add_argument("--queries", default=None,
                        help="the query photos: a folder with one sub-folder per category, a CSV (path,label[,...]), "
                             "or `split`: the query split of record of a folder built with --split gallery")
    served.add_argument("--category-boost", default=None,
                        help="a bonus for the items of the query's predicted category (a number, or inf: those first; "
                             "default: the model's own); with --index-dir or --finetune (a classifier predicts)")
    served.add_argument("--gallery-categories", default=None, choices=GALLERY_CATEGORIES,
                        help="the items' categories the bonus favours: known (their labels, how a shop serves; the "
                             "default with --index-dir) or predicted (by the classifier, as the protocol of record; "
                             "the default with --finetune)")
    parser.add_argument("--index", default="Flat",
                        help="FAISS factory string, e.g. Flat, HNSW32, IVF{nlist},PQ{m}; with --store milvus: Flat, "
                             "HNSW<M>, HNSW<M>_SQ8, IVF<nlist>,Flat, IVF<nlist>,SQ8 or a Milvus index type, "
                             "e.g. HNSW:M=16")
    parser.add_argument("--search-params", default="", help="e.g. nprobe=16 or efSearch=128 (Milvus: ef=128)")
    parser.add_argument("--metric", default="cosine", choices=["cosine", "l2", "ip"])
    parser.add_argument("--k", type=int, default=10)
    add_store_arguments(parser)
    look = parser.add_argument_group(
        "look", "relevance beyond the category, and colour-aware ranking (docs/look.md)")
    look.add_argument("--relevance", default="label",
                      help="comma-separated catalog columns a result must share with its query to count as relevant, "
                           "e.g. label,colour (attribute columns come from catalog.csv; default: label)")
    look.add_argument("--colour-weight", type=float, default=0.0,
                      help="w in [0, 1]: rank by (1-w) x network cosine + w x product-colour cosine (default 0: "
                           "the network alone); needs --metric cosine")
    look.add_argument("--colour-weights", default=None,
                      help="sweep: comma-separated weights, e.g. 0,0.25,0.5,0.75,1; prints category P@k and "
                           "relevance P@k per weight, and the weight validation (part of the train split) suggests")
    look.add_argument("--run", default=None,
                      help="with --colour-weights: also write results/<run>/colour_sweep.json, "
                           "figures/colour_sweep.png and the sweep's section of results/<run>/report.md")
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
    finetune.add_argument("--time-budget", type=float, default=None,
                          help="level 2: a wall-clock safety net in minutes (default none: training stops by epochs "
                               "and early stopping only, so the same command gives the same model on any machine; "
                               "a run the net stops is reported as such)")
    finetune.add_argument("--trainable-blocks", type=int, default=2, help="level 2: last MBConv blocks trained")
    finetune.add_argument("--head-out", default=None, help="also write the model file here, e.g. results/<run>/head.pt")
    finetune.add_argument("--retrain", action="store_true", help="train again even when a cached model fits")
    finetune.add_argument("--cost-images", type=int, default=32,
                          help="ensembles: embed this many query images with the chosen model and with the first "
                               "member alone, in one run, caches bypassed, and report images/s (0: skip)")
    parser.set_defaults(handler=run)


def _check_look(args, searched: bool) -> None:
    """The look options, checked before any data is read."""
    args.relevance_columns = tuple(column.strip() for column in args.relevance.split(",") if column.strip())
    if not args.relevance_columns:
        raise FashionRecError("--relevance needs at least one column, e.g. label or label,colour")
    args.colour_weight = check_colour_weight(args.colour_weight)
    args.sweep_weights = parse_colour_weights(args.colour_weights) if args.colour_weights is not None else None
    fused = args.colour_weight > 0 or args.sweep_weights is not None
    if fused and args.metric != "cosine":
        raise FashionRecError(f"--colour-weight adds cosine similarities; use --metric cosine, not {args.metric}")
    if fused and searched:
        raise FashionRecError("--colour-weight/--colour-weights with --finetune on a combination is not supported; "
                              "name a single backbone (or evaluate the served model with `recommend`)")
    if args.sweep_weights is not None and args.finetune:
        raise FashionRecError("--colour-weights sweeps the frozen backbone; leave out --finetune (or evaluate one "
                              "weight with --finetune --colour-weight w)")
    if args.run is not None and args.sweep_weights is None:
        raise FashionRecError("--run writes the colour sweep into a run's report: give --colour-weights too")


def run(args) -> int:
    if args.index_dir is not None or args.queries is not None:
        return _run_served(args)
    catalog_options = data_source(args)
    if args.dataset is None or args.backbone is None:
        raise FashionRecError("evaluate needs --dataset (or --catalog) and --backbone (or --index-dir and --queries "
                              "for an index folder as served)")
    load_user_backbones(args.backbone_module, getattr(args, "backbone", None))
    check_backbone_name(args.backbone)
    searched = args.finetune and is_combined_name(split_backbone_name(args.backbone)[0])
    if searched and args.finetune_level != 1:
        raise FashionRecError(f"--finetune on {args.backbone!r} searches its members, views and heads on validation "
                              "(level 1); level 2 fine-tunes one backbone: name a single backbone for it")
    _check_look(args, searched)
    if (args.category_boost is not None or args.gallery_categories is not None) and not args.finetune:
        raise FashionRecError("--category-boost ranks with a classifier's predicted category: give --finetune "
                              "(or --index-dir with a fine-tuned folder)")
    store = store_settings(args, args.metric, args.index, args.search_params)
    prepared = prepare(args.dataset, args.data_dir, split_seed=args.split_seed, max_per_class=args.max_per_class,
                       category_map=args.category_map, progress=not args.quiet, **catalog_options)
    prepared.check_k(args.k)
    prepared.check_relevance(args.relevance_columns)
    settings = inference_settings(args)
    if searched:
        return _run_searched(args, prepared, settings, store)
    if args.finetune:
        return _run_finetuned(args, prepared, settings, store)
    if args.sweep_weights is not None:
        return _run_sweep(args, prepared, settings, store)
    record, embeddings = evaluate_backbone(prepared, args.backbone, index=args.index, k=args.k, metric=args.metric,
                                           search_params=args.search_params, settings=settings, store=store,
                                           relevance=args.relevance_columns, colour_weight=args.colour_weight)
    record["timing"] = {"embedded": embeddings.n_computed, "reused_from_cache": embeddings.n_reused,
                        "embed_seconds": round(embeddings.seconds, 3)}
    if args.relevance_columns == ("label",) and not args.colour_weight:
        distilled = distillation_gains(args.backbone, embeddings, args.k, args.index, args.metric, args.search_params,
                                       args.split_seed, store)
        if distilled is not None:
            record["distillation"] = distilled
    if args.json:
        print_json(record)
    else:
        print(f"{record['dataset']} | {record['backbone']} | {record['store']} {record['index']} "
              f"({record['metric']}) | "
              f"k={record['k']} | split seed {record['split_seed']} | "
              f"{record['n_queries']} queries -> {record['n_gallery']} gallery")
        print_metrics(record)
        for name, gain in record.get("distillation", {}).get("precision_at_k_gains", {}).items():
            print(f"  {name.replace('_', ' ')} ({gain['reference']}): {gain['diff']:+.4f} "
                  f"(95% CI {gain['low']:+.4f} to {gain['high']:+.4f})")
        print_skipped(record["skipped"])
    return 0


def _run_sweep(args, prepared, settings, store) -> int:
    sweep = colour_sweep(prepared, args.backbone, args.sweep_weights, k=args.k, index=args.index,
                         search_params=args.search_params, relevance=args.relevance_columns, settings=settings,
                         store=store)
    record = sweep.to_record()
    if args.run is not None:
        record["report"] = str(write_colour_sweep(args.run, record))
    if args.json:
        print_json(record)
        return 0
    protocol = record["protocol"]
    print(f"{protocol['dataset']} | {protocol['backbone']} + product colour | {protocol['index']} (cosine) | "
          f"k={protocol['k']} | split seed {protocol['split_seed']} | {protocol['n_queries']} queries -> "
          f"{protocol['n_gallery']} gallery | relevance {','.join(protocol['relevance'])}")
    print(colour_sweep_text(record))
    if "report" in record:
        print(f"  report: {record['report']}")
    return 0


def _finetune_config(args, seed: int) -> FinetuneConfig:
    head = HeadConfig(k=args.k, seed=seed, **({"epochs": args.epochs} if args.epochs and args.finetune_level == 1 else {}))
    tune = BackboneTuneConfig(seed=seed, time_budget_s=args.time_budget * 60 if args.time_budget else None,
                              trainable_blocks=args.trainable_blocks,
                              **({"epochs": args.epochs} if args.epochs and args.finetune_level == 2 else {}))
    return FinetuneConfig(level=args.finetune_level, head=head, tune=tune,
                          losses=LOSSES if args.loss == "auto" else (args.loss,))


def _run_finetuned(args, prepared, settings, store) -> int:
    result = evaluate_finetuned(prepared, args.backbone, _finetune_config(args, args.split_seed), index=args.index,
                                k=args.k, metric=args.metric, search_params=args.search_params, settings=settings,
                                model_path=args.head_out, retrain=args.retrain, store=store,
                                relevance=args.relevance_columns, colour_weight=args.colour_weight,
                                category_boost=_category_boost(args), gallery_categories=args.gallery_categories or
                                "predicted")
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
    _print_cost(record)
    return 0


def _run_searched(args, prepared, settings, store) -> int:
    head = HeadConfig(k=args.k, seed=args.split_seed, **({"epochs": args.epochs} if args.epochs else {}))
    cfg = SearchConfig(head=head, losses=LOSSES if args.loss == "auto" else (args.loss,))
    result = search_finetuned(prepared, args.backbone, cfg, index=args.index, k=args.k, metric=args.metric,
                              search_params=args.search_params, settings=settings, model_path=args.head_out,
                              retrain=args.retrain, store=store)
    record = result.record
    record["timing"] = {"train_seconds": record["train_seconds"]}
    if args.cost_images > 0:
        first = result.baseline_backbone.name
        table = measure_embedding_cost(prepared, {"chosen": result.serving_backbones, first: result.baseline_backbone},
                                       dims={"chosen": record["finetune"]["dim"]}, n_images=args.cost_images,
                                       settings=settings)
        record["cost"] = {"measured": {**table.attrs, "how": "seconds per image summed over the networks serving one "
                                                             "image runs (decode + preprocess + forward), one process, "
                                                             "caches bypassed"},
                          "models": table.to_dict(orient="records")}
    if args.json:
        print_json(record)
        return 0
    tuned, chosen = record["finetune"], record["finetune"]["chosen"]
    head_text = "no head (frozen features)" if chosen["head"] is None else \
        f"head {chosen['head']['loss']}, hidden {chosen['head']['hidden_dim']}"
    print(f"{record['dataset']} | {record['backbone']}: searched {tuned['candidates_compared']} candidates on the "
          f"select slice ({tuned['slices']['select']} train images) | {record['index']} ({record['metric']}) | "
          f"k={record['k']} | split seed {record['split_seed']} | {record['n_queries']} queries -> "
          f"{record['n_gallery']} gallery")
    print(f"  chosen: {chosen['features']}, {head_text}, category boost {chosen['ranking']['boost']} (predicted "
          f"categories), classifier on {chosen['classifier']['features']} (C={chosen['classifier']['C']})")
    print_metrics(record)
    print_skipped(record["skipped"])
    for name, gain in record["precision_at_k_gains"].items():
        print(f"  gain {name.replace('_', ' ')}: {gain['diff']:+.4f} "
              f"(95% CI {gain['low']:+.4f} to {gain['high']:+.4f})")
    low, high = record["category_accuracy_ci"]
    print(f"  category accuracy {record['category_accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}), "
          f"macro F1 {record['macro_f1']:.4f}")
    print(f"  model: {tuned['model_file']}  (backbone name {tuned['finetuned_backbone']})")
    _print_cost(record)
    return 0


def _print_cost(record: dict) -> None:
    if "cost" in record:
        measured = record["cost"]["measured"]
        costs = ", ".join(f"{row['model']} {row['images_per_second']:.1f} images/s ({row['dim']}-d, "
                          f"{row['bytes_per_vector']} B/vector)" for row in record["cost"]["models"])
        print(f"  cost ({measured['n_images']} query images, runtime {measured['runtime']}, load "
              f"{measured['load_average_1min'][0]}): {costs}")


def _run_served(args) -> int:
    if args.index_dir is None or args.queries is None:
        raise FashionRecError("--index-dir and --queries go together: the folder, and the photos to query it with")
    for option in ("dataset", "backbone"):
        if getattr(args, option) is not None:
            raise FashionRecError(f"--{option} with --index-dir: the folder says what it was built from; leave it out")
    if args.finetune or args.colour_weights is not None:
        raise FashionRecError("--finetune and --colour-weights evaluate a backbone, not an index folder")
    args.relevance_columns = tuple(column.strip() for column in args.relevance.split(",") if column.strip())
    record = evaluate_index_folder(args.index_dir, args.queries, k=args.k, relevance=args.relevance_columns,
                                   category_boost=_category_boost(args), gallery_categories=args.gallery_categories,
                                   colour_weight=check_colour_weight(args.colour_weight),
                                   settings=inference_settings(args), store=_folder_store(args),
                                   seed=args.split_seed)
    if args.json:
        print_json(record)
    else:
        print(f"{record['index_dir']} ({record['version']}) | {record['backbone']} | {record['store']} "
              f"{record['index']} | k={record['k']} | {record['n_queries']} query photos -> "
              f"{record['n_gallery']} items | {record['n_own_copies_excluded']} own copies excluded")
        print_metrics(record)
        print_skipped(record["skipped"])
    return 0


def _category_boost(args) -> float | None:
    if args.category_boost is None:
        return None
    try:
        return float(args.category_boost)
    except ValueError:
        raise FashionRecError(f"--category-boost must be a number or inf, got {args.category_boost!r}") from None


def _folder_store(args):
    """--store as the folder's: faiss, evaluate's default, means "where the folder was built" unless a URI is given."""
    return None if args.store == "faiss" and args.milvus_uri is None else serving_store(args)
