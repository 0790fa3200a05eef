"""Seed selection: draw G candidate images per stored image and keep the one the teacher finds most typical of its
class (lowest cross-entropy, as RDED keeps the most typical crop), at no stored byte beyond the seed; or, with
`--selection diverse`, one that is in-class and far from the class's earlier images (`diversity.SpreadSelection`).

Candidate g of the image whose own seed is s = derive_seed(seed, stage, class, index) has seed s for g = 0 and
derive_seed(s, "candidate", g) otherwise: a pure function of (seed, class, index, candidate), and G = 1 is exactly the
set made without selection. The chosen candidate's seed is what is stored, so it alone regenerates the chosen image
(an image depends on its seed and the sampler settings only, see `sampling`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..data import quantize_pixels
from ..seeding import derive_seed
from . import sampling
from .sampling import Job

# `--candidates 0` (the default of generate and evaluate) resolves to this when a teacher can score the candidates.
# Measured in the CIFAR-10 world (BENCHMARKS.md, seed selection, IPC 10, 3 seeds): under P1 G = 4 gave 38.6% against
# 35.4% for G = 1 at the same stored bytes and G = 8 no more (38.4%); under P2 38.9% (G = 4) and 39.5% (G = 8) against
# 38.5%. Four candidates take most of the gain for four times the generation time.
AUTO_CANDIDATES = 4


def candidate_seed(seed: int, candidate: int) -> int:
    """The seed of candidate `candidate` of an image whose own seed is `seed` (candidate 0 is the image itself)."""
    return seed if candidate == 0 else derive_seed(seed, "candidate", candidate)


def candidate_seeds(seed: int, candidates: int) -> list[int]:
    return [candidate_seed(seed, g) for g in range(candidates)]


@torch.no_grad()
def best_of_candidates(backend, conditioner, jobs: list[Job], candidates: int,
                       logits_of: Callable[[torch.Tensor], torch.Tensor], *, steps: int, guidance: float, factor: int,
                       image_size: int, uncond, micro_batch: int | None, diversity=None, spread=None,
                       ) -> tuple[list[Job], torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every job, the candidate whose patches have the lowest mean teacher cross-entropy for the job's class, or
    with `spread` (a `diversity.SpreadSelection`) its choice, made from the same cross-entropies and the patches'
    teacher features.

    `logits_of` maps uint8 patches (N, 3, S, S), exactly what the stored files hold, to the teacher's logits (N, C)
    on the CPU (the teacher is fed them at its own input size). `diversity`: the sampler's options (`generate_batch`).

    Returns:
        The chosen jobs (their seeds are the chosen candidates'), their patches (B, P, 3, S, S) uint8 on the CPU,
        every candidate's cross-entropy (B, G), and the chosen candidate of each job (B,).
    """
    expanded = [Job(j.cls, j.index, candidate_seed(j.seed, g)) for j in jobs for g in range(candidates)]
    patches = sampling.generate_batch(backend, conditioner, expanded, steps=steps, guidance=guidance, factor=factor,
                                      image_size=image_size, uncond=uncond, micro_batch=micro_batch,
                                      diversity=diversity)  # (B*G, P, 3, S, S) in [0, 1]
    pixels = quantize_pixels(patches)  # what a PNG (or evaluate's uint8 round) holds
    b, p = len(jobs), pixels.shape[1]
    if spread is None:
        logits = logits_of(pixels.flatten(0, 1)).float().cpu()  # (B*G*P, C)
    else:
        features, logits = spread.features_of(pixels.flatten(0, 1))  # (B*G*P, D), (B*G*P, C)
    target = torch.tensor([j.cls for j in expanded]).repeat_interleave(p)  # (B*G*P,)
    ce = F.cross_entropy(logits.float(), target, reduction="none").view(b, candidates, p).mean(-1)  # (B, G)
    if spread is None:
        best = ce.argmin(1)  # the first of equal scores: the lowest candidate
    else:
        best = spread.choose(jobs, ce, features.view(b, candidates, p, -1))
    chosen = [expanded[i * candidates + int(g)] for i, g in enumerate(best)]
    picked = pixels.view(b, candidates, *pixels.shape[1:])[torch.arange(b), best]  # (B, P, 3, S, S) uint8
    return chosen, picked, ce, best
