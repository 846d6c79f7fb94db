"""Vector stores: FAISS and Milvus Lite held to the same promises, against numpy and each other.

Milvus runs for real: Milvus Lite 3.2.2 through pymilvus 3.0.2, from a file under tmp_path;
every store is closed by the test that opened it (context managers), which stops the Lite
server and frees the file.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fashionrec.errors import FashionRecError
from fashionrec.indexing.backends import open_store
from fashionrec.indexing.measure import compare_rankings, recall_vs_exact
from fashionrec.indexing.milvus_store import MilvusIndex, MilvusStore, milvus_index
from fashionrec.indexing.stores import DuplicateIdError, FaissStore, UnknownIdError, VectorStore
from fashionrec.settings import StoreSettings

from conftest import REPO
from test_index import brute_force

# Labels a filter expression must quote correctly; ids far from 0..n and negative ones.
TRICKY_LABELS = ['T-Shirt', 'say "hi"', "it's", "back\\slash", "ünïcödé 帽子", "two\nlines"]


def catalog(n: int = 600, d: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, (len(TRICKY_LABELS), d))
    which = rng.integers(0, len(TRICKY_LABELS), n)
    vectors = (centres[which] + rng.normal(0, 1, (n, d))).astype(np.float32)
    ids = rng.choice(np.arange(-2**40, 2**62, 2**40 + 7), size=n, replace=False).astype(np.int64)
    ids = ids[ids != -1]
    return ids[:n], vectors, [TRICKY_LABELS[i] for i in which]


@pytest.fixture
def lite_uri(tmp_path):
    return str(tmp_path / "milvus.db")


@pytest.fixture(params=["faiss", "milvus"])
def store_kind(request):
    return request.param


def make_store(kind, uri, metric="cosine", index="Flat", search_params=""):
    settings = StoreSettings("milvus", uri) if kind == "milvus" else StoreSettings()
    return open_store(settings, metric, index, search_params, collection="items" if kind == "milvus" else None)


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_exact_search_returns_the_true_neighbours_with_their_scores(store_kind, lite_uri, metric):
    ids, vectors, labels = catalog()
    queries = np.random.default_rng(1).normal(0, 2, (40, vectors.shape[1])).astype(np.float32)
    expected_scores, expected_rows = brute_force(vectors, queries, metric, 10)
    with make_store(store_kind, lite_uri, metric) as store:
        assert isinstance(store, VectorStore)
        store.add(ids, vectors, labels)
        scores, found = store.search(queries, 10)
    assert found.shape == (40, 10) and found.dtype == np.int64
    agreement = compare_rankings(found, scores, ids[expected_rows], expected_scores, atol=1e-4)
    assert agreement["other_rows"] == 0, agreement
    assert agreement["max_score_difference"] < 1e-4 * max(1.0, float(np.abs(expected_scores).max()))


def test_ids_and_labels_round_trip_exactly_and_the_category_filter_keeps_to_its_category(store_kind, lite_uri):
    ids, vectors, labels = catalog()
    by_id = dict(zip(ids.tolist(), labels))
    queries = vectors[:25] + 0.01
    with make_store(store_kind, lite_uri) as store:
        store.add(ids, vectors, labels)
        _, found = store.search(queries, 5)
        assert set(found.ravel().tolist()) <= set(by_id)
        assert store.labels_of(found.ravel()) == [by_id[i] for i in found.ravel().tolist()]
        assert found[:, 0].tolist() == ids[:25].tolist()  # each query's own (nudged) vector comes first
        for category in TRICKY_LABELS:
            in_category = np.array([label == category for label in labels])
            expected_scores, expected_rows = brute_force(vectors[in_category], queries, "cosine", 5)
            scores, found = store.search(queries, 5, category=category)
            assert set(store.labels_of(found.ravel())) == {category}
            assert compare_rankings(found, scores, ids[in_category][expected_rows], expected_scores)["other_rows"] == 0
            assert store.count(category) == int(in_category.sum())
        assert store.count() == len(ids)
        _, none = store.search(queries, 5, category="no such category")
        assert none.shape == (25, 0)
        with pytest.raises(UnknownIdError):
            store.labels_of([int(ids[0]), 12345])


def test_adding_and_removing_ends_where_a_fresh_build_of_the_final_catalog_is(lite_uri):
    """Milvus after adds and removes ranks exactly as FAISS built once on the rows that remain."""
    ids, vectors, labels = catalog(800)
    queries = np.random.default_rng(2).normal(0, 2, (30, vectors.shape[1])).astype(np.float32)
    gone = ids[100:350]
    keep = ~np.isin(ids, gone)
    with make_store("milvus", lite_uri) as milvus, FaissStore() as faiss_store:
        for store in (milvus, faiss_store):
            store.add(ids[:400], vectors[:400], labels[:400])
            store.search(queries, 10)  # a search between writes: the store must not keep stale state
            assert store.remove(gone) == len(gone)
            assert store.remove(gone) == 0
            store.add(ids[400:], vectors[400:], labels[400:])
            with pytest.raises(DuplicateIdError):
                store.add(ids[500:502], vectors[500:502], labels[500:502])
        fresh = FaissStore()
        fresh.add(ids[keep], vectors[keep], [label for label, kept in zip(labels, keep) if kept])
        expected_scores, expected = fresh.search(queries, 10)
        for store in (milvus, faiss_store):
            assert store.count() == int(keep.sum())
            scores, found = store.search(queries, 10)
            assert compare_rankings(found, scores, expected, expected_scores)["other_rows"] == 0
            assert not np.isin(found, gone).any()
            scores, found = store.search(queries, 10, category="it's")
            category_scores, in_category = fresh.search(queries, 10, category="it's")
            assert compare_rankings(found, scores, in_category, category_scores)["other_rows"] == 0


def test_bad_input_is_refused_with_a_reason(store_kind, lite_uri):
    ids, vectors, labels = catalog(50)
    with make_store(store_kind, lite_uri) as store:
        with pytest.raises(DuplicateIdError, match="repeat"):
            store.add([1, 1], vectors[:2], labels[:2])
        with pytest.raises(ValueError, match="reserved"):
            store.add([-1], vectors[:1], labels[:1])
        store.add(ids, vectors, labels)
        with pytest.raises(ValueError, match="dimension"):
            store.add([7], vectors[:1, :5], labels[:1])
        with pytest.raises(ValueError, match="NaN"):
            store.search(np.full((1, vectors.shape[1]), np.nan), 3)
        with pytest.raises(ValueError, match="k must be"):
            store.search(vectors[:1], 0)
        assert store.search(vectors[:2], 500)[1].shape == (2, 50)  # k beyond the catalog: every row, no padding


def test_milvus_index_names_translate_with_the_faiss_stores_parameters():
    assert milvus_index("Flat", 5000, 64) == MilvusIndex("FLAT", {}, {})
    assert milvus_index("HNSW32", 5000, 64) == MilvusIndex("HNSW", {"M": 32, "efConstruction": 40}, {"ef": 64})
    assert milvus_index("IVF{nlist},Flat", 5000, 64) == MilvusIndex("IVF_FLAT", {"nlist": 128}, {"nprobe": 16})
    assert milvus_index("IVF1024,SQ8", 10**6, 64, "nprobe=32") == MilvusIndex("IVF_SQ8", {"nlist": 1024},
                                                                             {"nprobe": 32})
    assert milvus_index("HNSW:M=16,efConstruction=200", 10, 8, "efSearch=128") == MilvusIndex(
        "HNSW", {"M": 16, "efConstruction": 200}, {"ef": 128})
    assert milvus_index("HNSW16_SQ8", 10, 8) == MilvusIndex("HNSW_SQ", {"M": 16, "efConstruction": 40,
                                                                        "sq_type": "SQ8"}, {"ef": 64})
    assert milvus_index("DISKANN", 10, 8).index_type == "DISKANN"  # a server's type: passed through
    with pytest.raises(ValueError, match="no Milvus counterpart"):
        milvus_index("IVF{nlist},PQ{m}", 5000, 64)
    with pytest.raises(ValueError, match="no search parameter nprob"):
        milvus_index("IVF{nlist},Flat", 5000, 64, "nprob=3")
    with pytest.raises(ValueError, match="no build parameter m"):
        milvus_index("HNSW:m=16", 10, 8)


def test_milvus_lite_builds_the_index_asked_for_with_its_parameters(lite_uri):
    """Build parameters arrive and searches use the index: few probed lists lose neighbours, all lists find them.

    (Milvus Lite 3.2.2 would silently drop nlist and scan unindexed segments exhaustively;
    see fashionrec.indexing.milvus_store.)
    """
    ids, vectors, labels = catalog(2000, d=32, seed=3)
    queries = np.random.default_rng(4).normal(0, 2, (50, 32)).astype(np.float32)
    exact = FaissStore()
    exact.add(ids, vectors, labels)
    _, exact_ids = exact.search(queries, 10)
    recalls = {}
    for nprobe in (1, 32):
        with MilvusStore(lite_uri, f"ivf_{nprobe}", "cosine", "IVF32,Flat", f"nprobe={nprobe}") as store:
            store.add(ids, vectors, labels)
            assert store.describe()["build_params"] == {"nlist": 32}
            recalls[nprobe] = recall_vs_exact(store.search(queries, 10)[1], exact_ids, 10)
    assert recalls[32] == 1.0
    assert recalls[1] < 0.9, recalls
    with pytest.raises(ValueError, match="Milvus Lite cannot build IVF_PQ"):
        MilvusStore(lite_uri, "pq", index="IVF_PQ:nlist=32")


def test_a_milvus_collection_persists_and_reopens_with_its_metric_index_and_rows(lite_uri):
    ids, vectors, labels = catalog(300)
    with MilvusStore(lite_uri, "kept", "l2", "HNSW16") as store:
        store.add(ids, vectors, labels)
        before = store.search(vectors[:5], 4)
    with MilvusStore.open(lite_uri, "kept") as store:
        assert (store.metric, store.dim, store.count()) == ("l2", vectors.shape[1], 300)
        assert store.describe()["build_params"] == {"M": 16, "efConstruction": 40}
        after = store.search(vectors[:5], 4)
    assert np.array_equal(before[1], after[1]) and np.allclose(before[0], after[0])
    with pytest.raises(FashionRecError, match="already exists"):
        MilvusStore(lite_uri, "kept")
    with MilvusStore(lite_uri, "kept", replace=True) as store:
        assert store.count() == 0
    with pytest.raises(FashionRecError, match="no collection 'gone'"):
        MilvusStore.open(lite_uri, "gone")


def test_a_closed_lite_store_frees_its_file_and_a_held_one_is_reported_in_one_line(lite_uri):
    open_in_child = (f"from fashionrec.indexing.milvus_store import MilvusStore\n"
                     f"MilvusStore({lite_uri!r}, 'other').close()\nprint('opened')")
    environment = {"PYTHONPATH": str(REPO / "lib")}
    with MilvusStore(lite_uri, "held") as store:
        store.add([1], np.ones((1, 4), np.float32), ["x"])
        held = subprocess.run([sys.executable, "-c", open_in_child], capture_output=True, text=True, timeout=120,
                              env=environment)
    assert held.returncode != 0 and "one process at a time" in held.stderr
    freed = subprocess.run([sys.executable, "-c", open_in_child], capture_output=True, text=True, timeout=120,
                           env=environment)
    assert freed.returncode == 0 and freed.stdout.strip() == "opened", freed.stderr
