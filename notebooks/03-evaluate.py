# %% [markdown]
# # 03 · Evaluate retrieval
# Each query image ranks the gallery; a result is relevant when its category equals the
# query's. Precision@k, hit rate@k (at least one relevant in the top k), recall@k (share of
# all relevant gallery images found) and mAP@k, with 95% bootstrap intervals over queries.

# %% tags=["parameters"]
run_name = "interactive"
indexes = ["Flat", "HNSW32"]
k = 10
metric = "cosine"
n_grid_queries = 6

# %%
from fashionrec import plots
from fashionrec.runs import METRIC_COLUMNS, run_dir, stage_evaluate

table, evaluations = stage_evaluate(run_name, indexes, k=k, metric=metric)
out = run_dir(run_name)

# %% [markdown]
# Metrics per backbone and index (query split -> gallery split):

# %%
# NBVAL_CHECK_OUTPUT
print(table[["backbone", "index", "n_queries", "n_gallery", *METRIC_COLUMNS]].round(3).to_string(index=False))

# %% [markdown]
# Top results for a few queries (seeded choice); green = same category as the query.

# %%
for (backbone, index), evaluation in evaluations.items():
    if index == indexes[0]:
        plots.recommendation_grid(evaluation, evaluation.sample_queries(n_grid_queries), title=f"{backbone} · {index}",
                                  path=out / "figures" / f"grid_{backbone}.png")
