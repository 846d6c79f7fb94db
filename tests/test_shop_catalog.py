"""A shop's catalog as it keeps it: its own columns, attributes to filter by, unlabelled new
arrivals, duplicates, readable index folders and numbers that explain themselves.

The scenario: ``products.csv`` with columns ``sku,file,type,colour`` indexes without editing;
``--filter colour=...`` returns k items all of that colour; 40 unlabelled photos are added with
predicted categories (exit 0) and, to an index without a classifier, refused (non-zero); an
``--add`` that adds nothing exits non-zero with its ledger in a file. On generated photos and on
the clothing photos (skipped when absent).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from fashionrec import Recommender
from fashionrec.cli import main
from fashionrec.data.attributes import filter_mask, parse_filter
from fashionrec.data.catalog import load_additions, load_dataset, parse_columns
from fashionrec.data.images import TINY_IMAGE_SIDE, check_box, crop_box, tiny_image_warnings
from fashionrec.errors import DatasetError, FashionRecError
from fashionrec.evaluation.duplicates import find_duplicates, leakage, pair_scores
from fashionrec.pipeline.params import resolve_params
from fashionrec.pipeline.plots import result_caption
from fashionrec.pipeline.widgets import recommender_widget
from fashionrec.serving.folder import CURRENT, current_version, new_version
from fashionrec.serving.recommender import Result
from fashionrec.settings import InferenceSettings, StoreSettings

from conftest import (CLOTHING_DIR, GENERATED_CATEGORIES, REPO, small_head_model, write_color_image,
                      write_product_image)

QUIET = InferenceSettings(batch_size=16, workers=0, progress=False)
LITE0 = "efficientnet_lite0"
COLOURS = ("Red", "Blue", "Green", "Black")
COLUMNS = "path=file,label=type,id=sku"


# --- the table and its columns ------------------------------------------------------------------------------------


def _shop_table(root: Path, n: int = 12) -> pd.DataFrame:
    rows = []
    for i in range(n):
        write_color_image(root / "photos" / f"p{i:02d}.jpg", ((40 * i) % 256, 90, 160))
        rows.append({"sku": f"00{i:02d}", "file": f"p{i:02d}.jpg", "type": ("Shirt", "Shoe")[i % 2],
                     "colour": COLOURS[i % 3], "price": 10.0 + 5 * i, "size": 36 + i % 4})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_shops_own_table_loads_with_its_columns_and_typed_attributes(tmp_path, suffix):
    table = _shop_table(tmp_path)
    path = tmp_path / f"products{suffix}"
    table.to_csv(path, index=False) if suffix == ".csv" else table.to_parquet(path)
    loaded = load_dataset("catalog", path, columns=COLUMNS, image_root=tmp_path / "photos", progress=False)
    catalog = loaded.catalog
    assert catalog["id"].tolist() == table["sku"].tolist()   # leading zeros kept: ids are text
    assert catalog["label"].tolist() == table["type"].tolist()
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in catalog["path"])
    assert list(catalog.columns) == ["id", "path", "label", "colour", "price", "size"]
    assert pd.api.types.is_float_dtype(catalog["price"]) and pd.api.types.is_integer_dtype(catalog["size"])
    assert not loaded.skipped


def test_paths_start_from_the_tables_folder_without_an_image_root(tmp_path):
    table = _shop_table(tmp_path).assign(file=lambda t: "photos/" + t["file"])
    table.to_csv(tmp_path / "products.csv", index=False)
    loaded = load_dataset("catalog", tmp_path / "products.csv", columns=COLUMNS, progress=False)
    assert len(loaded.catalog) == len(table) and not loaded.skipped


def test_a_missing_mapped_column_or_an_unreadable_file_is_one_line_naming_it(tmp_path):
    _shop_table(tmp_path).to_csv(tmp_path / "products.csv", index=False)
    with pytest.raises(DatasetError) as missing:
        load_dataset("catalog", tmp_path / "products.csv", columns="path=file,label=category,id=sku",
                     image_root=tmp_path / "photos", progress=False)
    assert "products.csv: missing column 'category' (--columns label=category)" in str(missing.value)
    assert "\n" not in str(missing.value)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=r"broken.parquet: cannot be read as a catalog table") as unreadable:
        load_dataset("catalog", tmp_path / "broken.parquet", columns=COLUMNS, progress=False)
    assert "\n" not in str(unreadable.value)
    with pytest.raises(DatasetError, match="unknown role 'colour'"):
        parse_columns("path=file,colour=colour")
    with pytest.raises(DatasetError, match="--columns and --image-root go with --dataset catalog"):
        load_dataset("folder", tmp_path, columns=COLUMNS)


def test_cli_build_refuses_a_catalog_with_another_dataset_in_one_line(tmp_path, capsys):
    _shop_table(tmp_path).to_csv(tmp_path / "products.csv", index=False)
    assert main(["index", "--catalog", str(tmp_path / "products.csv"), "--dataset", "clothing", "--columns", COLUMNS,
                 "--backbone", "colorhist", "--out", str(tmp_path / "idx")]) == 2
    assert capsys.readouterr().err.strip() == "error: --catalog is --dataset catalog; it does not go with --dataset clothing"


def test_embed_and_parameter_files_take_the_same_table_and_columns(tmp_path, capsys):
    _shop_table(tmp_path).to_csv(tmp_path / "products.csv", index=False)
    assert main(["embed", "--catalog", str(tmp_path / "products.csv"), "--columns", COLUMNS, "--image-root",
                 str(tmp_path / "photos"), "--backbone", "colorhist", "--out", str(tmp_path / "emb"), "--quiet",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_images"] == 12
    resolved = resolve_params({"catalog": str(tmp_path / "products.csv"), "columns": COLUMNS,
                               "image_root": str(tmp_path / "photos")}, tmp_path / "shop.yaml")
    assert (resolved["dataset"], resolved["data_dir"]) == ("catalog", str(tmp_path / "products.csv"))
    assert resolved["columns"] == COLUMNS and resolved["image_root"] == str(tmp_path / "photos")
    with pytest.raises(FashionRecError, match="unknown role 'type'"):
        resolve_params({"catalog": str(tmp_path / "products.csv"), "columns": "type=label"}, tmp_path / "shop.yaml")
    with pytest.raises(FashionRecError, match="not 'clothing'"):
        resolve_params({"catalog": str(tmp_path / "products.csv"), "dataset": "clothing"}, tmp_path / "shop.yaml")


# --- filters ------------------------------------------------------------------------------------------------------


def test_filters_take_equality_any_of_and_numeric_ranges(tmp_path):
    table = _shop_table(tmp_path).rename(columns={"sku": "id"})
    columns = ["colour", "price", "size"]
    assert filter_mask(table, ["colour=Red"], columns).tolist() == (table["colour"] == "Red").tolist()
    assert filter_mask(table, ["colour=red, blue"], columns).tolist() == table["colour"].isin(["Red", "Blue"]).tolist()
    assert filter_mask(table, ["price=20..40"], columns).tolist() == table["price"].between(20, 40).tolist()
    assert filter_mask(table, ["price=..20", "colour=Red"], columns).tolist() == \
        ((table["price"] <= 20) & (table["colour"] == "Red")).tolist()
    assert filter_mask(table, {"size": [36, 37]}, columns).tolist() == table["size"].isin([36, 37]).tolist()
    assert filter_mask(table, {"price": (None, 15)}, columns).sum() == 2
    assert filter_mask(table, [], columns) is None
    for text, message in (("colour=Purple", "no item has colour Purple; it holds: Blue, Green, Red"),
                          ("colr=Red", "no attribute 'colr' (did you mean 'colour'?)"),
                          ("colour=1..5", "'colour' holds text, not numbers"),
                          ("price=50..10", "the range is empty"), ("price=cheap", "'cheap' is not a number"),
                          ("colour", "write column=value")):
        with pytest.raises(FashionRecError, match=re.escape(message)):
            filter_mask(table, [text], columns)
    assert str(parse_filter("price=10..")) == "price=10.."


# --- duplicates ---------------------------------------------------------------------------------------------------


def test_duplicates_group_exact_by_digest_and_near_by_similarity_transitively():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, 64)).astype(np.float32)
    digests = [f"d{i}" for i in range(300)]
    digests[7] = digests[3]                                     # the same file twice
    vectors[7] = vectors[3]
    vectors[11] = vectors[10] + 0.01 * rng.normal(size=64)      # near: 10 ~ 11 ~ 12
    vectors[12] = vectors[11] + 0.01 * rng.normal(size=64)
    vectors[250] = vectors[200] * 3.0                            # same direction, another scale
    groups = find_duplicates(vectors, digests, threshold=0.97)
    assert groups.exact == [[3, 7]]
    assert groups.near == [[10, 11, 12], [200, 250]]
    scores = pair_scores(groups.near, [(10, 11), (11, 12), (200, 250)])
    assert scores["recall"] == 1.0 and scores["precision"] == pytest.approx(3 / 4)   # 10-12 is implied too
    found = leakage(vectors[[10, 20]], vectors[[12, 30, 40]], [1.0, 0.25], threshold=0.97)
    assert found["near_duplicate_queries"] == 1 and found["precision_at_k_without_near_duplicates"] == 0.25


# --- readable by another user -------------------------------------------------------------------------------------


def test_an_index_folder_built_under_umask_022_is_readable_by_another_user():
    base = Path(tempfile.mkdtemp(prefix="fashionrec-umask-"))
    previous = os.umask(0o022)
    try:
        base.chmod(0o755)
        outdir = base / "index"
        with new_version(outdir) as staging:
            (staging.path / "build.json").write_text("{}\n")
            np.save(staging.path / "embeddings.npy", np.zeros((2, 3), np.float16))
        version = current_version(outdir)
        for path in (outdir, version, outdir / CURRENT, version / "build.json", version / "embeddings.npy"):
            mode = path.stat().st_mode
            assert mode & stat.S_IROTH and mode & stat.S_IRGRP, f"{path}: {stat.filemode(mode)}"
            if path.is_dir():
                assert mode & stat.S_IXOTH, f"{path}: {stat.filemode(mode)}"
        if os.geteuid() == 0:   # a second uid can be had: read the folder as nobody
            read = subprocess.run(["cat", str(outdir / CURRENT), str(version / "build.json")], user=65534,
                                  capture_output=True, text=True)
            assert read.returncode == 0, read.stderr
            assert read.stdout.startswith(version.name)
    finally:
        os.umask(previous)
        shutil.rmtree(base, ignore_errors=True)


# --- the photo: box, tiny, bomb -----------------------------------------------------------------------------------


def test_a_box_crops_the_photo_and_a_tiny_photo_or_box_is_warned_about():
    photo = np.zeros((100, 80, 3), np.uint8)
    assert crop_box(photo, check_box("10,20,30,40")).shape == (40, 30, 3)
    assert crop_box(photo, check_box((60, 90, 50, 50))).shape == (10, 20, 3)    # cut at the edges
    assert crop_box(Image.fromarray(photo), (0, 0, 5, 6)).size == (5, 6)
    assert tiny_image_warnings(photo) == []
    assert "under 32 on a side" in tiny_image_warnings(np.zeros((1, 1, 3), np.uint8))[0]
    assert tiny_image_warnings(crop_box(photo, (0, 0, TINY_IMAGE_SIDE - 1, 50)), box=(0, 0, 31, 50))[0].startswith(
        "the box is 31x50")
    for bad in ("1,2,3", "a,b,c,d", "-1,0,5,5", "0,0,0,5", "1.5,0,4,4"):
        with pytest.raises(FashionRecError, match="box"):
            check_box(bad)
    with pytest.raises(FashionRecError, match="starts outside the 80x100 photo"):
        crop_box(photo, (80, 0, 5, 5))


def test_a_decompression_bomb_is_refused_in_one_line_without_pillows_warning(tmp_path):
    Image.new("1", (12000, 12000)).save(tmp_path / "huge.png")   # 144 megapixels, a small file
    finished = subprocess.run([sys.executable, "-m", "fashionrec", "recommend", "--index-dir", str(tmp_path / "none"),
                               "--image", str(tmp_path / "huge.png")], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO / "lib")}, timeout=300)
    assert finished.returncode == 2
    assert finished.stderr.splitlines() == [f"error: --image {tmp_path / 'huge.png'}: decompression bomb: 12000x12000 "
                                            "pixels exceeds limit of 64000000"]


# --- filters inside the search: k results while k items match (FAISS HNSW, FAISS Flat, Milvus) ----------------------


@pytest.mark.parametrize("store, index", [("faiss", "Flat"), ("faiss", "HNSW32"), ("milvus", "Flat")])
def test_a_filter_applies_inside_the_search_so_k_results_come_back(tmp_path, store, index):
    rows = []
    for i in range(120):
        path = write_product_image(tmp_path / "photos" / f"item-{i:03d}.jpg", seed=i, category=i % 4)
        rows.append({"id": f"sku-{i:03d}", "path": str(path), "label": GENERATED_CATEGORIES[i % 4],
                     "colour": COLOURS[i % 4], "price": float(i)})
    catalog = pd.DataFrame(rows)
    settings = StoreSettings(store, str(tmp_path / "milvus.db") if store == "milvus" else None)
    with Recommender.build(tmp_path / "index", catalog, "colorhist", index=index, settings=QUIET,
                           store=settings) as built:
        built.close()
    with Recommender.load(tmp_path / "index", QUIET) as recommender:
        query = str(write_product_image(tmp_path / "query.jpg", seed=999, category=1))
        # Blue items are the category-1 shapes; ask for Black ones (another shape) so that the
        # unfiltered neighbours are nearly all filtered out.
        answer = recommender.recommend(query, k=12, filters=["colour=Black"])
        assert len(answer.results) == 12
        assert {result.attributes["colour"] for result in answer.results} == {"Black"}
        ranged = recommender.recommend(query, k=10, filters={"price": (20, 39)}, category=GENERATED_CATEGORIES[0])
        assert len(ranged.results) == 5 and all(20 <= r.attributes["price"] <= 39 for r in ranged.results)
        more = recommender.similar_to("sku-001", k=8, filters=["colour=Black,Red"])
        assert len(more.results) == 8 and {r.attributes["colour"] for r in more.results} <= {"Black", "Red"}
        assert recommender.describe()["attributes"] == {"colour": "text", "price": "number"}


# --- the whole scenario -------------------------------------------------------------------------------------------


def _generated_photos(root: Path) -> tuple[list[tuple[Path, str]], list[Path]]:
    """96 catalog photos (4 categories) and 40 new arrivals of the same categories."""
    catalog = [(write_product_image(root / "shop" / "photos" / f"p{i:03d}.jpg", seed=i, category=i % 4),
                GENERATED_CATEGORIES[i % 4]) for i in range(96)]
    arrivals = [write_product_image(root / "new-arrivals" / f"new-{j:02d}.jpg", seed=5000 + j, category=j % 4)
                for j in range(40)]
    return catalog, arrivals


def _clothing_photos(root: Path) -> tuple[list[tuple[Path, str]], list[Path]]:
    if not (CLOTHING_DIR / "images.csv").exists():
        pytest.skip(f"clothing photos not found at {CLOTHING_DIR}")
    table = pd.read_csv(CLOTHING_DIR / "images.csv")
    table = table[table["label"].isin(["T-Shirt", "Shoes", "Pants", "Dress"])].sample(n=136, random_state=0)
    photos = [CLOTHING_DIR / "images" / f"{image}.jpg" for image in table["image"]]
    catalog = []
    for path, label in zip(photos[:96], table["label"].iloc[:96]):
        target = root / "shop" / "photos" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
        catalog.append((target, label))
    arrivals = []
    for path in photos[96:]:
        target = root / "new-arrivals" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
        arrivals.append(target)
    return catalog, arrivals


@pytest.mark.integration
@pytest.mark.parametrize("source", ["generated", "clothing"])
def test_a_shops_catalog_from_its_csv_to_filtered_results_and_unlabelled_arrivals(source, tmp_path, capsys):
    catalog_photos, arrivals = (_generated_photos if source == "generated" else _clothing_photos)(tmp_path)
    shop = tmp_path / "shop"
    rng = np.random.default_rng(0)
    # Two duplicates planted as shops make them: the same file under a second SKU, and the same
    # photo at 95% of its size saved as PNG (benchmarks/duplicates.py plants harder near copies).
    shutil.copyfile(catalog_photos[5][0], shop / "photos" / "copy.jpg")
    with Image.open(catalog_photos[9][0]) as original:
        original.convert("RGB").resize((original.width * 95 // 100, original.height * 95 // 100)) \
            .save(shop / "photos" / "near-copy.png")
    catalog_photos = [*catalog_photos, (shop / "photos" / "copy.jpg", catalog_photos[5][1]),
                      (shop / "photos" / "near-copy.png", catalog_photos[9][1])]
    products = pd.DataFrame({"sku": [f"SKU-{i:04d}" for i in range(len(catalog_photos))],
                             "file": [f"photos/{path.name}" for path, _ in catalog_photos],
                             "type": [label for _, label in catalog_photos],
                             "colour": rng.choice(COLOURS, size=len(catalog_photos))})
    exact_copy, near_copy = products["sku"].iloc[-2], products["sku"].iloc[-1]
    products.to_csv(shop / "products.csv", index=False)
    index_dir, plain_dir = tmp_path / "index", tmp_path / "plain"

    # products.csv indexes as the shop keeps it, with a model whose classifier can label new arrivals.
    loaded = pd.DataFrame({"id": products["sku"], "path": [str(p) for p, _ in catalog_photos],
                           "label": products["type"]})
    backbone = small_head_model(loaded, tmp_path / "head.pt")
    build = ["index", "--catalog", str(shop / "products.csv"), "--columns", COLUMNS, "--quiet", "--json"]
    assert main([*build, "--backbone", backbone, "--out", str(index_dir)]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["n_items"] == len(products) and built["n_skipped"] == 0

    # --filter colour=... gives k results, every one of that colour, with its attributes.
    colour = products["colour"].value_counts().idxmin()   # the rarest colour: the filter has work to do
    k = min(8, int((products["colour"] == colour).sum()))
    query = str(catalog_photos[0][0])
    assert main(["recommend", "--index-dir", str(index_dir), "--image", query, "--k", str(k),
                 "--filter", f"colour={colour}", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert len(answer["results"]) == k
    assert {result["attributes"]["colour"] for result in answer["results"]} == {colour}
    expected = products.set_index("sku")["colour"]
    assert all(expected[result["id"]] == colour for result in answer["results"])

    # 40 unlabelled new arrivals: refused by an index without a classifier, before anything is embedded...
    assert main([*build, "--backbone", LITE0, "--out", str(plain_dir)]) == 0
    capsys.readouterr()
    before = (plain_dir / CURRENT).read_text()
    assert main(["index", "--update", str(plain_dir), "--add", str(tmp_path / "new-arrivals"), "--quiet"]) == 2
    refused = capsys.readouterr()
    assert refused.err.count("\n") == 1 and "40 image(s) to add have no label" in refused.err
    assert "no category classifier" in refused.err and (plain_dir / CURRENT).read_text() == before

    # The planted duplicates are found (on the backbone's own embeddings), and evaluate explains its numbers.
    assert main(["duplicates", "--index-dir", str(plain_dir), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert ["SKU-0005", exact_copy] in found["exact"] and found["threshold"] == 0.97
    assert any({"SKU-0009", near_copy} <= set(group) for group in found["near"])
    assert main(["evaluate", "--catalog", str(shop / "products.csv"), "--columns", COLUMNS, "--backbone", LITE0,
                 "--k", "5", "--quiet", "--json", "--relevance", "label,colour"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["relevance_rule"] == "same label and same colour (a row missing a value is never relevant)"
    assert evaluated["share_of_catalog"] == pytest.approx((evaluated["n_queries"] + evaluated["n_gallery"])
                                                          / len(products), abs=1e-4)
    assert evaluated["near_duplicate_queries"] >= 0 and "precision_at_k_without_near_duplicates" in evaluated

    # ...and labelled by the classifier of one that has one, marked as predicted with their probability.
    assert main(["index", "--update", str(index_dir), "--add", str(tmp_path / "new-arrivals"), "--quiet",
                 "--json"]) == 0
    update = json.loads(capsys.readouterr().out)
    assert len(update["added"]) == 40 and update["saved"] and not update["failed"]
    assert len(update["predicted"]) == 40
    categories = set(products["type"])
    assert all(entry["label"] in categories and 0 < entry["probability"] <= 1 for entry in update["predicted"])
    with Recommender.load(index_dir, QUIET) as recommender:
        assert len(recommender) == len(products) + 40
        arrival = recommender.item(update["predicted"][0]["id"])
        assert arrival.label == update["predicted"][0]["label"]
        assert arrival.label_probability == pytest.approx(update["predicted"][0]["probability"], abs=1e-4)
        assert recommender.item("SKU-0001").label_probability is None
        assert recommender.item("SKU-0001").attributes == {"colour": products["colour"].iloc[1]}

    # An --add that adds nothing fails: one summary line, the ledger in a file, nothing written.
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "size-chart.jpg").write_text("S 36-38, M 40-42\n")
    ledger = tmp_path / "ledger.json"
    version = (index_dir / CURRENT).read_text()
    assert main(["index", "--update", str(index_dir), "--add", str(nothing), "--quiet", "--ledger", str(ledger)]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("update failed, nothing written")
    assert "added nothing" in out and f"ledger: {ledger}" in out
    assert [entry["path"] for entry in json.loads(ledger.read_text())["skipped"]] == ["size-chart.jpg"]
    assert (index_dir / CURRENT).read_text() == version


def test_an_add_table_carries_attributes_and_a_share_of_bad_files_decides_the_exit(tmp_path, capsys):
    table = _shop_table(tmp_path)
    table.iloc[:8].to_csv(tmp_path / "products.csv", index=False)
    assert main(["index", "--catalog", str(tmp_path / "products.csv"), "--columns", COLUMNS, "--image-root",
                 str(tmp_path / "photos"), "--backbone", "colorhist", "--out", str(tmp_path / "idx"), "--quiet"]) == 0
    (tmp_path / "photos" / "broken.jpg").write_text("not a photo")
    more = pd.concat([table.iloc[8:], pd.DataFrame([{"sku": "0099", "file": "broken.jpg", "type": "Shirt",
                                                     "colour": "Red", "price": 1.0, "size": 40}])])
    more.to_csv(tmp_path / "more.csv", index=False)
    update = ["index", "--update", str(tmp_path / "idx"), "--add", str(tmp_path / "more.csv"), "--columns", COLUMNS,
              "--image-root", str(tmp_path / "photos"), "--quiet", "--ledger", str(tmp_path / "ledger.json")]
    assert main(update) == 1   # 1 of 5 files left out: more than the default share, 0
    assert "left out 1 of 5 files (20%), more than --max-skipped-fraction 0" in capsys.readouterr().out
    assert main([*update, "--max-skipped-fraction", "0.2"]) == 0
    capsys.readouterr()
    with Recommender.load(tmp_path / "idx", QUIET) as recommender:
        assert len(recommender) == 12
        assert recommender.item("0010").attributes == {"colour": "Blue", "price": 60.0, "size": 38}
        answer = recommender.similar_to("0010", k=3, filters=["size=38..40", "colour=Green"])
        assert sorted(r.id for r in answer.results) == ["0002", "0011"]   # all there are; 0010 itself is Blue
    additions = load_additions(tmp_path / "photos")   # a flat folder: every photo unlabelled
    assert additions.catalog["label"].isna().all() and len(additions.catalog) == 12


# --- the app: filters, attributes in captions, a box with its preview ---------------------------------------------


def test_the_app_filters_by_attribute_shows_attributes_and_crops_to_a_box(tmp_path, monkeypatch):
    rows = []
    for i in range(48):
        path = write_product_image(tmp_path / "photos" / f"item-{i:03d}.jpg", seed=i, category=i % 4)
        rows.append({"id": f"sku-{i:03d}", "path": str(path), "label": GENERATED_CATEGORIES[i % 4],
                     "colour": COLOURS[i % 3], "price": float(i)})
    Recommender.build(tmp_path / "index", pd.DataFrame(rows), "colorhist", settings=QUIET).close()
    photo = write_product_image(tmp_path / "query.jpg", seed=77, category=2).read_bytes()
    monkeypatch.setenv("FASHIONREC_INDEX_DIR", str(tmp_path / "index"))
    at = AppTest.from_file(str(REPO / "app" / "streamlit_app.py"), default_timeout=300).run()
    at.multiselect(key="filter-colour").select("Green").run()
    at.file_uploader(key="upload").upload("query.jpg", photo, "image/jpeg").run()
    assert not at.exception
    captions = [caption for image in at.image for caption in image.captions if caption.split(".")[0].isdigit()]
    assert len(captions) == 8 and all("colour Green" in caption and "price" in caption for caption in captions)
    for key, value in (("box-x", 10), ("box-y", 10), ("box-w", 20), ("box-h", 20)):
        at.number_input(key=key).set_value(value)
    at.run()
    assert not at.exception
    assert any("the box is 20x20 pixels" in warning.value for warning in at.warning)
    assert any("searching inside 20x20 at (10, 10)" in caption for image in at.image for caption in image.captions)


def test_the_notebook_widget_and_grids_show_attributes_and_predicted_labels(tmp_path, capsys):
    predicted = Result("a", "a.jpg", "Dress", 0.91234, {"colour": "Red", "price": 49.5, "size": None}, 0.876)
    assert result_caption(predicted) == "Dress? (88%)\n0.912\ncolour Red\nprice 49.5"
    assert result_caption(Result("b", "b.jpg", "Shoes", 0.5)) == "Shoes\n0.500"
    rows = [{"id": f"sku-{i:02d}", "path": str(write_product_image(tmp_path / f"p{i:02d}.jpg", seed=i, category=i % 4)),
             "label": GENERATED_CATEGORIES[i % 4], "colour": COLOURS[i % 3]} for i in range(24)]
    with Recommender.build(tmp_path / "index", pd.DataFrame(rows), "colorhist", settings=QUIET) as recommender:
        widget = recommender_widget(recommender, k=4)
        pick, filters = widget.children[0].children[1], widget.children[2]
        assert "colour" in filters.placeholder
        filters.value = "colour=Purple"
        pick.value = pick.options[1][1]
        assert "no item has colour Purple" in capsys.readouterr().out
        filters.value = "colour=Green"
        assert "ms" in capsys.readouterr().out
