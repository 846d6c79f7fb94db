from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fashionrec.evaluation.analysis import distance_and_dimension, hardest_queries, pca_reduce
from fashionrec.evaluation.compare import paired_comparisons, winners
from fashionrec.evaluation.protocol import evaluate_embeddings
from fashionrec.provenance import dataset_fingerprint


def _toy():
    """Gallery: two A's near the x axis, two B's near the y axis. Queries: one A, one ambiguous B."""
    vectors = np.array([
        [1.0, 0.0], [0.9, 0.1],      # gallery A
        [0.0, 1.0], [0.1, 0.9],      # gallery B
        [1.0, 0.05],                 # query A: both A's come first
        [0.8, 0.6],                  # query B, closer in angle to the A's
    ], dtype=np.float32)
    metadata = pd.DataFrame({
        "id": ["g1", "g2", "g3", "g4", "q1", "q2"],
        "label": ["A", "A", "B", "B", "A", "B"],
        "split": ["gallery"] * 4 + ["query"] * 2,
    })
    return vectors, metadata


def test_an_index_template_is_reported_with_the_factory_it_became():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    metadata = pd.DataFrame({"id": [f"i{n}" for n in range(300)], "label": list("AB") * 150,
                             "split": ["gallery"] * 250 + ["query"] * 50})
    templated = evaluate_embeddings(vectors, metadata, k=5, index="IVF{nlist},Flat").protocol
    assert templated["index"] == "IVF{nlist},Flat"
    assert templated["index_resolved"].startswith("IVF") and "{" not in templated["index_resolved"]
    assert "index_resolved" not in evaluate_embeddings(vectors, metadata, k=5, index="Flat").protocol


def test_evaluate_embeddings_on_a_hand_computed_example():
    vectors, metadata = _toy()
    evaluation = evaluate_embeddings(vectors, metadata, k=2, index="Flat", metric="cosine")
    # q1 -> [g1, g2]: both A -> P@2 = 1, AP = 1. q2 (0.8,0.6) has cosines g2 .86, g1 .80, g4 .69, g3 .60:
    # top-2 = [g2, g1], both wrong -> P@2 = 0, hit = 0, recall = 0.
    assert evaluation.queries["id"].tolist() == ["q1", "q2"]
    assert evaluation.gallery["id"].iloc[evaluation.result_positions[0]].tolist() == ["g1", "g2"]
    assert evaluation.gallery["id"].iloc[evaluation.result_positions[1]].tolist() == ["g2", "g1"]
    assert evaluation.summary["precision_at_k"] == pytest.approx(0.5)
    assert evaluation.summary["hit_rate_at_k"] == pytest.approx(0.5)
    assert evaluation.summary["map_at_k"] == pytest.approx(0.5)
    assert evaluation.protocol["n_gallery"] == 4 and evaluation.protocol["n_queries"] == 2
    assert hardest_queries(evaluation, 1).tolist() == [1]
    record = evaluation.to_record(n_boot=200)
    assert record["per_category"] == {
        "A": {"precision_at_k": 1.0, "hit_rate_at_k": 1.0, "recall_at_k": 1.0, "map_at_k": 1.0,
              "hit_rate_at_1": 1.0, "support": 1},
        "B": {"precision_at_k": 0.0, "hit_rate_at_k": 0.0, "recall_at_k": 0.0, "map_at_k": 0.0,
              "hit_rate_at_1": 0.0, "support": 1},
    }
    assert len(record["precision_at_k_ci"]) == 2


def test_inner_product_favours_long_vectors_where_cosine_and_euclidean_do_not():
    vectors, metadata = _toy()
    vectors = vectors.copy()
    vectors[2] *= 3.0  # a long B vector: same direction, far away in Euclidean terms
    cosine = evaluate_embeddings(vectors, metadata, k=1, metric="cosine")
    euclid = evaluate_embeddings(vectors, metadata, k=1, metric="l2")
    assert cosine.result_positions[:, 0].tolist() == euclid.result_positions[:, 0].tolist()
    inner = evaluate_embeddings(vectors, metadata, k=1, metric="ip")
    # Inner product favours the long vector g3 for the ambiguous query (0.8, 0.6): 1.8 > 0.8.
    assert inner.gallery["id"].iloc[inner.result_positions[1, 0]] == "g3"


def test_k_larger_than_gallery_is_an_error():
    vectors, metadata = _toy()
    with pytest.raises(ValueError, match="exceeds the gallery size"):
        evaluate_embeddings(vectors, metadata, k=5)


def test_fingerprint_changes_with_content_and_split_not_with_row_order():
    _, metadata = _toy()
    metadata = metadata.assign(digest=[f"d{i}" for i in range(len(metadata))])
    assert dataset_fingerprint(metadata) == dataset_fingerprint(metadata.iloc[::-1])
    assert dataset_fingerprint(metadata) != dataset_fingerprint(metadata.assign(split="gallery"))
    changed = metadata.copy()
    changed.loc[0, "digest"] = "other"
    assert dataset_fingerprint(metadata) != dataset_fingerprint(changed)


def test_pca_reduce_with_and_without_whitening_on_exact_values():
    fit = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.5], [0.0, -0.5]])
    point = np.array([[2.0, 0.0]])
    # First axis is x (variance 2/3 with n-1); the projection of (2, 0) on it is +-2, and
    # +-2 / sqrt(2/3 + 0.1 * 2/3) = +-2.335497 once whitened (the floor is 0.1 x the mean variance).
    assert abs(pca_reduce(fit, point, 1, whiten=False)[0, 0]) == pytest.approx(2.0, abs=1e-6)
    assert abs(pca_reduce(fit, point, 1, whiten=True)[0, 0]) == pytest.approx(2.0 / np.sqrt(1.1 * 2 / 3), abs=1e-5)
    # Two axes: variances 2/3 and 1/6; each is floored by 0.1 x their mean (5/12) before dividing.
    both = pca_reduce(fit, np.array([[2.0, 1.0]]), 2, whiten=True)[0]
    assert np.abs(both) == pytest.approx([2 / np.sqrt(2 / 3 + 5 / 120), 1 / np.sqrt(1 / 6 + 5 / 120)], abs=1e-5)
    with pytest.raises(ValueError, match="dim must be between"):
        pca_reduce(fit, point, 3)


def _clusters_with_a_loud_nuisance_axis(nuisance: float, seed: int = 0):
    """Four categories in 32-d; one extra axis of large category-free noise when ``nuisance`` > 0."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), 60)
    vectors = rng.normal(size=(4, 32))[labels] * 1.5 + rng.normal(size=(240, 32))
    vectors[:, 0] += rng.normal(size=240) * nuisance
    metadata = pd.DataFrame({"id": [f"i{i}" for i in range(240)], "label": labels.astype(str),
                             "split": np.tile(["train", "train", "train", "gallery", "query"], 48)})
    return vectors.astype(np.float32), metadata


def test_distance_and_dimension_scores_every_variant_on_validation_only():
    vectors, metadata = _clusters_with_a_loud_nuisance_axis(nuisance=0)
    table, summary = distance_and_dimension(vectors, metadata, k=5, dims=(4, 8, 64))
    assert table[table["variant"] == "raw"]["distance"].tolist() == ["cosine", "l2", "ip"]
    assert sorted(set(table.loc[table["variant"] != "raw", "dim"])) == [4, 8]  # 64 >= d is left out
    assert set(table["variant"]) == {"raw", "PCA", "PCA+whitening"}
    assert (table["bytes_per_vector_float32"] == 4 * table["dim"]).all()
    assert "precision_at_k" not in table.columns and table["val_precision_at_k"].between(0.7, 1.0).all()
    assert table["chosen"].sum() == 1
    # Validation: 20% of the 144 train images rank the other 80%; the queries are never used to choose.
    assert summary["chosen_on"] == "validation part of the train split (28 images ranking 116)"
    assert summary["query"]["reference"]["n_queries"] == 48
    assert summary["query"]["chosen"]["precision_at_k_ci"][0] <= summary["query"]["chosen"]["precision_at_k"]


def test_distance_and_dimension_keeps_raw_cosine_unless_another_setting_wins_significantly():
    # Nothing to gain: the clusters are isotropic, so raw cosine stays, whatever variant tops the table by chance.
    _, plain = distance_and_dimension(*_clusters_with_a_loud_nuisance_axis(nuisance=0), k=5, dims=(8,))
    assert plain["chosen"] == {"variant": "raw", "distance": "cosine", "dim": 32}
    assert plain["query_gain_over_reference"]["diff"] == 0
    # One loud axis without category information: whitening it down is a large, significant gain.
    _, loud = distance_and_dimension(*_clusters_with_a_loud_nuisance_axis(nuisance=30), k=5, dims=(8,))
    assert loud["chosen"] == {"variant": "PCA+whitening", "distance": "cosine", "dim": 8}
    assert loud["validation_gain_over_reference"]["low"] > 0
    assert loud["query_gain_over_reference"]["low"] > 0   # and it holds on the unseen queries


def test_paired_comparison_finds_a_real_difference_and_names_the_winner():
    rng = np.random.default_rng(1)
    labels = np.repeat(["A", "B", "C"], 40)
    split = np.tile(["gallery", "query"], 60)
    centres = rng.normal(size=(3, 16)) * 4
    clean = centres[np.searchsorted(["A", "B", "C"], labels)] + rng.normal(size=(120, 16))
    noisy = centres[np.searchsorted(["A", "B", "C"], labels)] + rng.normal(size=(120, 16)) * 8
    metadata = pd.DataFrame({"id": [f"i{i}" for i in range(120)], "label": labels, "split": split})
    evaluations = {
        ("clean", "Flat"): evaluate_embeddings(clean.astype(np.float32), metadata, k=5),
        ("noisy", "Flat"): evaluate_embeddings(noisy.astype(np.float32), metadata, k=5),
    }
    comparisons = paired_comparisons(evaluations, n_boot=500)
    precision = comparisons[comparisons["metric"] == "precision_at_k"].iloc[0]
    assert (precision["a"], precision["b"]) == ("clean", "noisy")
    assert precision["a_minus_b"] > 0 and precision["low"] > 0
    assert precision["verdict"] == "clean better"
    table = pd.DataFrame([{"backbone": b, "index": i, **e.summary} for (b, i), e in evaluations.items()])
    best = winners(table, comparisons)
    assert set(best["best"]) == {"clean"} and best["significant_over_all_others"].all()

    same = {("x", "Flat"): evaluations[("clean", "Flat")], ("y", "Flat"): evaluations[("clean", "Flat")]}
    assert set(paired_comparisons(same, n_boot=200)["verdict"]) == {"no significant difference"}
