"""A generated catalog whose colours are known: garment silhouettes in set colours, on white or on clutter.

    python tests/colour_catalog.py OUTDIR [--per-cell 12]     # writes OUTDIR/catalog.csv and OUTDIR/images/

Each (category, colour) cell has ``per_cell`` photos, half on a white studio background, half
on clutter (random rectangles of random colours, every hue, plus noise), the product centred
with a seeded jitter in position, size and shade. ``catalog.csv`` has ``path,label,colour,background``.
"""
from __future__ import annotations

import argparse
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

SIZE = (160, 200)
COLOURS = {"red": (200, 30, 35), "green": (35, 150, 60), "blue": (35, 60, 190), "yellow": (225, 200, 40)}
CATEGORIES = ("tee", "trousers", "dress")
BACKGROUNDS = ("white", "clutter")


def _silhouette(draw: ImageDraw.ImageDraw, category: str, cx: float, cy: float, scale: float, fill) -> None:
    w, h = 45 * scale, 60 * scale
    if category == "tee":   # body and two sleeves
        draw.rectangle([cx - w * 0.6, cy - h * 0.6, cx + w * 0.6, cy + h], fill=fill)
        draw.polygon([(cx - w * 0.6, cy - h * 0.6), (cx - w * 1.2, cy - h * 0.1), (cx - w * 0.9, cy + h * 0.15),
                      (cx - w * 0.6, cy - h * 0.1)], fill=fill)
        draw.polygon([(cx + w * 0.6, cy - h * 0.6), (cx + w * 1.2, cy - h * 0.1), (cx + w * 0.9, cy + h * 0.15),
                      (cx + w * 0.6, cy - h * 0.1)], fill=fill)
    elif category == "trousers":   # waistband and two legs
        draw.rectangle([cx - w * 0.6, cy - h, cx + w * 0.6, cy - h * 0.6], fill=fill)
        draw.polygon([(cx - w * 0.6, cy - h * 0.6), (cx - w * 0.05, cy - h * 0.6), (cx - w * 0.15, cy + h),
                      (cx - w * 0.7, cy + h)], fill=fill)
        draw.polygon([(cx + w * 0.05, cy - h * 0.6), (cx + w * 0.6, cy - h * 0.6), (cx + w * 0.7, cy + h),
                      (cx + w * 0.15, cy + h)], fill=fill)
    else:   # dress: narrow top, wide flared skirt
        draw.polygon([(cx - w * 0.35, cy - h), (cx + w * 0.35, cy - h), (cx + w * 0.3, cy - h * 0.2),
                      (cx + w, cy + h), (cx - w, cy + h), (cx - w * 0.3, cy - h * 0.2)], fill=fill)


def _background(kind: str, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", SIZE, (250, 250, 250))
    if kind == "clutter":
        draw = ImageDraw.Draw(image)
        for _ in range(40):
            x, y = rng.integers(0, SIZE[0]), rng.integers(0, SIZE[1])
            dx, dy = rng.integers(8, 50, 2)
            draw.rectangle([x, y, x + dx, y + dy], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def product_photo(path: Path, category: str, colour: str, background: str, seed: int) -> Path:
    """One photo: the category's silhouette in a shade of ``colour`` on ``background``, seeded."""
    rng = np.random.default_rng(seed)
    image = _background(background, rng)
    shade = np.clip(np.array(COLOURS[colour]) * rng.uniform(0.85, 1.1) + rng.integers(-12, 13, 3), 0, 255)
    _silhouette(ImageDraw.Draw(image), category, SIZE[0] / 2 + rng.normal(0, 5), SIZE[1] / 2 + rng.normal(0, 5),
                rng.uniform(1.0, 1.35), tuple(int(c) for c in shade))
    pixels = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-8, 9, (SIZE[1], SIZE[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=92)
    return path


def write_colour_catalog(root: Path, per_cell: int = 12) -> pd.DataFrame:
    """Writes ``root/images/*.jpg`` and ``root/catalog.csv`` (path, label, colour, background); returns the table."""
    rows = []
    for category in CATEGORIES:
        for colour in COLOURS:
            for i in range(per_cell):
                background = BACKGROUNDS[i % 2]
                name = f"images/{category}-{colour}-{i:02d}.jpg"
                product_photo(root / name, category, colour, background, zlib.crc32(name.encode()))
                rows.append({"path": name, "label": category, "colour": colour, "background": background})
    table = pd.DataFrame(rows)
    table.to_csv(root / "catalog.csv", index=False)
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--per-cell", type=int, default=12)
    arguments = parser.parse_args()
    written = write_colour_catalog(arguments.outdir, arguments.per_cell)
    print(f"{len(written)} photos, {written['label'].nunique()} categories x {written['colour'].nunique()} colours "
          f"-> {arguments.outdir / 'catalog.csv'}")
