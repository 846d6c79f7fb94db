"""Safe image decoding for catalogs that contain junk next to real photos.

Every entry point either returns a usable image or raises
:class:`~fashionrec.errors.ImageError` whose ``reason`` says what is wrong, so a
catalog run can skip the file, report it, and carry on.

Accepted (returned as an upright 8-bit RGB image):

* any raster format Pillow decodes (JPEG, PNG, GIF, WebP, BMP, TIFF, ...),
  recognised by content, never by extension: a JPEG named ``.png`` loads;
* alpha (RGBA, LA, PA, palette or colour-key transparency) composited on white,
  since catalog product shots sit on white backgrounds;
* CMYK, 1-bit, 8-bit and 16-bit grayscale; 16-bit samples (modes ``I;16*`` and
  ``I``, which Pillow also uses for 16-bit data) are scaled by 255/65535 rather
  than clipped, which would turn almost every pixel white;
* photos carrying an EXIF Orientation tag are rotated upright first; when the
  EXIF block itself is unreadable the pixels are still returned, un-rotated;
* animated GIF/WebP and multi-page TIFF: the first frame only;
* tiny (1x1) and extreme-aspect (e.g. 4000x10) images. They are real images and
  the backbone transform resizes whatever it is given, so rejecting them would
  drop data; whether they are useful is a dataset-curation decision, not a
  decoding one.

Rejected, with a distinct reason: missing files, dangling symlinks, anything
that is not a regular file (checked before opening, so a FIFO cannot block),
empty files, HTML/text/SVG/PDF/HEIC/EPS/WMF content, truncated or corrupt pixel
data (a full decode is forced; ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays
False), PNG chunks with a wrong CRC (Pillow skips the IDAT checksums itself),
and decompression bombs: anything over :data:`MAX_PIXELS` is rejected from the
header before a single pixel is allocated.

Known blind spot: a PNG whose compressed stream is intact but holds fewer rows
than its header declares decodes without complaint in Pillow (missing rows come
back black), and is not detected here either.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
import struct
import threading
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np
import simplejpeg
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ..errors import FashionRecError, ImageError

__all__ = [
    "MAX_PIXELS",
    "ImageInfo",
    "check_image_file",
    "ensure_rgb",
    "decode_rgb_array",
    "file_digest",
    "jpeg_arrays_match_pillow",
    "load_image",
    "open_image_bytes",
    "open_regular_file",
    "probe_image",
]

MAX_PIXELS = 64_000_000
# Pillow warns (two lines on stderr) from 89 megapixels; MAX_PIXELS refuses such images first, in one line.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

log = logging.getLogger(__name__)

_SNIFF_BYTES = 4096
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CRC_READ_BLOCK = 1 << 16
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# Pillow reads these headers but decodes them through external programs
# (Ghostscript, a Windows-only WMF handler); refuse before any of that runs.
_DELEGATED_FORMATS = frozenset({"EPS", "WMF"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})
_FILE_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


# Bytes of the BLAKE2b digest that identifies an image file's content in every cache.
DIGEST_BYTES = 16


def file_digest(path) -> str:
    """BLAKE2b digest of a file's bytes: the identity of an image in every cache."""
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: Pillow format name, pixel size and mode."""

    format: str
    width: int
    height: int
    mode: str


def probe_image(path: str | os.PathLike) -> ImageInfo:
    """Check ``path`` from its header alone (no pixel decoding) and describe it."""
    with open_regular_file(path) as fp, _open_checked(fp, path) as image:
        return ImageInfo(image.format, image.width, image.height, image.mode)


def load_image(path: str | os.PathLike, *, draft_size: int | None = None) -> Image.Image:
    """Fully decode ``path`` into an upright RGB image, or raise ImageError.

    ``draft_size``: for a JPEG at least twice that size on both sides, let the decoder
    scale by 1/2, 1/4 or 1/8 in the DCT domain (much cheaper than a full decode) while
    keeping both sides >= ``draft_size``. Pass the size a later resize shrinks the image
    to, so that resize still downsamples; other formats are decoded in full.
    """
    with open_regular_file(path) as fp:
        return _decode(fp, path, draft_size)


def check_image_file(fp: BinaryIO, name: str | os.PathLike) -> tuple[str, str] | None:
    """Check an open image file in full: ``("header", reason)`` when its header alone is refused,
    ``("decode", reason)`` when its pixels do not decode completely, None when it loads.

    This is exactly what :func:`load_image` would do (no draft scaling: every pixel is decoded).
    """
    try:
        with _open_checked(fp, name):
            pass
    except ImageError as error:
        return "header", error.reason
    fp.seek(0)
    try:
        _decode(fp, name)
    except ImageError as error:
        return "decode", error.reason
    return None


def open_image_bytes(data: bytes, name: str = "<bytes>", *, draft_size: int | None = None) -> Image.Image:
    """Like :func:`load_image` for in-memory data (an upload); ``name`` labels errors."""
    return _decode(io.BytesIO(data), name, draft_size)


def decode_rgb_array(source: str | os.PathLike | bytes, name: str | os.PathLike | None = None, *,
                     draft_size: int | None = None) -> np.ndarray:
    """The pixels :func:`load_image` (a path) or :func:`open_image_bytes` (bytes) gives, as (height, width, 3) uint8.

    A JPEG of Pillow mode RGB or L that needs neither draft scaling nor an EXIF rotation is
    decoded by libjpeg-turbo through simplejpeg straight into the array, with Pillow's own
    decoder settings (accurate integer IDCT, fancy upsampling), so with the same pixels
    (:func:`jpeg_arrays_match_pillow` checks it at first use); this skips Pillow's 4-byte pixel
    layout and the copy that packs it, which a single query pays for. Every header check of
    :func:`load_image` runs first; anything else, and any decoding error, goes through Pillow,
    so the error raised (ImageError naming ``name`` and the reason) is :func:`load_image`'s.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), name or "<bytes>"
    else:
        with open_regular_file(source) as fp:
            data = fp.read()
        name = name or source
    stream = io.BytesIO(data)
    with _open_checked(stream, name) as image:
        plain = (image.format == "JPEG" and image.mode in ("RGB", "L")
                 and not _draft_scales(image, draft_size)
                 and image.getexif().get(ExifTags.Base.Orientation, 1) == 1)
        size = image.size
    if plain and jpeg_arrays_match_pillow():
        try:
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:   # Pillow tolerates some of what strict libjpeg refuses; let it judge
            pixels = None
        if pixels is not None and pixels.shape == (size[1], size[0], 3):
            return pixels
    stream.seek(0)
    return np.asarray(_decode(stream, name, draft_size))


def _draft_scales(image: Image.Image, draft_size: int | None) -> bool:
    """Whether :func:`_decode` would let the JPEG decoder scale this image down (JpegImageFile.draft's rule)."""
    return bool(draft_size) and min(image.size[0] // draft_size, image.size[1] // draft_size) >= 2


_jpeg_check: list[bool] = []
_jpeg_check_lock = threading.Lock()


def jpeg_arrays_match_pillow() -> bool:
    """Whether simplejpeg decodes JPEGs Pillow wrote (4:2:0, 4:2:2, 4:4:4, progressive, grey, odd sizes)
    to exactly Pillow's pixels. Checked once per process; False (with a warning) keeps every
    decode in Pillow."""
    with _jpeg_check_lock:
        if not _jpeg_check:
            rng = np.random.default_rng(0)
            variants = [((61, 97), "RGB", {"subsampling": 2}), ((48, 64), "RGB", {"subsampling": 0}),
                        ((33, 50), "RGB", {"subsampling": 1}), ((75, 41), "RGB", {"progressive": True}),
                        ((29, 35), "L", {})]
            same = True
            for (height, width), mode, options in variants:
                smooth = np.cumsum(rng.integers(0, 9, (height, width, 3)), axis=1).astype(np.uint8)
                picture = Image.fromarray(smooth).convert(mode)
                encoded = io.BytesIO()
                picture.save(encoded, "JPEG", quality=90, **options)
                pillow = np.asarray(open_image_bytes(encoded.getvalue()))
                try:
                    same = np.array_equal(simplejpeg.decode_jpeg(encoded.getvalue(), colorspace="RGB"), pillow)
                except ValueError:
                    same = False
                if not same:
                    log.warning("simplejpeg decodes JPEGs differently from this Pillow (%s %dx%d %s); "
                                "every JPEG is decoded by Pillow", mode, width, height, options)
                    break
            _jpeg_check.append(same)
        return _jpeg_check[0]


def ensure_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; an opaque RGB image is returned as is.

    Transparency is composited on white and 16-bit grayscale is rescaled.
    """
    if image.mode in _SIXTEEN_BIT_GRAY_MODES:
        image = _sixteen_bit_gray_to_l(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        on_white = Image.new("RGB", rgba.size, (255, 255, 255))
        on_white.paste(rgba, mask=rgba.getchannel("A"))
        return on_white
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _sixteen_bit_gray_to_l(image: Image.Image) -> Image.Image:
    samples = np.asarray(image)
    if image.mode == "I":  # 32-bit container; anything outside 16 bits is clipped
        samples = samples.clip(0, 65535)
    # The high byte is round(v * 255 / 65535) to within one level, without a wide temporary.
    return Image.fromarray((samples >> 8).astype(np.uint8))


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for reading after checking it is a regular file (so a FIFO cannot block), or raise ImageError."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        reason = "dangling symlink" if os.path.islink(path) else "file not found"
        raise ImageError(path, reason) from None
    except OSError as error:  # symlink loop, permission on a parent directory, ...
        raise ImageError(path, f"cannot access file: {error.strerror.lower()}") from None
    if not stat.S_ISREG(status.st_mode):
        kind = next((name for is_kind, name in _FILE_KINDS if is_kind(status.st_mode)), "special file")
        raise ImageError(path, f"not a regular file ({kind})")
    try:
        return open(path, "rb")
    except OSError as error:
        raise ImageError(path, f"cannot read file: {error.strerror.lower()}") from None


@contextmanager
def _open_checked(fp: BinaryIO, name: str | os.PathLike) -> Iterator[Image.Image]:
    """Open ``fp`` with Pillow and run every header-level check; pixels are not decoded."""
    head = fp.read(_SNIFF_BYTES)
    if not head:
        raise ImageError(name, "empty file")
    fp.seek(0)
    try:
        image = Image.open(fp)
    except UnidentifiedImageError:
        raise ImageError(name, _unidentified_reason(fp, head)) from None
    except Image.DecompressionBombError as error:
        raise ImageError(name, _pil_bomb_reason(error)) from None
    except Exception as error:  # Pillow plugins raise assorted types on malformed headers
        raise ImageError(name, f"truncated or corrupt image header: {error}") from error
    with image:
        if image.width * image.height > MAX_PIXELS:
            raise ImageError(
                name,
                f"decompression bomb: {image.width}x{image.height} pixels "
                f"exceeds limit of {MAX_PIXELS}",
            )
        if image.format in _DELEGATED_FORMATS:
            raise ImageError(name, f"unsupported format: {image.format}")
        yield image


def _decode(fp: BinaryIO, name: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    if fp.read(len(_PNG_SIGNATURE)) == _PNG_SIGNATURE:
        problem = _png_chunk_problem(fp)
        if problem:
            raise ImageError(name, problem)
    fp.seek(0)
    with _open_checked(fp, name) as image:
        try:
            if draft_size and image.format == "JPEG":
                # Scale is the largest power of two (<= 8) keeping both sides >= draft_size;
                # the mode is left as decoded (no colour conversion here).
                image.draft(image.mode, (draft_size, draft_size))
            image.load()
        except Image.DecompressionBombError as error:
            raise ImageError(name, _pil_bomb_reason(error)) from None
        except Exception as error:  # Pillow decoders raise assorted types on bad data
            raise ImageError(name, f"truncated or corrupt image data: {error}") from error
        upright = _exif_upright(image, name)
    return ensure_rgb(upright)


def _exif_upright(image: Image.Image, name: str | os.PathLike) -> Image.Image:
    """Return a detached copy of ``image`` rotated as its EXIF Orientation asks."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # malformed EXIF tags surface as TypeError, struct.error, ...
        # The pixels decoded fine; an un-rotated image beats dropping a real photo.
        log.warning("%s: ignoring unreadable EXIF orientation (%s)", name, error)
        return image.copy()


def _png_chunk_problem(fp: BinaryIO) -> str | None:
    """Verify every chunk CRC after the signature; return a reason, or None if intact.

    Pillow checks header chunk CRCs but skips the ones on IDAT, so a damaged
    file can otherwise decode silently. Reads in blocks to keep memory bounded.
    """
    while True:
        header = fp.read(8)
        if len(header) < 8:  # no IEND: let the decoder judge whether the pixels are complete
            return None
        length, chunk_type = struct.unpack(">I4s", header)
        checksum = zlib.crc32(chunk_type)
        remaining = length
        while remaining:
            block = fp.read(min(remaining, _CRC_READ_BLOCK))
            if not block:
                break
            checksum = zlib.crc32(block, checksum)
            remaining -= len(block)
        stored = fp.read(4)
        if remaining or len(stored) < 4:
            chunk_name = chunk_type.decode("latin-1")
            return f"truncated or corrupt image data: PNG ends inside its {chunk_name!r} chunk"
        if int.from_bytes(stored, "big") != checksum:
            return "corrupt PNG checksum"
        if chunk_type == b"IEND":
            return None


def _pil_bomb_reason(error: Image.DecompressionBombError) -> str:
    # Pillow refuses huge images before returning them, so only its message knows the size.
    pixels = re.search(r"\((\d+) pixels\)", str(error))
    if pixels is None:
        return f"decompression bomb: {error}"
    return f"decompression bomb: {pixels.group(1)} pixels exceeds limit of {MAX_PIXELS}"


def _unidentified_reason(fp: BinaryIO, head: bytes) -> str:
    """Say what a file Pillow cannot identify looks like instead."""
    if head.startswith(_PNG_SIGNATURE):
        fp.seek(len(_PNG_SIGNATURE))
        return _png_chunk_problem(fp) or "corrupt PNG header"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "unsupported format: HEIC/HEIF"
    if head.startswith(b"%PDF"):
        return "unsupported format: PDF"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in text:
        return "unsupported format: SVG"
    if text.startswith(b"<!doctype html") or b"<html" in text:
        return "not an image (looks like HTML)"
    if not any(byte < 9 or 13 < byte < 32 for byte in head):
        return "not an image (looks like text)"
    return "not an image (unrecognised format)"


# --- a query photo: any source, a box of it ---------------------------------------------------------


def decode_query(image, draft_size: int | None = None, as_array: bool = False) -> Image.Image | np.ndarray:
    """An upright RGB image from a path, bytes, a file-like object (an upload) or a PIL image.

    ``as_array``: a file's pixels as (height, width, 3) uint8 instead of a PIL image, the same
    pixels decoded faster (:func:`~fashionrec.data.images.decode_rgb_array`); every encoder here
    takes either. A PIL image given stays one. Raises ImageError naming the file (or the
    upload's name) and the reason.
    """
    if isinstance(image, Image.Image):
        return ensure_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return decode_rgb_array(image, draft_size=draft_size) if as_array else load_image(image, draft_size=draft_size)
    if hasattr(image, "read"):
        name = str(getattr(image, "name", "<upload>"))
        if hasattr(image, "seek"):
            image.seek(0)
        image = image.read()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        name = "<bytes>"
    else:
        raise TypeError(f"expected an image path, bytes, a file object or a PIL image, got {type(image).__name__}")
    data = bytes(image)
    return (decode_rgb_array(data, name, draft_size=draft_size) if as_array
            else open_image_bytes(data, name, draft_size=draft_size))


# A photo (or a box of one) smaller than this on a side holds too little of a product to compare.
TINY_IMAGE_SIDE = 32


def check_box(box) -> tuple[int, int, int, int] | None:
    """``(x, y, width, height)`` (or ``"x,y,w,h"``) as four whole pixel numbers; FashionRecError saying why not."""
    if box is None:
        return None
    parts = box.split(",") if isinstance(box, str) else list(box)
    try:
        numbers = [float(part) for part in parts]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != 4 or not all(np.isfinite(numbers)) or any(n != int(n) for n in numbers):
        raise FashionRecError(f"box {box!r}: give x,y,width,height as four whole pixel numbers, e.g. 40,60,200,300")
    x, y, width, height = (int(n) for n in numbers)
    if x < 0 or y < 0 or width < 1 or height < 1:
        raise FashionRecError(f"box {box!r}: x and y start at 0 (the photo's top-left corner) and width and "
                              "height are at least 1")
    return x, y, width, height


def crop_box(picture: Image.Image | np.ndarray, box: tuple[int, int, int, int] | None):
    """The part of a decoded photo inside ``box`` (cut at the photo's edges); the photo when box is None."""
    if box is None:
        return picture
    x, y, width, height = box
    picture_width, picture_height = (picture.shape[1], picture.shape[0]) if isinstance(picture, np.ndarray) \
        else picture.size
    if x >= picture_width or y >= picture_height:
        raise FashionRecError(f"box {x},{y},{width},{height} starts outside the {picture_width}x{picture_height} "
                              "photo")
    right, bottom = min(x + width, picture_width), min(y + height, picture_height)
    if isinstance(picture, np.ndarray):
        return np.ascontiguousarray(picture[y:bottom, x:right])
    return picture.crop((x, y, right, bottom))


def tiny_image_warnings(picture: Image.Image | np.ndarray, box=None) -> list[str]:
    """A warning when the photo (or its box) is under TINY_IMAGE_SIDE pixels on a side; else none.

    Called on the photo as decoded for the query model, which a JPEG draft may have shrunk; the
    draft never shrinks below the model's input size, far above this limit.
    """
    width, height = (picture.shape[1], picture.shape[0]) if isinstance(picture, np.ndarray) else picture.size
    if min(width, height) >= TINY_IMAGE_SIDE:
        return []
    what = "the box" if box is not None else "the photo"
    return [f"{what} is {width}x{height} pixels, under {TINY_IMAGE_SIDE} on a side: too small to show a product's "
            "detail, so these results say little"]


def as_image(picture: Image.Image | np.ndarray) -> Image.Image:
    """A PIL image of what :func:`decode_query` gave (the backbones' own transforms take PIL images)."""
    return Image.fromarray(picture) if isinstance(picture, np.ndarray) else picture
