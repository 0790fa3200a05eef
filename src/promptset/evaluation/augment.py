"""Batch augmentation for students (P2, P3): random resized crop and flip as one affine warp, and CutMix.

Random numbers are drawn on the CPU from the caller's generators, so a batch is augmented alike on any device and,
under DDP, alike on every rank (each rank warps its slice with the parameters of the whole batch).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..devices import to_device


def crop_flip_params(b: int, generator: torch.Generator, min_scale: float, flip: bool) -> torch.Tensor:
    """Affine matrices (B, 2, 3) of a random resized crop (area in [min_scale, 1], aspect in [3/4, 4/3]) and flip."""
    u = torch.rand(b, 5, generator=generator)  # (B, 5) on CPU: deterministic whatever the device
    if min_scale < 1:
        area = min_scale + (1 - min_scale) * u[:, 0]
        ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * u[:, 1])
        w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)  # fractions of the side
    else:
        w = h = torch.ones(b)
    cx, cy = (1 - w) * (2 * u[:, 2] - 1), (1 - h) * (2 * u[:, 3] - 1)  # crop centre, normalised coordinates
    sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
    return theta


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Apply per-sample affine crops `theta` (B, 2, 3) to images x (B, 3, S, S) with one grid_sample."""
    if len(x) == 0:
        return x
    grid = F.affine_grid(to_device(theta, x.device).to(x.dtype), list(x.shape), align_corners=False)  # (B, S, S, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def cutmix_params(
    b: int, h: int, w: int, generator: torch.Generator, rng: np.random.Generator, beta: float
) -> tuple[tuple[int, int, int, int], torch.Tensor]:
    """One CutMix box (y1, y2, x1, x2) per batch and the permutation (B,) of the batch it is pasted from."""
    cut = math.sqrt(1.0 - rng.beta(beta, beta))
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    box = (max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w))
    return box, torch.randperm(b, generator=generator)


def paste(x: torch.Tensor, source: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    y1, y2, x1, x2 = box
    x = x.clone()
    x[:, :, y1:y2, x1:x2] = source[:, :, y1:y2, x1:x2]
    return x
