# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · Scale out: FAISS and Milvus on the same embeddings
# The run's embeddings (01-embed, the first of `backbones` it could run) go into the in-process FAISS store
# and into Milvus (Milvus Lite from `results/<run_name>/milvus.db` by default; a server or
# cluster URI runs the same code) with the same ids: the catalog is every image outside the
# query split, the queries are the query split. Exact search is compared slot by slot; then
# each store's approximate indexes are measured: recall@k against exact search, batch queries
# per second and single-query latency. Milvus Lite runs inside this kernel, so its latencies
# include gRPC and Python overhead that a server spends elsewhere.

# %% tags=["parameters"]
run_name = "interactive"
backbones = ["efficientnet_lite0", "colorhist"]
k = 10
metric = "cosine"
milvus_uri = None
store_faiss_indexes = ["HNSW32", "IVF{nlist},Flat", "IVF{nlist},SQ8", "HNSW32_SQ8"]
store_milvus_indexes = ["HNSW32", "IVF{nlist},Flat", "IVF{nlist},SQ8", "HNSW32_SQ8", "AUTOINDEX"]

# %%
from fashionrec.pipeline import plots
from fashionrec.pipeline.scale_out import stage_store_comparison
from fashionrec.pipeline.stages import run_dir

comparison = stage_store_comparison(run_name, backbones, k=k, metric=metric, faiss_indexes=store_faiss_indexes,
                                    milvus_indexes=store_milvus_indexes, milvus_uri=milvus_uri)
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
print(f"{comparison.backbone}: {exact['n_queries']} queries -> {exact['n_catalog']} catalog images, "
      f"top-{exact['k']} by {exact['metric']}")
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
# Each store's own ANN indexes over the same catalog. `HNSW32`, `IVF{nlist},Flat`,
# `IVF{nlist},SQ8` and `HNSW32_SQ8` name the same algorithm with the same parameters in both
# (Milvus: HNSW, IVF_FLAT, IVF_SQ8, HNSW_SQ; Milvus Lite builds them with faiss too);
# `AUTOINDEX` is Milvus's own choice (HNSW in Milvus Lite). Milvus Lite 3.2.2 cannot build
# IVF_PQ, DiskANN or ScaNN; a Milvus server can.

# %%
# NBVAL_CHECK_OUTPUT
print(comparison.small_catalog_caveat() or f"catalog of {exact['n_catalog']} vectors")
print(comparison.ann[["store", "index", "engine_index", "n"]].to_string(index=False))

# %% [markdown]
# Recall@k against exact search, build time (adding the rows and building the index), batch
# queries per second and single-query latency (median, 95th percentile), measured now:

# %%
comparison.ann.round(4)

# %%
plots.store_tradeoff(comparison.ann, path=out / "figures" / "store_tradeoff.png");
