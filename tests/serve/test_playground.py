"""The playground page at ``/``, in a real browser: Debian's chromium driven by Playwright (never ``playwright
install``). It loads, shows the model card, generates 4 images of one class that decode to the model's size and
equal offline generation, shows the one-line reason of a bad setting, asks for the API key when the server needs
one, and fetches nothing from outside the server."""

from __future__ import annotations

import base64
import io
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.serve.helpers import SERVE_MODULES

for _module in (*SERVE_MODULES, "playwright.sync_api"):
    pytest.importorskip(_module, reason="needs the serve and dev extras (playwright) and Debian's chromium")
CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("needs Debian's chromium (apt-get install -y chromium)", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402

import runtime  # noqa: E402
from serve.app import create_app  # noqa: E402
from serve.scheduler import Scheduler  # noqa: E402
from tests.serve.helpers import assert_images_close, wait_until  # noqa: E402


@contextmanager
def server(model: Path, api_key: str | None = None):
    """A real uvicorn server in a thread on a port bound here; yields its base URL."""
    import uvicorn

    pipeline = runtime.load(model, "cpu", threads=1, log=lambda m: None)
    app = create_app(Scheduler(pipeline), pipeline, api_key=api_key, max_images=16, deadline_s=60, grace_s=5)
    listener = socket.create_server(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: srv.started, what="uvicorn to start")
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(10)
        listener.close()


@contextmanager
def browser_page(base: str):
    """A chromium page that records every URL it asks for and every script error."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--headless", "--no-sandbox"])
        try:
            page = browser.new_page()
            page.urls, page.script_errors = [], []
            page.on("request", lambda r: page.urls.append(r.url))
            page.on("pageerror", lambda e: page.script_errors.append(str(e)))
            page.goto(f"{base}/")
            yield page
        finally:
            browser.close()


def decode(src: str) -> np.ndarray:
    assert src.startswith("data:image/png;base64,"), src[:40]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))
    return image[:, :, None] if image.ndim == 2 else image


def test_the_page_generates_images_of_one_class_and_shows_errors(long_cond_onnx, tmp_path):
    with server(long_cond_onnx) as base, browser_page(base) as page:
        page.wait_for_selector("#card dl")
        card = page.inner_text("#card")
        assert "16×16, 3 channels" in card and "alpha, beta, gamma" in card and "ddim" in card, card
        page.select_option("#class", label="beta")
        page.select_option("#sampler", "ddim")
        page.fill("#steps", "5")
        page.fill("#guidance", "2")
        page.fill("#seed", "7")
        page.fill("#n", "4")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#grid img').length === 4")
        page.wait_for_selector("#status:has-text('4 images in')")
        images = np.stack([decode(src) for src in page.eval_on_selector_all("#grid img", "els => els.map(e => e.src)")])
        assert images.shape == (4, 16, 16, 3)
        want = runtime.load(long_cond_onnx, "cpu", log=lambda m: None).generate(
            4, seed=7, classes=1, sampler="ddim", steps=5, guidance=2.0)
        assert_images_close(images, want)
        assert "beta" in page.inner_text("#grid")
        page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
        assert (tmp_path / "playground.png").stat().st_size > 1000

        page.fill("#steps", "5000")
        page.click("#generate")
        page.wait_for_function("document.getElementById('error').textContent.length > 0")
        assert page.inner_text("#error") == "422: steps must be between 1 and T = 1000, got 5000"
        assert page.eval_on_selector_all("#grid img", "els => els.length") == 4  # the last images stay
        assert page.script_errors == []
        assert all(url.startswith(base) or url.startswith("data:") for url in page.urls), page.urls


def test_the_page_asks_for_the_key_when_the_server_needs_one(long_cond_onnx):
    with server(long_cond_onnx, api_key="s3cret") as base, browser_page(base) as page:
        page.wait_for_selector("#keybox:not([hidden])")
        page.fill("#key", "s3cret")
        page.click("#usekey")
        page.wait_for_selector("#card dl")
        page.fill("#n", "1")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#grid img').length === 1")
        assert page.script_errors == []
