"""``index`` and ``recommend`` on the command line: the contract of their flags, JSON keys and errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from fashionrec.cli import main

from conftest import REPO, data_dirs, link_generated_catalog, session_data_root

TIMING_KEYS = {"decode", "preprocess", "embed", "search", "total"}
RESULT_KEYS = {"id", "path", "label", "score", "attributes", "label_probability"}
QUIET = ["--quiet", "--workers", "0"]


def _run(capsys, *arguments) -> tuple[int, dict | None, str]:
    code = main(list(arguments))
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip().startswith("{") else None, captured.err


@pytest.fixture(scope="module")
def catalog_dir(generated_photos, tmp_path_factory):
    """The first 160 generated photos as an ImageFolder tree."""
    return link_generated_catalog(generated_photos, tmp_path_factory.mktemp("cli-catalog"), 160)


@pytest.fixture(scope="module")
def built(catalog_dir, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("cli-index") / "index"
    with data_dirs(session_data_root(tmp_path_factory)):
        code = main(["index", "--dataset", "folder", "--data-dir", str(catalog_dir), "--backbone", "efficientnet_lite0",
                     "--index", "HNSW32", "--out", str(outdir), "--json", *QUIET])
    assert code == 0
    return outdir


@pytest.mark.integration
def test_index_writes_a_folder_and_reports_it(built, capsys):
    info = json.loads((built / (built / "CURRENT").read_text().strip() / "build.json").read_text())
    assert info["backbone"]["name"] == "efficientnet_lite0" and info["runtime"] == "onnx"
    assert info["index"]["factory"] == "HNSW32" and info["metric"] == "cosine"
    assert info["counts"]["items"] == 160 and info["skipped"] == []
    assert info["dataset"]["name"] == "folder" and len(info["dataset"]["fingerprint"]) == 64
    assert {"torch", "faiss", "onnxruntime", "fashionrec"} <= set(info["versions"])
    assert info["preprocessing"]["query"]["crop"] == [224, 224] and "Resize" in info["preprocessing"]["transform"]
    assert info["query_model"]["check"]["max_relative_difference"] <= 1e-4
    assert sorted(p.name for p in (built / "v000001").iterdir()) == [
        "build.json", "colour.npy", "embeddings.npy", "ids.parquet", "index.faiss", "index.faiss.json", "query.onnx"]
    assert info["colour"]["backbone"] == "product_colour" and info["colour"]["dim"] == 324
    items = pd.read_parquet(built / "v000001" / "ids.parquet")
    assert list(items.columns) == ["id", "path", "label", "digest", "deleted", "label_probability"]


@pytest.mark.integration
def test_recommend_a_photo_from_outside_the_catalog(built, generated_photos, capsys):
    _, outside, _ = generated_photos
    code, record, _ = _run(capsys, "recommend", "--index-dir", str(built), "--image", outside[0], "--k", "5", "--json")
    assert code == 0
    assert {"results", "timing_ms"} <= set(record) and TIMING_KEYS == set(record["timing_ms"])
    assert len(record["results"]) == 5 and all(set(item) == RESULT_KEYS for item in record["results"])
    scores = [item["score"] for item in record["results"]]
    assert scores == sorted(scores, reverse=True)

    code, record, _ = _run(capsys, "recommend", "--index-dir", str(built), "--image", outside[0], "--image",
                           outside[1], "--k", "3", "--category", "box", "--json")
    assert code == 0 and [query["image"] for query in record["queries"]] == outside[:2]
    assert all(len(q["results"]) == 3 and {item["label"] for item in q["results"]} == {"box"}
               for q in record["queries"])


@pytest.mark.integration
def test_more_like_this_returns_the_item_first(built, capsys):
    item_id = "triangle/item-002.jpg"
    code, record, _ = _run(capsys, "recommend", "--index-dir", str(built), "--id", item_id, "--k", "4", "--json")
    assert code == 0 and record["results"][0]["id"] == item_id and len(record["results"]) == 4
    assert record["timing_ms"]["embed"] == 0.0
    code, record, _ = _run(capsys, "recommend", "--index-dir", str(built), "--id", item_id, "--exclude-id", item_id,
                           "--k", "4", "--json")
    assert code == 0 and item_id not in [item["id"] for item in record["results"]]


def test_split_gallery_indexes_only_the_evaluation_gallery(catalog_dir, tmp_path, capsys):
    code, record, _ = _run(capsys, "index", "--dataset", "folder", "--data-dir", str(catalog_dir), "--backbone",
                           "colorhist", "--split", "gallery", "--out", str(tmp_path / "gallery"), "--json", *QUIET)
    assert code == 0 and record["n_items"] == 32   # 20% of each of the 8 categories of 20
    info = json.loads((tmp_path / "gallery" / "v000001" / "build.json").read_text())
    assert info["dataset"]["split"] == "gallery" and info["dataset"]["split_seed"] == 0


def test_a_file_that_is_not_an_image_ends_with_its_name_and_the_reason(tmp_path):
    """In a subprocess, as a user runs it: one line, no traceback, before any index is opened."""
    page = tmp_path / "photo.jpg"
    page.write_text("<!doctype html><html>a web page saved as .jpg</html>")
    result = subprocess.run([sys.executable, "-m", "fashionrec", "recommend", "--index-dir", str(tmp_path / "none"),
                             "--image", str(page), "--k", "5", "--json"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "lib")}, timeout=300)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip() == f"error: --image {page}: not an image (looks like HTML)"


@pytest.mark.parametrize("arguments, message", [
    (["recommend", "--index-dir", "{tmp}/none", "--id", "x"], "no such index folder; build one with"),
    (["recommend", "--index-dir", "{tmp}", "--id", "x", "--k", "0"], "--k must be at least 1"),
    (["index", "--dataset", "folder", "--backbone", "colorhist"], "--out required to build an index"),
    (["index", "--dataset", "folder", "--data-dir", "{tmp}", "--backbone", "colorhist", "--index", "HNSW3x",
      "--out", "{tmp}/out"], "not a faiss factory string"),
    (["index", "--dataset", "folder", "--data-dir", "{tmp}", "--backbone", "nope", "--out", "{tmp}/out"],
     "unknown backbone 'nope'"),
    (["index", "--update", "{tmp}/none", "--remove", "x"], "no such index folder"),
    (["index", "--update", "{tmp}"], "nothing to do"),
    (["app", "--index-dir", "{tmp}/none"], "no such index folder; build one with"),
])
def test_mistakes_are_one_line_errors(arguments, message, tmp_path, capsys):
    code = main([argument.format(tmp=tmp_path) for argument in arguments])
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.integration
def test_index_update_adds_a_csv_and_removes_ids(built, generated_photos, tmp_path, capsys):
    catalog, _, _ = generated_photos
    new = catalog.iloc[160:170]
    csv = tmp_path / "new.csv"
    pd.DataFrame({"path": new["path"], "label": new["label"], "id": new["id"]}).to_csv(csv, index=False)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    with open(csv, "a") as stream:
        stream.write(f"{tmp_path / 'broken.jpg'},box,broken\n")
    copy = tmp_path / "index"
    subprocess.run(["cp", "-a", str(built), str(copy)], check=True)
    code, record, _ = _run(capsys, "index", "--update", str(copy), "--add", str(csv), "--remove", "box/item-001.jpg",
                           "--max-skipped-fraction", "0.1", "--json", *QUIET)
    assert code == 0, record
    assert record["added"] == new["id"].tolist() and record["removed"] == ["box/item-001.jpg"]
    assert [item["path"] for item in record["skipped"]] == ["broken.jpg"]
    assert record["n_items"] == 169 and record["n_tombstones"] == 1 and record["version"] == "v000002"
    code, _, error = _run(capsys, "index", "--update", str(copy), "--remove", "box/item-001.jpg")
    assert code == 2 and "unknown id(s) box/item-001.jpg; nothing was changed" in error
