from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fashionrec.data.catalog import load_folder
from fashionrec.models.registry import get_backbone
from fashionrec.features.embed import embed_catalog
from fashionrec.features.files import load_embeddings, save_embeddings
from fashionrec.settings import InferenceSettings

from conftest import REPO, write_color_image

QUIET_SERIAL = InferenceSettings(batch_size=8, workers=0, progress=False)


@pytest.fixture(scope="module")
def colorhist():
    return get_backbone("colorhist")


def test_embeddings_follow_catalog_order_and_rerun_reuses_the_cache(color_folder, colorhist, tmp_path):
    catalog = load_folder(color_folder, progress=False).catalog
    first = embed_catalog(catalog, colorhist, QUIET_SERIAL)
    assert first.vectors.shape == (30, colorhist.dim)
    assert (first.n_computed, first.n_reused) == (30, 0)
    assert first.metadata["id"].tolist() == catalog["id"].tolist()
    # Colour histograms of solid colours: each image is nearest to its own colour.
    similarity = first.vectors @ first.vectors.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = first.metadata["label"].to_numpy()[similarity.argmax(axis=1)]
    assert (nearest == first.metadata["label"].to_numpy()).all()

    again = embed_catalog(catalog, colorhist, QUIET_SERIAL)
    assert (again.n_computed, again.n_reused) == (0, 30)
    assert np.array_equal(again.vectors, first.vectors)

    write_color_image(color_folder / "red" / "red-03.jpg", (250, 250, 0))
    changed = embed_catalog(catalog, colorhist, QUIET_SERIAL)
    assert (changed.n_computed, changed.n_reused) == (1, 29)
    row = catalog.index[catalog["id"] == "red/red-03.jpg"][0]
    assert not np.array_equal(changed.vectors[row], first.vectors[row])

    save_embeddings(changed, tmp_path / "out")
    vectors, metadata, info = load_embeddings(tmp_path / "out", "colorhist")
    assert np.array_equal(vectors, changed.vectors)
    assert metadata["id"].tolist() == changed.metadata["id"].tolist()
    assert info["n"] == 30 and info["backbone"] == "colorhist"

    headed = dataclasses.replace(changed, backbone="colorhist+head:runs/a b/head.pt")
    save_embeddings(headed, tmp_path / "out")
    vectors, _, info = load_embeddings(tmp_path / "out", headed.backbone)
    assert np.array_equal(vectors, changed.vectors) and info["backbone"] == headed.backbone
    assert sorted(p.name for p in (tmp_path / "out").glob("colorhist+head*")) == [
        "colorhist+head_runs_a_b_head.pt.json", "colorhist+head_runs_a_b_head.pt.npy",
        "colorhist+head_runs_a_b_head.pt.parquet"]


def test_an_image_that_no_longer_decodes_is_skipped_at_embedding_and_the_rest_embedded(color_folder, colorhist):
    loaded = load_folder(color_folder, progress=False)
    assert loaded.skipped == []
    # The file is cut after the catalog was checked: the header still passes, decoding fails.
    good = write_color_image(color_folder / "blue.jpg", (30, 40, 210), size=(400, 400)).read_bytes()
    (color_folder / "blue" / "blue-04.jpg").write_bytes(good[: len(good) // 2])
    result = embed_catalog(loaded.catalog, colorhist, InferenceSettings(workers=2, progress=False), root=color_folder)
    assert len(result.vectors) == 29
    assert [(entry["path"], entry["stage"]) for entry in result.skipped] == [("blue/blue-04.jpg", "embed")]
    assert "truncated" in result.skipped[0]["reason"] or "corrupt" in result.skipped[0]["reason"]
    assert result.n_computed + result.n_reused == len(result.vectors)


def _embed_command(data_dir: Path, out: Path):
    return [sys.executable, "-m", "fashionrec", "embed", "--dataset", "folder", "--data-dir", str(data_dir),
            "--backbone", "efficientnet_lite0", "--batch-size", "8", "--workers", "1", "--threads", "1",
            "--quiet", "--json", "--out", str(out)]


def _environment(data_root: Path) -> dict:
    return {**os.environ, "FASHIONREC_DATA": str(data_root), "FASHIONREC_SHARD_SIZE": "16",
            "PYTHONPATH": str(REPO / "lib")}


@pytest.mark.integration
def test_a_killed_run_resumes_and_ends_identical_to_an_uninterrupted_one(tmp_path):
    data_dir = tmp_path / "catalog"
    for i in range(96):
        color = ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)
        write_color_image(data_dir / f"c{i % 4}" / f"img-{i:03d}.jpg", color, size=(64, 64))

    reference = subprocess.run(_embed_command(data_dir, tmp_path / "reference"), env=_environment(tmp_path / "d1"),
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr

    interrupted_root = tmp_path / "d2"
    cache_root = interrupted_root / "interim" / "embeddings"
    process = subprocess.Popen(_embed_command(data_dir, tmp_path / "resumed"), env=_environment(interrupted_root),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(cache_root.glob("*/shard-*.npz"))) < 2:
        assert process.poll() is None, "the run finished before it could be killed; make it longer"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_shards = len(list(cache_root.glob("*/shard-*.npz")))
    assert 2 <= finished_shards < 6

    resumed = subprocess.run(_embed_command(data_dir, tmp_path / "resumed"), env=_environment(interrupted_root),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["n_embedded"] == 96
    assert report["n_reused"] == 16 * finished_shards
    assert report["n_computed"] == 96 - 16 * finished_shards

    expected, expected_metadata, _ = load_embeddings(tmp_path / "reference", "efficientnet_lite0")
    actual, actual_metadata, _ = load_embeddings(tmp_path / "resumed", "efficientnet_lite0")
    assert actual_metadata["id"].tolist() == expected_metadata["id"].tolist()
    assert np.array_equal(actual, expected), "resumed embeddings differ from the uninterrupted run"
