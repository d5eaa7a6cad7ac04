"""Models trained elsewhere: a diffusers folder exported by ``ddpm-export`` samples what diffusers' own pipelines
sample, and ``export_module`` takes any module. Tiny random ``UNet2DModel``s are made here and saved with
``save_pretrained``; nothing is downloaded.

Parity: the same x_T and the same injected noise (drawn from one torch generator in diffusers' order: x_T, then one
z per step with t > 0), our DDPM at full T (the scheduler's variance type and clipping, from the contract) and our
DDIM (the scheduler's spacing) against DDPMPipeline and DDIMPipeline, for ε-, v- and x̂₀-prediction: within
``TOLERANCES["fp32"].max_levels`` uint8 levels.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.needs_torch
diffusers = pytest.importorskip("diffusers", reason="the interop extra (diffusers) is not installed")
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import runtime  # noqa: E402
from ddpm_export import export_module  # noqa: E402
from ddpm_export.cli import main as export_cli  # noqa: E402
from ddpm_export.diffusers_source import denoiser_facts, diffusers_contract, read_config  # noqa: E402
from ddpm_export.run_defaults import set_contract  # noqa: E402
from runtime.errors import SettingsError  # noqa: E402
from runtime.metadata import SamplingContract, ScheduleSpec  # noqa: E402
from runtime.sampling.engine import sample  # noqa: E402
from runtime.sampling.finish import to_uint8  # noqa: E402
from runtime.sampling.schedule import default_params  # noqa: E402
from runtime.tolerances import TOLERANCES  # noqa: E402

SIZE, CHANNELS, T = 8, 3, 1000


def facts(config: dict) -> dict:
    """What the contract needs of a UNet2DModel config."""
    return denoiser_facts(config, Path("config.json"))
PREDICTIONS = ("epsilon", "v_prediction", "sample")


def tiny_unet(num_class_embeds: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=SIZE, in_channels=CHANNELS, out_channels=CHANNELS, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=num_class_embeds).eval()


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("diffusers") / "tiny-ddpm"
    diffusers.DDPMPipeline(unet=tiny_unet(),
                           scheduler=diffusers.DDPMScheduler(num_train_timesteps=T)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(pipeline_folder) -> Path:
    out = pipeline_folder.parent / "tiny.onnx"
    result = CliRunner().invoke(export_cli, [str(pipeline_folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "verification: passed" in result.output
    return out


def with_prediction(exported: Path, folder: Path, prediction: str, tmp_path: Path):
    """The exported model's file with the contract the exporter writes for ``prediction`` (the network is the same)."""
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config["prediction_type"] = prediction
    file = tmp_path / "scheduler_config.json"
    file.write_text(json.dumps(config))
    unet = read_config(folder / "unet" / "config.json", ("UNet2DModel",))
    contract = diffusers_contract(facts(unet), read_config(file, ("DDPMScheduler",)), where=folder, scheduler_file=file)
    path = tmp_path / f"{prediction}.onnx"
    shutil.copy(exported, path)
    set_contract(path, lambda c: contract)
    return runtime.load(path, "cpu"), config


def torch_noise(seed: int, shape):
    """x_T and then the per-step noise, drawn as diffusers' pipelines draw them on the CPU."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=g).numpy()
    return g, x_T, lambda i: torch.randn(shape, generator=g).numpy()


def diffusers_images(pipe_cls, scheduler, unet, seed: int, n: int, steps: int) -> np.ndarray:
    pipe = pipe_cls(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
               output_type="np").images
    return np.round(out * 255).astype(np.uint8)  # diffusers' numpy_to_pil


@pytest.mark.slow
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddpm_and_ddim_match_diffusers_pipelines(exported, pipeline_folder, prediction, tmp_path):
    model, config = with_prediction(exported, pipeline_folder, prediction, tmp_path)
    assert model.contract.prediction == prediction and model.contract.variance == "beta_tilde"
    unet = diffusers.UNet2DModel.from_pretrained(pipeline_folder / "unet")
    shape, n = (2, CHANNELS, SIZE, SIZE), 2
    cases = [(diffusers.DDPMPipeline, diffusers.DDPMScheduler, dict(), T),
             (diffusers.DDIMPipeline, diffusers.DDIMScheduler, dict(sampler="ddim", steps=20), 20)]
    for pipe_cls, sched_cls, settings, steps in cases:
        plan = model.plan(**settings)  # the scheduler's clipping, variance and spacing come from the contract
        _, x_T, noise = torch_noise(11, shape)
        ours = to_uint8(sample(model.backend.predict_eps, x_T, plan.coefs, noise))
        theirs = diffusers_images(pipe_cls, sched_cls.from_config(config), unet, 11, n, steps)
        diff = np.abs(ours.astype(int) - theirs)
        assert diff.max() <= TOLERANCES["fp32"].max_levels, (pipe_cls.__name__, prediction, diff.max())
        assert theirs.std() > 10  # real images, not saturated


def test_contract_follows_the_scheduler_config(pipeline_folder, exported):
    model = runtime.load(exported, "cpu")
    c = model.contract
    assert (c.image_size, c.channels, c.num_classes, c.null_class, c.prediction) == (SIZE, CHANNELS, 0, None, "epsilon")
    assert c.schedule.name == "linear" and c.schedule.timesteps == T and c.variance == "beta_tilde"
    assert c.run_defaults.clip_denoised is True and c.run_defaults.spacing == "leading"
    assert c.provenance.source.startswith("diffusers UNet2DModel + DDPMScheduler")
    # the ONNX model takes per-row timesteps and any batch
    x = np.random.default_rng(0).standard_normal((3, CHANNELS, SIZE, SIZE)).astype(np.float32)
    t = np.array([0, 500, 999])
    rows = np.concatenate([model.backend.predict_eps(x[i:i + 1], t[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(model.backend.predict_eps(x, t), rows, atol=1e-5)
    unet = diffusers.UNet2DModel.from_pretrained(pipeline_folder / "unet")
    with torch.no_grad():
        want = unet(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    np.testing.assert_allclose(rows, want, atol=TOLERANCES["fp32"].atol, rtol=TOLERANCES["fp32"].rtol)


@pytest.mark.parametrize("changes, expect", [
    (dict(beta_schedule="scaled_linear", beta_start=0.001, beta_end=0.02), ("scaled_linear", "leading")),
    (dict(beta_schedule="squaredcos_cap_v2"), ("cosine", "leading")),
    (dict(beta_schedule="sigmoid"), ("sigmoid", "leading")),
    (dict(trained_betas=np.linspace(1e-4, 0.02, T).tolist()), ("explicit", "leading")),
    (dict(variance_type="fixed_large", clip_sample=False, timestep_spacing="trailing"), ("linear", "trailing")),
    (dict(_class_name="DDIMScheduler", steps_offset=1, clip_sample_range=2.0), ("linear", "leading")),
])
def test_every_diffusers_schedule_and_setting_reaches_the_contract(pipeline_folder, tmp_path, changes, expect):
    config = {**json.loads((pipeline_folder / "scheduler" / "scheduler_config.json").read_text()), **changes}
    file = tmp_path / "scheduler_config.json"
    file.write_text(json.dumps(config))
    sched = read_config(file, ("DDPMScheduler", "DDIMScheduler"))
    unet = read_config(pipeline_folder / "unet" / "config.json", ("UNet2DModel",))
    c = diffusers_contract(facts(unet), sched, where=pipeline_folder, scheduler_file=file)
    assert (c.schedule.name, c.run_defaults.spacing) == expect
    theirs = getattr(diffusers, sched["_class_name"]).from_config(config).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(c.schedule.build().alphas_cumprod, theirs, rtol=2e-5)  # diffusers: float32 tables
    if "variance_type" in changes:
        assert c.variance == "beta" and c.run_defaults.clip_denoised is False
    if sched["_class_name"] == "DDIMScheduler":
        r = c.run_defaults
        assert (r.sampler, r.steps, r.steps_offset, r.clip_range) == ("ddim", 50, 1, 2.0)


def test_export_module_takes_a_class_conditional_model_with_or_without_a_null_class(tmp_path):
    from ddpm_export.diffusers_source import DiffusersUNet

    net = DiffusersUNet(tiny_unet(num_class_embeds=4))
    schedule = ScheduleSpec("scaled_linear", 100, {"beta_start": 0.001, "beta_end": 0.03})
    contract = SamplingContract(image_size=SIZE, channels=CHANNELS, schedule=schedule, prediction="v_prediction",
                                num_classes=4, null_class=None)
    (art,) = export_module(net, contract, tmp_path / "no-null.pt", formats=("torchscript",), log=lambda m: None)
    assert art.verification == "passed"
    model = runtime.load(art.path, "cpu")
    assert model.contract.provenance.source == "PyTorch module DiffusersUNet" and not model.contract.guidable
    images = model.generate(4, classes=[0, 1, 2, 3], sampler="ddim", steps=5, seed=1)
    assert images.shape == (4, SIZE, SIZE, CHANNELS)
    with pytest.raises(SettingsError, match="has none.*--null-class"):
        model.generate(2, classes=[0], sampler="ddim", steps=5, guidance=2.0)
    # trained with label 3 as "no class": three classes and a null label, and guidance runs
    with_null = dataclasses.replace(contract, num_classes=3, null_class=3)
    (art,) = export_module(net, with_null, tmp_path / "null.pt", formats=("torchscript",), log=lambda m: None)
    guided = runtime.load(art.path, "cpu").generate(2, classes=[0, 2], sampler="ddim", steps=5, guidance=2.0, seed=1)
    assert guided.shape == (2, SIZE, SIZE, CHANNELS)


class PlainX0Net(torch.nn.Module):
    """Anybody's module: predicts x̂₀ from x and t with a convolution and a timestep table."""

    def __init__(self, timesteps: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.table = torch.nn.Parameter(torch.linspace(-0.5, 0.5, timesteps))

    def forward(self, x, t):
        return torch.tanh(self.conv(x) + self.table[t].view(-1, 1, 1, 1))


def test_export_module_onnx_of_any_module_verifies_and_samples(tmp_path):
    contract = SamplingContract(image_size=8, channels=1, schedule=ScheduleSpec("cosine", 50, default_params("cosine")),
                                prediction="sample")
    (art,) = export_module(PlainX0Net(50), contract, tmp_path / "x0.onnx", log=lambda m: None)
    assert art.verification == "passed" and art.path.is_file()
    model = runtime.load(art.path, "cpu")
    assert model.contract.prediction == "sample" and model.contract.schedule.name == "cosine"
    host, fused = (model.generate(3, sampler="dpmpp-2m", steps=8, seed=2, fused=f) for f in (False, True))
    assert np.abs(host.astype(int) - fused).max() <= TOLERANCES["fp32"].max_levels


def test_bare_unet_folder_and_legacy_files(pipeline_folder, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(pipeline_folder / "unet", bare)
    r = CliRunner().invoke(export_cli, [str(bare), "--no-verify"])
    assert r.exit_code != 0 and "--scheduler-config FILE or put scheduler_config.json beside" in r.output
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({"_class_name": "UNetModel", "ch": 128}))
    (legacy / "scheduler_config.json").write_text(json.dumps({"_class_name": "GaussianDDPMScheduler"}))
    r = CliRunner().invoke(export_cli, [str(legacy)])
    assert r.exit_code != 0 and "legacy diffusers files" in r.output and "model_index.json" in r.output
    # a bare folder with --scheduler-config (here a DDIM one), exported to TorchScript
    ddim = tmp_path / "ddim_scheduler.json"
    config = json.loads((pipeline_folder / "scheduler" / "scheduler_config.json").read_text())
    ddim.write_text(json.dumps({**config, "_class_name": "DDIMScheduler"}))
    r = CliRunner().invoke(export_cli, [str(bare), "--format", "torchscript", "--scheduler-config", str(ddim)])
    assert r.exit_code == 0 and "verification: passed" in r.output, r.output
    rd = runtime.load(tmp_path / "bare.pt", "cpu").contract.run_defaults
    assert (rd.sampler, rd.steps, rd.spacing) == ("ddim", 50, "leading")
    # google/ddpm-cifar10-32's layout: a pipeline with the legacy files at its root as well; model_index.json wins
    both = tmp_path / "with-legacy"
    shutil.copytree(pipeline_folder, both)
    for name in ("config.json", "scheduler_config.json"):
        shutil.copy(legacy / name, both / name)
    r = CliRunner().invoke(export_cli, [str(both), "--format", "torchscript", "--out", str(tmp_path / "both.pt")])
    assert r.exit_code == 0 and "verification: passed" in r.output, r.output


class Payload:
    """Unpickling this would run ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _bad_folder(kind: str, good: Path, tmp: Path) -> Path:
    folder = tmp / kind
    if kind == "empty":
        folder.mkdir()
        return folder
    shutil.copytree(good, folder)
    sched, unet = folder / "scheduler" / "scheduler_config.json", folder / "unet" / "config.json"
    if kind == "betas":
        _edit_json(sched, beta_start=0.02, beta_end=0.001)
    elif kind == "trained-betas":
        _edit_json(sched, trained_betas=[0.1, 0.2])
    elif kind == "prediction":
        _edit_json(sched, prediction_type="flow")
    elif kind == "schedule":
        _edit_json(sched, beta_schedule="laplace")
    elif kind == "thresholding":
        _edit_json(sched, thresholding=True)
    elif kind == "scheduler-class":
        _edit_json(sched, _class_name="EulerDiscreteScheduler")
    elif kind == "learned-variance":
        _edit_json(unet, out_channels=2 * CHANNELS)
    elif kind == "mismatch":
        _edit_json(unet, block_out_channels=[8, 24])
    elif kind == "code":
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        from safetensors.torch import load_file

        state = load_file(weights)
        weights.unlink()
        state["payload"] = Payload(tmp / "payload-ran")
        torch.save(state, folder / "unet" / "diffusion_pytorch_model.bin")
    return folder


@pytest.mark.parametrize("kind, message", [
    ("empty", "neither model_index.json (a pipeline) nor config.json"),
    ("betas", "scheduler_config.json: cannot be used"),
    ("trained-betas", "T = 1000 betas"),
    ("prediction", "unknown prediction_type 'flow'"),
    ("schedule", "unknown beta_schedule 'laplace'"),
    ("thresholding", "dynamic thresholding is not supported"),
    ("scheduler-class", "expected DDPMScheduler or DDIMScheduler"),
    ("learned-variance", "a learned variance"),
    ("mismatch", "the weights do not fit"),
    ("code", "refusing to load"),
])
def test_bad_folders_are_one_line_errors_and_write_nothing(pipeline_folder, tmp_path, kind, message):
    folder = _bad_folder(kind, pipeline_folder, tmp_path)
    r = CliRunner().invoke(export_cli, [str(folder)])
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert r.exit_code == 1 and len(errors) == 1 and message in errors[0], r.output
    assert "Traceback" not in r.output
    assert not list(tmp_path.glob("*.onnx*")) and not (tmp_path / "payload-ran").exists()


def test_null_class_must_be_the_last_label(pipeline_folder, tmp_path):
    unet = read_config(pipeline_folder / "unet" / "config.json", ("UNet2DModel",))
    sched = read_config(pipeline_folder / "scheduler" / "scheduler_config.json", ("DDPMScheduler",))
    cond = {**unet, "num_class_embeds": 11}
    c = diffusers_contract(facts(cond), sched, null_class=10, where=pipeline_folder, scheduler_file=pipeline_folder)
    assert (c.num_classes, c.null_class, c.guidable) == (10, 10, True)
    c = diffusers_contract(facts(cond), sched, where=pipeline_folder, scheduler_file=pipeline_folder)
    assert (c.num_classes, c.null_class, c.guidable) == (11, None, False)
    from ddpm_export.errors import SourceError

    with pytest.raises(SourceError, match="must be the last"):
        diffusers_contract(facts(cond), sched, null_class=3, where=pipeline_folder, scheduler_file=pipeline_folder)
    with pytest.raises(SourceError, match="unconditional"):
        diffusers_contract(facts(unet), sched, null_class=0, where=pipeline_folder, scheduler_file=pipeline_folder)


def test_a_module_that_cannot_be_traced_is_one_error_and_no_file(tmp_path):
    class Untraceable(torch.nn.Module):
        def forward(self, x, t):
            return torch.from_numpy(x.detach().numpy() * 0.5)  # leaves the graph

    contract = SamplingContract(image_size=8, channels=1)
    from ddpm_export.errors import ExportError

    with pytest.raises(ExportError) as e:
        export_module(Untraceable(), contract, tmp_path / "u.pt", formats=("torchscript",), log=lambda m: None)
    assert "\n" not in str(e.value) and "verification of torchscript (fp32) failed" in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ["u.pt.report.json"]  # the report says why; no model file


def test_without_the_interop_extra_a_folder_is_one_line(pipeline_folder, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers raises ImportError
    monkeypatch.delitem(sys.modules, "ddpm_export.diffusers_source", raising=False)
    r = CliRunner().invoke(export_cli, [str(pipeline_folder)])
    assert r.exit_code == 1 and "needs the interop extra (pip install 'ddpm-toolkit[interop]'" in r.output, r.output
    assert "Traceback" not in r.output
