# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · Scale out: FAISS and Milvus on the same embeddings
# The same catalog (every image outside the query split) goes into the in-process FAISS store
# and into Milvus (Milvus Lite from `results/<run_name>/milvus.db` by default; a server or
# cluster URI runs the same code), with the same ids. Exact search is compared slot by slot;
# then each store's approximate indexes are measured: recall@k against exact search, batch
# queries per second and single-query latency. Milvus Lite runs inside this kernel, so its
# latencies include gRPC and Python overhead that a server would spend elsewhere.

# %% tags=["parameters"]
run_name = "interactive"
dataset = "fashion-mnist"
data_dir = None
max_per_class = 200
split_seed = 0
category_map = None
backbone = "efficientnet_lite0"
k = 10
metric = "cosine"
milvus_uri = None
faiss_indexes = ["HNSW32", "IVF{nlist},Flat", "IVF{nlist},SQ8", "HNSW32_SQ8"]
milvus_indexes = ["HNSW32", "IVF{nlist},Flat", "IVF{nlist},SQ8", "HNSW_SQ:M=32,efConstruction=40", "AUTOINDEX"]
single_queries = 100

# %%
from fashionrec.pipeline import plots
from fashionrec.pipeline.scale_out import catalog_and_queries, stage_store_comparison
from fashionrec.pipeline.stages import run_dir

catalog_vectors, catalog, query_vectors, queries = catalog_and_queries(
    dataset, data_dir, max_per_class=max_per_class, split_seed=split_seed, category_map=category_map,
    backbone=backbone)
comparison = stage_store_comparison(run_name, catalog_vectors, catalog, query_vectors, k=k, metric=metric,
                                    faiss_indexes=faiss_indexes, milvus_indexes=milvus_indexes,
                                    milvus_uri=milvus_uri, single_queries=single_queries, seed=split_seed)
out = run_dir(run_name)

# %% [markdown]
# ## Exact search: FAISS `Flat` and Milvus `FLAT`
# The verdict below holds when no query's lists differ at a slot whose two scores differ by
# more than the tie tolerance: where the ids differ, the two engines placed tied items in
# another order. How many rows tie that way depends on float rounding (it varies with the CPU),
# so only the verdict is checked.

# %%
# NBVAL_CHECK_OUTPUT
exact = comparison.exact
print(f"{exact['n_queries']} queries -> {exact['n_catalog']} catalog images, top-{exact['k']} by {exact['metric']}")
print("FAISS and Milvus exact top-k identical up to ties:", exact["other_rows"] == 0)
print("largest score difference below 1e-4:", exact["max_score_difference"] < 1e-4)

# %% [markdown]
# Identical rows, rows that differ only where scores tie, and every differing slot with both
# engines' scores (on this machine):

# %%
print({key: exact[key] for key in ("identical_rows", "tied_rows", "other_rows", "differing_slots",
                                   "max_gap_at_differing_slots", "max_score_difference")})
comparison.differences.head(20)

# %% [markdown]
# ## Approximate indexes
# Each store's own ANN indexes over the same catalog. `HNSW32` and `IVF{nlist},Flat` name the
# same algorithm with the same parameters in both (Milvus builds them with faiss too);
# `HNSW_SQ` and `AUTOINDEX` (HNSW in Milvus Lite) are what Milvus Lite adds. Milvus Lite 3.2.2
# cannot build IVF_PQ, DiskANN or ScaNN; a Milvus server can.

# %%
# NBVAL_CHECK_OUTPUT
print(comparison.ann[["store", "index", "engine_index", "n"]].to_string(index=False))

# %% [markdown]
# Recall@k against exact search, build time (adding the rows and building the index),
# batch queries per second and single-query latency, measured on this machine now:

# %%
comparison.ann.round(4)

# %%
plots.store_tradeoff(comparison.ann, path=out / "figures" / "store_tradeoff.png");
