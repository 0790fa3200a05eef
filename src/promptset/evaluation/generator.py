"""How class-faithful a generator is: sample grids, and the teacher's accuracy on images of "a photo of a {name}".

`pretrain` measures its model with these (`cfg` is a PretrainConfig: seed, batch_size, sample_steps, guidance,
sampler, grid_samples, eval_samples, teacher_size, resolution). Seeds come from (seed, stage, class, i), each image
with its own generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends.base import image_generators
from ..backends.sampling import class_prompts
from ..grids import labeled_grid
from ..seeding import derive_seed


@torch.no_grad()
def class_prompt_samples(backend, names: list[str], per_class: int, cfg, stage: str) -> torch.Tensor:
    """`per_class` images of "a photo of a {name}" per class, seeds from (seed, stage, class, i): (C, n, 3, H, W)."""
    cond_all = backend.encode_prompts(class_prompts(names))  # (C, L, D)
    uncond = backend.encode_prompts([""])  # (1, L, D)
    jobs = [(c, i) for c in range(len(names)) for i in range(per_class)]
    images = []
    for s in range(0, len(jobs), cfg.batch_size):
        batch = jobs[s : s + cfg.batch_size]
        cond = cond_all[torch.tensor([c for c, _ in batch], device=cond_all.device)]
        generators = image_generators([derive_seed(cfg.seed, stage, c, i) for c, i in batch])
        out = backend.sample(cond, uncond.expand(len(batch), -1, -1), backend.initial_noise(generators),
                             steps=cfg.sample_steps, guidance=cfg.guidance, generators=generators)
        images.append(out.float().cpu())
    images = torch.cat(images)
    return images.view(len(names), per_class, *images.shape[1:])


def sample_grid(backend, names, cfg, stage: str):
    """A grid image: a row of `cfg.grid_samples` class-prompt samples per class, labelled with the class name."""
    images = class_prompt_samples(backend, names, cfg.grid_samples, cfg, stage)  # (C, n, 3, H, W)
    return labeled_grid(list(images), names)


@torch.no_grad()
def generator_quality(backend, teacher, names, cfg) -> dict:
    """Accuracy of the teacher on class-prompt samples, resized to its input size: how class-faithful the model is."""
    images = class_prompt_samples(backend, names, cfg.eval_samples, cfg, "pretrain-eval")  # (C, n, 3, H, W)
    c, n = images.shape[:2]
    x = images.flatten(0, 1)
    x = (x.clamp(0, 1) * 255).round() / 255  # as saved to PNG
    if x.shape[-1] != cfg.teacher_size:
        x = F.interpolate(x, size=(cfg.teacher_size, cfg.teacher_size), mode="bicubic", antialias=True,
                          align_corners=False).clamp(0, 1)  # fmt: skip
    device = next(teacher.parameters()).device
    logits = torch.cat([teacher(x[s : s + 256].to(device)).float().cpu() for s in range(0, len(x), 256)])
    target = torch.arange(c).repeat_interleave(n)  # (C*n,)
    correct = (logits.argmax(1) == target).float().view(c, n)
    confidence = logits.softmax(1).gather(1, target[:, None]).view(c, n)
    return {
        "teacher": teacher.spec,
        "teacher_sha256": teacher.weights_sha256,
        "accuracy": float(correct.mean()),
        "chance": 1.0 / c,
        "mean_class_confidence": float(confidence.mean()),
        "per_class": {name: round(float(a), 4) for name, a in zip(names, correct.mean(1))},
        "samples": c * n,
        "samples_per_class": n,
        "teacher_size": cfg.teacher_size,
        "resolution": cfg.resolution,
        "sample_steps": cfg.sample_steps,
        "guidance": cfg.guidance,
        "sampler": cfg.sampler,
        "prompt": "a photo of a {name}",
    }
