"""The HTTP app over a real Scheduler: images equal offline generation, requests of any settings share a batch,
cancellation (deadline, client gone) frees the batch, 429/413/422/503, NaN confined to its request, metrics."""

from __future__ import annotations

import io
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.serve.helpers import SERVE_MODULES

for _module in SERVE_MODULES:
    pytest.importorskip(_module, reason="needs the serve extra: pip install -e '.[serve,dev]'")

import runtime  # noqa: E402
from runtime.sampling.settings import SAMPLERS  # noqa: E402
from serve.app import begin_shutdown, create_app  # noqa: E402
from serve.scheduler import Scheduler  # noqa: E402
from tests.serve.helpers import CLASS_NAMES, assert_images_close, decode, wait_until  # noqa: E402


def offline(model, n: int, **settings) -> np.ndarray:
    return runtime.load(model, "cpu", threads=1, log=lambda m: None).generate(n, **settings)


def in_flight(scheduler) -> int:
    return scheduler.stats()["images_in_flight"]


@pytest.mark.parametrize("batching", [True, False])
def test_images_and_metadata_equal_offline_generation(serving, long_cond_onnx, batching):
    client, _, _ = serving(long_cond_onnx, batching=batching)
    settings = dict(sampler="ddpm", steps=30, guidance=2.0, seed=7, start_index=2)
    r = client.post("/v1/images", json={"n": 4, **settings})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_images_close(decode(body), offline(long_cond_onnx, 4, **settings))
    g = runtime.load(long_cond_onnx, "cpu", log=lambda m: None)
    assert body["model_sha256"] == g.sha256
    assert body["settings"] == g.plan(sampler="ddpm", steps=30, guidance=2.0).run_settings()
    assert [(i["index"], i["seed"], i["class"], i["class_name"]) for i in body["images"]] == [
        (k, 7, k % 3, CLASS_NAMES[k % 3]) for k in range(2, 6)]

    # nothing given: the model's recommendations (DDIM-20, w = 1.5), exactly as runtime.load(...).generate takes them
    r = client.post("/v1/images", json={"n": 2, "class": "Beta"})
    assert r.status_code == 200, r.text
    assert r.json()["settings"] == g.plan().run_settings() and r.json()["settings"]["sampler"] == "ddim"
    assert {i["class"] for i in r.json()["images"]} == {1}
    assert_images_close(decode(r.json()), offline(long_cond_onnx, 2, classes="beta"))

    # npz: the same images under arr_0, the metadata as JSON under meta
    r = client.post("/v1/images", json={"n": 4, **settings, "format": "npz"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    npz = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert npz["arr_0"].shape == (4, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert_images_close(npz["arr_0"], decode(body), levels=0)
    meta = json.loads(str(npz["meta"]))
    assert meta["settings"] == body["settings"] and meta["images"][0] == {k: v for k, v in body["images"][0].items()
                                                                          if k != "png_base64"}


def test_requests_with_different_settings_share_one_batch(serving, long_cond_onnx):
    """A long guided DDPM-1000 request runs; a DDIM (eta > 0) and a clipped, respaced DDPM request join its batch,
    overtake it, and all three equal offline generation."""
    client, scheduler, _ = serving(long_cond_onnx)
    requests = {
        "long": dict(n=16, sampler="ddpm", guidance=2.0, seed=1),
        "ddim": dict(n=3, sampler="ddim", steps=20, eta=0.5, guidance=1.0, seed=2, start_index=5),
        "clip": dict(n=4, sampler="ddpm", steps=50, guidance=1.0, clip_denoised=True, variance="beta", seed=3),
    }
    finished = []

    def post(name):
        r = client.post("/v1/images", json={**requests[name], "class": 1 if name == "ddim" else None})
        finished.append(name)
        return r

    with ThreadPoolExecutor(3) as pool:
        long = pool.submit(post, "long")
        wait_until(lambda: in_flight(scheduler) > 0, what="the long request in the batch")
        short = [pool.submit(post, name) for name in ("ddim", "clip")]
        responses = {"long": long.result(), "ddim": short[0].result(), "clip": short[1].result()}
    assert finished[-1] == "long", f"the short requests did not overtake the long one: {finished}"
    for name, r in responses.items():
        assert r.status_code == 200, (name, r.text)
        settings = {k: v for k, v in requests[name].items() if k != "n"}
        want = offline(long_cond_onnx, requests[name]["n"], classes=1 if name == "ddim" else None, **settings)
        assert_images_close(decode(r.json()), want)
    fills = scheduler.stats()["batch_fill"]
    assert max(fills) > 2 * 16, f"no predictor call held rows of more than one request: {sorted(set(fills))}"


@pytest.mark.parametrize("batching", [True, False])
def test_a_request_past_its_deadline_is_cancelled_and_leaves_the_batch(serving, slow_onnx, batching):
    """Also one at a time (--no-batching): the request stops at its next sampler step, not at the end of its batch
    (256 DDPM-1000 images in one call of 256 take about 5 s)."""
    client, scheduler, _ = serving(slow_onnx, deadline_s=0.3, batching=batching, max_batch=256, max_images=256)
    r = client.post("/v1/images", json={"n": 256, "sampler": "ddpm"})
    assert r.status_code == 504 and "deadline of 0.3 s" in r.json()["detail"]
    wait_until(lambda: in_flight(scheduler) == 0 and scheduler.stats()["queue_depth"] == 0, timeout=1.0,
               what="the cancelled images to leave the batch")
    assert scheduler.stats()["images_done"] == 0
    r = client.post("/v1/images", json={"n": 1, "sampler": "ddim", "steps": 5})  # the server goes on
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("batching", [True, False])
def test_a_client_that_disconnects_cancels_its_images(slow_onnx, batching):
    """A real server (uvicorn, in a thread): closing the socket mid-request drops the request's images at the next
    step, also one at a time (--no-batching), where /metrics counts the batch being denoised as in flight."""
    import uvicorn

    pipeline = runtime.load(slow_onnx, "cpu", threads=1, log=lambda m: None)
    scheduler = Scheduler(pipeline, batching=batching, max_batch=64)
    app = create_app(scheduler, pipeline, api_key=None, max_images=64, deadline_s=60, grace_s=5)
    listener = socket.create_server(("127.0.0.1", 0))  # bound here: no race for the port
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, what="uvicorn to start")
        body = json.dumps({"n": 64, "sampler": "ddpm"}).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/images HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: in_flight(scheduler) == 64, what="the request in the batch")
        wait_until(lambda: in_flight(scheduler) == 0 and scheduler.stats()["queue_depth"] == 0, timeout=1.0,
                   what="the disconnected request's images to leave the batch")
        assert scheduler.stats()["images_done"] == 0
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()
    assert not thread.is_alive()


def test_a_full_queue_answers_429_with_retry_after(serving, slow_onnx):
    client, scheduler, _ = serving(slow_onnx, queue_limit=64)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/v1/images", json={"n": 64, "sampler": "ddpm"})  # about 2 s
        wait_until(lambda: in_flight(scheduler) == 64, what="the first request in the batch")
        r = client.post("/v1/images", json={"n": 1})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1, r.text
        assert "limit 64" in r.json()["detail"]
        assert first.result().status_code == 200
    assert client.post("/v1/images", json={"n": 1, "sampler": "ddim", "steps": 5}).status_code == 200


def test_nan_fails_only_its_own_request(serving, nan_onnx):
    """Class 2's images come out NaN: that request gets 500, the request beside it in the batch is unaffected."""
    client, scheduler, _ = serving(nan_onnx)
    good_settings = dict(sampler="ddpm", seed=4)
    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(client.post, "/v1/images", json={"n": 32, "class": 0, **good_settings})
        wait_until(lambda: in_flight(scheduler) > 0, what="the good request in the batch")
        bad = client.post("/v1/images", json={"n": 2, "class": 2, "sampler": "ddim", "steps": 10})
        good = good.result()
    assert bad.status_code == 500
    assert "NaN or Inf" in bad.json()["detail"] and "\n" not in bad.json()["detail"]
    assert 32 + 2 in scheduler.stats()["batch_fill"], "the two requests never shared a predictor call"
    assert good.status_code == 200, good.text
    assert_images_close(decode(good.json()), offline(nan_onnx, 32, classes=0, **good_settings))


BAD_REQUESTS = [  # body -> what the one-line reason says
    ({"n": 0}, "n: Input should be greater than or equal to 1"),
    ({"n": 65}, "n: Input should be less than or equal to 64"),
    ({"n": "3"}, "n: Input should be a valid integer"),
    ({"sampler": "euler"}, "sampler: Input should be " + ", ".join(f"'{s}'" for s in SAMPLERS[:-1])
     + f" or '{SAMPLERS[-1]}'"),  # the registry's samplers, all of them
    ({"steps": 5000}, "steps must be between 1 and T = 1000, got 5000"),
    ({"eta": 2.0, "sampler": "ddim"}, "eta must be between 0 and 1, got 2.0"),
    ({"class": "delta"}, "unknown class 'delta' (this model knows: alpha, beta, gamma)"),
    ({"class": 3}, "class 3 is out of range (this model has classes 0..2)"),
    ({"class": True}, "class: must be a class index or name, got true"),
    ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"format": "jpeg"}, "format: Input should be 'png' or 'npz'"),
    ({"model": "/etc/passwd"}, "model: Extra inputs are not permitted"),
    ({"variance": "sigma"}, "variance: Input should be 'beta' or 'beta_tilde'"),
    ({"sampler": "dpmpp-2m", "eta": 0.5}, "eta applies to the ddim sampler only, not to dpmpp-2m"),
    ({"guidance_interval": [5]}, "guidance_interval: List should have at least 2 items"),
    ({"guidance_interval": [1, 2, 3]}, "guidance_interval: List should have at most 2 items"),
    ({"guidance_interval": "5,10"}, "guidance_interval: Input should be a valid list"),
    ({"guidance_interval": [600, 100]}, "guidance interval must have 0 <= LO <= HI < T = 1000, got 600,100"),
    ({"guidance_interval": [0, 1000]}, "guidance interval must have 0 <= LO <= HI < T = 1000, got 0,1000"),
    ({"guidance": 3e38}, "guidance must be from 0 (unconditional) to 50, got 3e+38"),  # fits float32; was NaN: 500
    ({"sampler": "unipc", "variance": "beta"}, "variance applies to the ddpm sampler only, not to unipc"),
    ({"sampler": "dpmpp-3m", "steps": 2}, "dpmpp-3m needs at least 3 steps (its first 2 warm up its history), got 2"),
    ({"sampler": "unipc", "steps": 1}, "unipc needs at least 2 steps"),
    ({"timesteps": [5, 50]}, "timesteps must be strictly decreasing (the order a run visits them), got 5,50"),
    ({"timesteps": [999, 5], "steps": 3}, "timesteps lists 2 timesteps but steps is 3"),
    ({"timesteps": []}, "timesteps: List should have at least 1 item"),
    ({"spacing": "cosine"}, "spacing: Input should be 'linspace', 'leading', 'trailing' or 'logsnr'"),
]


def test_bad_requests_get_one_line_reasons_and_never_reach_the_batch(serving, long_cond_onnx, uncond_onnx):
    client, scheduler, _ = serving(long_cond_onnx, max_body_bytes=512)
    for body, reason in BAD_REQUESTS:
        r = client.post("/v1/images", json=body)
        detail = r.json()["detail"]
        assert r.status_code == 422 and detail.startswith(reason) and "\n" not in detail, (body, r.text)
    for raw, reason in ((b'{"guidance": NaN}', "guidance must be a finite number from 0 to 50, got nan"),
                        (b'{"n": ', 'the body is not valid JSON (Expecting value: line 1 column 7 (char 6)); '
                                    'send a JSON object of settings, such as {"n": 4, "class": 1}')):
        r = client.post("/v1/images", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json() == {"detail": reason}, (raw, r.text)
    big = json.dumps({"n": 1, "pad": "x" * 600}).encode()
    r = client.post("/v1/images", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json() == {"detail": "the request body is larger than 512 bytes"}
    chunked = client.post("/v1/images", content=iter([big[:300], big[300:]]),  # no Content-Length
                          headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413
    assert scheduler.stats()["predictor_calls"] == 0 and scheduler.stats()["images_done"] == 0

    client, _, _ = serving(uncond_onnx)
    r = client.post("/v1/images", json={"guidance": 2})
    assert r.status_code == 422
    assert r.json() == {"detail": "guidance needs a class-conditional model; this one is unconditional"}
    r = client.post("/v1/images", json={"class": 1})
    assert r.status_code == 422 and r.json() == {"detail": "this model is unconditional: it takes no class"}
    r = client.post("/v1/images", json={"guidance_interval": [0, 50]})
    assert r.status_code == 422
    assert r.json() == {"detail": "a guidance interval needs a class-conditional model; this one is unconditional"}


def test_a_body_is_json_whatever_its_content_type_and_empty_is_no_settings(serving, long_cond_onnx):
    """curl -d sends a form type, some clients none, some text/plain: the settings are read as JSON all the same; an
    empty body takes the model's recommendations. A body that is not a JSON object says exactly what to send."""
    client, _, _ = serving(long_cond_onnx)
    body = json.dumps({"n": 2, "seed": 5, "sampler": "ddim", "steps": 4}).encode()
    want = decode(client.post("/v1/images", content=body, headers={"Content-Type": "application/json"}).json())
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}, {}):
        r = client.post("/v1/images", content=body, headers=headers)
        assert r.status_code == 200 and np.array_equal(decode(r.json()), want), (headers, r.text)
    recommended = client.get("/v1/model").json()["recommended_settings"]
    for headers in ({}, {"Content-Type": "application/json"}):
        r = client.post("/v1/images", content=b"", headers=headers)
        assert r.status_code == 200 and len(r.json()["images"]) == 1 and r.json()["settings"] == recommended, r.text
    documented = client.get("/openapi.json").json()["paths"]["/v1/images"]["post"]["responses"]
    example = 'send a JSON object of settings, such as {"n": 4, "class": 1}'
    for raw, reason in (
            (b"n=2&seed=3", f"the body is not valid JSON (Expecting value: line 1 column 1 (char 0)); {example}"),
            (b'{"n": "\xff"}', "the body is not valid JSON ('utf-8' codec can't decode byte 0xff"),
            (b"[" * 5000 + b"]" * 5000, f"the body is not valid JSON (nested too deeply); {example}"),
            (b'{"n": ' + b"1" * 5000 + b"}", "the body is not valid JSON (Exceeds the limit (4300 digits)"),
            (b"[1, 2]", 'the body must be a JSON object of settings, such as {"n": 4, "class": 1}; got a JSON list'),
            (b'"n"', "the body must be a JSON object of settings, such as {\"n\": 4, \"class\": 1}; got a JSON str")):
        r = client.post("/v1/images", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and str(r.status_code) in documented, (raw[:20], r.status_code, r.text)
        assert r.json()["detail"].startswith(reason) and "\n" not in r.json()["detail"], (raw[:20], r.text)


def test_a_client_that_leaves_mid_body_is_not_counted_as_a_server_error(serving, long_cond_onnx):
    """No response was sent: ddpm_serve_requests_total counts it as 499 (client closed), never as a 500."""
    import asyncio

    client, scheduler, app = serving(long_cond_onnx)
    messages = iter([{"type": "http.request", "body": b'{"n": ', "more_body": True}, {"type": "http.disconnect"}])
    sent = []

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/images", "raw_path": b"/v1/images", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"40")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app.middleware_stack(scope, receive, send))
    assert sent == [] and scheduler.stats()["predictor_calls"] == 0
    text = client.get("/metrics").text
    assert 'ddpm_serve_requests_total{status="499"} 1.0' in text and 'status="500"' not in text, text


def test_keys_are_compared_as_fixed_size_digests_and_never_taken_from_the_url(serving, uncond_onnx, monkeypatch):
    import hmac

    import serve.guard

    compared, real = [], hmac.compare_digest

    def compare_digest(a, b):
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(serve.guard.hmac, "compare_digest", compare_digest)
    client, _, _ = serving(uncond_onnx, api_key="s3cret")
    for key in ("x", "s3cre", "s3cret", "y" * 100):
        client.get("/v1/model", headers={"X-API-Key": key})
    assert compared == [(32, 32)] * 4  # the time taken says nothing about the key's length
    both = {"X-API-Key": "s3cret", "Authorization": "Bearer wrong"}
    assert client.get("/v1/model", headers=both).status_code == 200  # X-API-Key wins (README)
    for query in ("api_key=s3cret", "token=s3cret", "KEY=s3cret"):
        r = client.get(f"/v1/model?{query}", headers={"X-API-Key": "s3cret"})
        assert r.status_code == 401 and "never in the URL" in r.json()["detail"], (query, r.text)
    assert client.get("/healthz?api_key=s3cret").status_code == 200  # open: no key is asked for there


def test_api_key_guards_everything_but_healthz(serving, uncond_onnx):
    client, _, _ = serving(uncond_onnx, api_key="s3cret")
    body = {"n": 1, "sampler": "ddim", "steps": 3}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cre"}, {"Authorization": "s3cret"}):
        r = client.post("/v1/images", json=body, headers=headers)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", (headers, r.text)
        for path in ("/v1/model", "/metrics", "/docs", "/openapi.json"):
            assert client.get(path, headers=headers).status_code == 401, (path, headers)
    assert client.get("/healthz").json() == {"status": "ok"}
    for headers in ({"Authorization": "Bearer s3cret"}, {"X-API-Key": "s3cret"}):
        assert client.post("/v1/images", json=body, headers=headers).status_code == 200
        assert client.get("/v1/model", headers=headers).status_code == 200


def test_model_metrics_health_and_stopping(serving, long_cond_onnx):
    client, _, app = serving(long_cond_onnx, max_images=16)
    g = runtime.load(long_cond_onnx, "cpu", log=lambda m: None)
    model = client.get("/v1/model").json()
    assert model["contract"] == g.contract.to_dict() and model["model_sha256"] == g.sha256
    assert model["provider"] == "CPUExecutionProvider" and model["max_images"] == 16
    assert model["recommended_settings"] == g.plan().run_settings()

    assert client.post("/v1/images", json={"n": 2, "sampler": "ddim", "steps": 5, "guidance": 1}).status_code == 200
    assert client.post("/v1/images", json={"n": 0}).status_code == 422
    text = client.get("/metrics").text
    for line in ("ddpm_serve_images_total 2.0", "ddpm_serve_queue_depth 0.0", "ddpm_serve_images_in_flight 0.0",
                 "ddpm_serve_predictor_calls_total 5.0", "ddpm_serve_batch_fill_count 5.0",
                 'ddpm_serve_batch_fill_bucket{le="2.0"} 5.0', 'ddpm_serve_request_seconds_count{status="200"} 1.0',
                 'ddpm_serve_requests_total{status="422"} 1.0'):
        assert line in text, line
    assert "python_gc_objects_collected_total" not in text  # the app's own registry, not the global one

    assert client.get("/healthz").json() == {"status": "ok"}
    begin_shutdown(app)  # what SIGTERM does in ddpm-serve
    r = client.post("/v1/images", json={"n": 1})
    assert r.status_code == 503 and r.headers["Retry-After"] and r.json() == {"detail": "the server is stopping"}
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json() == {"status": "stopping"}
