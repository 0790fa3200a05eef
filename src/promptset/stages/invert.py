"""D3M step 2: textual inversion of one placeholder token per class, all classes in one run.

Gal et al. 2023 learn a word vector v* for a concept by minimising the latent-diffusion loss

    L(v*) = E_{z ~ E(x), eps ~ N(0, I), t ~ U[0, T)} || eps - eps_theta(z_t, t, c_theta("a photo of S*")) ||^2

with the denoiser eps_theta, the text encoder c_theta and the autoencoder E frozen. D3M (Abbasi et al. 2024, arXiv
2403.07142) learns one such token per class on that class's collages, so the whole dataset becomes C x V x D numbers.

How this run is organised, and why:
- Classes train in fixed *groups* of `classes_per_batch`; a batch takes the group's classes in turn (each class
  `m` times when G divides the batch size B = G * m; otherwise continuing where the previous step stopped, so any
  batch size works), each sample conditioned on its own class token. A group owns its RNG stream (seeded from
  (seed, group)), so its result is a pure function of the seed: the same in one process or sharded over many.
- Under torchrun the groups go one per process (`dist.team_schedule`); when fewer groups than processes remain, a
  group is trained data-parallel by a team of processes: every member draws the whole batch's random numbers, works
  on its `span` share of the batch (loss = its samples' sum / B), the (G, V, D) gradient is summed over the team,
  and every member takes the same AdamW step. That equals one process up to the order of float sums.
- The VAE encodes each training image (and its mirror image) once; steps sample from that cache.
- Only a (G, V, D) tensor of placeholder vectors trains. It is injected into the text encoder's token-embedding
  output (see `DiffusionBackend.slots`), so no weight of the model changes at all.
- The text encoder runs on G prompts per step, not B: samples of one class share their conditioning.
- A checkpoint (vectors, AdamW moments, RNG state, step) is written atomically every `checkpoint_every` steps;
  rerunning the same command resumes from it bit-for-bit. A loss that turns NaN or inf stops the run (exit 3)
  before a checkpoint could store the bad state.
- Modes (`--modes K`, docs/DESIGN.md section 9): rank 0 splits each class's images into min(K, images) modes by seeded
  k-means (`modes.assign_modes`, recorded in `<run>/modes.json`), and every (class, mode) becomes a row trained
  exactly like a class above, on its members only, from the class's initializer word: groups, teams, checkpoints and
  resume work on rows. K = 1 is the run above, bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..accounting import print_budget, prompt_bytes
from ..artifacts import PromptSet, load_tensors, token_name_for
from ..atomic import append_jsonl
from ..backends.base import PREDICTION_TYPES, DiffusionBackend, PromptLayout
from ..backends.inversion_files import GroupFiles, drop_metrics_after, merge_rank_metrics, metrics_path, metrics_record
from ..backends.latent_cache import team_latent_cache
from ..config import make_config, opt, to_dict
from ..data import (
    MAX_IMAGE_PIXELS,
    ImageFolderIndex,
    common_image_side,
    scan_image_folder,
    verify_images,
)
from ..devices import DTYPE_CHOICES, dtype_name, to_device
from ..dist import Team, barrier, join_teams, prepared_everywhere, rank_world, span, team_schedule
from ..errors import TrainingDiverged, UserError
from ..models import load_teacher, penultimate_features
from ..modes import MODE_FEATURES, MODES_FILE, ModeRows, assign_modes, check_mode_flags, read_modes
from ..precision import LossScaler, divergence_advice
from ..progress import progress_bar
from ..runfolder import (
    check_run_folder,
    check_same_classes,
    read_classes,
    remove_outputs,
    remove_stale_tmp,
    resolve_class_names,
    select_info,
    write_classes,
    write_config,
)
from ..seeding import derive_seed


@dataclass
class InvertConfig:
    out: str = opt("", "run folder (created; holds classes.json, prompts.safetensors, invert/)")
    backend: str = opt("sd", "frozen text-to-image model kind", choices=["sd", "mini"])
    model: str = opt("", "model to invert on: diffusers folder, .safetensors file or Hub id (sd); model folder (mini)")
    data: str = opt("", "ImageFolder of training images per class (default: <out>/collages from select)")
    steps: int = opt(500, "optimizer steps per class group")
    batch_size: int = opt(8, "samples per optimizer step")
    classes_per_batch: int = opt(0, "classes mixed in each batch (a group); 0 = min(#classes, batch size)")
    lr: float = opt(5e-3, "AdamW learning rate of the placeholder vectors")
    weight_decay: float = opt(0.0, "AdamW weight decay of the placeholder vectors")
    warmup_steps: int = opt(0, "linear learning-rate warm-up steps")
    resolution: int = opt(0, "training resolution in pixels; 0 = the model's native resolution")
    num_vectors: int = opt(1, "vectors per placeholder token (V)")
    template: str = opt("a photo of {token}", "prompt template; {token} marks the placeholder")
    initializer: str = opt("", "one single-token initializer word for every class (default: each class name; a name "
                           "of several tokens starts from the mean of their embeddings)")
    initializers: str = opt("", "comma-separated single-token initializer words, one per class in class order")
    class_names: str = opt("", "file with display names (JSON {folder: name} or one per line); default: folder names")
    flip: bool = opt(True, "also train on mirrored images (encoded once into the latent cache)")
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "torch device: auto, cpu, cuda, cuda:1, ...")
    dtype: str = opt("auto", "model dtype: auto = bf16 on GPUs of compute capability 8.0+, fp16 on older GPUs (with "
                     "loss scaling), fp32 on CPU; the placeholder vectors always train in fp32", choices=DTYPE_CHOICES)
    model_config: str = opt("", "sd single-file checkpoint: a diffusers config folder of its base model (else "
                            "diffusers guesses; every SD 2.x file becomes the 768 px v-prediction model)")
    prediction_type: str = opt("", "sd: override the scheduler's prediction type", choices=["", *PREDICTION_TYPES])
    prompt_dtype: str = opt("fp32", "dtype of the stored prompts", choices=["fp32", "fp16", "int8"])
    modes: int = opt(1, "prompts per class: each class's images are split into this many modes by seeded k-means and "
                     "one token is learned per mode (1 = one prompt per class, the paper; a class with fewer images "
                     "gets one mode per image); every stored vector counts in the budget")
    mode_features: str = opt("latent", "what --modes clusters: the generator's latents of the images (latent) or the "
                             "--teacher's penultimate features (teacher)", choices=list(MODE_FEATURES))
    teacher: str = opt("", "teacher for --mode-features teacher: NAME:PATH.safetensors or a promptset teacher's PATH")
    gradient_checkpointing: bool = opt(False, "recompute the UNet's activations in the backward pass (less memory, "
                                       "about 30% more time; same result)")
    checkpoint_every: int = opt(100, "checkpoint interval in steps (a killed run loses at most this many)")
    log_every: int = opt(10, "metrics interval in steps (the only host syncs in the loop)")
    verify_images: bool = opt(True, "decode every training image once before starting (bad files fail fast)")
    max_image_pixels: int = opt(MAX_IMAGE_PIXELS, "decompression-bomb limit: refuse images with more pixels than this")
    overwrite: bool = opt(False, "replace a different run already in --out")
    progress: bool = opt(True, "show progress bars")


def _groups(num_rows: int, per_group: int) -> list[list[int]]:
    """The rows of each group: consecutive runs of `per_group` rows (classes, or (class, mode) pairs)."""
    return [list(range(s, min(s + per_group, num_rows))) for s in range(0, num_rows, per_group)]


def _group_batch(batch_size: int, per_group: int, group_size: int) -> int:
    """Samples per step of a group: the batch size, except that a last, smaller group of a grouping that divides
    the batch keeps `batch / per_group` samples per row (as every group of that grouping does)."""
    return batch_size if batch_size % per_group else group_size * (batch_size // per_group)


def _batch_rows(step: int, batch: int, group_size: int) -> torch.Tensor:
    """Local row of each sample of step `step`: the group's rows in turn, continuing where the last step stopped, so
    every row gets the same number of samples over G steps whatever the batch size (a pure function of step)."""
    return (torch.arange(batch) + step * batch) % group_size  # (B,)


def _initializer_words(cfg: InvertConfig, names: list[str]) -> list[str]:
    if cfg.initializers:
        words = [w.strip() for w in cfg.initializers.split(",")]
        if len(words) != len(names):
            raise UserError(f"--initializers has {len(words)} words for {len(names)} classes; give one per class")
        return words
    if cfg.initializer:
        return [cfg.initializer] * len(names)
    return list(names)


def _lr_at(step: int, cfg: InvertConfig) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def invert(cfg: InvertConfig | None = None, **overrides) -> Path:
    """Run textual inversion for every class of `cfg.data`; returns the path of `prompts.safetensors`."""
    cfg = make_config(InvertConfig, cfg, overrides, "invert")
    rank, world = rank_world()
    plan = prepared_everywhere(_prepare, cfg)
    run, index, backend = plan.run, plan.index, plan.backend
    folder = run / "invert"
    groups = _groups(plan.num_rows, plan.per_group)  # of rows: classes, or (class, mode) pairs with --modes
    schedule = team_schedule(len(groups), world)

    if rank == 0:
        _start_run_folder(plan, cfg, folder)
        _print_plan(plan, cfg, len(groups), schedule, world)
    modes = _mode_rows(plan, cfg)  # the same on every rank; after it (a barrier) the run folder is ready
    taken: set[str] = set()
    token_names = [token_name_for(f, taken) for f in modes.token_stems(index.classes)]

    teams = join_teams(schedule, backend.device)  # this process's team per group it works on
    for g, ranks in schedule:
        if rank in ranks:
            _train_group(plan, cfg, modes, groups[g], g, len(groups), folder, show=cfg.progress and rank == 0,
                         team=teams[g])
    barrier()

    prompts_path = run / "prompts.safetensors"
    if rank == 0:
        vectors = [load_tensors(GroupFiles(folder, g).result, "group result")[0]["embeddings"]  # (G, V, D)
                   for g in range(len(groups))]
        prompts = PromptSet(
            embeddings=torch.cat(vectors), token_names=token_names, class_folders=index.classes,
            template=cfg.template, backend=backend.kind, model_id=backend.model_id, model_hash=backend.model_hash,
            initializers=plan.words, stored_dtype=cfg.prompt_dtype, **modes.prompt_fields(),
        )
        if not prompts.same_as_file(prompts_path):  # a no-op rerun keeps the file (and its mtime) as it was
            prompts.save(prompts_path)
        if world > 1:
            merge_rank_metrics(folder, world)
    barrier()
    return prompts_path


def _start_run_folder(plan: _Plan, cfg: InvertConfig, folder: Path) -> None:
    """Rank 0, before training: replace an earlier run (--overwrite), record the config and classes, and remove
    half-written files of a killed run (nobody writes there before the barrier)."""
    run = plan.run
    if plan.replaced:
        remove_outputs(run, ["invert", "prompts.safetensors", MODES_FILE])
    # the data's own resolution: generate stores images at it and teachers see them at it (issue 17)
    write_config(run, "invert", to_dict(cfg) | {"resolution": plan.resolution,
                                               "data_image_size": plan.data_image_size})
    if plan.rewrite_classes:
        write_classes(run, plan.index.classes, plan.names)
    remove_stale_tmp(folder)
    remove_stale_tmp(run, recursive=False)


def _print_plan(plan: _Plan, cfg: InvertConfig, num_groups: int, schedule, world: int) -> None:
    """Rank 0, before training: the data, the groups and batches, the teams, the initializers, fp16 loss scaling
    and the stored bytes."""
    index, backend = plan.index, plan.backend
    print(f"invert: --data {cfg.data}: {index.num_classes} classes, {index.num_images} images; skipped "
          f"{index.skipped_hidden} hidden and {index.skipped_non_image} non-image entries", flush=True)
    row, rows = ("class", "classes") if cfg.modes == 1 else ("prompt", "prompts")
    share = (f"each {row} {cfg.batch_size // plan.per_group} times per step"
             if cfg.batch_size % plan.per_group == 0 else
             f"the {rows} in turn, so every {row} gets the same number of samples over {plan.per_group} steps")
    unit = "classes" if cfg.modes == 1 else f"prompts (--modes {cfg.modes}: {plan.num_rows} prompts in all)"
    print(f"invert: {num_groups} group(s) of up to {plan.per_group} {unit}, batch {cfg.batch_size}: {share}",
          flush=True)
    for c in (c for c, files in enumerate(index.files) if len(files) < cfg.modes):
        print(f"invert: class {index.classes[c]} has {len(index.files[c])} training image(s), fewer than "
              f"--modes {cfg.modes}: it gets one mode per image", flush=True)
    _print_teams(schedule, world)
    words = "the class names" if not (cfg.initializer or cfg.initializers) else "the words given"
    print(f"invert: initializer words: {words}" + ("" if plan.init_notes else " (one token each)"), flush=True)
    for note in plan.init_notes:
        print(f"invert: initializer {note}", flush=True)
    if backend.dtype == torch.float16:
        print(f"invert: the model runs in fp16: the loss is scaled by {LossScaler(backend.dtype).scale:g} (halved "
              "and the step skipped on an inf/NaN gradient), so its tiny gradients do not underflow", flush=True)
    print_budget(prompt_bytes(plan.num_rows, cfg.num_vectors, backend.token_dim, cfg.prompt_dtype, cfg.modes > 1),
                 num_classes=index.num_classes, image_size=select_info(plan.run).get("image_size"),
                 title="invert: stored bytes of the distilled set")


def _print_teams(schedule: list[tuple[int, tuple[int, ...]]], world: int) -> None:
    """Say how the processes share the groups (rank 0, before training)."""
    if world == 1:
        return
    shared = [(g, ranks) for g, ranks in schedule if len(ranks) > 1]
    solo = len(schedule) - len(shared)
    text = f"invert: {world} processes: {solo} group(s) trained one per process"
    if shared:
        text += "; " + "; ".join(f"group {g + 1} data parallel over processes {', '.join(map(str, ranks))}"
                                 for g, ranks in shared)
    print(text, flush=True)


def _mode_rows(plan: _Plan, cfg: InvertConfig) -> ModeRows:
    """The rows to learn, the same on every rank: one per class, or (--modes) one per (class, mode) of the
    assignment rank 0 computes (or reuses from a matching modes.json) and passes on; the other ranks read the
    modes.json it wrote once the barrier has passed."""
    assignment = _assign_modes(plan, cfg) if cfg.modes > 1 and rank_world()[0] == 0 else None
    barrier()
    if cfg.modes == 1:
        return ModeRows.one_per_class(plan.index.num_classes)
    if assignment is None:
        assignment = read_modes(plan.run / MODES_FILE, [len(f) for f in plan.index.files])
    return ModeRows.from_assignment(assignment)


def _assign_modes(plan: _Plan, cfg: InvertConfig) -> dict:
    """Cluster each class's images into modes (rank 0; `modes.assign_modes` reuses a matching modes.json)."""
    backend, teacher = plan.backend, plan.teacher
    features = (lambda x: backend.encode_images(x)[0]) if teacher is None else partial(penultimate_features, teacher)
    return assign_modes(plan.run, plan.index, cfg.modes, features, feature=cfg.mode_features, seed=cfg.seed,
                        resolution=plan.resolution, max_pixels=cfg.max_image_pixels,
                        by=backend.model_hash if teacher is None else teacher.weights_sha256)


@dataclass
class _Plan:
    """What `invert` resolved and checked before writing anything."""

    run: Path
    index: ImageFolderIndex
    names: list[str]  # display names, in class order
    backend: DiffusionBackend
    words: list[str]  # one initializer word per class
    init_notes: list[str]  # how words of several tokens (or none) were turned into a starting vector
    init_vectors: torch.Tensor  # (C, D) their embedding rows
    layout: PromptLayout
    resolution: int
    per_group: int  # rows per group (classes, or (class, mode) pairs, mixed in each batch)
    data_image_size: int | None  # side of every (square, equal) training image; None when they differ
    rewrite_classes: bool  # classes.json is missing, lists other classes or other display names
    replaced: bool  # --overwrite replaces a different earlier inversion
    num_rows: int  # prompts to learn: classes, or (class, mode) pairs with --modes
    teacher: object  # --mode-features teacher


def _prepare(cfg: InvertConfig) -> _Plan:
    """Everything invert can refuse, checked before any output exists (reads only, so every rank runs it)."""
    from ..backends import create_backend

    if not cfg.out:
        raise UserError("--out is required: the run folder to write")
    run = Path(cfg.out)
    if not cfg.model:
        raise UserError("--model is required (a diffusers folder for --backend sd, a promptset model for mini)")
    cfg.modes = check_mode_flags(cfg.modes, cfg.mode_features, cfg.teacher)
    for name in ("steps", "batch_size", "num_vectors", "checkpoint_every", "log_every", "max_image_pixels"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if not 0 < cfg.lr <= 1e30:  # beyond that AdamW's step size overflows float32 (textual inversion uses ~5e-3)
        raise UserError(f"--lr must be in (0, 1e30], got {cfg.lr}")
    data_dir = Path(cfg.data) if cfg.data else run / "collages"
    cfg.data = str(data_dir)

    index = scan_image_folder(data_dir, flag="--data", max_pixels=cfg.max_image_pixels)
    existing = read_classes(run)
    if existing is not None and not cfg.overwrite:
        check_same_classes([c.folder for c in existing], index.classes, f"--data {data_dir}",
                           "pass the data the run was made from, or a new --out (or --overwrite)")
    same_classes = existing is not None and [c.folder for c in existing] == index.classes
    if same_classes and not cfg.class_names:
        names = [c.name for c in existing]  # as select (or an earlier invert) named them
    else:  # --class-names names the classes (and so chooses the initializer words) even after select
        names = resolve_class_names(index.classes, cfg.class_names)
    rewrite_classes = not same_classes or names != [c.name for c in existing]
    num_classes = index.num_classes
    num_rows = sum(min(cfg.modes, len(f)) for f in index.files)  # (class, mode) pairs; num_classes without modes
    per_group = cfg.classes_per_batch or min(num_rows, cfg.batch_size)
    if cfg.verify_images:
        verify_images(index, max_pixels=cfg.max_image_pixels, progress=cfg.progress and rank_world()[0] == 0)
    backend = create_backend(cfg.backend, cfg.model, device=cfg.device, dtype=cfg.dtype, model_config=cfg.model_config,
                             prediction_type=cfg.prediction_type)
    cfg.dtype = dtype_name(backend.dtype)  # `auto` resolved: config.yaml records what ran
    if cfg.gradient_checkpointing:
        backend.enable_gradient_checkpointing()
    # No torch.compile here: with torch 2.13 on CPU, inductor's backward of diffusers' UNet returns gradients 40-60%
    # away from eager and fp64 (benchmarks/diagnostics/check_compile_grad.py), while its forward agrees.
    resolution = cfg.resolution or backend.resolution
    if resolution % backend.autoencoder.downscale:
        raise UserError(f"--resolution {resolution} must be a multiple of {backend.autoencoder.downscale}")
    chosen = bool(cfg.initializers or cfg.initializer)  # words the user chose are refused if not one token each
    words = _initializer_words(cfg, names)
    init_vectors, init_notes = backend.initializer_vectors(
        words, "--initializers" if cfg.initializers else "--initializer", fallback=not chosen)  # (C, D)
    layout = backend.layout(cfg.template, cfg.num_vectors)
    replaced = check_run_folder(run, "invert", to_dict(cfg) | {"resolution": resolution}, overwrite=cfg.overwrite)
    data_size = common_image_side(index, max_pixels=cfg.max_image_pixels)
    teacher = None
    if cfg.modes > 1 and cfg.mode_features == "teacher":
        teacher = load_teacher(cfg.teacher, num_classes=num_classes, device=backend.device,
                               class_folders=index.classes)
    return _Plan(run, index, names, backend, words, init_notes, init_vectors, layout, resolution, per_group,
                 data_size, rewrite_classes, replaced, num_rows, teacher)


# ------------------------------------------------------------------------------------------------------------
# training one group of rows


@dataclass
class _Latents:
    """A group's training latents, flat: local row i's images are entries offsets[i] .. offsets[i] + counts[i] - 1."""

    means: torch.Tensor  # (N, F, c, h, w) on the device; F = 2 with mirrored copies
    stds: torch.Tensor | None  # (N, F, c, h, w); None for an autoencoder without a latent distribution
    counts: torch.Tensor  # (G,) images per row
    offsets: torch.Tensor  # (G,) each row's first entry


@dataclass
class _Group:
    """What trains in one group and what its checkpoint restores."""

    g: int
    files: GroupFiles
    init: torch.Tensor  # (G, V, D) the rows' initializer embeddings (CPU)
    vectors: torch.nn.Parameter  # (G, V, D) fp32 on the device: the only thing that trains
    optimizer: torch.optim.AdamW
    generator: torch.Generator  # the group's own random stream: batches, noise, timesteps
    scaler: LossScaler  # fp16: dynamic loss scaling; bf16/fp32: a no-op
    start: int = 0  # the first step to run (a checkpoint's step when resuming)


class _Tally:
    """Per-row losses between log steps and whether every loss so far was finite: device tensors, read only at log
    and checkpoint steps (the loop's only host syncs)."""

    def __init__(self, num_rows: int, device: torch.device):
        self.loss_sum = torch.zeros(num_rows, device=device)  # (G,)
        self.loss_n = torch.zeros(num_rows, device=device)  # (G,)
        self.finite = torch.ones((), dtype=torch.bool, device=device)  # every loss since this process started

    def add(self, per_sample: torch.Tensor, where: torch.Tensor, loss: torch.Tensor, applied: bool) -> None:
        counted = per_sample.detach().float()  # (b,)
        if applied:
            self.finite &= torch.isfinite(loss)
            weight = torch.ones_like(counted)
        else:  # the vectors did not change: a finite loss still describes them; an inf one is left out
            weight = torch.isfinite(counted).float()
            counted = counted.nan_to_num(0.0, 0.0, 0.0)
        self.loss_sum.index_add_(0, where, counted)
        self.loss_n.index_add_(0, where, weight)


def _train_group(plan: _Plan, cfg: InvertConfig, modes: ModeRows, rows: list[int], g: int, num_groups: int,
                 folder: Path, show: bool, team: Team | None = None) -> None:
    """Train the placeholder vectors of one group of rows; resumes from its checkpoint; writes groups/gNNNNN.

    With a team of several processes, each works on its share of every batch and the gradient is summed over the
    team; every member holds the same vectors, optimizer and generator state, and the leader alone writes files.
    """
    team = team or Team((rank_world()[0],), rank_world()[0])
    key = {"split_hash": plan.index.split_hash(), "classes": ",".join(map(str, rows))} | modes.data_key()
    files = GroupFiles(folder, g, key)
    if files.finished():  # written only after the team's last step: every member sees the same
        return  # finished on an earlier run
    latents = _group_latents(plan, cfg, modes, rows, g, folder, team)
    group = _start_group(plan, cfg, modes, rows, files, num_groups, team)
    batch = _group_batch(cfg.batch_size, plan.per_group, len(rows))
    share = span(batch, team.index, team.size)  # (lo, hi): this process's share of every batch (all of it alone)
    tally = _Tally(len(rows), plan.backend.device)
    labels = modes.labels(plan.index.classes, rows)
    t0, trained, record = time.perf_counter(), 0, None
    bar = progress_bar(total=cfg.steps, initial=group.start, desc=f"invert group {g + 1}/{num_groups}",
                       disable=not show, unit="step")
    for step in range(group.start, cfg.steps):
        # batch: the group's rows in turn, each sample an image (or its mirror) of its row, this process's share
        sample, where = _draw_batch(latents, group.generator, step, batch, len(rows), share)  # (b, c, h, w), (b,)
        # loss: G prompts through the text encoder, each sample conditioned on its row's
        states = plan.backend.encode_placeholder_prompts(plan.layout, group.vectors)[where]  # (b, L, D_text)
        per_sample = plan.backend.denoising_loss(sample, states, group.generator, rows=(*share, batch))  # (b,)
        # update: one AdamW step of the (G, V, D) vectors, the gradient summed over the team
        loss, applied = _update(group, per_sample, batch, step, cfg, team)
        tally.add(per_sample, where, loss, applied)
        trained += len(per_sample)
        done = step + 1
        bar.update(1)
        # checks: metrics and the finite checks at log steps, never a checkpoint of a bad state
        if done % cfg.log_every == 0 or done == cfg.steps:
            record = _log(group, tally, cfg, labels, step, t0, team)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            tally.finite = team.all_finite(tally.finite)
            _stop_if_diverged(tally.finite, group, done, cfg)
            if team.leader:
                group.files.save_checkpoint(group.vectors, group.optimizer, group.generator, done, group.scaler)
    bar.close()
    _finish_group(group, tally, cfg, num_groups, team, trained, batch, record)


def _group_latents(plan: _Plan, cfg: InvertConfig, modes: ModeRows, rows: list[int], g: int, folder: Path,
                   team: Team) -> _Latents:
    """The rows' training latents from the group's latent cache (encoded once, by the team's leader)."""
    of = modes.classes_of(rows)  # the classes of the group's rows (the rows themselves without modes)
    means, stds = team_latent_cache(team, plan.backend, cfg, plan.index, of, g, plan.resolution, folder)  # per class
    means, stds = modes.take(means, of, rows), modes.take(stds, of, rows)  # per row: its mode's images
    counts = torch.tensor([m.shape[0] for m in means])  # (G,)
    device = plan.backend.device
    return _Latents(means=torch.cat(means).to(device),  # (N, F, c, h, w)
                    stds=torch.cat(stds).to(device) if stds[0] is not None else None,
                    counts=counts, offsets=torch.cumsum(counts, 0) - counts)


def _start_group(plan: _Plan, cfg: InvertConfig, modes: ModeRows, rows: list[int], files: GroupFiles,
                 num_groups: int, team: Team) -> _Group:
    """Vectors from each row's class's initializer word, AdamW, the group's random stream (seeded from (seed, g)),
    and the loss scaler; restored from the group's checkpoint when one of the same data exists."""
    device = plan.backend.device
    init = plan.init_vectors[[modes.row_class[r] for r in rows]].unsqueeze(1).repeat(1, cfg.num_vectors, 1)  # (G,V,D)
    vectors = torch.nn.Parameter(init.clone().to(device))
    optimizer = torch.optim.AdamW([vectors], lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "invert", files.g))
    group = _Group(files.g, files, init, vectors, optimizer, generator, LossScaler(plan.backend.dtype))
    if files.resumable():
        group.start = files.load_checkpoint(vectors, optimizer, generator, group.scaler)
        if rank_world()[0] == 0:
            print(f"invert group {files.g + 1}/{num_groups}: resuming from step {group.start} of {cfg.steps} "
                  f"({files.checkpoint})", flush=True)
    if team.leader:
        drop_metrics_after(metrics_path(files.folder), files.g, group.start)  # steps a killed run did past it
    return group


def _draw_batch(latents: _Latents, generator: torch.Generator, step: int, batch: int, group_size: int,
                share: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s training latents (b, c, h, w) for this process's share of the batch, and each sample's local
    row (b,). Every member of a team draws the random numbers of the whole batch (the same stream)."""
    lo, hi = share
    device = latents.means.device
    sample_row = _batch_rows(step, batch, group_size)  # (B,) local row of each sample
    pick = (torch.rand(batch, generator=generator) * latents.counts[sample_row]).long()  # (B,) an image of its row
    view = torch.randint(0, latents.means.shape[1], (batch,), generator=generator)  # (B,) the image or its mirror
    at = to_device((latents.offsets[sample_row] + pick)[lo:hi], device)  # (b,) entries of the flat cache, one gather
    view = to_device(view[lo:hi], device)
    sample = latents.means[at, view]  # (b, c, h, w)
    if latents.stds is not None:  # a draw from the autoencoder's latent distribution
        noise = torch.randn((batch, *latents.means.shape[2:]), generator=generator)[lo:hi]  # (b, c, h, w)
        sample = sample + latents.stds[at, view] * to_device(noise, device)
    return sample, to_device(sample_row[lo:hi], device)


def _update(group: _Group, per_sample: torch.Tensor, batch: int, step: int, cfg: InvertConfig,
            team: Team) -> tuple[torch.Tensor, bool]:
    """One optimizer step on the batch mean loss; returns the loss and whether the step was applied (False only
    for a step fp16 loss scaling skipped for an inf/NaN gradient)."""
    # the batch mean: alone as before; in a team each member's sum / B, so the team's summed gradient is it
    loss = per_sample.mean() if team.size == 1 else per_sample.sum() / batch
    for param_group in group.optimizer.param_groups:
        param_group["lr"] = _lr_at(step, cfg)
    group.optimizer.zero_grad(set_to_none=True)
    if loss.requires_grad:  # not for an empty share (a batch smaller than the team)
        group.scaler.scaled(loss).backward()
    if team.size > 1:
        _sum_gradient(group.vectors, team)  # before unscaling: every member checks the same summed gradient
    applied = group.scaler.step(group.optimizer)
    if not applied and group.scaler.exhausted:
        _stop_if_diverged(torch.zeros((), dtype=torch.bool), group, step + 1, cfg)
    return loss, applied


def _sum_gradient(vectors: torch.nn.Parameter, team: Team) -> None:
    """Sum the (G, V, D) gradient of the placeholder vectors over the team (a member with no sample adds zeros)."""
    if vectors.grad is None:
        vectors.grad = torch.zeros_like(vectors)
    team.all_reduce_(vectors.grad)


def _log(group: _Group, tally: _Tally, cfg: InvertConfig, labels: list[str], step: int, t0: float,
         team: Team) -> dict:
    """A log step: the team's per-row mean losses since the last one into metrics.jsonl (the leader writes), after
    the finite checks; returns the record."""
    done = step + 1
    tally.finite = team.all_finite(tally.finite)
    team.all_reduce_(tally.loss_sum)  # the per-row losses of the whole batch, as one process logs them
    team.all_reduce_(tally.loss_n)
    row_loss = tally.loss_sum / tally.loss_n.clamp_min(1)  # (G,)
    record = metrics_record(group.vectors.detach(), group.init.to(group.vectors.device), row_loss, labels, group.g,
                            done, _lr_at(step, cfg), time.perf_counter() - t0) | group.scaler.metrics()
    _stop_if_diverged(tally.finite, group, done, cfg)
    if team.leader:
        append_jsonl(metrics_path(group.files.folder), record)
    tally.loss_sum.zero_()
    tally.loss_n.zero_()
    return record


def _finish_group(group: _Group, tally: _Tally, cfg: InvertConfig, num_groups: int, team: Team, trained: int,
                  batch: int, record: dict | None) -> None:
    """After the last step: the finite checks, what each member did, and (the leader) the group's result."""
    tally.finite = team.all_finite(tally.finite)
    _stop_if_diverged(tally.finite, group, cfg.steps, cfg)
    name = f"invert group {group.g + 1}/{num_groups}"
    if team.size > 1:
        print(f"{name}: process {team.rank} trained {trained} of the group's {batch * (cfg.steps - group.start)} "
              f"samples (data parallel over processes {', '.join(map(str, team.ranks))})", flush=True)
    if not team.leader:
        return
    if record is not None:
        scaler = group.scaler
        skipped = (f" ({scaler.skipped} skipped by fp16 loss scaling for an inf/NaN gradient; loss scale now "
                   f"{scaler.scale:g})" if scaler.enabled else "")
        print(f"{name}: done, {cfg.steps} steps{skipped}; final loss {record['loss']:.4f} "
              f"(mean of the last {min(cfg.log_every, cfg.steps - group.start)} steps)", flush=True)
    group.files.save_result(group.vectors, group.init, cfg.steps)


def _stop_if_diverged(finite: torch.Tensor, group: _Group, step: int, cfg: InvertConfig) -> None:
    """Raise TrainingDiverged if a loss or a vector became NaN/inf, or fp16 loss scaling ran out of scale (a host
    sync: only at log and checkpoint steps), with the likely cause for the dtype the model runs in."""
    scaler = group.scaler
    if bool(finite) and bool(torch.isfinite(group.vectors).all()) and not scaler.exhausted:
        return
    ckpt = group.files.checkpoint
    kept = f"the last good checkpoint {ckpt} is kept" if ckpt.is_file() else "no checkpoint was written yet"
    what = "the loss became NaN or inf"
    if scaler.exhausted:
        what = (f"the gradient stayed NaN or inf in fp16 while loss scaling halved its scale to {scaler.scale:g} "
                f"({scaler.skipped} steps skipped)")
    raise TrainingDiverged(
        f"{what} by step {step} of group {group.g}; {kept}. {divergence_advice(cfg.dtype, cfg.lr)}, and rerun with "
        "--overwrite"
    )
