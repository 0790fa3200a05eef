"""Training and testing one student (ConvNet, ResNet, timm) on a distilled set, single-process or DDP.

The recipe (optimizer, schedule, targets, augmentation, variation rounds) is a `Recipe`; the data are `TrainSet`s
of uint8 images held on the device. Losses: cross-entropy on one-hot labels (P2), KL to stored soft labels (P1) or to
the teacher's labels of the augmented batch (P3), as RDED.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..devices import to_device
from ..dist import all_reduce_sum, broadcast_buffers, ddp_world, gradient_group, span
from ..errors import TrainingDiverged
from ..progress import progress_bar
from ..seeding import derive_seed
from .augment import crop_flip_params, cutmix_params, paste, warp


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
    round_order: str = "sequential"  # fresh rounds: "sequential" (round r alone serves its epochs) or "mixed"


def epoch_samples(epoch: int, n: int, rounds: int, seed: int) -> torch.Tensor:
    """The mixed round order: the `n` sample positions of `epoch` in the pool of all rounds (`rounds * n` samples,
    round r at positions [r*n, (r+1)*n)). The epochs walk through one seeded permutation of the pool after another,
    so every `rounds` epochs see every sample of every round exactly once and a resumed run draws the same ones."""
    pool = rounds * n
    start = epoch * n
    out, done = [], 0
    while done < n:
        j, at = divmod(start + done, pool)
        perm = torch.randperm(pool, generator=torch.Generator().manual_seed(derive_seed(seed, "round-pool", j)))
        take = min(n - done, pool - at)
        out.append(perm[at : at + take])
        done += take
    return torch.cat(out)


def pool_of(rounds: list[TrainSet]) -> TrainSet:
    """All rounds as one set (images, labels and stored logits concatenated in round order)."""
    logits = None if rounds[0].logits is None else torch.cat([r.logits for r in rounds])
    return TrainSet(torch.cat([r.images for r in rounds]), torch.cat([r.labels for r in rounds]), logits)


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)), batch mean: RDED's loss (no T^2 factor; Adam is invariant to it)."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_q = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and conv kernels only (RDED's `get_parameters`)."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "weight" in n]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    groups = param_groups(model, recipe.weight_decay)
    # foreach: one multi-tensor kernel per update op instead of a Python loop over parameters (torch picks it only on
    # CUDA); the same arithmetic per element, so the same bits (tests/test_evaluate.py), and faster small students
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=False, foreach=True)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=recipe.lr, foreach=True)
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.999), foreach=True)


def is_batchnorm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm)


def sync_batchnorm(model: torch.nn.Module, group=None) -> torch.nn.Module:
    """Batch norm over the global batch, its statistics reduced in `group` (CUDA only: SyncBatchNorm has no CPU
    kernel). Without a group SyncBatchNorm uses the default group, gloo here, which stages every reduction through
    the host: pass the NCCL group (`dist.gradient_group`)."""
    try:
        from timm.layers import convert_sync_batchnorm  # also converts timm's fused BatchNormAct layers
    except ImportError:
        convert_sync_batchnorm = torch.nn.SyncBatchNorm.convert_sync_batchnorm
    return convert_sync_batchnorm(model, process_group=group)


def data_parallel_parts(model: torch.nn.Module, device: torch.device, world: int):
    """(model, gradient group, sync_bn) for training on `world` processes: on CUDA the NCCL group, in which DDP
    reduces the gradients and SyncBatchNorm the batch statistics; on CPU the default gloo group (None) and batch norm
    per process. Collective when world > 1 (every rank creates the NCCL group)."""
    if world == 1:
        return model, None, False
    group = gradient_group(device)
    sync_bn = device.type == "cuda"
    if sync_bn:
        model = sync_batchnorm(model, group)  # the same parameter tensors, so an optimizer made later owns them
    return model, group, sync_bn


def training_state(model, optimizer, scheduler, generator, rng, epoch: int, steps: int, history: list) -> dict:
    """Everything a run needs to continue after `epoch` epochs: tensors (CPU) and a JSON-able `meta`."""
    tensors = {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}  # a copy, not a view
    opt_state = optimizer.state_dict()
    for i, state in opt_state["state"].items():
        for k, v in state.items():
            t = torch.as_tensor(v).detach().cpu().clone()
            tensors[f"optim.{i}.{k}"] = t.reshape(1) if t.ndim == 0 else t
    tensors["generator"] = generator.get_state()
    meta = {
        "epoch": epoch,
        "steps": steps,
        "history": history,
        "param_groups": opt_state["param_groups"],
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "numpy_rng": rng.bit_generator.state,
    }
    return {"tensors": tensors, "meta": meta}


def _restore(state: dict, model, optimizer, scheduler, generator, rng) -> tuple[int, int, list]:
    """Load a `training_state` into the freshly built objects; returns (epoch, steps, history)."""
    tensors, meta = state["tensors"], state["meta"]
    device = next(model.parameters()).device
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            per_param.setdefault(int(i), {})[name] = value.reshape(()) if name == "step" else value.to(device).clone()
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    generator.set_state(tensors["generator"])
    rng.bit_generator.state = meta["numpy_rng"]
    return int(meta["epoch"]), int(meta["steps"]), list(meta["history"])


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, test: TrainSet, recipe: Recipe, *, distributed: bool = False) -> float:
    """Top-1 accuracy (%) on the test split held on the device.

    distributed: every rank holds the same model; each tests its `span` slice and the counts are summed.
    """
    model.eval()
    device = test.images.device
    rank, world = ddp_world() if distributed else (0, 1)
    lo, hi = span(len(test), rank, world)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for s in range(lo, hi, recipe.eval_batch_size):
        e = min(s + recipe.eval_batch_size, hi)
        x = test.images[s:e].float().div_(255)  # (B, 3, S, S)
        if recipe.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.amp and device.type == "cuda"):
            pred = model(x).argmax(dim=1)
        correct += (pred == test.labels[s:e]).sum()
    count = all_reduce_sum(correct) if world > 1 else correct
    return 100.0 * count.item() / len(test)


def train_student(
    model: torch.nn.Module,
    rounds: list[TrainSet],
    test: TrainSet | None,
    recipe: Recipe,
    *,
    seed: int,
    teacher: torch.nn.Module | None = None,
    on_epoch=None,
    progress: bool = True,
    desc: str = "train",
    resume: dict | None = None,
    on_checkpoint=None,
    checkpoint_every: int = 0,
) -> dict:
    """Train `model` on `rounds` and test every `eval_every` epochs.

    Sequential order: round r serves epochs [r*k, (r+1)*k), k = regen_every. Mixed order (`recipe.round_order`):
    every epoch takes N samples from the pool of all rounds (`epoch_samples`), so each image of each round is seen
    equally often over the whole run. Every round has the same N samples, so each epoch is ceil(N / B) optimizer
    steps whatever the order. Random state (batch order, augmentation, CutMix) comes from generators seeded with
    `seed`, on the CPU, so a CPU run is bit-for-bit reproducible. Returns the per-epoch history and the optimizer
    step count.

    In a joined process group (torchrun) it trains data-parallel: every rank must call it with the same arguments
    (same data, same initial weights). Every rank draws the same batch order and augmentation for the global batch
    of B samples and trains on its contiguous slice of it; DDP averages the gradients, each rank's loss weighted by
    its share of the batch, so the steps are those of one process up to the order of float sums. Batch norm
    layers use the global batch's statistics on CUDA (SyncBatchNorm) and each rank's slice on CPU (no CPU kernel),
    with rank 0's running statistics for testing. The test split is sharded across ranks.

    Without a test split (`test` None) nothing is tested. `on_checkpoint(state)` receives the whole training state
    (`training_state`) every `checkpoint_every` epochs; passing such a state back as `resume` continues the run
    exactly where it stopped (bit for bit on CPU).
    """
    device = rounds[0].images.device
    n = len(rounds[0])
    if any(len(r) != n for r in rounds):
        raise ValueError("every round must hold the same number of samples")
    rank, world = ddp_world()
    batch = min(recipe.batch_size, n)
    steps_per_epoch = math.ceil(n / batch)
    total_steps = recipe.epochs * steps_per_epoch
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model, group, sync_bn = data_parallel_parts(model, device, world)
    optimizer = make_optimizer(model, recipe)
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

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
    history, steps, start = [], 0, 0
    if resume is not None:
        start, steps, history = _restore(resume, model, optimizer, scheduler, generator, rng)
    mixed = recipe.round_order == "mixed" and len(rounds) > 1
    pool = pool_of(rounds) if mixed else None
    bar = progress_bar(total=recipe.epochs, initial=start, desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in range(start, recipe.epochs):
        if mixed:
            data = pool
            perm = to_device(epoch_samples(epoch, n, len(rounds), seed), device)
        else:
            data = rounds[min(epoch // recipe.regen_every, len(rounds) - 1) if recipe.regen_every else 0]
            perm = to_device(torch.randperm(n, generator=generator), device)
        step_model.train()
        loss_sum = torch.zeros((), device=device)
        for s in range(steps_per_epoch):
            idx = perm[s * batch : (s + 1) * batch]  # the global batch
            lo, hi = span(len(idx), rank, world)
            mine = idx[lo:hi]  # this rank's slice of it (all of it in one process)
            x = data.images[mine].float().div_(255)  # (b, 3, S, S) in [0, 1]
            if aug is not None:
                theta = crop_flip_params(len(idx), generator, aug["random_resized_crop_min_scale"], aug["flip"])
                x = warp(x, theta[lo:hi])
                if aug.get("cutmix_beta", 0) > 0:
                    box, shuffle = cutmix_params(len(idx), x.shape[2], x.shape[3], generator, rng, aug["cutmix_beta"])
                    src = shuffle[lo:hi]
                    if world == 1:
                        source = x[to_device(src, device)]
                    else:  # the pasted samples may belong to other ranks: augment them here too
                        source = warp(data.images[idx[to_device(src, device)]].float().div_(255), theta[src])
                    x = paste(x, source, box)
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
            loss_sum = all_reduce_sum(loss_sum)  # once per epoch, through gloo
        epoch_loss = (loss_sum / n).item()  # the only host sync of the epoch (besides testing)
        if not math.isfinite(epoch_loss):
            raise TrainingDiverged(f"student loss is {epoch_loss} at epoch {epoch + 1}; lower --lr")
        acc = None
        if test is not None and ((epoch + 1) % recipe.eval_every == 0 or epoch + 1 == recipe.epochs):
            if world > 1 and not sync_bn:
                broadcast_buffers(model, group)  # batch norm running statistics: rank 0's on every rank
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
        bar.update(1)
        if on_checkpoint is not None and checkpoint_every and (epoch + 1) % checkpoint_every == 0:
            if epoch + 1 < recipe.epochs:
                on_checkpoint(training_state(model, optimizer, scheduler, generator, rng, epoch + 1, steps, history))
    bar.close()
    tested = [r for r in history if r["test_top1"] is not None]
    best = max(tested, key=lambda r: r["test_top1"]) if tested else {"test_top1": None, "epoch": None}
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
