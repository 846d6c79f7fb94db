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
# Index variants only mean something on a large gallery: on a small one exact search already
# takes microseconds and the IVF variants get a list or two, and the cell below says so.

# %% tags=["parameters"]
run_name = "interactive"
indexes = ["Flat", "HNSW32", "IVF{nlist},Flat", "IVF{nlist},PQ{m}", "OPQ{m},IVF{nlist},PQ{m}", "SQ8"]
k = 10
metric = "cosine"
threads = None

# %%
from fashionrec.pipeline import plots
from fashionrec.pipeline.stages import run_dir, small_gallery_caveat, stage_index

table = stage_index(run_name, indexes, k=k, metric=metric, threads=threads)
out = run_dir(run_name)

# %%
# NBVAL_CHECK_OUTPUT
print(small_gallery_caveat(table) or f"gallery of {table['n_gallery'].max()} vectors: large enough to compare indexes")
print(table[["backbone", "index", "factory", "status", "bytes_per_vector"]].to_string(index=False))

# %%
table

# %%
plots.index_tradeoff(table, path=out / "figures" / "index_tradeoff.png");
