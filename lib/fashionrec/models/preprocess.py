"""A backbone's preprocessing as plain data, and its geometry computed exactly but faster.

The batch embedding path runs each backbone's torchvision transform (resize, centre crop,
``ToTensor``, ``Normalize``). A single query cannot amortise that: on a 400x533 photo the
PIL resize alone costs about half as much as EfficientNet-Lite0 itself, and ``ToTensor`` +
``Normalize`` another fifth. :class:`Preprocessing` describes the transform as data, so that

* the uint8 -> float steps (``ToTensor``, ``Normalize``) move into the ONNX graph
  (:mod:`fashionrec.models.query_model`), with the very same float operations, and
* the geometry (resize, centre crop) is :func:`resize_and_crop`: Pillow's own resampling,
  pixel for pixel, computed only where the crop needs it and split across threads.

Why :func:`resize_and_crop` is exact. Pillow resamples in two separable passes, each
computing an output row (horizontal pass) or column (vertical pass) from coefficients that
depend only on the input and output sizes, with an 8-bit intermediate. Pillow 13 runs the
vertical pass first when the height shrinks by more than twice as much as the width, and the
horizontal pass first otherwise (``ImagingResampleInner``). Each pass is reproduced here by a
single-pass Pillow call over the full extent of its axis (so its coefficients are the
reference's), restricted on the other axis to the rows or columns the crop needs (each of which
is computed independently of the others): the first pass skips the rows (or columns) the
second pass never reads, the second pass skips the columns (or rows) the crop drops, and each
pass is cut into bands that run in parallel (Pillow releases the GIL while it resamples).
:func:`geometry_is_exact` checks this against torchvision on a few shapes of both pass orders;
where it fails (another Pillow) the reference transform is used instead.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from torchvision import transforms

from ..console import warn_once
from ..errors import FashionRecError

# torchvision interpolation names -> Pillow filters and their support (Resample.c).
_FILTERS = {
    "nearest": (Image.Resampling.NEAREST, 0.0),
    "bilinear": (Image.Resampling.BILINEAR, 1.0),
    "bicubic": (Image.Resampling.BICUBIC, 2.0),
    "box": (Image.Resampling.BOX, 0.5),
    "hamming": (Image.Resampling.HAMMING, 1.0),
    "lanczos": (Image.Resampling.LANCZOS, 3.0),
}
# Below this many output pixels a band's thread hand-off costs more than it saves.
_MIN_BAND_PIXELS = 8192


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

    def reference_geometry(self) -> transforms.Compose:
        """The torchvision steps this geometry reproduces (what the batch path runs)."""
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


def _used_range(in_size: int, out_size: int, support: float, first: int, last: int) -> tuple[int, int]:
    """Input positions [lo, hi) that Pillow's filter reads for outputs ``first`` to ``last``.

    Mirrors ``precompute_coeffs`` in Pillow's Resample.c, widened by one on each side so a
    rounding difference can only cost a spare row, never a missing one.
    """
    scale = in_size / out_size
    reach = support * max(scale, 1.0)
    lo = int((first + 0.5) * scale - reach + 0.5)
    hi = int((last + 0.5) * scale + reach + 0.5)
    return max(lo - 1, 0), min(hi + 1, in_size)


def _bands(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    cuts = np.linspace(start, stop, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


class GeometryRunner:
    """Runs :func:`resize_and_crop` with up to ``threads`` bands per pass (one pool, reused)."""

    def __init__(self, threads: int = 1):
        self.threads = max(1, int(threads))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="resize") if self.threads > 1 else None

    def map(self, function, items):
        if self._pool is None or len(items) < 2:
            return [function(*item) for item in items]
        return list(self._pool.map(lambda item: function(*item), items))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


_SERIAL = GeometryRunner(1)


def resize_and_crop(image: Image.Image, spec: Preprocessing, runner: GeometryRunner = _SERIAL) -> Image.Image:
    """``spec.reference_geometry()(image)``, pixel for pixel, computing only what the crop keeps.

    Falls back to the reference steps where the shortcut does not apply (no crop, a crop
    larger than the resized image, nearest-neighbour, modes other than RGB/L).
    """
    width, height = image.size
    new_width, new_height = resized_size(spec, width, height)
    crop_height, crop_width = spec.crop or (new_height, new_width)
    if (spec.interpolation not in _FILTERS or spec.interpolation == "nearest" or image.mode not in ("RGB", "L")
            or crop_height > new_height or crop_width > new_width):
        return spec.reference_geometry()(image)
    if (new_width, new_height) == (width, height):
        return _center_crop(image, crop_width, crop_height)
    resample, support = _FILTERS[spec.interpolation]
    top = int(round((new_height - crop_height) / 2.0))
    left = int(round((new_width - crop_width) / 2.0))
    parts = max(1, min(runner.threads, crop_width * crop_height // _MIN_BAND_PIXELS))
    shrink_height, shrink_width = height - new_height, width - new_width
    vertical_first = shrink_height > 0 and shrink_height > shrink_width * 2   # Pillow 13's choice of pass order
    if new_height == height:
        return _horizontal(image, (0, height), new_width, resample, runner, parts).crop(
            (left, top, left + crop_width, top + crop_height))
    if new_width == width:
        return _vertical(image, (left, left + crop_width), new_height, resample, runner, parts).crop(
            (0, top, crop_width, top + crop_height))
    if vertical_first:
        columns = _used_range(width, new_width, support, left, left + crop_width - 1)
        middle = _vertical(image, columns, new_height, resample, runner, parts, rows=(top, top + crop_height))
        return _horizontal(_placed(middle, (width, crop_height), (columns[0], 0)), (0, crop_height), new_width,
                           resample, runner, parts, columns=(left, left + crop_width))
    rows = _used_range(height, new_height, support, top, top + crop_height - 1)
    middle = _horizontal(image, rows, new_width, resample, runner, parts, columns=(left, left + crop_width))
    return _vertical(_placed(middle, (crop_width, height), (0, rows[0])), (0, crop_width), new_height, resample,
                     runner, parts, rows=(top, top + crop_height))


def _center_crop(image: Image.Image, crop_width: int, crop_height: int) -> Image.Image:
    width, height = image.size
    top = int(round((height - crop_height) / 2.0))
    left = int(round((width - crop_width) / 2.0))
    return image.crop((left, top, left + crop_width, top + crop_height))


def _placed(part: Image.Image, size: tuple[int, int], offset: tuple[int, int]) -> Image.Image:
    """``part`` pasted at ``offset`` into an image of ``size``: the full extent a pass's coefficients need."""
    if part.size == size:
        return part
    canvas = Image.new(part.mode, size)
    canvas.paste(part, offset)
    return canvas


def _horizontal(image, rows, new_width, resample, runner, parts, columns=None) -> Image.Image:
    """Horizontal pass over source rows [rows): all ``new_width`` outputs, then keep ``columns``."""
    width = image.size[0]
    keep = columns or (0, new_width)

    def band(first, last):
        strip = image.crop((0, first, width, last)).resize((new_width, last - first), resample)
        return strip.crop((keep[0], 0, keep[1], last - first))

    pieces = runner.map(band, _bands(rows[0], rows[1], parts))
    return _stacked(pieces, vertical=True)


def _vertical(image, columns, new_height, resample, runner, parts, rows=None) -> Image.Image:
    """Vertical pass over source columns [columns): all ``new_height`` outputs, then keep ``rows``."""
    height = image.size[1]
    keep = rows or (0, new_height)

    def band(first, last):
        strip = image.crop((first, 0, last, height)).resize((last - first, new_height), resample)
        return strip.crop((0, keep[0], last - first, keep[1]))

    pieces = runner.map(band, _bands(columns[0], columns[1], parts))
    return _stacked(pieces, vertical=False)


def _stacked(pieces: list[Image.Image], vertical: bool) -> Image.Image:
    if len(pieces) == 1:
        return pieces[0]
    width = pieces[0].size[0] if vertical else sum(piece.size[0] for piece in pieces)
    height = sum(piece.size[1] for piece in pieces) if vertical else pieces[0].size[1]
    canvas = Image.new(pieces[0].mode, (width, height))
    offset = 0
    for piece in pieces:
        canvas.paste(piece, (0, offset) if vertical else (offset, 0))
        offset += piece.size[1] if vertical else piece.size[0]
    return canvas


# Shapes that exercise both of Pillow's pass orders, upscaling, one-axis resizes and odd sizes.
_CHECK_SHAPES = ((400, 533), (533, 400), (400, 822), (300, 300), (97, 61), (150, 700), (1000, 180), (224, 231))
_checked: dict[Preprocessing, bool] = {}
_checked_lock = threading.Lock()


def geometry_is_exact(spec: Preprocessing, runner: GeometryRunner = _SERIAL) -> bool:
    """Whether :func:`resize_and_crop` equals the reference on seeded images of ``_CHECK_SHAPES``.

    Checked once per process and preprocessing; False (with a warning) means this Pillow
    resamples differently from what the shortcut assumes, and callers use the reference.
    """
    with _checked_lock:
        if spec not in _checked:
            rng = np.random.default_rng(0)
            reference = spec.reference_geometry()
            exact = True
            for width, height in _CHECK_SHAPES:
                image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
                if not np.array_equal(np.asarray(resize_and_crop(image, spec, runner)), np.asarray(reference(image))):
                    exact = False
                    warn_once(f"the fast resize differs from torchvision's on {width}x{height} images with this "
                              f"Pillow; single queries use the reference resize ({spec.interpolation})")
                    break
            _checked[spec] = exact
        return _checked[spec]


def crop_pixels(image: Image.Image, spec: Preprocessing, runner: GeometryRunner = _SERIAL,
                exact_shortcut: bool = True) -> np.ndarray:
    """The network's input as uint8 (height, width, 3): the geometry of ``spec``, no float step."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    geometry = resize_and_crop(image, spec, runner) if exact_shortcut else spec.reference_geometry()(image)
    return np.asarray(geometry)
