# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Embed with each backbone
# Pooled penultimate features of each backbone, for every split of the run's catalog.
# Embeddings are cached per image in `data/interim/embeddings` (a rerun costs nothing) and
# written as `.npy` + metadata parquet under `results/<run_name>/embeddings/`. A backbone
# whose weights cannot be had is reported as skipped, never replaced by random weights.

# %% tags=["parameters"]
run_name = "interactive"
backbones = ["efficientnet_lite0", "colorhist"]
weights_files = {}
runtime = "onnx"
batch_size = 32
num_workers = None
threads = None

# %%
from fashionrec.pipeline.stages import stage_embed
from fashionrec.settings import InferenceSettings

settings = InferenceSettings(batch_size=batch_size, workers=num_workers, threads=threads, runtime=runtime)
table = stage_embed(run_name, backbones, weights_files=weights_files, settings=settings)

# %% [markdown]
# Availability of each backbone (skipped ones name the missing weights), and the images each
# embedded: all of 00-prepare-data's images, unless a file changed since it was checked.

# %%
# NBVAL_CHECK_OUTPUT
print(table[["backbone", "status", "n_images"]].to_string(index=False))
for row in table[table["status"] != "ok"].itertuples():
    print(f"{row.backbone}: {row.reason}")

# %% [markdown]
# Throughput of this run (images embedded per second on this machine; cached images cost nothing and are counted as reused).

# %%
table
