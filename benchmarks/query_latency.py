"""Single-query latency: file -> decode -> preprocess -> embed -> search, with a warm model.

    python benchmarks/query_latency.py --dataset clothing --data-dir DIR \\
        --backbone efficientnet_lite0 [--runtime onnx,eager] [--queries 200] [--json]

The gallery split is embedded first (through the embedding cache) and indexed (exact cosine,
FAISS Flat); then each query image of the query split goes through the single-query path
one at a time, batch size 1, in the main process, as a service answering one request would.
The first ``--warmup`` queries are not counted. Prints p50/p95/p99 per stage and in total,
one block per runtime; ``--json`` prints one JSON object instead.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fashionrec import config  # noqa: E402
from fashionrec.data.catalog import load_dataset  # noqa: E402
from fashionrec.data.images import load_image  # noqa: E402
from fashionrec.data.split import split_catalog  # noqa: E402
from fashionrec.features.embed import embed_catalog  # noqa: E402
from fashionrec.indexing.faiss_index import build_index, search  # noqa: E402
from fashionrec.models.registry import get_backbone  # noqa: E402
from fashionrec.models.runtime import available_threads, calibration_sample, runtime_of, with_runtime  # noqa: E402
from fashionrec.settings import RUNTIMES, InferenceSettings  # noqa: E402

STAGES = ("decode", "preprocess", "embed", "search", "total")
PERCENTILES = (50, 95, 99)


def cosine_index(vectors: np.ndarray):
    """The gallery index: the workbench's Flat cosine index."""
    index = build_index(vectors, factory="Flat", metric="cosine")
    return lambda query, k: search(index, query, k, metric="cosine")


def measure(backbone, search, paths: list[str], k: int, warmup: int) -> dict[str, np.ndarray]:
    draft_size = getattr(backbone.transform, "draft_size", None)
    times = {stage: [] for stage in STAGES}
    with torch.inference_mode():
        for position, path in enumerate(paths):
            t0 = time.perf_counter()
            image = load_image(path, draft_size=draft_size)
            t1 = time.perf_counter()
            batch = backbone.transform(image)[None]
            t2 = time.perf_counter()
            query = backbone.model(batch).float().numpy()
            t3 = time.perf_counter()
            search(query, k)
            t4 = time.perf_counter()
            if position >= warmup:
                for stage, seconds in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                    times[stage].append(seconds * 1000)
    return {stage: np.array(values) for stage, values in times.items()}


def summarise(times: dict[str, np.ndarray]) -> dict:
    return {stage: {f"p{q}": round(float(np.percentile(values, q)), 2) for q in PERCENTILES}
            | {"mean": round(float(values.mean()), 2)} for stage, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="clothing")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--runtime", default="onnx", help=f"comma-separated, from {', '.join(RUNTIMES)}")
    parser.add_argument("--queries", type=int, default=200, help="timed queries (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all CPUs)")
    parser.add_argument("--workers", type=int, default=2, help="decoding workers for embedding the gallery")
    parser.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    runtimes = [name.strip() for name in args.runtime.split(",") if name.strip()]
    for name in runtimes:
        if name not in RUNTIMES:
            parser.error(f"unknown runtime {name!r}")

    threads = args.threads or available_threads()
    catalog, _ = split_catalog(load_dataset(args.dataset, args.data_dir, progress=False).catalog, seed=args.seed)
    gallery = catalog[catalog["split"] == "gallery"].reset_index(drop=True)
    queries = catalog[catalog["split"] == "query"]
    paths = queries["path"].sample(n=min(len(queries), args.queries + args.warmup),
                                   random_state=args.seed).tolist()
    train_paths = catalog.loc[catalog["split"] == "train", "path"].tolist()

    eager = get_backbone(args.backbone)
    results = {}
    for name in runtimes:
        calibration = calibration_sample(train_paths, seed=args.seed) if name == "onnx-int8" else None
        backbone = with_runtime(eager, name, threads=threads, calibration_paths=calibration, progress=not args.json)
        embedded = embed_catalog(gallery, backbone, InferenceSettings(workers=args.workers, threads=threads,
                                                                     progress=not args.json))
        search = cosine_index(embedded.vectors)
        # Threads set deliberately: with an ONNX model, torch only runs the preprocessing of one
        # image, where a second OpenMP thread costs more in synchronisation than it saves
        # (badly so on a busy machine); the eager model needs torch's threads for itself.
        torch.set_num_threads(threads if runtime_of(backbone) == "eager" else 1)
        results[name] = summarise(measure(backbone, search, paths, args.k, args.warmup))

    record = {"dataset": args.dataset, "backbone": args.backbone, "threads": threads, "k": args.k,
              "n_gallery": int(len(gallery)), "n_queries": len(paths) - args.warmup, "warmup": args.warmup,
              "cpus": available_threads(), "latency_ms": results}
    if args.json:
        json.dump(record, sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(f"{args.dataset} | {args.backbone} | {record['n_queries']} queries -> {record['n_gallery']} gallery "
          f"(Flat, cosine, k={args.k}) | {threads} threads | milliseconds")
    print(f"{'runtime':<10} {'stage':<11} " + " ".join(f"{f'p{q}':>8}" for q in PERCENTILES) + f" {'mean':>8}")
    for name, stages in results.items():
        for stage in STAGES:
            row = stages[stage]
            print(f"{name:<10} {stage:<11} " + " ".join(f"{row[f'p{q}']:8.2f}" for q in PERCENTILES)
                  + f" {row['mean']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
