"""Inversion's latent cache: the VAE's latent distribution of every training image (and its mirror image) of a class
group, encoded once and kept in `<run>/invert/latents/gNNNNN.safetensors` until the group is trained.

A cache made from other data, another model, resolution or flip setting, or holding NaN/inf (an older run's), is
rebuilt; a team of processes lets its leader encode and the others read the leader's file.
"""

from __future__ import annotations

import torch

from ..artifacts import load_tensors, save_tensors
from ..data import load_class_images
from ..dist import Team
from ..errors import TrainingDiverged, UserError


def latent_cache(backend, cfg, index, classes, g, resolution, folder) -> tuple[list[torch.Tensor], list]:
    """Per class: latent means (N, F, c, h, w) with F = 2 when mirrored copies are kept, and stds (or None)."""
    path = folder / "latents" / f"g{g:05d}.safetensors"
    key = {"model_hash": backend.model_hash, "resolution": str(resolution), "flip": str(cfg.flip),
           "split_hash": index.split_hash(), "classes": ",".join(map(str, classes))}
    if path.is_file():
        try:
            tensors, meta = load_tensors(path, "latent cache")
            finite = all(torch.isfinite(t).all() for t in tensors.values())  # a NaN cache of an older run: rebuilt
            if finite and all(meta.get(k) == v for k, v in key.items()):
                means = [tensors[f"mean{i}"] for i in range(len(classes))]
                stds = [tensors.get(f"std{i}") for i in range(len(classes))]
                return means, stds
        except UserError:
            pass  # a stale or torn cache is simply rebuilt
    means, stds, out = [], [], {}
    for i, c in enumerate(classes):
        images = load_class_images(index, c, resolution, max_pixels=cfg.max_image_pixels)  # (N, 3, R, R) in [0, 1]
        views = [images, images.flip(-1)] if cfg.flip else [images]
        try:
            mean, std = backend.encode_images(torch.cat(views))  # (F*N, c, h, w); refuses NaN/inf latents
        except TrainingDiverged as err:
            raise type(err)(f"class {index.classes[c]} ({len(images)} training images): {err}") from None
        n = images.shape[0]
        mean = mean.view(len(views), n, *mean.shape[1:]).transpose(0, 1).contiguous()  # (N, F, c, h, w)
        means.append(mean)
        out[f"mean{i}"] = mean
        if std is not None:
            std = std.view(len(views), n, *std.shape[1:]).transpose(0, 1).contiguous()
            out[f"std{i}"] = std
        stds.append(std)
    save_tensors(path, out, key)
    return means, stds


def team_latent_cache(team: Team, backend, cfg, index, classes, g, resolution, folder):
    """`latent_cache`, encoded once by the team's leader; the other members read the file it wrote."""
    if team.leader:
        cache = latent_cache(backend, cfg, index, classes, g, resolution, folder)
    team.barrier()
    if not team.leader:
        cache = latent_cache(backend, cfg, index, classes, g, resolution, folder)  # finds the leader's file
    return cache
