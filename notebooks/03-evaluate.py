# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Evaluate retrieval
# Each query image ranks the gallery; a result is relevant when its category equals the
# query's. Precision@k, hit rate@k (at least one relevant in the top k), recall@k (share of
# all relevant gallery images found) and mAP@k, with 95% bootstrap intervals over queries,
# paired comparisons between backbones, per-category tables and failure cases.

# %% tags=["parameters"]
run_name = "interactive"
indexes = ["Flat", "HNSW32", "IVF{nlist},Flat", "IVF{nlist},PQ{m}", "OPQ{m},IVF{nlist},PQ{m}", "SQ8"]
k = 10
metric = "cosine"
n_grid_queries = 6
relevance = ["label"]
colour_weights = []

# %%
from fashionrec.pipeline import plots
from fashionrec.evaluation.analysis import hardest_queries
from fashionrec.ranking.metrics import retrieval_confusion
from fashionrec.pipeline.report import colour_sweep_text, verdict_lines
from fashionrec.pipeline.stages import METRIC_COLUMNS, run_dir, stage_colour_sweep, stage_compare, stage_evaluate

table, evaluations = stage_evaluate(run_name, indexes, k=k, metric=metric, relevance=relevance)
out = run_dir(run_name)
primary = indexes[0]

# %% [markdown]
# Metrics per backbone and index (query split -> gallery split), point estimates. Two
# decimals are checked, for the indexes without trained codes: the third depends on near-tied
# neighbours, which the machine's BLAS and ONNX Runtime kernels may order differently, and
# product-quantiser codes come from a k-means whose last bits differ between CPUs.

# %%
# NBVAL_CHECK_OUTPUT
untrained = ~table["index"].str.contains("PQ")
print(table.loc[untrained, ["backbone", "index", "n_queries", "n_gallery", *METRIC_COLUMNS]].round(2)
      .to_string(index=False))

# %%
table[["backbone", "index", *METRIC_COLUMNS]].round(4)

# %% [markdown]
# The same with 95% bootstrap intervals (resampling queries):

# %%
plots.metrics_with_intervals(table, ["precision_at_k", "hit_rate_at_1", "map_at_k"], primary,
                             path=out / "figures" / "metrics_ci.png");

# %% [markdown]
# Paired comparisons on the same queries: a difference whose interval covers zero is
# "no significant difference". The verdicts, one line per metric and verdict with the indexes
# that gave it (checked for the indexes without trained codes, as above):

# %%
# NBVAL_CHECK_OUTPUT
comparisons, winners = stage_compare(run_name, table, evaluations)
if len(comparisons):
    print("\n".join(verdict_lines(winners[~winners["index"].str.contains("PQ")], value_format=".2f")))
else:
    print("one backbone: nothing to compare")

# %%
print("\n".join(verdict_lines(winners)))
comparisons.round(3)

# %% [markdown]
# Per category (P@k, hit rate, mAP with the number of queries):

# %%
import pandas as pd

per_category = pd.read_csv(out / "per_category.csv")
per_category[per_category["index"] == primary].pivot(index="category", columns="backbone",
                                                     values=["precision_at_k", "support"]).round(3)

# %% [markdown]
# Retrieval confusion: which categories come back for queries of each category.

# %%
for (backbone, index), evaluation in evaluations.items():
    if index == primary:
        result_labels = evaluation.gallery["label"].to_numpy()[evaluation.result_positions]
        confusion = retrieval_confusion(evaluation.queries["label"].to_numpy(), result_labels, k)
        plots.confusion_heatmap(confusion, title=f"{backbone} · top-{k}", path=out / "figures" / f"confusion_{backbone}.png")

# %% [markdown]
# Top results for a few queries (seeded choice), then the hardest queries (lowest AP);
# green = same category as the query.

# %%
for (backbone, index), evaluation in evaluations.items():
    if index == primary:
        plots.recommendation_grid(evaluation, evaluation.sample_queries(n_grid_queries), title=f"{backbone} · {index}",
                                  path=out / "figures" / f"grid_{backbone}.png")
        plots.recommendation_grid(evaluation, hardest_queries(evaluation, n_grid_queries),
                                  title=f"{backbone} · hardest queries", path=out / "figures" / f"hardest_{backbone}.png")

# %% [markdown]
# Look, not only category (`colour_weights`, docs/look.md): each weight w ranks by
# (1 - w) x network + w x product-colour similarity; category P@k against P@k by `relevance`,
# and the w that validation (part of the train split) suggests. Nothing runs when the list is empty.

# %%
sweep = stage_colour_sweep(run_name, colour_weights, k=k, relevance=relevance)
if sweep is not None:
    print(colour_sweep_text(sweep))
