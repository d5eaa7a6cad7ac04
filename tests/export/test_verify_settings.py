"""Verification judges the export, not the provider's arithmetic mode: on CUDA the per-call ε check runs with TF32
off and the trajectory with the provider's defaults (as generation runs); the report says which ran with what."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

import ddpm_export.export as export_module
from ddpm_export.verify import VerificationReport
from runtime.backends.registry import FORMATS
from runtime.metadata import SamplingContract

ORT = FORMATS["onnx"]  # onnxruntime's kind: its providers say which options the strict check uses


class FakeModel:
    """A stand-in ONNX backend: records the provider options it was loaded with; ε = scale·x."""

    opened: list = []

    def __init__(self, path, provider, *, provider_options=None, quiet=False, scale=1.0):
        self.provider = ORT.provider(provider).full_name
        self.options = provider_options
        self.scale = scale
        FakeModel.opened.append(self)

    def predict_eps(self, x, t, y=None):
        return self.scale * x


def fake_load(path, provider, *, dtype=None, log=None, provider_options=None):
    """``runtime.load`` as export calls it, returning a pipeline around a ``FakeModel``."""
    return SimpleNamespace(backend=FakeModel(path, provider, provider_options=provider_options))


def test_cuda_eps_check_runs_without_tf32_and_the_trajectory_with_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(export_module, "load", fake_load)
    contract = SamplingContract(image_size=4, channels=1)
    reference = lambda x, t, y: x  # noqa: E731 - the eager model in this test
    generation = FakeModel(tmp_path / "m.onnx", "cuda", scale=1.0 + 5e-3)  # "TF32": per call beyond the fp32 bound
    FakeModel.opened.clear()
    result = export_module._verify_onnx_fp32(tmp_path / "m.onnx", ORT.provider("cuda"), generation, reference, contract,
                                             VerificationReport({}))
    (strict,) = FakeModel.opened
    assert strict.options == {"use_tf32": "0"}  # the per-call candidate was opened with TF32 off
    assert result.settings == {"eps": {"use_tf32": "0"}, "trajectory": "provider defaults"}
    assert result.eps.passed and result.eps.max_abs_diff == 0.0  # judged on the strict session
    assert result.trajectory.passed  # the generation session: 0.5 % off in ε stays within the level bound


def test_cpu_checks_run_on_the_one_session(monkeypatch, tmp_path):
    monkeypatch.setattr(export_module, "load", fake_load)
    FakeModel.opened.clear()
    cpu = FakeModel(tmp_path / "m.onnx", "cpu", scale=1.0 + 5e-3)
    result = export_module._verify_onnx_fp32(tmp_path / "m.onnx", ORT.provider("cpu"), cpu, lambda x, t, y: x,
                                             SamplingContract(image_size=4, channels=1), VerificationReport({}))
    assert FakeModel.opened == [cpu]  # no second session
    assert result.settings == {"eps": "provider defaults", "trajectory": "provider defaults"}
    assert not result.eps.passed and not result.passed  # 0.5 % off per call fails the fp32 bound
    assert np.isfinite(result.eps.max_abs_diff)
