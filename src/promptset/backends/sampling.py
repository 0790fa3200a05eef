"""Sampling from a backend: the samplers, and images from (class, seed) jobs, batched without changing a pixel.

Image i of class c starts from noise drawn with seed derive_seed(seed, stage, c, i) on its own generator, which also
feeds any noise a stochastic sampler adds; with modes, its prompt is the mode `modes.mode_of` spreads (c, i) to.
Kernels round differently for different batch *shapes* (not for different rows of one shape), so images are always
denoised in padded micro-batches of exactly `micro_batch` images: an image depends on (prompts, seed, c, i, micro
batch) only, never on the batch it was asked for in or the process count.
`generate`, `evaluate` (fresh variations) and `pretrain` (sample grids) all sample through here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..artifacts import PromptSet, sha256_bytes
from ..captions import described_prompt
from ..data import cut_patches
from ..dist import span
from ..errors import UserError
from ..seeding import derive_seed
from .base import image_generators

SAMPLERS = ("ddim", "dpm", "euler", "pndm", "ddpm")
SAMPLER_BATCH = 8  # generate's default micro batch


def make_sampler(name: str, config):
    """A sampling scheduler built from the model's scheduler config (swap samplers with `from_config`)."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )

    classes = {
        "ddim": DDIMScheduler,
        "dpm": DPMSolverMultistepScheduler,
        "euler": EulerDiscreteScheduler,
        "pndm": PNDMScheduler,
        "ddpm": DDPMScheduler,
    }
    if name not in classes:
        raise UserError(f"--sampler {name!r} is not one of {list(classes)}")
    return classes[name].from_config(config)


@dataclass(frozen=True)
class Job:
    """One generated image: class index and image index (its seed is derived from both)."""

    cls: int
    index: int
    seed: int


def jobs_for(classes: list[int], images_per_class: int, seed: int, stage: str = "generate") -> list[Job]:
    return [Job(c, i, derive_seed(seed, stage, c, i)) for c in classes for i in range(images_per_class)]


def rank_share(jobs: list[Job], rank: int, world: int) -> tuple[int, int]:
    """This process's jobs [lo, hi): a contiguous share of the (class, index) list, sizes differing by at most one,
    so any class count (one class too) keeps every process busy. `generate` and `evaluate`'s rounds share so."""
    return span(len(jobs), rank, world)


class PromptConditioner:
    """Conditioning states from learned placeholder vectors: one prompt per class, or with modes the prompt of the
    mode image i of class c is spread to (`PromptSet.row_of`, a pure function of (c, i) and the stored weights)."""

    def __init__(self, backend, prompts: PromptSet):
        self.backend = backend
        self.prompts = prompts
        self.layout = backend.layout(prompts.template, prompts.num_vectors)
        self.vectors = prompts.embeddings.to(backend.device)  # (M, V, D)
        self.described: dict[str, object] = {}  # `--describe`: template -> layout, tokenized once

    @torch.no_grad()
    def __call__(self, classes: torch.Tensor, indices: torch.Tensor | None = None,
                 seeds: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """States (B, L, D_text) of each image's prompt; with `seeds` (`--describe random`) each image's own words
        around its token, encoded one image at a time so that its states never depend on its batch."""
        if self.prompts.has_modes:
            if indices is None:
                raise ValueError("prompts with modes need each image's index to pick its mode")
            rows = torch.tensor([self.prompts.row_of(c, i) for c, i in zip(classes.tolist(), indices.tolist())])
        else:
            rows = classes
        if seeds is None:
            return self.backend.encode_placeholder_prompts(self.layout, self.vectors[rows])  # (B, L, D_text)
        states = []
        for row, seed in zip(rows.tolist(), seeds.tolist()):
            template = described_prompt("{token}", seed)
            if template not in self.described:
                self.described[template] = self.backend.layout(template, self.prompts.num_vectors)
            layout = self.described[template]
            states.append(self.backend.encode_placeholder_prompts(layout, self.vectors[row : row + 1]))  # (1, L, D)
        return torch.cat(states)  # (B, L, D_text)


class TextConditioner:
    """Conditioning states from plain text prompts, one per class (the engineered `class-prompt` baseline)."""

    def __init__(self, backend, prompts: list[str], names: list[str] | None = None):
        self.backend = backend
        self.names = names  # `--describe`: the class names the described prompts are built around
        with torch.no_grad():
            self.states = backend.encode_prompts(prompts)  # (C, L, D_text)

    @torch.no_grad()
    def __call__(self, classes: torch.Tensor, indices: torch.Tensor | None = None,
                 seeds: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        if seeds is None:
            return self.states[classes.to(self.states.device)]
        if self.names is None:
            raise ValueError("described prompts need the class names (TextConditioner(..., names=...))")
        return torch.cat([self.backend.encode_prompts([described_prompt(self.names[c], s)])
                          for c, s in zip(classes.tolist(), seeds.tolist())])  # fmt: skip


def class_prompts(names: list[str], template: str = "a photo of a {name}") -> list[str]:
    return [template.format(name=n) for n in names]


def sample_images(backend, conditioner, jobs: list[Job], *, steps: int, guidance: float,
                  uncond: torch.Tensor | None, micro_batch: int | None = SAMPLER_BATCH,
                  diversity=None) -> torch.Tensor:
    """Images for `jobs`, (B, 3, H, W) in [0, 1] on the backend's device, in padded micro-batches.

    The denoiser always sees exactly `micro_batch` images: the last chunk is padded with copies of its last job and
    the copies are dropped. Rows of one batch shape are computed alike, so an image is bit-for-bit the same however
    the jobs are grouped. `micro_batch=None` runs all jobs in one call (fastest; images then depend on len(jobs)).
    """
    chunk = len(jobs) if micro_batch is None else micro_batch
    parts = []
    for s in range(0, len(jobs), chunk):
        part = jobs[s : s + chunk]
        real = len(part)
        part = part + [part[-1]] * (chunk - real)  # pad to the fixed shape
        classes, indices = torch.tensor([j.cls for j in part]), torch.tensor([j.index for j in part])
        if diversity is not None and diversity.described:  # each image's own words, from its own seed
            cond = conditioner(classes, indices, torch.tensor([j.seed for j in part]))  # (b, L, D)
        else:
            cond = conditioner(classes, indices)  # (b, L, D)
        generators = image_generators([j.seed for j in part])
        noise = backend.initial_noise(generators)  # (b, c, h, w)
        neg = uncond.expand(len(part), -1, -1) if uncond is not None else None
        images = backend.sample(cond, neg, noise, steps=steps, guidance=guidance, generators=generators,
                                diversity=diversity)
        parts.append(images[:real].float())  # (real, 3, H, W)
    return torch.cat(parts)


def generate_batch(backend, conditioner, jobs: list[Job], *, steps: int, guidance: float, factor: int,
                   image_size: int, uncond: torch.Tensor | None, micro_batch: int | None = SAMPLER_BATCH,
                   to_cpu: bool = True, diversity=None) -> torch.Tensor:
    """`sample_images` cut into patches: (B, k*k, 3, size, size) in [0, 1] (on CPU unless `to_cpu=False`).
    `diversity`: `backends.diversity.Diversity` (guidance interval, CADS), or None for neither."""
    chunk = len(jobs) if micro_batch is None else micro_batch
    parts = []
    for s in range(0, len(jobs), chunk):  # one micro batch at a time, so memory holds one batch of full images
        images = sample_images(backend, conditioner, jobs[s : s + chunk], steps=steps, guidance=guidance,
                               uncond=uncond, micro_batch=micro_batch, diversity=diversity)
        parts.append(cut_patches(images.cpu() if to_cpu else images, factor, image_size))
    return torch.cat(parts)  # (B, k*k, 3, size, size)


def generation_key(settings: dict) -> str:
    """A short hash of everything that changes a generated pixel (see `generation_settings`)."""
    return sha256_bytes(json.dumps(settings, sort_keys=True).encode())[:16]


def generation_settings(*, prompts_hash: str, template: str, model_hash: str, steps: int, guidance: float,
                        sampler: str, seed: int, resolution: int, factor: int, image_size: int, dtype: str,
                        sampler_batch: int, compile: bool, mode_rule: str = "",
                        cpu_threads: int | None = None, diversity=None) -> dict:
    """Everything that changes a pixel of a generated image, as `generate` records it and `evaluate` compares it.

    cpu_threads: torch's CPU thread count when the images are made on CPU (kernels split reductions by thread, so it
    can change the last bits; `threads.py`), None on a GPU. diversity: `backends.diversity.Diversity`, whose options
    are recorded only when on."""
    settings = {"prompts": prompts_hash, "template": template, "model": model_hash, "steps": int(steps),
                "guidance": float(guidance), "sampler": sampler, "seed": int(seed), "resolution": int(resolution),
                "factor": int(factor), "image_size": int(image_size), "dtype": dtype,
                "sampler_batch": int(sampler_batch)}
    if compile:  # compiled kernels round differently (keys of uncompiled runs stay as they were)
        settings["compile"] = True
    if mode_rule:  # prompts with modes: images are spread over them by this rule (keys without modes unchanged)
        settings["mode_rule"] = mode_rule
    if cpu_threads is not None:
        settings["cpu_threads"] = int(cpu_threads)
    if diversity is not None:  # guidance interval, CADS: keys of runs without them unchanged
        settings.update(diversity.settings())
    return settings


REPLAYABLE = ("cpu_threads",)  # settings a machine can replay (threads.replay) rather than a property of the images


def settings_differences(recorded: dict, current: dict) -> dict[str, tuple]:
    """{setting: (recorded, current)} for every setting that differs between two generation settings."""
    return {k: (recorded.get(k), current.get(k)) for k in sorted(set(recorded) | set(current))
            if recorded.get(k) != current.get(k)}
