"""The category classifier stored in a fine-tuned model file: plain arrays, no pickle, no torch to apply it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def multi_view_features(frozen: np.ndarray, views: list[np.ndarray]) -> np.ndarray:
    """Retrieval-view embeddings and the extra views' side by side, each L2-normalised."""
    return np.hstack([l2_normalize(frozen), *(l2_normalize(v) for v in views)]).astype(np.float32)



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
        x = l2_normalize(vectors).astype(np.float64)
        return x @ self.coef.T + self.intercept

    def predict_proba(self, vectors: np.ndarray) -> np.ndarray:
        z = self.decision(vectors)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        return np.asarray(self.categories, dtype=object)[self.decision(vectors).argmax(axis=1)]

    def to_payload(self) -> dict:
        import torch  # the model file is a torch.save archive; applying the classifier needs no torch

        return {"categories": [str(c) for c in self.categories], "features": self.features, "c": float(self.c),
                "input": "l2-normalised", **{name: torch.as_tensor(getattr(self, name)) for name in ("coef", "intercept")}}

    @classmethod
    def from_payload(cls, payload: dict) -> "CategoryClassifier":
        arrays = {name: payload[name].numpy().astype(np.float64) for name in ("coef", "intercept")}
        return cls(list(payload["categories"]), payload["features"], c=float(payload["c"]), **arrays)
