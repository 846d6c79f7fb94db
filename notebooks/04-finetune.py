# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Fine-tune on the catalog's own categories
# Frozen ImageNet features know more about the catalog's categories than a raw cosine
# ranking uses: a logistic regression on them names the category of most query photos,
# while far fewer of a query's 10 nearest gallery neighbours share its category. Transfer
# learning closes that gap, at two levels, both trained on the **train split only** (query
# and gallery stay unseen) and both measured against the frozen backbone on the same split:
#
# 1. **A projection head on the cached frozen embeddings** (MLP 1280 → 512 → 128,
#    L2-normalised), trained with metric-learning losses: Proxy-Anchor (Kim et al. 2020),
#    normalised softmax (cosine proxies with a temperature, as in ProxyNCA++) and supervised
#    contrastive (Khosla et al. 2020). The loss, the epoch and the classifier are chosen on
#    a stratified **validation part of the train split** (15%), never on gallery or query;
#    the chosen head is then retrained on the whole train split for that many epochs.
# 2. **The last MBConv block(s) of the backbone trained with the head**, on seeded augmented
#    views (random resized crop, flip, colour jitter) whose frozen-trunk feature maps are
#    cached once, with early stopping on the same validation part and a CPU time budget.
#
# **What this optimises, honestly.** Relevance here is "same category as the query", so
# the head learns one tight cluster per category: that is exactly what P@k rewards, and
# it says nothing about finer similarity (colour, pattern, style) *within* a category,
# which the frozen features may rank better. Check the recommendation grids, not only
# the numbers, before using a fine-tuned model for "more like this".

# %% tags=["parameters"]
run_name = "interactive"
finetune_backbone = "efficientnet_lite0"
k = 10
metric = "cosine"
finetune_losses = ["proxy_anchor", "norm_softmax", "supcon"]
finetune_level2 = False
finetune_time_budget_min = 10.0
finetune_trainable_blocks = 2
finetune_n_views = 2
n_grid_queries = 6

# %%
import math
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from fashionrec import finetune, plots
from fashionrec.backbones import get_backbone
from fashionrec.errors import FashionRecError
from fashionrec.runs import load_prepared, run_dir, write_json

prepared = load_prepared(run_name)
out = run_dir(run_name)
(out / "figures").mkdir(exist_ok=True)
split_seed = prepared.split_seed
head_config = finetune.HeadConfig(k=k, seed=split_seed)
print(f"{prepared.dataset}: {len(prepared.catalog)} images, split seed {split_seed}")
print("categories too small for the split (left out):", [e["label"] for e in prepared.too_small] or "none")

# %% [markdown]
# ## Level 1: projection head on frozen embeddings
# Embeddings come from the cache in `data/interim/embeddings` (computed by 01-embed, or now).
# Each loss trains with the same seed and data order; progress bars show the epochs.

# %%
level1 = finetune.run_finetune(prepared, finetune_backbone, level=1, head_cfg=head_config,
                               losses=tuple(finetune_losses), k=k, metric=metric,
                               model_path=out / "head-level1.pt")
print(f"level 1 trained in {level1.payload['train_seconds']:.1f} s"
      f"{' (reused the cached model)' if level1.reused else ''}")

# %% [markdown]
# Loss comparison on the validation part (P@k when each validation image ranks the other
# validation images); the best one is kept.

# %%
# NBVAL_CHECK_OUTPUT
selection = level1.payload["selection"]
comparison = pd.DataFrame(selection["loss_comparison"])
print(comparison[["loss", "best_epoch", "epochs_run", "val_precision_at_k"]].round(4).to_string(index=False))
print("kept:", level1.payload["loss"], "| validation images:", selection["n_validation"])
print("categories without validation images:", [e["label"] for e in selection["not_validated"]] or "none")

# %%
figure, axis = plt.subplots(figsize=(6, 3.5))
for name, history in selection.get("histories", {}).items():
    history = pd.DataFrame(history)
    axis.plot(history["epoch"], history["val_precision"], label=name)
axis.set(xlabel="epoch", ylabel=f"validation P@{k}", title="level 1: validation curves per loss")
axis.legend(fontsize=8)
figure.savefig(out / "figures" / "finetune_level1_curves.png", dpi=100, bbox_inches="tight",
               metadata={"Software": None});

# %% [markdown]
# ## Frozen backbone vs fine-tuned head (query → gallery)

# %%
def summary_row(name, evaluation):
    return {"model": name, **{m: round(evaluation.summary[m], 4) for m in
                              ("precision_at_k", "hit_rate_at_k", "recall_at_k", "map_at_k", "hit_rate_at_1")}}


rows = [summary_row(f"{finetune_backbone} (frozen)", level1.baseline),
        summary_row(f"{finetune_backbone} + head (level 1, {level1.payload['loss']})", level1.evaluation)]

# %%
# NBVAL_CHECK_OUTPUT
print(pd.DataFrame(rows).to_string(index=False))
gain = level1.record["precision_at_k_gain"]
print(f"P@{k} gain {gain['diff']:+.4f} (paired bootstrap 95% CI {gain['low']:+.4f} to {gain['high']:+.4f})")

# %% [markdown]
# ## Category classifier
# Logistic regression (seeded) on L2-normalised frozen embeddings or head outputs: the
# features and C are chosen on the validation part, then refitted on the whole train split.
# At level 1 the head is a function of the frozen features, so a linear classifier on those
# features is close to the ceiling of what level 1 can classify; level 2 changes the
# features themselves (and its classifier also trains on the augmented views).
# Accuracy, macro F1 and the confusion matrix on the query split. Categories can be merged
# or renamed with a small YAML map (`category_map` in the parameter file, `--category-map`
# on the command line), which every loader, split and metric respects, e.g.:
#
# ```yaml
# Longsleeve: Tops
# Hoodie: Tops
# Skip: null        # dropped
# ```

# %%
# NBVAL_CHECK_OUTPUT
classification = level1.classification
print(f"classifier: {classification['classifier']}")
print(f"query accuracy {classification['accuracy']:.4f}, macro F1 {classification['macro_f1']:.4f} "
      f"({classification['n']} queries)")

# %%
def confusion_figure(classification, title, path=None):
    labels = classification["confusion_matrix"]["labels"]
    matrix = np.array(classification["confusion_matrix"]["matrix"])
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 0.45 * max(len(labels), 6)
    figure, axis = plt.subplots(figsize=(size + 2, size))
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    axis.set_yticks(range(len(labels)), labels, fontsize=7)
    if len(labels) <= 20:
        for i, j in zip(*np.nonzero(matrix)):
            axis.text(j, i, matrix[i, j], ha="center", va="center", fontsize=6,
                      color="white" if shares[i, j] > 0.5 else "black")
    axis.set(xlabel="predicted category", ylabel="true category", title=title)
    figure.colorbar(image, ax=axis, label="share of the row's queries")
    figure.tight_layout()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    return figure


confusion_figure(classification, "category classifier on the query split (counts)",
                 out / "figures" / "finetune_confusion.png");

# %%
per_category = pd.DataFrame(classification["per_category_f1"]).T
per_category

# %% [markdown]
# ## Category-aware recommendation
# Gallery items of the query's *predicted* category get a score bonus (`inf` = rank within
# the predicted category first, then the rest). The gallery's own categories are either
# `known` (a shop knows what it sells) or `predicted` by the same classifier. Boost 0 is
# the plain fine-tuned ranking. Rows are P@k etc. on the query split.

# %%
# NBVAL_CHECK_OUTPUT
print(level1.category_aware.round(4).to_string(index=False))

# %% [markdown]
# Top results for a few queries (seeded choice), frozen vs fine-tuned; green = same category.

# %%
queries = level1.evaluation.sample_queries(n_grid_queries, seed=split_seed)
plots.recommendation_grid(level1.baseline, queries, title=f"{finetune_backbone} (frozen)",
                          path=out / "figures" / "finetune_grid_frozen.png");
plots.recommendation_grid(level1.evaluation, queries, title=f"{finetune_backbone} + head (level 1)",
                          path=out / "figures" / "finetune_grid_level1.png");

# %% [markdown]
# ## Level 2: last block(s) of the backbone + head
# Starts from the level-1 head; batch-norm statistics stay frozen. The trunk's feature maps
# of the clean and `finetune_n_views` augmented views per train image are computed once
# (cached in `data/interim/finetune-trunk`); the training loop then stops at the earliest of
# early stopping (validation P@k), the epoch limit and the time budget. Because the budget
# is wall-clock time, how far it gets depends on the machine: its outputs are not checked.

# %%
level2 = None
if finetune_level2:
    tune_config = finetune.BackboneTuneConfig(seed=split_seed, time_budget_s=finetune_time_budget_min * 60,
                                              trainable_blocks=finetune_trainable_blocks, n_views=finetune_n_views)
    try:
        level2 = finetune.run_finetune(prepared, finetune_backbone, level=2, head_cfg=head_config,
                                       tune_cfg=tune_config, losses=(level1.payload["loss"],), k=k, metric=metric,
                                       model_path=out / "head-level2.pt")
    except FashionRecError as error:  # e.g. a backbone other than efficientnet_lite*
        print(f"level 2 skipped: {error}")

# %%
if level2 is not None:
    info = level2.payload["selection"]["level2"]
    history = pd.DataFrame(info["history"])
    print(f"level 2: {info['stopped_by']} after {len(history) - 1} epoch(s); best epoch {info['best_epoch']}; "
          f"{info['train_seconds']:.0f} s training + {info['feature_seconds']:.0f} s caching trunk features")
    figure, axis = plt.subplots(figsize=(5, 3))
    axis.plot(history["epoch"], history["val_precision"], marker="o")
    axis.set(xlabel="epoch (0 = level-1 head)", ylabel=f"validation P@{k}", title="level 2")
    rows.append(summary_row(f"{finetune_backbone} tuned + head (level 2)", level2.evaluation))
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"level 2 query accuracy {level2.classification['accuracy']:.4f}, "
          f"macro F1 {level2.classification['macro_f1']:.4f}")
    print(level2.category_aware.round(4).to_string(index=False))

# %% [markdown]
# ## The model of record
# The level with the better **validation** P@k becomes `results/<run>/head.pt`: parameters,
# hyper-parameters, the fingerprint of its training rows, base backbone and weights
# checksum, metrics and training time. Other notebooks take it as the backbone name
# `<backbone>+head:<run_name>` (or `+head:results/<run>/head.pt`).

# %%
val_level1 = max(row["val_precision_at_k"] for row in level1.payload["selection"]["loss_comparison"])
val_level2 = level2.payload["selection"]["level2"]["best_val_precision"] if level2 is not None else -math.inf
chosen = level2 if level2 is not None and val_level2 > val_level1 else level1
shutil.copyfile(chosen.model_path, out / "head.pt")
headed_name = f"{finetune_backbone}{finetune.HEAD_SEPARATOR}{run_name}"
metrics_record = {
    "backbone": finetune_backbone, "finetuned_backbone": headed_name, "chosen_level": chosen.payload["level"],
    "validation_precision_at_k": {"level 1": val_level1, "level 2": None if level2 is None else val_level2},
    "frozen": level1.record["baseline"],
    "level1": {key: level1.record[key] for key in ("category_accuracy", "macro_f1", "precision_at_k_gain",
                                                    "category_aware", "classification")},
    "level1_metrics": level1.evaluation.to_record(bootstrap_seed=split_seed),
    "level2_metrics": None if level2 is None else level2.evaluation.to_record(bootstrap_seed=split_seed),
    "level2": None if level2 is None else {key: level2.record[key] for key in (
        "category_accuracy", "macro_f1", "precision_at_k_gain", "category_aware")},
    "train_fingerprint": chosen.payload["train_fingerprint"],
}
write_json(out / "finetune_metrics.json", metrics_record)
write_json(out / "finetune_timing.json", {
    "level1_train_seconds": level1.payload["train_seconds"],
    "level2_train_seconds": None if level2 is None else level2.payload["train_seconds"],
    "level2": None if level2 is None else level2.payload["selection"]["level2"]})
print(f"model of record: level {chosen.payload['level']} -> {out / 'head.pt'}; backbone name {headed_name!r}")

# %% [markdown]
# The saved model loads as a backbone, like any other: its embeddings of a few query
# images equal the ones evaluated above.

# %%
# NBVAL_CHECK_OUTPUT
from fashionrec.images import load_image
import torch

backbone = get_backbone(headed_name)
query_rows = np.flatnonzero(chosen.metadata["split"].to_numpy() == "query")[:4]
with torch.no_grad():
    images = torch.stack([backbone.transform(load_image(p)) for p in chosen.metadata["path"].iloc[query_rows]])
    again = backbone.model(images).numpy()
print(backbone.name, f"{backbone.dim}-d, cache key {backbone.cache_key[:8]}...")
print("same embeddings as evaluated:", bool(np.allclose(again, chosen.vectors[query_rows], atol=1e-3)))
