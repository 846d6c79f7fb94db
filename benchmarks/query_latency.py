"""Single-query latency of a served index: photo file -> decode -> preprocess -> embed -> search.

    python benchmarks/query_latency.py --index-dir OUTDIR [--queries DIR] [--n 200] [--k 10]
        [--concurrency N] [--threads T] [--spinning auto|on|off] [--reference] [--json]

One ``fashionrec.Recommender`` is loaded from the index folder, as the app and the command line
load it; every query then goes through ``Recommender.recommend(path)``: the file is read and
decoded, preprocessed and embedded afresh (no embedding is ever taken from the index or a
cache), and searched. Photos: a seeded sample of ``--n`` (200) of the index's own catalog
photos, or every image in ``--queries DIR``. The first ``--warmup`` queries (model and thread
pools warming up) are not counted. Prints p50/p95/p99 per stage and in total, the
preprocessing share of the embed stage, the machine and its load average before and after;
``--json`` prints one JSON object ``{"n", "p50_ms", "p95_ms", "p99_ms", "stages": {...}, ...}``.

``--concurrency N`` then runs the same photos from N threads sharing that one Recommender
(each photo once) and adds queries per second and the latency each client saw.

``--reference`` also times the path the workbench had before the serving layer, on the same
photos, alternating with the served path photo by photo: ``load_image``, the backbone's
torchvision transform (PIL resize and crop, ``ToTensor``, ``Normalize``) and the batch ONNX
model (threads not spinning), then the same index search.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from fashionrec import config
from fashionrec.data.catalog import IMAGE_SUFFIXES
from fashionrec.data.images import load_image
from fashionrec.errors import FashionRecError, ImageError
from fashionrec.models.registry import get_backbone
from fashionrec.models.runtime import with_runtime
from fashionrec.serving.recommender import Recommender
from fashionrec.settings import InferenceSettings, available_threads

STAGES = ("decode", "preprocess", "embed", "search", "total")
PERCENTILES = (50, 95, 99)


def query_photos(recommender: Recommender, queries_dir: str | None, n: int, seed: int) -> list[str]:
    """Every image under ``queries_dir``, or a seeded sample of ``n`` catalog photos."""
    if queries_dir:
        root = Path(queries_dir)
        if not root.is_dir():
            raise FashionRecError(f"--queries {root}: not a folder")
        photos = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not photos:
            raise FashionRecError(f"--queries {root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return photos
    paths = recommender.catalog["path"].tolist()
    chosen = np.random.default_rng(seed).choice(len(paths), size=min(n, len(paths)), replace=False)
    return [paths[i] for i in chosen]


def run_queries(recommender: Recommender, photos: list[str], k: int) -> tuple[list[dict], list[dict]]:
    """(timings of each answered query, skipped files with reasons), in order."""
    timings, skipped = [], []
    for path in photos:
        try:
            timings.append(recommender.recommend(path, k=k).timing_ms)
        except ImageError as error:
            skipped.append({"path": path, "reason": error.reason})
    return timings, skipped


def reference_path(recommender: Recommender, threads: int | None):
    """A function timing one query through the pre-serving path (see the module docstring)."""
    described = recommender.info["backbone"]
    model = with_runtime(get_backbone(described["name"], weights_file=described["weights_file"]),
                         recommender.info["runtime"], threads=threads)
    draft_size = getattr(model.transform, "draft_size", None)

    def query(path: str, k: int) -> dict:
        started = time.perf_counter()
        image = load_image(path, draft_size=draft_size)
        decoded = time.perf_counter()
        batch = model.transform(image)[None]
        prepared = time.perf_counter()
        with torch.inference_mode():
            vector = model.model(batch).float().numpy()
        embedded = time.perf_counter()
        recommender.search_vector(vector, k=k)
        done = time.perf_counter()
        return {stage: (end - start) * 1000.0 for stage, start, end in (
            ("decode", started, decoded), ("preprocess", decoded, prepared), ("embed", prepared, embedded),
            ("search", embedded, done), ("total", started, done))}

    return query


def run_alternating(recommender: Recommender, reference, photos: list[str], k: int):
    """Both paths on every photo, taking turns to go first: (served timings, reference timings, skipped)."""
    served, before, skipped = [], [], []
    for position, path in enumerate(photos):
        try:
            if position % 2:
                before.append(reference(path, k))
                served.append(recommender.recommend(path, k=k).timing_ms)
            else:
                served.append(recommender.recommend(path, k=k).timing_ms)
                before.append(reference(path, k))
        except ImageError as error:
            skipped.append({"path": path, "reason": error.reason})
    return served, before, skipped


def summarise(timings: list[dict]) -> dict:
    stages = {}
    for stage in [*STAGES, *sorted({s for t in timings for s in t} - set(STAGES))]:
        values = np.array([t.get(stage, 0.0) for t in timings])
        stages[stage] = {f"p{q}": round(float(np.percentile(values, q)), 3) for q in PERCENTILES}
        stages[stage]["mean"] = round(float(values.mean()), 3)
    return stages


def concurrent(recommender: Recommender, photos: list[str], k: int, clients: int) -> dict:
    """Each photo answered once by one of ``clients`` threads sharing ``recommender``."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    next_photo = iter(range(len(photos)))

    def client():
        while True:
            with lock:
                position = next(next_photo, None)
            if position is None:
                return
            try:
                started = time.perf_counter()
                recommender.recommend(photos[position], k=k)
                elapsed = (time.perf_counter() - started) * 1000.0
                with lock:
                    latencies.append(elapsed)
            except ImageError as error:
                with lock:
                    errors.append(error.reason)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    values = np.array(latencies)
    return {"clients": clients, "n": int(len(values)), "seconds": round(seconds, 3),
            "queries_per_s": round(len(values) / seconds, 2),
            **{f"p{q}_ms": round(float(np.percentile(values, q)), 3) for q in PERCENTILES}}


def machine() -> dict:
    flags = ""
    model = platform.processor()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                      if line.startswith("model name")), model)
        flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    return {"cpu": model, "cpus_usable": available_threads(), "avx512f": " avx512f" in flags,
            "avx2": " avx2" in flags, "python": platform.python_version()}


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-dir", required=True, help="an index folder (python -m fashionrec index ... --out)")
    parser.add_argument("--queries", default=None, metavar="DIR", help="photos to query (default: catalog sample)")
    parser.add_argument("--n", type=int, default=200, help="catalog photos in the seeded sample (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="uncounted queries first (default 10)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=config.DEFAULT_SEED)
    parser.add_argument("--threads", type=int, default=None, help="threads of the query model (default: all CPUs)")
    parser.add_argument("--spinning", default="auto", choices=["auto", "on", "off"],
                        help="query model threads spin between operators: auto (the Recommender's default) decides "
                             "from the load average, on (cores nobody else needs), off (shared machines)")
    parser.add_argument("--concurrency", type=int, default=0, metavar="N",
                        help="also run the photos from N threads sharing one Recommender: queries per second")
    parser.add_argument("--reference", action="store_true",
                        help="also time the pre-serving path (torchvision transform + batch ONNX model), alternating")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        recommender = Recommender.load(args.index_dir, InferenceSettings(threads=args.threads, progress=False),
                                       spinning={"auto": None, "on": True, "off": False}[args.spinning])
        photos = query_photos(recommender, args.queries, args.n, args.seed)
    except FashionRecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    load_before = load_average()
    run_queries(recommender, photos[:args.warmup], args.k)
    reference_stages = None
    if args.reference:
        torch.set_num_threads(1)   # the reference's torch only runs the transform of one image
        reference = reference_path(recommender, args.threads)
        for path in photos[:args.warmup]:
            reference(path, args.k)
        timings, before, skipped = run_alternating(recommender, reference, photos, args.k)
        reference_stages = summarise(before)
    else:
        timings, skipped = run_queries(recommender, photos, args.k)
    if not timings:
        print("error: none of the photos could be used", file=sys.stderr)
        return 2
    stages = summarise(timings)
    record = {
        "n": len(timings),
        **{f"p{q}_ms": stages["total"][f"p{q}"] for q in PERCENTILES},
        "stages": stages,
        "preprocess_share_of_embed_p50": round(stages["preprocess"]["p50"] / stages["embed"]["p50"], 3),
        "k": args.k,
        "queries": args.queries or f"seeded sample (seed {args.seed}) of the index's catalog photos",
        "skipped": skipped,
        "warmup": args.warmup,
        "threads": args.threads or available_threads(),
        "spinning": recommender.spinning,
        "spinning_choice": args.spinning,
        "index": {key: value for key, value in recommender.describe().items() if key != "categories"},
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    if reference_stages is not None:
        record["reference"] = {"path": "load_image + torchvision transform + batch ONNX model (not spinning) + search",
                               "stages": reference_stages,
                               "preprocess_share_of_embed_p50": round(reference_stages["preprocess"]["p50"]
                                                                      / reference_stages["embed"]["p50"], 3)}
    if args.concurrency:
        record["concurrency"] = concurrent(recommender, photos, args.k, args.concurrency)
        record["load_average_after"] = load_average()
    if args.json:
        json.dump(record, sys.stdout)
        sys.stdout.write("\n")
        return 0
    index = record["index"]
    print(f"{index['dataset']} | {index['backbone']} ({index['runtime']}) | {index['index']} {index['search_params']} "
          f"| {index['n_items']} items | k={args.k} | {record['n']} queries ({record['queries']}) | "
          f"{record['threads']} threads, spinning {'on' if record['spinning'] else 'off'} ({args.spinning})")
    print(f"{record['machine']['cpu']} ({record['machine']['cpus_usable']} CPUs usable, AVX-512 "
          f"{'yes' if record['machine']['avx512f'] else 'no'}); load average before {load_before}, "
          f"after {record['load_average_after']}")
    print(f"{'stage':<11} " + " ".join(f"{f'p{q} ms':>9}" for q in PERCENTILES) + f" {'mean ms':>9}")
    for stage, row in stages.items():
        print(f"{stage:<11} " + " ".join(f"{row[f'p{q}']:9.2f}" for q in PERCENTILES) + f" {row['mean']:9.2f}")
    print(f"preprocess / embed at p50: {record['preprocess_share_of_embed_p50']:.2f}")
    if reference_stages is not None:
        print("reference path (before serving), same photos, alternating:")
        for stage, row in reference_stages.items():
            print(f"{stage:<11} " + " ".join(f"{row[f'p{q}']:9.2f}" for q in PERCENTILES) + f" {row['mean']:9.2f}")
        print(f"preprocess / embed at p50: {record['reference']['preprocess_share_of_embed_p50']:.2f}")
    if skipped:
        print(f"skipped {len(skipped)} files (first: {skipped[0]['path']}: {skipped[0]['reason']})")
    if args.concurrency:
        c = record["concurrency"]
        print(f"{c['clients']} concurrent clients: {c['queries_per_s']:.1f} queries/s over {c['n']} queries; latency "
              f"p50 {c['p50_ms']:.1f} ms, p95 {c['p95_ms']:.1f} ms, p99 {c['p99_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
