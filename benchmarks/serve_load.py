"""Load on the HTTP service: concurrent clients uploading real photos, against the in-process batch embedding.

    python -m fashionrec serve --index-dir OUTDIR &            # the service under test
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --index-dir OUTDIR [--images DIR] \\
        [--concurrency 1,4,16,64] [--duration 30] [--k 10] [--reference-n 256] \\
        [--writes 100 --write-level 16 --outside-update] [--json]

At each concurrency level, that many clients (asyncio + httpx, one connection each) post
``POST /recommend`` for ``--duration`` seconds, each request a fresh multipart upload of a
photo file read from disk (photos in a seeded order: every image under ``--images``, default
the index's own catalog photos). Per level: requests, errors (any answer but 200, and
failed connections), queries per second, p50/p95/p99 latency as the client saw it, and the
mean batch the service embedded (from its ``/metrics``, before and after the level), and the
server's resident memory after the level (``process_resident_memory_bytes``). An answer without
``index_version`` counts as an error.

``--writes N`` (token in ``$FASHIONREC_API_TOKEN``): during the level at ``--write-level``
clients, a writer adds N photos (``POST /items``, ids ``load-add-<i>``) and removes N catalog
items (``DELETE /items/{id}``), one at a time, alternating; with ``--outside-update``, half-way
through, another process runs ``python -m fashionrec index --update OUTDIR --remove <id>``. After
the level, the folder's live ids (loaded afresh) are compared with what a rebuild of the final
catalog holds: the first ids in their order, less every removed one, then the added ones in the
order they were added (``writes`` in the JSON: counts, errors, seconds, ``final_catalog_equals_rebuild``).

``reference_img_per_s`` is the in-process batch embedding throughput of the served model on
the same photos, through ``embed_throughput.py``'s pipeline (``embed_catalog``: decoding
workers, the index's runtime, a fresh cache), measured in the same run before and after the
levels (both are reported; the reference is their mean). ``in_process_p50_ms`` is
``query_latency.py``'s single-query path (``Recommender.recommend`` on a file, one at a time)
on the same photos, also in this run. ``--json`` prints one object: ``{"levels": [{"concurrency",
"requests", "errors", "qps", "p50_ms", "p95_ms", "p99_ms", "mean_batch", "x_reference"}, ...],
"reference_img_per_s", "in_process_p50_ms", "machine", "load_average", ...}``. The load average
is read before and after every part: on a shared machine, compare ratios within one run.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

# Run as a script, this folder is first on sys.path: the sibling benchmarks import by name.
from embed_throughput import pipeline_embed
from fashionrec.models.registry import get_backbone
from fashionrec.models.runtime import with_runtime
from fashionrec.serving.recommender import Recommender
from fashionrec.settings import InferenceSettings, available_threads
from query_latency import load_average, machine, query_photos, run_queries, summarise


async def one_level(url: str, photos: list[str], concurrency: int, duration: float, k: int) -> dict:
    """``concurrency`` clients posting photos for ``duration`` seconds; latencies and errors as they saw them."""
    order = itertools.cycle(range(len(photos)))
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + duration

    async def client():
        async with httpx.AsyncClient(base_url=url, timeout=60.0) as session:
            while time.perf_counter() < deadline:
                path = photos[next(order)]
                data = Path(path).read_bytes()
                started = time.perf_counter()
                try:
                    answer = await session.post("/recommend", files={"image": (Path(path).name, data, "image/jpeg")},
                                                data={"k": str(k)})
                    if answer.status_code != 200 or not answer.json().get("index_version"):
                        errors.append(f"{answer.status_code} {answer.text[:200]}")
                        continue
                except httpx.HTTPError as error:
                    errors.append(f"{type(error).__name__}: {error}")
                    continue
                latencies.append((time.perf_counter() - started) * 1000.0)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    values = np.array(latencies) if latencies else np.array([float("nan")])
    return {"concurrency": concurrency, "requests": len(latencies) + len(errors), "errors": len(errors),
            "qps": round(len(latencies) / elapsed, 2),
            **{f"p{q}_ms": round(float(np.percentile(values, q)), 2) for q in (50, 95, 99)},
            "error_examples": errors[:3]}


def server_metrics(url: str) -> dict[str, float]:
    """The service's Prometheus samples without labels (name -> value)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in text.splitlines()
                                                   if line and not line.startswith("#") and "{" not in line)}


def batch_counts(url: str) -> tuple[float, float]:
    """(photos embedded, batches) so far, from the service's Prometheus metrics."""
    values = server_metrics(url)
    return values.get("fashionrec_batch_size_sum", 0.0), values.get("fashionrec_batch_size_count", 0.0)


def server_rss_mb(url: str) -> float | None:
    rss = server_metrics(url).get("process_resident_memory_bytes")
    return None if rss is None else round(rss / 2**20, 1)


async def catalog_writes(url: str, token: str, index_dir: str, additions: list[tuple[str, str]], removals: list[str],
                         outside_removal: str | None) -> dict:
    """Adds ``additions`` (photo, label) and removes ``removals`` one request at a time, alternating; half-way,
    another process removes ``outside_removal`` with ``index --update``. Returns what happened."""
    headers = {"Authorization": f"Bearer {token}"}
    added, removed, errors = [], [], []
    steps = [step for pair in itertools.zip_longest(
        [("add", f"load-add-{i}", path, label) for i, (path, label) in enumerate(additions)],
        [("remove", item_id, None, None) for item_id in removals]) for step in pair if step is not None]
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300.0, headers=headers) as session:
        for position, (kind, item_id, path, label) in enumerate(steps):
            if outside_removal is not None and position == len(steps) // 2:
                command = [sys.executable, "-m", "fashionrec", "index", "--update", index_dir, "--remove",
                           outside_removal, "--quiet"]
                finished = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True)
                if finished.returncode == 0:
                    removed.append(outside_removal)
                else:
                    errors.append(f"index --update: {finished.stderr.strip()[-200:]}")
            if kind == "add":
                answer = await session.post("/items", files={"photos": (Path(path).name, Path(path).read_bytes(),
                                                                         "image/jpeg")},
                                            data={"labels": label, "ids": item_id})
            else:
                answer = await session.delete(f"/items/{item_id}")
            if answer.status_code == 200:
                (added if kind == "add" else removed).append(item_id)
            else:
                errors.append(f"{kind} {item_id}: {answer.status_code} {answer.text[:200]}")
    return {"adds": len(added), "removes": len(removed), "errors": len(errors), "error_examples": errors[:3],
            "seconds": round(time.perf_counter() - started, 1), "added": added, "removed": removed}


def reference_throughput(recommender: Recommender, photos: list[str], batch_size: int, workers: int | None) -> float:
    """Images per second of ``embed_throughput.py``'s pipeline, with the served model, on ``photos``."""
    described = recommender.info["backbone"]
    backbone = with_runtime(get_backbone(described["name"], weights_file=described["weights_file"]),
                            recommender.info["runtime"], threads=available_threads())
    rows = pd.DataFrame({"id": [str(i) for i in range(len(photos))], "path": photos, "label": "query"})
    settings = InferenceSettings(batch_size=batch_size, workers=workers, threads=available_threads(), progress=False)
    pipeline_embed(rows.iloc[: min(32, len(rows))], backbone, settings)  # warm-up
    started = time.perf_counter()
    vectors = pipeline_embed(rows, backbone, settings)
    return len(vectors) / (time.perf_counter() - started)


def final_catalog_matches(index_dir: str, initial_ids: list[str], writes: dict) -> bool:
    """Whether the folder's live ids, in order, are a rebuild's: the initial ids less the removed, then the added."""
    removed = set(writes["removed"])
    expected = [item_id for item_id in initial_ids if item_id not in removed] + writes["added"]
    return Recommender.load(index_dir, InferenceSettings(progress=False)).ids == expected


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--index-dir", required=True, help="the index folder the service serves (for the reference)")
    parser.add_argument("--images", default=None, help="query photos (default: a sample of the catalog's)")
    parser.add_argument("--n", type=int, default=512, help="photos sampled from the catalog without --images")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per level (default 30)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--reference-n", type=int, default=256, help="photos of each reference measurement")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the reference pipeline")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding threads of the reference pipeline (default: one per CPU, as "
                             "embed_throughput.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--writes", type=int, default=0,
                        help="photos to add and items to remove through the API during one level (token: "
                             "$FASHIONREC_API_TOKEN)")
    parser.add_argument("--write-level", type=int, default=16, help="the concurrency level the writes run in")
    parser.add_argument("--outside-update", action="store_true",
                        help="with --writes: one `index --update --remove` from another process half-way through")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    levels = [int(value) for value in args.concurrency.split(",")]
    url = args.url.rstrip("/")
    health = httpx.get(url + "/health", timeout=30).json()

    recommender = Recommender.load(args.index_dir, InferenceSettings(progress=False))
    photos = query_photos(recommender, args.images, args.n, args.seed)
    reference_photos = photos[: args.reference_n]
    loads = {"start": load_average()}
    reference_before = reference_throughput(recommender, reference_photos, args.batch_size, args.workers)
    timings, _ = run_queries(recommender, photos[: min(len(photos), 200)], args.k)
    in_process = summarise(timings[10:] or timings)["total"]
    loads["after_reference"] = load_average()

    token = os.environ.get("FASHIONREC_API_TOKEN")
    if args.writes and not token:
        parser.error("--writes needs the service's token in $FASHIONREC_API_TOKEN")
    initial_ids = Recommender.load(args.index_dir, InferenceSettings(progress=False)).ids if args.writes else []
    labels = dict(zip(recommender.catalog["path"], recommender.catalog["label"]))
    results, writes = [], None
    for concurrency in levels:
        before = batch_counts(url)
        if args.writes and concurrency == args.write_level:
            additions = [(path, labels[path]) for path in photos[: args.writes]]
            removals = initial_ids[-args.writes:]
            outside = initial_ids[0] if args.outside_update else None

            async def level_with_writes():
                return await asyncio.gather(one_level(url, photos, concurrency, args.duration, args.k),
                                            catalog_writes(url, token, args.index_dir, additions, removals, outside))

            level, writes = asyncio.run(level_with_writes())
            writes["final_catalog_equals_rebuild"] = final_catalog_matches(args.index_dir, initial_ids, writes)
        else:
            level = asyncio.run(one_level(url, photos, concurrency, args.duration, args.k))
        after = batch_counts(url)
        batches = after[1] - before[1]
        level["mean_batch"] = round((after[0] - before[0]) / batches, 2) if batches else None
        level["server_rss_mb"] = server_rss_mb(url)
        level["load_average_after"] = load_average()
        results.append(level)
        print(f"concurrency {concurrency}: {level['requests']} requests, {level['errors']} errors, "
              f"{level['qps']} q/s, p50 {level['p50_ms']} ms, p99 {level['p99_ms']} ms, mean batch "
              f"{level['mean_batch']}", file=sys.stderr, flush=True)
    reference_after = reference_throughput(recommender, reference_photos, args.batch_size, args.workers)
    loads["end"] = load_average()
    reference = (reference_before + reference_after) / 2
    for level in results:
        level["x_reference"] = round(level["qps"] / reference, 3)
    record = {"url": url, "index_version": health.get("index_version"), "items": health.get("items"),
              "index": recommender.describe()["index"], "backbone": recommender.describe()["backbone"],
              "runtime": recommender.info["runtime"], "photos": len(photos), "k": args.k, "duration_s": args.duration,
              "levels": results, "reference_img_per_s": round(reference, 2),
              "reference_runs_img_per_s": [round(reference_before, 2), round(reference_after, 2)],
              "in_process_p50_ms": in_process["p50"], "in_process_p95_ms": in_process["p95"],
              "machine": machine(), "load_average": loads,
              **({"writes": {key: value for key, value in writes.items() if key not in ("added", "removed")}}
                 if writes else {})}
    if args.json:
        json.dump(record, sys.stdout)
        print()
    else:
        print(f"reference (in-process batch embedding): {reference:.1f} img/s (runs: {reference_before:.1f}, "
              f"{reference_after:.1f}); in-process single query p50 {in_process['p50']:.1f} ms")
        print("| concurrency | requests | errors | q/s | x reference | p50 ms | p95 ms | p99 ms | mean batch | "
              "server RSS MB |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for level in results:
            print(f"| {level['concurrency']} | {level['requests']} | {level['errors']} | {level['qps']} | "
                  f"{level['x_reference']} | {level['p50_ms']} | {level['p95_ms']} | {level['p99_ms']} | "
                  f"{level['mean_batch']} | {level['server_rss_mb']} |")
        print(f"machine: {record['machine']}; load average: {loads}")
        if writes:
            print(f"writes: {record['writes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
