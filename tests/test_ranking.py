"""The ranking core: each policy against its definition computed by hand, on seeded vectors."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fashionrec.errors import FashionRecError
from fashionrec.ranking.rank import (AllowedRows, CategoryBonus, CategoryFilter, ColourFusion, ExcludedRows, LiveRows,
                                     Ranking, gallery_store, rank)
from fashionrec.settings import StoreSettings

N_ROWS, DIM, K = 60, 16, 7


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(N_ROWS, DIM)).astype(np.float32)
    queries = rng.normal(size=(9, DIM)).astype(np.float32)
    categories = np.array(["a", "b", "c"])[rng.integers(0, 3, N_ROWS)]
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)   # noqa: E731
    return rows, queries, categories, unit(queries) @ unit(rows).T


def _expected(similarity, allowed, k, bonus=None):
    """Top-k by similarity (+ bonus) over the allowed rows, ties by row number: the definition."""
    keys = similarity + (0 if bonus is None else bonus)
    candidates = np.flatnonzero(allowed)
    return candidates[np.lexsort((candidates, -keys[candidates]))][:k]


def test_row_filters_compose_and_every_one_holds(case):
    rows, queries, categories, similarity = case
    deleted = np.zeros(N_ROWS, bool)
    deleted[::5] = True
    attribute = np.arange(N_ROWS) % 3 != 1        # e.g. colour=Red, computed from an items table
    filters = (LiveRows(deleted), CategoryFilter("a", categories), ExcludedRows((2, 3, 4)), AllowedRows(attribute))
    allowed = ~deleted & (categories == "a") & attribute
    allowed[[2, 3, 4]] = False
    with gallery_store(StoreSettings(), rows, categories) as store:
        scores, found = rank(store, queries, K, Ranking(filters))
    for i in range(len(queries)):
        expected = _expected(similarity[i], allowed, K)
        assert found[i][:len(expected)].tolist() == expected.tolist()
        assert (found[i][len(expected):] == -1).all() and np.isnan(scores[i][len(expected):]).all()
        np.testing.assert_allclose(scores[i][:len(expected)], similarity[i][expected], atol=1e-5)


@pytest.mark.parametrize("boost", [0.05, 0.2, math.inf])
def test_the_category_bonus_is_similarity_plus_boost_for_the_querys_category(case, boost):
    rows, queries, categories, similarity = case
    query_categories = np.array(["a", "b", "c"] * 3)
    bonus = CategoryBonus(boost, categories, "predicted")
    with gallery_store(StoreSettings(), rows, categories) as store:
        scores, found = rank(store, queries, K, Ranking(bonus=bonus), query_categories=query_categories)
    for i, category in enumerate(query_categories):
        extra = np.where(categories == category, 4.0 if math.isinf(boost) else boost, 0.0)
        expected = _expected(similarity[i], np.ones(N_ROWS, bool), K, extra)
        assert found[i].tolist() == expected.tolist()
        np.testing.assert_allclose(scores[i], similarity[i][expected], atol=1e-5)   # scores stay similarities


def test_known_and_predicted_gallery_categories_are_one_code_path(case):
    """The same categories give the same ranking whichever the policy says they are."""
    rows, queries, categories, _ = case
    query_categories = np.array(["b"] * len(queries))
    with gallery_store(StoreSettings(), rows, categories) as store:
        known = rank(store, queries, K, Ranking(bonus=CategoryBonus(0.1, categories, "known")),
                     query_categories=query_categories)
        predicted = rank(store, queries, K, Ranking(bonus=CategoryBonus(0.1, categories, "predicted")),
                         query_categories=query_categories)
    assert (known[1] == predicted[1]).all()
    assert CategoryBonus(math.inf, categories, "known").describe() == {"boost": "inf", "categories": "known"}
    with pytest.raises(FashionRecError, match="known, predicted"):
        CategoryBonus(0.1, categories, "guessed")


def test_bonus_fusion_and_filters_combine(case):
    rows, queries, categories, similarity = case
    colour = np.abs(np.random.default_rng(1).normal(size=(N_ROWS, 5)))
    query_colour = np.abs(np.random.default_rng(2).normal(size=(len(queries), 5)))
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)   # noqa: E731
    fused = 0.75 * similarity + 0.25 * unit(query_colour) @ unit(colour).T
    allowed = np.ones(N_ROWS, bool)
    allowed[[0, 1]] = False
    ranking = Ranking((ExcludedRows((0, 1)),), CategoryBonus(0.1, categories, "known"), ColourFusion(0.25, colour))
    with gallery_store(StoreSettings(), rows, categories) as store:
        scores, found = rank(store, queries, K, ranking, query_categories=["c"] * len(queries),
                             query_colour=query_colour)
    for i in range(len(queries)):
        expected = _expected(fused[i], allowed, K, np.where(categories == "c", 0.1, 0.0))
        assert found[i].tolist() == expected.tolist()
        np.testing.assert_allclose(scores[i], fused[i][expected], atol=1e-5)


def test_bad_policy_parameters_are_refused(case):
    _, _, categories, _ = case
    with pytest.raises(FashionRecError, match="one value per row"):
        AllowedRows(np.ones(3, bool)).mask(N_ROWS)
    with pytest.raises(FashionRecError, match=">= 0"):
        CategoryBonus(-1.0, categories)
    with pytest.raises(FashionRecError, match=r"\(0, 1\]"):
        ColourFusion(0.0, np.ones((N_ROWS, 3)))
