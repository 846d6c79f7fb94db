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
#    cached once, stopped by epochs and early stopping on the same validation part (no
#    wall-clock budget, so the same parameters give the same model on any machine).
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
finetune_time_budget_min = None
finetune_trainable_blocks = 2
finetune_n_views = 2
n_grid_queries = 6
search_backbone = None
search_cost_images = 64
distil_teacher = None
distil_teacher_finetune = False
distil_student = "efficientnet_lite0"
distil_relational_weights = [1.0, 10.0]

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from fashionrec.pipeline import plots
from fashionrec.pipeline.report import condensed_candidates
from fashionrec.pipeline.stages import load_prepared, run_dir, stage_distil, stage_finetune, stage_search

prepared = load_prepared(run_name)
out = run_dir(run_name)
(out / "figures").mkdir(exist_ok=True)
print(f"{prepared.dataset}: {len(prepared.catalog)} images, split seed {prepared.split_seed}")
print("categories too small for the split (left out):", [e["label"] for e in prepared.too_small] or "none")

# %% [markdown]
# ## Training
# Level 1 always; level 2 when `finetune_level2` is set. Embeddings come from the cache in
# `data/interim/embeddings` (computed by 01-embed, or now); each loss trains with the same
# seed and data order, with progress bars. Level 2 starts from the level-1 head with
# batch-norm statistics frozen; the trunk's feature maps of the clean and
# `finetune_n_views` augmented views per train image are computed once (cached in
# `data/interim/finetune-trunk`), and training stops at the earliest of early stopping
# (validation P@k) and the epoch limit (`finetune_time_budget_min`, off by default, is only a
# wall-clock safety net, reported when it stops a run). The level with the better
# **validation** P@k becomes the model of record `results/<run>/head.pt`.

# %%
stage = stage_finetune(run_name, finetune_backbone, k=k, metric=metric, losses=finetune_losses,
                       level2=finetune_level2, time_budget_min=finetune_time_budget_min,
                       trainable_blocks=finetune_trainable_blocks, n_views=finetune_n_views)
level1, level2 = stage.level1, stage.level2
print(f"level 1 trained in {level1.payload['train_seconds']:.1f} s"
      f"{' (reused the cached model)' if level1.reused else ''}")
if stage.level2_skipped:
    print(f"level 2 skipped: {stage.level2_skipped}")

# %% [markdown]
# ## Level 1: loss comparison
# P@k on the validation part when each validation image ranks the other validation
# images; the best loss is kept. Training trajectories depend on the last bits of the
# machine's floating point, so the checked summary states the comparison, not its digits.

# %%
# NBVAL_CHECK_OUTPUT
selection = level1.payload["selection"]
comparison = pd.DataFrame(selection["loss_comparison"])
print("losses compared:", list(comparison["loss"]), "| validation images:", selection["n_validation"])
print("categories without validation images:", [e["label"] for e in selection["not_validated"]] or "none")

# %%
print("kept:", level1.payload["loss"])
comparison[["loss", "best_epoch", "epochs_run", "val_precision_at_k"]].round(4)

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
# ## Frozen backbone vs fine-tuned (query → gallery)
# Point estimates with 95% bootstrap intervals over queries; the gain is a paired bootstrap
# on the same queries.

# %%
# NBVAL_CHECK_OUTPUT
tuned = stage.table[stage.table["level"] == 1].iloc[0]
print("levels compared (0 = frozen):", stage.table["level"].tolist())
print("fine-tuned beats frozen on these queries:", bool(tuned["gain_vs_frozen"] > 0))

# %%
stage.table.round(4)

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
classification = stage.chosen.classification
print(f"model of record: level {stage.chosen.payload['level']}; classifier views: "
      f"{classification['classifier']['views']}; scored on {classification['n']} queries")

# %%
print(f"classifier: {classification['classifier']}")
print(f"query accuracy {classification['accuracy']:.4f}, macro F1 {classification['macro_f1']:.4f}")

# %%
plots.category_confusion(classification, "category classifier on the query split (counts)",
                         out / "figures" / "finetune_confusion.png");

# %%
pd.DataFrame(classification["per_category_f1"]).T

# %% [markdown]
# ## Category-aware recommendation
# Gallery items of the query's *predicted* category get a score bonus (`inf` = rank within
# the predicted category first, then the rest); the gallery's categories are its own labels
# (a shop knows what it sells). The bonus is **chosen on the validation part** of the train
# split (validation images rank the rest of it, through the head and classifier that never saw
# them); a non-zero bonus is kept only when its paired validation gain is significant. Only
# that one setting is then scored on the queries, against the plain ranking, with intervals.

# %%
aware = stage.chosen.category_aware
print(f"chosen bonus: {aware['boost']} (chosen on: {aware['chosen_on']})")
for name, scored in aware["query"].items():
    low, high = scored["precision_at_k_ci"]
    print(f"queries, {name:<6} ranking: P@{k} {scored['precision_at_k']:.3f} [{low:.3f}, {high:.3f}]")
gain = aware["query_gain_over_plain"]
print(f"paired difference: {gain['diff']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]")
pd.DataFrame(aware["validation"])

# %% [markdown]
# Top results for a few queries (seeded choice), frozen vs fine-tuned; green = same category.

# %%
queries = level1.evaluation.sample_queries(n_grid_queries, seed=prepared.split_seed)
plots.recommendation_grid(level1.baseline, queries, title=f"{finetune_backbone} (frozen)",
                          path=out / "figures" / "finetune_grid_frozen.png");
plots.recommendation_grid(level1.evaluation, queries, title=f"{finetune_backbone} + head (level 1)",
                          path=out / "figures" / "finetune_grid_level1.png");

# %% [markdown]
# ## Level 2
# Level 2 stops by epochs and early stopping, so the same parameters give the same model on
# any machine; its trained digits still depend on the machine's float rounding, so its
# outputs are not checked.

# %%
if level2 is not None:
    info = level2.payload["selection"]["level2"]
    history = pd.DataFrame(info["history"])
    print(f"level 2: {info['stopped_by']} after {len(history) - 1} epoch(s); best epoch {info['best_epoch']}; "
          f"{info['train_seconds']:.0f} s training + {info['feature_seconds']:.0f} s caching trunk features")
    figure, axis = plt.subplots(figsize=(5, 3))
    axis.plot(history["epoch"], history["val_precision"], marker="o")
    axis.set(xlabel="epoch (0 = level-1 head)", ylabel=f"validation P@{k}", title="level 2")
    print(f"level 2 query accuracy {level2.classification['accuracy']:.4f}, "
          f"macro F1 {level2.classification['macro_f1']:.4f}")

# %% [markdown]
# ## The model of record
# `results/<run>/head.pt` holds parameters, hyper-parameters, the fingerprint of its
# training rows, base backbone and weights checksum, metrics and training time. Other
# notebooks take it as the backbone name `<backbone>+head:<run_name>` (or
# `+head:results/<run>/head.pt`). It loads as a backbone, like any other: its embeddings of
# a few query images equal the ones evaluated above.

# %%
# NBVAL_CHECK_OUTPUT
import torch

from fashionrec.models.registry import get_backbone
from fashionrec.data.images import load_image

backbone = get_backbone(stage.headed_name)
chosen = stage.chosen
query_rows = np.flatnonzero(chosen.metadata["split"].to_numpy() == "query")[:4]
with torch.no_grad():
    images = torch.stack([backbone.transform(load_image(p)) for p in chosen.metadata["path"].iloc[query_rows]])
    again = backbone.model(images).numpy()
print(backbone.name, f"{backbone.dim}-d")
print("same embeddings as evaluated:", bool(np.allclose(again, chosen.vectors[query_rows], atol=1e-3)))

# %% [markdown]
# ## The best model from several backbones
# With `search_backbone` set to a combination (e.g.
# `ensemble:efficientnet_lite0,efficientnet_lite1,efficientnet_lite2`, see docs/ensembles.md),
# the workbench asks which model to ship from these backbones: subsets of the members, each
# through its own preprocessing, that plus its mirror image, or all four views (averaged per
# member); frozen features or a projection head (loss, hidden width); ranking by similarity
# alone or with a bonus for the query's predicted category; the category classifier's
# features and strength. Every candidate is compared on a **select slice** of the train
# split that no training and no early stopping has seen; only the chosen one is scored on
# the queries, beside frozen `efficientnet_lite0` and its fine-tuned head above. The chosen
# model is saved as `results/<run>/best.pt` and served by name. Its embedding cost (seconds
# per image, summed over the networks it runs) is measured in one run at the end.

# %%
from IPython.display import display

search = None
if search_backbone:
    search = stage_search(run_name, search_backbone, k=k, metric=metric, cost_images=search_cost_images)
    print(f"searched {len(condensed_candidates(search.candidates, k))} feature set x head candidates (each with "
          f"{search.candidates['boost'].nunique()} rankings); "
          f"select slice: {search.result.record['finetune']['slices']['select']} train images")
else:
    print("no model search: set search_backbone to a combination of backbones to run one")

# %%
if search is not None:
    chosen = search.result.record["finetune"]["chosen"]
    print("chosen:", chosen["features"], "| head:", chosen["head"], "| ranking:", chosen["ranking"],
          "| classifier:", chosen["classifier"])
    print("served as:", search.served_name)
    display(search.table.round(4))

# %% [markdown]
# Every candidate on the select slice (validation numbers; the queries were not used to choose):

# %%
if search is not None:
    display(condensed_candidates(search.candidates, k))

# %%
if search is not None and search.cost is not None:
    print(f"embedding cost, measured in one run on {search.cost.attrs['n_images']} query images "
          f"(load average {search.cost.attrs['load_average_1min']}):")
    display(search.cost)

# %% [markdown]
# ## The best model at the cost of one network: distillation
# With `distil_teacher` set (any model: a backbone, a combination, a `+head:` file; with
# `distil_teacher_finetune`, the model `--finetune` chooses for it, such as the search's choice
# above), one EfficientNet-Lite (`distil_student`) learns to reproduce the teacher's
# similarities: its last blocks and a head are trained on the train split with a relational
# loss (RKD distance and angle) on the teacher's normalised embeddings, over augmented views
# of each photo, together with the category loss. The relational weight, the blocks and the
# epochs are chosen on slices of the train split. The plot puts P@k with its interval against
# the milliseconds each model spends on one photo, measured for all four in one run.

# %%
distilled = None
if distil_teacher:
    distilled, distil_table = stage_distil(run_name, distil_teacher, distil_student, distil_teacher_finetune, k=k,
                                           metric=metric, relational_weights=distil_relational_weights)
    print("teacher:", distilled.record["teacher"]["name"])
    print("student served as:", distilled.record["backbone"], "| chosen:", distilled.record["choices"]["chosen"])
    display(distil_table.round(4))
    plots.quality_cost(distil_table, k, path=out / "figures" / "quality_cost.png")
else:
    print("no distillation: set distil_teacher to a model (e.g. the search's choice) to distil it into one network")

