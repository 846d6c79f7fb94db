# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · Prepare the data
# Load a catalog with one of the named loaders, decode every file in full (verdicts cached by
# file content in `data/interim/image-checks`), and split what is usable into train 60% /
# gallery 20% / query 20% per category (seeded), so a broken file never takes a split slot.
# Writes `catalog.parquet`, the ledger `skipped.json` (every file left out, with its stage and
# reason) and `prepare.json` under `results/<run_name>/`, and checks that the gallery holds at
# least `k` images before anything is embedded.
#
# The values below are the demo of a notebook run by hand (400 Fashion-MNIST images);
# `make pipeline` passes every parameter of its file, defaults included (docs/parameters.md).

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

# %%
from fashionrec.pipeline import plots
from fashionrec.data.split import split_counts
from fashionrec.pipeline.stages import run_dir, stage_prepare

prepared = stage_prepare(run_name, dataset, data_dir, split_seed=split_seed, max_per_class=max_per_class,
                         category_map=category_map, k=k, columns=columns, image_root=image_root)
out = run_dir(run_name)

# %% [markdown]
# Images per category and split. Categories too small to fill all three splits are
# listed after the table; every file left out is counted below by stage, with its reason.

# %%
# NBVAL_CHECK_OUTPUT
counts = split_counts(prepared.catalog)
counts.to_csv(out / "split_counts.csv")
print(counts.to_string())
print("categories left out:", [entry["label"] for entry in prepared.too_small] or "none")

# %%
# NBVAL_CHECK_OUTPUT
from fashionrec.data.ledger import describe_counts

print(f"{len(prepared.catalog)} images used, {describe_counts(prepared.skipped)}, "
      f"{prepared.n_not_sampled} images not sampled (max_per_class={max_per_class})")
for entry in prepared.skipped[:20]:
    print(f"  ({entry['stage']}) {entry['path']}: {entry['reason']}")

# %%
plots.sample_grid(prepared.catalog, per_category=6, seed=split_seed, path=out / "figures" / "sample_grid.png");
