"""Issue 16, precision: `--dtype auto`, TF32, fp16 loss scaling in inversion, finite checks with advice (CPU).

The CUDA paths are checked with the capability query stubbed; fp16 math runs on the CPU (slow, so tiny widths).
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
import yaml
from test_pipeline import SIZE, invert_config, write_toy_data

import promptset.stages.invert as invert_stage
from promptset.backends import create_backend
from promptset.backends.base import DiffusionBackend, KLAutoencoder
from promptset.cli import main
from promptset.devices import auto_dtype, resolve_dtype
from promptset.precision import LossScaler, NonFiniteOutput
from promptset.stages.generate import generate
from promptset.stages.invert import invert

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("capability, expected", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                                  ((7, 5), torch.float16), ((7, 0), torch.float16)])
def test_auto_dtype_on_cuda_picks_bf16_or_fp16_by_compute_capability(monkeypatch, capability, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    assert resolve_dtype("auto", CUDA) == expected
    assert asked == [CUDA]  # the capability of the device the model runs on
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32 and auto_dtype(torch.device("cpu")) == "fp32"


def test_fp32_on_cuda_turns_on_tf32():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    new_api = hasattr(matmul, "fp32_precision")  # torch >= 2.9; before it, allow_tf32
    flags = [(matmul, "fp32_precision"), (cudnn.conv, "fp32_precision")] if new_api else [
        (matmul, "allow_tf32"), (cudnn, "allow_tf32")]
    off, on = ("ieee", "tf32") if new_api else (False, True)
    before = [getattr(obj, name) for obj, name in flags]
    try:
        for obj, name in flags:
            setattr(obj, name, off)
        resolve_dtype("fp32", torch.device("cpu"))
        assert [getattr(obj, name) for obj, name in flags] == [off, off]  # not on the CPU
        assert resolve_dtype("fp32", CUDA) == torch.float32
        assert [getattr(obj, name) for obj, name in flags] == [on, on]
    finally:
        for (obj, name), value in zip(flags, before):
            setattr(obj, name, value)


def test_invert_dtype_auto_resolves_to_fp32_on_cpu_and_records_it(tiny_sd, tmp_path, capsys):
    data = write_toy_data(tmp_path / "data", per_class=1)
    run = tmp_path / "run"
    argv = ["invert", "--backend", "sd", "--model", str(tiny_sd), "--data", str(data), "--out", str(run), "--steps",
            "1", "--batch-size", "3", "--resolution", str(SIZE), "--device", "cpu", "--dtype", "auto",
            "--no-progress", "--no-verify-images"]
    assert main(argv) == 0
    assert f"sd model {tiny_sd} on cpu in fp32: prediction type epsilon, native resolution" in capsys.readouterr().out
    assert yaml.safe_load((run / "config.yaml").read_text())["invert"]["dtype"] == "fp32"
    assert main(argv[:-4] + ["--dtype", "fp32", "--no-progress", "--no-verify-images"]) == 0  # the same run


# ---------------------------------------------------------------------------------------------------------------
# fp16 loss scaling: the vector gradient of fp32, at SD-1.5's latent size

UNET_64 = dict(sample_size=64, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
               norm_num_groups=8)  # SD's layout at small widths; attention at 32x32, so a step takes ~1 s on CPU


def _backend_64(tiny_sd, dtype: torch.dtype) -> DiffusionBackend:
    """The tiny SD's text encoder with a random UNet that takes 64x64 latents (512 px at SD's VAE downscale)."""
    from diffusers import UNet2DConditionModel

    base = create_backend("sd", str(tiny_sd), device="cpu", quiet=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **UNET_64)
    return DiffusionBackend(kind="sd", tokenizer=base.tokenizer, text_encoder=base.text_encoder, unet=unet,
                            autoencoder=base.autoencoder, noise_scheduler=base.noise_scheduler,
                            sample_scheduler=base.sample_scheduler, model_id="unet64", model_hash="unet64",
                            resolution=512, max_length=base.max_length, device=torch.device("cpu"), dtype=dtype)


def _vector_gradient(backend: DiffusionBackend, scaler: LossScaler) -> torch.Tensor:
    """One inversion step's gradient of the (G, V, D) placeholder vectors, as invert's loop computes it."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(4, 4, 64, 64, generator=g)  # (B, c, 64, 64), two samples per class
    sample_class = torch.tensor([0, 1, 0, 1])
    init = torch.stack([backend.initializer_vector(w) for w in ("car", "cat")]).unsqueeze(1)  # (G, 1, D)
    vectors = torch.nn.Parameter(init.clone())
    layout = backend.layout("a photo of {token}", 1)
    states = backend.encode_placeholder_prompts(layout, vectors)[sample_class]
    loss = backend.denoising_loss(latents, states, g).mean()
    scaler.scaled(loss).backward()
    assert scaler.step(torch.optim.SGD([vectors], lr=0.0))  # unscales the gradient in place, checks it finite
    return vectors.grad.detach().clone()


def test_fp16_vector_gradient_matches_fp32_with_loss_scaling_and_not_without(tiny_sd, one_thread):
    reference = _vector_gradient(_backend_64(tiny_sd, torch.float32), LossScaler(torch.float32))
    half = _backend_64(tiny_sd, torch.float16)
    assert half.unet.dtype == torch.float16 and half.text_encoder.dtype == torch.float16
    scaled = _vector_gradient(half, LossScaler(torch.float16))
    unscaled = _vector_gradient(half, LossScaler(torch.bfloat16))  # a disabled scaler: the plain fp16 backward

    def error(x):
        return float((x - reference).norm() / reference.norm())

    assert error(scaled) < 0.02, error(scaled)
    assert error(unscaled) > 0.02, error(unscaled)  # dL/dpred ~1e-5 per element underflows in fp16


def test_loss_scaler_skips_overflowing_steps_and_grows_back():
    scaler = LossScaler(torch.float16, init_scale=8.0, growth_interval=2)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=1.0)
    p.grad = torch.tensor([float("inf"), 0.0, 0.0])
    assert not scaler.step(opt) and torch.equal(p.detach(), torch.zeros(3))  # skipped: nothing changed
    assert (scaler.scale, scaler.skipped) == (4.0, 1)
    for _ in range(2):
        p.grad = torch.full((3,), 4.0)  # a gradient of 1 at scale 4
        assert scaler.step(opt)
    assert torch.equal(p.detach(), torch.full((3,), -2.0)) and scaler.scale == 8.0
    off = LossScaler(torch.bfloat16)
    assert not off.enabled and off.scale == 1.0 and off.metrics() == {}


def test_fp16_invert_reports_skipped_steps_and_resumes_with_its_loss_scale(tiny_sd, tmp_path, capsys, monkeypatch):
    data = write_toy_data(tmp_path / "data", per_class=1)
    # start at 2^34: the fp16 backward overflows, so steps are skipped and the scale halves until it fits
    monkeypatch.setattr(invert_stage, "LossScaler", functools.partial(LossScaler, init_scale=2.0**34))
    cfg = invert_config(tmp_path / "run", tiny_sd, data=str(data), steps=20, batch_size=3, dtype="fp16",
                        log_every=10, checkpoint_every=10)
    invert(cfg)
    out = capsys.readouterr().out
    assert "the model runs in fp16: the loss is scaled" in out and "skipped by fp16 loss scaling" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "invert" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    assert rows[-1]["skipped_steps"] > 0 and rows[-1]["loss_scale"] < 2.0**34
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rows)  # skipped steps count no loss
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["invert"]["dtype"] == "fp16"
    first = invert_stage.load_tensors(tmp_path / "run" / "prompts.safetensors")[0]["embeddings"]
    assert torch.isfinite(first).all()

    resumed = tmp_path / "resumed"  # killed after step 10, rerun: the loss scale comes back from the checkpoint
    calls = {"n": 0}
    real = LossScaler.step

    def die_at_11(self, optimizer):
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt
        return real(self, optimizer)

    with monkeypatch.context() as mp:
        mp.setattr(LossScaler, "step", die_at_11)
        with pytest.raises(KeyboardInterrupt):
            invert(invert_config(resumed, tiny_sd, data=str(data), steps=20, batch_size=3, dtype="fp16",
                                 log_every=10, checkpoint_every=10))
    invert(invert_config(resumed, tiny_sd, data=str(data), steps=20, batch_size=3, dtype="fp16", log_every=10,
                         checkpoint_every=10))
    again = invert_stage.load_tensors(resumed / "prompts.safetensors")[0]["embeddings"]
    assert torch.equal(first, again)


def test_fp16_overflow_that_scaling_cannot_fix_names_bf16_not_lr(tiny_sd, tmp_path, capsys, monkeypatch):
    data = write_toy_data(tmp_path / "data", per_class=1)
    real = DiffusionBackend.denoising_loss
    monkeypatch.setattr(DiffusionBackend, "denoising_loss", lambda self, *a, **k: real(self, *a, **k) * float("inf"))
    monkeypatch.setattr(invert_stage, "LossScaler", functools.partial(LossScaler, init_scale=2.0**-5))  # 4 halvings
    run = tmp_path / "run"
    argv = ["invert", "--backend", "sd", "--model", str(tiny_sd), "--data", str(data), "--out", str(run), "--steps",
            "40", "--batch-size", "3", "--resolution", str(SIZE), "--device", "cpu", "--dtype", "fp16",
            "--no-progress"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "the gradient stayed NaN or inf in fp16 while loss scaling halved its scale" in err
    assert "--dtype bf16" in err and "--dtype fp32" in err and not (run / "prompts.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------
# finite checks: NaN latents or decodes stop with advice instead of black PNGs or "lower --lr"


def test_nan_decodes_stop_generate_before_any_png(tiny_sd, tmp_path, monkeypatch, capsys):
    data = write_toy_data(tmp_path / "data", per_class=1)
    run = tmp_path / "run"
    invert(invert_config(run, tiny_sd, data=str(data), steps=1, batch_size=3))
    monkeypatch.setattr(KLAutoencoder, "decode", lambda self, latents: torch.full(
        (len(latents), 3, SIZE, SIZE), float("nan")))
    assert main(["generate", "--run-dir", str(run), "--ipc", "1", "--steps", "2", "--device", "cpu",
                 "--no-progress"]) == 3
    err = capsys.readouterr().err
    # 3 images, padded to the sampler batch of 8
    assert "stopped: the VAE's decodes of 8 finite latents: 8 of 8 hold NaN or inf; nothing was saved from them" in err
    assert "lower --lr" not in err.lower() and not list((run / "generated").rglob("*.png"))
    backend = create_backend("sd", str(tiny_sd), device="cpu", quiet=True)
    backend.dtype = torch.float16  # the advice for the dtype the model runs in
    with pytest.raises(NonFiniteOutput, match=r"overflows or underflows in fp16.*--dtype bf16.*fp16-fix"):
        backend.decode_latents(torch.zeros(2, 4, 2, 2))


def test_nan_latent_cache_stops_invert_naming_the_vae_not_the_lr(tiny_sd, tmp_path, monkeypatch):
    data = write_toy_data(tmp_path / "data", per_class=2)
    real = KLAutoencoder.encode_dist

    def nan_for_car(self, images):
        mean, std = real(self, images)
        return (mean * float("nan"), std) if (images[:, 1] > 0.55).all() else (mean, std)  # the green class only

    monkeypatch.setattr(KLAutoencoder, "encode_dist", nan_for_car)
    with pytest.raises(NonFiniteOutput) as err:
        invert(invert_config(tmp_path / "run", tiny_sd, data=str(data), steps=2, batch_size=3))
    message = str(err.value)
    assert "class car (2 training images): the VAE's latents of 4 images: 4 of 4 hold NaN or inf" in message
    assert "lower --lr" not in message.lower() and not list((tmp_path / "run" / "invert").rglob("latents/*"))


def test_evaluate_dtype_auto_follows_generate_where_the_device_runs_it(monkeypatch):
    from promptset.stages.evaluate import _generator_dtype

    cpu = torch.device("cpu")
    assert _generator_dtype("auto", "fp32", cpu) == "fp32"
    assert _generator_dtype("auto", None, cpu) == "fp32"
    assert _generator_dtype("auto", "bf16", cpu) == "fp32"  # not run on a CPU by default: round 0 made again
    assert _generator_dtype("fp32", "bf16", CUDA) == "fp32"  # told otherwise
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _generator_dtype("auto", "bf16", CUDA) == "bf16"
    assert _generator_dtype("auto", "fp16", CUDA) == "fp16"  # generate ran fp16: so does evaluate
    assert _generator_dtype("auto", "fp32", CUDA) == "fp32"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert _generator_dtype("auto", "bf16", CUDA) == "fp16"  # a V100 has no bf16


def test_generate_bf16_then_default_evaluate_reuses_round0(tiny_sd, tmp_path, monkeypatch, capsys):
    """generate records the resolved dtype; a default evaluate generates in it, so its PNGs are round 0."""
    import promptset.stages.evaluate as evaluate_stage
    from promptset.evaluation.methods import build_generative
    from promptset.stages.evaluate import EvaluateConfig, _context

    data = write_toy_data(tmp_path / "data", per_class=1)
    run = tmp_path / "run"
    invert(invert_config(run, tiny_sd, data=str(data), steps=1, batch_size=3))
    generate(run=str(run), ipc=1, steps=2, device="cpu", dtype="bf16", progress=False)
    meta = invert_stage.load_tensors(run / "labels.safetensors")[1]
    assert json.loads(meta["generation"])["dtype"] == "bf16"
    assert yaml.safe_load((run / "config.yaml").read_text())["generate"]["dtype"] == "bf16"
    cfg = EvaluateConfig(run=str(run), test=str(data), student="convnet_tiny", protocol="p2", ipc="1", epochs=1,
                         regen_every=0, device="cpu", progress=False)
    # on a CPU, auto runs fp32: round 0 is made again, and evaluate says so
    assert not build_generative(_context(cfg, ["d3m"]), "d3m").info["round0_reused_generated"]
    assert "generate made its images in bf16" in capsys.readouterr().out
    monkeypatch.setattr(evaluate_stage, "auto_dtype", lambda device: "bf16")  # as on a GPU of capability 8.0+
    info = build_generative(_context(cfg, ["d3m"]), "d3m").info
    assert info["round0_reused_generated"] and info["generation"]["dtype"] == "bf16"
    explicit = build_generative(_context(EvaluateConfig(**(vars(cfg) | {"dtype": "fp32"})), ["d3m"]), "d3m")
    assert not explicit.info["round0_reused_generated"]  # told otherwise
