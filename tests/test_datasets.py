from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fashionrec import config
from fashionrec.data.catalog import (FASHION_MNIST_CLASSES, apply_category_map, load_catalog_csv, load_clothing,
                                     load_dataset, load_fashion_mnist, load_folder)
from fashionrec.data.split import split_catalog, split_counts, subsample
from fashionrec.errors import DatasetError

from conftest import write_color_image


def _catalog(counts: dict) -> pd.DataFrame:
    rows = [{"id": f"{label}-{i}", "path": f"/x/{label}-{i}.jpg", "label": label}
            for label, n in counts.items() for i in range(n)]
    return pd.DataFrame(rows)


def test_split_is_stratified_60_20_20_and_deterministic():
    catalog = _catalog({"a": 100, "b": 50, "c": 10})
    first, too_small = split_catalog(catalog, seed=0)
    again, _ = split_catalog(catalog, seed=0)
    other, _ = split_catalog(catalog, seed=1)
    assert too_small == []
    assert first["split"].tolist() == again["split"].tolist()
    assert first["split"].tolist() != other["split"].tolist()
    counts = split_counts(first)
    assert counts.loc["a", ["train", "gallery", "query"]].tolist() == [60, 20, 20]
    assert counts.loc["b", ["train", "gallery", "query"]].tolist() == [30, 10, 10]
    assert counts.loc["c", ["train", "gallery", "query"]].tolist() == [6, 2, 2]
    assert counts.loc["total", "total"] == 160


def test_split_of_a_category_does_not_depend_on_the_others():
    alone, _ = split_catalog(_catalog({"a": 40}), seed=3)
    together, _ = split_catalog(_catalog({"a": 40, "b": 25}), seed=3)
    assert alone["split"].tolist() == together[together["label"] == "a"]["split"].tolist()


def test_split_reports_categories_too_small_instead_of_crashing():
    catalog = _catalog({"big": 20, "pair": 2, "three": 3})
    split, too_small = split_catalog(catalog, seed=0)
    assert [entry["label"] for entry in too_small] == ["pair"]
    assert too_small[0]["n_images"] == 2
    three = split[split["label"] == "three"]["split"]
    assert sorted(three) == ["gallery", "query", "train"]
    assert "pair" not in set(split["label"])


def test_subsample_caps_each_category_reproducibly_keeping_order():
    catalog = _catalog({"a": 30, "b": 5})
    sample = subsample(catalog, 10, seed=0)
    assert sample["label"].value_counts().to_dict() == {"a": 10, "b": 5}
    assert sample["id"].tolist() == subsample(catalog, 10, seed=0)["id"].tolist()
    positions = catalog.reset_index().set_index("id").loc[sample["id"], "index"].to_numpy()
    assert np.all(np.diff(positions) > 0)


def test_category_map_merges_renames_and_drops():
    catalog = _catalog({"Hoodie": 2, "Longsleeve": 3, "Hat": 1, "Skip": 2})
    mapped = apply_category_map(catalog, {"Hoodie": "Tops", "Longsleeve": "Tops", "Skip": None})
    assert mapped["label"].value_counts().to_dict() == {"Tops": 5, "Hat": 1}


def test_folder_loader_reports_every_bad_file(color_folder):
    (color_folder / "red" / "notes.jpg").write_text("<html>not a photo</html>")
    (color_folder / "red" / "empty.png").write_bytes(b"")
    (color_folder / "blue" / "album.jpg").mkdir()
    (color_folder / "blue" / "gone.jpg").symlink_to(color_folder / "nowhere.jpg")
    (color_folder / "green" / ".DS_Store").write_bytes(b"\0\0")
    write_color_image(color_folder / "green" / "nested" / "deep é.jpg", (30, 200, 40))
    loaded = load_folder(color_folder, progress=False)
    assert loaded.counts().to_dict() == {"blue": 10, "green": 11, "red": 10}
    reasons = {entry["path"]: entry["reason"] for entry in loaded.skipped}
    assert set(reasons) == {"red/notes.jpg", "red/empty.png", "blue/album.jpg", "blue/gone.jpg"}
    assert "empty" in reasons["red/empty.png"]
    assert "symlink" in reasons["blue/gone.jpg"]
    assert "director" in reasons["blue/album.jpg"]
    assert "green/nested/deep é.jpg" in set(loaded.catalog["id"])


def test_catalog_loader_reports_missing_labels_duplicate_ids_and_absent_files(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        write_color_image(tmp_path / "img" / name, (200, 10, 10))
    (tmp_path / "catalog.csv").write_text(
        "id,path,label\n"
        "1,img/a.jpg,Shirt\n"
        "2,img/b.jpg,\n"           # missing label
        "1,img/c.jpg,Shirt\n"      # duplicate id
        "3,img/absent.jpg,Dress\n"  # file not there
        ",img/d.jpg,Dress\n"       # no id: the path serves as id
    )
    loaded = load_catalog_csv(tmp_path, progress=False)
    assert loaded.catalog["id"].tolist() == ["1", "img/d.jpg"]
    reasons = {entry["path"]: entry["reason"] for entry in loaded.skipped}
    assert reasons["img/b.jpg"] == "missing label"
    assert "duplicate id" in reasons["img/c.jpg"]
    assert "not found" in reasons["img/absent.jpg"]


def test_catalog_loader_names_the_file_when_columns_are_missing(tmp_path):
    (tmp_path / "catalog.csv").write_text("file,category\nx.jpg,Shirt\n")
    with pytest.raises(DatasetError, match="catalog.csv: missing columns"):
        load_catalog_csv(tmp_path, progress=False)


def test_unknown_dataset_and_missing_directory_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset("folder", tmp_path / "nope")


def test_clothing_loader_on_the_real_photos(clothing_dir):
    loaded = load_clothing(clothing_dir, progress=False)
    labels = set(loaded.catalog["label"])
    assert len(labels) == 17
    assert not labels & {"Not sure", "Skip", "Other"}
    # The five rows whose file is absent all carry non-category labels in this copy.
    assert len(loaded.catalog) == 5096
    assert loaded.catalog["id"].is_unique


def test_clothing_loader_reports_rows_whose_file_is_absent(tmp_path):
    write_color_image(tmp_path / "images" / "a1.jpg", (200, 10, 10))
    write_color_image(tmp_path / "images" / "b2.jpg", (10, 10, 200))
    (tmp_path / "images.csv").write_text(
        "image,sender_id,label,kids\na1,1,Shirt,False\nb2,1,Skip,False\nc3,2,Dress,False\n")
    loaded = load_clothing(tmp_path, progress=False)
    assert loaded.catalog["id"].tolist() == ["a1"]
    assert loaded.skipped == [{"path": "images/c3.jpg", "reason": "file not found"}]


@pytest.mark.skipif(not (config.FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_loader_samples_and_writes_only_what_it_needs():
    loaded = load_fashion_mnist(max_per_class=5, seed=0, progress=False)
    assert loaded.counts().to_dict() == {name: 5 for name in FASHION_MNIST_CLASSES}
    written = sorted(p.name for p in (config.INTERIM_DIR / "fashion-mnist" / "images").glob("*.png"))
    assert len(written) >= 50
    assert set(loaded.catalog["path"].map(lambda p: p.rsplit("/", 1)[-1])) <= set(written)
