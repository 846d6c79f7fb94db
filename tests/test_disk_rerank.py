"""Compact codes in memory, exact re-ranking from a float16 file (``,RDisk`` specs, PCAU projections).

Seeded blobs as in test_index.py, with few clusters of low rank (a low effective dimension, as
in real embeddings, so a projection keeps the neighbour structure) and made non-negative like
pooled CNN features (where centring before an inner-product projection hurts); queries come
from the same clusters. Builds run on one faiss thread.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest

from fashionrec.errors import FashionRecError, IndexBuildError
from fashionrec.evaluation.protocol import evaluate_embeddings
from fashionrec.ranking.store import FaissRowStore
from fashionrec.indexing import disk_rerank
from fashionrec.indexing.faiss_index import (DISK_REFINE_K_FACTOR, METRICS, build_index, check_factory,
                                             default_search_params,
                                             disk_bytes_per_vector, index_bytes_per_vector, load_index, save_index,
                                             search, train_coarse_centroids)
from fashionrec.indexing.measure import benchmark_index, recall_vs_exact, search_param_grid
from test_index import blobs

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

SPEC = "PCAU32,IVF{nlist},PQ8,RDisk"


@pytest.fixture(scope="module")
def features():
    """Base (3000 x 64) and 60 queries from the same six rank-4 clusters, non-negative."""
    rows = np.abs(blobs(3060, 64, seed=21, clusters=6, rank=4))
    return rows[:3000], rows[3000:]


@pytest.fixture(scope="module")
def exact_ids(features):
    vectors, queries = features
    return search(build_index(vectors, "Flat"), queries, 10)[1]


def float16_rounded(vectors, metric):
    """The vectors as the re-ranking sees them: normalised for cosine, rounded to float16 by faiss."""
    vectors = normalised(vectors) if metric == "cosine" else vectors
    fp16 = faiss.IndexScalarQuantizer(vectors.shape[1], faiss.ScalarQuantizer.QT_fp16)
    return fp16.sa_decode(fp16.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32)))


def normalised(rows):
    """L2-normalised float32 copy, computed as build_index and search compute it (faiss.normalize_L2)."""
    rows = np.array(rows, dtype=np.float32)
    faiss.normalize_L2(rows)
    return rows


def true_scores(rounded, queries, metric):
    """float64 scores of every query against every rounded vector (higher is closer)."""
    queries = (normalised(queries) if metric == "cosine" else queries).astype(np.float64)
    if metric == "l2":
        return -((queries[:, None, :] - rounded[None].astype(np.float64)) ** 2).sum(-1)
    return queries @ rounded.T.astype(np.float64)


@pytest.mark.parametrize("metric", METRICS)
def test_proposing_every_vector_gives_exact_search_over_the_float16_vectors(features, metric):
    vectors, queries = features
    index = build_index(vectors, "IVF{nlist},PQ8,RDisk", metric)
    nlist = faiss.extract_index_ivf(index).nlist
    scores, ids = search(index, queries, 10, metric, params=f"nprobe={nlist},k_factor_rf={len(vectors)}")
    truth = true_scores(float16_rounded(vectors, metric), queries, metric)
    best = -np.sort(-truth, axis=1)[:, :10]
    sign = -1 if metric == "l2" else 1
    # Exact up to float32 summation order: each score is the true one of that id, and the ten
    # scores are the ten best (ids of scores tied within that rounding may swap places).
    tolerance = 1e-5 * np.abs(best).max()
    np.testing.assert_allclose(sign * scores, np.take_along_axis(truth, ids, axis=1), atol=tolerance)
    np.testing.assert_allclose(sign * scores, best, atol=tolerance)
    assert len(np.unique(ids, axis=None)) > 10 and (ids >= 0).all()


def test_float16_rounding_barely_moves_the_exact_neighbours(features, exact_ids):
    vectors, queries = features
    rounded = search(build_index(float16_rounded(vectors, "cosine"), "Flat"), queries, 10)[1]
    assert recall_vs_exact(rounded, exact_ids, 10) >= 0.98


def test_re_ranking_from_disk_recalls_more_than_the_codes_and_more_with_more_candidates(features, exact_ids):
    vectors, queries = features
    codes_only = recall_vs_exact(search(build_index(vectors, "PCAU32,IVF{nlist},PQ8"), queries, 10)[1], exact_ids, 10)
    index = build_index(vectors, SPEC)
    recalls = [recall_vs_exact(search(index, queries, 10, params=f"k_factor_rf={factor}")[1], exact_ids, 10)
               for factor in (1, 2, 4, 8, 16, 32)]
    # A larger k_factor re-ranks a superset of the candidates exactly, so recall never drops.
    assert recalls == sorted(recalls)
    assert recalls[0] == pytest.approx(codes_only, abs=0.02)  # k_factor 1 only re-scores the codes' own top k
    assert codes_only + 0.2 < recalls[2]
    assert recalls[-1] >= 0.95


def test_uncentred_projection_keeps_inner_product_neighbours_that_centred_pca_loses(features, exact_ids):
    vectors, queries = features
    recall = {spec: recall_vs_exact(search(build_index(vectors, spec), queries, 10)[1], exact_ids, 10)
              for spec in ("PCAU32,Flat", "PCA32,Flat")}
    assert recall["PCAU32,Flat"] > recall["PCA32,Flat"] + 0.1


def test_memory_holds_only_the_codes_and_the_vectors_file_the_rest(features, tmp_path):
    vectors, _ = features
    n, d = vectors.shape
    on_disk = build_index(vectors, SPEC, seed=4, storage_dir=tmp_path)
    in_memory = build_index(vectors, SPEC.removesuffix(",RDisk"), seed=4)
    assert index_bytes_per_vector(on_disk) == index_bytes_per_vector(in_memory)
    assert disk_bytes_per_vector(in_memory) == 0.0
    file_size = (tmp_path / "vectors.f16").stat().st_size
    assert disk_bytes_per_vector(on_disk) == file_size / n
    assert file_size == pytest.approx(2 * d * n, abs=200)


def test_vectors_file_is_the_file_faiss_writes_and_numpy_reads(features, tmp_path):
    vectors, _ = features
    index = build_index(vectors, SPEC, storage_dir=tmp_path)
    reference = faiss.IndexScalarQuantizer(vectors.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    reference.add(normalised(vectors))
    assert (tmp_path / "vectors.f16").read_bytes() == faiss.serialize_index(reference).tobytes()
    header = disk_rerank.header_bytes(index)
    from_numpy = np.memmap(tmp_path / "vectors.f16", np.float16, "r", offset=header, shape=vectors.shape)
    np.testing.assert_array_equal(from_numpy, disk_rerank.float16_vectors(index))
    np.testing.assert_allclose(from_numpy, normalised(vectors), atol=1e-3)


def test_save_and_load_reference_the_vectors_file_in_the_same_folder(features, tmp_path):
    vectors, queries = features
    index = build_index(vectors, SPEC, storage_dir=tmp_path)
    expected = search(index, queries, 10, params="nprobe=4,k_factor_rf=6")
    info_path = save_index(index, tmp_path / "index.faiss", {"factory": SPEC, "metric": "cosine", "params": "nprobe=4"})
    assert sorted(os.listdir(tmp_path)) == ["index.faiss", "index.faiss.json", "vectors.f16"]
    info = json.loads(info_path.read_text())
    assert info["storage"] == "disk" and info["vectors_file"] == "vectors.f16" and info["k_factor_rf"] == 6
    assert (tmp_path / "index.faiss").stat().st_size == index_bytes_per_vector(index) * len(vectors)
    del index
    loaded, loaded_info = load_index(tmp_path / "index.faiss")
    assert loaded_info == info and disk_rerank.is_disk_backed(loaded)
    for got, want in zip(search(loaded, queries, 10), expected):
        np.testing.assert_array_equal(got, want)


def test_an_index_built_without_a_folder_copies_its_vectors_when_saved(features, tmp_path, monkeypatch):
    vectors, queries = features
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    index = build_index(vectors, SPEC)
    assert os.listdir(tmp_path / "scratch") == []  # the unnamed file was deleted once mapped
    expected = search(index, queries, 10)
    save_index(index, tmp_path / "kept" / "index.faiss", {"factory": SPEC, "metric": "cosine"})
    assert sorted(os.listdir(tmp_path / "kept")) == ["index.faiss", "index.faiss.f16", "index.faiss.json"]
    for got, want in zip(search(load_index(tmp_path / "kept" / "index.faiss")[0], queries, 10), expected):
        np.testing.assert_array_equal(got, want)


def test_a_saved_index_without_its_vectors_file_is_a_clear_error(features, tmp_path):
    vectors, _ = features
    index = build_index(vectors, SPEC, storage_dir=tmp_path)
    save_index(index, tmp_path / "index.faiss", {"factory": SPEC, "metric": "cosine"})
    del index
    (tmp_path / "vectors.f16").unlink()
    with pytest.raises(FashionRecError, match="vectors.f16"):
        load_index(tmp_path / "index.faiss")


def test_rebuilding_into_the_same_folder_leaves_a_live_index_on_its_own_file(features, tmp_path):
    vectors, queries = features
    first = build_index(vectors, SPEC, storage_dir=tmp_path)
    expected = search(first, queries, 10)
    build_index(vectors[::-1].copy(), SPEC, storage_dir=tmp_path)   # replaces vectors.f16
    for got, want in zip(search(first, queries, 10), expected):
        np.testing.assert_array_equal(got, want)
    save_index(first, tmp_path / "first.faiss", {"factory": SPEC, "metric": "cosine"})
    assert json.loads((tmp_path / "first.faiss.json").read_text())["vectors_file"] == "first.faiss.f16"


def test_adding_to_a_disk_index_is_refused_and_leaves_it_intact(features):
    vectors, queries = features
    index = build_index(vectors, SPEC)
    expected = search(index, queries, 10)
    # faiss itself would abort the process here (it cannot grow a memory-mapped view).
    for change in (lambda: index.add(vectors[:5]), index.reset, lambda: faiss.clone_index(index).add(vectors[:5])):
        with pytest.raises(FashionRecError, match="read-only"):
            change()
    assert index.ntotal == len(vectors)
    for got, want in zip(search(index, queries, 10), expected):
        np.testing.assert_array_equal(got, want)


def _on_ram_file_system(path: Path) -> bool:
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    best = max((m for m in mounts if str(path.resolve()).startswith(m[1])), key=lambda m: len(m[1]))
    return best[2] in ("tmpfs", "ramfs")


def test_eviction_makes_a_cold_start_with_the_same_results(features, tmp_path):
    vectors, queries = features
    index = build_index(vectors, SPEC, storage_dir=tmp_path)
    expected = search(index, queries, 10)
    assert disk_rerank.page_cache_fraction(index) > 0
    remaining = disk_rerank.evict_from_page_cache(index)
    if not _on_ram_file_system(tmp_path):
        assert remaining == 0.0
    for got, want in zip(search(index, queries, 10), expected):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="no name"):
        disk_rerank.evict_from_page_cache(build_index(vectors, SPEC))


def test_search_parameters_and_the_sweep_cover_the_re_ranking_depth(features, exact_ids):
    vectors, queries = features
    index = build_index(vectors, SPEC)
    assert set(default_search_params(index).split(",")) == {"nprobe=16", f"k_factor_rf={DISK_REFINE_K_FACTOR}"}
    assert "nprobe=16,k_factor_rf=32" in search_param_grid(index)
    row = benchmark_index(vectors, queries, SPEC, exact_ids=exact_ids)
    assert row["bytes_per_vector"] < 64 and row["disk_bytes_per_vector"] > 2 * vectors.shape[1]


def test_the_ivf_of_a_disk_index_can_share_coarse_centroids(features):
    vectors, queries = features
    centroids = train_coarse_centroids(vectors, 32, "cosine", seed=5)
    shared = build_index(vectors, "IVF32,PQ8,RDisk", seed=5, coarse_centroids=centroids)
    alone = build_index(vectors, "IVF32,PQ8,RDisk", seed=5)
    for got, want in zip(search(shared, queries, 10), search(alone, queries, 10)):
        np.testing.assert_array_equal(got, want)


def test_the_protocol_of_record_evaluates_a_disk_index(features):
    vectors, _ = features
    labels = np.repeat(np.arange(20), 150)
    split = np.where(np.arange(3000) % 3 == 0, "query", "gallery")
    metadata = pd.DataFrame({"id": np.arange(3000), "label": labels, "split": split})
    exact = evaluate_embeddings(vectors, metadata, index="Flat")
    approximate = evaluate_embeddings(vectors, metadata, index=SPEC,
                                      search_params="nprobe=32,k_factor_rf=100")
    assert approximate.protocol["index"].endswith("RDisk")
    assert approximate.summary["precision_at_k"] == pytest.approx(exact.summary["precision_at_k"], abs=0.01)


@pytest.mark.parametrize("spec, error, message", [
    ("RDisk", IndexBuildError, "needs an in-memory index"),
    ("IVF16,RDisk,PQ8", IndexBuildError, "must come last"),
    ("PCAU64,Flat", IndexBuildError, "fewer"),
    ("PCAU8", IndexBuildError, "needs an index after it"),
    ("IVF16,Nonsense", IndexBuildError, "not a faiss factory string"),
])
def test_bad_specs_say_what_is_wrong(features, spec, error, message):
    vectors, _ = features
    with pytest.raises(error, match=message):
        build_index(vectors[:500], spec)


def test_check_factory_knows_every_spec_without_building():
    assert check_factory("PCAU256,IVF{nlist},RaBitQ,RDisk", 1280, 1_000_000) == "PCAU256,IVF4096,RaBitQ,RDisk"
    assert check_factory("HNSW32", 64) == "HNSW32"
    for spec in ("PCAU2048,IVF{nlist},PQ8", "IVF{nlist},RDisk,PQ8", "IVF{nlist},Nonsense,RDisk"):
        with pytest.raises(IndexBuildError):
            check_factory(spec, 1280)


def test_values_beyond_float16_are_refused(tmp_path):
    vectors = np.full((300, 8), 1e6, dtype=np.float32)
    with pytest.raises(IndexBuildError, match="float16"):
        build_index(vectors, "IVF4,Flat,RDisk", "l2", storage_dir=tmp_path)
    assert not (tmp_path / "vectors.f16").exists()


def test_the_serving_store_saves_loads_and_refuses_updates_of_a_disk_index(features, tmp_path):
    vectors, queries = features
    store = FaissRowStore.build(vectors, SPEC, "cosine", search_params="nprobe=8,k_factor_rf=8")
    expected = store.search(queries, 10)
    store.save(tmp_path)
    loaded = FaissRowStore.load(tmp_path)
    for got, want in zip(loaded.search(queries, 10), expected):
        np.testing.assert_array_equal(got, want)
    allowed = np.zeros(len(vectors), bool)
    allowed[::2] = True
    _, rows = loaded.search(queries, 5, allowed=allowed)
    assert allowed[rows].all()
    with pytest.raises(FashionRecError, match="read-only"):
        loaded.add(vectors[:3])
