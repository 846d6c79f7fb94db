"""The protocol of record through either vector store: same keys, same ranking, same numbers.

``python -m fashionrec evaluate ... --store milvus --milvus-uri PATH --json`` runs against a
real Milvus Lite file; the clothing photos run when they are present, a generated catalog
always.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fashionrec.evaluation.protocol import evaluate_embeddings
from fashionrec.indexing.milvus_store import MilvusStore, list_collections
from fashionrec.settings import StoreSettings

from conftest import REPO, write_color_image

PRECISION_TOLERANCE = 0.005


def _evaluate(arguments: list[str], tmp_path: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO / "lib"), "FASHIONREC_DATA": str(tmp_path / "data"),
                   "FASHIONREC_RESULTS": str(tmp_path / "results")}
    return subprocess.run([sys.executable, "-m", "fashionrec", "evaluate", *arguments, "--json", "--quiet"],
                          capture_output=True, text=True, env=environment, timeout=timeout)


def _both_stores(common: list[str], tmp_path: Path) -> tuple[dict, dict]:
    faiss_run = _evaluate(common, tmp_path)
    assert faiss_run.returncode == 0, faiss_run.stderr
    milvus_run = _evaluate([*common, "--store", "milvus", "--milvus-uri", str(tmp_path / "milvus.db")], tmp_path)
    assert milvus_run.returncode == 0, milvus_run.stderr
    return json.loads(faiss_run.stdout), json.loads(milvus_run.stdout)


def _assert_same_evaluation(faiss_record: dict, milvus_record: dict) -> None:
    assert sorted(faiss_record) == sorted(milvus_record)
    assert (faiss_record["store"], milvus_record["store"]) == ("faiss", "milvus")
    assert abs(faiss_record["precision_at_k"] - milvus_record["precision_at_k"]) <= PRECISION_TOLERANCE
    for key in ("n_queries", "n_gallery", "k", "index", "dataset_fingerprint", "backbone_cache_key"):
        assert faiss_record[key] == milvus_record[key], key


def test_evaluate_embeddings_ranks_identically_through_faiss_and_milvus(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array(["Hat", 'say "hi"', "ünï"])[rng.integers(0, 3, 300)]
    centres = {label: rng.normal(0, 1, 16) for label in set(labels)}
    vectors = np.stack([centres[label] + rng.normal(0, 0.8, 16) for label in labels]).astype(np.float32)
    metadata = pd.DataFrame({"id": [f"i{n}" for n in range(300)], "label": labels,
                             "split": np.where(np.arange(300) % 3 == 0, "query", "gallery")})
    with_faiss = evaluate_embeddings(vectors, metadata, k=10)
    with_milvus = evaluate_embeddings(vectors, metadata, k=10, store=StoreSettings("milvus", str(tmp_path / "m.db")))
    assert np.array_equal(with_faiss.result_positions, with_milvus.result_positions)
    assert np.allclose(with_faiss.result_scores, with_milvus.result_scores, atol=1e-5)
    assert with_faiss.summary == with_milvus.summary
    assert list_collections(tmp_path / "m.db") == []  # the throwaway gallery collection was dropped


@pytest.fixture
def generated_catalog(tmp_path) -> Path:
    """Four colour categories, two of them close (orange, red), 25 photos each."""
    root = tmp_path / "catalog"
    colours = {"red": (200, 40, 40), "orange": (215, 90, 40), "green": (40, 170, 60), "blue": (40, 60, 200)}
    for label, colour in colours.items():
        for i in range(25):
            write_color_image(root / label / f"{label}-{i:02d}.jpg", colour, size=(40, 48))
    return root


def test_cli_evaluate_prints_the_same_keys_and_precision_with_milvus_on_a_generated_catalog(generated_catalog,
                                                                                          tmp_path):
    common = ["--dataset", "folder", "--data-dir", str(generated_catalog), "--backbone", "colorhist",
              "--index", "Flat", "--k", "5"]
    faiss_record, milvus_record = _both_stores(common, tmp_path)
    _assert_same_evaluation(faiss_record, milvus_record)
    assert faiss_record["precision_at_k"] == milvus_record["precision_at_k"]


def test_cli_store_mistakes_end_in_one_line_before_any_data_is_read(tmp_path):
    missing = ["--dataset", "folder", "--data-dir", str(tmp_path / "no-such-dir"), "--backbone", "colorhist"]
    cases = {
        "applies only with --store milvus": ["--milvus-uri", str(tmp_path / "m.db")],
        "no Milvus counterpart": ["--store", "milvus", "--milvus-uri", str(tmp_path / "m.db"),
                                  "--index", "IVF{nlist},PQ{m}"],
        "cannot build IVF_PQ": ["--store", "milvus", "--milvus-uri", str(tmp_path / "m.db"), "--index", "IVF_PQ"],
    }
    with MilvusStore(str(tmp_path / "held.db"), "items"):
        cases["one process at a time"] = ["--store", "milvus", "--milvus-uri", str(tmp_path / "held.db")]
        for expected, arguments in cases.items():
            result = _evaluate([*missing, *arguments], tmp_path, timeout=300)
            assert result.returncode == 2, (expected, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], (expected, lines)


@pytest.mark.integration
def test_cli_evaluate_on_the_clothing_photos_matches_faiss_flat_through_milvus_lite(clothing_dir, tmp_path):
    common = ["--dataset", "clothing", "--data-dir", str(clothing_dir), "--backbone", "efficientnet_lite0",
              "--index", "Flat", "--k", "10"]
    faiss_record, milvus_record = _both_stores(common, tmp_path)
    _assert_same_evaluation(faiss_record, milvus_record)
    assert faiss_record["n_gallery"] > 1000
