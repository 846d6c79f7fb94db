"""Level 2 of fine-tuning: the last MBConv block(s) of an EfficientNet-Lite trained together with the head.

Training starts from the level-1 head (:mod:`fashionrec.heads`) and runs on a few seeded
augmented views per train image whose frozen-trunk feature maps are cached once. It stops by
epochs and early stopping only, so the same command gives the same model on a faster or a
slower machine; a wall-clock cap exists only as an opt-in safety net, reported when it fires.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import config
from ..console import progress_bar
from ..data.images import load_image
from ..errors import FashionRecError
from ..features.embed import SHARD_SIZE, EmbeddingCache
from ..models.projection import ProjectionHead
from ..models.runtime import OPSET, OnnxModel, exported_onnx
from .heads import (HeadConfig, HeadFit, encode_labels, state_copy, torch_threads, validation_precision,
                    validation_uses_fit_rows)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

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
    # Opt-in wall-clock safety net for the training loop (feature caching excluded), None = off. A
    # run it stops depends on the machine's speed and says so (stopped_by "time budget").
    time_budget_s: float | None = None
    crop_scale: tuple = (0.35, 1.0)
    color_jitter: float = 0.3
    seed: int = config.DEFAULT_SEED



# --------------------------------------------------------------------------------------------
# Level 2: last blocks of EfficientNet-Lite + head, on cached trunk feature maps
# --------------------------------------------------------------------------------------------


def _lite_net(model: nn.Module) -> nn.Module:
    if not (hasattr(model, "_blocks") and hasattr(model, "_conv_head") and hasattr(model, "_bn1")):
        raise FashionRecError("level 2 fine-tuning supports the efficientnet_lite* backbones only")
    return model


def check_level2_backbone(backbone) -> None:
    """Raises FashionRecError unless level 2 can fine-tune this backbone (efficientnet_lite* only)."""
    _lite_net(backbone.model)


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
    flat = _FlatTrunk(LiteTrunk(_lite_net(backbone.model), cut)).eval()
    if runtime == "eager":
        return flat
    try:
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
    directory = config.INTERIM_DIR / "finetune-trunk" / f"{backbone.name}-{backbone.cache_key[:16]}-cut{cut}" / view
    cache = EmbeddingCache(directory, 0)
    digests = rows["digest"].astype(str).tolist()
    pending = [d for d in dict.fromkeys(digests) if d not in cache]
    if pending:
        trunk = trunk_model(backbone, cut, runtime, progress)
        path_of = dict(zip(digests, rows["path"]))
        bar = progress_bar(total=len(pending), desc=f"trunk features ({view})", unit="img", progress=progress)
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
    held_out_vectors: np.ndarray       # the held-out rows (clean view) through them: never trained nor stopped on
    augmented_vectors: np.ndarray      # the fit rows' augmented views through them, view after view
    augmented_rows: np.ndarray         # which train row each augmented vector comes from


def tune_backbone(backbone, train_rows: pd.DataFrame, train_labels, level1: HeadFit, cfg: BackboneTuneConfig,
                  head_cfg: HeadConfig, num_workers: int = 2, train_threads: int | None = 1,
                  progress: bool = True, held_out_rows: pd.DataFrame | None = None,
                  extra_loss=None) -> TunedBackbone:
    """Level 2: trains the last ``cfg.trainable_blocks`` blocks + the head, starting from the level-1 head.

    ``extra_loss(embeddings, rows)``, when given, is added to the metric-learning loss of each
    batch: ``rows`` are the batch's positions in ``train_rows`` (distillation's relational term).

    ``held_out_rows`` (same columns as ``train_rows``), e.g. the selection slice, are only
    embedded by the final model (``held_out_vectors``), for choices made after training.

    Batch-norm statistics stay frozen (eval mode) and the BN affine parameters train; the
    training loop stops at the earlier of ``cfg.epochs`` and early stopping (validation P@k,
    ``cfg.patience`` epochs), so it is the same on any machine; ``cfg.time_budget_s``, when set,
    is a wall-clock safety net on top (``stopped_by`` then says "time budget").
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
                                    f"{text_digest(repr(aug))[:8]}", aug, cfg.seed * 1000 + v, num_workers=num_workers,
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
    y = torch.as_tensor(encode_labels(labels[fit_rows], level1.categories))
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
        best = (best_val, 0, tail.trainable_state(), state_copy(head)[0])
        history.append({"epoch": 0, "loss": float("nan"), "val_precision": best_val, "seconds": 0.0})
        stale, stopped_by = 0, "epochs"
        steps_per_epoch = math.ceil(len(fit_rows) / cfg.batch_size)
        bar = progress_bar(total=cfg.epochs * steps_per_epoch, unit="step", progress=progress,
                           desc=f"level 2: last {cfg.trainable_blocks} block(s) + head")
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
                embedded = head(tail(x))
                loss = loss_fn(embedded, y[batch])
                if extra_loss is not None:
                    loss = loss + extra_loss(embedded, fit_rows[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
                batches += 1
                bar.update(1)
                if cfg.time_budget_s is not None and time.perf_counter() - started > cfg.time_budget_s:
                    out_of_time = True
                    break
            val_p = validate()
            history.append({"epoch": epoch, "loss": total / max(batches, 1), "val_precision": val_p,
                            "seconds": round(time.perf_counter() - started, 2), "partial": out_of_time})
            bar.set_postfix(val_p=f"{val_p:.3f}")
            if not val_mask.any() or val_p > best[0]:
                best = (val_p, epoch, tail.trainable_state(), state_copy(head)[0])
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
        held_out = held_out_rows if held_out_rows is not None else train_rows.iloc[:0]
        held_out_vectors = embed_maps(trunk_features(held_out, backbone, cut, "clean", backbone.transform, None,
                                                     num_workers=num_workers, progress=progress)) if len(held_out) \
            else np.zeros((0, head.out_dim), np.float32)
        augmented = np.concatenate([embed_maps(v) for v in views[1:]]) if len(views) > 1 else \
            np.zeros((0, head.out_dim), np.float32)
    head.eval()
    return TunedBackbone(best[2], head, cfg.trainable_blocks, history, best[1], best[0], seconds, feature_seconds,
                         stopped_by, train_vectors, held_out_vectors, augmented, np.tile(fit_rows, len(views) - 1))


def _trunk_shape(net: nn.Module, cut: int, resolution: int) -> tuple[int, int, int]:
    with torch.no_grad():
        return tuple(LiteTrunk(net, cut).eval()(torch.zeros(1, 3, resolution, resolution)).shape[1:])


def text_digest(text: str) -> str:
    """SHA-256 of a text (settings as JSON, a transform's repr): the key of a cached training result."""
    return hashlib.sha256(text.encode()).hexdigest()
