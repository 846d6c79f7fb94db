"""Serving: index folders, the Recommender's queries and catalog updates, with real models on real images.

Images are the clothing photos when present (``FASHIONREC_CLOTHING_DIR`` or ../shared) and
generated product shots otherwise; the generated case always runs, the clothing one is skipped
without the photos.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest

from fashionrec import Recommender
from fashionrec.data.catalog import load_folder
from fashionrec.errors import FashionRecError, IndexFolderError
from fashionrec.features.embed import embed_catalog
from fashionrec.models.finetuned import save_model
from fashionrec.models.projection import project
from fashionrec.models.registry import get_backbone
from fashionrec.models.runtime import with_runtime
from fashionrec.models.classifier import multi_view_features
from fashionrec.models.views import MULTI_VIEW_FEATURES, view_backbone
from fashionrec.serving.folder import CURRENT, PARTIAL_PREFIX, current_version
from fashionrec.ranking.store import EXACT_SUBSET_MAX_ROWS, TOMBSTONE_REBUILD_FRACTION, FaissRowStore
from fashionrec.settings import InferenceSettings
from fashionrec.training.classify import train_classifier
from fashionrec.training.finetune import head_payload
from fashionrec.training.heads import HeadConfig, fit_head

from conftest import GENERATED_CATEGORIES as CATEGORIES, REPO, data_dirs, session_data_root, \
    write_product_image

QUIET = InferenceSettings(batch_size=16, workers=0, progress=False)
LITE0 = "efficientnet_lite0"


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory):
    """Session fixtures embed into the tests' data root, so every test reuses their embeddings."""
    return session_data_root(tmp_path_factory)


def _ids(answer) -> list[str]:
    return [item.id for item in answer.results]


def _scores(answer) -> np.ndarray:
    return np.array([item.score for item in answer.results])


def _assert_k_sorted(answer, k: int) -> None:
    scores = _scores(answer)
    assert len(answer.results) == k
    assert np.all(np.diff(scores) <= 0), scores


# --- catalog updates -------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("source", ["generated", "clothing"])
def test_flat_add_100_and_remove_100_equals_a_full_rebuild(source, request, tmp_path, shared_data):
    """Exact index: same ids in the same order, same results, scores within 1e-6.

    The rebuild takes the embeddings from the content-addressed cache, as the rebuild of a
    real catalog does; what is compared is the index and the id map an update leaves.
    """
    catalog, outside = request.getfixturevalue(f"{source}_photos")[:2]
    base, added = catalog.iloc[:200], catalog.iloc[200:300]
    removed = base["id"].iloc[::2].tolist()
    with data_dirs(shared_data):
        updated = Recommender.build(tmp_path / "updated", base, LITE0, index="Flat", settings=QUIET)
        report = updated.add(added["path"], added["label"], added["id"])
        assert report.added == added["id"].tolist() and not report.skipped
        report = updated.remove(removed)
        assert report.removed == removed and not report.compacted
        updated.save()
        updated = Recommender.load(tmp_path / "updated", QUIET)
        final = pd.concat([base[~base["id"].isin(removed)], added], ignore_index=True)
        rebuilt = Recommender.build(tmp_path / "rebuilt", final, LITE0, index="Flat", settings=QUIET)

    assert updated.ids == rebuilt.ids == final["id"].tolist()
    assert updated.catalog.equals(rebuilt.catalog)
    rows = np.arange(len(final))
    assert np.array_equal(updated._store.stored_vectors(rows), rebuilt._store.stored_vectors(rows))
    for query in [*outside, *final["path"].iloc[::40]]:
        mine, theirs = updated.recommend(query, k=10), rebuilt.recommend(query, k=10)
        assert _ids(mine) == _ids(theirs)
        assert np.abs(_scores(mine) - _scores(theirs)).max() <= 1e-6
    for query in outside:   # photos from outside the catalog: k results, best first
        _assert_k_sorted(updated.recommend(query, k=7), 7)
    for item_id in final["id"].iloc[::60]:
        mine = updated.similar_to(item_id, k=8)
        assert _ids(mine) == _ids(rebuilt.similar_to(item_id, k=8)) and _ids(mine)[0] == item_id
        _assert_k_sorted(mine, 8)
    for item_id in removed[:3]:
        with pytest.raises(FashionRecError, match="unknown id"):
            updated.similar_to(item_id)
    assert json.loads((current_version(tmp_path / "updated") / "build.json").read_text())["counts"]["items"] == 200


@pytest.mark.integration
def test_hnsw_keeps_tombstones_out_of_results_and_rebuilds_past_the_threshold(generated_photos, tmp_path, shared_data):
    """HNSW cannot remove (faiss has no IndexHNSW.remove_ids): removed rows become tombstones that
    no search returns, k results still come back, ids stay stable across save/load, and once
    tombstones exceed TOMBSTONE_REBUILD_FRACTION the graph is rebuilt from the live rows."""
    catalog, outside = generated_photos[:2]
    base, added = catalog.iloc[:300], catalog.iloc[300:]
    with data_dirs(shared_data):
        recommender = Recommender.build(tmp_path / "hnsw", base, LITE0, index="HNSW32", settings=QUIET)
        recommender.add(added["path"], added["label"], added["id"])
    files_before = dict(zip(recommender.catalog["id"], recommender.catalog["path"]))
    first = base["id"].iloc[::3].tolist()[:60]   # 60 of 400 rows: below the threshold
    assert 60 / 400 < TOMBSTONE_REBUILD_FRACTION
    report = recommender.remove(first)
    assert not report.compacted and recommender.describe()["tombstones"] == 60 and len(recommender) == 340
    queries = [*outside, *catalog["path"].iloc[::25]]
    answers = {}
    for query in queries:
        answer = recommender.recommend(query, k=10)
        _assert_k_sorted(answer, 10)
        assert not set(_ids(answer)) & set(first)
        answers[query] = _ids(answer)
    for category in CATEGORIES:   # a filter over live rows of one category still fills k
        filtered = recommender.recommend(outside[0], k=10, category=category)
        assert {item.label for item in filtered.results} == {category} and len(filtered.results) == 10
        assert not set(_ids(filtered)) & set(first)

    recommender.save()
    again = Recommender.load(tmp_path / "hnsw", QUIET)
    assert again.describe()["tombstones"] == 60 and again.ids == recommender.ids
    assert {query: _ids(again.recommend(query, k=10)) for query in queries} == answers
    assert all(files_before[item_id] == path for item_id, path in zip(again.catalog["id"], again.catalog["path"]))

    second = base["id"].iloc[1::3].tolist()[:40]   # 100 of 400 rows now: past the threshold
    report = again.remove(second)
    assert report.compacted and again.describe()["tombstones"] == 0 and len(again) == 300
    removed = set(first) | set(second)
    final = catalog[~catalog["id"].isin(removed)].reset_index(drop=True)
    assert again.ids == final["id"].tolist()
    assert again._store.ntotal == 300
    assert all(files_before[item_id] == path for item_id, path in zip(again.catalog["id"], again.catalog["path"]))
    with data_dirs(shared_data):
        exact = Recommender.build(tmp_path / "exact", final, LITE0, index="Flat", settings=QUIET)
    recall = np.mean([len(set(_ids(again.recommend(q, k=10))) & set(_ids(exact.recommend(q, k=10)))) / 10
                      for q in queries])
    assert recall >= 0.95, recall   # approximate, as HNSW is: measured against exact search


@pytest.mark.integration
def test_one_recommender_answers_concurrent_clients_as_it_answers_one(generated_photos, tmp_path, shared_data):
    catalog, outside = generated_photos[:2]
    with data_dirs(shared_data):
        recommender = Recommender.build(tmp_path / "shared", catalog.iloc[:200], LITE0, index="HNSW32",
                                        settings=QUIET)
    queries = [*outside, *catalog["path"].iloc[200:216]]
    serial = {query: _ids(recommender.recommend(query, k=5)) for query in queries}
    answers, errors = [], []

    def client(order):
        try:
            for query in order:
                answers.append((query, _ids(recommender.recommend(query, k=5))))
        except Exception as error:  # collected for the assertion below
            errors.append(error)

    rng = np.random.default_rng(0)
    threads = [threading.Thread(target=client, args=(list(rng.permutation(queries)),)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(answers) == 4 * len(queries)
    assert all(serial[query] == ids for query, ids in answers)

    # Updates while clients query: every answer holds k live items at the time it was given.
    stop = threading.Event()

    def querying():
        while not stop.is_set():
            try:
                answer = recommender.recommend(outside[0], k=5)
                assert len(answer.results) == 5
            except Exception as error:  # collected for the assertion below
                errors.append(error)
                return

    threads = [threading.Thread(target=querying) for _ in range(2)]
    for thread in threads:
        thread.start()
    with data_dirs(shared_data):
        recommender.add(catalog["path"].iloc[200:240], catalog["label"].iloc[200:240], catalog["id"].iloc[200:240])
    recommender.remove(catalog["id"].iloc[:30])
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(recommender) == 210


# --- the store seam ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (12, 32))
    return (centres[rng.integers(0, 12, 10_000)] + rng.normal(0, 0.4, (10_000, 32))).astype(np.float32)


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF32,Flat"])
@pytest.mark.parametrize("share", [0.01, 0.6])
def test_filtered_search_equals_exact_search_over_the_allowed_rows(vectors, factory, share):
    """Few allowed rows are searched exactly; many go through faiss's selector (and fall back to
    exact search if an approximate index finds fewer than k of them)."""
    store = FaissRowStore.build(vectors, factory, "cosine", search_params="nprobe=32" if "IVF" in factory else "",
                             fallback_vectors=lambda rows: vectors[rows])
    allowed = np.random.default_rng(1).random(len(vectors)) < share
    assert (allowed.sum() > EXACT_SUBSET_MAX_ROWS) == (share > 0.5)   # exact subset and selector paths
    queries = vectors[:20] + 0.05
    scores, rows = store.search(queries, 10, allowed)
    normalised = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    exact = np.where(allowed[None, :], q @ normalised.T, -np.inf)
    expected = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    assert allowed[rows].all() and (rows >= 0).all()
    recall = np.mean([len(set(r) & set(e)) / 10 for r, e in zip(rows, expected)])
    assert recall >= (1.0 if factory == "Flat" or share == 0.01 else 0.95)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_only_row_ordered_indexes_remove_in_place_and_compaction_keeps_the_training(vectors):
    flat = FaissRowStore.build(vectors, "Flat", "l2")
    assert flat.removes_in_place and flat.remove(np.array([0, 5]))
    assert flat.ntotal == len(vectors) - 2
    assert np.array_equal(flat.stored_vectors([0, 4]), vectors[[1, 6]])   # later rows moved up
    hnsw = FaissRowStore.build(vectors, "HNSW32", "cosine")
    assert not hnsw.removes_in_place and not hnsw.remove(np.array([0]))
    ivf = FaissRowStore.build(vectors, "IVF16,Flat", "l2", search_params="nprobe=16",
                           fallback_vectors=lambda rows: vectors[rows])
    keep = np.arange(1, len(vectors), 2)
    centroids = faiss.extract_index_ivf(ivf.index).quantizer.reconstruct_n(0, 16)
    ivf.compact(keep)
    assert ivf.ntotal == len(keep)
    assert np.array_equal(faiss.extract_index_ivf(ivf.index).quantizer.reconstruct_n(0, 16), centroids)
    _, rows = ivf.search(vectors[keep[:5]], 1)
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4]   # renumbered in order; nprobe = all lists: exact


# --- the folder ----------------------------------------------------------------------------------------------


@pytest.fixture
def color_index(color_folder, tmp_path):
    catalog = load_folder(color_folder, progress=False).catalog
    Recommender.build(tmp_path / "color-index", catalog, "colorhist", settings=QUIET)
    return tmp_path / "color-index", catalog


def test_each_save_is_a_new_version_and_the_one_before_is_kept(color_index):
    outdir, catalog = color_index
    recommender = Recommender.load(outdir, QUIET)
    assert (outdir / CURRENT).read_text().strip() == recommender.version == "v000001"
    recommender.remove([catalog["id"].iloc[0]])
    assert recommender.save() == "v000002"
    recommender.remove([catalog["id"].iloc[1]])
    assert recommender.save() == "v000003"
    assert sorted(p.name for p in outdir.iterdir() if not p.name.startswith(".")) == [CURRENT, "v000002", "v000003"]
    assert len(Recommender.load(outdir)) == 28


def test_a_stale_recommender_never_overwrites_a_newer_version(color_index):
    outdir, catalog = color_index
    first, second = Recommender.load(outdir, QUIET), Recommender.load(outdir, QUIET)
    first.remove([catalog["id"].iloc[0]])
    first.save()
    second.remove([catalog["id"].iloc[1]])
    with pytest.raises(IndexFolderError, match="changed on disk since it was loaded"):
        second.save()
    assert len(Recommender.load(outdir)) == 29


def test_missing_or_broken_folders_say_how_to_build_one(color_index, tmp_path):
    outdir, _ = color_index
    with pytest.raises(IndexFolderError, match="no such index folder; build one with `python -m fashionrec index"):
        Recommender.load(tmp_path / "nowhere")
    interrupted = tmp_path / "interrupted"
    (interrupted / f"{PARTIAL_PREFIX}abc").mkdir(parents=True)
    with pytest.raises(IndexFolderError, match="a build was interrupted before it finished"):
        Recommender.load(interrupted)
    (outdir / CURRENT).write_text("v000009\n")
    with pytest.raises(IndexFolderError, match="not a complete version"):
        Recommender.load(outdir)
    (outdir / CURRENT).write_text("v000001\n")
    items = pd.read_parquet(outdir / "v000001" / "ids.parquet")
    items.iloc[:-1].to_parquet(outdir / "v000001" / "ids.parquet")
    with pytest.raises(IndexFolderError, match="do not match"):
        Recommender.load(outdir)


def test_an_index_is_never_written_over_other_files(color_folder, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FashionRecError, match="holds other files"):
        Recommender.build(tmp_path / "mine", load_folder(color_folder, progress=False).catalog, "colorhist",
                          settings=QUIET)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_bad_queries_are_clear_errors(color_index, tmp_path):
    outdir, catalog = color_index
    recommender = Recommender.load(outdir)
    with pytest.raises(FashionRecError, match="k must be a positive integer"):
        recommender.recommend(catalog["path"].iloc[0], k=0)
    with pytest.raises(FashionRecError, match="unknown category 'purple'; this index has: blue, green, red"):
        recommender.recommend(catalog["path"].iloc[0], category="purple")
    (tmp_path / "page.jpg").write_text("<html>not a photo</html>")
    with pytest.raises(FashionRecError, match="page.jpg: not an image"):
        recommender.recommend(tmp_path / "page.jpg")
    answer = recommender.recommend(catalog["path"].iloc[0], k=3, exclude_ids=[catalog["id"].iloc[0]])
    assert catalog["id"].iloc[0] not in _ids(answer)


# --- killed builds and updates -------------------------------------------------------------------------------


def _command(*arguments) -> list[str]:
    return [sys.executable, "-m", "fashionrec", *arguments, "--quiet", "--workers", "0"]


def _environment(data_root: Path) -> dict:
    return {**os.environ, "FASHIONREC_DATA": str(data_root), "PYTHONPATH": str(REPO / "lib")}


def _kill_once_writing(command, outdir: Path, env: dict, delay: float) -> bool:
    """Runs ``command``, SIGKILLs it ``delay`` s after it starts writing a version of ``outdir``.

    Returns True if it was still running when killed.
    """
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if outdir.is_dir() and any(p.name.startswith(PARTIAL_PREFIX) and p.is_dir() for p in outdir.iterdir()):
            break
        time.sleep(0.002)
    time.sleep(delay)
    still_running = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    return still_running


@pytest.mark.integration
def test_a_killed_update_or_build_leaves_the_previous_index_loadable(tmp_path):
    add = tmp_path / "add"
    for i in range(60):
        write_product_image(add / CATEGORIES[i % 4] / f"new-{i:02d}.jpg", seed=500 + i, category=i % 4)
    catalog = tmp_path / "catalog"
    for i in range(80):
        write_product_image(catalog / CATEGORIES[i % 4] / f"item-{i:02d}.jpg", seed=i, category=i % 4)
    env = _environment(tmp_path / "data")
    outdir = tmp_path / "index"
    build = _command("index", "--dataset", "folder", "--data-dir", str(catalog), "--backbone", "colorhist",
                     "--out", str(outdir))

    # A first build killed while writing: nothing that loads, and a message saying so.
    assert _kill_once_writing(build, outdir, env, 0.0)
    assert not (outdir / CURRENT).exists()
    with pytest.raises(IndexFolderError, match="a build was interrupted before it finished"):
        Recommender.load(outdir)
    assert subprocess.run(build, env=env, capture_output=True).returncode == 0
    assert len(Recommender.load(outdir)) == 80

    interrupted = 0
    for delay in (0.0, 0.02):
        before = (outdir / CURRENT).read_text().strip()
        update = _command("index", "--update", str(outdir), "--add", str(add))
        interrupted += _kill_once_writing(update, outdir, env, delay)
        reloaded = Recommender.load(outdir)   # the version before or the new one, complete either way
        if reloaded.version == before:
            assert len(reloaded) == 80
        else:
            assert len(reloaded) == 140
            assert subprocess.run(build, env=env, capture_output=True).returncode == 0   # back to the original
        assert len(Recommender.load(outdir)) == 80
    assert interrupted >= 1, "no kill landed before an update finished; the test did not test anything"
    # A rebuild killed while writing leaves the previous build in place.
    _kill_once_writing(build, outdir, env, 0.0)
    assert len(Recommender.load(outdir)) == 80
    finished = subprocess.run(_command("index", "--update", str(outdir), "--add", str(add), "--json"), env=env,
                              capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout)["n_items"] == 140
    assert not [p for p in outdir.iterdir() if p.name.startswith(PARTIAL_PREFIX)]


# --- a fine-tuned model and its category classifier ----------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("features", ["head", "frozen", MULTI_VIEW_FEATURES])
def test_a_fine_tuned_index_predicts_the_category_its_classifier_gives_on_the_batch_path(
        features, generated_photos, tmp_path, shared_data):
    """The query path computes the classifier's features itself (the head's output, the frozen
    embedding, or that plus the squash and shorter-side views) and must agree with them as the
    batch path computes them."""
    catalog, outside, _ = generated_photos
    catalog = catalog.iloc[:48]
    base = get_backbone(LITE0)
    with data_dirs(shared_data):
        frozen = embed_catalog(catalog, with_runtime(base, "onnx"), QUIET).vectors
        views = [embed_catalog(catalog, with_runtime(view_backbone(base, view), "onnx"), QUIET).vectors
                 for view in HeadConfig().classifier_views]
        config = HeadConfig(hidden_dim=32, out_dim=16, epochs=3, batch_size=16, refit=False)
        fit = fit_head(frozen, catalog["label"].to_numpy(), config, losses=("norm_softmax",), progress=False)
        inputs = {"head": project(fit.head, frozen), "frozen": frozen,
                  MULTI_VIEW_FEATURES: multi_view_features(frozen, views)}[features]
        classifier = train_classifier(inputs, catalog["label"], features=features, c=1.0)
        model = save_model(head_payload(fit, base, config, "fingerprint", len(catalog), classifier),
                           tmp_path / "head.pt")
        recommender = Recommender.build(tmp_path / "index", catalog, f"{LITE0}+head:{model}", settings=QUIET)
        queries = pd.DataFrame({"id": outside, "path": outside, "label": "?"})
        query_frozen = embed_catalog(queries, with_runtime(base, "onnx"), QUIET).vectors
        query_views = [embed_catalog(queries, with_runtime(view_backbone(base, view), "onnx"), QUIET).vectors
                       for view in HeadConfig().classifier_views]
    batch_inputs = {"head": project(fit.head, query_frozen), "frozen": query_frozen,
                    MULTI_VIEW_FEATURES: multi_view_features(query_frozen, query_views)}[features]
    expected = classifier.predict_proba(batch_inputs)
    assert recommender.has_classifier and recommender.describe()["classifier"]
    for position, photo in enumerate(outside):
        answer = recommender.recommend(photo, k=5)
        assert answer.predicted_category == classifier.categories[int(np.argmax(expected[position]))]
        assert answer.category_probability == pytest.approx(expected[position].max(), abs=1e-4)
        assert "classify" in answer.timing_ms and answer.to_dict()["predicted_category"] == answer.predicted_category
        _assert_k_sorted(answer, 5)
    again = Recommender.load(tmp_path / "index")   # from the folder alone
    assert again.recommend(outside[-1], k=5).predicted_category == answer.predicted_category
