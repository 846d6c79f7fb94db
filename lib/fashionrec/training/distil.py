"""Distillation: one EfficientNet-Lite trained to reproduce a teacher's similarity structure.

The student is a level-2 fine-tuned model (:mod:`.trunk`: its last MBConv blocks and a
projection head, on seeded augmented views of each train photo) whose loss adds a
*relational* term to the category loss: the geometry of the student's batch (unit-norm
embeddings) is pulled towards the geometry of the teacher's L2-normalised embeddings of the
same photos. Every augmented view of a photo is matched to the teacher's embedding of that
photo (for a searched ensemble, itself an average over several views), so the student learns
to see through crops, flips and colour changes what the teacher sees in the whole photo.

Relational terms (both free of the embedding dimension, so a 128-d student can follow a
teacher of any width):

* ``rkd`` - RKD distance and angle terms (Park et al., CVPR 2019), weights 1 and 2 as in
  their metric-learning experiments: pairwise distances normalised by their batch mean, and
  the cosines of the angles formed by triplets, matched with a Huber loss.
* ``pkt`` - probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): each row's
  cosine similarities, mapped to [0, 1] and normalised into a distribution, matched by KL.

Every choice (relational weight, blocks unfrozen, epochs by early stopping; the level-1 loss,
the classifier and the category ranking as :func:`~fashionrec.training.finetune.train_model`
chooses them) is made on slices of the train split: candidates are compared by P@k of the
*select* slice ranking the rest of the train split, a slice that neither training nor early
stopping has seen. Query and gallery photos are never used.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..models.backbone import Backbone
from ..models.finetuned import FORMAT, plain_values
from .finetune import TRAINING_VERSION, FinetuneConfig, TrainedModel, train_model
from .trunk import text_digest

RELATIONAL_LOSSES = ("rkd", "pkt")
# Part of the student cache key: bump when distillation changes, so no stale student is reused.
DISTIL_VERSION = 1


# --------------------------------------------------------------------------------------------
# Relational losses
# --------------------------------------------------------------------------------------------


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    squared = (x * x).sum(dim=1)
    d2 = (squared[:, None] + squared[None, :] - 2.0 * x @ x.T).clamp(min=1e-12)
    d = d2.sqrt()
    return d * (1.0 - torch.eye(len(x), dtype=x.dtype))


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-D: Huber loss between pairwise distances, each set divided by its mean (scale-free)."""
    with torch.no_grad():
        t = _pairwise_distances(teacher)
        t = t / t[t > 0].mean()
    s = _pairwise_distances(student)
    s = s / s[s > 0].mean()
    return F.smooth_l1_loss(s, t)


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-A: Huber loss between the cosines of the angles each triplet (i, j, k) forms at j."""
    def angles(x: torch.Tensor) -> torch.Tensor:
        e = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)
        return torch.bmm(e, e.transpose(1, 2)).reshape(-1)

    with torch.no_grad():
        t = angles(teacher)
    return F.smooth_l1_loss(angles(student), t)


def pkt(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """PKT: KL divergence between each row's cosine-similarity distributions (teacher || student)."""
    def distribution(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=1)
        similarity = (x @ x.T + 1.0) / 2.0
        return similarity / similarity.sum(dim=1, keepdim=True)

    with torch.no_grad():
        t = distribution(teacher)
    s = distribution(student)
    return (t * torch.log((t + eps) / (s + eps))).sum(dim=1).mean()


class RelationalLoss(nn.Module):
    """Weighted relational term against fixed teacher embeddings of the train rows (L2-normalised here)."""

    def __init__(self, teacher: np.ndarray, kind: str = "rkd", weight: float = 1.0):
        super().__init__()
        if kind not in RELATIONAL_LOSSES:
            raise ValueError(f"unknown relational loss {kind!r}; available: {', '.join(RELATIONAL_LOSSES)}")
        self.teacher = F.normalize(torch.as_tensor(np.asarray(teacher, dtype=np.float32)), dim=1)
        self.kind, self.weight = kind, float(weight)

    def forward(self, embedded: torch.Tensor, rows) -> torch.Tensor:
        if len(rows) < 3 or not self.weight:
            return embedded.sum() * 0.0
        target = self.teacher[torch.as_tensor(np.asarray(rows), dtype=torch.long)]
        if self.kind == "rkd":
            term = rkd_distance(embedded, target) + 2.0 * rkd_angle(embedded, target)
        else:
            term = pkt(embedded, target)
        return self.weight * term


# --------------------------------------------------------------------------------------------
# Settings and the candidates compared on validation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistilConfig:
    """What the student is chosen from: relational losses and weights, blocks unfrozen, and level 2's settings."""

    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(level=2))
    relational: tuple[str, ...] = ("rkd",)
    weights: tuple[float, ...] = (1.0, 10.0)
    trainable_blocks: tuple[int, ...] = (2,)

    def __post_init__(self):
        if self.finetune.level != 2:
            raise ValueError("the student trains its last blocks: finetune.level must be 2")
        unknown = set(self.relational) - set(RELATIONAL_LOSSES)
        if not self.relational or unknown:
            raise ValueError(f"relational losses must be among {', '.join(RELATIONAL_LOSSES)}, "
                             f"got {list(self.relational)}")
        if not self.weights or any(w < 0 for w in self.weights):
            raise ValueError(f"relational weights must be >= 0, got {list(self.weights)}")
        if not self.trainable_blocks or any(b < 1 for b in self.trainable_blocks):
            raise ValueError(f"trainable blocks must be >= 1, got {list(self.trainable_blocks)}")

    def candidates(self) -> list[dict]:
        """Every (relational loss, weight, blocks) to train, in a fixed order (ties go to the first)."""
        return [{"relational": kind, "weight": float(weight), "trainable_blocks": int(blocks)}
                for blocks in self.trainable_blocks for kind in self.relational for weight in self.weights]


@dataclass
class DistilledModel:
    """The chosen student (its model file's content), every candidate's validation numbers, the training time."""

    payload: dict
    trained: TrainedModel
    candidates: pd.DataFrame
    chosen: dict
    seconds: float


def select_precision(trained: TrainedModel) -> tuple[float, float | str]:
    """P@k of the select slice ranking the rest of the train split, with the ranking the model chose.

    Read from the category-boost table :func:`~fashionrec.training.finetune.train_model`
    wrote: the select rows went through a model that neither trained nor stopped on them.
    """
    boost = trained.payload["selection"]["category_boost"]
    table = boost.get("table") or []
    chosen = [row for row in table if row.get("chosen")]
    if not chosen:
        return float("nan"), boost["boost"]
    return float(chosen[0]["val_precision_at_k"]), boost["boost"]


def distil_model(base: Backbone, train_rows: pd.DataFrame, frozen: np.ndarray, teacher: np.ndarray,
                 cfg: DistilConfig, train_fingerprint: str, teacher_description: dict,
                 multi_view: np.ndarray | None = None, num_workers: int = 2, progress: bool = True) -> DistilledModel:
    """Trains one student per candidate on the train rows and keeps the best on the select slice.

    ``teacher`` holds the teacher's embeddings of ``train_rows`` (same order). Training is
    seeded (the level-2 seed): the same rows, teacher and settings give the same student.
    """
    if len(teacher) != len(train_rows):
        raise ValueError(f"{len(teacher)} teacher embeddings for {len(train_rows)} train rows")
    started = time.perf_counter()
    rows, runs = [], []
    for candidate in cfg.candidates():
        finetune = dataclasses.replace(
            cfg.finetune, tune=dataclasses.replace(cfg.finetune.tune, trainable_blocks=candidate["trainable_blocks"]))
        relational = RelationalLoss(teacher, candidate["relational"], candidate["weight"])
        trained = train_model(base, train_rows, frozen, finetune, train_fingerprint, multi_view, num_workers,
                              progress, extra_loss=relational if candidate["weight"] else None)
        precision, boost = select_precision(trained)
        level2 = trained.payload["selection"]["level2"]
        rows.append({**candidate, "select_precision_at_k": round(precision, 6), "boost": boost,
                     "best_epoch": level2["best_epoch"], "val_precision_at_k": round(level2["best_val_precision"], 6),
                     "stopped_by": level2["stopped_by"], "seconds": round(trained.seconds, 2)})
        runs.append(trained)
    table = pd.DataFrame(rows)
    best = int(np.nanargmax(table["select_precision_at_k"].to_numpy())) if table["select_precision_at_k"].notna().any() \
        else 0
    table["chosen"] = [i == best for i in range(len(table))]
    chosen, trained = rows[best], runs[best]
    payload = trained.payload
    seconds = time.perf_counter() - started
    payload.train_seconds = float(seconds)
    boost = payload["selection"]["category_boost"]["boost"]
    # The served ranking: the category boost chosen on the select slice (0: by similarity alone).
    payload.ranking = {"boost": boost, "categories": "predicted" if float(boost) else None}
    payload.extra["distillation"] = plain_values({
        "teacher": teacher_description,
        "student": base.name,
        "losses": {"category": payload["loss"],
                   "relational": {"kind": chosen["relational"], "weight": chosen["weight"],
                                  "terms": "RKD distance + 2 x RKD angle" if chosen["relational"] == "rkd" else
                                  "PKT (KL of cosine-similarity distributions)",
                                  "teacher_embeddings": "L2-normalised, one per train photo; every augmented "
                                                        "view of a photo is matched to it"}},
        "choices": {"chosen": chosen, "candidates": table.to_dict(orient="records"),
                    "chosen_on": "P@k of the select slice of the train split ranking the rest of it"},
        "config": asdict(cfg),
        "train_seconds": seconds,
    })
    return DistilledModel(payload, trained, table, chosen, seconds)


def student_cache_key(base: Backbone, train_fingerprint: str, teacher_key: str, cfg: DistilConfig) -> str:
    """Digest of what determines a student: its base, the train rows, the teacher's embeddings and every setting."""
    settings = {"format": FORMAT, "training_version": TRAINING_VERSION, "distil_version": DISTIL_VERSION,
                "backbone": base.name, "cache_key": base.cache_key, "train": train_fingerprint,
                "teacher": teacher_key, "config": plain_values(asdict(cfg))}
    return text_digest(json.dumps(settings, sort_keys=True, default=str))[:16]
