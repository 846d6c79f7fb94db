"""A researcher's own catalog and own backbone, end to end, as a new user meets them.

A folder catalog of 4 categories x 12 photos plus a text file named .jpg and a truncated JPEG;
a module of the user's that registers a seeded tiny CNN; a parameter file naming both; then
``python -m fashionrec pipeline``, ``evaluate --json`` and ``embed --json``. Every count and
both left-out files must agree everywhere, and every mistake a user can make is one line.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fashionrec import config
from fashionrec.cli import main
from fashionrec.data.catalog import load_folder
from fashionrec.data.images import load_image
from fashionrec.features.embed import embed_catalog
from fashionrec.models import registry
from fashionrec.settings import InferenceSettings

from conftest import REPO, write_color_image

CATEGORIES = {"T-Shirt": (210, 40, 40), "Pants": (40, 40, 200), "Hat": (40, 190, 60), "Dress": (200, 190, 40)}
PER_CATEGORY = 12
USER_BACKBONE = "tiny_cnn_seed0"
USER_MODULE = f'''
"""A user's own backbone: a tiny CNN with seeded random weights (an untrained control of theirs)."""
import torch
from torch import nn
from torchvision import transforms

from fashionrec import BuiltBackbone, register_backbone

SEED = [0]


@register_backbone("{USER_BACKBONE}", dim=16, description="my tiny CNN, untrained, seed 0")
def build(weights_file):
    with torch.random.fork_rng():
        torch.manual_seed(SEED[0])
        model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten())
    transform = transforms.Compose([transforms.Resize((48, 48)), transforms.ToTensor()])
    return BuiltBackbone(model=model, transform=transform)
'''
TEXT_FILE = "Pants/size-chart.jpg"
TRUNCATED = "Hat/hat-cut.jpg"


def make_shop(root: Path) -> Path:
    for label, color in CATEGORIES.items():
        for i in range(PER_CATEGORY):
            write_color_image(root / label / f"{label.lower()}-{i:02d}.jpg", np.add(color, 3 * i) % 256)
    (root / TEXT_FILE).write_text("S 36-38, M 40-42, L 44-46\n")
    whole = write_color_image(root.parent / "whole.jpg", (40, 190, 60), size=(400, 400)).read_bytes()
    (root / TRUNCATED).write_bytes(whole[: len(whole) // 2])   # the header is intact: only a full decode fails
    return root


def environment(data_root: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "lib"), "FASHIONREC_DATA": str(data_root / "data"),
            "FASHIONREC_RESULTS": str(data_root / "results"), "FASHIONREC_HEADLESS": "1"}


def run_cli(arguments: list[str], data_root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fashionrec", *arguments], capture_output=True, text=True,
                          env=environment(data_root), cwd=data_root, timeout=900)


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """One pipeline run over the shop with the user's backbone, and its evaluate/embed --json twins."""
    root = tmp_path_factory.mktemp("own")
    shop = make_shop(root / "shop")
    module = root / "my_backbones.py"
    module.write_text(USER_MODULE)
    params = root / "my-shop.yaml"
    params.write_text(yaml.safe_dump({
        "dataset": "folder", "data_dir": str(shop), "backbones": [USER_BACKBONE, "colorhist"],
        "backbone_modules": [str(module)], "k": 5, "indexes": ["Flat", "HNSW32", "IVF{nlist},Flat"],
        "pca_dims": [8], "notebooks": ["00-prepare-data", "01-embed", "02-index", "03-evaluate", "05-report"],
    }))
    pipeline = run_cli(["pipeline", "--params", str(params)], root)
    common = ["--dataset", "folder", "--data-dir", str(shop), "--backbone", USER_BACKBONE,
              "--backbone-module", str(module), "--json", "--quiet"]
    evaluate = run_cli(["evaluate", *common, "--k", "5"], root)
    embed = run_cli(["embed", *common], root)
    return {"root": root, "run": root / "results" / "my-shop", "pipeline": pipeline, "evaluate": evaluate,
            "embed": embed}


def _ledger(entries) -> list[tuple[str, str]]:
    return sorted((entry["path"], entry["stage"]) for entry in entries)


EXPECTED_LEDGER = [(TRUNCATED, "decode"), (TEXT_FILE, "header")]
N_USED = len(CATEGORIES) * PER_CATEGORY


@pytest.mark.integration
def test_a_backbone_from_a_user_module_runs_through_the_pipeline_into_the_report(own_run):
    assert own_run["pipeline"].returncode == 0, own_run["pipeline"].stderr[-3000:]
    report = (own_run["run"] / "report.md").read_text()
    backbones = json.loads((own_run["run"] / "backbones.json").read_text())
    mine = backbones[USER_BACKBONE]
    assert mine["status"] == "ok" and mine["dim"] == 16 and len(mine["weights_sha256"]) == 64
    assert f"- `{USER_BACKBONE}`: 16-d, all {N_USED} images embedded; weights sha256 {mine['weights_sha256'][:16]}" \
        in report
    assert re.search(rf"^\| {USER_BACKBONE} \| Flat \| ", report, re.MULTILINE), "no results row for it"
    assert re.search(rf"^- \d+ groups of exact duplicates, \d+ groups of near duplicates among {N_USED} images",
                     report, re.MULTILINE), "no duplicates section"


@pytest.mark.integration
def test_both_left_out_files_and_every_count_agree_in_skipped_json_report_evaluate_and_embed(own_run):
    assert own_run["pipeline"].returncode == 0, own_run["pipeline"].stderr[-3000:]
    skipped = json.loads((own_run["run"] / "skipped.json").read_text())
    assert _ledger(skipped) == EXPECTED_LEDGER
    reasons = {entry["path"]: entry["reason"] for entry in skipped}
    assert reasons[TEXT_FILE] == "not an image (looks like text)"
    assert reasons[TRUNCATED].startswith("truncated or corrupt image data")

    assert own_run["evaluate"].returncode == 0, own_run["evaluate"].stderr
    evaluated = json.loads(own_run["evaluate"].stdout)
    assert evaluated["n_skipped"] == 2 and _ledger(evaluated["skipped"]) == EXPECTED_LEDGER
    assert evaluated["n_images"] == N_USED and evaluated["n_skipped_by_stage"] == {"header": 1, "decode": 1}
    assert own_run["embed"].returncode == 0, own_run["embed"].stderr
    embedded = json.loads(own_run["embed"].stdout)
    assert _ledger(embedded["skipped"]) == EXPECTED_LEDGER
    assert embedded["n_embedded"] == embedded["n_images"] == N_USED
    assert embedded["n_reused"] + embedded["n_computed"] == N_USED

    report = (own_run["run"] / "report.md").read_text()
    assert f"{N_USED} images used, 2 files left out (header 1, decode 1)" in report
    for path, reason in reasons.items():
        assert f"| {path} | {dict(EXPECTED_LEDGER)[path]} | {reason} |" in report
    split = pd.read_csv(own_run["run"] / "split_counts.csv", index_col=0)
    assert split.loc["total", "total"] == N_USED and split.loc["Hat", "total"] == PER_CATEGORY
    assert f"all {N_USED} images embedded" in report.split("## Backbones")[1].split("##")[0]
    prepare = json.loads((own_run["run"] / "prepare.json").read_text())
    assert (prepare["n_images"], prepare["n_skipped"]) == (N_USED, 2)


@pytest.mark.integration
def test_the_report_says_the_gallery_is_too_small_for_index_variants_and_collapses_equal_verdicts(own_run):
    assert own_run["pipeline"].returncode == 0, own_run["pipeline"].stderr[-3000:]
    report = (own_run["run"] / "report.md").read_text()
    index_section = report.split("## Index variants")[1].split("\n## ")[0]
    assert "The gallery holds only 8 vectors, too few for index variants to mean anything" in index_section
    assert "IVF1 is exhaustive search" in index_section
    verdicts = [line for line in report.split("## Verdicts")[1].split("\n## ")[0].splitlines() if line.startswith("- ")]
    metrics = [line.split(":")[0] for line in verdicts]
    assert len(verdicts) < 3 * 3, "one line per index and metric: equal verdicts were not collapsed"
    assert len(set(verdicts)) == len(verdicts) and len(metrics) >= 3


def test_two_weight_sets_of_one_architecture_never_share_cached_embeddings(tmp_path, color_folder, monkeypatch):
    module = tmp_path / "my_backbones.py"
    module.write_text(USER_MODULE.replace(USER_BACKBONE, "tiny_cnn_reseeded"))
    monkeypatch.setattr(registry, "BACKBONES", dict(registry.BACKBONES))
    registry.load_backbone_modules([module])
    user_module = next(m for name, m in sys.modules.items() if name.startswith("fashionrec_user_backbones_my_"))
    catalog = load_folder(color_folder, progress=False).catalog
    settings = InferenceSettings(workers=0, progress=False)

    first = registry.get_backbone("tiny_cnn_reseeded")
    monkeypatch.setattr(user_module, "SEED", [1])   # the user edits the seed (or swaps the checkpoint)
    second = registry.get_backbone("tiny_cnn_reseeded")
    assert first.weights_sha256 != second.weights_sha256 and first.cache_key != second.cache_key
    embedded_first = embed_catalog(catalog, first, settings)
    embedded_second = embed_catalog(catalog, second, settings)
    assert (embedded_second.n_reused, embedded_second.n_computed) == (0, len(catalog))
    assert not np.allclose(embedded_first.vectors, embedded_second.vectors)
    # The same weights again: the cache serves every image.
    monkeypatch.setattr(user_module, "SEED", [0])
    again = embed_catalog(catalog, registry.get_backbone("tiny_cnn_reseeded"), settings)
    assert (again.n_reused, again.n_computed) == (len(catalog), 0)
    assert np.array_equal(again.vectors, embedded_first.vectors)


def test_the_documented_example_backbone_registers_and_embeds(tmp_path, monkeypatch):
    documented = (REPO / "docs" / "custom-backbones.md").read_text()
    example = documented.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(example.strip().splitlines()) <= 16, "the example should stay short"
    (tmp_path / "my_backbones.py").write_text(example)
    monkeypatch.setattr(registry, "BACKBONES", dict(registry.BACKBONES))
    assert registry.load_backbone_modules([tmp_path / "my_backbones.py"]) == ["my_resnet18"]
    backbone = registry.get_backbone("my_resnet18")
    image = write_color_image(tmp_path / "shirt.jpg", (200, 30, 30), size=(300, 400))
    features = backbone.model(backbone.transform(load_image(image))[None])
    assert features.shape == (1, 512) and len(backbone.weights_sha256) == 64


@pytest.fixture
def shop(tmp_path) -> Path:
    return make_shop(tmp_path / "shop")


def _flat_folder(tmp_path: Path) -> Path:
    for i in range(4):
        write_color_image(tmp_path / "flat" / f"photo-{i}.jpg", (200, 30, 30))
    return tmp_path / "flat"


USER_ERRORS = {
    "unknown backbone": (lambda tmp, shop: ["--backbone", "colorhsit"],
                         "unknown backbone 'colorhsit' (did you mean 'colorhist'?)"),
    "missing backbone module": (lambda tmp, shop: ["--backbone-module", str(tmp / "mine.py")],
                                "mine.py: backbone module not found"),
    "missing category map": (lambda tmp, shop: ["--category-map", str(tmp / "map.yaml")],
                             "map.yaml: category map file not found"),
    "category map entry matching no label": (
        lambda tmp, shop: (tmp / "map.yaml").write_text("T-shirt: Tops\n")
        and ["--category-map", str(tmp / "map.yaml")],
        "'T-shirt' matches no label (did you mean 'T-Shirt'?)"),
    "k larger than the gallery": (lambda tmp, shop: ["--k", "50"],
                                  "k=50 does not fit this catalog: its gallery split holds 8 images"),
    "flat folder": (lambda tmp, shop: ["--data-dir", str(_flat_folder(tmp))],
                    "no usable images: its 4 files lie directly in it, but --dataset folder needs one sub-folder "
                    "per category"),
    "missing data dir": (lambda tmp, shop: ["--data-dir", str(tmp / "nowhere")],
                         "nowhere: no such directory (--data-dir for --dataset folder is one sub-folder per category"),
}


@pytest.mark.parametrize("case", USER_ERRORS)
def test_each_user_error_is_one_line_and_a_non_zero_exit_before_any_embedding(case, tmp_path, shop, capsys,
                                                                               monkeypatch):
    monkeypatch.setattr(config, "INTERIM_DIR", tmp_path / "interim")
    extra, message = USER_ERRORS[case]
    arguments = {"--dataset": "folder", "--data-dir": str(shop), "--backbone": "colorhist", "--k": "5"}
    extra = extra(tmp_path, shop)
    for flag, value in zip(extra[::2], extra[1::2]):
        arguments[flag] = value
    argv = ["evaluate", *[item for pair in arguments.items() for item in pair], "--quiet", "--json"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert not (config.INTERIM_DIR / "embeddings").exists(), "the error came after embedding"


def test_a_user_error_in_a_fresh_process_prints_no_traceback(tmp_path, shop):
    result = run_cli(["evaluate", "--dataset", "folder", "--data-dir", str(shop), "--backbone", "colorhist",
                      "--k", "50", "--quiet"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]


def test_embed_without_out_writes_under_results_and_says_where(tmp_path, shop):
    result = run_cli(["embed", "--dataset", "folder", "--data-dir", str(shop), "--backbone", "colorhist", "--json",
                      "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    expected = tmp_path / "results" / "embeddings" / "folder-shop"
    assert record["out_dir"] == str(expected) and Path(record["output"]) == expected / "colorhist.npy"
    assert (expected / "colorhist.npy").is_file() and (expected / "colorhist.parquet").is_file()
    assert str(expected / "colorhist.npy") in result.stderr
    assert _ledger(record["skipped"]) == EXPECTED_LEDGER
