"""``embed``: embed every image of a dataset and report what was skipped."""
from __future__ import annotations

from pathlib import Path

from ..data.catalog import load_dataset
from ..features.embed import embed_catalog
from ..features.files import save_embeddings
from ..models.registry import get_backbone
from ..models.runtime import calibration_sample, with_runtime
from .common import add_backbone_arguments, add_data_arguments, inference_settings, print_json


def add_parser(commands) -> None:
    parser = commands.add_parser("embed", help="embed every image of a dataset and report what was skipped")
    add_data_arguments(parser)
    add_backbone_arguments(parser)
    parser.add_argument("--out", default=None, help="directory for <backbone>.npy/.parquet/.json")
    parser.set_defaults(handler=run)


def run(args) -> int:
    settings = inference_settings(args)
    # The whole catalog, unsplit: categories too small for the split are embedded too.
    loaded = load_dataset(args.dataset, args.data_dir, max_per_class=args.max_per_class, seed=args.split_seed,
                          category_map=args.category_map, progress=settings.progress)
    model = get_backbone(args.backbone, weights_file=settings.weights_file)
    # No split here: int8 calibrates on a seeded sample of the whole catalog.
    calibration = calibration_sample(loaded.catalog["path"].tolist(), seed=args.split_seed) \
        if settings.runtime == "onnx-int8" else None
    model = with_runtime(model, settings.runtime, threads=settings.threads, calibration_paths=calibration,
                         progress=settings.progress)
    embeddings = embed_catalog(loaded.catalog, model, settings, root=loaded.root)
    skipped = loaded.skipped + embeddings.skipped
    record = {
        "dataset": args.dataset,
        "data_dir": str(loaded.root),
        "backbone": args.backbone,
        "runtime": settings.runtime,
        "weights_sha256": embeddings.weights_sha256,
        "n_embedded": int(len(embeddings.vectors)),
        "dim": int(embeddings.vectors.shape[1]),
        "n_reused": embeddings.n_reused,
        "n_computed": embeddings.n_computed,
        "skipped": skipped,
    }
    if args.out:
        record["output"] = str(save_embeddings(embeddings, Path(args.out), extra={"skipped": skipped}))
    if args.json:
        print_json(record)
    else:
        print(f"embedded {record['n_embedded']} images with {args.backbone}; skipped {len(skipped)}")
        for item in skipped:
            print(f"  skipped {item['path']}: {item['reason']}")
    return 0 if record["n_embedded"] > 0 else 2
