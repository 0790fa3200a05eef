"""`promptset teacher`: train the classifier that RDED selection, soft labels (P1), P3 and pretrain's quality check
need, for a dataset that has none.

The network is any student architecture (`convnet3`, `resnet18`, `resnet20`, a timm name, ...), trained on the
ImageFolder with the students' own loop (`evaluation.student.train_student`: AdamW, cosine schedule, random resized
crop and flip), checkpointed every few epochs and resumed by rerunning the command. The file is a plain state dict
whose metadata names the architecture, the class folders, the input size and the normalisation, so `select`,
`generate --soft-labels`, `evaluate` and `pretrain --teacher` take its bare path and refuse it for other classes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..artifacts import load_tensors, save_tensors
from ..config import make_config, opt, require, to_dict
from ..data import display_name, scan_image_folder
from ..devices import resolve_device
from ..errors import UserError
from ..evaluation.methods import load_real_folder
from ..evaluation.student import Recipe, TrainSet, train_student
from ..models import create_student
from ..models.cifar_resnet import IMAGENET_MEAN, IMAGENET_STD
from ..models.teachers import TEACHER_FORMAT
from ..runfolder import ClassInfo
from ..seeding import derive_seed

# options that do not change the trained weights: a rerun with other values resumes or reuses the file
_NOT_IDENTITY = ("out", "device", "progress", "checkpoint_every", "eval_every", "overwrite")


@dataclass
class TeacherConfig:
    data: str = opt("", "ImageFolder of labelled training images (one subfolder per class)")
    out: str = opt("", "the teacher file to write (.safetensors)")
    arch: str = opt("convnet3", "network: convnet3, convnet4, convnetD, resnet18, resnet20, resnet56 or a timm name")
    test: str = opt("", "ImageFolder of held-out images with the same classes: test accuracy is printed and stored")
    image_size: int = opt(32, "input side in pixels (images are resized to it; the teacher resizes what it is given)")
    epochs: int = opt(30, "training epochs")
    batch_size: int = opt(64, "batch size")
    optimizer: str = opt("adamw", "optimizer", choices=["adamw", "adam", "sgd"])
    lr: float = opt(1e-3, "peak learning rate (cosine schedule over all steps)")
    weight_decay: float = opt(0.01, "weight decay on weight matrices and kernels")
    crop_scale: float = opt(0.5, "smallest random-resized-crop area (1 = no crop)")
    flip: bool = opt(True, "random horizontal flips")
    max_images_per_class: int = opt(0, "use the first N images of each class; 0 = all")
    seed: int = opt(0, "random seed (weights, batch order, augmentation)")
    device: str = opt("auto", "torch device")
    eval_every: int = opt(5, "test every N epochs (and after the last) when --test is given")
    checkpoint_every: int = opt(5, "checkpoint every N epochs (rerun the same command to resume)")
    overwrite: bool = opt(False, "replace an existing --out trained with other options")
    progress: bool = opt(True, "show progress bars")


def teacher(cfg: TeacherConfig | None = None, **overrides) -> Path:
    """Train a teacher on `--data`, write `--out` (weights + metadata); returns its path."""
    cfg = make_config(TeacherConfig, cfg, overrides, "teacher")
    out, classes, identity = _prepare(cfg)
    if out.is_file() and not cfg.overwrite:
        meta = _metadata(out)
        if meta.get("identity") == identity:
            print(f"teacher: {out} is already trained with these options (test top-1 "
                  f"{meta.get('test_top1') or 'not measured'}); nothing to do", flush=True)
            return out
        raise UserError(f"--out {out} exists and was trained with other options; pass --overwrite or another --out")
    device = resolve_device(cfg.device)
    folders = [c.folder for c in classes]
    train = load_real_folder(cfg.data, cfg.image_size, "--data", classes, cfg.max_images_per_class,
                             progress=cfg.progress)
    test = load_real_folder(cfg.test, cfg.image_size, "--test", classes, progress=cfg.progress) if cfg.test else None
    print(f"teacher: {cfg.arch} on {len(classes)} classes ({', '.join(folders[:10])}"
          f"{', ...' if len(folders) > 10 else ''}), {len(train.labels)} training images at {cfg.image_size} px"
          + (f", {len(test.labels)} test images" if test is not None else ", no --test (accuracy not measured)")
          + f"; {cfg.epochs} epochs", flush=True)

    recipe = Recipe(
        epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr, momentum=0.9,
        weight_decay=cfg.weight_decay, schedule="cosine", targets="one-hot", temperature=None,
        augment={"random_resized_crop_min_scale": cfg.crop_scale,
                 "ratio": [3 / 4, 4 / 3] if cfg.crop_scale < 1 else None, "flip": cfg.flip, "cutmix_beta": 0.0},
        regen_every=0, eval_every=cfg.eval_every, eval_batch_size=512, channels_last=False, compile=False, amp=False,
    )
    ckpt = Path(f"{out}.checkpoint")
    resume = None
    if ckpt.is_file():
        tensors, meta = load_tensors(ckpt, "teacher checkpoint")
        if meta.get("identity") == identity:
            resume = {"tensors": tensors, "meta": json.loads(meta["state"])}
            print(f"teacher: resuming from epoch {resume['meta']['epoch']} of {cfg.epochs} ({ckpt})", flush=True)

    def checkpoint(state: dict) -> None:
        save_tensors(ckpt, state["tensors"], {"identity": identity, "state": json.dumps(state["meta"])})

    started = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(cfg.seed, "teacher-init"))
        model = create_student(cfg.arch, len(classes), cfg.image_size).to(device)
    result = train_student(
        model, [TrainSet(train.images, train.labels).to(device)],
        None if test is None else TrainSet(test.images, test.labels).to(device), recipe, seed=cfg.seed,
        progress=cfg.progress, desc=f"teacher {cfg.arch}", resume=resume, on_checkpoint=checkpoint,
        checkpoint_every=cfg.checkpoint_every,
    )
    arch, state = _weights(cfg.arch, model)
    meta = {
        "format": TEACHER_FORMAT,
        "arch": arch,
        "num_classes": str(len(classes)),
        "class_folders": json.dumps(folders),
        "class_names": json.dumps([c.name for c in classes]),
        "image_size": str(cfg.image_size),
        "channels": "3",
        "input": "RGB in [0, 1], resized to image_size",
        "normalize": json.dumps({"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                                 "where": "inside the network" if arch == cfg.arch else "applied by promptset"}),
        "test_top1": "" if result["final_top1"] is None else f"{result['final_top1']:.2f}",
        "best_test_top1": "" if result["best_top1"] is None else f"{result['best_top1']:.2f}",
        "test_images": str(0 if test is None else len(test.labels)),
        "train_images": str(len(train.labels)),
        "data_split_hash": train.split_hash,
        "test_split_hash": "" if test is None else test.split_hash,
        "recipe": json.dumps(recipe.__dict__),
        "optimizer_steps": str(result["optimizer_steps"]),
        "identity": identity,
        "promptset_version": __version__,
    }
    save_tensors(out, state, meta)
    ckpt.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    if test is not None:
        print(f"teacher: test top-1 {result['final_top1']:.2f}% on {len(test.labels)} images (best "
              f"{result['best_top1']:.2f}% at epoch {result['best_epoch']}); {seconds:.0f} s; wrote {out}", flush=True)
    else:
        print(f"teacher: {seconds:.0f} s; wrote {out} (no --test: accuracy not measured)", flush=True)
    print(f"teacher: use it as --teacher {out} in select, generate --soft-labels, evaluate and pretrain", flush=True)
    return out


def _prepare(cfg: TeacherConfig) -> tuple[Path, list[ClassInfo], str]:
    """Check the flags and the folders before any compute: (out path, classes, identity of the weights)."""
    require(cfg, data="an ImageFolder of labelled training images (one subfolder per class)",
            out="the teacher file to write, e.g. --out teacher.safetensors")
    out = Path(cfg.out)
    if out.suffix.lower() != ".safetensors":
        raise UserError(f"--out {out} must end in .safetensors (teachers are stored as safetensors only)")
    for name in ("image_size", "epochs", "batch_size", "eval_every", "checkpoint_every"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or cfg.weight_decay < 0 or not 0 < cfg.crop_scale <= 1 or cfg.max_images_per_class < 0:
        raise UserError("--lr must be positive, --weight-decay and --max-images-per-class not negative, "
                        "--crop-scale in (0, 1]")
    index = scan_image_folder(cfg.data, flag="--data")
    classes = [ClassInfo(i, f, display_name(f)) for i, f in enumerate(index.classes)]
    if cfg.test:
        test = scan_image_folder(cfg.test, flag="--test", check_headers=False)
        if test.classes != index.classes:
            raise UserError(f"--test {cfg.test} has classes {test.classes[:10]} but --data {cfg.data} has "
                            f"{index.classes[:10]}; pass a test folder with the same class subfolders")
    create_student(cfg.arch, len(classes), cfg.image_size)  # an unknown name or impossible size fails here
    identity = json.dumps({k: v for k, v in to_dict(cfg).items() if k not in _NOT_IDENTITY}
                          | {"split_hash": index.split_hash()}, sort_keys=True)
    return out, classes, identity


def _metadata(path: Path) -> dict:
    try:
        return load_tensors(path, "teacher file")[1]
    except UserError:
        return {}


def _weights(arch: str, model: torch.nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """(architecture name as load_teacher reads it, state dict): a timm network is stored without its wrapper."""
    from ..models.students import _CONVNET, STUDENTS

    if arch in STUDENTS or _CONVNET.fullmatch(arch):
        return arch, model.state_dict()
    return f"timm/{arch}", model.net.state_dict()
