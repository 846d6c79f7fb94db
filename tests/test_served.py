"""What is measured is what is served: ``evaluate --index-dir`` and the protocol rank alike, on real photos."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fashionrec.cli import main
from fashionrec.data.prepared import prepare
from fashionrec.evaluation.protocol import evaluate_embeddings
from fashionrec.experiment.evaluate import embed, embed_colour
from fashionrec.serving.build import index_dataset
from fashionrec.serving.recommender import Recommender
from fashionrec.settings import InferenceSettings

from conftest import CLOTHING_DIR, data_dirs, session_data_root

QUIET = InferenceSettings(batch_size=16, workers=0, progress=False)
LITE0 = "efficientnet_lite0"
K = 5


@pytest.fixture(scope="module")
def shop(request, tmp_path_factory):
    """A folder catalog of real photos (clothing when present, else generated), its split, and an index folder of
    its gallery split built as a shop would (``index --split gallery``)."""
    if (CLOTHING_DIR / "images.csv").exists():
        catalog, _ = request.getfixturevalue("clothing_photos")
        catalog = catalog[catalog["label"].isin(catalog["label"].value_counts().index[:4])].head(90)
    else:
        catalog, _, _ = request.getfixturevalue("generated_photos")
        catalog = catalog.head(90)
    root = tmp_path_factory.mktemp("served") / "shop"
    for row in catalog.itertuples():
        target = root / row.label / f"{row.Index:03d}{str(row.path)[-4:].lower()}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(row.path)
    with data_dirs(session_data_root(tmp_path_factory)):
        prepared = prepare("folder", root, split_seed=0, progress=False)
        outdir = root.parent / "index"
        index_dataset(outdir, "folder", LITE0, data_dir=root, split="gallery", split_seed=0, settings=QUIET)
        embeddings = embed(prepared, LITE0, splits=("gallery", "query"), settings=QUIET)
        colour, _ = embed_colour(prepared, embeddings.metadata, QUIET)
    return prepared, outdir, embeddings, colour


@pytest.mark.integration
@pytest.mark.parametrize("colour_weight", [0.0, 0.25])
def test_evaluate_and_the_recommender_return_the_same_ids_in_the_same_order(shop, colour_weight):
    """The protocol's ranking of each query equals the served ranking of the same query vector."""
    prepared, outdir, embeddings, colour = shop
    metadata = embeddings.metadata
    evaluation = evaluate_embeddings(embeddings.vectors, metadata, k=K, colour_vectors=colour,
                                     colour_weight=colour_weight)
    gallery_ids = evaluation.gallery["id"].to_numpy()
    query_rows = np.flatnonzero(metadata["split"].to_numpy() == "query")
    with Recommender.load(outdir, QUIET) as recommender:
        assert sorted(recommender.ids) == sorted(gallery_ids)
        for position, row in enumerate(query_rows):
            served = recommender.search_vector(embeddings.vectors[row], k=K, colour=colour[row],
                                               colour_weight=colour_weight)
            assert [item.id for item in served] == gallery_ids[evaluation.result_positions[position]].tolist()


@pytest.mark.integration
def test_the_query_split_through_the_served_path_gives_the_protocols_numbers(shop, capsys):
    prepared, outdir, embeddings, _ = shop
    evaluation = evaluate_embeddings(embeddings.vectors, embeddings.metadata, k=K)
    assert main(["evaluate", "--index-dir", str(outdir), "--queries", "split", "--k", str(K), "--json",
                 "--quiet", "--workers", "0"]) == 0
    served = json.loads(capsys.readouterr().out)
    assert served["n_queries"] == len(evaluation.queries) and served["n_gallery"] == len(evaluation.gallery)
    assert served["queries"] == "split" and served["split_seed"] == 0 and served["built_from"]["split"] == "gallery"
    # The photos are decoded and embedded afresh by the query model: equal within its export tolerance.
    assert abs(served["precision_at_k"] - evaluation.summary["precision_at_k"]) <= 0.02
    for key in ("precision_at_k_ci", "recall_at_k", "map_at_k", "hit_rate_at_k", "per_category", "policy",
                "version", "backbone", "index", "store"):
        assert key in served
    assert served["n_own_copies_excluded"] == 0 and served["n_skipped"] == len(prepared.skipped)


@pytest.mark.integration
def test_a_whole_catalog_folder_carries_the_quality_card_of_its_split_of_record(shop, tmp_path, capsys):
    """``index`` of a whole labelled catalog measures its model on the split of record (a Flat folder: the
    protocol's P@10 and interval exactly); ``recommend --json`` shows the card; a gallery folder has none."""
    prepared, gallery_folder, embeddings, _ = shop
    outdir = tmp_path / "whole"
    assert main(["index", "--dataset", "folder", "--data-dir", str(prepared.root), "--backbone", LITE0, "--index",
                 "Flat", "--out", str(outdir), "--json", "--quiet", "--workers", "0"]) == 0
    card = json.loads(capsys.readouterr().out)["quality"]
    record = evaluate_embeddings(embeddings.vectors, embeddings.metadata, k=10).to_record()
    assert (card["k"], card["n_queries"], card["n_gallery"]) == (10, record["n_queries"], record["n_gallery"])
    assert card["precision_at_k"] == pytest.approx(record["precision_at_k"], abs=1e-6)
    assert card["precision_at_k_ci"] == pytest.approx(record["precision_at_k_ci"], abs=1e-6)
    assert card["split"]["seed"] == 0 and card["ranking"] == "similarity" and card["index"] == "Flat"
    photo = prepared.catalog["path"].iloc[0]
    assert main(["recommend", "--index-dir", str(outdir), "--image", str(photo), "--k", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quality"] == card
    with Recommender.load(gallery_folder, QUIET) as recommender:
        assert recommender.describe()["quality"] is None
    assert main(["index", "--dataset", "folder", "--data-dir", str(prepared.root), "--backbone", LITE0, "--out",
                 str(tmp_path / "uncarded"), "--no-quality", "--json", "--quiet", "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["quality"] is None


@pytest.mark.integration
def test_a_queries_csv_counts_a_missing_file_and_a_non_image_and_loses_nothing_else(shop, tmp_path, capsys):
    prepared, outdir, _, _ = shop
    queries = prepared.catalog[prepared.catalog["split"] == "query"].head(6)
    in_catalog = prepared.catalog[prepared.catalog["split"] == "gallery"].iloc[0]
    (tmp_path / "notes.jpg").write_text("not an image")
    rows = [{"path": path, "label": label} for path, label in zip(queries["path"], queries["label"])]
    rows += [{"path": str(tmp_path / "gone.jpg"), "label": queries["label"].iloc[0]},
             {"path": "notes.jpg", "label": queries["label"].iloc[0]},
             {"path": in_catalog["path"], "label": in_catalog["label"]}]
    csv = tmp_path / "queries.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    assert main(["evaluate", "--index-dir", str(outdir), "--queries", str(csv), "--k", str(K), "--json",
                 "--quiet", "--workers", "0"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["n_queries"] == 7 and record["n_skipped"] == 2
    assert sorted(entry["path"].rsplit("/", 1)[-1] for entry in record["skipped"]) == ["gone.jpg", "notes.jpg"]
    assert record["n_own_copies_excluded"] == 1   # the catalog's own photo, kept out of its own results
    # Without the exclusion the catalog's copy is its own best match: the record's lists never hold it.
    with Recommender.load(outdir, QUIET) as recommender:
        nearest = recommender.recommend(in_catalog["path"], k=1).results[0]
        assert nearest.label == in_catalog["label"] and nearest.score > 0.99


@pytest.mark.parametrize("argv, message", [
    (["--index-dir", "somewhere"], "go together"),
    (["--index-dir", "somewhere", "--queries", "split", "--backbone", LITE0], "leave it out"),
    (["--k", "5"], "--dataset (or --catalog) and --backbone"),
])
def test_index_dir_and_queries_go_together_and_refuse_backbone_options(argv, message, capsys):
    assert main(["evaluate", *argv]) != 0
    assert message in capsys.readouterr().err
