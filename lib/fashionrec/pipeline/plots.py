"""Figures of a run: sample grids, recommendation grids, index trade-offs.

Each function returns a matplotlib Figure and, given ``path``, also saves it (PNG), so a
notebook shows it inline and the report links the file.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

if matplotlib.get_backend().lower().startswith(("qt", "tk", "gtk", "wx", "macosx")):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..data.images import load_image
from ..errors import ImageError

THUMBNAIL = 160
RIGHT, WRONG = "#1a9850", "#d73027"


def _save(figure, path: Path | None):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Fixed metadata so that the same figure gives the same bytes on a rerun.
        figure.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    return figure


def _show_image(axis, path, title: str, color: str | None = None, fontsize: int = 7):
    try:
        image = load_image(path)
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        axis.imshow(np.asarray(image))
    except ImageError as error:
        axis.text(0.5, 0.5, error.reason, ha="center", va="center", fontsize=6, wrap=True)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(title, fontsize=fontsize, color=color or "black")
    if color:
        for spine in axis.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(3)


def sample_grid(catalog: pd.DataFrame, per_category: int = 4, seed: int = 0, path=None):
    """A few images of every category, one row per category."""
    categories = sorted(catalog["label"].unique())
    rng = np.random.default_rng(seed)
    figure, axes = plt.subplots(len(categories), per_category,
                                figsize=(1.4 * per_category, 1.4 * len(categories)), squeeze=False)
    for row, category in enumerate(categories):
        members = catalog[catalog["label"] == category]
        chosen = members.iloc[rng.permutation(len(members))[:per_category]]
        for column in range(per_category):
            axis = axes[row, column]
            if column < len(chosen):
                _show_image(axis, chosen["path"].iloc[column], category if column == 0 else "")
            else:
                axis.axis("off")
    figure.tight_layout()
    return _save(figure, path)


def recommendation_grid(evaluation, query_positions, n_results: int | None = None, title: str = "", path=None):
    """Each row: a query, then its top results with category and score, right ones in green."""
    n_results = n_results or evaluation.result_positions.shape[1]
    figure, axes = plt.subplots(len(query_positions), n_results + 1,
                                figsize=(1.35 * (n_results + 1), 1.6 * len(query_positions)), squeeze=False)
    for row, query in enumerate(query_positions):
        query_row = evaluation.queries.iloc[query]
        _show_image(axes[row, 0], query_row["path"], f"query: {query_row['label']}")
        for column in range(n_results):
            position = evaluation.result_positions[query, column]
            axis = axes[row, column + 1]
            if position < 0:
                axis.axis("off")
                continue
            result = evaluation.gallery.iloc[position]
            right = result["label"] == query_row["label"]
            _show_image(axis, result["path"], f"{result['label']}\n{evaluation.result_scores[query, column]:.3f}",
                        RIGHT if right else WRONG)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def index_tradeoff(table: pd.DataFrame, path=None):
    """Recall@k against exact search versus queries per second and bytes per vector, per backbone."""
    return _recall_tradeoff(table[table["status"] == "ok"], "backbone", "recall_vs_exact",
                            [("qps", "queries / s (log)"), ("bytes_per_vector", "bytes per vector (log)")], path)


def store_tradeoff(table: pd.DataFrame, path=None):
    """Recall@k against exact search versus single-query latency and batch throughput, one colour per store."""
    return _recall_tradeoff(table, "store", "recall_at_k",
                            [("latency_ms_p50", "single-query latency, median (ms, log)"),
                             ("qps", "batch queries / s (log)")], path)


def _recall_tradeoff(table: pd.DataFrame, colour_by: str, recall: str, costs: list[tuple[str, str]], path):
    """One panel per (cost column, axis label): recall against that cost on a log axis, each point named by its index."""
    figure, panels = plt.subplots(1, len(costs), figsize=(11, 4))
    for group, rows in table.groupby(colour_by, sort=True):
        for panel, (cost, _) in zip(panels, costs):
            panel.scatter(rows[cost], rows[recall], label=group)
            for _, row in rows.iterrows():
                panel.annotate(row["index"], (row[cost], row[recall]), fontsize=6)
    for panel, (_, label) in zip(panels, costs):
        panel.set(xscale="log", xlabel=label, ylabel="recall@k vs exact search")
    panels[0].legend(fontsize=7)
    figure.tight_layout()
    return _save(figure, path)


def confusion_heatmap(confusion: pd.DataFrame, title: str = "", path=None):
    """Share of the top-k results of each category (columns) for queries of each category (rows)."""
    import seaborn as sns

    size = 0.45 * max(len(confusion.columns), 6)
    figure, axis = plt.subplots(figsize=(size + 2, size))
    sns.heatmap(confusion, annot=len(confusion.columns) <= 20, fmt=".2f", cmap="Blues", vmin=0, vmax=1,
                annot_kws={"fontsize": 6}, cbar_kws={"label": "share of top-k results"}, ax=axis)
    axis.set(xlabel="retrieved category", ylabel="query category", title=title)
    figure.tight_layout()
    return _save(figure, path)


def category_confusion(classification: dict, title: str = "", path=None):
    """Classifier confusion matrix (``finetune.category_metrics``): counts, coloured by row share."""
    labels = classification["confusion_matrix"]["labels"]
    matrix = np.array(classification["confusion_matrix"]["matrix"])
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 0.45 * max(len(labels), 6)
    figure, axis = plt.subplots(figsize=(size + 2, size))
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    axis.set_yticks(range(len(labels)), labels, fontsize=7)
    if len(labels) <= 20:
        for i, j in zip(*np.nonzero(matrix)):
            axis.text(j, i, matrix[i, j], ha="center", va="center", fontsize=6,
                      color="white" if shares[i, j] > 0.5 else "black")
    axis.set(xlabel="predicted category", ylabel="true category", title=title)
    figure.colorbar(image, ax=axis, label="share of the row's queries")
    figure.tight_layout()
    return _save(figure, path)


def umap_side_by_side(points: dict, labels: dict, paths: dict | None = None, thumbnails_per_plot: int = 0,
                      seed: int = 0, path=None):
    """One UMAP scatter per backbone, coloured by category, optionally with a few thumbnails."""
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    names = list(points)
    categories = sorted(set(np.concatenate([np.asarray(labels[name]) for name in names])))
    palette = plt.get_cmap("tab20", max(len(categories), 1))
    colour = {category: palette(i) for i, category in enumerate(categories)}
    figure, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 5), squeeze=False)
    rng = np.random.default_rng(seed)
    for axis, name in zip(axes[0], names):
        xy, point_labels = points[name], np.asarray(labels[name])
        for category in categories:
            mask = point_labels == category
            axis.scatter(xy[mask, 0], xy[mask, 1], s=5, color=colour[category], label=category)
        if paths is not None and thumbnails_per_plot:
            for position in rng.choice(len(xy), size=min(thumbnails_per_plot, len(xy)), replace=False):
                try:
                    image = load_image(paths[name][position])
                except ImageError:
                    continue
                image.thumbnail((40, 40))
                axis.add_artist(AnnotationBbox(OffsetImage(np.asarray(image), zoom=1), xy[position], frameon=False))
        axis.set(title=name, xticks=[], yticks=[])
    axes[0, -1].legend(fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1, 0.5))
    figure.tight_layout()
    return _save(figure, path)


def metrics_with_intervals(table: pd.DataFrame, metric_names, index: str, path=None):
    """Point estimates with 95% bootstrap intervals, one panel per metric, backbones side by side."""
    rows = table[table["index"] == index].sort_values("backbone")
    figure, axes = plt.subplots(1, len(metric_names), figsize=(3.6 * len(metric_names), 3.2), squeeze=False)
    for axis, name in zip(axes[0], metric_names):
        low = rows[f"{name}_ci"].str[0].to_numpy()
        high = rows[f"{name}_ci"].str[1].to_numpy()
        values = rows[name].to_numpy()
        axis.errorbar(values, np.arange(len(rows)), xerr=[values - low, high - values], fmt="o", capsize=3)
        axis.set(yticks=np.arange(len(rows)), yticklabels=rows["backbone"], title=f"{name} (95% CI)", xlim=(0, 1))
    figure.suptitle(f"index {index}", fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def recommendations(queries, title: str = "", path=None):
    """One row per query: the query photo, then its results with label and score, best first.

    ``queries``: (query image — a path or a PIL image, caption, Recommendation, query label or
    None) tuples. With a query label, results of that category are framed green, others red.
    """
    n_results = max((len(answer.results) for _, _, answer, _ in queries), default=0)
    figure, axes = plt.subplots(len(queries), n_results + 1, figsize=(1.45 * (n_results + 1), 1.75 * len(queries)),
                                squeeze=False)
    for row, (image, caption, answer, label) in enumerate(queries):
        _show_query(axes[row, 0], image, caption)
        for column in range(n_results):
            axis = axes[row, column + 1]
            if column >= len(answer.results):
                axis.axis("off")
                continue
            item = answer.results[column]
            color = None if label is None else RIGHT if item.label == label else WRONG
            _show_image(axis, item.path, result_caption(item), color)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def result_caption(item) -> str:
    """Label (a predicted one marked ``?`` with its probability), score, and the item's attributes, one per line."""
    label = item.label if item.label_probability is None else f"{item.label}? ({item.label_probability:.0%})"
    attributes = [f"{column} {value:g}" if isinstance(value, float) else f"{column} {value}"
                  for column, value in item.attributes.items() if value is not None]
    return "\n".join([label, f"{item.score:.3f}", *attributes[:3]])


def _show_query(axis, image, caption: str):
    if isinstance(image, (str, Path)):
        _show_image(axis, image, caption, fontsize=7)
        return
    shown = image.copy()
    shown.thumbnail((THUMBNAIL, THUMBNAIL))
    axis.imshow(np.asarray(shown))
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(caption, fontsize=7)


def colour_tradeoff(rows: list[dict], relevance: list[str], k: int, suggested: float | None = None, path=None):
    """Category P@k against attribute P@k, one point per colour weight w, with their 95% intervals."""
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        x, y = row["category_precision_at_k"], row["precision_at_k"]
        (x_low, x_high), (y_low, y_high) = row["category_precision_at_k_ci"], row["precision_at_k_ci"]
        chosen = suggested is not None and row["colour_weight"] == suggested
        axis.errorbar(x, y, xerr=[[x - x_low], [x_high - x]], yerr=[[y - y_low], [y_high - y]], fmt="o",
                      color=RIGHT if chosen else "#4575b4", capsize=3)
        axis.annotate(f"w={row['colour_weight']:g}" + (" (suggested on validation)" if chosen else ""), (x, y),
                      textcoords="offset points", xytext=(6, 4), fontsize=8)
    axis.plot([row["category_precision_at_k"] for row in rows], [row["precision_at_k"] for row in rows],
              color="#999999", linewidth=0.8, zorder=0)
    axis.set_xlabel(f"category P@{k} (same label)")
    axis.set_ylabel(f"P@{k}, relevant = same {', '.join(relevance)}")
    axis.set_title("colour weight: category vs look")
    axis.grid(alpha=0.3)
    return _save(figure, path)


def quality_cost(table: pd.DataFrame, k: int = 10, path=None):
    """P@k with its 95% interval against milliseconds per photo, one point per model (``distil.csv``'s columns)."""
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for _, row in table.iterrows():
        errors = [[row["precision_at_k"] - row["precision_at_k_low"]], [row["precision_at_k_high"] - row["precision_at_k"]]]
        axis.errorbar(row["ms_per_image"], row["precision_at_k"], yerr=errors, fmt="o", capsize=4)
        axis.annotate(row["model"], (row["ms_per_image"], row["precision_at_k"]), textcoords="offset points",
                      xytext=(6, -10), fontsize=7)
    axis.set_xscale("log")
    axis.set_xlabel("milliseconds per photo (decode + preprocess + networks; one process)")
    axis.set_ylabel(f"P@{k} (95% interval)")
    axis.set_title("quality against cost per photo")
    axis.grid(alpha=0.3)
    return _save(figure, path)
