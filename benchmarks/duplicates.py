"""Duplicate finding on a real catalog with planted duplicates: precision, recall and time.

    python benchmarks/duplicates.py [--data-dir CLOTHING] [--n-items 5000] [--planted 100] [--json]

Builds a catalog table from the clothing photos (or generated product shots when they are
absent), plants ``--planted`` exact copies (the same bytes under a new id) and as many near
copies (re-encoded JPEG at quality 70, 90% of the size, a 2% border cropped), indexes it with
``efficientnet_lite0`` (Flat, cosine; embeddings come from the cache on a second run), then
runs ``python -m fashionrec duplicates`` on the folder. ``--imagededup phash,cnn`` runs the
field's reference, imagededup, on the same files for comparison (PHash: perceptual hashes,
Hamming distance <= 10; CNN: its MobileNetV3 encodings, cosine >= the same threshold).

Reported per kind: recall = planted pairs found in a group of that kind; precision = of the
found pairs that involve a planted copy, the share that are its planted pair (pairs among the
original photos are reported apart: the catalog may hold duplicates of its own). The time is
the duplicates step's own (reading the folder, grouping), and the command's wall time with
the interpreter's start; the load average is recorded with it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fashionrec.data.catalog import CLOTHING_NON_CATEGORIES, find_clothing_dir
from fashionrec.errors import DatasetError
from fashionrec.evaluation.duplicates import DEFAULT_THRESHOLD, group_pairs

REPO = Path(__file__).resolve().parents[1]

BACKBONE = "efficientnet_lite0"


def originals(data_dir, n_items: int, seed: int) -> pd.DataFrame:
    """(sku, file, type) of real clothing photos, or generated shots when the clothing photos are absent."""
    try:
        root = find_clothing_dir(data_dir)
    except DatasetError:
        return None
    table = pd.read_csv(root / "images.csv", dtype=str)
    table = table[~table["label"].isin(CLOTHING_NON_CATEGORIES)]
    table = table[[(root / "images" / f"{image}.jpg").is_file() for image in table["image"]]]
    table = table.sample(n=min(n_items, len(table)), random_state=seed)
    return pd.DataFrame({"sku": table["image"].values,
                         "file": [str(root / "images" / f"{image}.jpg") for image in table["image"]],
                         "type": table["label"].values})


def near_copy(source: Path, target: Path) -> None:
    """The same photo as a shop might upload it twice: cropped 2% a side, 90% of the size, JPEG quality 70."""
    with Image.open(source) as image:
        image = image.convert("RGB")
        width, height = image.size
        border_x, border_y = int(width * 0.02), int(height * 0.02)
        image = image.crop((border_x, border_y, width - border_x, height - border_y))
        image = image.resize((int(image.width * 0.9), int(image.height * 0.9)))
        image.save(target, quality=70)


def plant(table: pd.DataFrame, work: Path, n_planted: int, seed: int) -> tuple[pd.DataFrame, list, list]:
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(table), size=2 * n_planted, replace=False)
    copies = work / "planted"
    copies.mkdir(parents=True, exist_ok=True)
    rows, exact, near = [], [], []
    for number, position in enumerate(chosen):
        original = table.iloc[position]
        kind = "exact" if number < n_planted else "near"
        target = copies / f"{kind}-{number:04d}.jpg"
        if kind == "exact":
            shutil.copyfile(original["file"], target)
        else:
            near_copy(Path(original["file"]), target)
        sku = f"{kind}-copy-{number:04d}"
        rows.append({"sku": sku, "file": str(target), "type": original["type"]})
        (exact if kind == "exact" else near).append((original["sku"], sku))
    return pd.concat([table, pd.DataFrame(rows)], ignore_index=True), exact, near


def scores(found: set[frozenset], planted: list[tuple]) -> dict:
    truth = {frozenset(pair) for pair in planted}
    copies = {pair_member for pair in planted for pair_member in pair if "copy" in pair_member}
    involving = {pair for pair in found if pair & copies}
    return {"planted_pairs": len(truth), "found": len(truth & found),
            "recall": len(truth & found) / len(truth) if truth else float("nan"),
            "pairs_with_a_copy": len(involving),
            "precision": len(involving & truth) / len(involving) if involving else float("nan")}


def imagededup_scores(method: str, catalog: pd.DataFrame, exact: list, near: list, threshold: float) -> dict:
    """imagededup's PHash or CNN on the same files: its duplicate lists as pairs, scored like ours."""
    from imagededup.methods import CNN, PHash   # the comparison's own dependency, imported when asked for

    started = time.perf_counter()
    finder = PHash(verbose=False) if method == "phash" else CNN(verbose=False)
    encodings = {sku: finder.encode_image(image_file=path) for sku, path in zip(catalog["sku"], catalog["file"])}
    encodings = {sku: encoding for sku, encoding in encodings.items() if encoding is not None}
    options = {"max_distance_threshold": 10} if method == "phash" else {"min_similarity_threshold": threshold}
    duplicates = finder.find_duplicates(encoding_map=encodings, **options)
    found = {frozenset((a, b)) for a, others in duplicates.items() for b in others}
    return {"exact": scores(found, exact), "near": scores(found, near),
            "seconds": round(time.perf_counter() - started, 1), "options": options}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="the clothing dataset (default: where `make data` puts it)")
    parser.add_argument("--n-items", type=int, default=4800, help="original photos (the planted copies come on top)")
    parser.add_argument("--planted", type=int, default=100, help="exact copies, and as many near copies")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--work", default=str(REPO / "results" / "bench-duplicates"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", default="0.9,0.93,0.95",
                        help="other thresholds whose recall and precision are reported beside --threshold's")
    parser.add_argument("--reuse", action="store_true", help="reuse the index folder --work holds (same catalog)")
    parser.add_argument("--imagededup", default="", help="also run imagededup's methods: phash, cnn or phash,cnn")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    table = originals(args.data_dir, args.n_items, args.seed)
    if table is None:
        print("clothing photos not found: pass --data-dir (the folder holding images.csv)", file=sys.stderr)
        return 2
    catalog, exact, near = plant(table, work, args.planted, args.seed)
    catalog.to_csv(work / "products.csv", index=False)
    index_dir = work / "index"
    command = [sys.executable, "-m", "fashionrec"]
    if not (args.reuse and (index_dir / "CURRENT").is_file()):
        built = subprocess.run([*command, "index", "--catalog", str(work / "products.csv"), "--columns",
                                "path=file,label=type,id=sku", "--backbone", BACKBONE, "--out", str(index_dir),
                                "--quiet", "--json"], capture_output=True, text=True)
        if built.returncode != 0:
            print(built.stderr, file=sys.stderr)
            return built.returncode
    load = os.getloadavg()
    started = time.perf_counter()
    found = subprocess.run([*command, "duplicates", "--index-dir", str(index_dir), "--threshold",
                            str(args.threshold), "--json"], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    record = json.loads(found.stdout)
    originals_only = [group for group in record["exact"] + record["near"] if not any("copy" in i for i in group)]
    result = {"dataset": "clothing", "backbone": BACKBONE, "index": "Flat", "metric": "cosine",
              "threshold": args.threshold, "n_items": record["n_items"], "seed": args.seed,
              "exact": scores(group_pairs(record["exact"]), exact),
              "near": scores(group_pairs(record["near"] + record["exact"]), near),
              "groups_among_originals": len(originals_only),
              "duplicates_seconds": record["seconds"], "command_wall_seconds": round(wall, 3),
              "load_average": [round(value, 2) for value in load]}
    result["sweep"] = {}
    for threshold in [float(value) for value in args.sweep.split(",") if value]:
        swept = json.loads(subprocess.run([*command, "duplicates", "--index-dir", str(index_dir), "--threshold",
                                           str(threshold), "--json"], capture_output=True,
                                          text=True, check=True).stdout)
        result["sweep"][threshold] = {"near": scores(group_pairs(swept["near"] + swept["exact"]), near),
                                      "groups_among_originals": sum(not any("copy" in i for i in group)
                                                                    for group in swept["exact"] + swept["near"])}
    for method in filter(None, args.imagededup.split(",")):
        result[f"imagededup_{method}"] = imagededup_scores(method, catalog, exact, near, args.threshold)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['n_items']} items ({args.n_items} clothing photos + {args.planted} exact + {args.planted} near "
          f"copies), {BACKBONE} Flat cosine, threshold {args.threshold:g}, seed {args.seed}")
    print("| kind | planted pairs | found | recall | pairs with a copy | precision |")
    print("|---|---|---|---|---|---|")
    for kind in ("exact", "near"):
        entry = result[kind]
        print(f"| {kind} | {entry['planted_pairs']} | {entry['found']} | {entry['recall']:.3f} | "
              f"{entry['pairs_with_a_copy']} | {entry['precision']:.3f} |")
    for method in filter(None, args.imagededup.split(",")):
        entry = result[f"imagededup_{method}"]
        for kind in ("exact", "near"):
            print(f"| imagededup {method}, {kind} | {entry[kind]['planted_pairs']} | {entry[kind]['found']} | "
                  f"{entry[kind]['recall']:.3f} | {entry[kind]['pairs_with_a_copy']} | {entry[kind]['precision']:.3f} |")
        print(f"imagededup {method}: {entry['seconds']:.1f} s (encoding every photo and searching)")
    for threshold, entry in result["sweep"].items():
        near_entry = entry["near"]
        print(f"| near, threshold {threshold:g} | {near_entry['planted_pairs']} | {near_entry['found']} | "
              f"{near_entry['recall']:.3f} | {near_entry['pairs_with_a_copy']} | {near_entry['precision']:.3f} | "
              f"({entry['groups_among_originals']} groups among the originals)")
    print(f"groups among the original photos: {result['groups_among_originals']}")
    print(f"duplicates step {result['duplicates_seconds']:.2f} s; command wall {wall:.2f} s (load average "
          f"{', '.join(map(str, result['load_average']))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
