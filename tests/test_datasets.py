from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fashionrec import config
from fashionrec.data import checks
from fashionrec.data.catalog import (FASHION_MNIST_CLASSES, load_catalog_csv, load_clothing, load_dataset,
                                     load_fashion_mnist, load_folder)
from fashionrec.data.ledger import STAGES
from fashionrec.data.split import split_catalog, split_counts, subsample
from fashionrec.errors import DatasetError

from conftest import REPO, fashion_mnist_available, write_color_image


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


def _folder(root, counts: dict):
    for label, n in counts.items():
        for i in range(n):
            write_color_image(root / label / f"{label}-{i}.jpg", (200, 10 * i, 10))
    return root


def test_category_map_merges_renames_and_drops_before_the_cap(tmp_path):
    root = _folder(tmp_path / "shop", {"Hoodie": 2, "Longsleeve": 3, "Hat": 1, "Skip": 2})
    loaded = load_dataset("folder", root, category_map={"Hoodie": "Tops", "Longsleeve": "Tops", "Skip": None},
                          progress=False)
    assert loaded.counts().to_dict() == {"Tops": 5, "Hat": 1}
    assert [(e["path"], e["stage"], e["reason"]) for e in loaded.skipped] == [
        (f"Skip/Skip-{i}.jpg", "label", "category 'Skip' dropped by the category map") for i in range(2)]
    capped = load_dataset("folder", root, max_per_class=4, category_map={"Hoodie": "Tops", "Longsleeve": "Tops"},
                          progress=False)
    assert capped.counts().to_dict() == {"Hat": 1, "Skip": 2, "Tops": 4}
    assert capped.n_not_sampled == 1


def test_a_category_map_entry_matching_no_label_is_an_error_naming_close_matches(tmp_path):
    root = _folder(tmp_path / "shop", {"T-Shirt": 1, "Hoodie": 1})
    mapping = tmp_path / "map.yaml"
    mapping.write_text("T-shirt: Tops\nHodie: Tops\n")
    with pytest.raises(DatasetError) as raised:
        load_dataset("folder", root, category_map=mapping, progress=False)
    message = str(raised.value)
    assert "'T-shirt' matches no label (did you mean 'T-Shirt'?)" in message
    assert "'Hodie' matches no label (did you mean 'Hoodie'?)" in message
    assert str(mapping) in message and "\n" not in message


def test_a_missing_or_malformed_category_map_file_is_a_clear_error(tmp_path):
    root = _folder(tmp_path / "shop", {"Hat": 1})
    with pytest.raises(DatasetError, match="missing.yaml: category map file not found"):
        load_dataset("folder", root, category_map=tmp_path / "missing.yaml", progress=False)
    (tmp_path / "list.yaml").write_text("- Hat\n")
    with pytest.raises(DatasetError, match="list.yaml: a category map is a YAML mapping"):
        load_dataset("folder", root, category_map=tmp_path / "list.yaml", progress=False)


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
    stages = {entry["path"]: entry["stage"] for entry in loaded.skipped}
    assert stages == {"red/notes.jpg": "header", "red/empty.png": "header", "blue/album.jpg": "file",
                      "blue/gone.jpg": "file"}
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
    assert [entry["stage"] for entry in loaded.skipped] == ["label", "duplicate", "file"]


def test_catalog_loader_names_the_file_when_columns_are_missing(tmp_path):
    (tmp_path / "catalog.csv").write_text("file,category\nx.jpg,Shirt\n")
    with pytest.raises(DatasetError, match="catalog.csv: missing columns .path., .label.; name your own with --columns"):
        load_catalog_csv(tmp_path, progress=False)


def test_unknown_dataset_and_missing_directory_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(DatasetError, match="nope: no such directory .*<data-dir>/<category>/<image>"):
        load_dataset("folder", tmp_path / "nope")
    with pytest.raises(DatasetError, match="--dataset catalog needs --data-dir"):
        load_dataset("catalog")


def test_a_flat_folder_of_images_says_it_needs_one_sub_folder_per_category(tmp_path):
    for i in range(3):
        write_color_image(tmp_path / "flat" / f"photo-{i}.jpg", (200, 10, 10))
    with pytest.raises(DatasetError, match="its 3 files lie directly in it, but --dataset folder needs one "
                                           "sub-folder per category"):
        load_dataset("folder", tmp_path / "flat", progress=False)


def test_a_truncated_jpeg_is_caught_before_the_split_and_its_verdict_is_cached(tmp_path, monkeypatch):
    root = _folder(tmp_path / "shop", {"Hat": 4})
    good = write_color_image(tmp_path / "big.jpg", (30, 40, 210), size=(400, 400)).read_bytes()
    (root / "Hat" / "cut.jpg").write_bytes(good[: len(good) // 2])   # the header is intact, the pixels are not
    (root / "Hat" / "notes.jpg").write_text("just some notes\n")
    loaded = load_dataset("folder", root, progress=False)
    assert len(loaded.catalog) == 4
    assert {(e["path"], e["stage"]) for e in loaded.skipped} == {("Hat/cut.jpg", "decode"), ("Hat/notes.jpg", "header")}
    assert "truncated" in next(e["reason"] for e in loaded.skipped if e["stage"] == "decode")

    def no_decoding(*args):
        raise AssertionError("a cached verdict was decoded again")

    monkeypatch.setattr(checks, "check_image_file", no_decoding)
    again = load_dataset("folder", root, progress=False)
    assert again.skipped == loaded.skipped and again.catalog.equals(loaded.catalog)


def test_clothing_loader_on_the_real_photos(clothing_dir):
    loaded = load_clothing(clothing_dir, progress=False)
    labels = set(loaded.catalog["label"])
    assert len(labels) == 17
    assert not labels & {"Not sure", "Skip", "Other"}
    # The five rows whose file is absent all carry non-category labels in this copy.
    assert len(loaded.catalog) == 5096
    assert loaded.catalog["id"].is_unique
    # Every file in images/ is either used or in the ledger, once.
    on_disk = {path.name for path in (clothing_dir / "images").iterdir() if not path.name.startswith(".")}
    used = {path.rsplit("/", 1)[-1] for path in loaded.catalog["path"]}
    left_out = [entry["path"].rsplit("/", 1)[-1] for entry in loaded.skipped]
    assert len(left_out) == len(set(left_out)) and not used & set(left_out)
    assert used | set(left_out) >= on_disk
    assert len(set(left_out) - on_disk) == 5    # the rows whose file is absent


def test_clothing_loader_reports_rows_whose_file_is_absent(tmp_path):
    write_color_image(tmp_path / "images" / "a1.jpg", (200, 10, 10))
    write_color_image(tmp_path / "images" / "b2.jpg", (10, 10, 200))
    (tmp_path / "images.csv").write_text(
        "image,sender_id,label,kids\na1,1,Shirt,False\nb2,1,Skip,False\nc3,2,Dress,False\n")
    write_color_image(tmp_path / "images" / "d4.jpg", (10, 200, 10))
    loaded = load_clothing(tmp_path, progress=False)
    assert loaded.catalog["id"].tolist() == ["a1"]
    assert loaded.skipped == [
        {"path": "images/d4.jpg", "stage": "label", "reason": "no row in images.csv"},
        {"path": "images/b2.jpg", "stage": "label", "reason": "label 'Skip' names no category"},
        {"path": "images/c3.jpg", "stage": "file", "reason": "file not found"},
    ]


@pytest.mark.skipif(not fashion_mnist_available(),
                    reason="Fashion-MNIST neither installed (Debian dataset-fashion-mnist) nor fetched (make data)")
def test_fashion_mnist_loader_samples_and_writes_only_what_it_needs():
    loaded = load_fashion_mnist(max_per_class=5, seed=0, progress=False)
    assert loaded.counts().to_dict() == {name: 5 for name in FASHION_MNIST_CLASSES}
    written = sorted(p.name for p in (config.INTERIM_DIR / "fashion-mnist" / "images").glob("*.png"))
    assert len(written) >= 50
    assert set(loaded.catalog["path"].map(lambda p: p.rsplit("/", 1)[-1])) <= set(written)


def test_every_ledger_stage_is_documented():
    documented = (REPO / "docs" / "skipped-files.md").read_text()
    for stage in STAGES:
        assert f"| `{stage}` |" in documented, stage
