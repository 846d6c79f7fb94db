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
# PCA (with and without whitening) to fewer dimensions, by exact search. Then a 2-D UMAP of
# each backbone's gallery, and `report.md`, which gathers the run's protocol and results.

# %% tags=["parameters"]
run_name = "interactive"
k = 10
pca_dims = [64, 128, 256]
params_file = None

# %%
from fashionrec.report import write_report
from fashionrec.runs import stage_distance_dimension, stage_umap

table = stage_distance_dimension(run_name, k=k, dims=pca_dims)

# %%
# NBVAL_CHECK_OUTPUT
print(table.round(3).to_string(index=False))

# %%
stage_umap(run_name);

# %%
report = write_report(run_name, params_file=params_file)
print(f"report written: {report.name}")
