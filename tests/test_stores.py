"""The ranking core's row stores: FAISS and Milvus Lite held to the same promises, against numpy and each other.

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
from fashionrec.indexing.measure import compare_rankings, recall_vs_exact
from fashionrec.indexing.milvus_store import DuplicateIdError, MilvusIndex, MilvusStore, UnknownIdError, milvus_index
from fashionrec.ranking.rank import gallery_store
from fashionrec.ranking.store import FaissRowStore
from fashionrec.settings import StoreSettings

from conftest import REPO
from test_index import brute_force

# Labels a Milvus collection must keep exactly.
TRICKY_LABELS = ['T-Shirt', 'say "hi"', "it's", "back\\slash", "ünïcödé 帽子", "two\nlines"]


def catalog(n: int = 600, d: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, (len(TRICKY_LABELS), d))
    which = rng.integers(0, len(TRICKY_LABELS), n)
    vectors = (centres[which] + rng.normal(0, 1, (n, d))).astype(np.float32)
    return vectors, [TRICKY_LABELS[i] for i in which]


@pytest.fixture
def lite_uri(tmp_path):
    return str(tmp_path / "milvus.db")


@pytest.fixture(params=["faiss", "milvus"])
def store_kind(request):
    return request.param


def make_store(kind, uri, vectors, labels, metric="cosine", index="Flat", search_params=""):
    settings = StoreSettings("milvus", uri) if kind == "milvus" else StoreSettings()
    return gallery_store(settings, vectors, labels, index, metric, search_params)


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_exact_search_returns_the_true_neighbours_with_their_scores(store_kind, lite_uri, metric):
    vectors, labels = catalog()
    queries = np.random.default_rng(1).normal(0, 2, (40, vectors.shape[1])).astype(np.float32)
    expected_scores, expected_rows = brute_force(vectors, queries, metric, 10)
    with make_store(store_kind, lite_uri, vectors, labels, metric) as store:
        assert (store.kind, store.metric, store.ntotal, store.dim, store.exhaustive) == (
            store_kind, metric, len(vectors), vectors.shape[1], True)
        scores, found = store.search(queries, 10)
    assert found.shape == (40, 10) and found.dtype == np.int64
    agreement = compare_rankings(found, scores, expected_rows, expected_scores, atol=1e-4)
    assert agreement["other_rows"] == 0, agreement
    assert agreement["max_score_difference"] < 1e-4 * max(1.0, float(np.abs(expected_scores).max()))


def test_rows_round_trip_exactly_and_a_filtered_search_keeps_to_the_allowed_rows(store_kind, lite_uri):
    vectors, labels = catalog()
    queries = vectors[:25] + 0.01
    with make_store(store_kind, lite_uri, vectors, labels) as store:
        _, found = store.search(queries, 5)
        assert found[:, 0].tolist() == list(range(25))  # each query's own (nudged) vector comes first
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        np.testing.assert_allclose(store.stored_vectors(found.ravel()), unit[found.ravel()], atol=1e-6)
        for category in TRICKY_LABELS:
            allowed = np.array([label == category for label in labels])
            expected_scores, expected_rows = brute_force(vectors[allowed], queries, "cosine", 5)
            scores, found = store.search(queries, 5, allowed)
            assert allowed[found.ravel()].all()
            assert compare_rankings(found, scores, np.flatnonzero(allowed)[expected_rows],
                                    expected_scores)["other_rows"] == 0
        nothing = store.search(queries, 5, np.zeros(len(vectors), bool))[1]
        assert nothing.shape[0] == 25 and not (nothing >= 0).any()
        assert store.search(vectors[:2], 5000)[1].shape == (2, len(vectors))  # k beyond the catalog: every row


def test_milvus_keeps_every_row_with_its_label_and_refuses_an_id_it_holds(lite_uri):
    vectors, labels = catalog(300)
    with make_store("milvus", lite_uri, vectors, labels) as store:
        collection = store.store
        stored, stored_labels = collection.fetch(np.arange(len(vectors))[::-1])
        assert stored_labels == labels[::-1]
        np.testing.assert_array_equal(stored, vectors[::-1])
        with pytest.raises(DuplicateIdError, match="already in the store"):
            collection.add([5], vectors[:1], labels[:1])
        with pytest.raises(DuplicateIdError, match="repeat"):
            collection.add([900, 900], vectors[:2], labels[:2])
        with pytest.raises(ValueError, match="reserved"):
            collection.add([-1], vectors[:1], labels[:1])
        with pytest.raises(ValueError, match="dimension"):
            collection.add([901], vectors[:1, :5], labels[:1])
        with pytest.raises(UnknownIdError):
            collection.fetch([0, 12345])
        assert store.ntotal == len(vectors)


def test_removing_and_adding_ends_where_a_fresh_build_of_the_final_catalog_is(store_kind, lite_uri):
    """Each store after removals (in place, or tombstones compacted) and adds ranks as FAISS built once on what remains."""
    vectors, labels = catalog(800)
    queries = np.random.default_rng(2).normal(0, 2, (30, vectors.shape[1])).astype(np.float32)
    gone = np.arange(100, 350)
    keep = np.setdiff1d(np.arange(400), gone)
    with make_store(store_kind, lite_uri, vectors[:400], labels[:400]) as store:
        store.search(queries, 10)  # a search between writes: the store must not keep stale state
        if store.remove(gone):
            assert store_kind == "faiss" and store.ntotal == 400 - len(gone)   # later rows moved up
        else:
            assert store_kind == "milvus" and store.ntotal == 400
            store.compact(keep)
            assert store.ntotal == len(keep)
        store.add(vectors[400:], labels[400:])
        assert store.ntotal == len(keep) + 400
        final = np.concatenate([vectors[keep], vectors[400:]])
        fresh = FaissRowStore.build(final, "Flat")
        expected_scores, expected = fresh.search(queries, 10)
        scores, found = store.search(queries, 10)
        assert compare_rankings(found, scores, expected, expected_scores)["other_rows"] == 0
        allowed = np.array([label == "it's" for label in [labels[i] for i in keep] + labels[400:]])
        scores, found = store.search(queries, 10, allowed)
        expected_scores, expected = fresh.search(queries, 10, allowed)
        assert compare_rankings(found, scores, expected, expected_scores)["other_rows"] == 0


def test_bad_queries_are_refused_with_a_reason(store_kind, lite_uri):
    vectors, labels = catalog(50)
    with make_store(store_kind, lite_uri, vectors, labels) as store:
        with pytest.raises(ValueError, match="NaN"):
            store.search(np.full((1, vectors.shape[1]), np.nan), 3)
        with pytest.raises(ValueError, match="dimension"):
            store.search(vectors[:1, :5], 3)
        with pytest.raises(ValueError, match="k must be"):
            store.search(vectors[:1], 0)


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
    vectors, labels = catalog(2000, d=32, seed=3)
    ids = np.arange(len(vectors))
    queries = np.random.default_rng(4).normal(0, 2, (50, 32)).astype(np.float32)
    _, exact_ids = FaissRowStore.build(vectors, "Flat").search(queries, 10)
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
    vectors, labels = catalog(300)
    ids = np.arange(len(vectors))
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
