"""Fast inference for the backbones: ONNX Runtime instead of eager PyTorch.

On a small CPU eager PyTorch leaves most of the machine idle for these convolutional
backbones (EfficientNet-Lite0: ~15-20 images/s on 2 AVX2 cores); the same graph exported
to ONNX and run by ONNX Runtime (constant folding, Conv+activation fusion, blocked NCHWc
kernels) gives the same embeddings (within ~1e-6 relative) several times faster.

Runtimes (``RUNTIMES``):

* ``"eager"``: the backbone exactly as :func:`~fashionrec.models.registry.get_backbone` builds it;
  the reference, and what every cache key before this module was computed with.
* ``"onnx"`` (``DEFAULT_RUNTIME``): fp32 ONNX export run by ONNX Runtime, plus JPEG draft
  decoding (see :func:`draft_size_for`). Equal to eager within 1e-4 relative (tested).
* ``"onnx-int8"``: statically quantised (QDQ, int8 per-channel weights, uint8 activations
  calibrated on a sample of training images). Changes the embeddings, so it is only ever
  used when asked for by name; never a default, never a fallback.

Each non-eager backbone is a :class:`~fashionrec.models.backbone.Backbone` (``dataclasses.replace``)
whose ``model`` is an :class:`OnnxModel` and whose ``transform`` is a :class:`DraftTransform`;
both reprs name the runtime, the source backbone's cache key and the decode policy, so
``cache_key`` (and with it the embedding cache directory) differs per runtime and eager and
ONNX embeddings never share a cache.

``colorhist`` and ``product_colour`` stay eager under every runtime: a histogram is a bucketize + scatter-add,
well under a millisecond per image, so decoding dominates and an ONNX session would only
add start-up time; it still gets draft decoding under the fast runtimes.

Exports are cached in ``config.INTERIM_DIR / "onnx"`` by source cache key, opset and (for
int8) calibration set, written to a temporary name and renamed into place.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import config
from ..data.images import file_digest, load_image
from ..errors import FashionRecError, ImageError
from ..settings import DEFAULT_RUNTIME, RUNTIMES, available_threads
from .backbone import Backbone
from .builtin import ColorHistogram
from .colour import ProductColour
from .ensemble import CombinedBackbone
from .query_model import INPUT_NAME, OUTPUT_NAME

OPSET = 17
# Relative tolerance (max abs difference / max abs eager value) an fp32 export must meet
# on a check batch before it is cached and used.
EXPORT_RTOL = 1e-4
CALIBRATION_IMAGES = 64

# Nonparametric backbones that gain nothing from a graph runtime (see module docstring).
_EAGER_ONLY_MODELS = (ColorHistogram, ProductColour)




# --- decoding ---------------------------------------------------------------------------------


def draft_size_for(transform) -> int | None:
    """The smallest side length the transform's first resize needs from the decoder.

    ``Resize(256)`` (shorter side) -> 256; ``Resize((128, 128))`` -> 128; torchvision's
    ``ImageClassification`` preset -> its ``resize_size``. None when there is no resize to
    find, in which case nothing is drafted. A JPEG decoded in draft mode keeps both sides
    >= this size, so the resize that follows still only shrinks the image.
    """
    steps = getattr(transform, "transforms", [transform])
    for step in steps:
        kind = type(step).__name__
        if kind == "Resize":
            size = step.size
        elif kind == "ImageClassification":
            size = step.resize_size
        else:
            continue
        sizes = [size] if isinstance(size, int) else list(size)
        if sizes and all(isinstance(s, int) and s > 0 for s in sizes):
            return max(sizes)
        return None
    return None


class DraftTransform:
    """A backbone transform plus the JPEG draft size its decoder may use.

    Called like the transform it wraps; :mod:`fashionrec.features.embed` reads ``draft_size`` to
    decode with :func:`fashionrec.data.images.load_image` ``(draft_size=...)``. Its repr, and so
    the backbone's cache key, states the decode policy.
    """

    def __init__(self, transform, draft_size: int | None):
        self.transform = transform
        self.draft_size = draft_size

    def __call__(self, image):
        return self.transform(image)

    def __repr__(self) -> str:
        return f"{self.transform!r}\nDecode(jpeg_draft_min_side={self.draft_size})"


# --- ONNX export and sessions -------------------------------------------------------------------


def onnx_dir() -> Path:
    return config.INTERIM_DIR / "onnx"


def _check_input(backbone: Backbone, batch: int = 2) -> torch.Tensor:
    """A deterministic batch made by the backbone's own transform: the right shape and range."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (400, 320, 3), dtype=np.uint8)) for _ in range(batch)]
    return torch.stack([backbone.transform(image) for image in images])


def export_onnx(backbone: Backbone, path: str | os.PathLike, opset: int = OPSET) -> Path:
    """Export ``backbone.model`` (eager) to ONNX at ``path`` with a dynamic batch axis.

    Uses the TorchScript-based exporter (``dynamo=False``): these backbones are plain
    static graphs, and it needs no extra dependencies. Written to a temporary file and
    renamed, so ``path`` is either absent or complete. Raises FashionRecError when the
    export fails or its outputs differ from eager by more than EXPORT_RTOL.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = _check_input(backbone)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=".onnx")
    os.close(handle)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                backbone.model.eval(), (example,), temporary, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
        error = _relative_error(backbone, temporary, example)
        if not error <= EXPORT_RTOL:
            raise FashionRecError(f"ONNX export of {backbone.name} differs from eager by {error:.2e} relative "
                                  f"(limit {EXPORT_RTOL:.0e}); use runtime 'eager'")
        os.replace(temporary, path)
    except FashionRecError:
        raise
    except Exception as error:  # the exporter raises anything from RuntimeError to UnsupportedOperatorError
        raise FashionRecError(f"cannot export {backbone.name} to ONNX ({type(error).__name__}: {error}); "
                              "use runtime 'eager'") from error
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def _relative_error(backbone: Backbone, onnx_path, example: torch.Tensor) -> float:
    session = make_session(onnx_path, threads=1)
    with torch.inference_mode():
        expected = backbone.model(example).float().numpy()
    actual = session.run([OUTPUT_NAME], {INPUT_NAME: example.numpy()})[0]
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def make_session(path, threads: int | None = None, spinning: bool = False):
    """An ONNX Runtime CPU session with deliberate settings.

    ``threads`` intra-op threads (default: every CPU this process may use), sequential
    execution (one operator at a time, each parallelised inside; inter-op parallelism
    only oversubscribes a small CPU), all graph optimisations. Spinning is off by default:
    idle pool threads that spin steal the cores the decoding worker processes need.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxModel(nn.Module):
    """(B, C, H, W) float tensor -> (B, dim) float tensor, computed by an ONNX Runtime session.

    The session is created on first use, so building the backbone is cheap and a module
    that was never called holds no threads. ``describe`` goes into the repr, and with it
    into the backbone's cache key.
    """

    def __init__(self, path: Path, threads: int | None, describe: str, spinning: bool = False):
        super().__init__()
        self.path = Path(path)
        self.threads = threads
        self.spinning = spinning
        self.describe = describe
        self._session = None

    @property
    def session(self):
        if self._session is None:
            self._session = make_session(self.path, self.threads, self.spinning)
        return self._session

    def extra_repr(self) -> str:
        # Threads and the file location do not change the result; leave them out of the key.
        return self.describe

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0])


def onnx_path_for(backbone: Backbone, opset: int = OPSET) -> Path:
    # Names of fine-tuned backbones carry a file path ("efficientnet_lite0+head:results/x/head.pt").
    stem = re.sub(r"[^A-Za-z0-9_.+-]+", "_", backbone.name)
    return onnx_dir() / f"{stem}-{backbone.cache_key[:16]}-opset{opset}.onnx"


def exported_onnx(backbone: Backbone, opset: int = OPSET, progress: bool = False) -> Path:
    """The cached fp32 export of ``backbone`` (eager), exporting it first if needed."""
    path = onnx_path_for(backbone, opset)
    if not path.is_file():
        if progress:
            print(f"[{backbone.name}] exporting to ONNX: {path}", file=sys.stderr)
        export_onnx(backbone, path, opset)
    return path


def onnx_backbone(backbone: Backbone, threads: int | None = None, draft: bool = True,
                  spinning: bool = False, progress: bool = False) -> Backbone:
    """``backbone`` running in ONNX Runtime (fp32), with JPEG draft decoding if ``draft``."""
    if _is_eager_only(backbone):
        return _with_draft(backbone, draft)
    path = exported_onnx(backbone, progress=progress)
    describe = f"runtime='onnx', source={backbone.name}-{backbone.cache_key}, opset={OPSET}"
    model = OnnxModel(path, threads, describe, spinning)
    return _with_draft(dataclasses.replace(backbone, model=model), draft)


def quantized_onnx_backbone(backbone: Backbone, calibration_paths: Sequence[str | os.PathLike],
                            threads: int | None = None, draft: bool = True, spinning: bool = False,
                            progress: bool = False) -> Backbone:
    """``backbone`` statically quantised to int8 (QDQ), calibrated on ``calibration_paths``.

    Weights int8 per output channel, activations uint8 (asymmetric, MinMax over the
    calibration images, decoded and transformed exactly as for embedding). ``reduce_range``
    keeps weights to 7 bits, which avoids the u8s8 overflow of AVX2 without VNNI.
    Changes the embeddings: compare P@10 before using it (benchmarks/embed_throughput.py).
    """
    if _is_eager_only(backbone):
        return _with_draft(backbone, draft)
    if not calibration_paths:
        raise ValueError("int8 quantisation needs calibration images")
    paths = [str(p) for p in calibration_paths]
    calibration_key = hashlib.sha256("\n".join(sorted(file_digest(p) for p in paths)).encode()).hexdigest()[:16]
    draft_size = draft_size_for(backbone.transform) if draft else None
    source = exported_onnx(backbone, progress=progress)
    path = onnx_dir() / f"{source.stem}-int8-calib{calibration_key}-draft{draft_size}.onnx"
    if not path.is_file():
        if progress:
            print(f"[{backbone.name}] quantising to int8 on {len(paths)} calibration images: {path}", file=sys.stderr)
        _quantize_static(source, path, _calibration_batches(backbone.transform, paths, draft_size))
    describe = (f"runtime='onnx-int8', source={backbone.name}-{backbone.cache_key}, opset={OPSET}, "
                f"quantization='static QDQ s8 per-channel weights (reduce_range), u8 activations, MinMax', "
                f"calibration={len(paths)} images {calibration_key}")
    model = OnnxModel(path, threads, describe, spinning)
    return _with_draft(dataclasses.replace(backbone, model=model), draft)


def _calibration_batches(transform, paths: list[str], draft_size: int | None, batch_size: int = 16):
    tensors = []
    for path in paths:
        try:
            tensors.append(transform(load_image(path, draft_size=draft_size)))
        except ImageError:
            continue
    if not tensors:
        raise FashionRecError("none of the calibration images could be decoded")
    return [torch.stack(tensors[i:i + batch_size]).numpy() for i in range(0, len(tensors), batch_size)]


def _quantize_static(source: Path, target: Path, batches: list[np.ndarray]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".quantize-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantized = Path(scratch) / "int8.onnx"
        quantize_static(
            str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"CalibTensorRangeSymmetric": False},
        )
        os.replace(quantized, target)


def _is_eager_only(backbone: Backbone) -> bool:
    return isinstance(backbone.model, _EAGER_ONLY_MODELS)


def _with_draft(backbone: Backbone, draft: bool) -> Backbone:
    if not draft:
        return backbone
    return dataclasses.replace(backbone, transform=DraftTransform(backbone.transform, draft_size_for(backbone.transform)))


# --- the one entry point the workflow uses -------------------------------------------------------


def with_runtime(backbone: Backbone | CombinedBackbone, runtime: str = DEFAULT_RUNTIME, threads: int | None = None,
                 calibration_paths: Sequence[str | os.PathLike] | None = None, draft: bool | None = None,
                 progress: bool = False) -> Backbone | CombinedBackbone:
    """``backbone`` prepared for ``runtime`` (one of RUNTIMES).

    ``"eager"`` returns the backbone untouched (full decoding, the reference cache key)
    unless ``draft=True``; the ONNX runtimes decode JPEGs in draft mode unless
    ``draft=False``. ``"onnx-int8"`` needs ``calibration_paths`` (training images). A
    combination gets the runtime leaf by leaf (its head, small, stays in PyTorch).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; available: {', '.join(RUNTIMES)}")
    if isinstance(backbone, CombinedBackbone):
        return backbone.map_leaves(lambda leaf: with_runtime(leaf, runtime, threads, calibration_paths, draft,
                                                             progress))
    draft = runtime != "eager" if draft is None else draft
    if runtime == "eager":
        return _with_draft(backbone, draft)
    if runtime == "onnx":
        return onnx_backbone(backbone, threads=threads, draft=draft, progress=progress)
    if calibration_paths is None:
        raise ValueError("runtime 'onnx-int8' needs calibration_paths (a sample of training images)")
    return quantized_onnx_backbone(backbone, calibration_paths, threads=threads, draft=draft, progress=progress)


def calibration_sample(paths: Sequence[str], n: int = CALIBRATION_IMAGES, seed: int = config.DEFAULT_SEED) -> list[str]:
    """A seeded sample of ``n`` paths (in catalog order) to calibrate int8 quantisation on."""
    paths = list(paths)
    if len(paths) <= n:
        return paths
    chosen = np.random.default_rng(seed).choice(len(paths), size=n, replace=False)
    return [paths[i] for i in sorted(chosen)]


def runtime_of(backbone: Backbone | CombinedBackbone) -> str:
    """Which runtime a (possibly wrapped) backbone runs on (a combination: its first leaf's)."""
    if isinstance(backbone, CombinedBackbone):
        return runtime_of(backbone.leaves()[0])
    if isinstance(backbone.model, OnnxModel):
        return "onnx-int8" if "onnx-int8" in backbone.model.describe else "onnx"
    return "eager"

