# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Distance, dimension, UMAP and the run's report
# What does a smaller vector cost? Cosine vs Euclidean vs inner product on raw features, and
# PCA (with and without regularised whitening) to fewer dimensions, by exact search. Every
# variant is scored on a validation part of the train split; the best replaces raw cosine
# only when its validation gain is significant, and only the chosen setting is scored on the
# queries. Then a 2-D UMAP of each backbone's gallery, and `report.md`, which gathers the
# run's protocol and results.

# %% tags=["parameters"]
run_name = "interactive"
k = 10
pca_dims = [64, 128, 256]
params_file = None

# %%
from fashionrec.pipeline.report import write_report
from fashionrec.pipeline.stages import stage_distance_dimension, stage_umap

table, chosen = stage_distance_dimension(run_name, k=k, dims=pca_dims)

# %% [markdown]
# Variants compared per backbone, and raw cosine on the queries (two decimals: the last
# digits of a ranking depend on the machine's BLAS).

# %%
# NBVAL_CHECK_OUTPUT
for backbone, summary in chosen.items():
    reference = summary["query"]["reference"]
    print(f"{backbone}: {int((table['backbone'] == backbone).sum())} variants on validation; "
          f"raw cosine on the queries P@{k} {reference['precision_at_k']:.2f}")

# %% [markdown]
# The chosen setting per backbone, on the queries, with its interval and its paired difference
# from raw cosine:

# %%
for backbone, summary in chosen.items():
    picked, gain = summary["query"]["chosen"], summary["query_gain_over_reference"]
    print(f"{backbone}: {summary['chosen']} -> P@{k} {picked['precision_at_k']:.3f} "
          f"[{picked['precision_at_k_ci'][0]:.3f}, {picked['precision_at_k_ci'][1]:.3f}], "
          f"vs raw cosine {gain['diff']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]")

# %% [markdown]
# Every variant on the validation part:

# %%
table.round(3)

# %%
stage_umap(run_name);

# %%
report = write_report(run_name, params_file=params_file)
print(f"report written: {report.name}")
