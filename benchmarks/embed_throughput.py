"""Embedding throughput: a tutorial's eager loop vs the workbench's own path, same images, same run.

    python benchmarks/embed_throughput.py --dataset clothing --data-dir DIR \\
        --backbone efficientnet_lite0 --n 512 [--int8] [--ray [--ray-address ADDR]] [--check-precision] [--json]

naive     what a tutorial does: eager PyTorch, batches of 32, ``Image.open(p).convert("RGB")``
          and the transform in the main process, torch's default threads.
pipeline  fashionrec.features.embed.embed_catalog from file to embedding (file digests and cache shard
          writes included, into a fresh cache directory): the chosen runtime (ONNX Runtime by
          default), JPEG draft decoding, decoding in worker processes overlapped with inference.

Both are timed on the same ``--n`` images (a seeded sample of the query + gallery split) after a
warm-up on other images (model load, ONNX export/session creation and first calls excluded),
cut into ``--rounds`` parts timed in alternating order (naive, pipeline, pipeline, naive, ...)
so that a change in machine load during the run hits both about equally.
P@10 (query -> gallery within those images) is computed from both sets of vectors.
``--ray`` adds the Ray Data engine (``--engine ray``): the same embed_catalog, same runtime and
cache format, run as a map_batches job with one actor per CPU (one thread each) on a private
local Ray (or the cluster at ``--ray-address``). Ray itself is started once before timing (its
start-up time is reported apart); each timed part is one Ray job, so it includes starting the
job's actors and loading the model in each, as any batch job pays.
``--check-precision`` also runs the full query -> gallery evaluation of the dataset for eager,
the fast runtime with and without draft decoding (and int8 with ``--int8``) and reports each P@10.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fashionrec import config
from fashionrec.data.catalog import load_dataset
from fashionrec.data.split import split_catalog
from fashionrec.evaluation.protocol import evaluate_embeddings
from fashionrec.features.embed import embed_catalog
from fashionrec.features.ray_engine import ray_session
from fashionrec.models.registry import get_backbone
from fashionrec.models.runtime import available_threads, calibration_sample, with_runtime
from fashionrec.settings import RUNTIMES, InferenceSettings


def naive_embed(paths, backbone, batch_size: int = 32) -> np.ndarray:
    """The tutorial loop: decode, transform and infer in one process, eager, no tuning."""
    out = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([backbone.transform(Image.open(p).convert("RGB")) for p in paths[start:start + batch_size]])
            out.append(backbone.model(batch).numpy())
    return np.concatenate(out)


def pipeline_embed(rows, backbone, batch_size: int, workers: int, threads: int, engine: str = "local",
                   ray_address: str | None = None):
    settings = InferenceSettings(batch_size=batch_size, workers=workers, threads=threads, progress=False,
                                 engine=engine, ray_address=ray_address)
    with tempfile.TemporaryDirectory(prefix="embed-bench-") as cache:
        result = embed_catalog(rows, backbone, settings, cache_dir=Path(cache))
    return result.vectors


def precision_at_10(vectors: np.ndarray, rows) -> float:
    """Query -> gallery P@10 within ``rows`` (exact cosine), via the workbench's evaluation."""
    return float(evaluate_embeddings(vectors, rows, k=10).summary["precision_at_k"])


def draft_reduction(paths, draft_size: int | None) -> float:
    """Fraction of the images a JPEG draft decode actually shrinks (read from headers only)."""
    if not draft_size:
        return 0.0
    reduced = 0
    for path in paths:
        with Image.open(path) as image:
            reduced += image.format == "JPEG" and min(image.size) >= 2 * draft_size
    return reduced / len(paths)


def interleaved(rows, contenders: dict, rounds: int) -> tuple[dict, dict]:
    """Time every contender on the same rows, cut into ``rounds`` parts run in alternating order.

    Order A B C, then C B A, ...: on a machine whose load changes during the run, each
    contender sees about the same share of it. Returns (vectors, seconds) per contender.
    """
    parts = [rows.iloc[chunk].reset_index(drop=True) for chunk in np.array_split(np.arange(len(rows)), rounds)]
    names = list(contenders)
    outputs = {name: [] for name in names}
    seconds = dict.fromkeys(names, 0.0)
    for round_number, part in enumerate(parts):
        for name in names if round_number % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            outputs[name].append(contenders[name](part))
            seconds[name] += time.perf_counter() - started
    return {name: np.concatenate(outputs[name]) for name in names}, seconds


def full_precision(catalog, args, threads: int, calibration) -> dict:
    """P@10 of the full query -> gallery protocol for each runtime (the embedding cache is reused).

    Builds each backbone as fashionrec.experiment.evaluate.embed does, plus a variant without draft
    decoding, so the effect of draft mode is reported on its own.
    """
    variants = [("eager", "eager", None), (args.runtime, args.runtime, None),
                (f"{args.runtime}-no-draft", args.runtime, False)]
    if args.int8 and args.runtime != "onnx-int8":
        variants.append(("onnx-int8", "onnx-int8", None))
    rows = catalog[catalog["split"].isin(["gallery", "query"])].reset_index(drop=True)
    eager = get_backbone(args.backbone)
    results = {}
    for label, runtime, draft in variants:
        backbone = with_runtime(eager, runtime, threads=threads, draft=draft, progress=not args.json,
                                calibration_paths=calibration if runtime == "onnx-int8" else None)
        embeddings = embed_catalog(rows, backbone, InferenceSettings(batch_size=args.batch_size, workers=args.workers,
                                                                     threads=threads, progress=not args.json))
        results[label] = round(precision_at_10(embeddings.vectors, embeddings.metadata), 6)
    results["n_queries"] = int((rows["split"] == "query").sum())
    results["n_gallery"] = int((rows["split"] == "gallery").sum())
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="clothing")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--n", type=int, default=512, help="images timed in each path")
    parser.add_argument("--warmup", type=int, default=64, help="images run through both paths before timing")
    parser.add_argument("--runtime", default="onnx", choices=RUNTIMES, help="runtime of the pipeline path")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="decoding worker processes of the pipeline")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads of the pipeline's runtime")
    parser.add_argument("--no-draft", action="store_true", help="pipeline decodes JPEGs in full")
    parser.add_argument("--int8", action="store_true", help="also time onnx-int8 (calibrated on train images)")
    parser.add_argument("--ray", action="store_true",
                        help="also time the Ray Data engine (one actor per CPU, one thread each)")
    parser.add_argument("--ray-address", default=None,
                        help="with --ray: a running cluster ('auto', host:6379); default: a private local Ray")
    parser.add_argument("--check-precision", action="store_true",
                        help="also run the full query -> gallery P@10 for eager and the fast runtime(s)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="parts the images are cut into, timed in alternating order (ABBA) against load drift")
    parser.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    threads = args.threads or available_threads()
    load_before = [round(value, 2) for value in os.getloadavg()]
    # What fashionrec.experiment.evaluate.prepare does: load, then the seeded stratified split.
    catalog, _ = split_catalog(load_dataset(args.dataset, args.data_dir, progress=False).catalog, seed=args.seed)
    evaluated = catalog[catalog["split"].isin(["gallery", "query"])]
    rng = np.random.default_rng(args.seed)
    chosen = rng.permutation(len(evaluated))
    rows = evaluated.iloc[np.sort(chosen[:args.n])].reset_index(drop=True)
    warm = evaluated.iloc[chosen[args.n:args.n + args.warmup]].reset_index(drop=True)
    if len(rows) < args.n:
        print(f"warning: only {len(rows)} images available", file=sys.stderr)
    paths = rows["path"].tolist()

    eager = get_backbone(args.backbone)
    calibration = None
    if args.runtime == "onnx-int8" or args.int8:
        calibration = calibration_sample(catalog.loc[catalog["split"] == "train", "path"].tolist(), seed=args.seed)
    fast = with_runtime(eager, args.runtime, threads=threads, calibration_paths=calibration,
                        draft=False if args.no_draft else None, progress=not args.json)

    # Warm-up: first calls, lazy session creation, page cache for the warm-up files.
    naive_embed(warm["path"].tolist(), eager)
    pipeline_embed(warm, fast, args.batch_size, args.workers, threads)
    # The files of the timed set are read once by both paths before timing, so neither pays cold I/O.
    for path in paths:
        Path(path).read_bytes()

    contenders = {
        "naive": lambda part: naive_embed(part["path"].tolist(), eager),
        "pipeline": lambda part: pipeline_embed(part, fast, args.batch_size, args.workers, threads),
    }
    if args.int8 and args.runtime != "onnx-int8":
        int8 = with_runtime(eager, "onnx-int8", threads=threads, calibration_paths=calibration, progress=not args.json)
        pipeline_embed(warm, int8, args.batch_size, args.workers, threads)
        contenders["int8"] = lambda part: pipeline_embed(part, int8, args.batch_size, args.workers, threads)
    with contextlib.ExitStack() as stack:
        ray_start_s = None
        if args.ray:
            started = time.perf_counter()
            stack.enter_context(ray_session(args.ray_address, num_cpus=available_threads()))
            ray_start_s = time.perf_counter() - started
            ray_embed = functools.partial(pipeline_embed, backbone=fast, batch_size=args.batch_size, workers=0,
                                          threads=1, engine="ray", ray_address=args.ray_address)
            ray_embed(warm)
            contenders["ray"] = ray_embed
        vectors, seconds = interleaved(rows, contenders, args.rounds)
    naive_vectors, pipeline_vectors = vectors["naive"], vectors["pipeline"]

    n = len(paths)
    naive_rate, pipeline_rate = n / seconds["naive"], n / seconds["pipeline"]
    relative = float(np.abs(pipeline_vectors - naive_vectors).max() / np.abs(naive_vectors).max())
    record = {
        "dataset": args.dataset,
        "backbone": args.backbone,
        "n": n,
        "runtime": args.runtime,
        "threads": threads,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "draft": not args.no_draft and args.runtime != "eager",
        "draft_size": getattr(fast.transform, "draft_size", None),
        "draft_reduced_fraction": round(draft_reduction(paths, getattr(fast.transform, "draft_size", None)), 4),
        "naive_torch_threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "naive_img_per_s": round(naive_rate, 2),
        "pipeline_img_per_s": round(pipeline_rate, 2),
        "ratio": round(pipeline_rate / naive_rate, 2),
        "max_relative_difference": relative,
        "p_at_10_naive": round(precision_at_10(naive_vectors, rows), 6),
        "p_at_10_pipeline": round(precision_at_10(pipeline_vectors, rows), 6),
        "cpus": available_threads(),
    }
    if "int8" in seconds:
        record["int8_img_per_s"] = round(n / seconds["int8"], 2)
        record["int8_ratio"] = round(n / seconds["int8"] / naive_rate, 2)
        record["p_at_10_int8"] = round(precision_at_10(vectors["int8"], rows), 6)
        record["int8_calibration_images"] = len(calibration)
    if "ray" in seconds:
        record["ray_img_per_s"] = round(n / seconds["ray"], 2)
        record["ray_vs_pipeline"] = round(n / seconds["ray"] / pipeline_rate, 2)
        record["ray_start_s"] = round(ray_start_s, 1)
        record["ray_max_relative_difference"] = float(np.abs(vectors["ray"] - pipeline_vectors).max()
                                                      / np.abs(pipeline_vectors).max())
        record["p_at_10_ray"] = round(precision_at_10(vectors["ray"], rows), 6)
    record["load_average_before"] = load_before
    record["load_average_after"] = [round(value, 2) for value in os.getloadavg()]
    if args.check_precision:
        record["full_p_at_10"] = full_precision(catalog, args, threads, calibration)

    if args.json:
        json.dump(record, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"{args.dataset} | {args.backbone} | {n} images | {record['cpus']} CPUs | batch {args.batch_size}")
        print(f"{'path':<34} {'img/s':>8} {'x naive':>8} {'P@10':>8}")
        print(f"{'naive (eager, main process)':<34} {naive_rate:8.1f} {1:8.2f} {record['p_at_10_naive']:8.4f}")
        label = f"pipeline ({args.runtime}, {threads} thr, {args.workers} wkr)"
        print(f"{label:<34} {pipeline_rate:8.1f} {record['ratio']:8.2f} {record['p_at_10_pipeline']:8.4f}")
        if "int8_img_per_s" in record:
            print(f"{'pipeline (onnx-int8)':<34} {record['int8_img_per_s']:8.1f} {record['int8_ratio']:8.2f} "
                  f"{record['p_at_10_int8']:8.4f}")
        if "ray_img_per_s" in record:
            label = f"ray ({args.runtime}, {record['cpus']} actors x 1 thr)"
            print(f"{label:<34} {record['ray_img_per_s']:8.1f} {record['ray_img_per_s'] / naive_rate:8.2f} "
                  f"{record['p_at_10_ray']:8.4f}")
            print(f"ray: {record['ray_vs_pipeline']:.2f} x the in-process pipeline; Ray started in "
                  f"{record['ray_start_s']:.1f} s (not timed); max |ray - pipeline| / max |pipeline| = "
                  f"{record['ray_max_relative_difference']:.2e}")
        print(f"machine load (1, 5, 15 min averages) before: {record['load_average_before']}, "
              f"after: {record['load_average_after']}")
        print(f"max |pipeline - naive| / max |naive| = {relative:.2e}; draft shrinks "
              f"{record['draft_reduced_fraction']:.0%} of these images (min side >= 2 x {record['draft_size']})")
        if args.check_precision:
            full = record["full_p_at_10"]
            print(f"full protocol ({full['n_queries']} queries -> {full['n_gallery']} gallery), P@10:")
            for label, value in full.items():
                if label.startswith("n_"):
                    continue
                print(f"  {label:<20} {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
