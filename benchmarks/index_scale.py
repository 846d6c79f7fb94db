"""How the FAISS index variants scale: build time, memory, speed and recall at N vectors.

    python benchmarks/index_scale.py --n 1000000 --embeddings results/RUN/embeddings/efficientnet_lite0.npy
    python benchmarks/index_scale.py --n 20000 --synthetic --json        # smoke test, no pipeline

N vectors are grown from the real embeddings by ``fashionrec.indexing.synthetic.make_vectors`` (its
docstring says how: queries come from a held-out pool of real rows and are never in the index;
noise is shaped by the covariance of the real rows' residuals around their neighbourhoods).
The effective dimension of the real rows and of the grown ones is reported, so that a reader
can see that the grown vectors are neither easier nor harder to compress than the real ones.

Generation is chunked (1M x 1280 float32 is 5 GB). ``--pca-dim`` first projects the real rows
onto their principal components (centred), a lever that makes every index cheaper; the
explained variance is reported. Ground truth is exact search (Flat) over the same vectors.

Each index is built with ``fashionrec.indexing.faiss_index.build_index`` (training on at most 200k vectors),
searched with its default parameters as one batch of queries, and reported with build
seconds, serialised bytes per vector, queries per second and recall@k against Flat; then
the same index is searched at each setting of ``fashionrec.indexing.measure.search_param_grid``
(nprobe, efSearch, re-ranking depth: "operating_points"), and "targets" names the fastest
setting that reaches ``--recall-target`` (with its speed-up over Flat) and the best recall
of an index of at most ``--compact-bytes`` per vector. IVF
variants without a transform share one coarse k-means (same seed, sample and nlist, so the
same centroids they would train alone, for IVF_HNSW a better one); its time is added to each
one's build_s so rows stay comparable (``--no-share-coarse`` trains each alone). Finally
``choose_index`` picks an index for this N under ``--memory-budget`` and ``--recall-target``;
that choice is built, measured at every search setting and tuned with
``fashionrec.indexing.measure.tune_search_params`` to the fastest setting that meets the target ("auto_choice").

Progress goes to stderr; stdout gets a table, or with ``--json`` one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

# Read by OpenMP when faiss loads. Spinning workers on a shared two-core machine steal the
# CPU their sibling needs to reach the next barrier: PQ training ran 6x slower with them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

try:
    import fashionrec  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

import faiss  # noqa: E402

from fashionrec import config  # noqa: E402
from fashionrec.indexing.choose import choose_index  # noqa: E402
from fashionrec.indexing.faiss_index import (SCALE_FACTORIES, SPINE_FACTORIES, build_index,  # noqa: E402
                                             resolve_factory, search, train_coarse_centroids)
from fashionrec.indexing.measure import benchmark_index, tune_search_params  # noqa: E402
from fashionrec.indexing.synthetic import (NEIGHBOURS, NOISE_MODELS, QUERY_POOL_FRACTION,  # noqa: E402
                                  compressibility, effective_dimension, make_vectors)

FIDELITY_SAMPLE_ROWS = 20_000


def log(message: str) -> None:
    print(f"[index_scale] {message}", file=sys.stderr, flush=True)


def parse_bytes(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?i?B?)\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 512MB, 3e9)")
    number, unit = float(match.group(1)), match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return number * base ** ("KMGT".index(unit[0]) + 1 if unit[:1] in ("K", "M", "G", "T") else 0)


def load_real_embeddings(args) -> tuple[np.ndarray, str]:
    if args.synthetic:
        return synthetic_real_embeddings(args.seed), "synthetic"
    if args.embeddings is None or not Path(args.embeddings).is_file():
        found = sorted(str(p.relative_to(config.PROJECT_ROOT))
                       for p in config.RESULTS_DIR.glob("*/embeddings/*.npy"))
        hint = f" Embeddings found: {', '.join(found)}." if found else ""
        what = "no --embeddings given" if args.embeddings is None else f"{args.embeddings} does not exist"
        sys.exit(f"index_scale: {what}. Run the pipeline first (make pipeline PARAMS=params/clothing.yaml) and pass "
                 f"--embeddings results/<run>/embeddings/<backbone>.npy, or ask for --synthetic.{hint}")
    real = np.load(args.embeddings).astype(np.float32, copy=False)
    if real.ndim != 2 or len(real) < 2 * (NEIGHBOURS + 1) / QUERY_POOL_FRACTION:
        sys.exit(f"index_scale: {args.embeddings} has shape {real.shape}; need a 2-D array with at "
                 f"least {int(2 * (NEIGHBOURS + 1) / QUERY_POOL_FRACTION)} rows")
    return real, str(args.embeddings)


def synthetic_real_embeddings(seed: int, rows: int = 5000, dim: int = 1280, clusters: int = 50,
                              latent_dim: int = 64) -> np.ndarray:
    """Stand-in for real features: clusters in a 64-d latent space, mapped to 1280-d, rectified."""
    rng = np.random.default_rng([seed, 0])
    centres = rng.normal(0, 1, (clusters, latent_dim))
    latent = centres[rng.integers(0, clusters, rows)] + rng.normal(0, 0.5, (rows, latent_dim))
    mixing = rng.normal(0, 1 / np.sqrt(latent_dim), (latent_dim, dim))
    return np.maximum(latent @ mixing + rng.normal(0, 0.1, (rows, dim)), 0).astype(np.float32)


def pca_project(real: np.ndarray, dim: int) -> tuple[np.ndarray, float]:
    centred = real - real.mean(axis=0)
    _, singular, axes = np.linalg.svd(centred, full_matrices=False)
    explained = float((singular[:dim] ** 2).sum() / (singular ** 2).sum())
    return np.ascontiguousarray(centred @ axes[:dim].T, dtype=np.float32), explained


def run(args) -> dict:
    faiss.omp_set_num_threads(args.threads)
    started = time.perf_counter()
    # Timings from a machine busy with other work are slower; the load says how busy it was.
    load_before = os.getloadavg()[0]
    real, source = load_real_embeddings(args)
    original_dim = real.shape[1]
    explained = None
    if args.pca_dim and args.pca_dim < original_dim:
        real, explained = pca_project(real, args.pca_dim)
        log(f"PCA {original_dim} -> {args.pca_dim} dims keeps {explained:.1%} of the variance")
    log(f"synthesising {args.n} base + {args.queries} query vectors of {real.shape[1]} dims "
        f"from {len(real)} real rows ({source})")
    base, queries = make_vectors(real, args.n, args.queries, args.seed, args.noise, args.mix, args.noise_model)
    n, d = base.shape
    fidelity = {"effective_dimension": {"real": effective_dimension(real),
                                        "synthetic_base": effective_dimension(base[:FIDELITY_SAMPLE_ROWS]),
                                        "synthetic_queries": effective_dimension(queries)}}
    log("effective dimension: real rows {real:.1f}, synthetic base {synthetic_base:.1f}, "
        "synthetic queries {synthetic_queries:.1f}".format(**fidelity["effective_dimension"]))
    if args.fidelity:
        fidelity["compressibility"] = compressibility(real, args.fidelity_factory, seed=args.seed, noise=args.noise,
                                                      mix=args.mix, noise_model=args.noise_model)
        log("exhaustive {factory} recall@10 at {n} rows: real {recall_at_10_real:.3f}, "
            "grown {recall_at_10_grown:.3f}".format(**fidelity["compressibility"]))

    log("exact reference (Flat)")
    exact = build_index(base, "Flat", args.metric, args.seed, threads=args.threads)
    _, exact_ids = search(exact, queries, args.k, args.metric, threads=args.threads)
    del exact
    coarse = SharedCoarse(base, args) if args.share_coarse else None
    rows = []
    for template in ["Flat"] + [t for t in args.indexes if t != "Flat"]:
        log(f"{template}: building")
        rows.append(measure(base, queries, template, exact_ids, args, coarse, sweep=args.sweep))
        row = rows[-1]
        log(f"{template}: build {row['build_s']:.1f} s, {row['bytes_per_vector']:.0f} B/vector, "
            f"{row['qps']:.0f} qps, recall@{args.k} {row['recall_at_k']:.3f}")

    auto = auto_choice(base, queries, exact_ids, rows, args, coarse)
    measured = rows + ([auto["measured"]] if "measured" in auto and auto["measured"] not in rows else [])
    return {
        "targets": targets(measured, args),
        "n": n, "d": d, "original_d": original_dim, "pca_dim": args.pca_dim if explained is not None else None,
        "pca_explained_variance": explained, "metric": args.metric, "k": args.k,
        "queries": args.queries, "threads": args.threads, "seed": args.seed,
        "source": source, "real_rows": len(real),
        "generation": {"noise": args.noise, "mix": args.mix, "noise_model": args.noise_model,
                       "neighbours": NEIGHBOURS, "query_pool_fraction": QUERY_POOL_FRACTION,
                       "fidelity": fidelity},
        "faiss_version": faiss.__version__, "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "indexes": rows, "auto_choice": auto,
        "total_s": time.perf_counter() - started,
    }


class SharedCoarse:
    """IVF centroids trained once per nlist and reused by every IVF variant without a transform."""

    def __init__(self, base: np.ndarray, args):
        self.base, self.args, self.trained = base, args, {}

    def for_factory(self, factory: str) -> tuple[np.ndarray | None, float]:
        """(centroids, seconds spent training them), or (None, 0.0) when the factory can't share."""
        match = re.match(r"IVF(\d+)", resolve_factory(factory, *self.base.shape))
        if match is None:
            return None, 0.0
        nlist = int(match.group(1))
        if nlist not in self.trained:
            log(f"shared coarse k-means, {nlist} lists")
            started = time.perf_counter()
            centroids = train_coarse_centroids(self.base, nlist, self.args.metric, self.args.seed,
                                               threads=self.args.threads)
            self.trained[nlist] = centroids, time.perf_counter() - started
        return self.trained[nlist]


def measure(base, queries, factory, exact_ids, args, coarse: SharedCoarse | None,
            params: str = "", name: str | None = None, sweep: bool = False) -> dict:
    centroids, coarse_s = coarse.for_factory(factory) if coarse else (None, 0.0)
    row = benchmark_index(base, queries, factory, args.metric, args.k, params, exact_ids, name=name,
                          seed=args.seed, threads=args.threads, coarse_centroids=centroids, sweep=sweep)
    row["build_s"] += coarse_s
    row["shared_coarse_s"] = coarse_s if centroids is not None else None
    return row


def all_settings(row: dict) -> list[dict]:
    """A measured index at its default setting and at each swept one, as flat points."""
    return [{"name": row["name"], "factory": row["factory"], "bytes_per_vector": row["bytes_per_vector"],
             "params": point["params"], "qps": point["qps"], "recall_at_k": point["recall_at_k"]}
            for point in [row, *row.get("operating_points", [])]]


def targets(rows: list[dict], args) -> dict:
    """The two questions of scale, answered from every measured operating point.

    fastest_at_recall_target: the highest qps with recall@k >= --recall-target, and its
    speed-up over exact Flat; best_recall_within_bytes: the highest recall@k of an index of
    at most --compact-bytes per vector (serialised size: codes, ids, centroids, matrices).
    """
    flat_qps = next(row["qps"] for row in rows if row["factory"] == "Flat")
    points = [point for row in rows for point in all_settings(row)]
    fast = [p for p in points if p["recall_at_k"] >= args.recall_target and p["factory"] != "Flat"]
    compact = [p for p in points if p["bytes_per_vector"] <= args.compact_bytes]
    fastest = max(fast, key=lambda p: p["qps"], default=None)
    smallest = max(compact, key=lambda p: (p["recall_at_k"], p["qps"]), default=None)
    return {
        "flat_qps": flat_qps,
        "recall_target": args.recall_target,
        "fastest_at_recall_target": (None if fastest is None
                                     else {**fastest, "speedup_vs_flat": fastest["qps"] / flat_qps}),
        "compact_bytes": args.compact_bytes,
        "best_recall_within_bytes": smallest,
    }


def auto_choice(base, queries, exact_ids, rows, args, coarse: SharedCoarse | None) -> dict:
    """choose_index's pick for this N, built and tuned: the fastest search setting that meets the target."""
    n, d = base.shape
    try:
        choice = choose_index(n, d, args.memory_budget, args.recall_target)
    except ValueError as error:
        return {"error": str(error), "memory_budget_bytes": args.memory_budget}
    log(f"auto choice: {choice['factory']} {choice['params']} ({choice['rationale']})")
    measured = next((row for row in rows if row["factory"] == choice["factory"] and row.get("operating_points")),
                    None)
    if measured is None:
        measured = measure(base, queries, choice["factory"], exact_ids, args, coarse, params=choice["params"],
                           name="auto", sweep=True)
    tuned = tune_search_params(all_settings(measured), args.recall_target)
    log(f"auto choice tuned: {tuned['params']} {tuned['qps']:.0f} qps, recall@{args.k} {tuned['recall_at_k']:.3f}")
    return {
        **choice,
        "memory_budget_bytes": args.memory_budget,
        "recall_target": args.recall_target,
        "measured": measured,
        "tuned": tuned,
        "fits_budget": measured["bytes_per_vector"] * n <= args.memory_budget,
        "meets_recall_target": tuned["meets_target"],
    }


def print_table(report: dict) -> None:
    k = report["k"]
    load = report["load_average_1min"]
    print(f"n={report['n']} d={report['d']} metric={report['metric']} queries={report['queries']} "
          f"threads={report['threads']} source={report['source']} "
          f"load average {load['start']:.1f} -> {load['end']:.1f}")
    header = f"{'index':38} {'factory':34} {'params':36} {'build s':>8} {'B/vec':>8} {'qps':>9} {f'R@{k}':>6}"
    print(header)
    print("-" * len(header))
    for row in report["indexes"]:
        print(f"{row['name']:38} {row['factory']:34} {row['params']:36} {row['build_s']:8.2f} "
              f"{row['bytes_per_vector']:8.1f} {row['qps']:9.0f} {row['recall_at_k']:6.3f}")
        for point in row.get("operating_points", []):
            print(f"{'':38} {'  sweep':34} {point['params']:36} {'':8} {'':8} {point['qps']:9.0f} "
                  f"{point['recall_at_k']:6.3f}")
    goals = report["targets"]
    fastest, compact = goals["fastest_at_recall_target"], goals["best_recall_within_bytes"]
    print(f"\nfastest at recall@{k} >= {goals['recall_target']}: " + (
        "none" if fastest is None else f"{fastest['factory']} [{fastest['params']}] {fastest['qps']:.0f} qps = "
        f"{fastest['speedup_vs_flat']:.1f}x Flat ({goals['flat_qps']:.0f} qps), recall {fastest['recall_at_k']:.3f}"))
    print(f"best recall@{k} within {goals['compact_bytes']:.0f} B/vector: " + (
        "no index that small" if compact is None else f"{compact['factory']} [{compact['params']}] "
        f"{compact['bytes_per_vector']:.1f} B/vector, recall {compact['recall_at_k']:.3f}, {compact['qps']:.0f} qps"))
    auto = report["auto_choice"]
    if "error" in auto:
        print(f"\nauto choice: {auto['error']}")
        return
    measured, tuned = auto["measured"], auto["tuned"]
    print(f"\nauto choice for budget {auto['memory_budget_bytes'] / 2**30:.2f} GiB, recall target "
          f"{auto['recall_target']}: {auto['factory']} [{auto['params']}]\n  {auto['rationale']}\n"
          f"  estimated {auto['estimated_bytes_per_vector']:.0f} B/vector, measured "
          f"{measured['bytes_per_vector']:.0f} B/vector ({'fits' if auto['fits_budget'] else 'EXCEEDS'} "
          f"the budget), build {measured['build_s']:.1f} s\n"
          f"  tuned on the held-out queries: [{tuned['params']}] recall@{k} {tuned['recall_at_k']:.3f} "
          f"({'meets' if auto['meets_recall_target'] else 'MISSES'} the target), {tuned['qps']:.0f} qps")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, required=True, help="number of indexed vectors")
    parser.add_argument("--embeddings", type=Path, help="real embeddings .npy (rows x dims)")
    parser.add_argument("--synthetic", action="store_true",
                        help="stand-in clustered features instead of real embeddings")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--metric", default="cosine", choices=("cosine", "l2", "ip"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--indexes", nargs="+", default=list(SPINE_FACTORIES + SCALE_FACTORIES),
                        help="factory templates to compare; Flat (the exact reference) is always run")
    parser.add_argument("--pca-dim", type=int, default=None, help="project real rows to this many dims")
    parser.add_argument("--noise", type=float, default=0.5, help="noise, in residual standard deviations")
    parser.add_argument("--noise-model", default="covariance", choices=NOISE_MODELS,
                        help="shape of the noise: residual covariance (default) or per-dimension variance only")
    parser.add_argument("--mix", type=float, default=0.5, help="largest step towards a neighbour")
    parser.add_argument("--memory-budget", type=parse_bytes, default=parse_bytes("2GiB"),
                        help="memory for the auto choice, e.g. 2GiB, 512MB (default 2GiB)")
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--compact-bytes", type=float, default=64,
                        help="size limit, in bytes per vector, for the best-recall-of-a-compact-index summary")
    parser.add_argument("--fidelity", action="store_true",
                        help="also compare the recall of exhaustive --fidelity-factory codes on the real rows "
                             "and on as many grown ones")
    parser.add_argument("--fidelity-factory", default="PQ40", help="codes for --fidelity (default PQ40)")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false",
                        help="measure each index at its default search parameters only")
    parser.add_argument("--no-share-coarse", dest="share_coarse", action="store_false",
                        help="train every IVF variant's coarse k-means separately")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.n < 1 or args.queries < 1 or args.k < 1:
        parser.error("--n, --queries and --k must be positive")

    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
