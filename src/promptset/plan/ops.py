"""The units of work `promptset run --plan` counts: every network's FLOPs per sample, counted on the meta device from
its configuration (no weights), and, when one call is cheap on the device at hand, its seconds measured there.

Stable Diffusion's parts come from the model folder's configs when the folder is on this machine, else from SD 1.5's
configs shipped in `plan/configs/sd15`. The generator's calls are timed on the real model folder (its own loading
path); teachers and students on randomly initialised networks of the recipe's shape (weights do not change speed).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..flops import count_flops, timed, train_step_flops

SHIPPED = Path(__file__).resolve().parent / "configs" / "sd15"
PARTS = ("unet", "text_encoder", "vae")
MEASURE_BUDGET_S = 2.0  # a call is timed on the device at hand only when it is predicted to take at most this long


def _padded(n: int, chunk: int, micro: int, per: int = 1) -> int:
    """Samples computed for n jobs taken `chunk` at a time, each chunk's n*per samples padded to a multiple of
    `micro` (the sampler and the teacher always see exactly `micro` at once)."""
    full, rest = divmod(n, chunk)

    def up(x: int) -> int:
        return -(-x // micro) * micro

    return full * up(chunk * per) + (up(rest * per) if rest else 0)


@dataclass
class Op:
    """One kind of work: FLOPs per sample, which model runs it, and its measured time t(b) = a + c*b per call of b
    samples (None: estimate from the FLOPs and a rate)."""

    what: str
    sample_flops: float
    runs_on: str  # "generator", "teacher" or "student"
    timing: tuple[float, float] | None = None


@dataclass
class Work:
    """`samples` samples of `op` in `calls` calls, one line of a stage's plan."""

    stage: str
    text: str
    op: Op
    calls: int
    samples: int
    group: str = ""  # lines of one group are shown as one, their `counts` summed
    counts: dict | None = None

    @property
    def flops(self) -> float:
        return self.samples * self.op.sample_flops

    def seconds(self, rates: dict[str, float]) -> float:
        if self.op.timing is not None:
            a, c = self.op.timing
            return self.calls * a + self.samples * c
        return self.flops / rates[self.op.runs_on]


def sd_configs(model: str) -> tuple[dict[str, dict], str]:
    """The UNet, text encoder and VAE configs of `model` (a diffusers folder) when it is here, else SD 1.5's shipped
    ones; and where they came from."""
    folder = Path(model).expanduser() if model else None
    if folder is not None and all((folder / p / "config.json").is_file() for p in PARTS):
        return {p: json.loads((folder / p / "config.json").read_text()) for p in PARTS}, f"the configs in {folder}"
    where = f"{model} is not a diffusers folder on this machine" if model else "no model given"
    return ({p: json.loads((SHIPPED / f"{p}.json").read_text()) for p in PARTS},
            f"Stable Diffusion 1.5's configs shipped with promptset ({where})")


def sd_flops(configs: dict[str, dict], invert_res: int, gen_res: int) -> dict[str, float]:
    """FLOPs per image of the SD parts at the given resolutions, counted on the meta device: UNet forward, UNet
    forward + backward to its conditioning (inversion: the UNet is frozen, so no weight gradient), text encoder
    forward + backward to its token embeddings (per prompt), VAE encode and decode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"]).requires_grad_(False)
        vae = AutoencoderKL.from_config(configs["vae"]).requires_grad_(False)
        text = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])).requires_grad_(False)
    down = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    channels = configs["unet"].get("in_channels", 4)
    length = configs["text_encoder"].get("max_position_embeddings", 77)
    width = configs["unet"]["cross_attention_dim"]
    meta = torch.device("meta")
    t = torch.tensor([500], device=meta)

    def unet_at(res: int, backward: bool) -> float:
        latent = torch.randn(1, channels, res // down, res // down, device=meta)
        states = torch.randn(1, length, width, device=meta, requires_grad=backward)

        def run():
            out = unet(latent, t, encoder_hidden_states=states).sample
            if backward:
                out.float().pow(2).mean().backward()

        return count_flops(run)

    ids = torch.zeros(1, length, dtype=torch.long, device=meta)
    table = text.get_input_embeddings().weight
    table.requires_grad_(True)  # the placeholder rows train: gradients flow back through the whole encoder

    def text_step():
        text(ids).last_hidden_state.float().sum().backward()

    return {
        "unet_fwd_gen": unet_at(gen_res, False),
        "unet_fb_invert": unet_at(invert_res, True),
        "text_fb": count_flops(text_step),
        "vae_encode": count_flops(lambda: vae.encode(torch.randn(1, 3, invert_res, invert_res, device=meta))),
        "vae_decode": count_flops(lambda: vae.decode(torch.randn(1, 4, gen_res // down, gen_res // down,
                                                                 device=meta))),
    }


def generator_timing(model: str, device: torch.device, dtype: str, *, invert_res: int, batch: int, prompts: int,
                     template: str, vectors: int, gen_res: int, sampler_batch: int, guidance: float,
                     sampler: str) -> dict:
    """Seconds measured on the model folder itself: loading it, one inversion step (prompts through the text
    encoder, the denoising loss at `batch`, backward), VAE encodes, one denoising step and one decode of a sampler
    micro-batch. Returns {"load": s, "invert_step": s, "vae_encode": s per image, "unet_sample": s per image per
    step, "vae_decode": s per image}."""
    from ..backends import create_backend
    from ..backends.base import image_generators

    start = time.perf_counter()
    backend = create_backend("sd", model, device=str(device), dtype=dtype, sampler=sampler, quiet=True)
    load = time.perf_counter() - start
    layout = backend.layout(template, vectors)
    dim = backend.token_dim
    placeholder = torch.nn.Parameter(0.01 * torch.randn(prompts, vectors, dim, device=backend.device))
    down = backend.autoencoder.downscale
    latents = torch.randn(batch, backend.autoencoder.latent_channels, invert_res // down, invert_res // down,
                          device=backend.device)
    where = torch.arange(batch, device=backend.device) % prompts
    generator = torch.Generator().manual_seed(0)

    def invert_step():
        states = backend.encode_placeholder_prompts(layout, placeholder)[where]
        backend.denoising_loss(latents, states, generator).mean().backward()
        placeholder.grad = None

    out = {"load": load, "invert_step": timed(invert_step, backend.device)}
    images = torch.rand(4, 3, invert_res, invert_res)
    out["vae_encode"] = timed(lambda: backend.encode_images(images), backend.device) / 4
    backend.resolution = gen_res
    seeds = list(range(sampler_batch))
    with torch.no_grad():
        cond = backend.encode_prompts(["a photo of a cat"] * sampler_batch)
        uncond = backend.encode_prompts([""]).expand(sampler_batch, -1, -1) if guidance != 1.0 else None
    noise = backend.initial_noise(seeds)

    def sample(steps: int):
        return lambda: backend.sample(cond, uncond, noise, steps=steps, guidance=guidance,
                                      generators=image_generators(seeds))

    one, two = timed(sample(1), backend.device), timed(sample(2), backend.device)
    step = max(two - one, 0.5 * one)  # one denoising step (noise in a timing never makes it negative)
    out["unet_sample"] = step / sampler_batch
    out["vae_decode"] = max(one - step, 0.0) / sampler_batch
    return out


def network_ops(arch: str, num_classes: int, size: int, runs_on: str, *, device: torch.device | None,
                rate: float, batch: int, budget: float) -> tuple[Op, Op] | None:
    """(forward per image, training step per image) of a teacher or student network, counted on the meta device;
    timed on `device` (a + c*b fitted from batches of 1 and `batch`) when a call of `batch` is predicted to take at
    most `budget` seconds at `rate`. None for an architecture promptset cannot build (its FLOPs are then unknown)."""
    from ..models import create_student

    try:
        with torch.device("meta"):
            net = create_student(arch, num_classes, size)
    except UserError:
        return None
    fwd, step = train_step_flops(net, torch.zeros(1, 3, size, size, device="meta"))
    forward = Op(f"{arch} forward at {size} px", fwd, runs_on)
    train = Op(f"{arch} training step at {size} px", step, runs_on)
    if device is None or batch * step / rate > budget:
        return forward, train
    torch.manual_seed(0)
    net = create_student(arch, num_classes, size).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def infer(b: int):
        x = torch.rand(b, 3, size, size, device=device)
        return lambda: net.eval()(x)

    def train_step(b: int):
        x = torch.rand(b, 3, size, size, device=device)
        y = torch.randint(0, num_classes, (b,), device=device)

        def run():
            net.train()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    with torch.no_grad():
        forward.timing = _fit(timed(infer(1), device), timed(infer(batch), device), batch)
    train.timing = _fit(timed(train_step(2), device), timed(train_step(batch), device), batch, low=2)
    return forward, train


def _fit(t_low: float, t_high: float, b: int, low: int = 1) -> tuple[float, float]:
    """(seconds per call, seconds per sample) of the line through (low, t_low) and (b, t_high)."""
    if b <= low:
        return 0.0, t_high / b
    c = max((t_high - t_low) / (b - low), 0.0)
    return max(t_low - c * low, 0.0), c
