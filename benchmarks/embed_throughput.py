"""Embedding throughput: the pipeline against the machine's limit, and a tutorial's eager loop, same images, same run.

    python benchmarks/embed_throughput.py --n 512 [--dataset clothing] [--data-dir DIR]
        [--backbone efficientnet_lite0] [--no-int8] [--no-ray [--ray-address ADDR]] [--check-precision] [--json]

Timed on the same ``--n`` images (a seeded sample of the query + gallery split), each:

network   the runtime alone on pre-decoded tensors: batches of ``--batch-size`` at the pipeline's
          intra-op threads (the tensors are the torchvision transform's, so its vectors are also
          the reference the pipeline's are compared with).
decode    the decode + preprocess stage alone, one image after another on one thread: what one
          core gives (fashionrec.features.batches.decode, the pipeline's own function).
pipeline  fashionrec.features.embed.embed_catalog from file to embedding (file digests and cache
          shard writes included, into a fresh cache directory): each batch decoded by the decoding
          threads, then run by the runtime, taking turns on every core.
int8      the same pipeline on the onnx-int8 runtime (calibrated on 64 train photos; other vectors).
ray       the same embed_catalog on the Ray Data engine (``--engine ray``): a private local Ray with
          one worker process (actor) per CPU, one thread each, or the cluster at ``--ray-address``.
          Ray is started before timing (its start-up is reported apart); each timed part is one
          Ray job, so it includes starting the job's actors and loading the model in each.
naive     what a tutorial does: eager PyTorch, batches of 32, ``Image.open(p).convert("RGB")`` and
          the transform in the main process, torch's default threads.

The limit. With ``c`` cores, a network running on ``t`` intra-op threads at ``N`` images/s
holds ``t`` cores for ``1/N`` s per image, and decoding costs ``1/D`` core-seconds per image
(``D``: decode images/s on one core). However the two are scheduled, ``c`` cores give at most
``c / (t/N + 1/D)`` images/s, and never more than the network alone, ``N``:

    limit_img_per_s = min(N, c / (t/N + 1/D))   =  1 / (1/N + 1/(c*D))  when t = c

(each image costs the network's time on the whole machine plus its share of decoding spread over
every core). ``fraction_of_limit`` is the pipeline's images/s over that, both measured in this run.

Every contender runs on the same images cut into ``--rounds`` parts, timed in alternating order
(A B C, then C B A, ...) after a warm-up on other images (model load, ONNX export, session
creation and first calls excluded), so that a change in the machine's load hits each about
equally; the 1-minute load average before and after is recorded. P@10 (query -> gallery within
those images) is computed from every set of vectors. ``--check-precision`` also runs the full
query -> gallery evaluation of the dataset for eager, the fast runtime with and without draft
decoding, and int8, and reports each P@10.
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
from fashionrec import config
from fashionrec.data.catalog import load_dataset
from fashionrec.data.split import split_catalog
from fashionrec.evaluation.protocol import evaluate_embeddings
from fashionrec.features.batches import decode, embed_batch, exact_preprocessing
from fashionrec.features.embed import decoding_threads, embed_catalog
from fashionrec.features.ray_engine import ray_session
from fashionrec.models.registry import get_backbone
from fashionrec.models.runtime import calibration_sample, with_runtime
from fashionrec.settings import RUNTIMES, InferenceSettings, available_threads
from PIL import Image


def naive_embed(paths, backbone, batch_size: int = 32) -> np.ndarray:
    """The tutorial loop: decode, transform and infer in one process, eager, no tuning."""
    out = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([backbone.transform(Image.open(p).convert("RGB")) for p in paths[start:start + batch_size]])
            out.append(backbone.model(batch).numpy())
    return np.concatenate(out)


def pipeline_embed(rows, backbone, settings: InferenceSettings) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="embed-bench-") as cache:
        result = embed_catalog(rows, backbone, settings, cache_dir=Path(cache))
    return result.vectors


def network_embed(tensors: list[torch.Tensor], backbone, batch_size: int) -> np.ndarray:
    """The runtime alone: pre-decoded tensors in batches of ``batch_size``, nothing else."""
    return np.concatenate([embed_batch(backbone, torch.stack(tensors[start:start + batch_size]),
                                       [""] * len(tensors[start:start + batch_size]))
                           for start in range(0, len(tensors), batch_size)])


def decode_alone(paths, transform, spec) -> np.ndarray:
    """The pipeline's decode + preprocess stage, one image after another on this thread."""
    for path in paths:
        decode(path, transform, spec)
    return np.zeros((len(paths), 0), np.float32)


def precision_at_10(vectors: np.ndarray, rows) -> float:
    """Query -> gallery P@10 within ``rows`` (exact cosine), via the workbench's evaluation."""
    return float(evaluate_embeddings(vectors, rows, k=10).summary["precision_at_k"])


def limit_rate(network: float, decode_per_core: float, cores: int, threads: int) -> float:
    """What ``cores`` cores allow when each image needs ``threads/network`` core-seconds of network
    and ``1/decode_per_core`` of decoding, and the network itself runs at ``network`` images/s."""
    return min(network, cores / (threads / network + 1.0 / decode_per_core))


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
    if not args.no_int8 and args.runtime != "onnx-int8":
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
    parser.add_argument("--warmup", type=int, default=64, help="images run through every path before timing")
    parser.add_argument("--runtime", default="onnx", choices=RUNTIMES, help="runtime of the pipeline path")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding threads of the pipeline (default: one per CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of the pipeline's runtime (default: one per CPU)")
    parser.add_argument("--no-draft", action="store_true", help="pipeline decodes JPEGs in full")
    parser.add_argument("--no-int8", action="store_true", help="leave out onnx-int8 (calibrated on train images)")
    parser.add_argument("--no-ray", action="store_true", help="leave out the Ray Data engine")
    parser.add_argument("--no-naive", action="store_true", help="leave out the tutorial's eager loop")
    parser.add_argument("--ray-address", default=None,
                        help="Ray: a running cluster ('auto', host:6379); default: a private local Ray")
    parser.add_argument("--check-precision", action="store_true",
                        help="also run the full query -> gallery P@10 for eager and the fast runtime(s)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="parts the images are cut into, timed in alternating order (ABBA) against load drift")
    parser.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    cores = available_threads()
    threads = args.threads or cores
    settings = InferenceSettings(batch_size=args.batch_size, workers=args.workers, threads=threads, progress=False)
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
    if args.runtime == "onnx-int8" or not args.no_int8:
        calibration = calibration_sample(catalog.loc[catalog["split"] == "train", "path"].tolist(), seed=args.seed)
    fast = with_runtime(eager, args.runtime, threads=threads, calibration_paths=calibration,
                        draft=False if args.no_draft else None, progress=not args.json)
    spec = exact_preprocessing(fast.transform)

    # Warm-up: first calls, lazy session creation, compiled kernels, page cache for the warm-up files.
    if not args.no_naive:
        naive_embed(warm["path"].tolist(), eager)
    pipeline_embed(warm, fast, settings)
    # The files of the timed set are read once before timing, so no path pays cold I/O; the
    # network's inputs are the torchvision transform's tensors (the reference of the vectors).
    tensors, reasons = {}, []
    for path in paths:
        Path(path).read_bytes()
        tensor, reason = decode(path, fast.transform)
        tensors[path] = tensor
        reasons.append(reason)
    if any(reasons):
        raise SystemExit(f"some timed images do not decode: {[r for r in reasons if r][:3]}")

    contenders = {
        "network": lambda part: network_embed([tensors[p] for p in part["path"]], fast, args.batch_size),
        "decode": lambda part: decode_alone(part["path"].tolist(), fast.transform, spec),
        "pipeline": lambda part: pipeline_embed(part, fast, settings),
    }
    if not args.no_naive:
        contenders["naive"] = lambda part: naive_embed(part["path"].tolist(), eager)
    if not args.no_int8 and args.runtime != "onnx-int8":
        int8 = with_runtime(eager, "onnx-int8", threads=threads, calibration_paths=calibration, progress=not args.json)
        pipeline_embed(warm, int8, settings)
        contenders["int8"] = lambda part: pipeline_embed(part, int8, settings)
    with contextlib.ExitStack() as stack:
        ray_start_s = None
        if not args.no_ray:
            started = time.perf_counter()
            stack.enter_context(ray_session(args.ray_address, num_cpus=cores))
            ray_start_s = time.perf_counter() - started
            ray_settings = settings.but(workers=0, threads=1, engine="ray", ray_address=args.ray_address)
            ray_embed = functools.partial(pipeline_embed, backbone=fast, settings=ray_settings)
            ray_embed(warm)
            contenders["ray"] = ray_embed
        vectors, seconds = interleaved(rows, contenders, args.rounds)
    reference, pipeline_vectors = vectors["network"], vectors["pipeline"]

    n = len(paths)
    rate = {name: n / value for name, value in seconds.items()}
    limit = limit_rate(rate["network"], rate["decode"], cores, threads)
    record = {
        "dataset": args.dataset,
        "backbone": args.backbone,
        "n": n,
        "runtime": args.runtime,
        "cpus": cores,
        "threads": threads,
        "workers": decoding_threads(settings),
        "schedule": "each batch decoded by the decoding threads, then run on the runtime's threads, in turn",
        "batch_size": args.batch_size,
        "draft": not args.no_draft and args.runtime != "eager",
        "draft_size": getattr(fast.transform, "draft_size", None),
        "draft_reduced_fraction": round(draft_reduction(paths, getattr(fast.transform, "draft_size", None)), 4),
        "exact_fast_preprocessing": spec is not None,
        "rounds": args.rounds,
        "network_img_per_s": round(rate["network"], 2),
        "decode_img_per_s_per_core": round(rate["decode"], 2),
        "limit_img_per_s": round(limit, 2),
        "limit_formula": "min(N, c / (t/N + 1/D)); N network_img_per_s at t threads, D decode_img_per_s_per_core, "
                         "c cpus",
        "pipeline_img_per_s": round(rate["pipeline"], 2),
        "fraction_of_limit": round(rate["pipeline"] / limit, 3),
        # The pipeline against the same network on the torchvision transform's tensors.
        "max_abs_difference_vs_transform": float(np.abs(pipeline_vectors - reference).max()),
        "p_at_10_pipeline": round(precision_at_10(pipeline_vectors, rows), 6),
        "p_at_10_transform": round(precision_at_10(reference, rows), 6),
    }
    if "naive" in seconds:
        record["naive_img_per_s"] = round(rate["naive"], 2)
        record["naive_torch_threads"] = torch.get_num_threads()
        record["ratio"] = round(rate["pipeline"] / rate["naive"], 2)
        record["max_relative_difference"] = float(np.abs(pipeline_vectors - vectors["naive"]).max()
                                                  / np.abs(vectors["naive"]).max())
        record["p_at_10_naive"] = round(precision_at_10(vectors["naive"], rows), 6)
    if "int8" in seconds:
        record["int8_img_per_s"] = round(rate["int8"], 2)
        record["p_at_10_int8"] = round(precision_at_10(vectors["int8"], rows), 6)
        record["int8_calibration_images"] = len(calibration)
    if "ray" in seconds:
        record["ray_workers"] = cores if args.ray_address is None else None
        record["ray_img_per_s"] = round(rate["ray"], 2)
        record["ray_vs_pipeline"] = round(rate["ray"] / rate["pipeline"], 2)
        record["ray_fraction_of_limit"] = round(rate["ray"] / limit, 3)
        record["ray_start_s"] = round(ray_start_s, 1)
        record["ray_max_relative_difference"] = float(np.abs(vectors["ray"] - pipeline_vectors).max()
                                                      / np.abs(pipeline_vectors).max())
        record["p_at_10_ray"] = round(precision_at_10(vectors["ray"], rows), 6)
    record["seconds_per_million_images"] = {name: round(1e6 / value) for name, value in rate.items()
                                            if name != "decode"}
    record["load_average_before"] = load_before
    record["load_average_after"] = [round(value, 2) for value in os.getloadavg()]
    if args.check_precision:
        record["full_p_at_10"] = full_precision(catalog, args, threads, calibration)

    if args.json:
        json.dump(record, sys.stdout)
        sys.stdout.write("\n")
    else:
        print_table(record, args)
    return 0


def print_table(record: dict, args) -> None:
    print(f"{record['dataset']} | {record['backbone']} | {record['n']} images | {record['cpus']} CPUs | "
          f"batch {record['batch_size']} | {record['threads']} runtime threads, {record['workers']} decoding threads")
    print(f"{'stage':<44} {'img/s':>8} {'of limit':>9} {'P@10':>8}")
    rows = [("network alone (pre-decoded tensors)", "network_img_per_s", None),
            ("decode + preprocess alone, per core", "decode_img_per_s_per_core", None),
            ("limit of the two on every core", "limit_img_per_s", None),
            (f"pipeline ({record['runtime']})", "pipeline_img_per_s", "p_at_10_pipeline"),
            ("pipeline (onnx-int8)", "int8_img_per_s", "p_at_10_int8"),
            (f"ray ({record.get('ray_workers')} worker processes x 1 thread)", "ray_img_per_s", "p_at_10_ray"),
            ("naive (eager, main process)", "naive_img_per_s", "p_at_10_naive")]
    for label, key, precision in rows:
        if key not in record:
            continue
        # The limit is the fp32 network's: int8 is another network, with a limit of its own.
        fraction = (f"{record[key] / record['limit_img_per_s']:9.2f}"
                    if key not in ("decode_img_per_s_per_core", "int8_img_per_s") else f"{'':>9}")
        p_at_10 = f"{record[precision]:8.4f}" if precision else f"{'':>8}"
        print(f"{label:<44} {record[key]:8.1f} {fraction} {p_at_10}")
    print(f"limit = {record['limit_formula']}")
    print(f"max |pipeline - transform's tensors through the network| = {record['max_abs_difference_vs_transform']:.2e}")
    hours = record["seconds_per_million_images"]["pipeline"] / 3600
    print(f"a million photos: {hours:.1f} h on this machine at the pipeline's rate")
    if "ray_img_per_s" in record:
        print(f"ray: {record['ray_vs_pipeline']:.2f} x the in-process pipeline; Ray started in "
              f"{record['ray_start_s']:.1f} s (not timed); max |ray - pipeline| / max |pipeline| = "
              f"{record['ray_max_relative_difference']:.2e}")
    print(f"machine load (1, 5, 15 min averages) before: {record['load_average_before']}, "
          f"after: {record['load_average_after']}")
    if args.check_precision:
        full = record["full_p_at_10"]
        print(f"full protocol ({full['n_queries']} queries -> {full['n_gallery']} gallery), P@10:")
        for label, value in full.items():
            if not label.startswith("n_"):
                print(f"  {label:<20} {value:.4f}")


if __name__ == "__main__":
    sys.exit(main())
