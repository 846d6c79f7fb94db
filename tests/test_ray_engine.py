"""Batch embedding on Ray Data, on a real local Ray cluster (2 CPUs, 127.0.0.1 only).

The cluster starts once for the session (Ray is heavy on a small machine) and is always
shut down; its workers get the session's isolated data directory, so they find the ONNX
export the driver made and write nothing outside the test tree.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import psutil
import pytest

from fashionrec.data.catalog import load_folder
from fashionrec.features.embed import embed_catalog
from fashionrec.features.ray_engine import ray_session
from fashionrec.models.registry import get_backbone
from fashionrec.models.runtime import with_runtime
from fashionrec.settings import InferenceSettings

from conftest import REPO, write_color_image

pytestmark = pytest.mark.integration  # a Ray cluster and a real model: slower than unit tests

RELATIVE_TOLERANCE = 1e-5
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")
DASHBOARD_PORT = 8265


@pytest.fixture(scope="session")
def local_ray(tmp_path_factory):
    """A 2-CPU Ray cluster for the whole session, started through the engine's own ray_session."""
    workers_data = tmp_path_factory.getbasetemp() / "fashionrec-data"  # the isolated_data_dirs root
    with ray_session(num_cpus=2, worker_env={"FASHIONREC_DATA": str(workers_data)}):
        import ray

        yield ray.get_runtime_context().gcs_address


@pytest.fixture
def shop(tmp_path):
    root = tmp_path / "shop"
    for label, colour in (("red", (200, 40, 40)), ("green", (40, 170, 60)), ("blue", (40, 60, 200))):
        for i in range(5):
            write_color_image(root / label / f"{label}-{i}.jpg", colour, size=(90 + 20 * i, 120))
    return root


def _cut(path):
    """Keep the header, lose half the pixel data: the file opens but does not decode."""
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])


def test_ray_embeddings_equal_the_in_process_ones_and_a_bad_file_is_reported(local_ray, shop, tmp_path):
    loaded = load_folder(shop, progress=False)
    _cut(shop / "blue" / "blue-3.jpg")  # after the catalog was checked: the embedding job meets it
    backbone = with_runtime(get_backbone("efficientnet_lite0"), "onnx", threads=1)
    settings = InferenceSettings(batch_size=4, workers=1, threads=1, progress=False)
    local = embed_catalog(loaded.catalog, backbone, settings, cache_dir=tmp_path / "local", root=loaded.root)
    on_ray = embed_catalog(loaded.catalog, backbone, settings.but(engine="ray"), cache_dir=tmp_path / "ray",
                           root=loaded.root)
    assert on_ray.n_computed == local.n_computed == 14
    assert on_ray.metadata["id"].tolist() == local.metadata["id"].tolist()
    relative = np.abs(on_ray.vectors - local.vectors).max() / np.abs(local.vectors).max()
    assert relative <= RELATIVE_TOLERANCE
    assert on_ray.skipped == local.skipped
    assert [(entry["path"], entry["stage"]) for entry in on_ray.skipped] == [("blue/blue-3.jpg", "embed")]
    # The same content-addressed cache: the same shard files, and each engine's cache serves the other's job.
    shards = {engine: sorted(p.name for p in (tmp_path / engine).glob("*.npz")) for engine in ("local", "ray")}
    assert shards["ray"] == shards["local"]
    reused = embed_catalog(loaded.catalog, backbone, settings, cache_dir=tmp_path / "ray", root=loaded.root)
    assert (reused.n_computed, reused.n_reused) == (0, 14) and np.array_equal(reused.vectors, on_ray.vectors)


def test_cli_embed_runs_on_a_cluster_by_address_and_reports_like_the_local_engine(local_ray, shop, tmp_path):
    _cut(shop / "green" / "green-1.jpg")  # left out when the catalog is checked, before any engine runs

    def embed(engine: list[str], data_dir) -> dict:
        result = subprocess.run(
            [sys.executable, "-m", "fashionrec", "embed", "--dataset", "folder", "--data-dir", str(shop),
             "--backbone", "efficientnet_lite0", "--batch-size", "4", "--threads", "1", "--workers", "1",
             "--quiet", "--json", "--out", str(data_dir / "out"), *engine],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "PYTHONPATH": str(REPO / "lib"), "FASHIONREC_DATA": str(data_dir)})
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    on_cluster = embed(["--engine", "ray", "--ray-address", local_ray], tmp_path / "ray-data")
    local = embed([], tmp_path / "local-data")
    assert on_cluster["engine"] == "ray" and local["engine"] == "local"
    for key in ("n_embedded", "n_computed", "skipped", "weights_sha256", "dim"):
        assert on_cluster[key] == local[key], key
    assert on_cluster["n_embedded"] == 14
    assert [entry["path"] for entry in on_cluster["skipped"]] == ["green/green-1.jpg"]


def test_the_local_cluster_listens_on_loopback_only_and_serves_no_dashboard(local_ray):
    ray_processes = [psutil.Process()] + psutil.Process().children(recursive=True)
    listening = [(process.name(), connection.laddr.ip, connection.laddr.port)
                 for process in ray_processes for connection in _listening(process)]
    assert listening, "no listening socket found: the check would prove nothing"
    assert [entry for entry in listening if entry[1] not in LOOPBACK] == []
    assert DASHBOARD_PORT not in {port for _, _, port in listening}


def _listening(process: psutil.Process):
    try:
        return [c for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
