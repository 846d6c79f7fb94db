# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Recommend: a photo in, similar products out
# The run's catalog becomes a servable index folder (`results/<run_name>/index/`, the format
# `python -m fashionrec index` writes and the app serves), then photos are answered through
# `fashionrec.Recommender`: each is decoded and embedded afresh, the index returns the `k` most
# similar catalog items. `query_images` lists photos to ask about (any image file, inside the
# catalog or not); left empty, `n_grid_queries` catalog photos are picked (seeded), each left
# out of its own results. The catalog is the one 00-prepare-data wrote for this run; run alone,
# the notebook loads `dataset` with these parameters. The last cell is interactive: upload or
# pick a photo, choose `k` and a category.
#
# The values below are the demo of a notebook run by hand; `make pipeline` passes every
# parameter of its file (docs/parameters.md).

# %% tags=["parameters"]
run_name = "interactive"
dataset = "fashion-mnist"
data_dir = None
max_per_class = 40
split_seed = 0
category_map = None
columns = None
image_root = None
k = 10
n_grid_queries = 6
recommend_backbone = "efficientnet_lite0"
recommend_index = "auto"
query_images = []

# %%
from pathlib import Path

from fashionrec.pipeline import plots
from fashionrec.pipeline.stages import run_dir, stage_recommender
from fashionrec.pipeline.widgets import catalog_picks, recommender_widget

recommender = stage_recommender(run_name, recommend_backbone, index=recommend_index, dataset=dataset,
                                data_dir=data_dir, split_seed=split_seed, max_per_class=max_per_class,
                                category_map=category_map, columns=columns, image_root=image_root)
described = recommender.describe()
out = run_dir(run_name)

# %% [markdown]
# The index: how many items of which categories, which backbone, index and metric.

# %%
# NBVAL_CHECK_OUTPUT
print(f"{described['n_items']} items in {len(described['categories'])} categories, {described['backbone']} "
      f"({described['runtime']}), index {described['index']}, {described['metric']}")
print("classifier:", "yes" if described["classifier"] else "none (a fine-tuned +head: model may carry one)")

# %% [markdown]
# Each query's results, best first, with category and cosine score (green: same category as
# a catalog query, red: another one).

# %%
if query_images:
    queries = [(str(path), Path(path).name, recommender.recommend(path, k=k), None) for path in query_images]
else:
    queries = []
    for item_id in catalog_picks(recommender, n_grid_queries, seed=split_seed):
        item = recommender.item(item_id)
        queries.append((item.path, f"{item.label} · {item.id}",
                        recommender.recommend(item.path, k=k, exclude_ids=[item_id]), item.label))
plots.recommendations(queries, title=f"{recommend_backbone} · {described['index']} · k={k}",
                      path=out / "figures" / "recommendations.png");

# %% [markdown]
# What every answer must satisfy, whatever the machine: `k` results, scores best first,
# "more like this" on a result returns that item first, and a category filter returns only
# that category.

# %%
# NBVAL_CHECK_OUTPUT
for _, caption, answer, _ in queries:
    scores = [item.score for item in answer.results]
    print(f"{len(answer.results)} results (k={k}), scores descending: {scores == sorted(scores, reverse=True)}, "
          f"stages timed: {sorted(answer.timing_ms)}")
first = queries[0][2].results[0]
more = recommender.similar_to(first.id, k=k)
print("more like this starts with the item itself:", more.results[0].id == first.id)
category = described["categories"][0]
filtered = recommender.recommend(queries[0][0], k=k, category=category)
print(f"only {category!r} with the filter:", {item.label for item in filtered.results} == {category},
      f"({len(filtered.results)} results)")

# %% [markdown]
# Timing of these queries on this machine (decode, preprocess, embed, search; milliseconds).
# `benchmarks/query_latency.py` measures latency properly, over 200 photos.

# %%
import pandas as pd

pd.DataFrame([answer.timing_ms for _, _, answer, _ in queries], index=[c for _, c, _, _ in queries]).round(2)

# %% [markdown]
# Try it: upload a photo or pick a catalog item, then change `k` or the category.

# %%
recommender_widget(recommender, k=k, seed=split_seed)
