"""The Streamlit app: headless with AppTest, and once in a real browser (Debian's Chromium, driven by Playwright).

The index holds real photos: the clothing photos when present, else Fashion-MNIST (Debian's
dataset-fashion-mnist, which CI installs); a query photo comes from outside the index.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright
from streamlit.testing.v1 import AppTest

from fashionrec import Recommender
from fashionrec.data.catalog import load_fashion_mnist
from fashionrec.settings import InferenceSettings

from conftest import CLOTHING_DIR, REPO, data_dirs, fashion_mnist_available, session_data_root, small_head_model

APP = REPO / "app" / "streamlit_app.py"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = REPO / "results" / "app" / "recommend-screenshot.png"
RANKED = re.compile(r"^(\d+)\. (.+) · (-?\d+\.\d+)$")


@pytest.fixture(scope="module")
def app_index(request, tmp_path_factory):
    """(index folder, a real photo from outside it, the index's categories): as the app's default, a fine-tuned
    model with its category classifier and the folder's quality card."""
    outdir = tmp_path_factory.mktemp("app-index") / "index"
    with data_dirs(session_data_root(tmp_path_factory)):
        if (CLOTHING_DIR / "images.csv").exists():
            catalog, outside = request.getfixturevalue("clothing_photos")
            catalog, photo = catalog.iloc[:300], outside[0]
        elif fashion_mnist_available():
            loaded = load_fashion_mnist(max_per_class=21, progress=False).catalog
            is_query = loaded.groupby("label").cumcount() == 20
            catalog, photo = loaded[~is_query], loaded.loc[is_query, "path"].iloc[0]
        else:
            pytest.skip(f"no real photos: clothing photos not at {CLOTHING_DIR}, Debian's dataset-fashion-mnist not "
                        "installed")
        catalog = catalog[["id", "path", "label"]]
        model = small_head_model(catalog, outdir.parent / "head.pt")
        recommender = Recommender.build(outdir, catalog, model, settings=InferenceSettings(workers=0, progress=False),
                                        quality_split_seed=0)
    assert recommender.has_classifier and recommender.describe()["quality"]["n_queries"] > 0
    return outdir, photo, recommender.categories


def _app(monkeypatch, index_dir) -> AppTest:
    monkeypatch.setenv("FASHIONREC_INDEX_DIR", str(index_dir))
    return AppTest.from_file(str(APP), default_timeout=300)


def _ranked(at: AppTest) -> list[tuple[int, str, float]]:
    """(rank, label, score) of each result image in the grid."""
    results = []
    for image in at.image:
        for caption in image.captions:
            match = RANKED.match(caption)
            if match:
                results.append((int(match.group(1)), match.group(2), float(match.group(3))))
    return results


@pytest.mark.integration
def test_an_uploaded_photo_gives_a_grid_of_k_results_the_filter_and_more_like_this(app_index, monkeypatch):
    index_dir, photo, categories = app_index
    at = _app(monkeypatch, index_dir).run()
    assert not at.exception and "Upload a photo" in at.info[0].value
    sidebar = " ".join(block.value for block in at.sidebar.markdown)
    assert "model `efficientnet_lite0+head:" in sidebar and "with its category classifier" in sidebar
    assert re.search(r"\*\*Quality\*\*: P@10 \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] on \d+ held-out queries", sidebar)
    at.slider(key="k").set_value(6)
    at.file_uploader(key="upload").upload(Path(photo).name, Path(photo).read_bytes(), "image/jpeg").run()
    assert not at.exception and not at.error
    assert any(message.value.startswith("Looks like **") for message in at.success)
    ranked = _ranked(at)
    assert [rank for rank, _, _ in ranked] == [1, 2, 3, 4, 5, 6]
    scores = [score for _, _, score in ranked]
    assert scores == sorted(scores, reverse=True)
    assert any(caption == f"Query: {Path(photo).name}" for image in at.image for caption in image.captions)
    assert any(caption.value.startswith("Answered in ") for caption in at.caption)

    category = categories[0]
    at.selectbox(key="category").set_value(category).run()
    ranked = _ranked(at)
    assert len(ranked) == 6 and {label for _, label, _ in ranked} == {category}

    more = [button for button in at.button if (button.key or "").startswith("more-1-")]
    assert len([b for b in at.button if (b.key or "").startswith("more-")]) == 6
    clicked_id = more[0].key.split("-", 2)[2]
    more[0].click().run()
    assert not at.exception
    assert any(caption.startswith("Query: ") and caption.endswith(clicked_id) for image in at.image
               for caption in image.captions)
    first = _ranked(at)[0]
    assert first[1] == category and first[2] == pytest.approx(1.0, abs=1e-3)   # the item itself comes first


@pytest.mark.integration
def test_a_file_that_is_not_an_image_shows_a_message_and_the_app_keeps_working(app_index, monkeypatch):
    index_dir, photo, _ = app_index
    at = _app(monkeypatch, index_dir).run()
    at.file_uploader(key="upload").upload("notes.jpg", b"shopping list: socks, a hat", "image/jpeg").run()
    assert not at.exception
    assert "notes.jpg" in at.error[0].value and "not an image (looks like text)" in at.error[0].value
    at.file_uploader(key="upload").upload(Path(photo).name, Path(photo).read_bytes(), "image/jpeg").run()
    assert not at.exception and not at.error and len(_ranked(at)) == 8


def test_a_missing_index_says_how_to_build_one(tmp_path, monkeypatch):
    at = _app(monkeypatch, tmp_path / "nowhere").run()
    assert not at.exception
    assert "The index cannot be loaded" in at.error[0].value and "no such index folder" in at.error[0].value
    assert "python -m fashionrec index" in at.code[0].value and "make app" in at.code[0].value


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_healthy(url: str, server: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, "the Streamlit server exited before it was ready"
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the Streamlit server at {url} was not ready after {seconds} s")


@pytest.mark.integration
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium); "
                                                  ".ci/run installs it: apt-get install chromium")
def test_the_app_in_headless_chromium_shows_the_result_grid(app_index):
    index_dir, photo, _ = app_index
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # As `make app INDEX=... PORT=...` starts it.
    server = subprocess.Popen([sys.executable, "-m", "fashionrec", "app", "--index-dir", str(index_dir), "--port",
                               str(port)], env={**os.environ, "PYTHONPATH": str(REPO / "lib")},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_until_healthy(url, server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url, wait_until="domcontentloaded")
                page.wait_for_selector('[data-testid="stFileUploader"]', timeout=240_000)
                page.set_input_files('[data-testid="stFileUploader"] input[type="file"]', photo)
                page.wait_for_function(
                    """() => {
                        const images = [...document.querySelectorAll('[data-testid="stImage"] img')];
                        return images.length >= 9 && images.every(img => img.complete && img.naturalWidth > 0);
                    }""", timeout=240_000)
                captions = page.locator('[data-testid="stImageCaption"]').all_inner_texts()
                assert page.locator('[data-testid="stException"]').count() == 0
                sidebar = page.locator('[data-testid="stSidebar"]').inner_text()
                assert "with its category classifier" in sidebar and "Quality: P@10" in sidebar, sidebar
                assert "Looks like" in page.locator('[data-testid="stAlert"]').all_inner_texts()[-1]
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOT), full_page=True)
            finally:
                browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    ranked = [caption for caption in captions if RANKED.match(caption.strip())]
    assert len(ranked) == 8, captions   # the default k
    assert any(caption.strip() == f"Query: {Path(photo).name}" for caption in captions)
    pixels = np.asarray(Image.open(SCREENSHOT).convert("RGB"))
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000, "a blank or flat page"


@pytest.mark.integration
def test_a_version_saved_meanwhile_answers_the_next_query_and_is_named(app_index, monkeypatch, tmp_path):
    index_dir, photo, _ = app_index
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    at = _app(monkeypatch, copy).run()
    at.file_uploader(key="upload").upload(Path(photo).name, Path(photo).read_bytes(), "image/jpeg").run()
    assert any(caption.value.endswith("index version v000001") for caption in at.caption)
    first = next(b for b in at.button if (b.key or "").startswith("more-1-")).key.split("-", 2)[2]
    with Recommender.load(copy, InferenceSettings(workers=0, progress=False)) as writer:
        writer.remove([first])
        writer.save()
    at.run()
    assert not at.exception and not at.error
    assert any(caption.value.endswith("index version v000002") for caption in at.caption)
    assert not any((b.key or "").endswith(f"-{first}") for b in at.button if (b.key or "").startswith("more-"))
