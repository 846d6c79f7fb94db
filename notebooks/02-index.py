# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · FAISS index variants
# For each backbone's gallery: build time, bytes per vector, queries per second and
# recall@k against exact search, for each index variant. The queries are the query split.

# %% tags=["parameters"]
run_name = "interactive"
indexes = ["Flat", "HNSW32", "IVF{nlist},Flat", "IVF{nlist},PQ{m}", "OPQ{m},IVF{nlist},PQ{m}", "SQ8"]
k = 10
metric = "cosine"
threads = 2

# %%
from fashionrec.pipeline import plots
from fashionrec.pipeline.stages import run_dir, stage_index

table = stage_index(run_name, indexes, k=k, metric=metric, threads=threads)
out = run_dir(run_name)

# %%
# NBVAL_CHECK_OUTPUT
print(table[["backbone", "index", "factory", "status", "bytes_per_vector"]].to_string(index=False))

# %%
table

# %%
plots.index_tradeoff(table, path=out / "figures" / "index_tradeoff.png");
