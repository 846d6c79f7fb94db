"""``embed``: embed every image of a dataset, write the vectors, and report what was left out."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from .. import config
from ..data.catalog import load_dataset
from ..data.ledger import count_by_stage, describe_counts
from ..errors import FashionRecError
from ..features.embed import embed_catalog
from ..features.files import save_embeddings
from ..models.registry import get_backbone, load_user_backbones
from ..models.runtime import calibration_sample, with_runtime
from ..settings import ENGINES
from .commands import SUMMARIES
from .common import add_backbone_arguments, add_data_arguments, data_source, inference_settings, print_json


def add_parser(commands) -> None:
    parser = commands.add_parser("embed", help=SUMMARIES["embed"])
    add_data_arguments(parser)
    add_backbone_arguments(parser)
    parser.add_argument("--out", default=None,
                        help="directory for <backbone>.npy/.parquet/.json (default: results/embeddings/<dataset>, "
                             "with the data directory's name for folder and catalog datasets)")
    parser.add_argument("--engine", default="local", choices=ENGINES,
                        help="local: this process and its decoding threads (default); ray: a Ray Data job, one "
                             "actor per --threads CPUs, writing the same cache")
    parser.add_argument("--ray-address", default=None,
                        help="with --engine ray: the cluster to run on ('auto' on a node of it, or host:6379 of "
                             "`ray start --head`); default: a private local Ray on 127.0.0.1")
    parser.set_defaults(handler=run)


def default_out_dir(dataset: str, root: Path) -> Path:
    """``results/embeddings/<dataset>`` (``<dataset>-<folder name>`` for user catalogs, which live anywhere)."""
    name = dataset if dataset in ("fashion-mnist", "clothing") else f"{dataset}-{root.resolve().name}"
    return config.RESULTS_DIR / "embeddings" / re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def run(args) -> int:
    catalog_options = data_source(args)
    if args.ray_address is not None and args.engine != "ray":
        raise FashionRecError("--ray-address applies only with --engine ray")
    if args.engine == "ray" and args.runtime == "onnx-int8":
        raise FashionRecError("--engine ray runs --runtime eager or onnx; onnx-int8 is calibrated on this machine's "
                              "images and not rebuilt on Ray workers yet (use --engine local)")
    load_user_backbones(args.backbone_module, getattr(args, "backbone", None))
    settings = inference_settings(args).but(engine=args.engine, ray_address=args.ray_address)
    # The whole catalog, unsplit: categories too small for the split are embedded too.
    loaded = load_dataset(args.dataset, args.data_dir, max_per_class=args.max_per_class, seed=args.split_seed,
                          category_map=args.category_map, progress=settings.progress, **catalog_options)
    model = get_backbone(args.backbone, weights_file=settings.weights_file)
    # No split here: int8 calibrates on a seeded sample of the whole catalog.
    calibration = calibration_sample(loaded.catalog["path"].tolist(), seed=args.split_seed) \
        if settings.runtime == "onnx-int8" else None
    model = with_runtime(model, settings.runtime, threads=settings.threads, calibration_paths=calibration,
                         progress=settings.progress)
    embeddings = embed_catalog(loaded.catalog, model, settings, root=loaded.root)
    skipped = loaded.skipped + embeddings.skipped
    out_dir = Path(args.out) if args.out else default_out_dir(args.dataset, loaded.root)
    record = {
        "dataset": args.dataset,
        "data_dir": str(loaded.root),
        "backbone": args.backbone,
        "runtime": settings.runtime,
        "engine": settings.engine,
        "weights_sha256": embeddings.weights_sha256,
        "n_images": int(len(loaded.catalog)),
        "n_embedded": int(len(embeddings.vectors)),
        "dim": int(embeddings.vectors.shape[1]),
        "n_reused": embeddings.n_reused,
        "n_computed": embeddings.n_computed,
        "n_not_sampled": loaded.n_not_sampled,
        "n_skipped": len(skipped),
        "n_skipped_by_stage": count_by_stage(skipped),
        "skipped": skipped,
    }
    if embeddings.vectors.size:
        record["out_dir"] = str(out_dir)
        record["output"] = str(save_embeddings(embeddings, out_dir, extra={"skipped": skipped}))
        print(f"[embed] wrote {record['output']} (+ .parquet, .json)", file=sys.stderr)
    if args.json:
        print_json(record)
    else:
        print(f"embedded {record['n_embedded']} images with {args.backbone}; {describe_counts(skipped)}")
        for item in skipped:
            print(f"  left out ({item['stage']}) {item['path']}: {item['reason']}")
    return 0 if record["n_embedded"] > 0 else 2
