"""Latent models from diffusers: a DiT pipeline (``DiTTransformer2DModel`` + ``AutoencoderKL``), an LDM pipeline
(``UNet2DModel`` + ``VQModel``) and a ``UNet2DModel`` + ``AutoencoderKL`` pipeline, tiny and random, saved with
``save_pretrained`` here (nothing is downloaded), exported by ``ddpm-export`` into a model file and its decoder
beside it, and sampled through ``runtime.load`` as users load them.

Parity: the same x_T (drawn from one torch generator, as the pipelines draw it), our DDIM (the scheduler's spacing,
η = 0: no further noise) against DiTPipeline with guidance 1.5 (null label 1000) and LDMPipeline, decoded: within
``TOLERANCES["fp32"].max_levels`` uint8 levels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.needs_torch
diffusers = pytest.importorskip("diffusers", reason="the interop extra (diffusers) is not installed")
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from diffusers.pipelines.deprecated.latent_diffusion_uncond.pipeline_latent_diffusion_uncond import (  # noqa: E402
    LDMPipeline,
)

import runtime  # noqa: E402
from ddpm_export import export_module  # noqa: E402
from ddpm_export.cli import main as export_cli  # noqa: E402
from ddpm_export.errors import ExportError  # noqa: E402
from runtime.errors import ModelError  # noqa: E402
from runtime.metadata import SamplingContract, latent_stages  # noqa: E402
from runtime.sampling.engine import sample  # noqa: E402
from runtime.sampling.finish import finisher  # noqa: E402
from runtime.tolerances import TOLERANCES  # noqa: E402

LATENT, SIZE = 4, 8  # 4x8x8 latents, decoded to 3x16x16 images


def tiny_dit(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=LATENT,
                                           out_channels=2 * LATENT, num_layers=2, sample_size=SIZE, patch_size=2,
                                           num_embeds_ada_norm=1000, norm_num_groups=8).eval()


def tiny_kl(seed: int = 1, latent: int = LATENT):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                   latent_channels=latent, norm_num_groups=8, sample_size=2 * SIZE).eval()


def tiny_vq(seed: int = 2):
    torch.manual_seed(seed)
    vq = diffusers.VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                           latent_channels=LATENT, norm_num_groups=8, num_vq_embeddings=32, sample_size=2 * SIZE,
                           scaling_factor=1.0)
    with torch.no_grad():  # codes on the latents' scale: a random init puts all of them within ±1/32 of 0, where
        vq.quantize.embedding.weight.normal_()  # every latent is nearly tied between codes and float32 picks any
    return vq.eval()


def tiny_unet(num_class_embeds: int | None = None, seed: int = 3):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=SIZE, in_channels=LATENT, out_channels=LATENT, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 num_class_embeds=num_class_embeds).eval()


def ddim(clip: bool = False):
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("latent")
    diffusers.DiTPipeline(transformer=tiny_dit(), vae=tiny_kl(), scheduler=ddim()).save_pretrained(root / "dit")
    # clipped x̂₀ keeps a random U-Net's latents within [-1, 1], near the codes (unclipped, they reach hundreds, where
    # every code is nearly as far as the next and float32 ties decide which one the quantizer takes)
    LDMPipeline(vqvae=tiny_vq(), unet=tiny_unet(), scheduler=ddim(clip=True)).save_pretrained(root / "ldm")
    return {"dit": root / "dit", "ldm": root / "ldm"}


def export(folder: Path, out: Path, *args: str) -> Path:
    r = CliRunner().invoke(export_cli, [str(folder), "--out", str(out), *args])
    assert r.exit_code == 0 and "verification: passed" in r.output, r.output
    return out


@pytest.fixture(scope="module")
def exported(folders) -> dict[str, Path]:
    return {name: export(folder, folder.parent / f"{name}.onnx") for name, folder in folders.items()}


def ours(model, x_T: np.ndarray, labels=None, **settings) -> np.ndarray:
    """Our DDIM from the given x_T (η = 0 draws nothing more), decoded by the model's decoder stage."""
    plan = model.plan(sampler="ddim", **settings)
    x0 = sample(model.backend.predict_eps, x_T, plan.coefs, lambda i: None, labels=labels,
                null_class=model.contract.null_class)
    return finisher(model.contract, model.backend.decode)(x0)


def uint8(images: np.ndarray) -> np.ndarray:
    return np.round(images * 255).astype(np.uint8)  # diffusers' numpy_to_pil


def test_dit_matches_dit_pipeline_with_guidance(folders, exported):
    model = runtime.load(exported["dit"], "cpu")
    c = model.contract
    assert (c.latent_shape, c.prediction_channels, c.channels, c.image_size) == ((LATENT, SIZE, SIZE), LATENT, 3, 16)
    assert (c.num_classes, c.null_class, c.decoder.file) == (1000, 1000, "dit.decoder.onnx")
    pipe = diffusers.DiTPipeline.from_pretrained(folders["dit"])
    pipe.set_progress_bar_config(disable=True)
    labels = [1, 7, 999]
    theirs = uint8(pipe(class_labels=labels, guidance_scale=1.5, num_inference_steps=10,
                        generator=torch.Generator().manual_seed(5), output_type="np").images)
    x_T = torch.randn((3, LATENT, SIZE, SIZE), generator=torch.Generator().manual_seed(5)).numpy()
    mine = ours(model, x_T, np.array(labels), steps=10, guidance=1.5)
    diff = np.abs(mine.astype(int) - theirs)
    assert diff.max() <= TOLERANCES["fp32"].max_levels, diff.max()
    assert theirs.std() > 10


def test_ldm_matches_ldm_pipeline(folders, exported):
    model = runtime.load(exported["ldm"], "cpu")
    assert model.contract.decoder.scaling_factor == 1.0 and not model.contract.conditional
    pipe = LDMPipeline.from_pretrained(folders["ldm"])
    pipe.set_progress_bar_config(disable=True)
    theirs = uint8(pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(3),
                        output_type="np").images)
    x_T = torch.randn((2, LATENT, SIZE, SIZE), generator=torch.Generator().manual_seed(3)).numpy()
    diff = np.abs(ours(model, x_T, steps=10).astype(int) - theirs)
    assert diff.max() <= TOLERANCES["fp32"].max_levels, diff.max()
    assert theirs.std() > 10


def test_generation_with_the_decoder_is_batch_invariant_and_resumable(exported, tmp_path):
    from runtime.generate_cli import main as generate

    model = runtime.load(exported["dit"], "cpu")
    settings = dict(sampler="dpmpp-2m", steps=6, guidance=1.5, classes=3)
    whole = model.generate(5, seed=2, batch_size=5, **settings)
    assert whole.shape == (5, 16, 16, 3)
    parts = [model.generate(2, seed=2, batch_size=1, **settings),
             model.generate(3, seed=2, start_index=2, batch_size=2, **settings)]
    assert np.array_equal(whole, np.concatenate(parts))
    assert np.array_equal(whole, model.generate(5, seed=2, batch_size=3, fused=True, **settings))
    out = tmp_path / "run"
    args = [str(exported["dit"]), "-n", "5", "--out", str(out), "--sampler", "dpmpp-2m", "--steps", "6",
            "--guidance", "1.5", "--class", "3", "--seed", "2", "--batch-size", "2", "--provider", "cpu"]
    r = CliRunner().invoke(generate, args)
    assert r.exit_code == 0, r.output
    from PIL import Image

    first = np.asarray(Image.open(out / "000004.png"))
    assert np.array_equal(first, whole[4])
    (out / "000004.png").unlink()
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").unlink()
    (out / "manifest-0-of-1.jsonl").write_text("\n".join(lines[:4]) + "\n")
    r = CliRunner().invoke(generate, args)
    assert r.exit_code == 0 and np.array_equal(np.asarray(Image.open(out / "000004.png")), whole[4]), r.output


def test_a_unet_with_an_autoencoder_kl_exports_conditional(tmp_path):
    folder = tmp_path / "unet-vae"
    diffusers.DDPMPipeline(unet=tiny_unet(num_class_embeds=4), scheduler=ddim()).save_pretrained(folder)
    tiny_kl().save_pretrained(folder / "vae")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKL"]}))
    r = CliRunner().invoke(export_cli, [str(folder), "--out", str(tmp_path / "m.onnx"), "--null-class", "3",
                                        "--no-verify"])  # the folder and its contract are what this test is about
    assert r.exit_code == 0, r.output
    model = runtime.load(tmp_path / "m.onnx", "cpu")
    c = model.contract
    assert (c.num_classes, c.null_class, c.latent_shape, c.prediction_channels) == (3, 3, (LATENT, SIZE, SIZE), None)
    images = model.generate(3, steps=4, sampler="ddim", guidance=2.0, classes=[0, 1, 2])
    assert images.shape == (3, 16, 16, 3) and images.std() > 5


class Denoiser(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.emb = torch.nn.Embedding(50, 4)

    def forward(self, x, t):
        return torch.tanh(self.conv(x) + self.emb(t)[:, :, None, None])


class Decoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, z):
        return torch.tanh(self.conv(torch.nn.functional.interpolate(z, scale_factor=4)))


def module_contract() -> SamplingContract:
    from runtime.metadata import ScheduleSpec

    return SamplingContract(image_size=16, channels=1, schedule=ScheduleSpec("linear", 50),
                            stages=latent_stages(2, 4, channels=1, image_size=16, out_channels=4,
                                                 scaling_factor=0.5, shift=0.1))


def test_export_module_takes_a_denoiser_and_its_decoder(tmp_path):
    torch.manual_seed(0)
    net, decoder = Denoiser().eval(), Decoder().eval()
    [artifact] = export_module(net, module_contract(), tmp_path / "m.onnx", decoder=decoder, log=lambda m: None)
    assert artifact.verification == "passed" and artifact.stages == [tmp_path / "m.decoder.onnx"]
    report = json.loads(artifact.report_path.read_text())
    assert report["checks"]["results"][0]["decoder"]["passed"] and report["stages"]["decoder"]["sha256"]
    model = runtime.load(tmp_path / "m.onnx", "cpu")
    x_T = np.random.default_rng(0).standard_normal((2, 2, 4, 4)).astype(np.float32)
    plan = model.plan(sampler="ddim", steps=5)
    with torch.no_grad():
        def eager(x, t, y):
            return net(torch.from_numpy(x), torch.from_numpy(t))[:, :2].numpy()

        x0 = sample(eager, x_T, plan.coefs, lambda i: None)
        want = decoder(torch.from_numpy(x0 / 0.5 + 0.1)).numpy()
    got = finisher(model.contract, model.backend.decode)(sample(model.backend.predict_eps, x_T, plan.coefs,
                                                                 lambda i: None))
    assert np.abs(got.astype(int) - np.clip(np.rint((want + 1) * 127.5), 0, 255).transpose(0, 2, 3, 1)).max() <= 1
    with pytest.raises(ExportError, match="pass its decoder module"):
        export_module(net, module_contract(), tmp_path / "n.onnx", log=lambda m: None)
    with pytest.raises(ExportError, match="not TorchScript"):
        export_module(net, module_contract(), tmp_path / "n.pt", formats=("torchscript",), decoder=decoder,
                      log=lambda m: None)
    assert not (tmp_path / "n.onnx").exists() and not (tmp_path / "n.decoder.onnx").exists()


def test_a_decoder_that_exports_wrong_fails_verification_and_writes_nothing(tmp_path, monkeypatch):
    import ddpm_export.export as export_py

    real = export_py.export_decoder_onnx
    monkeypatch.setattr(export_py, "export_decoder_onnx",
                        lambda decoder, contract, opset: real(Decoder(), contract, opset=opset))  # other weights
    torch.manual_seed(0)
    with pytest.raises(ExportError, match="verification of onnx .* failed, nothing written: .*decoder max"):
        export_module(Denoiser().eval(), module_contract(), tmp_path / "m.onnx", decoder=Decoder().eval(),
                      log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx.report.json"]


@pytest.mark.slow
def test_pt2_carries_both_stages(tmp_path):
    torch.manual_seed(0)
    net, decoder = Denoiser().eval(), Decoder().eval()
    [artifact] = export_module(net, module_contract(), tmp_path / "m.pt2", formats=("pt2",), decoder=decoder,
                               log=lambda m: None)
    assert artifact.verification == "passed" and not list(tmp_path.glob("*.decoder.*"))
    onnx_model = runtime.load(export_module(net, module_contract(), tmp_path / "m.onnx", decoder=decoder,
                                            log=lambda m: None)[0].path, "cpu")
    pt2 = runtime.load(tmp_path / "m.pt2", "cpu")
    assert pt2.contract.decoder.file is None
    a = pt2.generate(4, seed=1, steps=5, sampler="ddim", fused=True)  # the torch device loop, decoder included
    b = onnx_model.generate(4, seed=1, steps=5, sampler="ddim")
    assert np.abs(a.astype(int) - b).max() <= TOLERANCES["fp32"].max_levels


def bad_export(folder: Path, tmp_path: Path, message: str) -> None:
    out = tmp_path / "out.onnx"
    r = CliRunner().invoke(export_cli, [str(folder), "--out", str(out)])
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert r.exit_code == 1 and len(errors) == 1 and message in errors[0], r.output
    assert "Traceback" not in r.output and not list(tmp_path.glob("out*"))


def copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(folder, dst)
    return dst


def edit(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_missing_autoencoder_folder_is_one_line(folders, tmp_path):
    src = copy(folders["dit"], tmp_path)
    shutil.rmtree(src / "vae")
    bad_export(src, tmp_path, "model_index.json names a vae (AutoencoderKL), the autoencoder whose decoder makes "
                              "the images, but")


def test_an_unsupported_autoencoder_is_one_line_naming_the_supported(folders, tmp_path):
    src = copy(folders["dit"], tmp_path)
    edit(src / "vae" / "config.json", _class_name="AutoencoderTiny")
    bad_export(src, tmp_path, "a AutoencoderTiny autoencoder, which is not supported (supported: AutoencoderKL, "
                              "VQModel)")


def test_a_decoder_of_other_latent_channels_is_one_line(folders, tmp_path):
    src = copy(folders["dit"], tmp_path)
    edit(src / "vae" / "config.json", latent_channels=3)
    bad_export(src, tmp_path, "its decoder takes latents of 3 channels, but the denoiser")


def test_a_text_conditioned_pipeline_is_one_line(folders, tmp_path):
    src = copy(folders["ldm"], tmp_path)
    edit(src / "model_index.json", _class_name="StableDiffusionPipeline",
         text_encoder=["transformers", "CLIPTextModel"], unet=["diffusers", "UNet2DConditionModel"])
    bad_export(src, tmp_path, "text-conditioned models are not supported")


def test_a_stage_file_missing_or_swapped_is_one_line_at_load(exported, tmp_path):
    model = tmp_path / "dit.onnx"
    shutil.copy(exported["dit"], model)
    with pytest.raises(ModelError, match="its decoder stage .*dit.decoder.onnx is missing"):
        runtime.load(model, "cpu")
    shutil.copy(exported["ldm"].with_name("ldm.decoder.onnx"), tmp_path / "dit.decoder.onnx")
    with pytest.raises(ModelError, match="is not the decoder dit.onnx was exported with"):
        runtime.load(model, "cpu")


def test_a_model_over_onnx_s_2_gib_is_one_line_and_no_file(tmp_path, monkeypatch):
    """DiT-XL-2's 2.7 GB of fp32 weights do not fit one ONNX file (a protobuf): the export says so and what to use."""
    import ddpm_export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "ONNX_MAX_BYTES", 1000)  # the tiny models here stand for one over the limit
    torch.manual_seed(0)
    with pytest.raises(ExportError, match="over ONNX's 2 GiB limit for one file .*export it with --format pt2") as e:
        export_module(Denoiser().eval(), module_contract(), tmp_path / "m.onnx", decoder=Decoder().eval(),
                      log=lambda m: None)
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())
