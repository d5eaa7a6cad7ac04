"""Smoke run of the throughput benchmark on a tiny model (plumbing only: nothing here is timed)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from benchmarks.throughput import main, unavailable


def test_benchmark_smoke(uncond_ckpt, tmp_path):
    out = tmp_path / "bench"
    backends = ("eager", "torchscript", "onnx-cpu",
                *(() if unavailable("onnx-openvino-fp32") else ("onnx-openvino-fp32",)))
    r = CliRunner().invoke(main, ["--checkpoint", str(uncond_ckpt), "--backends", ",".join(backends),
                                  "--batch-sizes", "1,2", "--threads", "1", "--loop-steps", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results.json").read_text())
    rows = [x for x in results["records"] if not x.get("end_to_end")]
    assert {(x["backend"], x["batch_size"]) for x in rows} == {(b, n) for b in backends for n in (1, 2)}
    assert {(x["backend"], x["batch_size"]) for x in results["ratios"]} == {(b, n) for b in backends for n in (1, 2)
                                                                           if b != "onnx-cpu"}
    for x in rows:
        assert x["img_steps_per_s"] > 0 and x["gflops_per_s"] > 0 and 0 < x["efficiency"]
        assert x["predictor"]["n"] >= 5 and x["predictor"]["min"] <= x["predictor"]["median"] <= x["predictor"]["max"]
        assert 0 <= x["sampler_share"]["median"] < 1
    e2e = next(x for x in results["records"] if x.get("end_to_end"))
    assert e2e["images_per_s"] > 0 and e2e["extrapolated_images_per_s"] > 0
    assert results["flops_per_image_step"] > 0 and results["ceiling"]["gflops_median"] > 0
    assert results["threads"] == 1 and results["versions"]["onnxruntime"]
    assert (out / "throughput.png").stat().st_size > 0
    assert "| onnx-cpu | 2 |" in (out / "results.md").read_text()
