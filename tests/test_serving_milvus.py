"""Index folders whose vectors live in Milvus (Lite, a file under tmp_path): the same answers as FAISS, through
updates, with immutable versions; ``index``/``recommend``/the app take ``--store``/``--milvus-uri``.

Every Recommender and store is closed by the test that opened it, which frees the Lite file.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from fashionrec import Recommender
from fashionrec.cli import main
from fashionrec.data.catalog import load_folder
from fashionrec.errors import IndexFolderError
from fashionrec.indexing.measure import compare_rankings
from fashionrec.indexing.milvus_store import MilvusStore, list_collections
from fashionrec.settings import InferenceSettings, StoreSettings

from conftest import REPO

QUIET = InferenceSettings(batch_size=16, workers=0, progress=False)


@pytest.fixture
def both_indexes(color_folder, tmp_path):
    """The colour catalog indexed twice with colorhist: in index.faiss and in a Milvus Lite collection."""
    catalog = load_folder(color_folder, progress=False).catalog
    uri = str(tmp_path / "milvus.db")
    Recommender.build(tmp_path / "faiss", catalog, "colorhist", settings=QUIET).close()
    Recommender.build(tmp_path / "milvus", catalog, "colorhist", settings=QUIET,
                      store=StoreSettings("milvus", uri)).close()
    return tmp_path / "faiss", tmp_path / "milvus", uri, catalog


def _ids(answer) -> list[str]:
    return [item.id for item in answer.results]


def _assert_agree(answer, expected) -> None:
    """Identical lists, up to items whose scores tie (solid-colour photos have near-equal histograms)."""
    agreement = compare_rankings(np.array([_ids(answer)]), np.array([[r.score for r in answer.results]]),
                                 np.array([_ids(expected)]), np.array([[r.score for r in expected.results]]))
    assert agreement["other_rows"] == 0 and agreement["max_score_difference"] < 1e-5, agreement


def _same_answers(faiss_recommender, milvus_recommender, ids, **options) -> None:
    for item_id in ids:
        _assert_agree(milvus_recommender.similar_to(item_id, **options),
                      faiss_recommender.similar_to(item_id, **options))


def test_a_milvus_folder_answers_as_the_faiss_one_before_and_after_updates(both_indexes, color_folder):
    faiss_dir, milvus_dir, _, catalog = both_indexes
    ids = catalog["id"].tolist()
    photo = color_folder / "green" / "green-03.jpg"
    with Recommender.load(faiss_dir, QUIET) as expected, Recommender.load(milvus_dir, QUIET) as served:
        assert served.describe()["store"] == "milvus" and expected.describe()["store"] == "faiss"
        _same_answers(expected, served, ids, k=8)
        _same_answers(expected, served, ids[:6], k=5, category="blue", exclude_ids=[ids[-1]])
        _assert_agree(served.recommend(photo, k=7), expected.recommend(photo, k=7))
        for recommender in (expected, served):
            recommender.remove(ids[2:6])
            recommender.add([photo], ["green"], ids=["a-new-green"])
            recommender.save()
    with Recommender.load(faiss_dir, QUIET) as expected, Recommender.load(milvus_dir, QUIET) as served:
        assert len(served) == len(expected) == 27
        assert served.describe()["tombstones"] == 4   # Milvus cannot renumber rows: removed ones are tombstones
        _same_answers(expected, served, [*ids[6:], "a-new-green"], k=10)


def test_each_version_keeps_its_own_collection_and_removed_versions_take_theirs_along(both_indexes):
    _, milvus_dir, uri, catalog = both_indexes
    collections = []
    with Recommender.load(milvus_dir, QUIET) as recommender:
        collections.append(recommender.info["index"]["collection"])
        recommender.remove(catalog["id"].iloc[:3])
        recommender.save()                       # v2: tombstones only, the same rows: v1's collection serves it
        collections.append(recommender.info["index"]["collection"])
        assert recommender.compact()
        recommender.save()                       # v3: a new collection without the removed rows
        collections.append(recommender.info["index"]["collection"])
    assert collections[0] == collections[1] != collections[2]
    assert sorted(list_collections(uri)) == sorted({collections[1], collections[2]})   # v1 is gone, v2 kept
    with MilvusStore.open(uri, collections[1]) as previous, MilvusStore.open(uri, collections[2]) as current:
        assert (previous.count(), current.count()) == (30, 27)   # the kept version still reads what it held


def test_index_and_recommend_take_the_store_on_the_command_line(color_folder, tmp_path, capsys):
    uri, outdir = str(tmp_path / "cli.db"), tmp_path / "index"
    code = main(["index", "--dataset", "folder", "--data-dir", str(color_folder), "--backbone", "colorhist",
                 "--index", "HNSW32", "--out", str(outdir), "--store", "milvus", "--milvus-uri", uri,
                 "--json", "--quiet", "--workers", "0"])
    built = json.loads(capsys.readouterr().out)
    assert code == 0 and built["index"]["store"] == "milvus" and built["index"]["index_type"] == "HNSW"
    assert built["index"]["uri"] == uri and built["n_items"] == 30
    code = main(["recommend", "--index-dir", str(outdir), "--id", "red/red-01.jpg", "--k", "3", "--json"])
    answer = json.loads(capsys.readouterr().out)
    assert code == 0 and answer["results"][0]["id"] == "red/red-01.jpg"
    assert {result["label"] for result in answer["results"]} == {"red"}
    assert main(["recommend", "--index-dir", str(outdir), "--id", "red/red-01.jpg", "--store", "faiss"]) == 2
    assert "its vectors are indexed in milvus, not faiss" in capsys.readouterr().err
    code = main(["index", "--dataset", "folder", "--data-dir", str(tmp_path / "no-such-dir"), "--backbone",
                 "colorhist", "--index", "IVF{nlist},PQ{m}", "--out", str(tmp_path / "other"), "--store", "milvus",
                 "--milvus-uri", uri])
    assert code == 2 and "has no Milvus counterpart" in capsys.readouterr().err   # before the data is read
    assert not (tmp_path / "other").exists()


def test_the_app_serves_a_milvus_folder(both_indexes, color_folder, monkeypatch):
    _, milvus_dir, uri, _ = both_indexes
    monkeypatch.setenv("FASHIONREC_INDEX_DIR", str(milvus_dir))
    monkeypatch.setattr("sys.argv", ["streamlit_app.py", "--store", "milvus", "--milvus-uri", uri])
    at = AppTest.from_file(str(REPO / "app" / "streamlit_app.py"), default_timeout=300).run()
    photo = color_folder / "blue" / "blue-02.jpg"
    at.slider(key="k").set_value(4)
    at.file_uploader(key="upload").upload(photo.name, photo.read_bytes(), "image/jpeg").run()
    assert not at.exception and not at.error
    captions = [caption for image in at.image for caption in image.captions if caption[:1].isdigit()]
    assert len(captions) == 4 and all(" · " in caption and "blue" in caption for caption in captions)
    st.cache_resource.clear()   # releases the cached Recommender (on_release closes it), freeing the Lite file
    assert list_collections(uri)   # the file opens again: nothing holds it


def test_a_faiss_folder_asked_for_milvus_says_how_to_get_one(both_indexes):
    faiss_dir, _, uri, _ = both_indexes
    with pytest.raises(IndexFolderError, match="indexed in faiss, not milvus"):
        Recommender.load(faiss_dir, QUIET, store=StoreSettings("milvus", uri))
