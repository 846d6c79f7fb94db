# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · Prepare the data
# Load a catalog with one of the named loaders, validate every file, and split it into
# train 60% / gallery 20% / query 20% per category (seeded). Writes `catalog.parquet`,
# `skipped.json` and `prepare.json` under `results/<run_name>/`.

# %% tags=["parameters"]
run_name = "interactive"
dataset = "fashion-mnist"
data_dir = None
max_per_class = 40
split_seed = 0
category_map = None

# %%
from fashionrec.pipeline import plots
from fashionrec.data.split import split_counts
from fashionrec.pipeline.stages import run_dir, stage_prepare

prepared = stage_prepare(run_name, dataset, data_dir, split_seed=split_seed, max_per_class=max_per_class,
                         category_map=category_map)
out = run_dir(run_name)

# %% [markdown]
# Images per category and split. Categories too small to fill all three splits are
# listed after the table; files that could not be used are counted below with their reasons.

# %%
# NBVAL_CHECK_OUTPUT
counts = split_counts(prepared.catalog)
counts.to_csv(out / "split_counts.csv")
print(counts.to_string())
print("categories left out:", [entry["label"] for entry in prepared.too_small] or "none")

# %%
# NBVAL_CHECK_OUTPUT
print(f"{len(prepared.skipped)} files skipped")
for entry in prepared.skipped[:20]:
    print(f"  {entry['path']}: {entry['reason']}")

# %%
plots.sample_grid(prepared.catalog, per_category=6, seed=split_seed, path=out / "figures" / "sample_grid.png");
