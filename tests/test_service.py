"""The HTTP service: routes, the token, hostile input, catalog writes under load, a killed server.

Every server here is a real ``python -m fashionrec serve`` process on 127.0.0.1, started by the
test and stopped when it ends, also when it fails. Catalogs are small generated ones (real
Lite0 embeddings through ONNX Runtime); the big load runs are in ``benchmarks/serve_load.py``.
"""
from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import httpx
import numpy as np
import pytest

from fashionrec import Recommender
from fashionrec.cli import main
from fashionrec.settings import InferenceSettings

from conftest import REPO, data_dirs, link_generated_catalog, session_data_root
from test_images import BAD, png_claiming_size

TOKEN = "test-token-7f3a"
RESULT_KEYS = {"id", "label", "score", "image_url"}
QUIET = InferenceSettings(batch_size=16, workers=0, progress=False)

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(index_dir: Path, data_root: Path, token: str | None = TOKEN, *extra: str,
                   start_timeout: float = 120, stop_timeout: float = 10):
    """A ``serve`` process on 127.0.0.1 until the block ends (SIGTERM, then SIGKILL); yields (url, process)."""
    port = _free_port()
    env = {**os.environ, "FASHIONREC_DATA": str(data_root), "PYTHONPATH": str(REPO / "lib")}
    env.pop("FASHIONREC_API_TOKEN", None)
    if token:
        env["FASHIONREC_API_TOKEN"] = token
    log = open(data_root.parent / f"serve-{port}.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "fashionrec", "serve", "--index-dir", str(index_dir),
                                "--port", str(port), "--watch-s", "0.2", *extra], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            assert process.poll() is None, Path(log.name).read_text()[-2000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"the server did not answer /health within {start_timeout} s"
            time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return session_data_root(tmp_path_factory)


@pytest.fixture(scope="module")
def built(generated_photos, data_root, tmp_path_factory):
    """An HNSW32 Lite0 folder of 64 generated photos (ids: paths relative to the catalog folder)."""
    folder = link_generated_catalog(generated_photos, tmp_path_factory.mktemp("service-catalog"), 64)
    outdir = tmp_path_factory.mktemp("service-index") / "index"
    with data_dirs(data_root):
        assert main(["index", "--dataset", "folder", "--data-dir", str(folder), "--backbone", "efficientnet_lite0",
                     "--index", "HNSW32", "--out", str(outdir), "--quiet", "--workers", "0"]) == 0
    return outdir


@pytest.fixture(scope="module")
def server(built, data_root):
    with running_server(built, data_root) as (url, _):
        yield url


def _recommend(client: httpx.Client, url: str, photo: Path | bytes, name="photo.jpg", **fields):
    data = photo.read_bytes() if isinstance(photo, Path) else photo
    return client.post(url + "/recommend", files={"image": (name, data, "image/jpeg")},
                       data={key: str(value) for key, value in fields.items()}, timeout=60)


def _ask_at_once(url: str, photos: list, n: int) -> list[dict]:
    """The answers to ``n`` recommend requests sent together from ``n`` threads (photo i: ``photos[i % len]``)."""
    answers = [None] * n

    def ask(i):
        with httpx.Client() as own:
            answers[i] = _recommend(own, url, Path(photos[i % len(photos)]), k=5).json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def _no_server_path(text: str, *folders: Path) -> None:
    for folder in (*folders, REPO, Path.home()):
        assert str(folder) not in text and str(folder.resolve()) not in text, text
    assert "/tmp/" not in text, text


def test_routes_answer_from_one_named_version_without_server_paths(server, built, generated_photos, tmp_path):
    _, outside, _ = generated_photos
    with httpx.Client() as client:
        answer = _recommend(client, server, Path(outside[0]), k=5)
        assert answer.status_code == 200, answer.text
        record = answer.json()
        assert record["index_version"] == "v000001" and set(record["timing_ms"]) >= {"decode", "embed", "search"}
        assert len(record["results"]) == 5 and all(set(item) == RESULT_KEYS for item in record["results"])
        scores = [item["score"] for item in record["results"]]
        assert scores == sorted(scores, reverse=True)
        in_process = Recommender.load(built, QUIET).recommend(outside[0], k=5)
        assert [item["id"] for item in record["results"]] == [item.id for item in in_process.results]
        np.testing.assert_allclose(scores, [item.score for item in in_process.results], atol=1e-4)

        first = record["results"][0]
        image = client.get(server + first["image_url"])
        assert image.status_code == 200 and image.content == Path(in_process.results[0].path).read_bytes()
        item = client.get(f"{server}/items/{first['id']}").json()
        assert item == {"id": first["id"], "label": first["label"], "image_url": first["image_url"],
                        "index_version": "v000001"}
        similar = client.get(f"{server}/items/{first['id']}/similar", params={"k": 3}).json()
        assert similar["results"][0]["id"] == first["id"] and len(similar["results"]) == 3
        health = client.get(server + "/health").json()
        assert health == {"status": "ok", "index_version": "v000001", "items": 64}
        assert client.get(server + "/docs").status_code == 200
        assert {"/recommend", "/items/{item_id}", "/health"} <= set(client.get(server + "/openapi.json").json()["paths"])

        failures = [client.get(f"{server}/items/no-such-id"), client.get(f"{server}/items/no-such-id/similar"),
                    _recommend(client, server, Path(outside[0]), k=3, category="no such category"),
                    _recommend(client, server, b"not an image", k=3), client.get(server + "/no/such/route")]
        assert [failure.status_code for failure in failures] == [404, 404, 400, 422, 404]
        assert all(set(failure.json()) == {"error"} and "\n" not in failure.json()["error"] for failure in failures)
        for response in [answer, item_response := client.get(f"{server}/items/{first['id']}"), *failures]:
            _no_server_path(response.text, built, tmp_path)
        assert item_response.status_code == 200
        metrics = client.get(server + "/metrics").text
    assert 'fashionrec_requests_total{method="POST",route="/recommend",status="200"}' in metrics
    assert 'fashionrec_stage_seconds_count{stage="embed"}' in metrics and "fashionrec_batch_size_count" in metrics
    assert "fashionrec_index_version 1.0" in metrics and "fashionrec_index_items 64.0" in metrics


def test_an_onnx_folder_is_served_without_pytorch_until_an_item_is_added(built, generated_photos, data_root):
    """Answering from an ONNX folder (the Recommender, ``recommend``, the HTTP app) imports neither torch nor
    torchvision; adding an item embeds it by the batch path the folder was built with, which loads them then."""
    _, outside, _ = generated_photos
    script = f"""
import contextlib, io, json, sys
from fastapi.testclient import TestClient
from fashionrec import Recommender
from fashionrec.cli import main
from fashionrec.service.app import create_app
from fashionrec.service.catalog import ServedIndex

def loaded():
    return sorted({{name.split(".")[0] for name in sys.modules}} & {{"torch", "torchvision"}})

recommender = Recommender.load({str(built)!r})
answer = recommender.recommend({str(outside[0])!r}, k=3)
with contextlib.redirect_stdout(io.StringIO()) as printed:
    assert main(["recommend", "--index-dir", {str(built)!r}, "--image", {str(outside[0])!r}, "--k", "3", "--json"]) == 0
assert [item["id"] for item in json.loads(printed.getvalue())["results"]] == [item.id for item in answer.results]
with TestClient(create_app(ServedIndex({str(built)!r}), watch_interval_s=None)) as client, \\
        open({str(outside[0])!r}, "rb") as photo:
    response = client.post("/recommend", files={{"image": ("photo.jpg", photo, "image/jpeg")}}, data={{"k": "3"}})
assert response.status_code == 200, response.text
assert [item["id"] for item in response.json()["results"]] == [item.id for item in answer.results]
assert loaded() == [], loaded()
assert recommender.add([{str(outside[1])!r}], ["Shirt"]).added
assert loaded() == ["torch", "torchvision"], loaded()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "FASHIONREC_DATA": str(data_root), "PYTHONPATH": str(REPO / "lib")})
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_new_version_shares_the_query_model_and_the_old_one_goes_at_once(built, tmp_path):
    """The next version, loaded beside the one serving, shares its query model (no second ONNX session per
    write), and the old version is freed when its last user lets go, not when the cyclic collector runs."""
    folder = tmp_path / "index"
    shutil.copytree(built, folder)
    serving = Recommender.load(folder, QUIET, spinning=False)
    writer = Recommender.load(folder, QUIET, spinning=False, reuse=serving)
    assert writer.query_encoder is serving.query_encoder
    writer.remove([writer.ids[0]])
    writer.save()
    fresh = Recommender.load(folder, QUIET, spinning=False, reuse=serving)
    assert (fresh.version, fresh.query_encoder) == ("v000002", serving.query_encoder)
    gone = weakref.ref(serving)
    gc.disable()
    try:
        del serving
        assert gone() is None
    finally:
        gc.enable()


def test_concurrent_queries_are_embedded_in_batches_with_the_same_answers(server, generated_photos):
    _, outside, _ = generated_photos
    with httpx.Client() as client:
        alone = [_recommend(client, server, Path(photo), k=5).json() for photo in outside]
        before = _batch_counts(client.get(server + "/metrics").text)
        answers = _ask_at_once(server, outside, 32)
        after = _batch_counts(client.get(server + "/metrics").text)
    for i, answer in enumerate(answers):
        expected = alone[i % len(outside)]
        assert [item["id"] for item in answer["results"]] == [item["id"] for item in expected["results"]]
        np.testing.assert_allclose([item["score"] for item in answer["results"]],
                                   [item["score"] for item in expected["results"]], atol=1e-5)
    photos, batches = after[0] - before[0], after[1] - before[1]
    assert photos == 32 and batches < 32   # some photos shared a batch


def _batch_counts(metrics: str) -> tuple[float, float]:
    values = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("fashionrec_batch_size_"))
    return float(values["fashionrec_batch_size_sum"]), float(values["fashionrec_batch_size_count"])


def test_write_routes_need_the_token(server, built, data_root):
    with httpx.Client() as client:
        assert client.delete(f"{server}/items/anything").status_code == 401
        wrong = client.post(server + "/reload", headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert client.post(server + "/reload", headers={"Authorization": f"Bearer {TOKEN}"}).json() == {
            "reloaded": False, "index_version": "v000001"}
    with running_server(built, data_root, None) as (url, _), httpx.Client() as client:
        for response in (client.delete(f"{url}/items/anything", headers={"Authorization": f"Bearer {TOKEN}"}),
                         client.post(url + "/reload"),
                         client.post(url + "/items", files={"photos": ("a.jpg", b"x")}, data={"labels": "x"})):
            assert response.status_code == 403 and "FASHIONREC_API_TOKEN" in response.json()["error"]


def test_hostile_input_gets_4xx_and_the_server_keeps_answering(server, built, generated_photos, tmp_path):
    _, outside, _ = generated_photos
    uploads = {name: case for name, case in BAD.items() if not name.startswith("filesystem/")}
    rng = np.random.default_rng(0)
    answers = []
    with httpx.Client() as client:
        for name, case in uploads.items():
            path = tmp_path / name.replace("/", "-")
            case.write(path)
            answers.append((name, _recommend(client, server, path, name=path.name, k=3)))
        bomb = _recommend(client, server, png_claiming_size(20_000, 20_000), name="bomb.png", k=3)
        assert bomb.status_code == 422 and "decompression bomb" in bomb.json()["error"]
        answers.append(("bomb", bomb))
        answers.append(("50 MB", _recommend(client, server, b"\xff\xd8" + bytes(50 * 1024 * 1024), k=3)))
        assert answers[-1][1].status_code == 413
        answers.append(("json", client.post(server + "/recommend", json={"image": "x"})))
        answers.append(("no body", client.post(server + "/recommend")))
        for k in (0, 101, "many"):
            answers.append((f"k={k}", _recommend(client, server, Path(outside[0]), k=k)))
        answers.append(("colour", _recommend(client, server, Path(outside[0]), colour_weight=2)))
        answers.append(("exclude", _recommend(client, server, Path(outside[0]), exclude_id="nope")))
        for i in range(50):
            answers.append((f"random {i}", _recommend(client, server, rng.bytes(int(rng.integers(0, 5000))))))
        for name, answer in answers:
            assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text)
            assert set(answer.json()) == {"error"}, (name, answer.text)
            _no_server_path(answer.text, built, tmp_path)
        assert _recommend(client, server, Path(outside[0]), k=3).status_code == 200


def _catalog_photos(generated_photos, start: int, count: int) -> list[Path]:
    catalog, _, _ = generated_photos
    return [Path(path) for path in catalog["path"].iloc[start:start + count]]


def test_writes_and_an_outside_update_under_load_fail_no_query(built, generated_photos, data_root, tmp_path):
    """Adds and removes through the API and one ``index --update`` from another process, queries running meanwhile."""
    outdir = tmp_path / "index"
    shutil.copytree(built, outdir, symlinks=True)
    _, outside, _ = generated_photos
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with running_server(outdir, data_root) as (url, _):
        stop, answers, errors = threading.Event(), [], []

        def query():
            with httpx.Client() as client:
                while not stop.is_set():
                    response = _recommend(client, url, Path(outside[len(answers) % len(outside)]), k=5)
                    (answers if response.status_code == 200 else errors).append(response)

        load = [threading.Thread(target=query) for _ in range(4)]
        for thread in load:
            thread.start()
        try:
            with httpx.Client(headers=auth, timeout=120) as client:
                added = []
                for photo in _catalog_photos(generated_photos, 100, 6):
                    response = client.post(url + "/items", files={"photos": (photo.name, photo.read_bytes())},
                                           data={"labels": photo.parent.name, "ids": f"new-{photo.stem}"})
                    assert response.status_code == 200, response.text
                    added += response.json()["added"]
                removed = [item["id"] for item in _recommend(client, url, Path(outside[1]), k=4).json()["results"]]
                for item_id in removed:
                    assert client.delete(f"{url}/items/{item_id}").status_code == 200
                assert client.delete(f"{url}/items/{removed[0]}").status_code == 404
                update_dir = tmp_path / "more"
                update_dir.mkdir()
                for photo in _catalog_photos(generated_photos, 120, 3):   # an ImageFolder: one sub-folder per category
                    (update_dir / photo.parent.name).mkdir(exist_ok=True)
                    shutil.copy(photo, update_dir / photo.parent.name / photo.name)
                env = {**os.environ, "FASHIONREC_DATA": str(data_root), "PYTHONPATH": str(REPO / "lib")}
                update = subprocess.run([sys.executable, "-m", "fashionrec", "index", "--update", str(outdir), "--add",
                                         str(update_dir), "--quiet", "--workers", "0"], env=env, capture_output=True)
                assert update.returncode == 0, update.stderr.decode()[-2000:]
                on_disk = (outdir / "CURRENT").read_text().strip()
                deadline = time.monotonic() + 30
                while client.get(url + "/health").json()["index_version"] != on_disk:
                    assert time.monotonic() < deadline, "the outside update was not picked up"
                    time.sleep(0.1)
        finally:
            stop.set()
            for thread in load:
                thread.join()
        health = httpx.get(url + "/health").json()
    assert not errors, [error.text for error in errors[:3]]
    assert answers and all(answer.json()["index_version"].startswith("v") for answer in answers)
    assert len({answer.json()["index_version"] for answer in answers}) > 1   # queries ran across versions
    final = Recommender.load(outdir, QUIET)
    assert health["items"] == len(final) == 64 + len(added) - len(removed) + 3
    assert set(added) <= set(final.ids) and not set(removed) & set(final.ids)
    rebuilt = Recommender.build(tmp_path / "rebuilt", final.catalog, "efficientnet_lite0", index="HNSW32",
                                settings=QUIET)
    assert rebuilt.ids == final.ids


def test_a_server_killed_during_an_update_leaves_a_folder_it_loads_again(built, generated_photos, data_root,
                                                                          tmp_path):
    outdir = tmp_path / "index"
    shutil.copytree(built, outdir, symlinks=True)
    photos = _catalog_photos(generated_photos, 140, 12)
    with running_server(outdir, data_root) as (url, process):
        def add():
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(url + "/items", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120,
                           files=[("photos", (photo.name, photo.read_bytes())) for photo in photos],
                           data={"labels": "box"})

        writer = threading.Thread(target=add)
        writer.start()
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".partial-") for p in outdir.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        writer.join()
    with running_server(outdir, data_root) as (url, _):
        health = httpx.get(url + "/health").json()
    assert health["items"] in (64, 64 + len(photos)) and health["index_version"] == (outdir / "CURRENT").read_text().strip()


def test_a_loaded_recommender_refreshes_to_a_version_saved_elsewhere(built, generated_photos, tmp_path):
    outdir = tmp_path / "index"
    shutil.copytree(built, outdir, symlinks=True)
    _, outside, _ = generated_photos
    reader = Recommender.load(outdir, QUIET)
    before = reader.recommend(outside[0], k=3)
    assert before.index_version == "v000001" and not reader.refresh()
    with Recommender.load(outdir, QUIET) as writer:
        writer.remove([before.results[0].id])
        writer.save()
    assert reader.recommend(outside[0], k=3).index_version == "v000001"   # until it refreshes
    assert reader.refresh() and reader.version == "v000002" and len(reader) == 63
    after = reader.recommend(outside[0], k=3)
    assert after.index_version == "v000002" and before.results[0].id not in [item.id for item in after.results]
    assert [item.id for item in after.results] == [item.id for item in before.results[1:3]] + [after.results[2].id]
    assert reader.similar_to(after.results[0].id, k=2).index_version == "v000002"


def test_ray_serve_gives_the_same_answers(server, built, generated_photos, data_root):
    """``--engine ray`` on a local Ray cluster that the server process starts and stops."""
    pytest.importorskip("ray.serve", reason="Ray Serve's extras are not installed (pip install 'ray[serve]')")
    _, outside, _ = generated_photos
    with running_server(built, data_root, TOKEN, "--engine", "ray", "--replicas", "1", start_timeout=300,
                        stop_timeout=120) as (url, _), httpx.Client() as client:
        answers = _ask_at_once(url, outside, 8)
        assert client.get(url + "/health").json() == {"status": "ok", "index_version": "v000001", "items": 64}
        assert _recommend(client, url, b"not an image", k=3).status_code == 422
        assert client.delete(f"{url}/items/x").status_code == 401
        metrics = client.get(url + "/metrics").text
    for i, answer in enumerate(answers):
        expected = _recommend(httpx, server, Path(outside[i % len(outside)]), k=5).json()
        assert [item["id"] for item in answer["results"]] == [item["id"] for item in expected["results"]]
        np.testing.assert_allclose([item["score"] for item in answer["results"]],
                                   [item["score"] for item in expected["results"]], atol=1e-5)
        assert answer["index_version"] == "v000001"
    assert 'route="/recommend",status="200"' in metrics
