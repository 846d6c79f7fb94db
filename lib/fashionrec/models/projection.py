"""The fine-tuned model's pieces: a projection head on a backbone's pooled features.

Training lives in :mod:`fashionrec.training`; this module only defines and applies the
network, so loading a fine-tuned model never imports the training code.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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


