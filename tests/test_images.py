"""Robustness of fashionrec.images against a hostile catalog.

Every file is generated at test time. The ``catalog`` fixture lays the cases out
like a torchvision ImageFolder (root/<label>/<file>); each case states what
must happen to it: load with a given size and pixel colours, or be rejected
with a reason containing a given phrase.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile

from fashionrec.data import images
from fashionrec.errors import ImageError
from fashionrec.data.images import (ImageInfo, decode_rgb_array, ensure_rgb, jpeg_arrays_match_pillow, load_image,
                                   open_image_bytes, probe_image)

WHITE = (255, 255, 255)
RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)

Writer = Callable[[Path], None]


# ---------------------------------------------------------------- byte builders


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise_jpeg() -> bytes:
    # Noise does not compress, so half the file really is half the scan data.
    return encode(Image.effect_noise((96, 64), 60).convert("RGB"), "JPEG", quality=95)


def first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def red_left_blue_right(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 2, height))
    return image


def exif_rotated_jpeg() -> bytes:
    """40x20 stored pixels (red left, blue right) tagged 'rotate 90 degrees clockwise'."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    return encode(red_left_blue_right(40, 20), "JPEG", exif=exif, quality=95)


def png_chunk(chunk_type: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + chunk_type + data + struct.pack(">I", zlib.crc32(chunk_type + data))


def png_claiming_size(width: int, height: int) -> bytes:
    """A well-formed PNG whose IHDR declares width x height but whose IDAT holds one row."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    one_row = zlib.compress(b"\0" * (1 + width))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", one_row)
        + png_chunk(b"IEND", b"")
    )


def png_with_flipped_byte(locate: Callable[[bytes], int]) -> bytes:
    data = bytearray(encode(Image.new("RGB", (10, 10), RED), "PNG"))
    data[locate(bytes(data))] ^= 0xFF
    return bytes(data)


def idat_crc_offset(data: bytes) -> int:
    type_at = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[type_at - 4 : type_at])
    return type_at + 4 + length


def ihdr_crc_offset(data: bytes) -> int:
    return data.index(b"IHDR") + 4 + 13


def idat_payload_offset(data: bytes) -> int:
    return data.index(b"IDAT") + 6


def gray16(dtype: str, mode: str) -> Image.Image:
    samples = np.array([[0, 32767, 65535]] * 2, dtype=dtype)
    return Image.frombytes(mode, (3, 2), samples.tobytes())


def transparent_palette() -> Image.Image:
    image = Image.new("P", (8, 4), 0)
    image.putpalette([*RED, *BLUE])
    image.paste(1, (4, 0, 8, 4))
    return image


def transparent_left_black_right() -> Image.Image:
    alpha = Image.frombytes("L", (4, 2), bytes([0, 0, 255, 255] * 2))
    return Image.merge("LA", (Image.new("L", (4, 2), 0), alpha))


def animated_gif() -> bytes:
    first, *rest = (Image.new("RGB", (12, 8), colour) for colour in (RED, GREEN, BLUE))
    return encode(first, "GIF", save_all=True, append_images=rest, duration=50, loop=0)


# ---------------------------------------------------------------- writers


def write_bytes(data: bytes) -> Writer:
    return lambda path: path.write_bytes(data)


def write_image(image: Image.Image, fmt: str, **options) -> Writer:
    return write_bytes(encode(image, fmt, **options))


def write_dangling_symlink(path: Path) -> None:
    path.symlink_to(path.with_name("deleted-long-ago.jpg"))


def write_symlink_loop(path: Path) -> None:
    partner = path.with_name(path.name + ".partner")
    path.symlink_to(partner)
    partner.symlink_to(path)


def write_symlink_to_good_image(path: Path) -> None:
    target = path.with_name("symlink-target.bin")
    target.write_bytes(encode(Image.new("RGB", (7, 5), GREEN), "PNG"))
    path.symlink_to(target.name)


# ---------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Loads:
    write: Writer
    size: tuple[int, int]
    pixels: dict[tuple[int, int], tuple[int, int, int]] = field(default_factory=dict)
    tolerance: int = 0


@dataclass(frozen=True)
class Rejected:
    write: Writer
    reason: str


BLACK = (0, 0, 0)
RAMP_16_BIT = {(0, 0): BLACK, (1, 0): (128, 128, 128), (2, 0): WHITE}  # samples 0, 65535 / 2, 65535
RED_THEN_BLUE = {(1, 1): RED, (8, 1): BLUE}
JPEG_SLACK = 8

GOOD = {
    "rgba/fully transparent red.png": Loads(
        write_image(Image.new("RGBA", (8, 6), (*RED, 0)), "PNG"), (8, 6), {(3, 3): WHITE}
    ),
    "rgba/half transparent red.png": Loads(
        write_image(Image.new("RGBA", (8, 6), (*RED, 128)), "PNG"), (8, 6), {(3, 3): (255, 127, 127)}, 1
    ),
    "palette/transparent index.png": Loads(
        write_image(transparent_palette(), "PNG", transparency=0), (8, 4), {(1, 1): WHITE, (6, 1): BLUE}
    ),
    "palette/transparent index.gif": Loads(
        write_image(transparent_palette(), "GIF", transparency=0), (8, 4), {(1, 1): WHITE, (6, 1): BLUE}
    ),
    "modes/cmyk.jpg": Loads(
        write_image(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), (16, 16), {(8, 8): RED}, JPEG_SLACK
    ),
    "modes/gray16.png": Loads(write_image(gray16("<u2", "I;16"), "PNG"), (3, 2), RAMP_16_BIT, 1),
    "modes/gray16 big-endian.tiff": Loads(write_image(gray16(">u2", "I;16B"), "TIFF"), (3, 2), RAMP_16_BIT, 1),
    "modes/gray32 holding 16-bit samples.tiff": Loads(
        write_image(gray16("<i4", "I"), "TIFF"), (3, 2), RAMP_16_BIT, 1
    ),
    "modes/gray8.png": Loads(write_image(Image.new("L", (5, 5), 77), "PNG"), (5, 5), {(2, 2): (77, 77, 77)}),
    "modes/la.png": Loads(
        write_image(transparent_left_black_right(), "PNG"), (4, 2), {(0, 0): WHITE, (3, 0): BLACK}
    ),
    "modes/one bit.png": Loads(
        write_image(Image.frombytes("1", (8, 1), bytes([0b00001111])), "PNG"), (8, 1), {(0, 0): BLACK, (7, 0): WHITE}
    ),
    "orientation/exif rotated.jpg": Loads(
        write_bytes(exif_rotated_jpeg()), (20, 40), {(10, 5): RED, (10, 35): BLUE}, JPEG_SLACK
    ),
    "formats/animated.gif": Loads(write_bytes(animated_gif()), (12, 8), {(6, 4): RED}),
    "formats/lossless.webp": Loads(
        write_image(red_left_blue_right(10, 4), "WEBP", lossless=True), (10, 4), RED_THEN_BLUE
    ),
    "formats/plain.bmp": Loads(write_image(red_left_blue_right(10, 4), "BMP"), (10, 4), RED_THEN_BLUE),
    "formats/plain.tiff": Loads(write_image(red_left_blue_right(10, 4), "TIFF"), (10, 4), RED_THEN_BLUE),
    "formats/jpeg in disguise.png": Loads(
        write_image(Image.new("RGB", (9, 9), GREEN), "JPEG"), (9, 9), {(4, 4): GREEN}, JPEG_SLACK
    ),
    "names/robe d'été 夏 dress.jpg": Loads(
        write_image(Image.new("RGB", (6, 6), BLUE), "JPEG"), (6, 6), {(3, 3): BLUE}, JPEG_SLACK
    ),
    "names/link to good image.png": Loads(write_symlink_to_good_image, (7, 5), {(3, 2): GREEN}),
    "shapes/one pixel.png": Loads(
        write_image(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), (1, 1), {(0, 0): (10, 20, 30)}
    ),
    "shapes/wide strip.jpg": Loads(write_image(Image.new("RGB", (4000, 10), GREEN), "JPEG"), (4000, 10)),
    "shapes/tall strip.png": Loads(write_image(Image.new("RGB", (10, 4000), GREEN), "PNG"), (10, 4000)),
}

PLACEABLE_WMF = b"\xd7\xcd\xc6\x9a\0\0" + struct.pack("<hhhhH", 0, 0, 100, 100, 72) + b"\0" * 6 + b"\1\0\x09\0\0\3"
MINIMAL_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n"
MINIMAL_SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
HEIC_HEADER = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic"

BAD = {
    "broken/truncated.jpg": Rejected(write_bytes(first_half(noise_jpeg())), "truncated or corrupt image data"),
    "broken/truncated.png": Rejected(
        write_bytes(encode(Image.effect_noise((64, 64), 60), "PNG")[:700]), "PNG ends inside its 'IDAT' chunk"
    ),
    "broken/corrupt idat data.png": Rejected(
        write_bytes(png_with_flipped_byte(idat_payload_offset)), "corrupt PNG checksum"
    ),
    "broken/corrupt idat crc.png": Rejected(write_bytes(png_with_flipped_byte(idat_crc_offset)), "corrupt PNG checksum"),
    "broken/corrupt ihdr crc.png": Rejected(write_bytes(png_with_flipped_byte(ihdr_crc_offset)), "corrupt PNG checksum"),
    "broken/zero width.png": Rejected(write_bytes(png_claiming_size(0, 10)), "corrupt PNG header"),
    "broken/empty.jpg": Rejected(write_bytes(b""), "empty file"),
    "broken/random bytes.jpg": Rejected(write_bytes(bytes(range(256)) * 4), "not an image (unrecognised format)"),
    "impostors/error page.jpg": Rejected(
        write_bytes(b"\n<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>"), "not an image (looks like HTML)"
    ),
    "impostors/notes.jpg": Rejected(
        write_bytes("Lieferung fehlt – bitte nachfragen\n".encode()), "not an image (looks like text)"
    ),
    "impostors/logo.svg": Rejected(write_bytes(MINIMAL_SVG), "unsupported format: SVG"),
    "impostors/lookbook.jpg": Rejected(write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n"), "unsupported format: PDF"),
    "impostors/iphone.jpg": Rejected(write_bytes(HEIC_HEADER + b"\0" * 64), "unsupported format: HEIC"),
    "impostors/vector.eps": Rejected(write_bytes(MINIMAL_EPS), "unsupported format: EPS"),
    "impostors/clipart.wmf": Rejected(write_bytes(PLACEABLE_WMF + b"\0" * 40), "unsupported format: WMF"),
    "bombs/gigapixel.png": Rejected(
        write_bytes(png_claiming_size(100_000, 100_000)), "decompression bomb: 10000000000 pixels"
    ),
    "bombs/81 megapixel.png": Rejected(
        write_bytes(png_claiming_size(9000, 9000)), "decompression bomb: 9000x9000 pixels"
    ),
    "filesystem/dangling.jpg": Rejected(write_dangling_symlink, "dangling symlink"),
    "filesystem/loop.jpg": Rejected(write_symlink_loop, "cannot access file: too many levels of symbolic links"),
    "filesystem/folder.jpg": Rejected(lambda path: path.mkdir(), "not a regular file (directory)"),
    "filesystem/device.jpg": Rejected(lambda path: path.symlink_to(os.devnull), "not a regular file (character device)"),
    "filesystem/listed but missing.jpg": Rejected(lambda path: None, "file not found"),
}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("catalog")
    for name, case in {**GOOD, **BAD}.items():
        path = root / name
        path.parent.mkdir(exist_ok=True)
        case.write(path)
    return root


def assert_pixels_close(image: Image.Image, expected: Loads) -> None:
    for xy, colour in expected.pixels.items():
        actual = image.getpixel(xy)
        assert all(abs(a - e) <= expected.tolerance for a, e in zip(actual, colour)), (xy, actual, colour)


def reason_for(path) -> str:
    with pytest.raises(ImageError) as caught:
        load_image(path)
    assert caught.value.path == str(path)
    return caught.value.reason


# ---------------------------------------------------------------- load_image


@pytest.mark.parametrize("name", GOOD)
def test_real_images_load_as_upright_rgb(catalog, name):
    expected = GOOD[name]
    image = load_image(catalog / name)
    assert image.mode == "RGB"
    assert image.size == expected.size
    assert_pixels_close(image, expected)


@pytest.mark.parametrize("name", BAD)
def test_non_images_are_rejected_with_a_specific_reason(catalog, name):
    assert BAD[name].reason in reason_for(catalog / name)


def test_walking_the_catalog_keeps_every_real_image_and_explains_every_skip(catalog):
    loaded, skipped = set(), {}
    for label in catalog.iterdir():
        for path in label.iterdir():
            name = f"{label.name}/{path.name}"
            try:
                load_image(path)
            except ImageError as error:
                skipped[name] = error.reason
            else:
                loaded.add(name)
    assert loaded == set(GOOD) | {"names/symlink-target.bin"}
    on_disk = {name for name in BAD if name != "filesystem/listed but missing.jpg"}
    # A symlink loop's partner is itself a looping link, and rightly skipped as such.
    assert skipped.keys() == on_disk | {"filesystem/loop.jpg.partner"}
    assert all(skipped.values())


def test_each_kind_of_failure_gets_its_own_reason(catalog):
    actual_reasons = {reason_for(catalog / name) for name in BAD}
    assert len(actual_reasons) == len({case.reason for case in BAD.values()})


def test_truncated_images_are_not_silently_padded(catalog):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert "image file is truncated" in reason_for(catalog / "broken/truncated.jpg")


def test_bomb_is_rejected_from_the_header_without_decoding(catalog):
    started = time.perf_counter()
    for name in ("bombs/gigapixel.png", "bombs/81 megapixel.png"):
        with pytest.raises(ImageError, match="decompression bomb"):
            probe_image(catalog / name)
        reason_for(catalog / name)
    # Decoding 81 MP (let alone 10 GP) would take seconds and gigabytes.
    assert time.perf_counter() - started < 1.0


def test_pixel_limit_is_read_from_the_module_constant(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    at_limit, over_limit = tmp_path / "10x10.png", tmp_path / "11x10.png"
    Image.new("RGB", (10, 10)).save(at_limit)
    Image.new("RGB", (11, 10)).save(over_limit)
    assert load_image(at_limit).size == (10, 10)
    assert reason_for(over_limit) == "decompression bomb: 11x10 pixels exceeds limit of 100"


def test_fifo_is_rejected_without_blocking_on_open(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(reason_for(fifo)), daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert outcome == ["not a regular file (fifo)"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_file_is_rejected(tmp_path):
    locked = tmp_path / "locked.jpg"
    Image.new("RGB", (2, 2)).save(locked)
    locked.chmod(0)
    assert reason_for(locked) == "cannot read file: permission denied"


def test_unreadable_exif_keeps_the_photo_unrotated(tmp_path, caplog):
    photo = tmp_path / "garbled exif.jpg"
    # Orientation=6 next to SamplesPerPixel stored as text: Pillow cannot rewrite this EXIF.
    garbled = (
        b"Exif\0\0MM\0*\0\0\0\x08\0\x02"
        b"\x01\x15\0\x02\0\0\0\x04Cam\0"
        b"\x01\x12\0\x03\0\0\0\x01\0\x06\0\0"
        b"\0\0\0\0"
    )
    Image.new("RGB", (30, 10), RED).save(photo, "JPEG", exif=garbled)
    assert load_image(photo).size == (30, 10)
    assert "ignoring unreadable EXIF orientation" in caplog.text


# ---------------------------------------------------------------- probe_image


def test_probe_reports_header_facts_and_trusts_content(catalog):
    assert probe_image(catalog / "formats/jpeg in disguise.png") == ImageInfo("JPEG", 9, 9, "RGB")
    assert probe_image(catalog / "modes/gray16.png") == ImageInfo("PNG", 3, 2, "I;16")
    assert probe_image(catalog / "orientation/exif rotated.jpg") == ImageInfo("JPEG", 40, 20, "RGB")


def test_probe_does_not_decode_pixels(catalog):
    # The header of a truncated JPEG is intact; only a full decode notices the cut.
    assert probe_image(catalog / "broken/truncated.jpg") == ImageInfo("JPEG", 96, 64, "RGB")


@pytest.mark.parametrize(
    "name",
    [name for name in BAD if not name.startswith(("broken/truncated", "broken/corrupt idat"))],
)
def test_probe_rejects_what_the_header_already_shows(catalog, name):
    with pytest.raises(ImageError) as caught:
        probe_image(catalog / name)
    assert BAD[name].reason in caught.value.reason


# ---------------------------------------------------------------- decode_rgb_array (the query path)


@pytest.mark.parametrize("draft_size", [None, 8])
@pytest.mark.parametrize("name", GOOD)
def test_rgb_arrays_are_exactly_what_load_image_gives(catalog, name, draft_size):
    expected = np.asarray(load_image(catalog / name, draft_size=draft_size))
    actual = decode_rgb_array(catalog / name, draft_size=draft_size)
    assert actual.dtype == np.uint8 and actual.shape == expected.shape and np.array_equal(actual, expected)
    from_bytes = decode_rgb_array((catalog / name).read_bytes(), name="upload.jpg", draft_size=draft_size)
    assert np.array_equal(from_bytes, expected)


@pytest.mark.parametrize("name", BAD)
def test_rgb_arrays_refuse_what_load_image_refuses_with_its_reason(catalog, name):
    with pytest.raises(ImageError) as caught:
        decode_rgb_array(catalog / name)
    assert caught.value.path == str(catalog / name)
    assert caught.value.reason == reason_for(catalog / name)


def test_plain_jpegs_skip_pillow_decoding_and_the_rest_do_not(tmp_path, monkeypatch):
    assert jpeg_arrays_match_pillow()
    plain, rotated = tmp_path / "plain.jpg", tmp_path / "rotated.jpg"
    plain.write_bytes(noise_jpeg())
    rotated.write_bytes(exif_rotated_jpeg())
    expected = {path: np.asarray(load_image(path)) for path in (plain, rotated)}
    pillow_decodes = []
    original = images._decode
    monkeypatch.setattr(images, "_decode", lambda *args: pillow_decodes.append(args[1]) or original(*args))
    assert np.array_equal(decode_rgb_array(plain), expected[plain]) and pillow_decodes == []
    assert np.array_equal(decode_rgb_array(rotated), expected[rotated]) and pillow_decodes == [rotated]


# ---------------------------------------------------------------- in-memory images


def test_uploaded_bytes_load_upright():
    image = open_image_bytes(exif_rotated_jpeg(), name="upload.jpg")
    assert (image.mode, image.size) == ("RGB", (20, 40))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"<html><body>not found</body></html>", "looks like HTML"),
        (png_claiming_size(100_000, 100_000), "decompression bomb"),
        (noise_jpeg()[:2000], "truncated or corrupt image data"),
        (png_with_flipped_byte(idat_crc_offset), "corrupt PNG checksum"),
    ],
)
def test_bad_uploads_are_rejected_under_their_name(data, reason):
    with pytest.raises(ImageError) as caught:
        open_image_bytes(data, name="upload.jpg")
    assert caught.value.path == "upload.jpg"
    assert reason in caught.value.reason


def test_ensure_rgb_composites_alpha_on_white_and_keeps_rgb_as_is():
    rgb = Image.new("RGB", (3, 3), RED)
    assert ensure_rgb(rgb) is rgb
    assert ensure_rgb(Image.new("RGBA", (3, 3), (*BLUE, 0))).getpixel((1, 1)) == WHITE
    assert ensure_rgb(Image.new("LA", (3, 3), (0, 255))).getpixel((1, 1)) == (0, 0, 0)
    assert ensure_rgb(Image.new("CMYK", (3, 3), (0, 0, 0, 0))).getpixel((1, 1)) == WHITE


def test_ensure_rgb_clips_32_bit_gray_to_the_16_bit_range():
    samples = np.array([[-5, 32767, 70000]], dtype=np.int32)
    rgb = ensure_rgb(Image.fromarray(samples))
    assert [rgb.getpixel((x, 0))[0] for x in range(3)] == [0, 127, 255]
