"""D3M step 1 (from RDED, Sun et al. CVPR 2024): per class, the teacher's most class-typical crops, as collages.

For every real image x of class c, take `num_crops` random resized crops and keep the one with the lowest teacher
cross-entropy CE(f(crop), c); stitch the class's best patches (lowest CE first) into `factor x factor` collages.
Without a teacher (`--teacher none`), each image is resized and center-cropped instead (the paper's ablation).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic import save_image, write_json
from ..config import make_config, opt, to_dict
from ..data import (
    MAX_IMAGE_PIXELS,
    ImageFolderIndex,
    load_image,
    resize_center_crop,
    scan_image_folder,
    to_pil,
    to_tensor,
    verify_images,
)
from ..dist import barrier, prepared_everywhere, rank_world
from ..errors import UserError
from ..progress import progress_bar
from ..runfolder import (
    absolute_spec,
    check_run_folder,
    check_same_classes,
    read_classes,
    remove_outputs,
    remove_stale_tmp,
    resolve_class_names,
    write_classes,
    write_config,
)
from ..seeding import derive_seed

STAGING = "collages.partial"  # finished classes of an interrupted select; a rerun resumes from it


@dataclass
class SelectConfig:
    data: str = opt("", "ImageFolder of real training images (one subfolder per class)")
    out: str = opt("", "run folder to create; collages go to <out>/collages")
    teacher: str = opt("none", "teacher as NAME:PATH.safetensors (e.g. resnet20:weights.safetensors), or none")
    num_crops: int = opt(5, "random resized crops scored per image (RDED: 5)")
    factor: int = opt(1, "collage side in patches (k): 1 for 32/64 px data, 2 for 224 px data")
    resolution: int = opt(32, "collage side in pixels; patches are resolution/factor")
    crop_scale: float = opt(0.08, "smallest crop area as a fraction of the image (RDED: 0.08)")
    teacher_size: int = opt(0, "side the teacher sees a crop at; 0 = resolution")
    max_images_per_class: int = opt(0, "use the first N images of each class (RDED mipc=300); 0 = all")
    num_collages: int = opt(0, "collages per class; 0 = as many as the selected patches fill")
    class_names: str = opt("", "file with display names (JSON {folder: name} or one per line); default: folder names")
    max_image_pixels: int = opt(MAX_IMAGE_PIXELS, "decompression-bomb limit: refuse images with more pixels than this")
    batch_size: int = opt(256, "teacher batch size")
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "torch device")
    overwrite: bool = opt(False, "replace a different run already in --out")
    progress: bool = opt(True, "show progress bars")


def random_resized_crop_box(h: int, w: int, scale: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a square random crop covering [scale, 1] of the image area."""
    area = h * w
    for _ in range(10):
        target = area * (scale + (1 - scale) * torch.rand(1, generator=generator).item())
        side = int(round(math.sqrt(target)))
        if 0 < side <= min(h, w):
            top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
            return top, left, side, side
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def best_patches(
    images, teacher, label: int, cfg: SelectConfig, seeds: list[int], device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the crop with the lowest teacher CE for `label`. Returns patches (N, 3, p, p) and their CE (N,)."""
    patch = cfg.resolution // cfg.factor
    tsize = cfg.teacher_size or cfg.resolution
    crops = []
    for img, seed in zip(images, seeds):
        gen = torch.Generator().manual_seed(seed)
        w, h = img.size
        for _ in range(cfg.num_crops):
            top, left, ch, cw = random_resized_crop_box(h, w, cfg.crop_scale, gen)
            crop = img.crop((left, top, left + cw, top + ch)).resize((patch, patch), resample=3)
            crops.append(to_tensor(crop))
    crops = torch.stack(crops)  # (N*K, 3, p, p)
    losses = []
    with torch.no_grad():
        for i in range(0, len(crops), cfg.batch_size):
            x = crops[i : i + cfg.batch_size].to(device)
            if tsize != patch:
                x = F.interpolate(x, size=(tsize, tsize), mode="bilinear", align_corners=False, antialias=True)
            logits = teacher(x).float()
            target = torch.full((len(x),), label, device=device)
            losses.append(F.cross_entropy(logits, target, reduction="none").cpu())
    ce = torch.cat(losses).view(len(images), cfg.num_crops)  # (N, K)
    best = ce.argmin(dim=1)  # (N,)
    chosen = crops.view(len(images), cfg.num_crops, *crops.shape[1:])[torch.arange(len(images)), best]
    return chosen, ce[torch.arange(len(images)), best]


def stitch(patches: torch.Tensor, factor: int) -> torch.Tensor:
    """(k*k, 3, p, p) patches, row-major -> one (3, k*p, k*p) collage."""
    k = factor
    rows = [torch.cat(list(patches[r * k : (r + 1) * k]), dim=2) for r in range(k)]
    return torch.cat(rows, dim=1)


def select(cfg: SelectConfig | None = None, **overrides) -> Path:
    """Write `<out>/collages/<class>/<idx>.png` and `<out>/select.json`; returns the collages folder."""
    cfg = make_config(SelectConfig, cfg, overrides, "select")
    rank, world = rank_world()
    run = Path(cfg.out or ".")
    plan = prepared_everywhere(_prepare, cfg, run)
    index, teacher, device = plan.index, plan.teacher, plan.device
    collages, staging = run / "collages", run / STAGING
    if not plan.replaced and _finished(run, index):
        if rank == 0:
            print(f"select: {collages} is already complete for this data and config; nothing to do "
                  "(pass --overwrite with other options to redo it)", flush=True)
        return collages

    if rank == 0:
        if plan.replaced:
            remove_outputs(run, ["collages", STAGING, "select.json"])
        write_config(run, "select", to_dict(cfg))
        if plan.rewrite_classes:
            write_classes(run, index.classes, plan.names)
        remove_stale_tmp(staging)  # half-written files of a killed run; finished classes are kept
        remove_stale_tmp(run, recursive=False)
        staging.mkdir(parents=True, exist_ok=True)
        print(_data_summary(cfg.data, index), flush=True)
    barrier()

    split_hash = index.split_hash()
    patch = cfg.resolution // cfg.factor
    per_collage = cfg.factor**2
    mine = list(range(rank, index.num_classes, world))
    for c in progress_bar(mine, desc="select", disable=not (cfg.progress and rank == 0), unit="class"):
        folder = staging / index.classes[c]
        done = staging / f"{index.classes[c]}.done.json"
        if done.is_file() and json.loads(done.read_text()).get("split_hash") == split_hash:
            continue  # finished on an earlier run
        if folder.exists():
            shutil.rmtree(folder)
        images = [load_image(p, max_pixels=cfg.max_image_pixels) for p in index.files[c]]
        if teacher is None:
            patches = torch.stack([to_tensor(resize_center_crop(im, patch)) for im in images])
            ce = None
            order = torch.arange(len(images))
        else:
            seeds = [derive_seed(cfg.seed, "select", c, i) for i in range(len(images))]
            patches, ce = best_patches(images, teacher, c, cfg, seeds, device)
            order = torch.argsort(ce, stable=True)
        available = len(images) // per_collage
        n_collages = min(cfg.num_collages, available) if cfg.num_collages else available
        for j in range(n_collages):
            ids = order[j * per_collage : (j + 1) * per_collage]
            save_image(folder / f"{j:05d}.png", to_pil(stitch(patches[ids], cfg.factor)))
        stats = {"folder": index.classes[c], "num_images": len(images), "num_collages": n_collages,
                 "mean_ce_selected": None if ce is None else float(ce[order[: n_collages * per_collage]].mean()),
                 "mean_ce_all": None if ce is None else float(ce.mean())}
        write_json(done, stats | {"split_hash": split_hash})
    barrier()

    if rank == 0:
        per_class = []
        for f in index.classes:
            stats = json.loads((staging / f"{f}.done.json").read_text())
            stats.pop("split_hash")
            per_class.append(stats)
        for f in index.classes:
            (staging / f"{f}.done.json").unlink()
        if collages.exists():
            shutil.rmtree(collages)
        staging.rename(collages)
        write_json(run / "select.json", {
            "data": str(Path(cfg.data).resolve()),
            "split_hash": split_hash,
            "teacher": absolute_spec(cfg.teacher),
            "teacher_sha256": getattr(teacher, "weights_sha256", None),
            "resolution": cfg.resolution,
            "factor": cfg.factor,
            "patch_size": patch,
            "image_size": cfg.resolution,
            "num_crops": cfg.num_crops,
            "crop_scale": cfg.crop_scale,
            "seed": cfg.seed,
            "classes": per_class,
        })
    barrier()
    return collages


@dataclass
class _Plan:
    """What `select` resolved and checked before writing anything."""

    index: ImageFolderIndex
    names: list[str]
    teacher: torch.nn.Module | None
    device: torch.device
    rewrite_classes: bool  # classes.json is missing or lists other classes
    replaced: bool  # --overwrite replaces a different earlier select


def _prepare(cfg: SelectConfig, run: Path) -> _Plan:
    """Everything select can refuse, checked before any output exists (reads only, so every rank runs it)."""
    from ..devices import resolve_device
    from ..models import load_teacher

    if not cfg.data or not cfg.out:
        raise UserError("--data and --out are required")
    if cfg.factor < 1 or cfg.resolution < 1 or cfg.resolution % cfg.factor:
        raise UserError(f"--resolution {cfg.resolution} must be a positive multiple of --factor {cfg.factor}")
    if cfg.num_crops < 1:
        raise UserError("--num-crops must be at least 1")
    if not 0 < cfg.crop_scale <= 1:
        raise UserError(f"--crop-scale {cfg.crop_scale} must be in (0, 1]")
    if cfg.max_image_pixels < 1:
        raise UserError(f"--max-image-pixels must be positive, got {cfg.max_image_pixels}")
    index = scan_image_folder(cfg.data, flag="--data", max_pixels=cfg.max_image_pixels)
    if cfg.max_images_per_class:
        index = index.subset(0, cfg.max_images_per_class)
    per_collage = cfg.factor**2
    for name, files in zip(index.classes, index.files):
        if len(files) < per_collage:
            raise UserError(f"--data {Path(cfg.data) / name}: class {name!r} has {len(files)} images, fewer than one "
                            f"{cfg.factor}x{cfg.factor} collage needs; lower --factor or add images")
    replaced = check_run_folder(run, "select", to_dict(cfg), overwrite=cfg.overwrite)
    existing = read_classes(run)
    if existing is not None and not cfg.overwrite:
        check_same_classes([c.folder for c in existing], index.classes, f"--data {cfg.data}",
                           "pass the data the run was made from, or a new --out (or --overwrite)")
    rewrite_classes = existing is None or [c.folder for c in existing] != index.classes
    names = resolve_class_names(index.classes, cfg.class_names)
    device = resolve_device(cfg.device)
    teacher = load_teacher(cfg.teacher, num_classes=index.num_classes, device=device, class_folders=index.classes)
    verify_images(index, max_pixels=cfg.max_image_pixels, progress=cfg.progress and rank_world()[0] == 0)
    return _Plan(index, names, teacher, device, rewrite_classes, replaced)


def _finished(run: Path, index: ImageFolderIndex) -> bool:
    """A complete earlier select of the same data (its config was already checked to be the same)."""
    info_path, collages = run / "select.json", run / "collages"
    if not info_path.is_file() or not collages.is_dir() or (run / STAGING).exists():
        return False
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        counts = {c["folder"]: int(c["num_collages"]) for c in info["classes"]}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return False
    if info.get("split_hash") != index.split_hash() or list(counts) != index.classes:
        return False
    return all(len(list((collages / f).glob("*.png"))) == n for f, n in counts.items())


def _data_summary(data: str, index: ImageFolderIndex) -> str:
    return (f"select: --data {data}: {index.num_classes} classes, {index.num_images} images; skipped "
            f"{index.skipped_hidden} hidden and {index.skipped_non_image} non-image entries")
