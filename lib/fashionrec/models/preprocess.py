"""A backbone's preprocessing as plain data, and its geometry computed exactly but faster.

The batch embedding path runs each backbone's torchvision transform (resize, centre crop,
``ToTensor``, ``Normalize``). A single query cannot amortise that: on a 400x533 photo Pillow's
resize alone costs about 40% of EfficientNet-Lite0 itself, and ``ToTensor`` + ``Normalize``
another fifth. :class:`Preprocessing` describes the transform as data, so that

* the uint8 -> float steps (``ToTensor``, ``Normalize``) move into the ONNX graph
  (:mod:`fashionrec.models.query_model`), with the very same float operations, and
* the geometry (resize, centre crop) is :func:`resize_and_crop`: Pillow's own arithmetic,
  pixel for pixel, computed only where the crop needs it, in vectorised compiled loops.

Why :func:`resize_and_crop` is exact. Pillow resamples in two separable passes with an 8-bit
intermediate (``Resample.c``). Each output row (or column) of a pass is a weighted sum of at
most ``ksize`` input rows (columns), with weights that depend only on the input and output
sizes: Pillow computes them in double precision, normalises them to sum to one and rounds them
to 22-bit fixed point; the 32-bit integer sum starts at one half and is shifted back and
clipped to 0..255. :func:`_pass_weights` repeats those double operations in the same order, so
the integer weights are Pillow's; the sums are 32-bit integer sums of the same products, so each
output is Pillow's. Pillow 13 runs the vertical pass first when the height shrinks by more
than twice as much as the width, and the horizontal pass first otherwise; the same order is kept
here, because the intermediate is rounded. Only the rows and columns the crop reads are computed,
and a crop of at least ``SPLIT_MIN_ROWS`` rows is computed as two halves on two threads.
:func:`geometry_is_exact` checks all this against torchvision on a few shapes of both pass
orders; where it fails (another Pillow) the reference transform is used instead.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache, partial

import numpy as np
from PIL import Image

from ..console import warn_once
from ..errors import FashionRecError
from ..settings import available_threads

# Filters whose weights are plain arithmetic (no sin/cos, whose last bits differ between libms).
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0, "box": 0.5}
_PRECISION_BITS = 22   # Pillow's PRECISION_BITS for 8-bit images


@dataclass(frozen=True)
class Preprocessing:
    """Resize -> centre crop -> [0, 1] scaling -> per-channel normalisation, as data.

    ``resize``: an int resizes the shorter side (torchvision ``Resize(int)``), a pair is
    (height, width). ``crop``: (height, width) of the centre crop, None for none.
    ``scale``: True when pixels are divided by 255 (``ToTensor``); ``mean``/``std``: the
    ``Normalize`` that follows (None for none). ``draft_size``: the JPEG draft size the
    decoder may use (:func:`fashionrec.models.runtime.draft_size_for`).
    """

    resize: int | tuple[int, int]
    interpolation: str
    crop: tuple[int, int] | None
    scale: bool = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    draft_size: int | None = None

    @classmethod
    def from_transform(cls, transform) -> "Preprocessing":
        """The preprocessing of a backbone's transform; FashionRecError if it is not of this form.

        Understands ``Compose([Resize, CenterCrop?, ToTensor, Normalize?])``, torchvision's
        ``ImageClassification`` presets, and :class:`~fashionrec.models.runtime.DraftTransform`
        around either.
        """
        draft_size = getattr(transform, "draft_size", None)
        inner = getattr(transform, "transform", transform)
        if type(inner).__name__ == "ImageClassification":
            return cls(_single(inner.resize_size), inner.interpolation.value, _pair(inner.crop_size), True,
                       tuple(map(float, inner.mean)), tuple(map(float, inner.std)), draft_size)
        steps = list(getattr(inner, "transforms", [inner]))
        kinds = [type(step).__name__ for step in steps]
        geometry = kinds[:2] if kinds[1:2] == ["CenterCrop"] else kinds[:1]
        tensor = kinds[len(geometry):]
        if geometry[:1] != ["Resize"] or tensor not in (["ToTensor"], ["ToTensor", "Normalize"]):
            raise FashionRecError(f"cannot describe this transform as resize -> crop -> normalise: {inner!r}")
        resize = steps[0]
        if resize.max_size is not None or resize.antialias is False:
            raise FashionRecError(f"unsupported Resize settings (max_size / antialias): {resize!r}")
        crop = _pair(steps[1].size) if len(geometry) == 2 else None
        normalize = steps[-1] if tensor[-1] == "Normalize" else None
        size = resize.size
        return cls(size if isinstance(size, int) else _single(size) if len(size) == 1 else _pair(size),
                   resize.interpolation.value, crop, True,
                   tuple(map(float, normalize.mean)) if normalize else None,
                   tuple(map(float, normalize.std)) if normalize else None, draft_size)

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of what the network receives."""
        if self.crop is not None:
            return self.crop
        if isinstance(self.resize, int):
            raise FashionRecError("a shorter-side resize without a crop has no fixed input size")
        return self.resize

    def reference_geometry(self):
        """The torchvision steps this geometry reproduces (what the batch path runs)."""
        # Imported here: only tests and padded crops need torchvision's own steps; queries stay torch-free.
        from torchvision import transforms

        steps = [transforms.Resize(self.resize if isinstance(self.resize, int) else list(self.resize),
                                   interpolation=transforms.InterpolationMode(self.interpolation))]
        if self.crop is not None:
            steps.append(transforms.CenterCrop(list(self.crop)))
        return transforms.Compose(steps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocessing":
        def as_tuple(value):
            return tuple(value) if isinstance(value, list) else value

        return cls(**{key: as_tuple(value) for key, value in values.items()})


def _single(size) -> int:
    return int(size if isinstance(size, int) else size[0])


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = list(size)
    return (int(size[0]), int(size[0])) if len(size) == 1 else (int(size[0]), int(size[1]))


def resized_size(spec: Preprocessing, width: int, height: int) -> tuple[int, int]:
    """(width, height) after the resize, computed as torchvision computes it."""
    if not isinstance(spec.resize, int):
        return spec.resize[1], spec.resize[0]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = spec.resize, int(spec.resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _filter_weights(name: str, x: np.ndarray) -> np.ndarray:
    """Pillow's ``bilinear_filter``, ``bicubic_filter`` (a = -0.5) and ``box_filter``, same operations."""
    if name == "box":
        return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)
    x = np.abs(x)
    if name == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    near = ((1.5 * x - 2.5) * x) * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@lru_cache(maxsize=512)
def _pass_weights(in_size: int, out_size: int, name: str, first: int, last: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, taps, weights) of outputs ``first``..``last - 1`` of one pass, as Pillow computes them.

    Mirrors ``precompute_coeffs`` and ``normalize_coeffs_8bpc``: ``weights`` are the 22-bit
    fixed-point integers (int32, as Pillow holds them), zero beyond each output's ``taps``.
    """
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT[name] * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(first, last) + 0.5) * scale
    start = np.maximum((center - support + 0.5).astype(np.int64), 0)   # C's (int): toward zero
    taps = np.minimum((center + support + 0.5).astype(np.int64), in_size) - start
    offsets = np.arange(ksize)
    used = offsets[None, :] < taps[:, None]
    weights = np.where(used, _filter_weights(name, ((offsets[None, :] + start[:, None]).astype(np.float64)
                                                    - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    total = np.zeros(len(center))
    for column in range(ksize):   # left to right, as the C loop adds them
        total = total + weights[:, column]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    scaled = weights * float(1 << _PRECISION_BITS)
    fixed = np.where(weights < 0, -0.5 + scaled, 0.5 + scaled).astype(np.int64)
    return start, taps, fixed.astype(np.int32)


def _resample_rows(source, start, taps, weights, column_lo, column_hi):
    """One pass along axis 0 of ``source`` (rows x values), columns ``column_lo``..``column_hi - 1``.

    Output row i is the weighted sum of rows ``start[i]`` .. ``start[i] + taps[i] - 1`` in 32-bit
    integers from one half, then shifted back and clipped: Pillow's ``ImagingResample*_8bpc``
    arithmetic, 16 values per AVX-512 instruction.
    """
    n_out = start.shape[0]
    width = column_hi - column_lo
    out = np.empty((n_out, width), np.uint8)
    total = np.empty(width, np.int32)
    for i in range(n_out):
        total[:] = np.int32(1 << (_PRECISION_BITS - 1))
        for tap in range(taps[i]):
            weight = weights[i, tap]
            row = source[start[i] + tap, column_lo:column_hi]
            for j in range(width):
                total[j] += np.int32(row[j]) * weight
        for j in range(width):
            value = total[j] >> _PRECISION_BITS
            out[i, j] = 0 if value < 0 else (255 if value > 255 else value)
    return out


def _transposed(source, channels):
    """(rows, columns * channels) -> (columns, rows * channels): pixels transposed, in cache-sized blocks."""
    n_rows = source.shape[0]
    n_columns = source.shape[1] // channels
    out = np.empty((n_columns, n_rows * channels), np.uint8)
    block = 32
    for row0 in range(0, n_rows, block):
        for column0 in range(0, n_columns, block):
            for row in range(row0, min(row0 + block, n_rows)):
                for column in range(column0, min(column0 + block, n_columns)):
                    if channels == 3:   # spelled out: a loop over three channels is several times slower
                        out[column, row * 3] = source[row, column * 3]
                        out[column, row * 3 + 1] = source[row, column * 3 + 1]
                        out[column, row * 3 + 2] = source[row, column * 3 + 2]
                    else:
                        for channel in range(channels):
                            out[column, row * channels + channel] = source[row, column * channels + channel]
    return out


_kernels: tuple | None = None
_kernels_lock = threading.Lock()


def _compiled_kernels() -> tuple:
    """(:func:`_resample_rows`, :func:`_transposed`) compiled by numba, loaded on first use.

    Importing numba and loading the kernels from its on-disk cache takes about 0.8 s once per
    process: a process that answers one photo does better with Pillow's own resize
    (:func:`crop_pixels` with ``exact_shortcut=False``, about 4 ms).
    """
    global _kernels
    with _kernels_lock:
        if _kernels is None:
            import numba

            compile_kernel = numba.njit(nogil=True, cache=True)
            _kernels = compile_kernel(_resample_rows), compile_kernel(_transposed)
        return _kernels


def _pixels(image: Image.Image | np.ndarray, box: tuple[int, int, int, int], channels: int,
            transpose: bool) -> np.ndarray:
    """The pixels of ``box`` (left, top, right, bottom) as contiguous (rows, values), transposed if asked.

    The transpose is :func:`_transposed`, faster than Pillow's on these sizes.
    """
    left, top, right, bottom = box
    array = (np.ascontiguousarray(image[top:bottom, left:right]) if isinstance(image, np.ndarray)
             else np.asarray(image.crop(box)))
    rows = array.reshape(bottom - top, -1)
    return _compiled_kernels()[1](rows, channels) if transpose else rows


def resize_and_crop(image: Image.Image | np.ndarray, spec: Preprocessing, split: bool = True) -> np.ndarray:
    """``spec.reference_geometry()(image)`` as uint8 (height, width[, 3]), computing only what the crop keeps.

    ``image``: a Pillow image, or its pixels as uint8 (height, width, 3) for RGB or (height, width)
    for L. Falls back to Pillow's own resize (:func:`pillow_geometry`) where the shortcut does not apply
    (other filters, a crop larger than the resized image, modes other than RGB/L). ``split=False`` keeps a
    tall crop on the calling thread: a batch already keeps every core busy with other images, and
    the hand-over to the helper thread would only cost.
    """
    if isinstance(image, np.ndarray):
        height, width = image.shape[:2]
        mode = "RGB" if image.ndim == 3 and image.shape[2] == 3 else "L" if image.ndim == 2 else None
        mode = mode if image.dtype == np.uint8 else None
    else:
        (width, height), mode = image.size, image.mode
    new_width, new_height = resized_size(spec, width, height)
    crop_height, crop_width = spec.crop or (new_height, new_width)
    if (spec.interpolation not in _SUPPORT or mode not in ("RGB", "L")
            or crop_height > new_height or crop_width > new_width):
        return pillow_geometry(Image.fromarray(image) if isinstance(image, np.ndarray) else image, spec)
    channels = 3 if mode == "RGB" else 1
    top = int(round((new_height - crop_height) / 2.0))
    left = int(round((new_width - crop_width) / 2.0))
    resize_x, resize_y = new_width != width, new_height != height
    x_start, x_taps, x_weights = (_pass_weights(width, new_width, spec.interpolation, left, left + crop_width)
                                  if resize_x else (None, None, None))
    y_start, y_taps, y_weights = (_pass_weights(height, new_height, spec.interpolation, top, top + crop_height)
                                  if resize_y else (None, None, None))
    shrink_height, shrink_width = height - new_height, width - new_width
    vertical_first = shrink_height > 0 and shrink_height > shrink_width * 2   # Pillow 13's choice of pass order
    rows_of_crop = partial(_crop_rows, image, channels, (x_start, x_taps, x_weights) if resize_x else None,
                           (y_start, y_taps, y_weights) if resize_y else None, vertical_first, left, top, crop_width)
    helper = _row_helper() if split else None
    if helper is None or crop_height < SPLIT_MIN_ROWS:
        out = rows_of_crop(0, crop_height)
    else:   # the upper half in the helper thread, the lower half here (the passes release the GIL)
        half = crop_height // 2
        upper = helper.submit(rows_of_crop, 0, half)
        lower = rows_of_crop(half, crop_height)
        out = np.concatenate([upper.result(), lower])
    return out.reshape((crop_height, crop_width, 3) if channels == 3 else (crop_height, crop_width))


def _crop_rows(image, channels: int, x_pass, y_pass, vertical_first: bool, left: int, top: int, crop_width: int,
               first: int, last: int) -> np.ndarray:
    """Rows ``first``..``last - 1`` of the resized crop as (rows, crop_width * channels).

    ``x_pass`` / ``y_pass``: (start, taps, weights) of :func:`_pass_weights` for every crop column / row,
    None where that axis keeps its size. Reads only the input rectangle these rows need.
    """
    if y_pass is not None:
        y_start, y_taps, y_weights = (part[first:last] for part in y_pass)
        y_lo, y_hi = int(y_start[0]), int((y_start + y_taps).max())
    else:
        y_lo, y_hi = top + first, top + last
    if x_pass is not None:
        x_start, x_taps, x_weights = x_pass
        x_lo, x_hi = int(x_start[0]), int((x_start + x_taps).max())
    else:
        x_lo, x_hi = left, left + crop_width
    box = (x_lo, y_lo, x_hi, y_hi)
    resample_rows, transposed = _compiled_kernels()
    if x_pass is None:
        rows = _pixels(image, box, channels, False)
        return rows if y_pass is None else resample_rows(rows, y_start - y_lo, y_taps, y_weights, 0,
                                                          crop_width * channels)
    if vertical_first:   # only chosen when the height shrinks, so y_pass is set
        middle = resample_rows(_pixels(image, box, channels, False), y_start - y_lo, y_taps, y_weights,
                                0, (x_hi - x_lo) * channels)
        columns = resample_rows(transposed(middle, channels), x_start - x_lo, x_taps, x_weights,
                                 0, (last - first) * channels)
        return transposed(columns, channels)
    columns = resample_rows(_pixels(image, box, channels, True), x_start - x_lo, x_taps, x_weights,
                             0, (y_hi - y_lo) * channels)
    middle = transposed(columns, channels)
    return middle if y_pass is None else resample_rows(middle, y_start - y_lo, y_taps, y_weights, 0,
                                                        crop_width * channels)


# Crops at least this tall are computed in two halves on two threads (smaller ones: the hand-over
# costs more than it saves).
SPLIT_MIN_ROWS = 128
_helper: tuple[int, ThreadPoolExecutor] | None = None
_helper_lock = threading.Lock()


def _row_helper() -> ThreadPoolExecutor | None:
    """The thread that computes the upper half of each crop; None on a single CPU.

    One per process, made again after a fork (a child inherits the pool but not its thread).
    """
    global _helper
    if available_threads() < 2:
        return None
    with _helper_lock:
        if _helper is None or _helper[0] != os.getpid():
            _helper = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="fashionrec-resize"))
        return _helper[1]


# Shapes that exercise both of Pillow's pass orders, upscaling, one-axis resizes and odd sizes.
_CHECK_SHAPES = ((400, 533), (533, 400), (400, 822), (300, 300), (97, 61), (150, 700), (1000, 180), (224, 231))
_checked: dict[Preprocessing, bool] = {}
_checked_lock = threading.Lock()


# torchvision's InterpolationMode -> Pillow filter (its ``pil_modes_mapping``).
_PILLOW_FILTERS = {"nearest": Image.Resampling.NEAREST, "nearest-exact": Image.Resampling.NEAREST,
                   "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
                   "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}


def pillow_geometry(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """``spec.reference_geometry()(image)`` as torchvision computes it for a Pillow image: one ``Image.resize``
    to :func:`resized_size`, then the centre crop (a crop larger than the resized image, which torchvision
    pads, goes to the reference itself)."""
    new_width, new_height = resized_size(spec, *image.size)
    crop_height, crop_width = spec.crop or (new_height, new_width)
    if crop_height > new_height or crop_width > new_width:
        return np.asarray(spec.reference_geometry()(image))
    resized = image.resize((new_width, new_height), _PILLOW_FILTERS[spec.interpolation])
    top, left = int(round((new_height - crop_height) / 2.0)), int(round((new_width - crop_width) / 2.0))
    return np.asarray(resized.crop((left, top, left + crop_width, top + crop_height)))


def geometry_is_exact(spec: Preprocessing) -> bool:
    """Whether :func:`resize_and_crop` equals Pillow's own resize and crop on seeded images of ``_CHECK_SHAPES``.

    Checked once per process and preprocessing; False (with a warning) means this Pillow
    resamples differently from what the shortcut assumes, and callers use the reference. The
    check calls Pillow as torchvision calls it (:func:`pillow_geometry`), so that it needs no torch.
    """
    with _checked_lock:
        if spec not in _checked:
            rng = np.random.default_rng(0)
            exact = True
            for width, height in _CHECK_SHAPES:
                image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
                new_width, new_height = resized_size(spec, width, height)
                if spec.crop is not None and (spec.crop[0] > new_height or spec.crop[1] > new_width):
                    continue   # padded: resize_and_crop runs the reference itself
                if not np.array_equal(resize_and_crop(image, spec), pillow_geometry(image, spec)):
                    exact = False
                    warn_once(f"the fast resize differs from torchvision's on {width}x{height} images with this "
                              f"Pillow; single queries use the reference resize ({spec.interpolation})")
                    break
            _checked[spec] = exact
        return _checked[spec]


def crop_pixels(image: Image.Image | np.ndarray, spec: Preprocessing, exact_shortcut: bool = True,
                split: bool = True) -> np.ndarray:
    """The network's input as uint8 (height, width, 3): the geometry of ``spec``, no float step.

    ``image``: a Pillow image or RGB pixels (height, width, 3) uint8; ``split``: see :func:`resize_and_crop`.
    """
    if isinstance(image, np.ndarray):
        if exact_shortcut:
            return resize_and_crop(image, spec, split)
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return resize_and_crop(image, spec, split) if exact_shortcut else pillow_geometry(image, spec)


def input_array(pixels: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """The float32 (3, height, width) a torchvision ``ToTensor`` (+ ``Normalize``) makes of crop ``pixels``.

    The same float32 operations in the same order (divide by 255, subtract the mean, divide by
    the std, each rounded to float32), so the same bits: the batch path feeds the network exactly
    what the transform gave it, without a PIL image or a torch tensor in between.
    """
    values = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)
    if spec.scale:
        np.divide(values, np.float32(255), out=values)
    if spec.mean is not None:
        np.subtract(values, np.asarray(spec.mean, np.float32)[:, None, None], out=values)
        np.divide(values, np.asarray(spec.std, np.float32)[:, None, None], out=values)
    return values
