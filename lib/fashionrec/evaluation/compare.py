"""Paired comparisons between backbones and the winner per metric.

Every comparison is paired on the same queries: two backbones are scored on the same
query images against galleries of the same images, and the difference is bootstrapped
over queries. A difference whose interval covers zero is reported as not significant.
"""
from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd

from ..ranking import metrics
from .protocol import Evaluation

COMPARED_METRICS = ("precision_at_k", "hit_rate_at_1", "map_at_k")


def _aligned(first: Evaluation, second: Evaluation) -> None:
    if not np.array_equal(first.queries["id"].to_numpy(), second.queries["id"].to_numpy()):
        raise ValueError("paired comparison needs the same queries in the same order")


def paired_comparisons(evaluations: dict, metric_names=COMPARED_METRICS, n_boot: int = 1000,
                       seed: int = 0) -> pd.DataFrame:
    """Every pair of backbones evaluated with the same index: mean difference and its 95% interval."""
    rows = []
    by_index: dict[str, list[str]] = {}
    for backbone, index in evaluations:
        by_index.setdefault(index, []).append(backbone)
    for index, backbones in by_index.items():
        for first, second in combinations(sorted(backbones), 2):
            a, b = evaluations[(first, index)], evaluations[(second, index)]
            _aligned(a, b)
            for name in metric_names:
                result = metrics.paired_bootstrap(a.per_query[name], b.per_query[name], n_boot=n_boot, seed=seed)
                rows.append({"index": index, "metric": name, "a": first, "b": second,
                             "a_minus_b": result["diff"], "low": result["low"], "high": result["high"],
                             "verdict": _verdict(first, second, result)})
    return pd.DataFrame(rows, columns=["index", "metric", "a", "b", "a_minus_b", "low", "high", "verdict"])


def _verdict(first: str, second: str, result: dict) -> str:
    if not result["significant"]:
        return "no significant difference"
    return f"{first} better" if result["diff"] > 0 else f"{second} better"


def winners(table: pd.DataFrame, comparisons: pd.DataFrame, metric_names=COMPARED_METRICS) -> pd.DataFrame:
    """Per index and metric: the best backbone, and whether it beats every other one significantly."""
    rows = []
    for index, group in table.groupby("index", sort=False):
        for name in metric_names:
            ranked = group.sort_values(name, ascending=False)
            best = ranked.iloc[0]["backbone"]
            pairs = comparisons[(comparisons["index"] == index) & (comparisons["metric"] == name)
                                & ((comparisons["a"] == best) | (comparisons["b"] == best))]
            significant = len(pairs) > 0 and bool((pairs["verdict"] == f"{best} better").all())
            rows.append({"index": index, "metric": name, "best": best, "value": ranked.iloc[0][name],
                         "significant_over_all_others": significant})
    return pd.DataFrame(rows)


