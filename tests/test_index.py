"""FAISS index variants: exactness, recall floors, sizes, determinism, choice rule, persistence.

Data are seeded Gaussian blobs whose within-cluster spread lies mostly in a low-rank subspace,
as in real embeddings (so compressed indexes have structure to exploit). Builds run on one
faiss thread: on data this small, OpenMP synchronisation costs more than it saves.
"""
from __future__ import annotations

import json
import math

import faiss
import numpy as np
import pytest

from fashionrec.errors import FashionRecError, IndexBuildError
from fashionrec.indexing.choose import choose_index
from fashionrec.indexing.faiss_index import (METRICS, SCALE_FACTORIES, SPINE_FACTORIES, build_index,
                                             disk_bytes_per_vector, index_bytes_per_vector, load_index, resolve_factory,
                                             save_index, search, train_coarse_centroids)
from fashionrec.indexing.measure import benchmark_index, recall_vs_exact, search_param_grid, tune_search_params

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def blobs(n: int, d: int, seed: int, clusters: int = 20, rank: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (clusters, d))
    basis = rng.normal(0, 1, (clusters, rank, d))
    labels = rng.integers(0, clusters, n)
    spread = np.einsum("nr,nrd->nd", rng.normal(0, 1, (n, rank)), basis[labels])
    return (centres[labels] + spread + rng.normal(0, 0.3, (n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def gallery_64d():
    return blobs(5000, 64, seed=1), blobs(50, 64, seed=2)


@pytest.fixture(scope="module")
def small_gallery():
    """n=2000, d=32: every factory trains in a few seconds at most (OPQ is the slow one)."""
    return blobs(2000, 32, seed=3), blobs(100, 32, seed=4)


@pytest.fixture(scope="module")
def small_exact_ids(small_gallery):
    vectors, queries = small_gallery
    return search(build_index(vectors, "Flat"), queries, 10)[1]


def brute_force(vectors, queries, metric, k):
    if metric == "cosine":
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    if metric == "l2":
        scores = ((queries[:, None, :].astype(np.float64) - vectors[None]) ** 2).sum(-1)
        order = np.argsort(scores, axis=1, kind="stable")[:, :k]
    else:
        scores = queries.astype(np.float64) @ vectors.T.astype(np.float64)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("metric", METRICS)
def test_flat_search_equals_numpy_brute_force(gallery_64d, metric):
    vectors, queries = gallery_64d
    scores, ids = search(build_index(vectors, "Flat", metric), queries, 10, metric)
    expected_scores, expected_ids = brute_force(vectors, queries, metric, 10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-3)


def test_cosine_does_not_modify_the_callers_vectors(gallery_64d):
    vectors, queries = gallery_64d
    before = vectors.copy(), queries.copy()
    search(build_index(vectors, "Flat", "cosine"), queries, 5, "cosine")
    np.testing.assert_array_equal(vectors, before[0])
    np.testing.assert_array_equal(queries, before[1])


# Loose floors on the blobs at default search parameters: 4-bit fast-scan PQ alone is coarse.
RECALL_FLOORS = {"IVF{nlist},PQ{m}x4fs": 0.3, "IVF{nlist},PQ{m}": 0.5, "OPQ{m},IVF{nlist},PQ{m}": 0.5}


@pytest.mark.parametrize("template", SPINE_FACTORIES + SCALE_FACTORIES)
def test_every_factory_builds_searches_and_recalls(small_gallery, small_exact_ids, template):
    vectors, queries = small_gallery
    index = build_index(vectors, template, "cosine")
    assert index.ntotal == len(vectors)
    scores, ids = search(index, queries, 10, "cosine")
    assert ids.shape == scores.shape == (len(queries), 10)
    assert recall_vs_exact(ids, small_exact_ids, 10) >= RECALL_FLOORS.get(template, 0.8)


def test_ivf_flat_probing_every_list_is_exact(small_gallery, small_exact_ids):
    vectors, queries = small_gallery
    index = build_index(vectors, "IVF{nlist},Flat")
    nlist = faiss.extract_index_ivf(index).nlist
    assert nlist > 1
    _, ids = search(index, queries, 10, params=f"nprobe={nlist}")
    assert recall_vs_exact(ids, small_exact_ids, 10) == 1.0


def test_hnsw_with_wide_beam_reaches_high_recall(small_gallery, small_exact_ids):
    vectors, queries = small_gallery
    _, ids = search(build_index(vectors, "HNSW32"), queries, 10, params="efSearch=128")
    assert recall_vs_exact(ids, small_exact_ids, 10) >= 0.9


def test_compressed_indexes_take_fewer_bytes(small_gallery):
    vectors, _ = small_gallery
    size = {t: index_bytes_per_vector(build_index(vectors, t)) for t in
            ("Flat", "SQ8", "IVF{nlist},PQ{m}", "IVF{nlist},PQ{m}x4fs")}
    assert size["Flat"] == pytest.approx(4 * 32, rel=0.01)
    # At 32 dims SQ8 (32 B) is not beaten by 8-bit PQ, whose codebooks and ids weigh in.
    assert size["IVF{nlist},PQ{m}x4fs"] < size["IVF{nlist},PQ{m}"] < size["Flat"]
    assert size["SQ8"] == pytest.approx(32, rel=0.05)


def test_refining_compressed_candidates_raises_recall(small_gallery, small_exact_ids):
    vectors, queries = small_gallery
    recall = {t: recall_vs_exact(search(build_index(vectors, t), queries, 10)[1], small_exact_ids, 10)
              for t in ("IVF{nlist},PQ{m}x4fs", "IVF{nlist},PQ{m}x4fs,RFlat")}
    assert recall["IVF{nlist},PQ{m}x4fs,RFlat"] > recall["IVF{nlist},PQ{m}x4fs"]


@pytest.mark.parametrize("template", ["IVF{nlist},PQ{m}x4fs", "HNSW32", "IVF{nlist}_HNSW32,Flat"])
def test_same_seed_same_index_bytes(small_gallery, template):
    vectors, _ = small_gallery
    first = faiss.serialize_index(build_index(vectors, template, seed=7, threads=2))
    again = faiss.serialize_index(build_index(vectors, template, seed=7, threads=2))
    other = faiss.serialize_index(build_index(vectors, template, seed=8, threads=2))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_training_sample_is_seeded_when_capped(small_gallery):
    vectors, _ = small_gallery
    builds = [faiss.serialize_index(build_index(vectors, "IVF{nlist},Flat", seed=s, max_train=500))
              for s in (3, 3)]
    assert np.array_equal(*builds)


def test_shared_coarse_centroids_give_the_same_index(small_gallery):
    vectors, _ = small_gallery
    nlist = int(resolve_factory("{nlist}", *vectors.shape))
    centroids = train_coarse_centroids(vectors, nlist, "cosine", seed=5)
    shared = build_index(vectors, "IVF{nlist},PQ{m}x4fs", seed=5, coarse_centroids=centroids)
    alone = build_index(vectors, "IVF{nlist},PQ{m}x4fs", seed=5)
    assert np.array_equal(faiss.serialize_index(shared), faiss.serialize_index(alone))
    with pytest.raises(ValueError, match="transform"):
        build_index(vectors, "OPQ{m},IVF{nlist},PQ{m}", coarse_centroids=centroids)


@pytest.mark.parametrize("n, d, expected", [
    (1_000_000, 1280, "IVF4096,PQ64"),
    (20_000, 1280, "IVF512,PQ64"),
    (1000, 1280, "IVF16,PQ64"),
    (1000, 512, "IVF16,PQ64"),
    (2000, 64, "IVF32,PQ16"),
    (50, 30, "IVF1,PQ2"),
    (1, 3, "IVF1,PQ1"),
])
def test_resolve_factory_fills_nlist_and_m(n, d, expected):
    assert resolve_factory("IVF{nlist},PQ{m}", n, d) == expected


def test_resolve_factory_keeps_concrete_strings_and_rejects_unknown_placeholders():
    assert resolve_factory("OPQ16,IVF256,PQ16,Refine(SQ8)", 10, 64) == "OPQ16,IVF256,PQ16,Refine(SQ8)"
    with pytest.raises(ValueError, match="placeholder"):
        resolve_factory("IVF{lists},Flat", 1000, 64)


def test_small_gallery_of_colour_histograms_builds_every_ivf_variant():
    histograms = np.abs(blobs(1000, 512, seed=9))
    queries = np.abs(blobs(20, 512, seed=10))
    for template in ("IVF{nlist},Flat", "IVF{nlist}_HNSW32,Flat", "IVF{nlist},PQ{m}x4fs,RFlat"):
        _, ids = search(build_index(histograms, template), queries, 10)
        assert (ids >= 0).all()


def test_opq_with_fewer_vectors_than_dimensions_is_refused_not_a_crash():
    with pytest.raises(IndexBuildError, match="OPQ needs at least as many training vectors"):
        build_index(blobs(300, 512, seed=16), "OPQ{m},IVF{nlist},PQ{m}")


def test_too_few_vectors_for_the_pq_codebooks_is_an_index_build_error():
    with pytest.raises(IndexBuildError, match="cannot train on 100 vectors"):
        build_index(blobs(100, 32, seed=17), "IVF{nlist},PQ{m}")


def test_search_clamps_k_to_the_index_size():
    vectors = blobs(5, 8, seed=11)
    scores, ids = search(build_index(vectors, "Flat"), vectors[:2], 50)
    assert ids.shape == scores.shape == (2, 5)
    assert sorted(ids[0]) == list(range(5))


def test_search_refuses_a_metric_the_index_was_not_built_for():
    vectors = blobs(100, 8, seed=12)
    with pytest.raises(ValueError, match="metric"):
        search(build_index(vectors, "Flat", "l2"), vectors[:1], 5, "cosine")


def test_build_rejects_non_finite_vectors():
    vectors = blobs(100, 8, seed=13)
    vectors[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_index(vectors, "Flat", "l2")


def test_recall_vs_exact_counts_overlap_and_ignores_padding():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 9], [5, -1, -1, -1]])
    assert recall_vs_exact(found, exact, 4) == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert recall_vs_exact(exact, exact, 2) == 1.0


def test_benchmark_index_reports_every_measure(small_gallery, small_exact_ids):
    vectors, queries = small_gallery
    row = benchmark_index(vectors, queries, "IVF{nlist},Flat", "cosine", 10, "nprobe=4", small_exact_ids)
    assert row["name"] == "IVF{nlist},Flat" and row["factory"] == "IVF32,Flat"
    assert row["params"] == "nprobe=4"
    assert row["build_s"] > 0 and row["qps"] > 0
    assert row["bytes_per_vector"] == pytest.approx(4 * 32 + 8, rel=0.1)
    assert 0 < row["recall_at_10"] == row["recall_at_k"] <= 1
    assert "operating_points" not in row


def test_sweep_traces_recall_against_search_effort(small_gallery, small_exact_ids):
    vectors, queries = small_gallery
    row = benchmark_index(vectors, queries, "IVF{nlist}_HNSW32,PQ8,RFlat", "cosine", 10, "", small_exact_ids,
                          sweep=True)
    points = row["operating_points"]
    settings = [point["params"] for point in points]
    # nprobe up to nlist=32, crossed with every re-ranking factor; the graph quantizer keeps efSearch >= 2*nprobe.
    assert len(settings) == 6 * 6 and len(set(settings)) == len(settings)
    assert "nprobe=32,quantizer_efSearch=64,k_factor_rf=32" in settings
    by_setting = {point["params"]: point["recall_at_10"] for point in points}
    # More lists probed and more candidates re-ranked never lose neighbours on the same index.
    assert by_setting["nprobe=1,quantizer_efSearch=64,k_factor_rf=2"] < by_setting[
        "nprobe=32,quantizer_efSearch=64,k_factor_rf=32"]
    for factor in (2, 4, 8, 16, 32):
        recalls = [by_setting[f"nprobe={p},quantizer_efSearch=64,k_factor_rf={factor}"] for p in (1, 2, 4, 8, 16, 32)]
        assert recalls == sorted(recalls)
    assert all(point["qps"] > 0 for point in points)
    assert search_param_grid(build_index(vectors, "Flat")) == []
    assert search_param_grid(build_index(vectors, "HNSW16")) == [f"efSearch={ef}" for ef in (16, 32, 64, 128, 256)]


@pytest.mark.parametrize("budget_gib, target, disk_gib, factory", [
    (64, 0.95, math.inf, "HNSW32"),
    (4.9, 0.95, math.inf, "PCAU256,IVF4096,RaBitQ,RDisk"),
    (0.06, 0.9, math.inf, "PCAU256,IVF4096,RaBitQ,RDisk"),
    (4.9, 0.95, 2, "IVF4096,PQ64,RFlat"),
    (4.845, 0.5, 0, "IVF4096,PQ64x4fs,RFlat"),
    (2, 0.95, 0, "OPQ64,IVF4096,PQ64,Refine(SQ8)"),
    (0.1, 0.5, 0, "OPQ64,IVF4096,PQ64"),
    (0.06, 0.1, 0, "IVF4096,PQ64x4fs"),
    (7, 0.999, math.inf, "Flat"),
])
def test_choose_index_fits_the_budget_at_a_million_vectors(budget_gib, target, disk_gib, factory):
    """1M x 1280 floats: Flat 4.77 GiB, HNSW32 5.0, PCA-256 RaBitQ codes re-ranked from disk 0.05
    (+ 2.4 GiB of float16 vectors on disk), IVF-PQ + RFlat 4.856, IVF-PQ fast-scan + RFlat 4.83
    (whose measured ceiling, 0.69, rules it out for 0.95), OPQ IVF-PQ + SQ8 re-rank 1.3, OPQ
    IVF-PQ 0.09, IVF-PQ fast-scan 0.06."""
    choice = choose_index(1_000_000, 1280, budget_gib * 2**30, target, disk_gib * 2**30)
    assert choice["estimated_total_bytes"] <= budget_gib * 2**30
    assert choice["estimated_disk_bytes"] <= disk_gib * 2**30
    assert choice["factory"] == factory, choice["rationale"]


def test_tune_search_params_takes_the_fastest_setting_that_meets_the_target():
    points = [{"params": "nprobe=4", "qps": 900.0, "recall_at_k": 0.91},
              {"params": "nprobe=8", "qps": 600.0, "recall_at_k": 0.96},
              {"params": "nprobe=16", "qps": 300.0, "recall_at_k": 0.99}]
    assert tune_search_params(points, 0.95) == {**points[1], "meets_target": True}
    assert tune_search_params(points, 0.9)["params"] == "nprobe=4"
    assert tune_search_params(points, 0.999) == {**points[2], "meets_target": False}
    with pytest.raises(ValueError):
        tune_search_params([], 0.9)


def test_choose_index_prefers_exact_search_for_small_galleries():
    assert choose_index(5000, 1280, 2**30, 0.99)["factory"] == "Flat"


def test_choose_index_warns_when_the_budget_rules_out_the_recall_target():
    choice = choose_index(1_000_000, 1280, 0.06 * 2**30, 0.9, disk_budget_bytes=0)
    assert choice["factory"] == "IVF4096,PQ64x4fs"
    assert "target at risk" in choice["rationale"]


def test_choose_index_says_when_nothing_fits():
    with pytest.raises(ValueError, match="fits"):
        choose_index(1_000_000, 1280, 1e6, 0.9)


def test_choose_index_size_estimate_matches_the_built_index():
    vectors = blobs(5000, 32, seed=14)
    choice = choose_index(len(vectors), 32, 90_000, 0.1)
    assert "PQ8x4fs" in choice["factory"]
    index = build_index(vectors, choice["factory"])
    assert index_bytes_per_vector(index) == pytest.approx(choice["estimated_bytes_per_vector"], rel=0.15)


@pytest.mark.parametrize("d", [32, 512])
def test_choose_index_estimates_the_disk_re_ranked_index_it_picks(d):
    vectors = np.abs(blobs(20_000, d, seed=18))
    choice = choose_index(len(vectors), d, 2**20 * 2, 0.5)
    assert choice["factory"].endswith("RaBitQ,RDisk") and choice["factory"].startswith("PCAU") == (d > 256)
    index = build_index(vectors, choice["factory"])
    assert index_bytes_per_vector(index) == pytest.approx(choice["estimated_bytes_per_vector"], rel=0.1)
    assert disk_bytes_per_vector(index) == pytest.approx(choice["estimated_disk_bytes"] / len(vectors), rel=0.01)


def test_save_and_load_round_trip(tmp_path, small_gallery):
    vectors, queries = small_gallery
    index = build_index(vectors, "IVF{nlist},Flat", "cosine", seed=3)
    search(index, queries, 10, params="nprobe=5")
    expected = search(index, queries, 10)
    info_path = save_index(index, tmp_path / "gallery.faiss",
                           {"factory": "IVF{nlist},Flat", "metric": "cosine", "seed": 3, "params": "nprobe=5"})
    assert info_path == tmp_path / "gallery.faiss.json"
    loaded, info = load_index(tmp_path / "gallery.faiss")
    for got, want in zip(search(loaded, queries, 10, info["metric"]), expected):
        np.testing.assert_array_equal(got, want)
    assert info == {**json.loads(info_path.read_text()), "n": 2000, "d": 32}
    assert info["faiss_version"] == faiss.__version__ and info["params"] == "nprobe=5"


def test_load_index_needs_the_build_description(tmp_path):
    index = build_index(blobs(10, 4, seed=15), "Flat")
    save_index(index, tmp_path / "a.faiss", {"factory": "Flat", "metric": "cosine"})
    (tmp_path / "a.faiss.json").unlink()
    with pytest.raises(FashionRecError, match="a.faiss.json"):
        load_index(tmp_path / "a.faiss")
    with pytest.raises(ValueError, match="metric"):
        save_index(index, tmp_path / "b.faiss", {"factory": "Flat"})
