"""Look, not only category: attribute relevance, the product-colour descriptor, colour fusion, the sweep.

The catalog is generated at test time (tests/colour_catalog.py): 3 garment silhouettes x 4
known colours, half on white, half on clutter. The network is the real efficientnet_lite0.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from fashionrec import Recommender, config
from fashionrec.cli import main
from fashionrec.data.images import load_image
from fashionrec.ranking import metrics
from fashionrec.evaluation.protocol import evaluate_embeddings
from fashionrec.models.registry import get_backbone
from fashionrec.ranking.rank import ColourFusion, Ranking, gallery_store, rank
from fashionrec.serving.folder import COLOUR_FILE, current_version
from fashionrec.settings import InferenceSettings, StoreSettings

from colour_catalog import product_photo, write_colour_catalog
from conftest import REPO, data_dirs, session_data_root

APP = REPO / "app" / "streamlit_app.py"


# --- relevance by several columns, counted by hand ---------------------------------------------

def test_attribute_keys_match_on_every_column_and_a_missing_value_never_matches():
    queries = pd.DataFrame({"label": ["tee", "tee", "tee"], "colour": ["red", " red ", None]})
    gallery = pd.DataFrame({"label": ["tee", "dress", "tee", "tee"], "colour": ["red", "red", "", "blue"]})
    query_keys, gallery_keys = metrics.attribute_keys(queries, gallery, ["label", "colour"])
    assert query_keys[0] == query_keys[1] == gallery_keys[0] and query_keys[2] == gallery_keys[2] == -1
    assert len({gallery_keys[0], gallery_keys[1], gallery_keys[3]}) == 3
    results = np.array([[gallery_keys[0], gallery_keys[1], -2], [gallery_keys[3], gallery_keys[0], -2],
                        [gallery_keys[2], gallery_keys[2], gallery_keys[0]]])
    assert metrics.relevance_from_keys(query_keys, results).tolist() == [[True, False, False], [False, True, False],
                                                                        [False, False, False]]
    assert metrics.n_relevant_from_keys(query_keys, gallery_keys).tolist() == [1, 1, 0]


def _tiny_case():
    """2 queries, 5 gallery items in 2-D: q1 ranks g2, g1, ...; q2 (colour unknown) ranks g3, g1, ..."""
    rows = [("q1", "query", "tee", "red", [1.0, 0.0]), ("q2", "query", "tee", None, [0.0, 1.0]),
            ("g1", "gallery", "tee", "red", [1.0, 0.2]), ("g2", "gallery", "tee", "blue", [1.0, 0.1]),
            ("g3", "gallery", "dress", "red", [0.0, 1.0]), ("g4", "gallery", "tee", "red", [-1.0, 0.0]),
            ("g5", "gallery", "tee", None, [-1.0, -1.0])]
    metadata = pd.DataFrame([row[:4] for row in rows], columns=["id", "split", "label", "colour"])
    return np.array([row[4] for row in rows], dtype=np.float32), metadata


def test_relevance_by_label_and_colour_gives_the_hand_counted_metrics():
    vectors, metadata = _tiny_case()
    evaluation = evaluate_embeddings(vectors, metadata, k=2, relevance=("label", "colour"))
    # q1: g2 (tee, blue) then g1 (tee, red): 1 of 2 relevant; 2 red tees exist (g1, g4). q2 lacks a colour: 0.
    assert evaluation.per_query["precision_at_k"].tolist() == [0.5, 0.0]
    assert evaluation.per_query["recall_at_k"].tolist() == [0.5, 0.0]
    assert evaluation.per_query["hit_rate_at_1"].tolist() == [0.0, 0.0]
    # By category: q1 2 tees of 2, q2 g3 (dress) then g1 (tee).
    assert evaluation.category_precision.tolist() == [1.0, 0.5]
    record = evaluation.to_record()
    assert record["precision_at_k"] == 0.25 and record["category_precision_at_k"] == 0.75
    assert record["relevance"] == ["label", "colour"] and len(record["category_precision_at_k_ci"]) == 2
    assert record["relevance_missing"]["queries"] == 1 and record["relevance_missing"]["gallery"] == 1
    plain = evaluate_embeddings(vectors, metadata, k=2).to_record()
    assert plain["precision_at_k"] == plain["category_precision_at_k"] == 0.75 and plain["relevance"] == ["label"]
    assert plain["precision_at_k_ci"] == plain["category_precision_at_k_ci"]


def test_fusion_is_exact_for_flat_and_the_same_after_reranking_all_candidates():
    rng = np.random.default_rng(0)
    network, colour = rng.normal(size=(40, 8)).astype(np.float32), np.abs(rng.normal(size=(40, 5)))
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)   # noqa: E731
    expected_scores = 0.7 * unit(network[:10]) @ unit(network[10:]).T + 0.3 * unit(colour[:10]) @ unit(colour[10:]).T
    expected = np.argsort(-expected_scores, axis=1, kind="stable")[:, :5]
    ranking = Ranking(fusion=ColourFusion(0.3, colour[10:]))
    for index in ("Flat", "HNSW8"):   # 30 rows: fewer than the candidates, so re-ranking sees them all
        with gallery_store(StoreSettings(), network[10:], ["x"] * 30, index) as store:
            scores, rows = rank(store, network[:10], 5, ranking, query_colour=colour[:10])
        assert store.exhaustive == (index == "Flat")
        assert (rows == expected).all()
        np.testing.assert_allclose(scores, np.take_along_axis(expected_scores, expected, axis=1), atol=1e-5)


# --- the descriptor: the product's colour, whatever stands behind it ---------------------------------

def _descriptors(backbone: str, paths) -> np.ndarray:
    model = get_backbone(backbone)
    with torch.inference_mode():
        vectors = model.model(torch.stack([model.transform(load_image(path)) for path in paths])).numpy()
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_product_colour_matches_the_product_not_the_background(tmp_path):
    table = write_colour_catalog(tmp_path, per_cell=4)
    paths = [tmp_path / path for path in table["path"]]
    colour, background = table["colour"].to_numpy(), table["background"].to_numpy()
    same_colour_other_background = (colour[:, None] == colour[None]) & (background[:, None] != background[None])
    other_colour_same_background = (colour[:, None] != colour[None]) & (background[:, None] == background[None])

    def robust_share(backbone: str) -> float:
        similarity = _descriptors(backbone, paths) @ _descriptors(backbone, paths).T
        closer = [similarity[i, same_colour_other_background[i]].mean() >
                  similarity[i, other_colour_same_background[i]].mean() for i in range(len(table))]
        return float(np.mean(closer))

    assert robust_share("product_colour") == 1.0
    # The whole-photo histogram mostly describes the clutter: it fails this on many photos.
    assert robust_share("colorhist") < 0.8
    vector = _descriptors("product_colour", paths[:1])[0]
    assert vector.shape == (324,) and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5) and (vector >= 0).all()


# --- evaluate: relevance, fusion, the sweep, through the command line ------------------------------

@pytest.fixture(scope="module")
def colour_catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("colour-catalog")
    write_colour_catalog(root, per_cell=12)
    return root


def _evaluate(capsys, catalog: Path, *extra) -> dict:
    code = main(["evaluate", "--dataset", "catalog", "--data-dir", str(catalog), "--backbone", "efficientnet_lite0",
                 "--k", "10", "--json", "--quiet", "--workers", "0", *extra])
    assert code == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.integration
def test_colour_weight_raises_colour_precision_and_weight_zero_is_todays_ranking(colour_catalog, capsys):
    today = _evaluate(capsys, colour_catalog)
    zero = _evaluate(capsys, colour_catalog, "--colour-weight", "0")
    looked = _evaluate(capsys, colour_catalog, "--relevance", "label,colour")
    fused = _evaluate(capsys, colour_catalog, "--relevance", "label,colour", "--colour-weight", "0.5")
    approximate = _evaluate(capsys, colour_catalog, "--relevance", "label,colour", "--colour-weight", "0.5",
                            "--index", "HNSW32")
    names = ["precision_at_k", "hit_rate_at_k", "recall_at_k", "map_at_k", "hit_rate_at_1"]
    assert {name: zero[name] for name in names} == {name: today[name] for name in names}
    assert zero["per_category"] == today["per_category"] and "colour_weight" not in zero
    assert today["precision_at_k"] == today["category_precision_at_k"] and today["relevance"] == ["label"]
    # The same ranking, judged by label and colour: a stricter relevance, and the category one beside it.
    assert looked["category_precision_at_k"] == today["precision_at_k"]
    assert looked["precision_at_k"] < today["precision_at_k"] and looked["relevance"] == ["label", "colour"]
    assert looked["n_queries"] == 30 and looked["relevance_missing"]["queries"] == 0
    assert fused["precision_at_k"] > looked["precision_at_k"] + 0.05
    assert fused["map_at_k"] > looked["map_at_k"] + 0.15
    assert fused["category_precision_at_k"] < looked["category_precision_at_k"]   # the trade-off
    assert fused["colour_fusion"].startswith("exact") and approximate["colour_fusion"].startswith("re-ranked")
    # 30 gallery items are fewer than the 100 candidates: re-ranking sees them all, so it equals exact search.
    assert approximate["precision_at_k"] == fused["precision_at_k"]


@pytest.mark.integration
def test_a_fine_tuned_model_takes_the_colour_weight_and_so_does_its_frozen_baseline(colour_catalog, capsys):
    tuned = ["--finetune", "--epochs", "5", "--loss", "norm_softmax", "--relevance", "label,colour"]
    plain = _evaluate(capsys, colour_catalog, *tuned)
    fused = _evaluate(capsys, colour_catalog, *tuned, "--colour-weight", "0.5")
    assert plain["finetune"]["loss"] == fused["finetune"]["loss"] == "norm_softmax"
    assert fused["finetune"]["reused_cached_model"] is True    # the weight changes the ranking, not the training
    assert fused["colour_weight"] == 0.5 and fused["baseline"]["colour_weight"] == 0.5
    assert fused["precision_at_k"] > plain["precision_at_k"] + 0.05
    assert fused["category_precision_at_k"] < plain["category_precision_at_k"]
    frozen_fused = _evaluate(capsys, colour_catalog, "--relevance", "label,colour", "--colour-weight", "0.5")
    assert fused["baseline_precision_at_k"] == frozen_fused["precision_at_k"]


@pytest.mark.integration
def test_the_sweep_suggests_a_weight_on_validation_and_writes_the_report(colour_catalog, capsys):
    record = _evaluate(capsys, colour_catalog, "--relevance", "label,colour", "--colour-weights", "0,0.5,1",
                       "--run", "look")
    assert [row["colour_weight"] for row in record["rows"]] == [0.0, 0.5, 1.0]
    assert record["rows"][1]["precision_at_k"] > record["rows"][0]["precision_at_k"]
    assert record["rows"][0]["category_precision_at_k"] > record["rows"][2]["category_precision_at_k"]
    suggested = record["suggested"]
    assert suggested["chosen_on"].startswith("validation:") and "queries were not looked at" in suggested["chosen_on"]
    best = max(row["validation_precision_at_k"] for row in record["rows"])
    assert suggested["colour_weight"] == min(row["colour_weight"] for row in record["rows"]
                                             if row["validation_precision_at_k"] == best)
    out = config.RESULTS_DIR / "look"
    report = (out / "report.md").read_text()
    assert "## Colour weight: category P@10 against P@10 by label, colour" in report
    assert "![colour sweep](figures/colour_sweep.png)" in report
    assert (out / "figures" / "colour_sweep.png").stat().st_size > 0
    assert json.loads((out / "colour_sweep.json").read_text())["suggested"] == suggested


def test_an_unknown_relevance_column_is_one_line_before_any_embedding(tmp_path, capsys):
    write_colour_catalog(tmp_path, per_cell=1)
    shards_before = set(config.INTERIM_DIR.rglob("shard-*.npz"))
    code = main(["evaluate", "--dataset", "catalog", "--data-dir", str(tmp_path), "--backbone", "efficientnet_lite0",
                 "--k", "1", "--relevance", "label,fabric", "--quiet"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert "'fabric'" in error and "available: label, colour, background" in error
    assert set(config.INTERIM_DIR.rglob("shard-*.npz")) == shards_before   # nothing was embedded
    for bad, said in ((["--colour-weight", "1.5"], "between 0"), (["--colour-weight", "0.5", "--metric", "l2"],
                                                                   "use --metric cosine")):
        code = main(["evaluate", "--dataset", "catalog", "--data-dir", str(tmp_path), "--backbone",
                     "efficientnet_lite0", "--k", "1", "--quiet", *bad])
        assert code == 2 and said in capsys.readouterr().err


# --- serving: the index folder keeps the catalog's colours; recommend and the app take a weight -----

@pytest.fixture(scope="module")
def colour_index(colour_catalog, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("colour-index") / "index"
    catalog = pd.read_csv(colour_catalog / "catalog.csv")
    catalog = catalog.assign(id=catalog["path"], path=[str(colour_catalog / path) for path in catalog["path"]])
    with data_dirs(session_data_root(tmp_path_factory)):
        Recommender.build(outdir, catalog[["id", "path", "label"]], "efficientnet_lite0",
                          settings=InferenceSettings(workers=0, progress=False))
    query = product_photo(tmp_path_factory.mktemp("colour-query") / "red-tee.jpg", "tee", "red", "clutter", seed=99)
    return outdir, query, catalog.set_index("id")["colour"]


@pytest.mark.integration
def test_recommend_with_a_colour_weight_brings_the_query_colour_first(colour_index, capsys):
    outdir, query, colour_of = colour_index
    assert (current_version(outdir) / COLOUR_FILE).is_file()
    recommender = Recommender.load(outdir, InferenceSettings(progress=False))
    plain = recommender.recommend(query, k=10)
    assert [r.id for r in recommender.recommend(query, k=10, colour_weight=0.0).results] == \
        [r.id for r in plain.results]
    looked = recommender.recommend(query, k=10, colour_weight=0.6)
    red = [sum(colour_of[r.id] == "red" for r in answer.results) for answer in (plain, looked)]
    assert red[1] >= 8 and red[1] > red[0]
    assert "colour" in looked.timing_ms and [r.score for r in looked.results] == sorted(
        [r.score for r in looked.results], reverse=True)
    similar = recommender.similar_to(looked.results[0].id, k=5, colour_weight=0.6)
    assert similar.results[0].id == looked.results[0].id and similar.results[0].score == pytest.approx(1.0, abs=1e-3)
    code = main(["recommend", "--index-dir", str(outdir), "--image", str(query), "--k", "5", "--colour-weight", "0.6",
                 "--json"])
    assert code == 0 and [r["id"] for r in json.loads(capsys.readouterr().out)["results"]] == \
        [r.id for r in looked.results[:5]]


@pytest.mark.integration
def test_an_index_folder_without_colours_says_to_rebuild_it(colour_index, tmp_path, capsys):
    import shutil

    outdir, query, _ = colour_index
    old = tmp_path / "old"
    shutil.copytree(outdir, old)
    version = current_version(old)
    (version / COLOUR_FILE).unlink()
    info = json.loads((version / "build.json").read_text())
    del info["colour"]
    (version / "build.json").write_text(json.dumps(info))
    recommender = Recommender.load(old, InferenceSettings(progress=False))
    assert not recommender.has_colour and recommender.recommend(query, k=3).results
    code = main(["recommend", "--index-dir", str(old), "--image", str(query), "--colour-weight", "0.5"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "without product-colour descriptors" in error
    assert "rebuild it with `python -m fashionrec index" in error


@pytest.mark.integration
def test_the_app_slider_ranks_by_colour(colour_index, monkeypatch):
    outdir, query, colour_of = colour_index
    monkeypatch.setenv("FASHIONREC_INDEX_DIR", str(outdir))
    at = AppTest.from_file(str(APP), default_timeout=300).run()
    assert not at.exception and not at.slider(key="colour_weight").disabled
    at.slider(key="k").set_value(8)
    at.file_uploader(key="upload").upload(query.name, query.read_bytes(), "image/jpeg").run()
    plain = [image.captions for image in at.image]
    at.slider(key="colour_weight").set_value(0.6).run()
    assert not at.exception and not at.error
    looked = [image.captions for image in at.image]
    assert looked != plain and any("product-colour similarity" in caption.value for caption in at.caption)


@pytest.mark.integration
def test_updates_keep_the_colour_descriptors_aligned_with_the_items(colour_index, tmp_path):
    import shutil

    outdir, query, _ = colour_index
    copy = tmp_path / "copy"
    shutil.copytree(outdir, copy)
    recommender = Recommender.load(copy, InferenceSettings(progress=False, workers=0))
    blue = product_photo(tmp_path / "new-blue-dress.jpg", "dress", "blue", "white", seed=7)
    removed = recommender.ids[:3]
    recommender.add([str(blue)], ["dress"], ids=["new-blue-dress"])
    recommender.remove(removed)
    recommender.save()
    reloaded = Recommender.load(copy, InferenceSettings(progress=False))
    assert len(np.load(current_version(copy) / COLOUR_FILE)) == len(reloaded.catalog) == 144 - 3 + 1
    # Colour only: the new blue dress is the nearest item to itself, from its stored descriptor.
    assert reloaded.similar_to("new-blue-dress", k=2, colour_weight=1.0).results[0].id == "new-blue-dress"
    nearest = reloaded.recommend(blue, k=1, colour_weight=1.0).results[0]
    assert nearest.id == "new-blue-dress" and nearest.score == pytest.approx(1.0, abs=2e-3)


def test_the_pipeline_sweep_runs_the_backbone_as_the_run_embedded_it(colour_catalog):
    from fashionrec.pipeline.stages import stage_colour_sweep, stage_embed, stage_evaluate, stage_prepare

    stage_prepare("eager-run", "catalog", colour_catalog, k=10, progress=False)
    stage_embed("eager-run", ["colorhist"], settings=InferenceSettings(progress=False, workers=0, runtime="eager"))
    table, _ = stage_evaluate("eager-run", ["Flat"], k=10)
    record = stage_colour_sweep("eager-run", [0, 0.5], k=10)   # the notebook passes no settings
    assert record["protocol"]["runtime"] == "eager"
    assert record["rows"][0]["precision_at_k"] == pytest.approx(table["precision_at_k"].iloc[0], abs=1e-6)


@pytest.mark.integration
def test_the_pipeline_stages_take_relevance_and_colour_weights_into_the_report(colour_catalog):
    from fashionrec.pipeline.report import write_report
    from fashionrec.pipeline.stages import stage_colour_sweep, stage_embed, stage_evaluate, stage_prepare

    settings = InferenceSettings(progress=False, workers=0)
    stage_prepare("look-run", "catalog", colour_catalog, k=10, progress=False)
    stage_embed("look-run", ["efficientnet_lite0"], settings=settings)
    table, _ = stage_evaluate("look-run", ["Flat"], k=10, relevance=["label", "colour"])
    assert table["relevance"].iloc[0] == ["label", "colour"]
    assert table["precision_at_k"].iloc[0] < table["category_precision_at_k"].iloc[0]
    assert stage_colour_sweep("look-run", [], k=10) is None
    record = stage_colour_sweep("look-run", [0, 0.5], k=10, relevance=["label", "colour"], settings=settings)
    assert record["rows"][1]["precision_at_k"] > record["rows"][0]["precision_at_k"]
    report = write_report("look-run").read_text()
    assert "## Colour weight: category P@10 against P@10 by label, colour" in report
    with pytest.raises(Exception, match="'fabric'"):
        stage_evaluate("look-run", ["Flat"], k=10, relevance=["label", "fabric"])
