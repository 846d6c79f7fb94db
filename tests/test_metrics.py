"""Metric values checked against hand computations on tiny fixtures, plus bootstrap behaviour."""

from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from fashionrec.ranking import metrics

# Two queries, four ranked results each.
#   query 0: relevant at ranks 1 and 3, 3 relevant items in the gallery
#   query 1: relevant at rank 4 only,   1 relevant item in the gallery
RELEVANCE = np.array([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)
N_RELEVANT = np.array([3, 1])


def as_floats(*fractions):
    return np.array([float(Fraction(f)) for f in fractions])


# Hand computation, per k (q0 | q1):
#   precision: k=2: 1/2 | 0     k=3: 2/3 | 0     k=4: 2/4 | 1/4
#   hit rate:  k=2: 1   | 0     k=3: 1   | 0     k=4: 1   | 1
#   recall:    k=2: 1/3 | 0/1   k=3: 2/3 | 0     k=4: 2/3 | 1/1
#   AP (sum of P@i at relevant ranks i <= k, over min(k, n_relevant)):
#     q0 k=2: P@1 = 1                 -> 1 / min(2, 3) = 1/2
#     q0 k=3: P@1 + P@3 = 1 + 2/3     -> (5/3) / min(3, 3) = 5/9
#     q0 k=4: same hits as k=3        -> (5/3) / min(4, 3) = 5/9
#     q1 k=2, k=3: no hit             -> 0
#     q1 k=4: P@4 = 1/4               -> (1/4) / min(4, 1) = 1/4
EXPECTED = {
    2: {
        "precision_at_k": as_floats("1/2", "0"),
        "hit_rate_at_k": as_floats("1", "0"),
        "recall_at_k": as_floats("1/3", "0"),
        "map_at_k": as_floats("1/2", "0"),
    },
    3: {
        "precision_at_k": as_floats("2/3", "0"),
        "hit_rate_at_k": as_floats("1", "0"),
        "recall_at_k": as_floats("2/3", "0"),
        "map_at_k": as_floats("5/9", "0"),
    },
    4: {
        "precision_at_k": as_floats("1/2", "1/4"),
        "hit_rate_at_k": as_floats("1", "1"),
        "recall_at_k": as_floats("2/3", "1"),
        "map_at_k": as_floats("5/9", "1/4"),
    },
}


@pytest.mark.parametrize("k", [2, 3, 4])
def test_each_metric_matches_hand_computation(k):
    expected = EXPECTED[k]
    np.testing.assert_allclose(metrics.precision_at_k(RELEVANCE, k), expected["precision_at_k"])
    np.testing.assert_allclose(metrics.hit_rate_at_k(RELEVANCE, k), expected["hit_rate_at_k"])
    np.testing.assert_allclose(
        metrics.recall_at_k(RELEVANCE, N_RELEVANT, k), expected["recall_at_k"]
    )
    np.testing.assert_allclose(
        metrics.average_precision_at_k(RELEVANCE, N_RELEVANT, k), expected["map_at_k"]
    )


@pytest.mark.parametrize("k", [2, 3, 4])
def test_retrieval_metrics_bundles_per_query_arrays(k):
    result = metrics.retrieval_metrics(RELEVANCE, N_RELEVANT, k)
    assert list(result) == [
        "precision_at_k", "hit_rate_at_k", "recall_at_k", "map_at_k", "hit_rate_at_1"
    ]
    for name, expected in EXPECTED[k].items():
        np.testing.assert_allclose(result[name], expected, err_msg=name)
    # Rank 1 is relevant for query 0 only.
    np.testing.assert_array_equal(result["hit_rate_at_1"], [1.0, 0.0])


def test_map_is_mean_of_average_precision():
    # k=4: (5/9 + 1/4) / 2 = (20/36 + 9/36) / 2 = 29/72
    assert metrics.map_at_k(RELEVANCE, N_RELEVANT, 4) == pytest.approx(29 / 72)


def test_zero_one_integers_are_accepted_as_relevance():
    as_ints = RELEVANCE.astype(int).tolist()
    np.testing.assert_allclose(
        metrics.average_precision_at_k(as_ints, [3, 1], 4), EXPECTED[4]["map_at_k"]
    )


def test_query_without_relevant_items_scores_zero_recall_and_ap():
    relevance = np.zeros((1, 3), dtype=bool)
    assert metrics.recall_at_k(relevance, [0], 3).tolist() == [0.0]
    assert metrics.average_precision_at_k(relevance, [0], 3).tolist() == [0.0]
    assert metrics.precision_at_k(relevance, 3).tolist() == [0.0]


def test_ap_normaliser_is_min_of_k_and_n_relevant():
    # Both top-2 results relevant, 5 relevant in the gallery: (1 + 1) / min(2, 5) = 1,
    # while recall is only 2/5.
    full_top_k = np.array([[1, 1, 0]], dtype=bool)
    assert metrics.average_precision_at_k(full_top_k, [5], 2).tolist() == [1.0]
    assert metrics.recall_at_k(full_top_k, [5], 2).tolist() == [pytest.approx(2 / 5)]
    # Single relevant item at rank 2: P@2 = 1/2, over min(3, 1) = 1 -> 1/2.
    late_hit = np.array([[0, 1, 0]], dtype=bool)
    assert metrics.average_precision_at_k(late_hit, [1], 3).tolist() == [0.5]


def test_only_first_k_columns_are_scored():
    # A hit at rank 3 must not count for k=2.
    relevance = np.array([[0, 0, 1]], dtype=bool)
    assert metrics.hit_rate_at_k(relevance, 2).tolist() == [0.0]
    assert metrics.hit_rate_at_k(relevance, 3).tolist() == [1.0]


# --------------------------------------------------------------------------------------------
# Empty input and validation
# --------------------------------------------------------------------------------------------


def test_zero_queries_give_empty_arrays_and_nan_means():
    relevance = np.zeros((0, 4), dtype=bool)
    n_relevant = np.zeros(0, dtype=int)
    result = metrics.retrieval_metrics(relevance, n_relevant, 3)
    assert set(result) == {
        "precision_at_k", "hit_rate_at_k", "recall_at_k", "map_at_k", "hit_rate_at_1"
    }
    for values in result.values():
        assert values.shape == (0,)
        assert values.dtype == float
    assert all(np.isnan(mean) for mean in metrics.summarize(result).values())
    assert np.isnan(metrics.map_at_k(relevance, n_relevant, 3))
    low, high = metrics.bootstrap_ci([])
    assert np.isnan(low) and np.isnan(high)
    paired = metrics.paired_bootstrap([], [])
    assert np.isnan(paired["diff"]) and paired["significant"] is False


@pytest.mark.parametrize("k", [0, -1, 5, 2.0, True, "2", None])
def test_invalid_k_is_rejected(k):
    with pytest.raises(ValueError, match="k must"):
        metrics.precision_at_k(RELEVANCE, k)


@pytest.mark.parametrize(
    "relevance, message",
    [
        (np.array([1, 0, 1]), "2-D"),
        (np.array([[1, 2, 0]]), "0/1"),
        (np.array([[0.5, 0.0]]), "0/1"),
        (np.array([["a", "b"]]), "dtype"),
    ],
)
def test_invalid_relevance_is_rejected(relevance, message):
    with pytest.raises(ValueError, match=message):
        metrics.hit_rate_at_k(relevance, 1)


@pytest.mark.parametrize(
    "n_relevant, message",
    [
        ([3], "shape"),
        ([3, 1, 2], "shape"),
        ([3, -1], ">= 0"),
        ([3.5, 1.0], "whole numbers"),
        # Query 0 shows 2 relevant results but claims only 1 exists.
        ([1, 1], "more relevant results than n_relevant"),
    ],
)
def test_invalid_n_relevant_is_rejected(n_relevant, message):
    with pytest.raises(ValueError, match=message):
        metrics.recall_at_k(RELEVANCE, n_relevant, 2)
    with pytest.raises(ValueError, match=message):
        metrics.average_precision_at_k(RELEVANCE, n_relevant, 2)


def test_inconsistent_n_relevant_is_caught_outside_top_k_too():
    # The surplus hit sits at rank 3, beyond k=1, but the counts are still impossible.
    with pytest.raises(ValueError, match="more relevant results"):
        metrics.recall_at_k(np.array([[1, 0, 1]]), [1], 1)


# --------------------------------------------------------------------------------------------
# Labels -> relevance
# --------------------------------------------------------------------------------------------


def test_relevance_from_labels_compares_each_result_with_its_query():
    result = metrics.relevance_from_labels(
        ["Shirt", "Pants"], [["Shirt", "T-Shirt"], ["Shoes", "Pants"]]
    )
    assert result.dtype == bool
    np.testing.assert_array_equal(result, [[True, False], [False, True]])


def test_missing_results_are_not_relevant():
    # An approximate index can return fewer than k hits; callers mark those slots with None.
    gallery = np.array(["Shirt", "Pants"], dtype=object)
    positions = np.array([[0, -1]])
    result_labels = np.where(positions >= 0, gallery[np.clip(positions, 0, None)], None)
    relevance = metrics.relevance_from_labels(np.array(["Shirt"], dtype=object), result_labels)
    np.testing.assert_array_equal(relevance, [[True, False]])


def test_relevance_from_labels_rejects_row_count_mismatch():
    with pytest.raises(ValueError, match="rows"):
        metrics.relevance_from_labels(["Shirt"], [["Shirt"], ["Pants"]])


def test_n_relevant_from_labels_counts_gallery_items_per_category():
    # Gallery: a x2, b x1, c x1; "d" is absent.
    counts = metrics.n_relevant_from_labels(["a", "c", "d", "a"], ["a", "b", "a", "c"])
    np.testing.assert_array_equal(counts, [2, 1, 0, 2])
    # "zz" sorts after every gallery label, which is the edge of the lookup.
    np.testing.assert_array_equal(metrics.n_relevant_from_labels(["zz"], ["a"]), [0])
    np.testing.assert_array_equal(metrics.n_relevant_from_labels(["a"], []), [0])


def test_labels_pipeline_end_to_end():
    gallery = np.array(["Shirt", "T-Shirt", "Shirt", "Pants", "Shirt"])
    queries = np.array(["Shirt", "Pants"])
    ranked_ids = np.array([[1, 0, 4], [3, 2, 1]])
    relevance = metrics.relevance_from_labels(queries, gallery[ranked_ids])
    n_relevant = metrics.n_relevant_from_labels(queries, gallery)
    # Shirt query: ranks 2 and 3 relevant, 3 shirts -> recall@3 = 2/3.
    # Pants query: rank 1 relevant, 1 pants -> recall@3 = 1.
    np.testing.assert_allclose(metrics.recall_at_k(relevance, n_relevant, 3), [2 / 3, 1.0])


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def test_summarize_returns_float_means():
    summary = metrics.summarize({"p": np.array([1.0, 0.0, 0.5]), "h": [1, 1, 0]})
    assert summary == {"p": pytest.approx(0.5), "h": pytest.approx(2 / 3)}
    assert all(type(value) is float for value in summary.values())


def test_summarize_rejects_ragged_arrays():
    with pytest.raises(ValueError, match="same length"):
        metrics.summarize({"p": [1.0, 0.0], "h": [1.0]})


def test_per_category_means_and_support_sorted_by_name():
    per_query = {"p": [1.0, 0.0, 0.5], "h": [1.0, 0.0, 1.0]}
    # b: queries 0 and 2 -> p = (1 + 0.5) / 2 = 0.75, h = 1;  a: query 1 -> p = 0, h = 0.
    table = metrics.per_category(per_query, ["b", "a", "b"])
    expected = pd.DataFrame(
        {"p": [0.0, 0.75], "h": [0.0, 1.0], "support": [1, 2]},
        index=pd.Index(["a", "b"], name="category"),
    )
    pd.testing.assert_frame_equal(table, expected)


def test_per_category_rejects_label_count_mismatch():
    with pytest.raises(ValueError, match="query_labels"):
        metrics.per_category({"p": [1.0, 0.0]}, ["a"])


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


@pytest.fixture
def scores():
    return np.random.default_rng(123).uniform(size=200)


def test_bootstrap_is_deterministic_per_seed(scores):
    assert metrics.bootstrap_ci(scores, seed=7) == metrics.bootstrap_ci(scores, seed=7)
    assert metrics.bootstrap_ci(scores, seed=7) != metrics.bootstrap_ci(scores, seed=8)


def test_bootstrap_ci_brackets_the_mean(scores):
    low, high = metrics.bootstrap_ci(scores)
    assert low < scores.mean() < high
    # The standard error of a mean of 200 U(0,1) draws is ~0.02, so a 95% interval is ~0.08
    # wide; bounds this loose still catch a swapped alpha or quantiles of the raw values.
    assert 0.04 < high - low < 0.16


def test_bootstrap_ci_narrows_with_larger_alpha(scores):
    low95, high95 = metrics.bootstrap_ci(scores, alpha=0.05)
    low50, high50 = metrics.bootstrap_ci(scores, alpha=0.5)
    assert low95 < low50 < high50 < high95


def test_bootstrap_ci_of_constant_is_zero_width():
    low, high = metrics.bootstrap_ci(np.full(50, 0.3))
    assert low == high
    assert low == pytest.approx(0.3)


def test_bootstrap_does_not_depend_on_chunking(scores, monkeypatch):
    # With only 5 resamples both percentile bounds interpolate between resample means, so a
    # resample dropped or duplicated at a chunk boundary moves them.
    whole = metrics.bootstrap_ci(scores, n_boot=5, seed=3)
    # 450 elements per chunk -> 2 resamples of 200 per chunk, the last chunk holds a single one.
    monkeypatch.setattr(metrics, "_BOOTSTRAP_CHUNK_ELEMENTS", 450)
    assert metrics.bootstrap_ci(scores, n_boot=5, seed=3) == whole


def test_bootstrap_cis_resample_same_queries_for_every_metric(scores):
    cis = metrics.bootstrap_cis({"x": scores, "doubled": 2 * scores, "flipped": 1 - scores})
    assert cis["x"] == metrics.bootstrap_ci(scores)
    # With shared indices each resample's mean of 2x is exactly twice that of x, and of 1-x is
    # one minus it; independent resamples would give unrelated bounds.
    low, high = cis["x"]
    assert cis["doubled"] == pytest.approx((2 * low, 2 * high), abs=1e-12)
    assert cis["flipped"] == pytest.approx((1 - high, 1 - low), abs=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_boot": 0}, "n_boot"),
        ({"n_boot": 10.5}, "n_boot"),
        ({"seed": None}, "seed"),
        ({"seed": -1}, "seed"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": 1}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
    ],
)
def test_bootstrap_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        metrics.bootstrap_ci([0.1, 0.2], **kwargs)
    with pytest.raises(ValueError, match=message):
        metrics.paired_bootstrap([0.1, 0.2], [0.2, 0.1], **kwargs)


@pytest.mark.parametrize(
    "values, message",
    [([0.1, np.nan], "NaN"), ([[0.1, 0.2]], "1-D"), ([0.1, np.inf], "infinite")],
)
def test_bootstrap_rejects_bad_values(values, message):
    with pytest.raises(ValueError, match=message):
        metrics.bootstrap_ci(values)


def test_paired_bootstrap_detects_consistent_small_gain(scores):
    # Per-query difficulty varies across [0, 1]; system a is better by ~0.05 on every query.
    noise = np.random.default_rng(5).normal(scale=0.01, size=scores.size)
    better = scores + 0.05 + noise
    result = metrics.paired_bootstrap(better, scores)
    assert result["diff"] == pytest.approx(np.mean(better - scores))
    assert 0 < result["low"] < result["diff"] < result["high"]
    assert result["significant"] is True
    # The unpaired intervals overlap, so only pairing reveals the gain.
    low_a, _ = metrics.bootstrap_ci(better)
    _, high_b = metrics.bootstrap_ci(scores)
    assert low_a < high_b


def test_paired_bootstrap_detects_loss_as_significant(scores):
    result = metrics.paired_bootstrap(scores - 0.2, scores)
    assert result["high"] < 0
    assert result["significant"] is True


def test_paired_bootstrap_identical_arrays_not_significant(scores):
    result = metrics.paired_bootstrap(scores, scores.copy())
    assert result == {"diff": 0.0, "low": 0.0, "high": 0.0, "significant": False}


def test_paired_bootstrap_is_bootstrap_of_differences(scores):
    other = np.random.default_rng(9).uniform(size=scores.size)
    result = metrics.paired_bootstrap(scores, other, n_boot=300, seed=4, alpha=0.1)
    expected = metrics.bootstrap_ci(scores - other, n_boot=300, seed=4, alpha=0.1)
    assert (result["low"], result["high"]) == expected
    assert result["significant"] == (not expected[0] <= 0 <= expected[1])


def test_paired_bootstrap_rejects_length_mismatch():
    with pytest.raises(ValueError, match="lengths 3 and 2"):
        metrics.paired_bootstrap([0.1, 0.2, 0.3], [0.1, 0.2])


# --------------------------------------------------------------------------------------------
# Retrieval confusion
# --------------------------------------------------------------------------------------------

QUERY_LABELS = ["T-Shirt", "T-Shirt", "Shirt"]
RESULT_LABELS = [
    ["Shirt", "T-Shirt", "Pants"],
    ["T-Shirt", "T-Shirt", "Shirt"],
    ["Shirt", "Pants", "Pants"],
]


def test_retrieval_confusion_shares_at_k2():
    # k=2, T-Shirt queries' 4 results: Shirt 1, T-Shirt 3 -> 1/4, 3/4.
    #      Shirt query's 2 results:    Shirt 1, Pants 1   -> 1/2, 1/2.
    table = metrics.retrieval_confusion(QUERY_LABELS, RESULT_LABELS, 2)
    expected = pd.DataFrame(
        [[0.5, 0.5, 0.0], [0.0, 0.25, 0.75]],
        index=pd.Index(["Shirt", "T-Shirt"], name="query_category"),
        columns=pd.Index(["Pants", "Shirt", "T-Shirt"], name="retrieved_category"),
    )
    pd.testing.assert_frame_equal(table, expected)
    np.testing.assert_allclose(table.sum(axis=1), 1.0)


def test_retrieval_confusion_ignores_results_beyond_k():
    # k=1: T-Shirt queries' top results are Shirt and T-Shirt; the Shirt query's is Shirt.
    # Pants only appears below rank 1, so it is not a column.
    table = metrics.retrieval_confusion(QUERY_LABELS, RESULT_LABELS, 1)
    assert list(table.columns) == ["Shirt", "T-Shirt"]
    assert table.loc["T-Shirt"].tolist() == [0.5, 0.5]
    assert table.loc["Shirt"].tolist() == [1.0, 0.0]


def test_retrieval_confusion_follows_given_categories():
    table = metrics.retrieval_confusion(
        QUERY_LABELS, RESULT_LABELS, 2, categories=["T-Shirt", "Shirt", "Pants", "Dress"]
    )
    # Columns in the given order, including Dress that nobody retrieved; rows only for
    # categories that have queries, so every row still sums to 1.
    assert list(table.columns) == ["T-Shirt", "Shirt", "Pants", "Dress"]
    assert list(table.index) == ["T-Shirt", "Shirt"]
    assert table.loc["T-Shirt"].tolist() == [0.75, 0.25, 0.0, 0.0]


def test_retrieval_confusion_rejects_labels_outside_categories():
    with pytest.raises(ValueError, match="Pants"):
        metrics.retrieval_confusion(QUERY_LABELS, RESULT_LABELS, 2, categories=["Shirt", "T-Shirt"])


def test_retrieval_confusion_validates_k():
    with pytest.raises(ValueError, match="k must"):
        metrics.retrieval_confusion(QUERY_LABELS, RESULT_LABELS, 4)
