"""Transfer learning on the catalog's own categories, and a category classifier.

Frozen ImageNet features know more about the catalog's categories than a raw cosine
ranking uses: a linear classifier on them is right far more often than the nearest
neighbours share the query's category. Two levels close that gap, both trained on the
train split only (query and gallery stay unseen) and both measured against the frozen
backbone on the same split:

* **Level 1** - a projection head (MLP, L2-normalised output) on the cached frozen
  embeddings, trained with a metric-learning loss: Proxy-Anchor (Kim et al. 2020),
  normalised softmax (Zhai & Wu 2019; ProxyNCA++-style cosine proxies with a
  temperature) or supervised contrastive (Khosla et al. 2020). Seconds on a CPU.
* **Level 2** - the last MBConv block(s) of an EfficientNet-Lite trained together with
  the head, on a few seeded augmented views per train image whose frozen-trunk feature
  maps are cached once, under a CPU time budget.

Model selection (loss, epoch, classifier features and strength) uses a stratified
validation part of the train split, never the gallery or the query split.

Retrieval relevance is "same category as the query", so with a handful of categories the
head mostly learns one tight cluster per category: that is exactly what the metric
rewards, and it says nothing about finer similarity (colour, pattern, style) within a
category.

A trained model is one file (``torch.save`` of plain tensors and values, loadable with
``weights_only=True``): parameters, hyper-parameters, the fingerprint of its training
rows, its base backbone and weights checksum, its metrics and its training time. The
backbone name ``<base>+head:<file>`` (for example
``efficientnet_lite0+head:results/clothing/head.pt``) loads it through
:func:`fashionrec.backbones.get_backbone`, so every notebook accepts it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import config
from .errors import FashionRecError, WeightsUnavailable

FORMAT = "fashionrec-head/1"
# Part of the CLI's model cache key: bump when training changes, so no stale model is reused.
TRAINING_VERSION = 3
HEAD_SEPARATOR = "+head:"
LOSSES = ("proxy_anchor", "norm_softmax", "supcon")
DEFAULT_BOOSTS = (0.0, 0.05, 0.1, 0.2, math.inf)
# A score bonus larger than any cosine difference: "rank within the category first".
_HARD_BOOST = 4.0


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadConfig:
    """Level 1: projection head on frozen embeddings."""

    hidden_dim: int = 512          # 0 = a linear projection
    out_dim: int = 128
    input_dropout: float = 0.1
    dropout: float = 0.1
    epochs: int = 100              # at most; early stopping on the validation part
    patience: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    proxy_lr_multiplier: float = 10.0
    weight_decay: float = 1e-4
    val_fraction: float = 0.15
    refit: bool = True             # retrain on the whole train split for the chosen epoch count
    seed: int = config.DEFAULT_SEED
    k: int = 10                    # validation P@k
    proxy_anchor_margin: float = 0.1
    proxy_anchor_alpha: float = 32.0
    norm_softmax_temperature: float = 0.05
    supcon_temperature: float = 0.1
    classifier_c: tuple = (1.0, 10.0, 100.0)
    # Extra deterministic views of each image whose frozen embeddings the classifier may use
    # besides the retrieval view (see CLASSIFIER_VIEWS); () = the retrieval view only.
    classifier_views: tuple = ("squash", "shorter_side")

    @classmethod
    def from_dict(cls, values: dict) -> "HeadConfig":
        known = {f.name for f in fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in known}
        return cls(**values)


@dataclass(frozen=True)
class BackboneTuneConfig:
    """Level 2: the last block(s) of the backbone trained with the head, on augmented views."""

    trainable_blocks: int = 2      # last MBConv blocks trained (+ the 1x1 head conv and its BN)
    n_views: int = 2               # seeded augmented views per train image (plus the clean one)
    epochs: int = 30               # at most
    patience: int = 4
    batch_size: int = 64
    lr: float = 1e-4               # backbone blocks
    head_lr: float = 3e-4
    weight_decay: float = 1e-4
    time_budget_s: float = 600.0   # training loop wall-clock budget (feature caching excluded)
    crop_scale: tuple = (0.35, 1.0)
    color_jitter: float = 0.3
    seed: int = config.DEFAULT_SEED

    @classmethod
    def from_dict(cls, values: dict) -> "BackboneTuneConfig":
        known = {f.name for f in fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in known}
        return cls(**values)


# --------------------------------------------------------------------------------------------
# Validation split (inside the train split)
# --------------------------------------------------------------------------------------------


def validation_split(labels, fraction: float = 0.15, seed: int = config.DEFAULT_SEED) -> tuple[np.ndarray, list[dict]]:
    """Boolean mask of a stratified validation part of the train rows, and the left-out categories.

    A category gets ``round(fraction * n)`` validation rows (at least one) only when it
    has at least 3 train rows, so at least two stay to train on; smaller categories are
    trained on entirely and listed. Each category is shuffled by its own generator seeded
    from (seed, category), as in :func:`fashionrec.datasets.split_catalog`.
    """
    labels = np.asarray(labels).astype(str)
    val = np.zeros(len(labels), dtype=bool)
    not_validated = []
    if fraction <= 0:
        return val, not_validated
    for label in sorted(set(labels)):
        positions = np.flatnonzero(labels == label)
        if len(positions) < 3:
            not_validated.append({"label": str(label), "n_train": int(len(positions)),
                                  "reason": "fewer than 3 train images: all used for training, none for validation"})
            continue
        label_seed = int.from_bytes(hashlib.sha256(f"val:{seed}:{label}".encode()).digest()[:8], "little")
        order = positions[np.random.default_rng(label_seed).permutation(len(positions))]
        n_val = min(len(order) - 2, max(1, round(fraction * len(order))))
        val[order[:n_val]] = True
    return val, not_validated


# --------------------------------------------------------------------------------------------
# Model pieces
# --------------------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """Standardise -> [dropout -> Linear -> ReLU] -> dropout -> Linear -> L2-normalise."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128, input_dropout: float = 0.1,
                 dropout: float = 0.1):
        super().__init__()
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        layers: list[nn.Module] = [nn.Dropout(input_dropout)]
        if hidden_dim:
            layers += [nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim)]
        else:
            layers += [nn.Linear(in_dim, out_dim)]
        self.layers = nn.Sequential(*layers)

    def set_standardization(self, vectors: np.ndarray) -> None:
        self.mean.copy_(torch.as_tensor(vectors.mean(axis=0), dtype=torch.float32))
        self.scale.copy_(torch.as_tensor(vectors.std(axis=0) + 1e-6, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers((x - self.mean) / self.scale), dim=1)


class HeadedModel(nn.Module):
    """A backbone's pooled features followed by a projection head: (B,C,H,W) -> (B,out_dim), unit norm."""

    def __init__(self, base: nn.Module, head: nn.Module):
        super().__init__()
        self.base = base
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(images))


class ProxyAnchorLoss(nn.Module):
    """Proxy-Anchor loss (Kim et al., CVPR 2020): one learnable proxy per category."""

    def __init__(self, n_classes: int, dim: int, margin: float = 0.1, alpha: float = 32.0):
        super().__init__()
        self.proxies = nn.Parameter(torch.empty(n_classes, dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")
        self.margin, self.alpha = margin, alpha

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = embeddings @ F.normalize(self.proxies, dim=1).T          # (B, C)
        positive = F.one_hot(labels, cos.shape[1]).bool()
        pos_exp = torch.where(positive, torch.exp(-self.alpha * (cos - self.margin)), torch.zeros_like(cos))
        neg_exp = torch.where(~positive, torch.exp(self.alpha * (cos + self.margin)), torch.zeros_like(cos))
        with_positives = positive.any(dim=0)
        n_with = with_positives.sum().clamp(min=1)
        pos_term = torch.log1p(pos_exp.sum(dim=0))[with_positives].sum() / n_with
        neg_term = torch.log1p(neg_exp.sum(dim=0)).sum() / cos.shape[1]
        return pos_term + neg_term


class NormSoftmaxLoss(nn.Module):
    """Normalised softmax / cosine proxies with a temperature (Zhai & Wu 2019; ProxyNCA++ style)."""

    def __init__(self, n_classes: int, dim: int, temperature: float = 0.05):
        super().__init__()
        self.proxies = nn.Parameter(torch.randn(n_classes, dim) / math.sqrt(dim))
        self.temperature = temperature

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings @ F.normalize(self.proxies, dim=1).T / self.temperature

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(embeddings), labels)


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020) over the batch; anchors with no positive are skipped."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = embeddings.shape[0]
        logits = embeddings @ embeddings.T / self.temperature
        self_mask = torch.eye(n, dtype=torch.bool)
        logits = logits.masked_fill(self_mask, -1e9)
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        positive = (labels[:, None] == labels[None, :]) & ~self_mask
        n_positive = positive.sum(dim=1)
        has = n_positive > 0
        if not has.any():
            return embeddings.sum() * 0.0
        mean_log_prob = (log_prob * positive).sum(dim=1)[has] / n_positive[has]
        return -mean_log_prob.mean()


def make_loss(name: str, n_classes: int, dim: int, cfg: HeadConfig) -> nn.Module:
    if name == "proxy_anchor":
        return ProxyAnchorLoss(n_classes, dim, cfg.proxy_anchor_margin, cfg.proxy_anchor_alpha)
    if name == "norm_softmax":
        return NormSoftmaxLoss(n_classes, dim, cfg.norm_softmax_temperature)
    if name == "supcon":
        return SupConLoss(cfg.supcon_temperature)
    raise ValueError(f"unknown loss {name!r}; available: {', '.join(LOSSES)}")


def build_head(in_dim: int, cfg: HeadConfig) -> ProjectionHead:
    return ProjectionHead(in_dim, cfg.hidden_dim, cfg.out_dim, cfg.input_dropout, cfg.dropout)


# --------------------------------------------------------------------------------------------
# Retrieval helpers (numpy/torch, exact): validation and category-aware ranking
# --------------------------------------------------------------------------------------------


def _normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def leave_one_out_precision(vectors: np.ndarray, labels, k: int = 10) -> float:
    """Mean P@k when each row ranks all the other rows by cosine (validation within one set)."""
    labels = np.asarray(labels)
    n = len(labels)
    if n < 2:
        return float("nan")
    k = min(k, n - 1)
    x = torch.from_numpy(_normalize(vectors))
    scores = x @ x.T
    scores.fill_diagonal_(-float("inf"))
    top = torch.topk(scores, k, dim=1).indices.numpy()
    return float((labels[top] == labels[:, None]).mean())


def validation_uses_fit_rows(val_labels) -> bool:
    """Whether validation images must also rank the fit rows to be scored at all.

    Each validation image ranks the other validation images (both unseen, like query and
    gallery) when at least half of them have another validation image of their category;
    in a catalog of tiny categories (one validation image each) that says nothing, so
    they rank the fit rows and the other validation images instead.
    """
    labels = pd.Series(np.asarray(val_labels).astype(str))
    if len(labels) < 2:
        return True
    return float((labels.map(labels.value_counts()) >= 2).mean()) < 0.5


def validation_precision(val_vectors: np.ndarray, val_labels, fit_vectors=None, fit_labels=None,
                         k: int = 10) -> float:
    """Validation P@k (see :func:`validation_uses_fit_rows` for what each validation image ranks)."""
    if fit_vectors is None or not validation_uses_fit_rows(val_labels):
        return leave_one_out_precision(val_vectors, val_labels, k)
    val_labels = np.asarray(val_labels).astype(str)
    vectors = np.concatenate([val_vectors, fit_vectors])
    labels = np.concatenate([val_labels, np.asarray(fit_labels).astype(str)])
    k = min(k, len(labels) - 1)
    x = torch.from_numpy(_normalize(vectors))
    scores = x[:len(val_labels)] @ x.T
    scores[torch.arange(len(val_labels)), torch.arange(len(val_labels))] = -float("inf")
    top = torch.topk(scores, k, dim=1).indices.numpy()
    return float((labels[top] == val_labels[:, None]).mean())


def rank(query_vectors: np.ndarray, gallery_vectors: np.ndarray, k: int, query_category=None,
         gallery_category=None, boost: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-``k`` with an optional bonus for gallery items of the query's (predicted) category.

    ``boost=inf`` ranks the gallery items of that category first (by similarity) and the
    others after them: "rank within the predicted category", never fewer than k results.
    """
    q = torch.from_numpy(_normalize(query_vectors))
    g = torch.from_numpy(_normalize(gallery_vectors))
    scores = q @ g.T
    if boost and query_category is not None:
        same = torch.from_numpy(np.asarray(gallery_category)[None, :] == np.asarray(query_category)[:, None])
        scores = scores + (_HARD_BOOST if math.isinf(boost) else float(boost)) * same.float()
    top = torch.topk(scores, min(k, g.shape[0]), dim=1)
    return top.values.numpy(), top.indices.numpy()


# --------------------------------------------------------------------------------------------
# Level 1 training
# --------------------------------------------------------------------------------------------


@dataclass
class TrainedHead:
    loss_name: str
    head: ProjectionHead
    loss: nn.Module
    history: list[dict]
    best_epoch: int
    best_val_precision: float
    seconds: float


def _encode(labels, categories: list[str]) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(categories)}
    return np.array([lookup[str(label)] for label in labels], dtype=np.int64)


def train_head(vectors: np.ndarray, labels, categories: list[str], loss_name: str, cfg: HeadConfig,
               val_vectors: np.ndarray | None = None, val_labels=None, epochs: int | None = None,
               progress: bool = True, desc: str | None = None) -> TrainedHead:
    """Trains one projection head; with validation rows, keeps the epoch of best validation P@k.

    Seeded: the initialisation, the dropout masks and the minibatch order depend only on
    ``cfg.seed`` (same data + same seed -> same weights).
    """
    x = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    y = torch.as_tensor(_encode(labels, categories))
    has_val = val_vectors is not None and len(val_vectors) >= 1
    fit_ranked = has_val and validation_uses_fit_rows(val_labels)
    max_epochs = epochs if epochs is not None else cfg.epochs
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = build_head(x.shape[1], cfg)
        head.set_standardization(np.asarray(vectors, dtype=np.float32))
        loss_fn = make_loss(loss_name, len(categories), cfg.out_dim, cfg)
        groups = [{"params": head.parameters(), "lr": cfg.lr}]
        loss_params = list(loss_fn.parameters())
        if loss_params:
            groups.append({"params": loss_params, "lr": cfg.lr * cfg.proxy_lr_multiplier})
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        order_rng = torch.Generator().manual_seed(cfg.seed)
        history: list[dict] = []
        best = (-1.0, 0, None)
        stale = 0
        bar = tqdm(range(1, max_epochs + 1), desc=desc or f"head ({loss_name})", unit="epoch",
                   disable=not progress, leave=False, file=sys.stderr)
        for epoch in bar:
            head.train()
            permutation = torch.randperm(len(x), generator=order_rng)
            total, batches = 0.0, 0
            for start in range(0, len(x), cfg.batch_size):
                batch = permutation[start:start + cfg.batch_size]
                if len(batch) < 2 and batches:
                    continue
                loss = loss_fn(head(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
                batches += 1
            entry = {"epoch": epoch, "loss": total / max(batches, 1)}
            if has_val:
                entry["val_precision"] = validation_precision(
                    project(head, val_vectors), val_labels,
                    project(head, vectors) if fit_ranked else None, labels, cfg.k)
                if entry["val_precision"] > best[0]:
                    best = (entry["val_precision"], epoch, _state_copy(head, loss_fn))
                    stale = 0
                else:
                    stale += 1
                bar.set_postfix(loss=f"{entry['loss']:.3f}", val_p=f"{entry['val_precision']:.3f}")
            else:
                bar.set_postfix(loss=f"{entry['loss']:.3f}")
            history.append(entry)
            if has_val and stale >= cfg.patience:
                break
        bar.close()
    if has_val and best[2] is not None:
        head.load_state_dict(best[2][0])
        loss_fn.load_state_dict(best[2][1])
        best_epoch, best_val = best[1], best[0]
    else:
        best_epoch, best_val = len(history), float("nan")
    head.eval()
    return TrainedHead(loss_name, head, loss_fn, history, best_epoch, best_val, time.perf_counter() - started)


class torch_threads:
    """Temporarily limits torch's intra-op threads (and BLAS/OpenMP pools).

    The head's matrices are small: on a shared 2-core machine two spinning threads make an
    epoch 20x slower than one (measured: 14 s vs 0.6 s per epoch on the clothing photos).
    """

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        from threadpoolctl import threadpool_limits

        self.previous = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)
            self.limits = threadpool_limits(self.n)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.previous)
        if self.n:
            self.limits.restore_original_limits()


def _state_copy(*modules: nn.Module) -> list[dict]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


@torch.no_grad()
def project(head: nn.Module, vectors: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Head outputs (unit norm) for frozen embeddings, in eval mode."""
    was_training = head.training
    head.eval()
    x = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    out = torch.cat([head(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else \
        torch.zeros(0, head.out_dim)
    head.train(was_training)
    return out.numpy()


@dataclass
class HeadFit:
    """The outcome of level 1: the chosen head (trained on the train split) and how it was chosen."""

    head: ProjectionHead
    loss: nn.Module
    loss_name: str
    categories: list[str]
    comparison: pd.DataFrame           # one row per loss: best epoch, validation P@k, seconds
    histories: dict[str, list[dict]]
    val_mask: np.ndarray
    not_validated: list[dict]
    epochs: int
    seconds: float
    selection_head: ProjectionHead     # the winner as trained on the fit part only (for honest selection)
    selection_loss: nn.Module          # and its loss (proxies), the starting point of level 2


def fit_head(vectors: np.ndarray, labels, cfg: HeadConfig = HeadConfig(), losses=LOSSES,
             progress: bool = True) -> HeadFit:
    """Trains one head per loss on the fit part, keeps the loss with the best validation P@k.

    With ``cfg.refit`` the winner is then retrained on all train rows (fit + validation)
    for the epoch count that validation chose, with the same seed.
    """
    labels = np.asarray(labels).astype(str)
    categories = sorted({str(label) for label in labels})
    val_mask, not_validated = validation_split(labels, cfg.val_fraction, cfg.seed)
    fit_mask = ~val_mask
    started = time.perf_counter()
    runs: dict[str, TrainedHead] = {}
    for name in losses:
        runs[name] = train_head(vectors[fit_mask], labels[fit_mask], categories, name, cfg,
                                vectors[val_mask] if val_mask.any() else None, labels[val_mask],
                                progress=progress, desc=f"level 1 head, {name}")
    comparison = pd.DataFrame([
        {"loss": name, "best_epoch": run.best_epoch, "epochs_run": len(run.history),
         "val_precision_at_k": run.best_val_precision, "seconds": round(run.seconds, 2)}
        for name, run in runs.items()
    ])
    if val_mask.any():
        winner = max(runs, key=lambda name: (runs[name].best_val_precision, -list(losses).index(name)))
    else:
        winner = list(losses)[0]
    chosen = runs[winner]
    epochs = chosen.best_epoch
    if cfg.refit and val_mask.any():
        chosen = train_head(vectors, labels, categories, winner, cfg, epochs=epochs, progress=progress,
                            desc=f"level 1 head, {winner}, refit on all train rows")
    return HeadFit(chosen.head, chosen.loss, winner, categories, comparison,
                   {name: run.history for name, run in runs.items()}, val_mask, not_validated, epochs,
                   time.perf_counter() - started, runs[winner].head, runs[winner].loss)


# --------------------------------------------------------------------------------------------
# Category classifier
# --------------------------------------------------------------------------------------------


@dataclass
class CategoryClassifier:
    """Multinomial logistic regression on L2-normalised features, stored as plain arrays (no pickle).

    L2-normalised inputs (what cosine retrieval compares) classify better than
    standardised ones on the clothing photos' validation part (0.81 vs 0.79).
    """

    categories: list[str]
    features: str                      # "frozen" (backbone embeddings) or "head" (fine-tuned outputs)
    coef: np.ndarray                   # (n_categories, dim)
    intercept: np.ndarray              # (n_categories,)
    c: float = 1.0

    def decision(self, vectors: np.ndarray) -> np.ndarray:
        x = _normalize(vectors).astype(np.float64)
        return x @ self.coef.T + self.intercept

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        z = self.decision(vectors)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        return np.asarray(self.categories, dtype=object)[self.decision(vectors).argmax(axis=1)]

    def to_payload(self) -> dict:
        return {"categories": [str(c) for c in self.categories], "features": self.features, "c": float(self.c),
                "input": "l2-normalised", **{name: torch.as_tensor(getattr(self, name)) for name in ("coef", "intercept")}}

    @classmethod
    def from_payload(cls, payload: dict) -> "CategoryClassifier":
        arrays = {name: payload[name].numpy().astype(np.float64) for name in ("coef", "intercept")}
        return cls(list(payload["categories"]), payload["features"], c=float(payload["c"]), **arrays)


CLASSIFIER_VIEWS = {
    "squash": "the whole image resized to the input size, aspect ratio not kept",
    "shorter_side": "shorter side resized to the input size, centre crop: the whole width of a portrait photo",
}
MULTI_VIEW_FEATURES = "frozen+views"


def view_transform(transform, view: str):
    """The backbone's transform with its resize + centre crop replaced by ``view``'s geometry.

    Only for transforms of the form Resize(s) -> CenterCrop(c) -> tensor steps (the
    EfficientNet-Lite family); anything else raises FashionRecError, so the classifier
    falls back to the retrieval view alone.
    """
    from torchvision import transforms

    steps = list(getattr(transform, "transforms", []))
    kinds = [type(step) for step in steps]
    if len(steps) < 2 or kinds[:2] != [transforms.Resize, transforms.CenterCrop]:
        raise FashionRecError(f"classifier views need a Resize -> CenterCrop transform, not {transform!r}")
    if view not in CLASSIFIER_VIEWS:
        raise ValueError(f"unknown classifier view {view!r}; choose from {', '.join(CLASSIFIER_VIEWS)}")
    resize, crop, rest = steps[0], steps[1], steps[2:]
    height, width = crop.size
    if view == "squash":
        geometry = [transforms.Resize((height, width), interpolation=resize.interpolation, antialias=True)]
    else:
        geometry = [transforms.Resize(min(height, width), interpolation=resize.interpolation, antialias=True),
                    transforms.CenterCrop((height, width))]
    return transforms.Compose([*geometry, *rest])


def view_backbone(backbone, view: str):
    """The same network seeing another view: its own transform, so its own embedding cache key."""
    import dataclasses

    return dataclasses.replace(backbone, transform=view_transform(backbone.transform, view))


def multi_view_features(frozen: np.ndarray, views: list[np.ndarray]) -> np.ndarray:
    """Retrieval-view embeddings and the extra views' side by side, each L2-normalised."""
    return np.hstack([_normalize(frozen), *(_normalize(v) for v in views)]).astype(np.float32)


def classifier_view_embeddings(prepared, view, metadata: pd.DataFrame, runtime: str | None, batch_size: int,
                               num_workers: int, threads: int | None, progress: bool) -> np.ndarray:
    """Embeddings of ``metadata``'s rows (same order) through the view backbone ``view``; cached like any other."""
    from .embed import embed_catalog
    from .runtime import DEFAULT_RUNTIME, calibration_sample, with_runtime

    runtime = runtime or DEFAULT_RUNTIME
    rows = prepared.catalog[prepared.catalog["id"].isin(metadata["id"])].reset_index(drop=True)
    calibration = None
    if runtime == "onnx-int8":
        calibration = calibration_sample(rows.loc[rows["split"] == "train", "path"].tolist(), seed=prepared.split_seed)
    model = with_runtime(view, runtime, threads=threads, calibration_paths=calibration, progress=progress)
    embedded = embed_catalog(rows, model, batch_size=batch_size, num_workers=num_workers, threads=threads,
                             root=prepared.root, progress=progress)
    position = {image_id: i for i, image_id in enumerate(embedded.metadata["id"])}
    missing = [image_id for image_id in metadata["id"] if image_id not in position]
    if missing:
        raise FashionRecError(f"{len(missing)} images embedded in the retrieval view failed in another view "
                              f"(first: {missing[0]})")
    return embedded.vectors[[position[image_id] for image_id in metadata["id"]]]


def train_classifier(vectors: np.ndarray, labels, features: str = "frozen", c: float = 10.0,
                     seed: int = config.DEFAULT_SEED) -> CategoryClassifier:
    """Logistic regression (sklearn, lbfgs, seeded) on L2-normalised features."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    labels = np.asarray(labels).astype(str)
    categories = sorted({str(label) for label in labels})
    x = _normalize(vectors).astype(np.float64)
    if len(categories) == 1:
        # Nothing to learn: every image is of the one category.
        return CategoryClassifier(categories, features, np.zeros((1, x.shape[1])), np.zeros(1), c)
    model = LogisticRegression(C=c, max_iter=3000, random_state=seed)
    with threadpool_limits(1):   # small problem: extra BLAS threads only spin on a busy machine
        model.fit(x, labels)
    coef, intercept = model.coef_, model.intercept_
    if len(categories) == 2:  # sklearn keeps one row for two classes: logit of the second one
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    order = [list(model.classes_).index(category) for category in categories]
    return CategoryClassifier(categories, features, coef[order], intercept[order], c)


def select_classifier(frozen: np.ndarray, labels, val_mask: np.ndarray, head_vectors: np.ndarray | None = None,
                      head_selection_vectors: np.ndarray | None = None, cs=(1.0, 10.0, 100.0),
                      seed: int = config.DEFAULT_SEED, head_augmented: np.ndarray | None = None,
                      head_augmented_rows: np.ndarray | None = None,
                      multi_view: np.ndarray | None = None) -> tuple[CategoryClassifier, pd.DataFrame]:
    """Chooses the features (frozen / frozen+views / head) and C on the validation part, then refits on all train rows.

    ``multi_view`` are :func:`multi_view_features` of the train rows (a frozen function of
    each image, like ``frozen``).

    ``head_selection_vectors`` are the train rows through a head that never saw the
    validation part (the one trained on the fit part); ``head_vectors`` through the final
    head, for the refit. Without the former, the head features are not considered.
    ``head_augmented`` (with the train row each comes from, ``head_augmented_rows``) are
    extra training examples for the head-feature classifier: augmented views of fit rows
    (level 2), never of validation rows.
    """
    labels = np.asarray(labels).astype(str)
    candidates = {"frozen": (frozen, frozen)}
    if multi_view is not None:
        candidates[MULTI_VIEW_FEATURES] = (multi_view, multi_view)
    if head_vectors is not None and head_selection_vectors is not None:
        candidates["head"] = (head_selection_vectors, head_vectors)
    extra = {name: (np.zeros((0, vectors[0].shape[1]), np.float32), np.zeros(0, dtype=str))
             for name, vectors in candidates.items()}
    if head_augmented is not None and len(head_augmented) and "head" in candidates:
        if val_mask[head_augmented_rows].any():
            raise ValueError("augmented views of validation rows would leak into classifier selection")
        extra["head"] = (head_augmented, labels[head_augmented_rows])
    rows = []
    if val_mask.any() and len(set(labels[~val_mask])) > 1:
        for features, (vectors, _) in candidates.items():
            for c in cs:
                fitted = train_classifier(np.concatenate([vectors[~val_mask], extra[features][0]]),
                                          np.concatenate([labels[~val_mask], extra[features][1]]), features, c, seed)
                accuracy = float((fitted.predict(vectors[val_mask]) == labels[val_mask]).mean())
                rows.append({"features": features, "c": c, "val_accuracy": accuracy})
        table = pd.DataFrame(rows)
        best = table.sort_values("val_accuracy", ascending=False, kind="stable").iloc[0]
        features, c = best["features"], float(best["c"])
    else:
        table = pd.DataFrame(columns=["features", "c", "val_accuracy"])
        features, c = "frozen", float(cs[len(cs) // 2])
    final = np.concatenate([candidates[features][1], extra[features][0]])
    return train_classifier(final, np.concatenate([labels, extra[features][1]]), features, c, seed), table


def category_metrics(true_labels, predicted_labels, categories: list[str] | None = None, seed: int = 0) -> dict:
    """Accuracy with its 95% bootstrap interval over queries (``seed``), macro F1 (over the
    categories with queries or predictions) and the confusion matrix."""
    from sklearn.metrics import confusion_matrix, f1_score

    from .metrics import bootstrap_ci

    true_labels = np.asarray(true_labels).astype(str)
    predicted_labels = np.asarray(predicted_labels).astype(str)
    categories = list(categories) if categories is not None else sorted(set(true_labels) | set(predicted_labels))
    present = [c for c in categories if c in set(true_labels) | set(predicted_labels)]
    matrix = confusion_matrix(true_labels, predicted_labels, labels=categories)
    per_f1 = f1_score(true_labels, predicted_labels, labels=categories, average=None, zero_division=0)
    support = matrix.sum(axis=1)
    return {
        "accuracy": float((true_labels == predicted_labels).mean()) if len(true_labels) else float("nan"),
        "accuracy_ci": [round(bound, 6) for bound in bootstrap_ci(true_labels == predicted_labels, seed=seed)],
        "macro_f1": float(f1_score(true_labels, predicted_labels, labels=present, average="macro", zero_division=0)),
        "n": int(len(true_labels)),
        "confusion_matrix": {"labels": categories, "rows": "true category", "columns": "predicted category",
                             "matrix": matrix.tolist()},
        "per_category_f1": {c: {"f1": round(float(f), 6), "support": int(s)}
                            for c, f, s in zip(categories, per_f1, support)},
    }


# --------------------------------------------------------------------------------------------
# Category-aware recommendation
# --------------------------------------------------------------------------------------------


def category_aware_effect(query_vectors, gallery_vectors, query_labels, gallery_labels, query_predicted,
                          gallery_predicted=None, k: int = 10, boosts=DEFAULT_BOOSTS) -> pd.DataFrame:
    """P@k and friends when gallery items of the query's predicted category get a score bonus.

    ``gallery`` = ``known`` uses the catalog's own labels for gallery items (a shop knows
    the category of what it sells); ``predicted`` uses the classifier for them too. Boost
    0 is the plain ranking; ``inf`` ranks within the predicted category first.
    """
    from . import metrics

    query_labels = np.asarray(query_labels).astype(str)
    gallery_labels = np.asarray(gallery_labels).astype(str)
    n_relevant = metrics.n_relevant_from_labels(query_labels, gallery_labels)
    sources = {"known": gallery_labels}
    if gallery_predicted is not None:
        sources["predicted"] = np.asarray(gallery_predicted).astype(str)
    rows = []
    for source, gallery_category in sources.items():
        for boost in boosts:
            if boost == 0 and source != "known":
                continue
            _, positions = rank(query_vectors, gallery_vectors, k, query_predicted, gallery_category, boost)
            relevance = metrics.relevance_from_labels(query_labels, gallery_labels[positions])
            summary = metrics.summarize(metrics.retrieval_metrics(relevance, n_relevant, k))
            rows.append({"gallery_category": source if boost else "-", "boost": boost,
                         **{name: round(float(v), 6) for name, v in summary.items()}})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Level 2: last blocks of EfficientNet-Lite + head, on cached trunk feature maps
# --------------------------------------------------------------------------------------------


def _lite_net(model: nn.Module) -> nn.Module:
    if not (hasattr(model, "_blocks") and hasattr(model, "_conv_head") and hasattr(model, "_bn1")):
        raise FashionRecError("level 2 fine-tuning supports the efficientnet_lite* backbones only")
    return model


def trunk_cut(model: nn.Module, trainable_blocks: int) -> int:
    net = _lite_net(model)
    n = len(net._blocks)
    if not 0 <= trainable_blocks <= n:
        raise ValueError(f"trainable_blocks must be within 0..{n}")
    return n - trainable_blocks


class LiteTrunk(nn.Module):
    """Stem and the first ``cut`` MBConv blocks of an EfficientNet-Lite (frozen, eval mode)."""

    def __init__(self, net: nn.Module, cut: int):
        super().__init__()
        self.net, self.cut = net, cut

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(images)))
        for block in net._blocks[:self.cut]:
            x = block(x, drop_connect_rate=None)
        return x


class LiteTail(nn.Module):
    """The remaining blocks, the 1x1 head conv, BN, activation and global average pooling."""

    def __init__(self, net: nn.Module, cut: int):
        super().__init__()
        self.net, self.cut = net, cut

    def trainable_prefixes(self) -> tuple[str, ...]:
        return tuple(f"_blocks.{i}." for i in range(self.cut, len(self.net._blocks))) + ("_conv_head.", "_bn1.")

    def trainable_state(self) -> dict[str, torch.Tensor]:
        prefixes = self.trainable_prefixes()
        return {k: v.detach().clone() for k, v in self.net.state_dict().items() if k.startswith(prefixes)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        for block in net._blocks[self.cut:]:
            x = block(x, drop_connect_rate=None)
        x = net._swish(net._bn1(net._conv_head(x)))
        return x.mean(dim=(2, 3))


def augmentation(backbone, cfg: BackboneTuneConfig, resolution: int):
    """Random resized crop, horizontal flip, colour jitter, then the backbone's own normalisation."""
    from torchvision import transforms

    normalize = [t for t in getattr(backbone.transform, "transforms", []) if isinstance(t, transforms.Normalize)]
    jitter = cfg.color_jitter
    return transforms.Compose([
        transforms.RandomResizedCrop(resolution, scale=tuple(cfg.crop_scale),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=min(0.05, jitter / 6)),
        transforms.ToTensor(),
        *normalize,
    ])


class _SeededViews(torch.utils.data.Dataset):
    """Image i, view v: transform drawn from a generator seeded by (seed, image digest, view)."""

    def __init__(self, paths, digests, transform, seed: int | None):
        self.paths, self.digests, self.transform, self.seed = list(paths), list(digests), transform, seed

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from .images import load_image

        image = load_image(self.paths[i])
        if self.seed is None:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(hashlib.sha256(f"{self.seed}:{self.digests[i]}".encode()).digest()[:8],
                                             "little") & ((1 << 63) - 1))
            return self.transform(image)


class _FlatTrunk(nn.Module):
    def __init__(self, trunk: LiteTrunk):
        super().__init__()
        self.trunk = trunk

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images).flatten(1)


def trunk_model(backbone, cut: int, runtime: str = "onnx", progress: bool = False) -> nn.Module:
    """(B,3,H,W) -> flattened trunk feature maps; ONNX Runtime when it exports within tolerance, else eager.

    ONNX Runtime runs these convolutions several times faster than eager PyTorch on a small
    CPU; its export is checked against eager (relative error <= 1e-4) before use.
    """
    import dataclasses

    flat = _FlatTrunk(LiteTrunk(_lite_net(backbone.model), cut)).eval()
    if runtime == "eager":
        return flat
    try:
        from .runtime import OPSET, OnnxModel, exported_onnx

        resolution = _center_crop_size(backbone)
        dim = int(np.prod(_trunk_shape(backbone.model, cut, resolution)))
        trunk_backbone = dataclasses.replace(backbone, name=f"{backbone.name}-trunk{cut}", dim=dim, model=flat,
                                             classifier=None)
        path = exported_onnx(trunk_backbone, progress=progress)
        return OnnxModel(path, None, f"runtime='onnx', source={trunk_backbone.name}, opset={OPSET}")
    except Exception as error:  # no onnxruntime, failed export: eager is the reference anyway
        if progress:
            print(f"[finetune] trunk stays eager ({type(error).__name__}: {error})", file=sys.stderr)
        return flat


def _center_crop_size(backbone) -> int:
    for t in getattr(backbone.transform, "transforms", []):
        if type(t).__name__ == "CenterCrop":
            size = t.size
            return int(size[0] if isinstance(size, (tuple, list)) else size)
    raise FashionRecError(f"{backbone.name}: no CenterCrop in its transform to take the input size from")


def trunk_features(rows: pd.DataFrame, backbone, cut: int, view: str, transform, seed: int | None,
                   batch_size: int = 32, num_workers: int = 2, runtime: str = "onnx",
                   progress: bool = True) -> np.ndarray:
    """Frozen-trunk feature maps (float16, flattened) of ``rows`` (with a ``digest`` column) for one view, cached.

    Cached per image digest in ``data/interim/finetune-trunk/<backbone>-<cache key>-cut<cut>/<view>``,
    with the crash-safe shards of the embedding cache. ``view`` names the transform: the
    backbone's own ("clean") or a seeded augmentation.
    """
    from .embed import SHARD_SIZE, EmbeddingCache

    directory = config.INTERIM_DIR / "finetune-trunk" / f"{backbone.name}-{backbone.cache_key[:16]}-cut{cut}" / view
    cache = EmbeddingCache(directory, 0)
    digests = rows["digest"].astype(str).tolist()
    pending = [d for d in dict.fromkeys(digests) if d not in cache]
    if pending:
        trunk = trunk_model(backbone, cut, runtime, progress)
        path_of = dict(zip(digests, rows["path"]))
        bar = tqdm(total=len(pending), desc=f"trunk features ({view})", unit="img", disable=not progress,
                   file=sys.stderr)
        for start in range(0, len(pending), SHARD_SIZE):
            shard = pending[start:start + SHARD_SIZE]
            dataset = _SeededViews([path_of[d] for d in shard], shard, transform, seed)
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                                 num_workers=min(num_workers, len(shard)), shuffle=False)
            out = []
            with torch.inference_mode():
                for batch in loader:
                    out.append(trunk(batch).to(torch.float16).numpy().reshape(len(batch), -1))
                    bar.update(len(batch))
            maps = np.concatenate(out)
            cache.write_shard(shard, maps.reshape(len(shard), -1), [""] * len(shard))
        bar.close()
    if not digests:
        return np.zeros((0, 0), np.float16)
    return np.stack([cache.vectors[d] for d in digests])


@dataclass
class TunedBackbone:
    tail_state: dict[str, torch.Tensor]
    head: ProjectionHead
    trainable_blocks: int
    history: list[dict]
    best_epoch: int
    best_val_precision: float
    seconds: float
    feature_seconds: float
    stopped_by: str
    train_vectors: np.ndarray          # train rows (clean view) through the tuned blocks + head
    augmented_vectors: np.ndarray      # the fit rows' augmented views through them, view after view
    augmented_rows: np.ndarray         # which train row each augmented vector comes from


def tune_backbone(backbone, train_rows: pd.DataFrame, train_labels, level1: HeadFit, cfg: BackboneTuneConfig,
                  head_cfg: HeadConfig, num_workers: int = 2, train_threads: int | None = 1,
                  progress: bool = True) -> TunedBackbone:
    """Level 2: trains the last ``cfg.trainable_blocks`` blocks + the head, starting from the level-1 head.

    Batch-norm statistics stay frozen (eval mode) and the BN affine parameters train; the
    training loop stops at the earliest of ``cfg.epochs``, early stopping (validation P@k,
    ``cfg.patience`` epochs) and ``cfg.time_budget_s`` of wall-clock time.
    """
    labels = np.asarray(train_labels).astype(str)
    val_mask = level1.val_mask
    fit_rows = np.flatnonzero(~val_mask)
    net = copy.deepcopy(_lite_net(backbone.model))
    cut = trunk_cut(net, cfg.trainable_blocks)
    resolution = _center_crop_size(backbone)
    aug = augmentation(backbone, cfg, resolution)

    feature_started = time.perf_counter()
    clean = trunk_features(train_rows, backbone, cut, "clean", backbone.transform, None, num_workers=num_workers,
                           progress=progress)
    shape = _trunk_shape(net, cut, resolution)
    views = [clean[fit_rows]]
    for v in range(cfg.n_views):
        views.append(trunk_features(train_rows.iloc[fit_rows], backbone, cut, f"aug-seed{cfg.seed}-v{v}-"
                                    f"{_digest(repr(aug))[:8]}", aug, cfg.seed * 1000 + v, num_workers=num_workers,
                                    progress=progress))
    feature_seconds = time.perf_counter() - feature_started
    views = np.stack(views)                                   # (n_views + 1, n_fit, flat)
    val_maps = clean[val_mask]

    tail = LiteTail(net, cut)
    # Start from the level-1 head trained on the fit part only: the refitted one has seen
    # the validation rows, which would make early stopping and model choice meaningless.
    head = copy.deepcopy(level1.selection_head)
    loss_fn = copy.deepcopy(level1.selection_loss)
    for p in net.parameters():
        p.requires_grad_(False)
    prefixes = tail.trainable_prefixes()
    tail_params = [p for n, p in net.named_parameters() if n.startswith(prefixes)]
    for p in tail_params:
        p.requires_grad_(True)
    y = torch.as_tensor(_encode(labels[fit_rows], level1.categories))
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]), torch_threads(train_threads):
        torch.manual_seed(cfg.seed)
        groups = [{"params": tail_params, "lr": cfg.lr}, {"params": head.parameters(), "lr": cfg.head_lr}]
        if list(loss_fn.parameters()):
            groups.append({"params": loss_fn.parameters(), "lr": cfg.head_lr * head_cfg.proxy_lr_multiplier})
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        order_rng = torch.Generator().manual_seed(cfg.seed)

        def embed_maps(maps: np.ndarray) -> np.ndarray:
            out = []
            head.eval()
            with torch.no_grad():
                for i in range(0, len(maps), 256):
                    x = torch.from_numpy(maps[i:i + 256].astype(np.float32)).reshape(-1, *shape)
                    out.append(head(tail(x)).numpy())
            return np.concatenate(out) if out else np.zeros((0, head.out_dim), np.float32)

        history = []
        fit_ranked = val_mask.any() and validation_uses_fit_rows(labels[val_mask])

        def validate() -> float:
            if not val_mask.any():
                return float("nan")
            fit_vectors = embed_maps(views[0]) if fit_ranked else None
            return validation_precision(embed_maps(val_maps), labels[val_mask], fit_vectors, labels[fit_rows],
                                        head_cfg.k)

        best_val = validate()
        best = (best_val, 0, tail.trainable_state(), _state_copy(head)[0])
        history.append({"epoch": 0, "loss": float("nan"), "val_precision": best_val, "seconds": 0.0})
        stale, stopped_by = 0, "epochs"
        steps_per_epoch = math.ceil(len(fit_rows) / cfg.batch_size)
        bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"level 2: last {cfg.trainable_blocks} block(s) + head",
                   unit="step", disable=not progress, file=sys.stderr)
        for epoch in range(1, cfg.epochs + 1):
            net.eval()       # frozen BN statistics, no drop-connect
            head.train()
            permutation = torch.randperm(len(fit_rows), generator=order_rng)
            chosen_view = torch.randint(0, len(views), (len(fit_rows),), generator=order_rng)
            total, batches, out_of_time = 0.0, 0, False
            for start in range(0, len(fit_rows), cfg.batch_size):
                batch = permutation[start:start + cfg.batch_size].numpy()
                if len(batch) < 2:
                    continue
                maps = views[chosen_view[batch].numpy(), batch].astype(np.float32)
                x = torch.from_numpy(maps).reshape(-1, *shape)
                loss = loss_fn(head(tail(x)), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
                batches += 1
                bar.update(1)
                if time.perf_counter() - started > cfg.time_budget_s:
                    out_of_time = True
                    break
            val_p = validate()
            history.append({"epoch": epoch, "loss": total / max(batches, 1), "val_precision": val_p,
                            "seconds": round(time.perf_counter() - started, 2), "partial": out_of_time})
            bar.set_postfix(val_p=f"{val_p:.3f}")
            if not val_mask.any() or val_p > best[0]:
                best = (val_p, epoch, tail.trainable_state(), _state_copy(head)[0])
                stale = 0
            else:
                stale += 1
            if out_of_time:
                stopped_by = "time budget"
                break
            if val_mask.any() and stale >= cfg.patience:
                stopped_by = "early stopping"
                break
        bar.close()
        seconds = time.perf_counter() - started
        net.load_state_dict({**net.state_dict(), **best[2]})
        head.load_state_dict(best[3])
        train_vectors = embed_maps(clean)
        augmented = np.concatenate([embed_maps(v) for v in views[1:]]) if len(views) > 1 else \
            np.zeros((0, head.out_dim), np.float32)
    head.eval()
    return TunedBackbone(best[2], head, cfg.trainable_blocks, history, best[1], best[0], seconds, feature_seconds,
                         stopped_by, train_vectors, augmented, np.tile(fit_rows, len(views) - 1))


def _trunk_shape(net: nn.Module, cut: int, resolution: int) -> tuple[int, int, int]:
    with torch.no_grad():
        return tuple(LiteTrunk(net, cut).eval()(torch.zeros(1, 3, resolution, resolution)).shape[1:])


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Model files and the "<base>+head:<file>" backbone name
# --------------------------------------------------------------------------------------------


def head_payload(fit: HeadFit, backbone, head_cfg: HeadConfig, train_fingerprint: str, n_train: int,
                 classifier: CategoryClassifier | None = None, tuned: TunedBackbone | None = None,
                 tune_cfg: BackboneTuneConfig | None = None, metrics: dict | None = None,
                 train_seconds: float | None = None) -> dict:
    """Everything a model file holds, as plain values and tensors (``weights_only``-loadable)."""
    head = tuned.head if tuned is not None else fit.head
    return {
        "format": FORMAT,
        "backbone": backbone.name,
        "backbone_cache_key": backbone.cache_key,
        "base_weights_sha256": backbone.weights_sha256,
        "level": 2 if tuned is not None else 1,
        "loss": fit.loss_name,
        "head_config": _plain(asdict(head_cfg)),
        "tune_config": _plain(asdict(tune_cfg)) if tune_cfg is not None else None,
        "in_dim": int(head.in_dim),
        "out_dim": int(head.out_dim),
        "state_dict": {k: v.detach().clone() for k, v in head.state_dict().items()},
        "trunk_state_dict": dict(tuned.tail_state) if tuned is not None else None,
        "trainable_blocks": int(tuned.trainable_blocks) if tuned is not None else 0,
        "categories": [str(c) for c in fit.categories],
        "classifier": classifier.to_payload() if classifier is not None else None,
        "train_fingerprint": train_fingerprint,
        "n_train": int(n_train),
        "epochs": int(tuned.best_epoch if tuned is not None else fit.epochs),
        "metrics": _plain(metrics or {}),
        "train_seconds": float(train_seconds if train_seconds is not None else fit.seconds),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
    }


def _plain(value):
    """JSON-style values only (dicts, lists, str, float, int, bool, None) for a weights_only file."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _loadable(value):
    """Plain containers, str/int/float/bool/None and tensors only: what ``weights_only`` loads."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, dict):
        return {str(k): _loadable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_loadable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or type(value) in (bool, int, float, str):
        return value
    for plain in (str, bool, int, float):   # subclasses (TorchVersion, IntEnum...) -> the plain type
        if isinstance(value, plain):
            return plain(value)
    raise TypeError(f"cannot store a {type(value).__name__} in a model file")


def save_model(payload: dict, path) -> Path:
    """Writes a model file atomically (plain values and tensors only); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    torch.save(_loadable(payload), temporary)
    os.replace(temporary, path)
    return path


def load_model(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailable(f"head file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsUnavailable(f"{path}: cannot be read as a fashionrec head file ({type(error).__name__}: {error})") \
            from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise WeightsUnavailable(f"{path}: not a fashionrec head file (format {FORMAT})")
    return payload


def head_from_payload(payload: dict) -> ProjectionHead:
    cfg = HeadConfig.from_dict(payload["head_config"])
    head = ProjectionHead(payload["in_dim"], cfg.hidden_dim, payload["out_dim"], cfg.input_dropout, cfg.dropout)
    head.load_state_dict(payload["state_dict"], strict=True)
    return head.eval()


def classifier_from_payload(payload: dict) -> CategoryClassifier | None:
    return CategoryClassifier.from_payload(payload["classifier"]) if payload.get("classifier") else None


def resolve_head_path(reference: str) -> Path:
    """Finds the model file a ``+head:`` reference names.

    ``<file>`` as given (absolute, or relative to the working directory or the project
    root); a bare ``<name>.pt`` also in ``data/processed/heads`` (the CLI's cache); a bare
    run name is ``results/<run>/head.pt``. The bare forms contain no ``/``, so a backbone
    name built from them is also a valid file name (embedding files, caches, exports).
    """
    candidates = [Path(reference)]
    if not Path(reference).is_absolute():
        candidates.append(config.PROJECT_ROOT / reference)
        if "/" not in reference:
            candidates.append(config.PROCESSED_DIR / "heads" / reference)
            candidates.append(config.RESULTS_DIR / reference / "head.pt")
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise WeightsUnavailable(f"head file {reference!r} not found (looked at: {', '.join(map(str, candidates))}); "
                             "train one with notebook 04-finetune or `python -m fashionrec evaluate ... --finetune`")


def split_backbone_name(name: str) -> tuple[str, str | None]:
    if HEAD_SEPARATOR in name:
        base, reference = name.split(HEAD_SEPARATOR, 1)
        return base, reference
    return name, None


def parameters_sha256(payload: dict) -> str:
    """Digest of what determines a fine-tuned model's output: base weights, architecture, every tensor.

    Metrics, timings and other metadata in the file are left out, so writing measured
    metrics into a model file does not invalidate the embeddings cached for it.
    """
    digest = hashlib.sha256()
    head_cfg = payload["head_config"]
    architecture = {"backbone": payload["backbone"], "base": payload.get("base_weights_sha256"),
                    "in_dim": payload["in_dim"], "out_dim": payload["out_dim"], "hidden_dim": head_cfg["hidden_dim"]}
    digest.update(json.dumps(architecture, sort_keys=True).encode())
    for part in ("state_dict", "trunk_state_dict"):
        for key, tensor in sorted((payload.get(part) or {}).items()):
            digest.update(f"{part}/{key}".encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_headed_backbone(name: str, weights_file=None):
    """``<base>+head:<file>``: the base backbone, its fine-tuned blocks (level 2) and the head, as a Backbone."""
    from .backbones import Backbone, get_backbone

    base_name, reference = split_backbone_name(name)
    if not reference:
        raise ValueError(f"{name!r}: expected <backbone>{HEAD_SEPARATOR}<head file>")
    path = resolve_head_path(reference)
    payload = load_model(path)
    if payload["backbone"] != base_name:
        raise WeightsUnavailable(f"{path}: a head for {payload['backbone']!r}, not for {base_name!r}")
    base = get_backbone(base_name, weights_file=weights_file)
    if payload.get("base_weights_sha256") != base.weights_sha256:
        raise WeightsUnavailable(f"{path}: trained on {base_name} weights with sha256 "
                                 f"{str(payload.get('base_weights_sha256'))[:16]}..., but the weights in use have "
                                 f"{str(base.weights_sha256)[:16]}...")
    model = base.model
    if payload.get("trunk_state_dict"):
        model = copy.deepcopy(model)
        trunk_state = payload["trunk_state_dict"]
        own = model.state_dict()
        unknown = sorted(set(trunk_state) - set(own))
        if unknown:
            raise WeightsUnavailable(f"{path}: fine-tuned parameters {unknown[:3]} do not fit {base_name}")
        own.update(trunk_state)
        model.load_state_dict(own, strict=True)
    headed = HeadedModel(model, head_from_payload(payload)).eval()
    level = payload.get("level", 1)
    return Backbone(
        name=name,
        dim=int(payload["out_dim"]),
        transform=base.transform,
        model=headed,
        classifier=None,
        weights_sha256=parameters_sha256(payload),
        description=(f"{base_name} + level-{level} fine-tuned head ({payload['loss']}, {payload['out_dim']}-d, "
                     f"unit norm) from {path}"),
    )


# --------------------------------------------------------------------------------------------
# The whole procedure on a prepared dataset (CLI and notebook)
# --------------------------------------------------------------------------------------------


def cache_key(backbone, train_fingerprint: str, level: int, head_cfg: HeadConfig, losses,
              tune_cfg: BackboneTuneConfig | None) -> str:
    settings = {"format": FORMAT, "training_version": TRAINING_VERSION, "backbone": backbone.name, "cache_key": backbone.cache_key,
                "train": train_fingerprint, "level": level, "losses": list(losses),
                "head": _plain(asdict(head_cfg)), "tune": _plain(asdict(tune_cfg)) if level == 2 else None}
    return _digest(json.dumps(settings, sort_keys=True))[:16]


def default_model_path(backbone_name: str, key: str) -> Path:
    return config.PROCESSED_DIR / "heads" / f"{backbone_name}-{key}.pt"


@dataclass
class FinetuneResult:
    """What :func:`run_finetune` produced: the JSON record and the pieces for plots."""

    record: dict
    model_path: Path
    payload: dict
    evaluation: object                 # fine-tuned Evaluation (query -> gallery)
    baseline: object                   # frozen-backbone Evaluation
    vectors: np.ndarray                # fine-tuned embeddings of ``metadata`` rows
    frozen: np.ndarray
    metadata: pd.DataFrame
    classification: dict
    category_aware: pd.DataFrame
    comparison: pd.DataFrame | None = None
    level2: TunedBackbone | None = None
    reused: bool = False
    extra: dict = field(default_factory=dict)


def run_finetune(prepared, backbone: str, level: int = 1, head_cfg: HeadConfig | None = None,
                 tune_cfg: BackboneTuneConfig | None = None, losses=LOSSES, index: str = "Flat", k: int = 10,
                 metric: str = "cosine", search_params: str = "", weights_file=None, batch_size: int = 32,
                 num_workers: int = 2, threads: int | None = None, model_path=None, retrain: bool = False,
                 runtime: str | None = None, train_threads: int | None = 1, progress: bool = True) -> FinetuneResult:
    """Trains (or reuses) a fine-tuned model on the train split and scores it on query -> gallery.

    The model file is cached under ``data/processed/heads/<backbone>-<key>.pt``, where the
    key covers the base backbone, the fingerprint of the train rows, the level and every
    setting; ``model_path`` writes (a copy) there as well.
    """
    from . import metrics as metric_fns
    from .backbones import get_backbone
    from .evaluate import dataset_fingerprint, evaluate_embeddings
    from .workflow import embed

    head_cfg = head_cfg or HeadConfig(k=k, seed=prepared.split_seed)
    tune_cfg = tune_cfg or BackboneTuneConfig(seed=prepared.split_seed)
    if level not in (1, 2):
        raise ValueError("level is 1 (head on frozen embeddings) or 2 (last blocks + head)")
    base = get_backbone(backbone, weights_file=weights_file)
    if level == 2:
        _lite_net(base.model)
    runtime_arg = {"runtime": runtime} if runtime else {}
    embeddings = embed(prepared, backbone, splits=("train", "gallery", "query"), weights_file=weights_file,
                       batch_size=batch_size, num_workers=num_workers, threads=threads, progress=progress,
                       **runtime_arg)
    metadata = embeddings.metadata
    frozen = embeddings.vectors
    split = metadata["split"].to_numpy()
    labels = metadata["label"].astype(str).to_numpy()
    train = split == "train"
    evaluated = np.isin(split, ("gallery", "query"))
    if not train.any():
        raise FashionRecError("no train rows to fine-tune on")
    train_fingerprint = dataset_fingerprint(metadata[train])
    key = cache_key(base, train_fingerprint, level, head_cfg, losses, tune_cfg)
    cached = default_model_path(backbone, key)
    eval_meta = metadata[evaluated].reset_index(drop=True)
    multi_view, views_skipped = None, None
    if head_cfg.classifier_views:
        try:
            views = [classifier_view_embeddings(prepared, view_backbone(base, view), metadata, runtime, batch_size,
                                                num_workers, threads, progress) for view in head_cfg.classifier_views]
            multi_view = multi_view_features(frozen, views)
        except FashionRecError as error:   # e.g. a backbone whose transform has no centre crop
            views_skipped = str(error)
    baseline = evaluate_embeddings(frozen[evaluated], eval_meta, k=k, index=index, metric=metric,
                                   search_params=search_params, seed=prepared.split_seed)

    fit = tuned = None
    comparison = None
    reused = cached.is_file() and not retrain
    if reused:
        payload = load_model(cached)
        if progress:
            print(f"[finetune] reusing {cached} (same backbone, train rows and settings)", file=sys.stderr)
    else:
        started = time.perf_counter()
        with torch_threads(train_threads):
            fit = fit_head(frozen[train], labels[train], head_cfg, losses, progress=progress)
        comparison = fit.comparison
        if level == 2:
            tuned = tune_backbone(base, metadata[train].reset_index(drop=True), labels[train], fit, tune_cfg,
                                  head_cfg, num_workers=num_workers, train_threads=train_threads, progress=progress)
            # Trained on the fit part only (no refit), so its validation features are honest.
            head_train, head_selection = tuned.train_vectors, tuned.train_vectors
            augmented, augmented_rows = tuned.augmented_vectors, tuned.augmented_rows
        else:
            head_train, head_selection = project(fit.head, frozen[train]), project(fit.selection_head, frozen[train])
            augmented = augmented_rows = None
        classifier, classifier_table = select_classifier(
            frozen[train], labels[train], fit.val_mask, head_vectors=head_train,
            head_selection_vectors=head_selection, cs=head_cfg.classifier_c, seed=head_cfg.seed,
            head_augmented=augmented, head_augmented_rows=augmented_rows,
            multi_view=None if multi_view is None else multi_view[train])
        train_seconds = time.perf_counter() - started
        payload = head_payload(fit, base, head_cfg, train_fingerprint, int(train.sum()), classifier, tuned,
                               tune_cfg if level == 2 else None, train_seconds=train_seconds)
        payload["embeddings_cache_key"] = embeddings.cache_key   # the runtime that computed the frozen inputs
        payload["selection"] = _plain({
            "loss_comparison": comparison.to_dict(orient="records"),
            "histories": {name: [{"epoch": h["epoch"], "loss": h["loss"], "val_precision": h.get("val_precision")}
                                 for h in history] for name, history in fit.histories.items()},
            "classifier_selection": classifier_table.to_dict(orient="records"),
            "not_validated": fit.not_validated,
            "n_validation": int(fit.val_mask.sum()),
            "level2": None if tuned is None else {
                "history": tuned.history, "best_epoch": tuned.best_epoch,
                "best_val_precision": tuned.best_val_precision, "stopped_by": tuned.stopped_by,
                "train_seconds": tuned.seconds, "feature_seconds": tuned.feature_seconds},
        })
        save_model(payload, cached)   # metrics are added below, once measured

    head = head_from_payload(payload)
    classifier = classifier_from_payload(payload)
    headed_name = f"{backbone}{HEAD_SEPARATOR}{cached.name}"
    if payload["level"] == 1:
        vectors = project(head, frozen)
    else:
        # Level 2 changes the backbone itself: embed through the saved model, as any notebook would.
        headed = embed(prepared, headed_name, splits=("gallery", "query"), weights_file=weights_file,
                       batch_size=batch_size, num_workers=num_workers, threads=threads, progress=progress,
                       **runtime_arg)
        by_id = dict(zip(headed.metadata["id"], headed.vectors))
        vectors = np.zeros((len(metadata), headed.vectors.shape[1]), np.float32)
        if tuned is not None:   # train rows: only when just trained (their clean views, tuned blocks + head)
            vectors[train] = tuned.train_vectors
        for i in np.flatnonzero(evaluated):
            vectors[i] = by_id[metadata["id"].iloc[i]]
    evaluation = evaluate_embeddings(vectors[evaluated], eval_meta, k=k, index=index, metric=metric,
                                     search_params=search_params, seed=prepared.split_seed)

    query = split == "query"
    gallery = split == "gallery"
    feature_of = {"frozen": frozen, "head": vectors, MULTI_VIEW_FEATURES: multi_view}
    if classifier is not None:
        predicted = classifier.predict(feature_of[classifier.features])
    else:
        predicted = np.full(len(labels), payload["categories"][0], dtype=object)
    classification = category_metrics(labels[query], predicted[query], payload["categories"], seed=prepared.split_seed)
    classification["classifier"] = {
        "model": "logistic regression", "features": classifier.features if classifier else None,
        "C": classifier.c if classifier else None,
        "views": ["centre_crop", *head_cfg.classifier_views] if multi_view is not None else ["centre_crop"],
        "views_skipped": views_skipped}
    aware = category_aware_effect(vectors[query], vectors[gallery], labels[query], labels[gallery], predicted[query],
                                  predicted[gallery], k=k)

    paired = metric_fns.paired_bootstrap(evaluation.per_query["precision_at_k"],
                                         baseline.per_query["precision_at_k"], seed=prepared.split_seed)
    measured = {
        "precision_at_k": evaluation.summary["precision_at_k"],
        "baseline_precision_at_k": baseline.summary["precision_at_k"],
        "category_accuracy": classification["accuracy"],
        "macro_f1": classification["macro_f1"],
        "k": k, "index": index, "metric": metric, "split_seed": prepared.split_seed,
        "dataset_fingerprint": dataset_fingerprint(metadata),
    }
    if not reused or payload.get("metrics") != _plain(measured):
        payload["metrics"] = _plain(measured)
        save_model(payload, cached)
    if model_path is not None and Path(model_path).resolve() != cached.resolve():
        save_model(payload, model_path)

    selection = payload.get("selection", {})
    record = {
        "finetune": {
            "level": payload["level"],
            "loss": payload["loss"],
            "model_file": str(model_path or cached),
            "cache_file": str(cached),
            "finetuned_backbone": f"{backbone}{HEAD_SEPARATOR}{model_path or cached.name}",
            "reused_cached_model": reused,
            "train_fingerprint": train_fingerprint,
            "n_train": payload["n_train"],
            "n_validation": selection.get("n_validation"),
            "epochs": payload["epochs"],
            "head_config": payload["head_config"],
            "tune_config": payload["tune_config"],
            "loss_comparison": selection.get("loss_comparison"),
            "classifier_selection": selection.get("classifier_selection"),
            "level2": selection.get("level2"),
            "categories_without_validation": selection.get("not_validated", []),
            "dim": int(payload["out_dim"]),
        },
        "category_accuracy": round(classification["accuracy"], 6),
        "category_accuracy_ci": classification["accuracy_ci"],
        "macro_f1": round(classification["macro_f1"], 6),
        "classification": classification,
        "baseline_precision_at_k": round(baseline.summary["precision_at_k"], 6),
        "baseline": {"backbone": backbone, **baseline.to_record(bootstrap_seed=prepared.split_seed)},
        "precision_at_k_gain": _plain(paired),
        "category_aware": _plain(aware.replace({math.inf: "inf"}).to_dict(orient="records")),
        "train_seconds": round(float(payload["train_seconds"]), 3),
    }
    record["baseline"].pop("per_category", None)
    return FinetuneResult(record, Path(model_path or cached), payload, evaluation, baseline, vectors, frozen,
                          metadata, classification, aware, comparison, tuned, reused,
                          {"embeddings": embeddings, "predicted": predicted})
