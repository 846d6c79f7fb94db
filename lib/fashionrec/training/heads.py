"""Level 1 of fine-tuning: a projection head on cached frozen embeddings.

The head (MLP, L2-normalised output) is trained on the train split only with a
metric-learning loss: Proxy-Anchor (Kim et al. 2020), normalised softmax (Zhai & Wu
2019; ProxyNCA++-style cosine proxies with a temperature) or supervised contrastive
(Khosla et al. 2020). Seconds on a CPU.

Model selection (loss, epoch, classifier features and strength) uses a stratified
validation part of the train split (:func:`validation_split`), never the gallery or the
query split.

Retrieval relevance is "same category as the query", so with a handful of categories the
head mostly learns one tight cluster per category: that is exactly what the metric
rewards, and it says nothing about finer similarity (colour, pattern, style) within a
category.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .. import config
from ..console import progress_bar
from ..data.split import validation_split
from ..models.classifier import l2_normalize
from ..models.projection import ProjectionHead, project

LOSSES = ("proxy_anchor", "norm_softmax", "supcon")


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



# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


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
# Retrieval helpers (numpy/torch, exact): validation
# --------------------------------------------------------------------------------------------


def leave_one_out_precision(vectors: np.ndarray, labels, k: int = 10) -> float:
    """Mean P@k when each row ranks all the other rows by cosine (validation within one set)."""
    labels = np.asarray(labels)
    n = len(labels)
    if n < 2:
        return float("nan")
    k = min(k, n - 1)
    x = torch.from_numpy(l2_normalize(vectors))
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
    x = torch.from_numpy(l2_normalize(vectors))
    scores = x[:len(val_labels)] @ x.T
    scores[torch.arange(len(val_labels)), torch.arange(len(val_labels))] = -float("inf")
    top = torch.topk(scores, k, dim=1).indices.numpy()
    return float((labels[top] == val_labels[:, None]).mean())


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


def encode_labels(labels, categories: list[str]) -> np.ndarray:
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
    y = torch.as_tensor(encode_labels(labels, categories))
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
        bar = progress_bar(range(1, max_epochs + 1), desc=desc or f"head ({loss_name})", unit="epoch",
                           progress=progress, leave=False)
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
                    best = (entry["val_precision"], epoch, state_copy(head, loss_fn))
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


def state_copy(*modules: nn.Module) -> list[dict]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


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
