"""Evaluate's generated rounds: the images of every round that is neither reused nor cached, denoised as one job list.

Round r of d3m / class-prompt draws its jobs with seeds from stage 'generate' (r = 0) or 'eval-round{r}'. An image
depends on its seed and the generation settings only (`backends.sampling`: fixed padded micro batches), never on the
jobs it is denoised with, so the missing jobs of several rounds are denoised together: the sampler pads one tail per
group of rounds instead of one per round, and with seed selection the candidates of many jobs fill each micro batch.
Rounds are grouped up to `GROUP_IMAGES` jobs, and each group's images go to the round cache (`round_cache.py`) as
soon as they are made, so an interrupted evaluate keeps what it finished. `--selection diverse` compares a class's
images with those made before it in the same round, so it keeps generating round by round.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..backends import sampling
from ..backends.diversity import Diversity, job_shares
from ..backends.sampling import Job
from ..backends.selection import best_of_candidates
from ..dist import all_gather_rows, ddp_world
from ..models import label_pixels, teacher_features
from ..progress import progress_bar
from .round_cache import RoundCache

GROUP_IMAGES = 2048  # missing jobs denoised in one group (then cached) at most, unless one round holds more


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


def job_step(gen_batch_size: int, sampler_batch: int, candidates: int) -> int:
    """Jobs per step of `generate_jobs`: `gen_batch_size` rounded up so that a step's images (jobs x candidates)
    fill whole micro batches (a step's tail is padded; the images never depend on the step)."""
    unit = sampler_batch // math.gcd(sampler_batch, max(1, candidates))
    return max(unit, math.ceil(gen_batch_size / unit) * unit)


def generate_jobs(ctx, conditioner, uncond, jobs: list[Job], earlier=None, progress: bool = False,
                  desc: str = "") -> tuple[torch.Tensor, list[Job]]:
    """The patches of `jobs`, (N, P, 3, S, S) uint8, and the jobs with the seeds used (with --candidates G, each
    the chosen candidate's); each rank makes its share (an image depends on its seed only) and every rank gets all.
    `earlier`: --selection diverse's source of a class's earlier images that are not among `jobs` (the round cache).
    `ctx` is evaluate's `methods.Context`."""
    p = ctx.factor**2
    rank, world = ddp_world()
    diversity = Diversity.from_settings(ctx.gen)
    spans = job_shares(jobs, world, whole_classes=diversity.selection is not None)  # as generate shares its jobs
    lo, hi = spans[rank]
    patches, seeds = [], []
    kw = dict(steps=ctx.gen["steps"], guidance=ctx.gen["guidance"], factor=ctx.factor, image_size=ctx.image_size,
              uncond=uncond, micro_batch=ctx.gen["sampler_batch"], diversity=diversity)
    g = int(ctx.cfg.candidates)
    chunk = ctx.gen["sampler_batch"] * p  # the teacher scores fixed batches: a score never depends on the grouping
    spread = diversity.spread(lambda px: teacher_features(ctx.teacher, px, chunk), earlier)  # None: typical

    def logits_of(pixels: torch.Tensor) -> torch.Tensor:
        return label_pixels(ctx.teacher, pixels, chunk)

    step = job_step(int(ctx.cfg.gen_batch_size), int(ctx.gen["sampler_batch"]), g)
    bar = progress_bar(total=hi - lo, desc=desc, unit="image", disable=not progress, leave=False)
    for s in range(lo, hi, step):
        batch = jobs[s : min(s + step, hi)]
        if g > 1:
            batch, out, *_ = best_of_candidates(ctx.backend(), conditioner, batch, g, logits_of, spread=spread, **kw)
        else:
            out = to_uint8(sampling.generate_batch(ctx.backend(), conditioner, batch, **kw))  # (B, P, 3, S, S)
        patches.append(out)
        seeds += [j.seed for j in batch]
        bar.update(len(batch))
    bar.close()
    mine = torch.cat(patches) if patches else torch.zeros(0, p, 3, ctx.image_size, ctx.image_size).byte()
    every = all_gather_rows(mine, len(jobs), spans)
    chosen = all_gather_rows(torch.tensor(seeds, dtype=torch.int64), len(jobs), spans).tolist()
    return every, [Job(j.cls, j.index, int(seed)) for j, seed in zip(jobs, chosen)]


def generate_rounds(ctx, wanted: list[tuple[str, list[Job]]], conditioning: Callable, cache_key: Callable,
                    stats: dict, progress: bool = False, desc: str = "") -> list[tuple[torch.Tensor, list[Job]]]:
    """Every wanted round's patches, (C*K, 3, S, S) uint8 in ImageFolder order, and its jobs as stored (with
    --candidates G, each carries its chosen candidate's seed).

    `wanted`: (stage, jobs) per round; `conditioning()` -> (conditioner, uncond), called only if something must be
    denoised; `cache_key(stage)` -> the round cache's key of that round. Images already in the round cache are taken
    from it; the others are denoised (several rounds together) and added to it."""
    c, p = ctx.num_classes, ctx.factor**2
    per_class = math.ceil(ctx.ipc / p)
    caches = [RoundCache(ctx.run, cache_key(stage)) if ctx.cfg.round_cache else None for stage, _ in wanted]
    todo = [cache.missing(jobs) if cache is not None else jobs for cache, (_, jobs) in zip(caches, wanted)]
    made: dict[int, tuple[torch.Tensor, list[Job]]] = {}
    one_by_one = Diversity.from_settings(ctx.gen).selection is not None
    group: list[int] = []
    for r in range(len(wanted) + 1):  # the last pass flushes the final group
        full = group and (r == len(wanted) or one_by_one or sum(len(todo[k]) for k in group) + len(todo[r])
                          > GROUP_IMAGES)
        if full:
            conditioner, uncond = conditioning()
            jobs = [j for k in group for j in todo[k]]
            earlier = None
            if one_by_one and caches[group[0]] is not None:
                cache, all_jobs = caches[group[0]], wanted[group[0]][1]
                earlier = lambda k, idx, cache=cache, all_jobs=all_jobs: cache.get(  # noqa: E731
                    [all_jobs[k * per_class + i] for i in idx])[0]
            patches, chosen = generate_jobs(ctx, conditioner, uncond, jobs, earlier, progress, desc)
            start = 0
            for k in group:
                n = len(todo[k])
                made[k] = (patches[start : start + n], chosen[start : start + n])
                if caches[k] is not None:
                    caches[k].add(todo[k], made[k][1], made[k][0])
                start += n
            group = []
        if r < len(wanted) and todo[r]:
            group.append(r)
    out = []
    for r, (cache, (_, jobs)) in enumerate(zip(caches, wanted)):
        if cache is not None:
            patches, chosen = cache.get(jobs)
        else:
            patches, chosen = made[r]
        stats["generated"] += len(todo[r])
        stats["reused"] += len(jobs) - len(todo[r])
        per_image = patches.view(c, per_class * p, 3, ctx.image_size, ctx.image_size)
        out.append((per_image[:, : ctx.ipc].reshape(c * ctx.ipc, 3, ctx.image_size, ctx.image_size), chosen))
    return out
