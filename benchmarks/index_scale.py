"""How the FAISS index variants scale: build time, memory, disk, speed and recall at N vectors.

    python benchmarks/index_scale.py --n 1000000 --json          # the clothing embeddings of a run, or computed
    python benchmarks/index_scale.py --n 1000000 --embeddings results/RUN/embeddings/efficientnet_lite0.npy
    python benchmarks/index_scale.py --n 20000 --synthetic --json  # smoke test, no photos, no pipeline

Real rows: ``--embeddings``; else the clothing ``efficientnet_lite0`` embeddings of an earlier
pipeline run (``results/<run>/embeddings/``, the run's ``prepare.json`` saying clothing, split
seed 0); else they are computed through fashionrec's own embedding path on the clothing photos
(and cached in ``data/interim/embeddings``). With none of these the script stops at once,
naming what is missing.

N vectors are grown from the real rows by ``fashionrec.indexing.synthetic.make_vectors`` (its
docstring says how: queries come from a held-out pool of real rows and are never in the index;
noise is shaped by the covariance of the real rows' residuals around their neighbourhoods).
The grown vectors, their exact neighbours and the shared coarse centroids are cached under
``--cache-dir`` (``data/interim/index_scale``), keyed by the real rows, the generation settings
and the generator's source, so a rerun spends its time on the indexes. The effective dimension
of the real and grown rows is reported.

Exact ``Flat`` is timed at the start and at the end of the run (``flat_qps_passes``); speed-ups
use their median. Each index is built with ``fashionrec.indexing.faiss_index.build_index``
(training on at most 200k vectors), searched with its default parameters as one batch of
queries, and reported with build seconds, bytes per vector in memory (serialised size of what
the process holds: codes, ids, centroids, codebooks, projection) and on disk (the float16
vectors file of an ``,RDisk`` index), queries per second and recall@k against Flat; then at
each setting of ``fashionrec.indexing.measure.search_param_grid`` ("operating_points"). An
``,RDisk`` index is then saved, and a new process loads it, drops its vectors file from the
page cache and searches once at the index's fastest setting that reaches ``--recall-target``
("cold": the first pass after a cold start, bytes read from the block device, resident memory
added by loading), then again, warm. A re-ranking index also reports its codes alone
("codes_only"), which shows what re-ranking adds.
"targets" names the fastest setting that reaches ``--recall-target`` (with its speed-up over
Flat) and the best of an index of at most ``--compact-bytes`` per vector in memory. IVF
variants without a transform share one coarse k-means (same seed, sample and nlist, so the same
centroids they would train alone); its time is added to each one's build_s so rows stay
comparable, also when it came from the cache (``--no-share-coarse`` trains each alone).

"task" (with real clothing rows): the protocol of record through each index, at its default
search settings for a 1,020-image gallery: 1,020 query photos ranking 1,020 gallery photos,
split seed 0, k = 10, the run's metric; P@10 and recall@10 against exact search. Finally
``choose_index`` picks an index for this N under ``--memory-budget`` and ``--recall-target``
("auto_choice"), tuned like the others.

Progress goes to stderr; stdout gets a table, or with ``--json`` one JSON object.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Read by OpenMP when faiss loads. Spinning workers on a shared two-core machine steal the
# CPU their sibling needs to reach the next barrier: PQ training ran 6x slower with them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import faiss  # noqa: E402

import fashionrec  # noqa: E402
from fashionrec import config  # noqa: E402
from fashionrec.errors import FashionRecError  # noqa: E402
from fashionrec.indexing import disk_rerank, synthetic  # noqa: E402
from fashionrec.indexing.choose import choose_index  # noqa: E402
from fashionrec.indexing.faiss_index import (default_search_params, index_bytes_per_vector,  # noqa: E402
                                             load_index, resolve_factory, save_index, search, train_coarse_centroids)
from fashionrec.indexing.measure import benchmark_index, recall_vs_exact, tune_search_params  # noqa: E402
from fashionrec.indexing.synthetic import (NEIGHBOURS, NOISE_MODELS, QUERY_POOL_FRACTION,  # noqa: E402
                                           compressibility, effective_dimension, make_vectors)

FIDELITY_SAMPLE_ROWS = 20_000
BACKBONE = "efficientnet_lite0"
# The new compact index, the same re-ranking from disk behind 8-bit PQ codes of the full vectors
# (what the projection adds), and today's best with the vectors in memory. Each re-ranking index
# also reports its codes alone ("codes_only": IVF4096,PQ64 is the 94-byte compact index of old),
# which shows what re-ranking adds. PCAU: uncentred PCA (see fashionrec.indexing.faiss_index).
DEFAULT_INDEXES = (
    "PCAU256,IVF{nlist},RaBitQ,RDisk",
    "IVF{nlist},PQ32,RDisk",
    "IVF{nlist},PQ64,RFlat",
)


def log(message: str) -> None:
    print(f"[index_scale] {message}", file=sys.stderr, flush=True)


def parse_bytes(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?i?B?)\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 512MB, 3e9)")
    number, unit = float(match.group(1)), match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return number * base ** ("KMGT".index(unit[0]) + 1 if unit[:1] in ("K", "M", "G", "T") else 0)


class RealRows:
    """The real embeddings that seed the grown vectors, with their catalog rows when known."""

    def __init__(self, vectors: np.ndarray, source: str, metadata=None):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.source = source
        self.metadata = metadata  # id, label, split (query / gallery / train) per row, or None


def load_real_rows(args) -> RealRows:
    """--synthetic, --embeddings, a clothing run's embeddings, or embeddings computed now (in that order)."""
    if args.synthetic:
        return RealRows(synthetic_real_embeddings(args.seed), "synthetic")
    if args.embeddings is not None:
        if not args.embeddings.is_file():
            sys.exit(f"index_scale: {args.embeddings} does not exist")
        metadata_path = args.embeddings.with_suffix(".parquet")
        metadata = _read_parquet(metadata_path) if metadata_path.is_file() else None
        return RealRows(_checked(np.load(args.embeddings), args.embeddings), str(args.embeddings), metadata)
    run = clothing_run_embeddings()
    if run is not None:
        return RealRows(_checked(np.load(run), run), str(run), _read_parquet(run.with_suffix(".parquet")))
    return computed_clothing_embeddings()


def clothing_run_embeddings() -> Path | None:
    """The newest results/<run>/embeddings/efficientnet_lite0.npy of a clothing run on the protocol's split."""
    found = []
    for prepared in config.RESULTS_DIR.glob("*/prepare.json"):
        run = prepared.parent
        npy, parquet = run / "embeddings" / f"{BACKBONE}.npy", run / "embeddings" / f"{BACKBONE}.parquet"
        try:
            described = json.loads(prepared.read_text())
        except (OSError, ValueError):
            continue
        if (described.get("dataset") == "clothing" and described.get("split_seed") == config.DEFAULT_SEED
                and not described.get("max_per_class") and not described.get("category_map")
                and npy.is_file() and parquet.is_file()):
            found.append(npy)
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def computed_clothing_embeddings() -> RealRows:
    from fashionrec.data.fetch import clothing_dirs, locate_clothing
    from fashionrec.data.prepared import prepare
    from fashionrec.experiment.evaluate import embed
    from fashionrec.settings import InferenceSettings

    if locate_clothing() is None:
        sys.exit(f"index_scale: no clothing {BACKBONE} embeddings under {config.RESULTS_DIR}/*/embeddings/ and no "
                 f"clothing photos to compute them from (no images.csv in: {', '.join(map(str, clothing_dirs()))}). "
                 f"Run `make data` (or set FASHIONREC_CLOTHING_DIR), run `make pipeline PARAMS=params/clothing.yaml`, "
                 f"pass --embeddings FILE.npy, or use --synthetic.")
    log(f"no clothing run in {config.RESULTS_DIR}: embedding the clothing photos with {BACKBONE} "
        f"(cached in {config.INTERIM_DIR / 'embeddings'})")
    try:
        prepared = prepare("clothing", split_seed=config.DEFAULT_SEED, progress=False)
        embedded = embed(prepared, BACKBONE, settings=InferenceSettings(progress=sys.stderr.isatty()))
    except FashionRecError as error:
        sys.exit(f"index_scale: cannot compute the clothing embeddings: {error}")
    return RealRows(embedded.vectors, f"clothing photos at {prepared.root}, {BACKBONE} (computed)", embedded.metadata)


def _read_parquet(path: Path):
    import pandas as pd

    return pd.read_parquet(path)


def _checked(real: np.ndarray, path) -> np.ndarray:
    minimum = int(2 * (NEIGHBOURS + 1) / QUERY_POOL_FRACTION)
    if real.ndim != 2 or len(real) < minimum:
        sys.exit(f"index_scale: {path} has shape {real.shape}; need a 2-D array with at least {minimum} rows")
    return real


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


class GrownCache:
    """Grown base and query vectors, exact neighbours and coarse centroids of one generation, on disk.

    The folder name hashes the real rows, every generation setting and the generator's source
    code; a rerun with the same inputs reads the base memory-mapped instead of growing it again.
    """

    def __init__(self, root: Path | None, real: np.ndarray, args):
        digest = hashlib.sha256(np.ascontiguousarray(real).tobytes())
        digest.update(json.dumps([args.n, args.queries, args.seed, args.noise, args.mix, args.noise_model]).encode())
        digest.update(inspect.getsource(synthetic).encode())
        self.folder = None if root is None else root / f"grown-{args.n}-{digest.hexdigest()[:16]}"

    def vectors(self, real: np.ndarray, args) -> tuple[np.ndarray, np.ndarray, bool]:
        """(base, queries, whether they came from the cache)."""
        if self.folder is not None and (self.folder / "queries.npy").is_file():
            return np.load(self.folder / "base.npy", mmap_mode="r"), np.load(self.folder / "queries.npy"), True
        base, queries = make_vectors(real, args.n, args.queries, args.seed, args.noise, args.mix, args.noise_model)
        if self.folder is None:
            return base, queries, False
        self.folder.mkdir(parents=True, exist_ok=True)
        np.save(self.folder / "base.npy", base)
        np.save(self.folder / "queries.npy", queries)  # written last: its presence marks a complete entry
        del base
        return np.load(self.folder / "base.npy", mmap_mode="r"), queries, False

    def load(self, name: str):
        path = None if self.folder is None else self.folder / f"{name}.npy"
        if path is None or not path.is_file():
            return None, {}
        info_path = path.with_suffix(".json")
        return np.load(path), json.loads(info_path.read_text()) if info_path.is_file() else {}

    def store_json(self, name: str, value) -> None:
        """Rows measured so far, so that an interrupted run keeps them."""
        if self.folder is not None:
            (self.folder / f"{name}.json").write_text(json.dumps(value, indent=1, default=str) + "\n")

    def store(self, name: str, array: np.ndarray, info: dict | None = None) -> None:
        if self.folder is None:
            return
        np.save(self.folder / f"{name}.npy", array)
        if info is not None:
            (self.folder / f"{name}.json").write_text(json.dumps(info) + "\n")


def run(args) -> dict:
    faiss.omp_set_num_threads(args.threads)
    started = time.perf_counter()
    # Timings from a machine busy with other work are slower; the load says how busy it was.
    load_before = os.getloadavg()[0]
    real_rows = load_real_rows(args)
    real = real_rows.vectors
    original_dim = real.shape[1]
    explained = None
    if args.pca_dim and args.pca_dim < original_dim:
        real, explained = pca_project(real, args.pca_dim)
        log(f"PCA {original_dim} -> {args.pca_dim} dims keeps {explained:.1%} of the variance")
    cache = GrownCache(None if args.no_cache else args.cache_dir, real, args)
    log(f"growing {args.n} base + {args.queries} query vectors of {real.shape[1]} dims from {len(real)} real rows "
        f"({real_rows.source})" + (f"; cache {cache.folder}" if cache.folder else ""))
    base, queries, cached = cache.vectors(real, args)
    log("grown vectors read from the cache" if cached else "grown vectors generated")
    n, d = base.shape
    fidelity = {"effective_dimension": {"real": effective_dimension(real),
                                        "synthetic_base": effective_dimension(np.asarray(base[:FIDELITY_SAMPLE_ROWS])),
                                        "synthetic_queries": effective_dimension(queries)}}
    log("effective dimension: real rows {real:.1f}, synthetic base {synthetic_base:.1f}, "
        "synthetic queries {synthetic_queries:.1f}".format(**fidelity["effective_dimension"]))
    if args.fidelity:
        fidelity["compressibility"] = compressibility(real, args.fidelity_factory, seed=args.seed, noise=args.noise,
                                                      mix=args.mix, noise_model=args.noise_model)
        log("exhaustive {factory} recall@10 at {n} rows: real {recall_at_10_real:.3f}, "
            "grown {recall_at_10_grown:.3f}".format(**fidelity["compressibility"]))

    exact_name = f"exact-{args.metric}-k{args.k}"
    exact_ids, _ = cache.load(exact_name)
    log("Flat: exact reference and first timing pass" + (" (neighbours from the cache)" if exact_ids is not None else ""))
    flat = measure(base, queries, "Flat", exact_ids, args, None, sweep=False)
    if exact_ids is None:
        exact_ids = flat.pop("found_ids")
        flat["recall_at_k"] = flat["recall_at_10"] = 1.0
        cache.store(exact_name, exact_ids)
    flat.pop("found_ids", None)
    log(f"Flat: {flat['qps']:.1f} qps")
    coarse = SharedCoarse(base, args, cache) if args.share_coarse else None
    storage = Path(tempfile.mkdtemp(prefix="index_scale-")) if args.no_cache else args.cache_dir / "disk"
    rows = [flat]
    for template in [t for t in args.indexes if t != "Flat"]:
        log(f"{template}: building")
        row = measure(base, queries, template, exact_ids, args, coarse, sweep=args.sweep, storage_dir=storage)
        rows.append(row)
        cache.store_json("partial", {"args": {key: str(value) for key, value in vars(args).items()}, "indexes": rows})
        log(f"{template}: build {row['build_s']:.1f} s, {row['bytes_per_vector']:.1f} B/vector in memory"
            + (f" + {row['disk_bytes_per_vector']:.0f} on disk" if row["disk_bytes_per_vector"] else "")
            + f", {row['qps']:.0f} qps, recall@{args.k} {row['recall_at_k']:.3f}")
    log("Flat: second timing pass")
    again = measure(base, queries, "Flat", exact_ids, args, None, sweep=False)
    flat["qps_passes"] = [flat["qps"], again["qps"]]
    flat["qps"] = statistics.median(flat["qps_passes"])
    log(f"Flat: {again['qps']:.1f} qps at the end, median {flat['qps']:.1f}")

    auto = auto_choice(base, queries, exact_ids, rows, args, coarse, storage)
    measured = rows + ([auto["measured"]] if "measured" in auto and auto["measured"] not in rows else [])
    task = task_cost(real_rows, [row["name"] for row in rows], args)
    for row in rows:
        row["task"] = task.get(row["name"])
    shutil.rmtree(storage, ignore_errors=True)
    return {
        "targets": targets(measured, args),
        "n": n, "d": d, "original_d": original_dim, "pca_dim": args.pca_dim if explained is not None else None,
        "pca_explained_variance": explained, "metric": args.metric, "k": args.k,
        "queries": args.queries, "threads": args.threads, "seed": args.seed,
        "source": real_rows.source, "real_rows": len(real), "grown_vectors_cached": cached,
        "cache_dir": str(cache.folder) if cache.folder else None,
        "generation": {"noise": args.noise, "mix": args.mix, "noise_model": args.noise_model,
                       "neighbours": NEIGHBOURS, "query_pool_fraction": QUERY_POOL_FRACTION,
                       "fidelity": fidelity},
        "faiss_version": faiss.__version__, "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "machine": machine(),
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "flat_qps_passes": flat["qps_passes"],
        "indexes": rows, "auto_choice": auto,
        "total_s": time.perf_counter() - started,
    }


def machine() -> dict:
    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    simd = [name for name in ("avx512f", "avx2") if f" {name}" in flags]
    return {"cpus": os.cpu_count(), "simd": simd[0] if simd else "none",
            "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)}


class SharedCoarse:
    """IVF centroids trained once per nlist (cached between runs) and reused by every IVF variant without a transform."""

    def __init__(self, base: np.ndarray, args, cache: GrownCache):
        self.base, self.args, self.cache, self.trained = base, args, cache, {}

    def for_factory(self, factory: str) -> tuple[np.ndarray | None, float, bool]:
        """(centroids, seconds their training took, from the cache), or (None, 0.0, False) when it can't share."""
        match = re.match(r"IVF(\d+)", resolve_factory(factory, *self.base.shape))
        if match is None:
            return None, 0.0, False
        nlist = int(match.group(1))
        if nlist not in self.trained:
            name = f"coarse-{nlist}-{self.args.metric}-seed{self.args.seed}"
            centroids, info = self.cache.load(name)
            if centroids is not None:
                log(f"shared coarse k-means, {nlist} lists: from the cache ({info.get('train_s', 0):.0f} s when trained)")
                self.trained[nlist] = centroids, info.get("train_s", 0.0), True
            else:
                log(f"shared coarse k-means, {nlist} lists")
                started = time.perf_counter()
                centroids = train_coarse_centroids(self.base, nlist, self.args.metric, self.args.seed,
                                                   threads=self.args.threads)
                self.trained[nlist] = centroids, time.perf_counter() - started, False
                self.cache.store(name, centroids, {"train_s": self.trained[nlist][1]})
        return self.trained[nlist]


def measure(base, queries, factory, exact_ids, args, coarse: SharedCoarse | None, params: str = "",
            name: str | None = None, sweep: bool = False, storage_dir: Path | None = None) -> dict:
    centroids, coarse_s, coarse_cached = coarse.for_factory(factory) if coarse else (None, 0.0, False)
    row = benchmark_index(base, queries, factory, args.metric, args.k, params, exact_ids, name=name,
                          seed=args.seed, threads=args.threads, coarse_centroids=centroids, sweep=sweep,
                          storage_dir=storage_dir, keep_index=True)
    index = row.pop("index")
    if exact_ids is None:  # this is the exact reference: keep what it found
        row["found_ids"] = search(index, queries, args.k, args.metric, threads=args.threads)[1]
    row["build_s"] += coarse_s
    row["shared_coarse_s"] = coarse_s if centroids is not None else None
    row["shared_coarse_cached"] = coarse_cached if centroids is not None else None
    if isinstance(faiss.downcast_index(index), faiss.IndexRefine) and exact_ids is not None:
        row["codes_only"] = codes_only(index, queries, exact_ids, args)
    if disk_rerank.is_disk_backed(index) and exact_ids is not None:
        save_index(index, storage_dir / "index.faiss", {"factory": row["factory"], "metric": args.metric,
                                                        "seed": args.seed})
        del index  # unmaps the vectors file: the cold start maps it afresh, in a new process
        row["cold"] = cold_start(row, queries, exact_ids, args, storage_dir)
    return row


def codes_only(index: faiss.IndexRefine, queries, exact_ids, args) -> dict:
    """The in-memory codes of a re-ranking index on their own, at its default setting: what re-ranking adds."""
    base = faiss.downcast_index(faiss.downcast_index(index).base_index)
    faiss.ParameterSpace().set_index_parameters(base, default_search_params(base))
    started = time.perf_counter()
    _, ids = search(base, queries, args.k, args.metric, threads=args.threads)
    elapsed = time.perf_counter() - started
    return {"params": default_search_params(base), "bytes_per_vector": index_bytes_per_vector(base),
            "qps": len(queries) / elapsed, "recall_at_10": recall_vs_exact(ids, exact_ids, 10) if args.k >= 10 else None}


def cold_start(row: dict, queries, exact_ids, args, storage_dir: Path) -> dict:
    """A new process loads the saved index and searches once at the tuned setting, then again, warm.

    "Cold" here: the in-memory part read from its file, the float16 vectors file evicted from
    this machine's page cache (posix_fadvise DONTNEED after fdatasync; page_cache_before says
    what share stayed), so every candidate's page is read from the block device; a virtual
    machine's host may still serve some of those reads from its own cache (bytes_read is what
    the process asked the block layer for). A fresh process also makes the resident memory that
    loading adds (RssAnon) the in-memory index's own, not memory a freed index left behind.
    """
    tuned = tune_search_params(all_settings(row), args.recall_target)
    np.save(storage_dir / "queries.npy", np.asarray(queries, dtype=np.float32))
    lib = Path(fashionrec.__file__).resolve().parents[1]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(lib), os.environ.get("PYTHONPATH", "")])}
    finished = subprocess.run([sys.executable, __file__, "--n", "1", "--cold-start", str(storage_dir),
                               "--cold-params", tuned["params"], "--k", str(args.k), "--metric", args.metric,
                               "--threads", str(args.threads)], capture_output=True, text=True, env=environment)
    if finished.returncode != 0:
        raise RuntimeError(f"cold start failed: {finished.stderr.strip().splitlines()[-1:]}")
    result = json.loads(finished.stdout)
    ids = np.load(storage_dir / "cold_ids.npy")
    result.update({"meets_target_warm": tuned["meets_target"], "warm_sweep_qps": tuned["qps"],
                   "recall_at_10": recall_vs_exact(ids, exact_ids, 10) if args.k >= 10 else None})
    log(f"{row['name']}: cold start at [{tuned['params']}] {result['qps']:.0f} qps (then warm {result['warm_qps']:.0f}), "
        f"{result['bytes_read'] / 2**20:.0f} MiB read, page cache {result['page_cache_before']:.1%} -> "
        f"{result['page_cache_after']:.1%}; loading took {result['load_s']:.2f} s and "
        f"{result['resident_anon_bytes_added_by_load'] / 2**20:.1f} MiB of anonymous memory")
    return result


def cold_start_child(folder: Path, params: str, k: int, metric: str, threads: int) -> dict:
    """Runs in the new process of :func:`cold_start`: load, evict, search cold, search warm."""
    faiss.omp_set_num_threads(threads)
    queries = np.load(folder / "queries.npy")
    before = resident_bytes()
    started = time.perf_counter()
    index, _ = load_index(folder / "index.faiss")
    load_s = time.perf_counter() - started
    loaded = resident_bytes()
    evicted = disk_rerank.evict_from_page_cache(index)
    read_before = bytes_read()
    started = time.perf_counter()
    _, ids = search(index, queries, k, metric, params=params)
    cold_s = time.perf_counter() - started
    read = bytes_read() - read_before
    after = disk_rerank.page_cache_fraction(index)
    started, rounds = time.perf_counter(), 0
    while rounds < 3 or (time.perf_counter() - started < 1.0 and rounds < 20):
        search(index, queries, k, metric)
        rounds += 1
    warm_qps = rounds * len(queries) / (time.perf_counter() - started)
    np.save(folder / "cold_ids.npy", ids)
    return {"params": params, "qps": len(queries) / cold_s, "warm_qps": warm_qps, "page_cache_before": evicted,
            "page_cache_after": after, "bytes_read": read, "load_s": load_s,
            "resident_anon_bytes_added_by_load": loaded["RssAnon"] - before["RssAnon"],
            "resident_file_bytes_after_warm": resident_bytes()["RssFile"]}


def resident_bytes() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon", "RssFile")):
            key, value = line.split(":")
            fields[key] = int(value.split()[0]) * 1024
    return fields


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes"):
            return int(line.split()[1])
    return 0


def all_settings(row: dict) -> list[dict]:
    """A measured index at its default setting and at each swept one, as flat points."""
    return [{"name": row["name"], "factory": row["factory"], "bytes_per_vector": row["bytes_per_vector"],
             "disk_bytes_per_vector": row.get("disk_bytes_per_vector", 0.0),
             "params": point["params"], "qps": point["qps"], "recall_at_k": point["recall_at_k"]}
            for point in [row, *row.get("operating_points", [])]]


def targets(rows: list[dict], args) -> dict:
    """The questions of scale, answered from every measured operating point (warm page cache).

    fastest_at_recall_target: the highest qps with recall@k >= --recall-target, and its
    speed-up over exact Flat (median of its timing passes); best_recall_within_bytes: the
    highest recall@k of an index of at most --compact-bytes per vector in memory;
    fastest_compact_at_recall_target: the highest qps of such an index with recall@k >= target.
    """
    flat_qps = next(row["qps"] for row in rows if row["factory"] == "Flat")
    points = [point for row in rows for point in all_settings(row)]
    fast = [p for p in points if p["recall_at_k"] >= args.recall_target and p["factory"] != "Flat"]
    compact = [p for p in points if p["bytes_per_vector"] <= args.compact_bytes]
    fastest = max(fast, key=lambda p: p["qps"], default=None)
    smallest = max(compact, key=lambda p: (p["recall_at_k"], p["qps"]), default=None)
    compact_fast = max((p for p in compact if p["recall_at_k"] >= args.recall_target), key=lambda p: p["qps"],
                       default=None)

    def with_speedup(point):
        return None if point is None else {**point, "speedup_vs_flat": point["qps"] / flat_qps}

    return {
        "flat_qps": flat_qps,
        "recall_target": args.recall_target,
        "fastest_at_recall_target": with_speedup(fastest),
        "compact_bytes": args.compact_bytes,
        "best_recall_within_bytes": with_speedup(smallest),
        "fastest_compact_at_recall_target": with_speedup(compact_fast),
    }


def auto_choice(base, queries, exact_ids, rows, args, coarse: SharedCoarse | None, storage: Path) -> dict:
    """choose_index's pick for this N, built and tuned: the fastest search setting that meets the target."""
    n, d = base.shape
    try:
        choice = choose_index(n, d, args.memory_budget, args.recall_target, args.disk_budget)
    except ValueError as error:
        return {"error": str(error), "memory_budget_bytes": args.memory_budget}
    log(f"auto choice: {choice['factory']} {choice['params']} ({choice['rationale']})")
    measured = next((row for row in rows if row["factory"] == choice["factory"]
                     and (row.get("operating_points") or not row["params"])), None)
    if measured is None:
        measured = measure(base, queries, choice["factory"], exact_ids, args, coarse, params=choice["params"],
                           name="auto", sweep=True, storage_dir=storage)
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


def task_cost(real_rows: RealRows, templates: list[str], args) -> dict:
    """P@10 of the protocol of record through each index (None per index without clothing rows)."""
    metadata = real_rows.metadata
    if metadata is None or not {"split", "label"} <= set(metadata.columns) or args.pca_dim:
        log("task-level P@10 skipped: needs the real rows' catalog (label, split) and no --pca-dim")
        return {}
    from fashionrec.evaluation.protocol import evaluate_embeddings

    log(f"task-level cost: the protocol of record ({(metadata['split'] == 'query').sum()} queries -> "
        f"{(metadata['split'] == 'gallery').sum()} gallery, k={args.k}) through each index")
    exact = evaluate_embeddings(real_rows.vectors, metadata, k=args.k, index="Flat", metric=args.metric,
                                seed=args.seed)
    results = {}
    for template in templates:
        try:
            evaluated = evaluate_embeddings(real_rows.vectors, metadata, k=args.k, index=template, metric=args.metric,
                                            seed=args.seed)
        except (FashionRecError, ValueError) as error:
            results[template] = {"error": str(error)}
            continue
        results[template] = {
            "factory": resolve_factory(template, int((metadata["split"] == "gallery").sum()), real_rows.vectors.shape[1]),
            "precision_at_10": evaluated.summary["precision_at_k"],
            "exact_precision_at_10": exact.summary["precision_at_k"],
            "recall_at_10_vs_exact": recall_vs_exact(evaluated.result_positions, exact.result_positions, args.k),
        }
    return results


def print_table(report: dict) -> None:
    k = report["k"]
    load = report["load_average_1min"]
    print(f"n={report['n']} d={report['d']} metric={report['metric']} queries={report['queries']} "
          f"threads={report['threads']} source={report['source']} "
          f"load average {load['start']:.1f} -> {load['end']:.1f}")
    passes = ", ".join(f"{qps:.1f}" for qps in report["flat_qps_passes"])
    print(f"Flat qps passes (start, end): {passes}; speed-ups use their median")
    header = (f"{'index':34} {'params':36} {'build s':>8} {'B/vec':>7} {'disk B':>7} {'qps':>8} {f'R@{k}':>6} "
              f"{'P@10 task':>10}")
    print(header)
    print("-" * len(header))
    for row in report["indexes"]:
        task = row.get("task") or {}
        p_at_10 = f"{task['precision_at_10']:.3f}" if "precision_at_10" in task else ""
        print(f"{row['name']:34} {row['params']:36} {row['build_s']:8.1f} {row['bytes_per_vector']:7.1f} "
              f"{row['disk_bytes_per_vector']:7.0f} {row['qps']:8.0f} {row['recall_at_k']:6.3f} {p_at_10:>10}")
        for point in row.get("operating_points", []):
            print(f"{'  sweep':34} {point['params']:36} {'':8} {'':7} {'':7} {point['qps']:8.0f} "
                  f"{point['recall_at_k']:6.3f}")
        alone = row.get("codes_only")
        if alone:
            print(f"{'  its codes alone':34} {alone['params']:36} {'':8} {alone['bytes_per_vector']:7.1f} {'':7} "
                  f"{alone['qps']:8.0f} {alone['recall_at_10']:6.3f}")
        cold = row.get("cold")
        if cold:
            print(f"{'  cold start':34} {cold['params']:36} {'':8} {'':7} {'':7} {cold['qps']:8.0f} "
                  f"{cold['recall_at_10']:6.3f}   warm {cold['warm_qps']:.0f} qps, {cold['bytes_read'] / 2**20:.0f} MiB "
                  f"read, page cache {cold['page_cache_before']:.0%} -> {cold['page_cache_after']:.0%}")
    goals = report["targets"]
    fastest, compact = goals["fastest_at_recall_target"], goals["best_recall_within_bytes"]
    compact_fast = goals["fastest_compact_at_recall_target"]
    print(f"\nfastest at recall@{k} >= {goals['recall_target']}: " + (
        "none" if fastest is None else f"{fastest['factory']} [{fastest['params']}] {fastest['qps']:.0f} qps = "
        f"{fastest['speedup_vs_flat']:.1f}x Flat ({goals['flat_qps']:.0f} qps), recall {fastest['recall_at_k']:.3f}"))
    print(f"best recall@{k} within {goals['compact_bytes']:.0f} B/vector in memory: " + (
        "no index that small" if compact is None else f"{compact['factory']} [{compact['params']}] "
        f"{compact['bytes_per_vector']:.1f} B/vector, recall {compact['recall_at_k']:.3f}, {compact['qps']:.0f} qps"))
    print(f"fastest within {goals['compact_bytes']:.0f} B/vector at recall@{k} >= {goals['recall_target']}: " + (
        "none" if compact_fast is None else f"{compact_fast['factory']} [{compact_fast['params']}] "
        f"{compact_fast['qps']:.0f} qps = {compact_fast['speedup_vs_flat']:.1f}x Flat, "
        f"recall {compact_fast['recall_at_k']:.3f}"))
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
    parser.add_argument("--embeddings", type=Path,
                        help="real embeddings .npy (rows x dims; a .parquet beside it with label and split enables "
                             "the task-level P@10); default: a clothing run's, or computed from the photos")
    parser.add_argument("--synthetic", action="store_true",
                        help="stand-in clustered features instead of real embeddings")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--metric", default="cosine", choices=("cosine", "l2", "ip"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--indexes", nargs="+", default=list(DEFAULT_INDEXES),
                        help="factory templates to compare; Flat (the exact reference) is always run")
    parser.add_argument("--cache-dir", type=Path, default=config.INTERIM_DIR / "index_scale",
                        help="grown vectors, exact neighbours, coarse centroids, and the vectors files of RDisk "
                             "indexes while they are measured (default data/interim/index_scale)")
    parser.add_argument("--no-cache", action="store_true", help="grow and train everything again, keep nothing")
    parser.add_argument("--pca-dim", type=int, default=None, help="project real rows to this many dims")
    parser.add_argument("--noise", type=float, default=0.5, help="noise, in residual standard deviations")
    parser.add_argument("--noise-model", default="covariance", choices=NOISE_MODELS,
                        help="shape of the noise: residual covariance (default) or per-dimension variance only")
    parser.add_argument("--mix", type=float, default=0.5, help="largest step towards a neighbour")
    parser.add_argument("--memory-budget", type=parse_bytes, default=parse_bytes("2GiB"),
                        help="memory for the auto choice, e.g. 2GiB, 512MB (default 2GiB)")
    parser.add_argument("--disk-budget", type=parse_bytes, default=float("inf"),
                        help="disk for the auto choice's float16 vectors file, e.g. 0 for none (default: no limit)")
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--compact-bytes", type=float, default=64,
                        help="size limit, in bytes per vector in memory, for the compact-index summaries")
    parser.add_argument("--fidelity", action="store_true",
                        help="also compare the recall of exhaustive --fidelity-factory codes on the real rows "
                             "and on as many grown ones")
    parser.add_argument("--fidelity-factory", default="PQ40", help="codes for --fidelity (default PQ40)")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false",
                        help="measure each index at its default search parameters only")
    parser.add_argument("--no-share-coarse", dest="share_coarse", action="store_false",
                        help="train every IVF variant's coarse k-means separately")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--cold-start", type=Path, help=argparse.SUPPRESS)  # the new process of a cold start
    parser.add_argument("--cold-params", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cold_start:
        print(json.dumps(cold_start_child(args.cold_start, args.cold_params, args.k, args.metric, args.threads)))
        return 0
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
