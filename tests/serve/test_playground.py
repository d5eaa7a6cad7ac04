"""The playground page at ``/``, in a real browser: Debian's chromium driven by Playwright (never ``playwright
install``). It loads, shows the model card, generates 4 images of one class that decode to the model's size and
equal offline generation, shows the one-line reason of a bad setting, asks for the API key when the server needs
one, and fetches nothing from outside the server. Its controls come from the ``/v1/images`` request schema: one for
every run setting, the model's recommendations as placeholders, and only the settings the user set are sent."""

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
def server(model: Path, api_key: str | None = None, provider: str = "cpu"):
    """A real uvicorn server in a thread on a port bound here; yields its base URL."""
    import uvicorn

    pipeline = runtime.load(model, provider, threads=1, log=lambda m: None)
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


def test_the_page_on_openvino_shows_the_provider_and_precision(long_cond_onnx):
    pytest.importorskip("openvino", reason="needs the openvino extra")
    precision = runtime.load(long_cond_onnx, "openvino", log=lambda m: None).precision
    with server(long_cond_onnx, provider="openvino") as base, browser_page(base) as page:
        page.wait_for_selector("#card dl")
        assert f"openvino:CPU · {precision}" in page.inner_text("#card")
        page.select_option("#sampler", "ddim")
        page.fill("#steps", "5")
        page.fill("#n", "2")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#grid img').length === 2")
        assert page.script_errors == []


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


REQUEST_FIELDS = ("n", "class", "seed", "start_index", "format")  # the request's own fields; the rest are run settings
CONTROLS = """els => els.map(e => ({field: e.dataset.field, title: e.title, off: e.classList.contains('off'),
    controls: [...e.querySelectorAll('input, select')].map(c => ({tag: c.tagName.toLowerCase(), type: c.type,
        id: c.id, min: c.min, max: c.max, disabled: c.disabled, placeholder: c.placeholder,
        options: c.options ? [...c.options].map(o => [o.value, o.textContent]) : null}))}))"""


def request_schema(base: str) -> dict:
    import httpx

    document = httpx.get(f"{base}/openapi.json").json()
    ref = document["paths"]["/v1/images"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return document["components"]["schemas"][ref.rsplit("/", 1)[1]]


def without_null(prop: dict) -> dict:
    alternatives = [s for s in prop.get("anyOf", [prop]) if s.get("type") != "null"]
    assert len(alternatives) == 1, prop
    return alternatives[0]


def bound(value) -> str:
    return "" if value is None else f"{value:g}"


def test_the_controls_come_from_the_request_schema(long_cond_onnx):
    """A control for every run setting of the schema (its kind, bounds and help from the schema), the model's
    recommendations as placeholders, sampler-specific settings disabled for other samplers, and a request with a
    guidance interval and eta that sends exactly what was set and gets its images."""
    import httpx

    from runtime.sampling.settings import NAMES, applies

    with server(long_cond_onnx) as base, browser_page(base) as page:
        schema = request_schema(base)["properties"]
        settings = [name for name in schema if name not in REQUEST_FIELDS]
        assert set(settings) == set(NAMES), (settings, NAMES)
        recommended = httpx.get(f"{base}/v1/model").json()["recommended_settings"]
        page.wait_for_selector("#card dl")
        page.wait_for_selector("#settings label[data-field]")

        shown = {c["field"]: c for c in page.eval_on_selector_all("#settings label[data-field]", CONTROLS)}
        assert list(shown) == settings  # every run setting, in the schema's order, and nothing else
        for name in settings:
            prop, spec, c = schema[name], without_null(schema[name]), shown[name]
            assert c["title"].startswith(prop["description"]), (name, c["title"])
            kinds = [(x["tag"], x["type"]) for x in c["controls"]]
            if "enum" in spec or spec["type"] == "boolean":
                values = [str(v) for v in spec["enum"]] if "enum" in spec else ["true", "false"]
                assert kinds == [("select", "select-one")], (name, kinds)
                assert [v for v, _ in c["controls"][0]["options"]] == ["", *values], (name, c)
                assert c["controls"][0]["options"][0][1].startswith("model default") or c["off"], (name, c)
            elif spec["type"] in ("integer", "number"):
                assert kinds == [("input", "number")], (name, kinds)
                assert (c["controls"][0]["min"], c["controls"][0]["max"]) == (bound(prop.get("minimum")),
                                                                             bound(prop.get("maximum"))), (name, c)
            elif spec.get("maxItems") == spec["minItems"]:  # a fixed number: one number input each
                assert spec["type"] == "array", (name, spec)
                assert kinds == [("input", "number")] * spec["minItems"], (name, kinds)
            else:  # a list of any length: one text input, "a,b,c"
                assert spec["type"] == "array" and kinds == [("input", "text")], (name, spec, kinds)

        # the model's recommendations (ddim, 20 steps, w = 1.5) as placeholders and the empty option's label
        assert recommended["sampler"] == "ddim" and recommended["steps"] == 20 and recommended["guidance"] == 1.5
        assert shown["sampler"]["controls"][0]["options"][0][1] == "model default (ddim)"
        assert page.get_attribute("#steps", "placeholder") == "20"
        assert page.get_attribute("#guidance", "placeholder") == "1.5"
        for name, value in recommended.items():  # every scalar recommendation shows, where the setting applies
            c = shown[name]["controls"][0]
            if value is not None and not shown[name]["off"]:
                hint = c["options"][0][1] if c["options"] else c["placeholder"]
                want = f"{value:g}" if isinstance(value, float) else str(value).lower()
                if isinstance(value, list) and len(shown[name]["controls"]) == 1:  # a list in one text input
                    want = ",".join(map(str, value))
                assert want in hint, (name, value, hint)

        # a setting the page disables for a sampler is one that does not apply to it (eta: ddim only)
        samplers = [v for v, _ in shown["sampler"]["controls"][0]["options"] if v]
        for sampler in samplers:  # the schema's x-samplers: a setting is offered exactly where it applies
            page.select_option("#sampler", sampler)
            now = {c["field"]: c for c in page.eval_on_selector_all("#settings label[data-field]", CONTROLS)}
            for name in settings:
                off = now[name]["off"]
                assert off == all(x["disabled"] for x in now[name]["controls"]), (name, now[name])
                assert off != applies(name, sampler), f"{name} is {'off' if off else 'on'} for {sampler}"
        page.select_option("#sampler", "ddpm")
        assert page.is_disabled("#eta")
        page.select_option("#sampler", "ddim")
        assert page.is_enabled("#eta")

        # guidance interval and eta with ddim: sent as set, nothing else; the server takes them
        page.select_option("#class", label="beta")
        page.fill("#steps", "5")
        page.fill("#guidance", "2")
        page.fill("#eta", "0.5")
        interval = page.query_selector_all("#settings label[data-field=guidance_interval] input")
        interval[0].fill("200")
        interval[1].fill("700")
        page.fill("#seed", "3")
        page.fill("#n", "2")
        with page.expect_request(lambda r: r.url.endswith("/v1/images") and r.method == "POST") as sent:
            page.click("#generate")
        assert sent.value.post_data_json == {"n": 2, "seed": 3, "class": 1, "sampler": "ddim", "steps": 5,
                                             "guidance": 2, "eta": 0.5, "guidance_interval": [200, 700]}
        page.wait_for_selector("#status:has-text('2 images in')")
        assert "eta 0.5" in page.inner_text("#status") and "guidance_interval 200,700" in page.inner_text("#status")
        images = np.stack([decode(src) for src in page.eval_on_selector_all("#grid img", "els => els.map(e => e.src)")])
        want = runtime.load(long_cond_onnx, "cpu", log=lambda m: None).generate(
            2, seed=3, classes=1, sampler="ddim", steps=5, eta=0.5, guidance=2.0, guidance_interval=(200, 700))
        assert_images_close(images, want)

        # a disabled setting is not sent (eta under ddpm), and an emptied one is not either
        page.select_option("#sampler", "ddpm")
        interval[1].fill("")
        interval[0].fill("")
        page.fill("#guidance", "")
        page.fill("#n", "1")
        with page.expect_request(lambda r: r.url.endswith("/v1/images") and r.method == "POST") as sent:
            page.click("#generate")
        assert sent.value.post_data_json == {"n": 1, "seed": 3, "class": 1, "sampler": "ddpm", "steps": 5}
        page.wait_for_selector("#status:has-text('1 images in')")
        assert page.inner_text("#error") == ""

        # a multistep sampler below its warm-up: the server's one line shows
        page.select_option("#sampler", "dpmpp-3m")
        page.fill("#steps", "2")
        page.click("#generate")
        page.wait_for_function("document.getElementById('error').textContent.length > 0")
        assert page.inner_text("#error") == ("422: dpmpp-3m needs at least 3 steps "
                                             "(its first 2 warm up its history), got 2")
        assert page.script_errors == []
        assert all(url.startswith(base) or url.startswith("data:") for url in page.urls), page.urls
