"""``distil``: one EfficientNet-Lite trained on the train split to reproduce a teacher, scored beside it."""
from __future__ import annotations

import dataclasses

from ..data.prepared import prepare
from ..experiment.distil import STUDENTS, check_models, default_config, distil_student
from ..models.registry import load_user_backbones
from ..settings import DEFAULT_RUNTIME, RUNTIMES
from ..training.distil import RELATIONAL_LOSSES, DistilConfig
from .commands import SUMMARIES
from .common import (add_backbone_module_argument, add_data_arguments, add_store_arguments, inference_settings,
                     print_json, print_skipped, store_settings)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def add_parser(commands) -> None:
    parser = commands.add_parser("distil", help=SUMMARIES["distil"])
    add_data_arguments(parser)
    parser.add_argument("--teacher", required=True,
                        help="any backbone name, a combination or a <name>+head:<file> model file")
    parser.add_argument("--teacher-finetune", action="store_true",
                        help="the teacher is the model `evaluate --backbone TEACHER --finetune` chooses (reused from "
                             "its cache when that has run on this catalog)")
    parser.add_argument("--student", default="efficientnet_lite0", choices=STUDENTS)
    parser.add_argument("--run", default=None,
                        help="also write results/<run>/head.pt and results/<run>/distil.json; the student then loads "
                             "as <student>+head:<run>")
    parser.add_argument("--relational", default="rkd",
                        help=f"comma-separated relational losses compared on validation ({', '.join(RELATIONAL_LOSSES)})")
    parser.add_argument("--relational-weights", default="1,10",
                        help="comma-separated weights of the relational term compared on validation")
    parser.add_argument("--trainable-blocks", default="2",
                        help="comma-separated numbers of last MBConv blocks trained, compared on validation")
    parser.add_argument("--epochs", type=int, default=None, help="maximum epochs of the student (default 30)")
    parser.add_argument("--retrain", action="store_true", help="train again even when a cached student fits")
    parser.add_argument("--index", default="Flat", help="FAISS factory string of the evaluation")
    parser.add_argument("--search-params", default="")
    parser.add_argument("--metric", default="cosine", choices=["cosine", "l2", "ip"])
    parser.add_argument("--k", type=int, default=10)
    add_store_arguments(parser)
    add_backbone_module_argument(parser)
    parser.add_argument("--weights-file", default=None, help="explicit local weights file for the student")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="image decoding worker processes")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads of the inference runtime")
    parser.add_argument("--runtime", default=DEFAULT_RUNTIME, choices=RUNTIMES, help="inference runtime")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run)


def distil_config(args, seed: int) -> DistilConfig:
    cfg = default_config(args.k, seed)
    finetune = cfg.finetune
    if args.epochs:
        finetune = dataclasses.replace(finetune, tune=dataclasses.replace(finetune.tune, epochs=args.epochs))
    return DistilConfig(finetune=finetune, relational=tuple(part.strip() for part in args.relational.split(",")),
                        weights=_floats(args.relational_weights), trainable_blocks=_ints(args.trainable_blocks))


def run(args) -> int:
    load_user_backbones(args.backbone_module, getattr(args, "backbone", None))
    check_models(args.teacher, args.student, args.teacher_finetune)
    cfg = distil_config(args, args.split_seed)
    store = store_settings(args, args.metric, args.index, args.search_params)
    prepared = prepare(args.dataset, args.data_dir, split_seed=args.split_seed, max_per_class=args.max_per_class,
                       category_map=args.category_map, progress=not args.quiet)
    result = distil_student(prepared, args.teacher, args.student, cfg, teacher_finetune=args.teacher_finetune,
                            k=args.k, index=args.index, metric=args.metric, search_params=args.search_params,
                            settings=inference_settings(args), run=args.run, retrain=args.retrain, store=store)
    record = result.record
    if args.json:
        print_json(record)
        return 0
    teacher, head = record["teacher"], record["references"]["head"]
    print(f"{record['dataset']} | student {record['student']} distilled from {teacher['name']} | {record['index']} "
          f"({record['metric']}) | k={record['k']} | split seed {record['split_seed']} | {record['n_queries']} "
          f"queries -> {record['n_gallery']} gallery")
    for name, row in (("student", record), ("teacher", teacher), ("own head", head)):
        low, high = row["precision_at_k_ci"]
        print(f"  {name:<9} P@{record['k']} {row['precision_at_k']:.4f} (95% CI {low:.4f}-{high:.4f}), "
              f"category accuracy {row['category_accuracy']:.4f}")
    for name, gain in record["precision_at_k_gains"].items():
        print(f"  {name.replace('_', ' ')}: {gain['diff']:+.4f} (95% CI {gain['low']:+.4f} to {gain['high']:+.4f})")
    chosen = record["choices"]["chosen"]
    print(f"  chosen on validation: {chosen['relational']} x {chosen['weight']:g}, last {chosen['trainable_blocks']} "
          f"block(s), {record['choices']['level2_epochs']} epochs; trained in {record['train_seconds']:.1f} s"
          f"{' (reused cached student)' if record['reused_cached_model'] else ''}")
    print(f"  model: {record['model_file']}  (backbone name {record['backbone']})")
    print_skipped(record["skipped"])
    return 0
