"""Train students on a distilled set (D3M prompts or a baseline) and test them on the real test split.

Protocols (DESIGN.md section 6; PAPER_NOTES.md section 2-3):
- P1 (D3M's): stored soft labels, no augmentation. Each training sample x carries the teacher's logits t(x), stored
  once (fp16 by default) and counted in the budget; the loss is KL(softmax(t/T) || softmax(s(x)/T)). "Fresh
  variations": every `regen_every` epochs a new round of images is drawn from the prompts with new seeds and
  relabelled by the teacher; N (= C x ipc) and the batch size stay fixed, so the total number of optimizer steps
  (epochs x ceil(N / B)) is the same as on a fixed set (`regen_every 0`).
- P2: one-hot labels, cross-entropy, random resized crop + horizontal flip on every batch.
- P3 (RDED / SRe2L, Sun et al. 2024): the teacher relabels every augmented batch online (CutMix, then
  KL with temperature 20; RDED's `validation/main.py`), for comparison with published peers.

Methods, each under the same protocol, student, epochs and seeds: `d3m` (the run's prompts), `class-prompt`
(the engineered "a photo of a {name}" through the same generator), `rded` (the run's selected collages, stored as
images), `random-real` (ipc real images per class drawn with each student seed) and `full` (all of --train).
Generated images depend only on (gen seed, round, class, index), never on the student seed: they are what a user
would store (prompts + seeds), so every student seed trains on the same stored set.

Multi-process (`torchrun --nproc-per-node N -m promptset evaluate --run-dir RUN ...`; torchrun's parser takes
`--run` for its own `--run-path`): students train data-parallel (DDP; gloo on CPU, NCCL on cuda:LOCAL_RANK).
`--batch-size` stays the global batch: every rank draws the same batch order and augmentation from the same seeds
and trains on its contiguous slice of each batch, and the averaged gradients are those of one process up to the
order of float sums, so results match a single process closely but not bit for bit. Batch norm uses the global
batch on CUDA (SyncBatchNorm) but each rank's slice on CPU (no CPU kernel). The ranks split the generation of
every round and the teacher's labels and exchange them (each image depends only on its seed), and split the test
split; rank 0 alone prints, shows progress and writes results.json, metrics.jsonl and the labels files.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__
from .artifacts import PromptSet, load_tensors, save_tensors, sha256_bytes
from .atomic import append_jsonl, write_json
from .budget import DTYPE_BYTES, class_list_bytes, real_bytes
from .config import opt, to_dict
from .data import ImageFolderIndex, load_class_images, load_image, scan_image_folder, to_pil, to_tensor
from .dist import agree, barrier, rank_world
from .errors import TrainingDiverged, UserError
from .runfolder import ClassInfo, check_same_classes, require_classes
from .seeding import derive_seed
from .transfer import to_device

METHODS = ("d3m", "class-prompt", "rded", "random-real", "full")
GENERATIVE = ("d3m", "class-prompt")
PROTOCOLS = ("p1", "p2", "p3")
RESULTS_FORMAT = "promptset.eval"
RESULTS_VERSION = 1


@dataclass
class EvaluateConfig:
    # torchrun's own parser takes `--run` for an abbreviation of its `--run-path`: under torchrun pass --run-dir
    run: str = opt(
        "", "run folder (classes.json, prompts.safetensors, collages/, select.json)", aliases=("--run-dir",)
    )
    test: str = opt("", "ImageFolder of real test images, one folder per class in classes.json")
    train: str = opt("", "real training ImageFolder for random-real and full (default: the data select used)")
    method: str = opt("d3m", "comma-separated methods: " + ", ".join(METHODS))
    protocol: str = opt(
        "p1", "p1: stored soft labels, no aug; p2: one-hot + aug; p3: online teacher (RDED)", choices=list(PROTOCOLS)
    )
    student: str = opt("convnet3", "student network (convnet3, convnet4, resnet18, resnet20, resnet56, a timm name)")
    ipc: int = opt(0, "training images (patches) per class (default: the run's generate ipc, else 10)")
    image_size: int = opt(0, "student input side in pixels (default: the dataset resolution from select.json)")
    teacher: str = opt("", "teacher NAME:PATH.safetensors for P1/P3 (default: the one that labelled the run)")
    epochs: int = opt(300, "training epochs (RDED: 300)")
    seeds: int = opt(3, "student runs (seeds seed, seed+1, ...); results are mean and std over them")
    seed: int = opt(0, "first student seed")
    batch_size: int = opt(64, "student batch size (capped at the number of training samples)")
    optimizer: str = opt("adamw", "student optimizer (RDED: adamw)", choices=["adamw", "adam", "sgd"])
    lr: float = opt(1e-3, "peak learning rate (RDED: AdamW 1e-3; try 0.01 for sgd)")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(0.01, "weight decay on weight matrices and kernels, not on biases or norms (RDED: 0.01)")
    schedule: str = opt("cosine", "learning-rate schedule over all optimizer steps", choices=["cosine", "constant"])
    temperature: float = opt(0.0, "soft-label temperature T; 0 = the protocol's default (P1: 1, P3: 20 as RDED)")
    crop_scale: float = opt(
        0.0,
        "smallest random-resized-crop area (P2/P3); 0 = protocol default (P2: 0.5, "
        "P3: 1 = no crop, as RDED at factor 1); 1 = flip only",
    )
    flip: bool = opt(True, "random horizontal flips in P2/P3")
    cutmix: float = opt(1.0, "P3 only: CutMix Beta parameter (RDED: 1.0); 0 = off")
    regen_every: int = opt(
        10, "d3m/class-prompt: new images (new seeds) every N epochs at a fixed step count; 0 = a fixed set"
    )
    label_dtype: str = opt(
        "fp16", "dtype of the stored soft labels (P1), counted in the budget", choices=["fp32", "fp16"]
    )
    class_prompt: str = opt("a photo of a {name}", "class-prompt template; {name} is the class display name")
    backend: str = opt("", "generator backend kind (default: the one invert used)")
    model: str = opt("", "generator model (default: the one invert used)")
    gen_steps: int = opt(0, "denoising steps (default: generate's, else 25)")
    guidance: float = opt(0.0, "classifier-free guidance scale (default: generate's, else 7.5)")
    sampler: str = opt(
        "", "sampler (default: generate's, else ddim)", choices=["", "ddim", "dpm", "euler", "pndm", "ddpm"]
    )
    gen_seed: int = opt(
        -1, "seed of the generated images (default: generate's, else 0); round 0 uses generate's seeds"
    )
    resolution: int = opt(0, "generation resolution in pixels (default: invert's)")
    factor: int = opt(0, "cut each generated image into factor x factor patches (default: select's)")
    gen_batch_size: int = opt(32, "images per progress step while regenerating (does not change the images)")
    sampler_batch: int = opt(0, "images denoised together, padded to exactly this many (default: generate's, else 8); "
                             "images depend on it in the last bits, larger is faster")
    dtype: str = opt("fp32", "generator dtype", choices=["fp32", "fp16", "bf16"])
    eval_every: int = opt(1, "test every N epochs (and after the last); best-epoch accuracy is over tested epochs")
    eval_batch_size: int = opt(512, "batch size on the test split")
    device: str = opt("auto", "torch device (auto: CUDA when available)")
    channels_last: bool = opt(False, "channels-last memory format for the student (faster convnets on GPU)")
    compile: bool = opt(False, "torch.compile the student (worth it on GPU for long runs)")
    amp: bool = opt(False, "bf16 autocast for the student on CUDA")
    report: bool = opt(True, "also write eval/report.md, report.csv and accuracy_vs_bytes.png")
    progress: bool = opt(True, "show progress bars")


# ------------------------------------------------------------------------------------------------------------
# data held as uint8 tensors on the device


@dataclass
class TrainSet:
    """One round of training samples: images (N, 3, S, S) uint8, class labels (N,), stored logits (N, C) or None."""

    images: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> TrainSet:
        logits = None if self.logits is None else self.logits.to(device)
        return TrainSet(self.images.to(device), self.labels.to(device), logits)


@dataclass
class RealFolder:
    """A real ImageFolder loaded at one resolution: its index, images (N, 3, S, S) uint8 and labels (N,)."""

    index: ImageFolderIndex
    images: torch.Tensor
    labels: torch.Tensor
    split_hash: str


_FOLDERS: dict[tuple[str, int, int, str], RealFolder] = {}  # per-process cache of loaded real splits


def load_real_folder(
    root: str | Path, size: int, flag: str, classes: list[ClassInfo], limit: int = 0, progress: bool = True
) -> RealFolder:
    """Scan `root`, check its classes against classes.json, and load it at `size` px (cached per process)."""
    index = scan_image_folder(root, flag=flag, check_headers=False)
    check_same_classes(
        [c.folder for c in classes],
        index.classes,
        f"{flag} {root}",
        f"pass a folder with exactly these class subfolders: {[c.folder for c in classes][:10]}",
    )
    if limit:
        index = index.subset(0, limit)
    split_hash = index.split_hash()
    key = (str(index.root), size, limit, split_hash)
    if key not in _FOLDERS:
        images, labels = [], []
        for c in tqdm(range(index.num_classes), desc=f"load {flag}", unit="class", disable=not progress, leave=False):
            x = load_class_images(index, c, size)  # (n_c, 3, S, S) in [0, 1], exact multiples of 1/255
            images.append(_to_uint8(x))
            labels.append(torch.full((len(x),), c, dtype=torch.long))
        _FOLDERS[key] = RealFolder(index, torch.cat(images), torch.cat(labels), split_hash)
    return _FOLDERS[key]


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------------------------
# the training loop (one function, data-parallel under torchrun)


@dataclass
class Recipe:
    """Everything that defines how a student trains, resolved from the config and the protocol."""

    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    targets: str  # "one-hot" | "stored-soft" | "online-teacher"
    temperature: float | None
    augment: dict | None  # {"random_resized_crop_min_scale", "ratio", "flip", "cutmix_beta"} or None
    regen_every: int
    eval_every: int
    eval_batch_size: int
    channels_last: bool
    compile: bool
    amp: bool


def _crop_flip_params(b: int, generator: torch.Generator, min_scale: float, flip: bool) -> torch.Tensor:
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


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Apply per-sample affine crops `theta` (B, 2, 3) to images x (B, 3, S, S) with one grid_sample."""
    if len(x) == 0:
        return x
    grid = F.affine_grid(to_device(theta, x.device).to(x.dtype), list(x.shape), align_corners=False)  # (B, S, S, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_resized_crop_flip(
    x: torch.Tensor, generator: torch.Generator, min_scale: float, flip: bool
) -> torch.Tensor:
    """Per-sample random resized crop (area in [min_scale, 1], aspect in [3/4, 4/3]) and flip, one grid_sample."""
    return _warp(x, _crop_flip_params(x.shape[0], generator, min_scale, flip))


def _cutmix_params(
    b: int, h: int, w: int, generator: torch.Generator, rng: np.random.Generator, beta: float
) -> tuple[tuple[int, int, int, int], torch.Tensor]:
    """One CutMix box (y1, y2, x1, x2) per batch and the permutation (B,) of the batch it is pasted from."""
    cut = math.sqrt(1.0 - rng.beta(beta, beta))
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    box = (max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w))
    return box, torch.randperm(b, generator=generator)


def _paste(x: torch.Tensor, source: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    y1, y2, x1, x2 = box
    x = x.clone()
    x[:, :, y1:y2, x1:x2] = source[:, :, y1:y2, x1:x2]
    return x


def cutmix(x: torch.Tensor, generator: torch.Generator, rng: np.random.Generator, beta: float) -> torch.Tensor:
    """CutMix (Yun et al. 2019) as in RDED: one Beta(beta, beta) box per batch, pasted from a shuffled batch."""
    box, perm = _cutmix_params(x.shape[0], x.shape[2], x.shape[3], generator, rng, beta)
    return _paste(x, x[perm.to(x.device)], box)


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)), batch mean: RDED's loss (no T^2 factor; Adam is invariant to it)."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_q = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and conv kernels only (RDED's `get_parameters`)."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "weight" in n]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    groups = _param_groups(model, recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=False)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=recipe.lr)
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.999))


# ------------------------------------------------------------------------------------------------------------
# data parallelism (torchrun): every process holds the whole distilled set and draws the same random numbers, so
# all agree on every global batch; each trains on its contiguous slice of it and DDP averages the gradients


def _ddp_world() -> tuple[int, int]:
    """(rank, world size) of the joined process group; (0, 1) when there is none (a single process)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def _span(n: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous slice [lo, hi) of n items: sizes differ by at most one, earlier ranks take more."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


_NCCL_GROUPS: dict[int, object] = {}


def _ddp_group(device: torch.device):
    """The process group that reduces gradients: the default gloo group on CPU, an NCCL group on CUDA."""
    if device.type != "cuda":
        return None
    key = id(torch_dist.group.WORLD)
    if key not in _NCCL_GROUPS:  # new_group is collective: every rank reaches this in the same order
        _NCCL_GROUPS[key] = torch_dist.new_group(backend="nccl")
    return _NCCL_GROUPS[key]


def _all_gather_rows(part: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's `_span` slice (this rank's is `part`) of a (total, ...) tensor, on every rank."""
    rank, world = _ddp_world()
    if world == 1:
        return part
    spans = [_span(total, r, world) for r in range(world)]
    width = max(hi - lo for lo, hi in spans)
    buf = torch.zeros((width, *part.shape[1:]), dtype=part.dtype)
    buf[: len(part)] = part.cpu()
    out = [torch.empty_like(buf) for _ in range(world)]
    torch_dist.all_gather(out, buf)  # on the CPU through gloo
    return torch.cat([o[: hi - lo] for o, (lo, hi) in zip(out, spans)]).to(part.device)


def _is_batchnorm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm)


def _sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Batch norm over the global batch (CUDA only: SyncBatchNorm has no CPU kernel)."""
    try:
        from timm.layers import convert_sync_batchnorm  # also converts timm's fused BatchNormAct layers
    except ImportError:
        convert_sync_batchnorm = torch.nn.SyncBatchNorm.convert_sync_batchnorm
    return convert_sync_batchnorm(model)


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, test: TrainSet, recipe: Recipe, *, distributed: bool = False) -> float:
    """Top-1 accuracy (%) on the test split held on the device.

    distributed: every rank holds the same model; each tests its `_span` slice and the counts are summed.
    """
    model.eval()
    device = test.images.device
    rank, world = _ddp_world() if distributed else (0, 1)
    lo, hi = _span(len(test), rank, world)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for s in range(lo, hi, recipe.eval_batch_size):
        e = min(s + recipe.eval_batch_size, hi)
        x = test.images[s:e].float().div_(255)  # (B, 3, S, S)
        if recipe.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.amp and device.type == "cuda"):
            pred = model(x).argmax(dim=1)
        correct += (pred == test.labels[s:e]).sum()
    count = correct.cpu()
    if world > 1:
        torch_dist.all_reduce(count)
    return 100.0 * count.item() / len(test)


def train_student(
    model: torch.nn.Module,
    rounds: list[TrainSet],
    test: TrainSet,
    recipe: Recipe,
    *,
    seed: int,
    teacher: torch.nn.Module | None = None,
    on_epoch=None,
    progress: bool = True,
    desc: str = "train",
) -> dict:
    """Train `model` on `rounds` (round r serves epochs [r*k, (r+1)*k), k = regen_every) and test every epoch.

    Every round has the same N samples, so each epoch is ceil(N / B) optimizer steps whatever the schedule of
    rounds. Random state (batch order, augmentation, CutMix) comes from generators seeded with `seed`, on the CPU,
    so a CPU run is bit-for-bit reproducible. Returns the per-epoch history and the optimizer step count.

    In a joined process group (torchrun) it trains data-parallel: every rank must call it with the same arguments
    (same data, same initial weights). Every rank draws the same batch order and augmentation for the global batch
    of B samples and trains on its contiguous slice of it; DDP averages the gradients, each rank's loss weighted by
    its share of the batch, so the steps are those of one process up to the order of float sums. Batch norm
    layers use the global batch's statistics on CUDA (SyncBatchNorm) and each rank's slice on CPU (no CPU kernel),
    with rank 0's running statistics for testing. The test split is sharded across ranks.
    """
    device = test.images.device
    n = len(rounds[0])
    if any(len(r) != n for r in rounds):
        raise ValueError("every round must hold the same number of samples")
    rank, world = _ddp_world()
    batch = min(recipe.batch_size, n)
    steps_per_epoch = math.ceil(n / batch)
    total_steps = recipe.epochs * steps_per_epoch
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    sync_bn = world > 1 and device.type == "cuda"
    if sync_bn:
        model = _sync_batchnorm(model)  # the same parameter tensors, so the optimizer below still owns them
    optimizer = _optimizer(model, recipe)
    group = None
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        group = _ddp_group(device)
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, process_group=group
        )
    step_model = torch.compile(train_model) if recipe.compile else train_model
    test_model = step_model if world == 1 else model  # DDP's forward is collective; testing is per rank
    if recipe.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps))
        )
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    generator = torch.Generator().manual_seed(derive_seed(seed, "student-batches"))
    rng = np.random.default_rng(derive_seed(seed, "cutmix"))
    aug = recipe.augment
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=recipe.amp and device.type == "cuda")
    history, steps = [], 0
    bar = tqdm(range(recipe.epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        data = rounds[min(epoch // recipe.regen_every, len(rounds) - 1) if recipe.regen_every else 0]
        perm = to_device(torch.randperm(n, generator=generator), device)
        step_model.train()
        loss_sum = torch.zeros((), device=device)
        for s in range(steps_per_epoch):
            idx = perm[s * batch : (s + 1) * batch]  # the global batch
            lo, hi = _span(len(idx), rank, world)
            mine = idx[lo:hi]  # this rank's slice of it (all of it in one process)
            x = data.images[mine].float().div_(255)  # (b, 3, S, S) in [0, 1]
            if aug is not None:
                theta = _crop_flip_params(len(idx), generator, aug["random_resized_crop_min_scale"], aug["flip"])
                x = _warp(x, theta[lo:hi])
                if aug.get("cutmix_beta", 0) > 0:
                    box, shuffle = _cutmix_params(len(idx), x.shape[2], x.shape[3], generator, rng, aug["cutmix_beta"])
                    src = shuffle[lo:hi]
                    if world == 1:
                        source = x[to_device(src, device)]
                    else:  # the pasted samples may belong to other ranks: augment them here too
                        source = _warp(data.images[idx[to_device(src, device)]].float().div_(255), theta[src])
                    x = _paste(x, source, box)
            if recipe.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(**autocast):
                logits = step_model(x)  # (b, C)
                if len(mine) == 0:  # a last global batch smaller than the world: DDP still needs a backward
                    loss = logits.float().sum() * 0.0
                elif recipe.targets == "one-hot":
                    loss = F.cross_entropy(logits.float(), data.labels[mine])
                elif recipe.targets == "stored-soft":
                    loss = soft_label_loss(logits, data.logits[mine], recipe.temperature)
                else:
                    with torch.no_grad():
                        target = teacher(x)  # the teacher relabels the augmented batch (P3)
                    loss = soft_label_loss(logits, target, recipe.temperature)
            optimizer.zero_grad(set_to_none=True)
            if world > 1 and len(mine) * world != len(idx):
                # DDP averages over ranks: weigh each rank's batch mean by its share, for the mean over the batch
                (loss * (len(mine) * world / len(idx))).backward()
            else:
                loss.backward()
            optimizer.step()
            scheduler.step()
            steps += 1
            loss_sum += loss.detach() * len(mine)
        if world > 1:
            total = loss_sum.cpu()
            torch_dist.all_reduce(total)  # once per epoch, through gloo
            loss_sum = total.to(device)
        epoch_loss = (loss_sum / n).item()  # the only host sync of the epoch (besides testing)
        if not math.isfinite(epoch_loss):
            raise TrainingDiverged(f"student loss is {epoch_loss} at epoch {epoch + 1}; lower --lr")
        acc = None
        if (epoch + 1) % recipe.eval_every == 0 or epoch + 1 == recipe.epochs:
            if world > 1 and not sync_bn:
                for buf in model.buffers():  # batch norm running statistics: rank 0's on every rank
                    torch_dist.broadcast(buf, 0, group=group)
            acc = test_accuracy(test_model, test, recipe, distributed=world > 1)
        row = {
            "epoch": epoch + 1,
            "loss": epoch_loss,
            "test_top1": acc,
            "steps": steps,
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        bar.set_postfix(loss=f"{epoch_loss:.3f}", acc="-" if acc is None else f"{acc:.1f}")
    bar.close()
    tested = [r for r in history if r["test_top1"] is not None]
    best = max(tested, key=lambda r: r["test_top1"])
    return {
        "history": history,
        "optimizer_steps": steps,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": batch,
        "world_size": world,
        "sync_batchnorm": sync_bn,
        "final_top1": history[-1]["test_top1"],
        "best_top1": best["test_top1"],
        "best_epoch": best["epoch"],
    }


# ------------------------------------------------------------------------------------------------------------
# the distilled set of each method: training rounds plus its stored bytes


@dataclass
class Distilled:
    """What one method trains on: rounds of samples, and what storing it costs."""

    rounds: list[TrainSet]
    components: dict[str, int]  # stored bytes per component
    ipc: int | None
    info: dict = field(default_factory=dict)
    png_bytes: int | None = None

    @property
    def stored_bytes(self) -> int:
        return sum(self.components.values())


@dataclass
class Context:
    """Resolved inputs shared by every method of one evaluate call."""

    cfg: EvaluateConfig
    run: Path
    classes: list[ClassInfo]
    device: torch.device
    image_size: int
    ipc: int
    factor: int
    gen: dict  # steps, guidance, sampler, seed, resolution, backend, model
    teacher: torch.nn.Module | None
    needs_soft: bool  # P1: the teacher's logits are stored with every sample
    rounds: int
    train_limit: int
    _backend: object = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def backend(self):
        if self._backend is None:
            from .backends import create_backend

            if not self.gen["backend"] or not self.gen["model"]:
                raise UserError(
                    f"{self.run} does not say which generator made it (no invert section in config.yaml); "
                    "pass --backend and --model"
                )

            self._backend = create_backend(
                self.gen["backend"],
                self.gen["model"],
                device=self.cfg.device,
                dtype=self.cfg.dtype,
                sampler=self.gen["sampler"],
            )
            if self.gen["resolution"]:
                self._backend.resolution = int(self.gen["resolution"])
        return self._backend


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The teacher's logits on uint8 images (N, 3, S, S), computed on the images' device: (N, C) fp32."""
    out = [teacher(images[s : s + batch_size].float().div_(255)).float() for s in range(0, len(images), batch_size)]
    return torch.cat(out)


def _shared_teacher_logits(teacher: torch.nn.Module, images: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`teacher_logits` of every image, each rank labelling its `_span` slice; every rank gets them all."""
    rank, world = _ddp_world()
    if world == 1:
        return teacher_logits(teacher, images)
    lo, hi = _span(len(images), rank, world)
    part = teacher_logits(teacher, images[lo:hi]) if hi > lo else torch.zeros(0, num_classes, device=images.device)
    return _all_gather_rows(part, len(images))


def _stored_logits(logits: torch.Tensor, dtype: str) -> torch.Tensor:
    """Logits as the student sees them: rounded to the stored dtype."""
    return logits.to(torch.float16 if dtype == "fp16" else torch.float32)


def _label_bytes(ctx: Context, samples: int) -> dict[str, int]:
    if not ctx.needs_soft:
        return {}
    return {"soft_labels": samples * ctx.num_classes * DTYPE_BYTES[ctx.cfg.label_dtype]}


def _png_bytes(images: torch.Tensor) -> int:
    """PNG size of uint8 images (N, 3, S, S), encoded one by one as budget.py does for real images."""
    total = 0
    for img in images:
        buf = io.BytesIO()
        to_pil(img.float().div(255)).save(buf, format="PNG", optimize=True)
        total += buf.tell()
    return total


def plan_generative(ctx: Context, method: str) -> dict[str, int]:
    """Stored bytes of d3m / class-prompt, known before any image is generated."""
    c, per_class = ctx.num_classes, math.ceil(ctx.ipc / ctx.factor**2)
    if method == "d3m":
        parts = {
            "prompts": PromptSet.load(ctx.run / "prompts.safetensors").stored_bytes(),
            "class_list": class_list_bytes([x.folder for x in ctx.classes]),
        }
    else:
        parts = {"prompt_strings": sum(len(p.encode("utf-8")) for p in _class_prompt_strings(ctx))}
    parts["seeds"] = ctx.rounds * c * per_class * 4  # int32 per generated image per round
    parts.update(_label_bytes(ctx, ctx.rounds * c * ctx.ipc))
    return parts


def _class_prompt_strings(ctx: Context) -> list[str]:
    from .generate import class_prompts

    return class_prompts([x.name for x in ctx.classes], ctx.cfg.class_prompt)


def build_generative(ctx: Context, method: str) -> Distilled:
    """Rounds of images regenerated from the prompts (images stay on the device, never written as PNG)."""
    from .generate import PromptConditioner, TextConditioner, generate_batch, jobs_for

    c, p = ctx.num_classes, ctx.factor**2
    per_class = math.ceil(ctx.ipc / p)
    labels = torch.arange(c).repeat_interleave(ctx.ipc)  # (C*K,)
    rounds, seeds, logits, reused = [], [], [], False
    conditioner = uncond = None
    rank, world = _ddp_world()
    show = ctx.cfg.progress and rank == 0
    bar = tqdm(range(ctx.rounds), desc=f"{method}: images", unit="round", disable=not show, leave=False)
    for r in bar:
        stage = "generate" if r == 0 else f"eval-round{r}"
        jobs = jobs_for(list(range(c)), per_class, ctx.gen["seed"], stage)
        images = stored = None
        if r == 0 and method == "d3m":
            images, stored = _reuse_generated(ctx, per_class)
            reused = images is not None
        if images is None:
            if conditioner is None:
                backend = ctx.backend()
                if method == "d3m":
                    prompts = PromptSet.load(ctx.run / "prompts.safetensors")
                    prompts.check_backend(backend, ctx.run / "prompts.safetensors")
                    conditioner = PromptConditioner(backend, prompts)
                else:
                    conditioner = TextConditioner(backend, _class_prompt_strings(ctx))
                with torch.no_grad():
                    uncond = backend.encode_prompts([""]) if ctx.gen["guidance"] != 1.0 else None
            # each rank makes its slice of the round (an image depends on its seed only) and all get every image
            lo, hi = _span(len(jobs), rank, world)
            patches = []
            for s in range(lo, hi, ctx.cfg.gen_batch_size):
                out = generate_batch(
                    ctx.backend(),
                    conditioner,
                    jobs[s : min(s + ctx.cfg.gen_batch_size, hi)],
                    steps=ctx.gen["steps"],
                    guidance=ctx.gen["guidance"],
                    factor=ctx.factor,
                    image_size=ctx.image_size,
                    uncond=uncond,
                    micro_batch=ctx.gen["sampler_batch"],
                )  # (B, P, 3, S, S)
                patches.append(_to_uint8(out))
            mine = torch.cat(patches) if patches else torch.zeros(0, p, 3, ctx.image_size, ctx.image_size).byte()
            per_image = _all_gather_rows(mine, len(jobs)).view(c, per_class * p, 3, ctx.image_size, ctx.image_size)
            images = per_image[:, : ctx.ipc].reshape(c * ctx.ipc, 3, ctx.image_size, ctx.image_size)
        images = images.to(ctx.device)
        if ctx.needs_soft:
            stored = (
                stored
                if stored is not None
                else _stored_logits(_shared_teacher_logits(ctx.teacher, images, c), ctx.cfg.label_dtype)
            )
            logits.append(stored.cpu())
        seeds.append(torch.tensor([j.seed for j in jobs], dtype=torch.int32))
        rounds.append(
            TrainSet(images, labels.to(ctx.device), None if stored is None else stored.to(ctx.device).float())
        )
    tensors = {"seeds": torch.stack(seeds)}  # (R, C*per_class)
    if logits:
        tensors["soft_labels"] = torch.stack(logits)  # (R, C*K, C)
    components = plan_generative(ctx, method)
    actual = {"seeds": tensors["seeds"].numel() * 4}
    if logits:
        actual["soft_labels"] = tensors["soft_labels"].numel() * tensors["soft_labels"].element_size()
    assert all(components[k] == v for k, v in actual.items()), (components, actual)
    labels_file = _write_labels(ctx, method, tensors)
    info = {
        "rounds": ctx.rounds,
        "regen_every": ctx.cfg.regen_every,
        "images_per_class_per_round": per_class,
        "round0_reused_generated": reused,
        "labels_file": labels_file,
        "generation": dict(ctx.gen),
    }
    if method == "class-prompt":
        info["prompts"] = _class_prompt_strings(ctx)
    return Distilled(rounds, components, ctx.ipc, info)


def _write_labels(ctx: Context, method: str, tensors: dict[str, torch.Tensor]) -> str:
    """Store the seeds (and P1 soft labels) of every round in `<run>/eval/labels/`, as the budget counts them."""
    teacher = getattr(ctx.teacher, "weights_sha256", "none") if ctx.needs_soft else "onehot"
    # one file per distinct stored set: the name hashes everything that changes its tensors
    what = json.dumps([ctx.gen, ctx.factor, ctx.image_size, ctx.cfg.regen_every, ctx.cfg.label_dtype, teacher])
    name = f"{method}-ipc{ctx.ipc}-r{ctx.rounds}-{sha256_bytes(what.encode())[:12]}.safetensors"
    meta = {
        "format": "promptset.eval-labels",
        "method": method,
        "ipc": str(ctx.ipc),
        "rounds": str(ctx.rounds),
        "regen_every": str(ctx.cfg.regen_every),
        "factor": str(ctx.factor),
        "image_size": str(ctx.image_size),
        "class_folders": json.dumps([c.folder for c in ctx.classes]),
        "generation": json.dumps(ctx.gen),
        "label_kind": "logits" if ctx.needs_soft else "none",
        "label_dtype": ctx.cfg.label_dtype,
        "teacher": getattr(ctx.teacher, "spec", "none") if ctx.needs_soft else "none",
        "seed_stages": "round 0: 'generate', round r: 'eval-round{r}'",
    }
    path = ctx.run / "eval" / "labels" / name
    if rank_world()[0] == 0:
        save_tensors(path, tensors, meta)
    return str(path.relative_to(ctx.run))


def _reuse_generated(ctx: Context, per_class: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Round 0 of d3m from `generate`'s PNGs (and its soft labels, when the same teacher made them), if they match."""
    gen_dir, labels_path, prompts_path = (
        ctx.run / "generated",
        ctx.run / "labels.safetensors",
        ctx.run / "prompts.safetensors",
    )
    if not (labels_path.is_file() and (gen_dir / "manifest.jsonl").is_file()):
        return None, None
    if labels_path.stat().st_mtime < prompts_path.stat().st_mtime:
        return None, None  # prompts were learned again after this generation
    if ctx.cfg.backend or ctx.cfg.model or ctx.cfg.resolution:
        return None, None  # generate used invert's model; only then are the images known to match
    tensors, meta = load_tensors(labels_path, "labels file")
    wanted = {
        "factor": str(ctx.factor),
        "image_size": str(ctx.image_size),
        "seed": str(ctx.gen["seed"]),
        "steps": str(ctx.gen["steps"]),
        "sampler": ctx.gen["sampler"],
        "sampler_batch": str(ctx.gen["sampler_batch"]),
    }
    if any(meta.get(k) != v for k, v in wanted.items()) or float(meta.get("guidance", "nan")) != ctx.gen["guidance"]:
        return None, None
    if json.loads(meta.get("class_folders", "[]")) != [c.folder for c in ctx.classes] or int(meta["ipc"]) < ctx.ipc:
        return None, None
    files = [gen_dir / c.folder / f"{i:05d}.png" for c in ctx.classes for i in range(ctx.ipc)]
    if not all(f.is_file() for f in files):
        return None, None
    images = _to_uint8(torch.stack([to_tensor(load_image(f)) for f in files]))  # (C*K, 3, S, S)
    if tuple(images.shape[-2:]) != (ctx.image_size, ctx.image_size):
        return None, None
    stored = None
    sha = getattr(ctx.teacher, "weights_sha256", None)
    if ctx.needs_soft and "soft_labels" in tensors and meta.get("teacher_sha256") == sha:
        soft = tensors["soft_labels"]  # (C*per_class_gen, P, C)
        gen_per_class, p = int(meta["images_per_class"]), ctx.factor**2
        rows = [soft[c * gen_per_class + i // p, i % p] for c in range(ctx.num_classes) for i in range(ctx.ipc)]
        stored = _stored_logits(torch.stack(rows).float(), ctx.cfg.label_dtype)
    return images, stored


def build_rded(ctx: Context) -> Distilled:
    """The run's selected collages (RDED's distilled set), cut into patches; the first ipc per class (lowest CE)."""
    from .generate import cut_patches

    folder = ctx.run / "collages"
    index = scan_image_folder(folder, flag="rded collages", check_headers=False)
    check_same_classes([c.folder for c in ctx.classes], index.classes, f"{folder}", "run select again in this run")
    chosen = []
    for c, files in enumerate(index.files):
        patches = []
        for f in files:
            patches.append(cut_patches(to_tensor(load_image(f))[None], ctx.factor, ctx.image_size)[0])  # (P, 3, S, S)
            if sum(len(x) for x in patches) >= ctx.ipc:
                break
        got = torch.cat(patches) if patches else torch.zeros(0, 3, ctx.image_size, ctx.image_size)
        if len(got) < ctx.ipc:
            raise UserError(
                f"rded: class {index.classes[c]!r} has {len(got)} selected patches in {folder}, fewer "
                f"than --ipc {ctx.ipc}; lower --ipc or select more images"
            )
        chosen.append(_to_uint8(got[: ctx.ipc]))
    images = torch.cat(chosen)
    return _real_distilled(
        ctx, images, torch.arange(ctx.num_classes).repeat_interleave(ctx.ipc), ctx.ipc, {"source": str(folder)}
    )


def build_random_real(ctx: Context, train: RealFolder, seed: int) -> Distilled:
    """ipc real images per class from --train, drawn with the student seed (the baseline's own randomness)."""
    picks = []
    for c in range(ctx.num_classes):
        where = (train.labels == c).nonzero().squeeze(1)
        if len(where) < ctx.ipc:
            raise UserError(
                f"random-real: class {ctx.classes[c].folder!r} has {len(where)} training images, fewer "
                f"than --ipc {ctx.ipc}"
            )
        g = torch.Generator().manual_seed(derive_seed(seed, "random-real", c))
        picks.append(where[torch.randperm(len(where), generator=g)[: ctx.ipc]])
    idx = torch.cat(picks)
    return _real_distilled(
        ctx, train.images[idx], train.labels[idx], ctx.ipc, {"source": str(train.index.root), "indices": idx.tolist()}
    )


def build_full(ctx: Context, train: RealFolder) -> Distilled:
    return _real_distilled(
        ctx, train.images, train.labels, None, {"source": str(train.index.root), "images": len(train.labels)}
    )


def _real_distilled(
    ctx: Context, images: torch.Tensor, labels: torch.Tensor, ipc: int | None, info: dict
) -> Distilled:
    images = images.to(ctx.device)
    stored = (
        _stored_logits(_shared_teacher_logits(ctx.teacher, images, ctx.num_classes), ctx.cfg.label_dtype).float()
        if ctx.needs_soft
        else None
    )
    components = {"images_raw": len(images) * 3 * ctx.image_size**2}
    components.update(_label_bytes(ctx, len(images)))
    return Distilled([TrainSet(images, labels.to(ctx.device), stored)], components, ipc, info)


# ------------------------------------------------------------------------------------------------------------
# orchestration


def _read_yaml(path: Path) -> dict:
    import yaml

    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _labels_meta(run: Path) -> dict:
    path = run / "labels.safetensors"
    if not path.is_file():
        return {}
    return load_tensors(path, "labels file")[1]


def _recipe(cfg: EvaluateConfig) -> Recipe:
    augment = None
    if cfg.protocol in ("p2", "p3"):
        scale = cfg.crop_scale or (0.5 if cfg.protocol == "p2" else 1.0)
        augment = {
            "random_resized_crop_min_scale": scale,
            "ratio": [3 / 4, 4 / 3] if scale < 1 else None,
            "flip": cfg.flip,
            "cutmix_beta": cfg.cutmix if cfg.protocol == "p3" else 0.0,
        }
    targets = {"p1": "stored-soft", "p2": "one-hot", "p3": "online-teacher"}[cfg.protocol]
    temperature = None if cfg.protocol == "p2" else (cfg.temperature or (1.0 if cfg.protocol == "p1" else 20.0))
    return Recipe(
        cfg.epochs,
        cfg.batch_size,
        cfg.optimizer,
        cfg.lr,
        cfg.momentum,
        cfg.weight_decay,
        cfg.schedule,
        targets,
        temperature,
        augment,
        cfg.regen_every,
        cfg.eval_every,
        cfg.eval_batch_size,
        cfg.channels_last,
        cfg.compile,
        cfg.amp,
    )


def _validate(cfg: EvaluateConfig) -> list[str]:
    if not cfg.run:
        raise UserError("--run is required (a run folder made by select/invert)")
    if not cfg.test:
        raise UserError("--test is required: the real test split as an ImageFolder (one folder per class)")
    methods = [m.strip() for m in cfg.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--method {cfg.method!r}: unknown {unknown}; choose from {', '.join(METHODS)}")
    if cfg.protocol not in PROTOCOLS:
        raise UserError(f"--protocol {cfg.protocol!r} is not one of {list(PROTOCOLS)}")
    for name in ("epochs", "seeds", "batch_size", "eval_every", "eval_batch_size", "gen_batch_size"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    for name in ("ipc", "image_size", "regen_every", "gen_steps", "resolution", "factor", "sampler_batch"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative")
    if cfg.lr <= 0 or cfg.temperature < 0 or cfg.cutmix < 0 or not 0 <= cfg.crop_scale <= 1:
        raise UserError("--lr must be positive, --temperature and --cutmix not negative, --crop-scale in [0, 1]")
    return list(dict.fromkeys(methods))


def _context(cfg: EvaluateConfig, methods: list[str]) -> tuple[Context, dict]:
    from .backends.base import resolve_device
    from .generate import SAMPLER_BATCH
    from .models import load_teacher

    run = Path(cfg.run)
    classes = require_classes(run)
    folders = [c.folder for c in classes]
    select_info = json.loads((run / "select.json").read_text()) if (run / "select.json").is_file() else {}
    run_cfg = _read_yaml(run / "config.yaml")
    invert_cfg = run_cfg.get("invert", {}) or {}
    meta = _labels_meta(run)
    if meta.get("class_folders"):
        check_same_classes(
            folders,
            json.loads(meta["class_folders"]),
            f"{run / 'labels.safetensors'}",
            "run generate again in this run folder",
        )
    if "d3m" in methods:
        if not (run / "prompts.safetensors").is_file():
            raise UserError(f"--method d3m needs {run / 'prompts.safetensors'}; run invert first")
        prompts = PromptSet.load(run / "prompts.safetensors")
        check_same_classes(
            folders, prompts.class_folders, f"{run / 'prompts.safetensors'}", "run invert again in this run folder"
        )
    image_size = cfg.image_size or int(select_info.get("image_size") or meta.get("image_size") or 32)
    ipc = cfg.ipc or int(meta.get("ipc") or 10)
    factor = cfg.factor or int(meta.get("factor") or select_info.get("factor") or 1)
    prompts_meta = (
        load_tensors(run / "prompts.safetensors", "prompts file")[1] if (run / "prompts.safetensors").is_file() else {}
    )
    gen = {
        "backend": cfg.backend or invert_cfg.get("backend") or prompts_meta.get("backend", ""),
        "model": cfg.model or invert_cfg.get("model") or prompts_meta.get("model_id", ""),
        "resolution": cfg.resolution or int(invert_cfg.get("resolution") or 0),
        "steps": cfg.gen_steps or int(meta.get("steps") or 25),
        "guidance": cfg.guidance or float(meta.get("guidance") or 7.5),
        "sampler": cfg.sampler or meta.get("sampler") or "ddim",
        "seed": cfg.gen_seed if cfg.gen_seed >= 0 else int(meta.get("seed") or 0),
        "sampler_batch": cfg.sampler_batch or int(meta.get("sampler_batch") or SAMPLER_BATCH),  # generate's default
    }
    needs_teacher = cfg.protocol in ("p1", "p3")
    spec = (
        cfg.teacher
        or meta.get("teacher")
        or (select_info.get("teacher") if select_info.get("teacher") != "none" else "")
    )
    if needs_teacher and (not spec or spec == "none"):
        raise UserError(
            f"--protocol {cfg.protocol} needs a teacher for its soft labels: pass --teacher "
            "NAME:PATH.safetensors (a classifier trained on the classes in classes.json)"
        )
    device = resolve_device(cfg.device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if rank_world()[1] > 1 and device.type == "cuda":
        if device.index != local_rank:
            raise UserError(
                f"--device {cfg.device}: under torchrun every process trains on its own GPU, cuda:LOCAL_RANK "
                f"(here cuda:{local_rank}); pass --device cuda or auto"
            )
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"process {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): start at most "
                "one process per GPU (--nproc-per-node), or pass --device cpu"
            )
    teacher = None
    if spec and spec != "none" and (needs_teacher or cfg.teacher):
        teacher = load_teacher(spec, num_classes=None, device=device)
        if teacher.num_classes != len(classes):
            raise UserError(
                f"teacher {spec} predicts {teacher.num_classes} classes but classes.json lists "
                f"{len(classes)} ({', '.join(folders[:10])}); pass a teacher trained on these classes "
                "in this order"
            )
        try:
            with torch.no_grad():
                teacher(torch.zeros(1, 3, image_size, image_size, device=device))
        except RuntimeError as err:
            raise UserError(
                f"teacher {spec} does not take {image_size} px images ({str(err).splitlines()[0]}); "
                "pass --image-size the teacher was trained at"
            ) from None
    rounds = math.ceil(cfg.epochs / cfg.regen_every) if cfg.regen_every else 1
    limit = int((run_cfg.get("select") or {}).get("max_images_per_class") or 0) if not cfg.train else 0
    ctx = Context(
        cfg, run, classes, device, image_size, ipc, factor, gen, teacher, cfg.protocol == "p1", rounds, limit
    )
    return ctx, select_info


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "promptset": __version__}
    for pkg in ("torch", "diffusers", "transformers", "timm", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _mean_std(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "per_seed": [float(v) for v in values]}


def entry_key(method: str, protocol: str, student: str, ipc: int | None, regen_every: int) -> str:
    """results.json key: method/protocol/student/ipc, plus the variation schedule for generated methods."""
    key = f"{method}/{protocol}/{student}/ipc{'all' if ipc is None else ipc}"
    if method in GENERATIVE:
        key += f"/regen{regen_every}" if regen_every else "/fixed"
    return key


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def _load_results(path: Path) -> dict:
    if not path.is_file():
        return {"format": RESULTS_FORMAT, "format_version": RESULTS_VERSION, "entries": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); move it away to start a new results file") from None
    if data.get("format") != RESULTS_FORMAT or not isinstance(data.get("entries"), dict):
        raise UserError(f"{path} is not a promptset results file; move it away to start a new one")
    return data


def evaluate(cfg: EvaluateConfig | None = None, **overrides) -> dict:
    """Train `--seeds` students per method; write `<run>/eval/results.json` and `metrics.jsonl`; return the results."""
    cfg = cfg or EvaluateConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise UserError(f"evaluate: unknown option {k!r}")
        setattr(cfg, k, v)
    rank, world = rank_world()
    main = rank == 0  # under torchrun only rank 0 prints, shows progress and writes
    try:  # validate on every rank before anything is written
        methods, ctx, select_info, test, train = _inputs(cfg, show=cfg.progress and main)
    except UserError as err:
        agree(err)
        raise
    agree(None)  # joins the gloo process group of a multi-process run
    if world > 1 and ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    from .models import create_student

    classes, size = ctx.classes, ctx.image_size
    recipe = _recipe(cfg)
    eval_dir = ctx.run / "eval"
    if main:
        eval_dir.mkdir(parents=True, exist_ok=True)
    test_set = TrainSet(test.images, test.labels).to(ctx.device)
    split_hash = {
        "train": train.split_hash if train is not None else select_info.get("split_hash"),
        "test": test.split_hash,
    }
    per_image = real_bytes(1, len(classes), size)
    if main:
        _print_plan(ctx, methods, train, per_image)
    if main and world > 1 and ctx.device.type != "cuda":
        with torch.random.fork_rng(devices=[]):  # leaves the global random state as on the other ranks
            student = create_student(cfg.student, len(classes), size)
        if any(_is_batchnorm(m) for m in student.modules()):
            print(
                f"evaluate: {cfg.student} has batch norm, which on CPU normalises each process's slice of the "
                f"batch (about {cfg.batch_size // world} samples), not the whole batch as one process does",
                flush=True,
            )

    new_entries = {}
    for method in methods:
        started = time.time()
        shared = None
        if method in GENERATIVE:
            shared = build_generative(ctx, method)
        elif method == "rded":
            shared = build_rded(ctx)
        elif method == "full":
            shared = build_full(ctx, train)
        runs, png = [], None
        for s in range(cfg.seed, cfg.seed + cfg.seeds):
            data = shared if shared is not None else build_random_real(ctx, train, s)
            if method in ("rded", "random-real", "full") and png is None and main:
                png = _png_bytes(data.rounds[0].images.cpu())
            ipc = data.ipc
            key = entry_key(method, cfg.protocol, cfg.student, ipc, cfg.regen_every)
            with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
                torch.manual_seed(derive_seed(s, "student-init"))
                if ctx.device.type == "cuda":
                    torch.cuda.manual_seed_all(derive_seed(s, "student-init"))
                model = create_student(cfg.student, len(classes), size).to(ctx.device)
                log = _epoch_logger(eval_dir / "metrics.jsonl", key, method, cfg, s) if main else None
                result = train_student(
                    model,
                    data.rounds,
                    test_set,
                    recipe,
                    seed=s,
                    teacher=ctx.teacher,
                    on_epoch=log,
                    progress=cfg.progress and main,
                    desc=f"{method} {cfg.protocol} seed {s}",
                )
            result["seed"] = s
            runs.append(result)
        if main:
            new_entries[key] = _entry(
                key, method, cfg, ctx, data, runs, png, per_image, split_hash, recipe, time.time() - started
            )
            if method == "random-real":
                new_entries[key]["distilled"].pop("indices", None)  # differs per seed; not useful in the summary

    results_path = eval_dir / "results.json"
    if main:
        results = _load_results(results_path)
        results["run"] = str(ctx.run)
        results["entries"].update(new_entries)
        results["updated_at"] = _now()
        write_json(results_path, results)
        print_table(list(new_entries.values()))
    barrier()  # the other ranks return what rank 0 wrote
    if not main:
        return _load_results(results_path)
    if cfg.report:
        from .report import report

        report(runs=str(ctx.run), out=str(eval_dir))
    return results


def _inputs(cfg: EvaluateConfig, show: bool) -> tuple:
    """Everything evaluate can refuse, checked before any output exists (reads only, so every rank runs it)."""
    methods = _validate(cfg)
    ctx, select_info = _context(cfg, methods)
    test = load_real_folder(cfg.test, ctx.image_size, "--test", ctx.classes, progress=show)
    train = None
    if any(m in ("random-real", "full") for m in methods):
        train_root = cfg.train or select_info.get("data")
        if not train_root:
            raise UserError("--method random-real/full needs --train (the real training ImageFolder)")
        train = load_real_folder(train_root, ctx.image_size, "--train", ctx.classes, ctx.train_limit, progress=show)
    from .models import create_student

    create_student(cfg.student, len(ctx.classes), ctx.image_size)  # refuse an unknown student before any compute
    return methods, ctx, select_info, test, train


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _epoch_logger(path: Path, key: str, method: str, cfg: EvaluateConfig, seed: int):
    def log(row: dict) -> None:
        append_jsonl(
            path, {"key": key, "method": method, "protocol": cfg.protocol, "student": cfg.student, "seed": seed, **row}
        )

    return log


def _entry(key, method, cfg, ctx, data: Distilled, runs, png, per_image, split_hash, recipe, wall) -> dict:
    recipe_dict = dict(recipe.__dict__)
    recipe_dict.update(
        {
            "batch_size": runs[0]["batch_size"],
            "steps_per_epoch": runs[0]["steps_per_epoch"],
            "world_size": runs[0]["world_size"],  # processes (torchrun); batch_size is the global batch
            "sync_batchnorm": runs[0]["sync_batchnorm"],
            "loss": {
                "one-hot": "cross-entropy",
                "stored-soft": "KL(teacher_T || student_T), batchmean",
                "online-teacher": "KL(teacher_T || student_T), batchmean",
            }[recipe.targets],
            "config": to_dict(cfg),
        }
    )
    teacher = None
    if ctx.teacher is not None:
        teacher = {"spec": ctx.teacher.spec, "sha256": ctx.teacher.weights_sha256}
    return {
        "key": key,
        "method": method,
        "protocol": cfg.protocol,
        "student": cfg.student,
        "ipc": data.ipc,
        "num_classes": len(ctx.classes),
        "image_size": ctx.image_size,
        "train_samples": len(data.rounds[0]),
        "epochs": cfg.epochs,
        "seeds": [r["seed"] for r in runs],
        "final_top1": _mean_std([r["final_top1"] for r in runs]),
        "best_top1": {**_mean_std([r["best_top1"] for r in runs]), "best_epoch": [r["best_epoch"] for r in runs]},
        "optimizer_steps": runs[0]["optimizer_steps"],
        "stored_bytes": data.stored_bytes,
        "stored_components": data.components,
        "png_bytes": png,
        "ipc_equivalent": data.stored_bytes / per_image,
        "not_counted": {
            "generator": ctx.gen.get("model") if method in GENERATIVE else None,
            "teacher": teacher["spec"] if teacher and recipe.targets != "one-hot" else None,
        },
        "distilled": data.info,
        "teacher": teacher,
        "recipe": recipe_dict,
        "split_hash": split_hash,
        "versions": _versions(),
        "device": str(ctx.device)
        + (f" ({torch.cuda.get_device_name(ctx.device)})" if ctx.device.type == "cuda" else ""),
        "wall_time_s": wall,
        "finished_at": _now(),
    }


def _print_plan(ctx: Context, methods: list[str], train: RealFolder | None, per_image: int) -> None:
    """Stored bytes and IPC-equivalent of every method, printed before any compute is spent."""
    cfg = ctx.cfg
    print(
        f"evaluate {ctx.run}: {cfg.student} on {len(ctx.classes)} classes at {ctx.image_size} px, protocol "
        f"{cfg.protocol}, {cfg.epochs} epochs x {cfg.seeds} seeds",
        flush=True,
    )
    for m in methods:
        if m in GENERATIVE:
            parts = plan_generative(ctx, m)
        elif m == "full":
            n = len(train.labels)
            parts = {"images_raw": n * 3 * ctx.image_size**2, **_label_bytes(ctx, n)}
        else:
            n = ctx.ipc * len(ctx.classes)
            parts = {"images_raw": n * 3 * ctx.image_size**2, **_label_bytes(ctx, n)}
        total = sum(parts.values())
        detail = " + ".join(f"{k} {fmt_bytes(v)}" for k, v in parts.items())
        print(
            f"  {m:<13} stored {fmt_bytes(total):>10} = {total / per_image:8.3f} IPC-equivalent  ({detail})",
            flush=True,
        )


def print_table(entries: list[dict]) -> None:
    header = (
        f"{'method':<13} {'protocol':<8} {'IPC':>4} {'stored':>10} {'IPC-eq':>8} "
        f"{'final top-1':>14} {'best top-1':>14}"
    )
    print(header)
    print("-" * len(header))
    for e in entries:
        f, b = e["final_top1"], e["best_top1"]
        ipc = "all" if e["ipc"] is None else str(e["ipc"])
        print(
            f"{e['method']:<13} {e['protocol']:<8} {ipc:>4} {fmt_bytes(e['stored_bytes']):>10} "
            f"{e['ipc_equivalent']:>8.3f} {f['mean']:>7.2f} ± {f['std']:<5.2f} {b['mean']:>7.2f} ± {b['std']:<5.2f}"
        )
