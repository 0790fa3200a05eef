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

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..accounting import print_budget, prompt_bytes
from ..artifacts import PromptSet, load_tensors, save_tensors, token_name_for
from ..atomic import append_jsonl, read_jsonl, write_text
from ..backends.base import PREDICTION_TYPES, DiffusionBackend, PromptLayout
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


def _groups(num_classes: int, per_group: int) -> list[list[int]]:
    return [list(range(s, min(s + per_group, num_classes))) for s in range(0, num_classes, per_group)]


def _group_batch(batch_size: int, per_group: int, group_size: int) -> int:
    """Samples per step of a group: the batch size, except that a last, smaller group of a grouping that divides
    the batch keeps `batch / per_group` samples per class (as every group of that grouping does)."""
    return batch_size if batch_size % per_group else group_size * (batch_size // per_group)


def _batch_classes(step: int, batch: int, group_size: int) -> torch.Tensor:
    """Local class of each sample of step `step`: the classes in turn, continuing where the last step stopped, so
    every class gets the same number of samples over G steps whatever the batch size (a pure function of step)."""
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
    num_classes = index.num_classes
    folder = run / "invert"
    groups = _groups(plan.num_rows, plan.per_group)  # of rows: classes, or (class, mode) pairs with --modes
    schedule = team_schedule(len(groups), world)

    if rank == 0:
        if plan.replaced:
            remove_outputs(run, ["invert", "prompts.safetensors", MODES_FILE])
        # the data's own resolution: generate stores images at it and teachers see them at it (issue 17)
        write_config(run, "invert", to_dict(cfg) | {"resolution": plan.resolution,
                                                   "data_image_size": plan.data_image_size})
        if plan.rewrite_classes:
            write_classes(run, index.classes, plan.names)
        remove_stale_tmp(folder)  # half-written files of a killed run; nobody writes there before the barrier
        remove_stale_tmp(run, recursive=False)
        print(f"invert: --data {cfg.data}: {num_classes} classes, {index.num_images} images; skipped "
              f"{index.skipped_hidden} hidden and {index.skipped_non_image} non-image entries", flush=True)
        row, rows = ("class", "classes") if cfg.modes == 1 else ("prompt", "prompts")
        share = (f"each {row} {cfg.batch_size // plan.per_group} times per step"
                 if cfg.batch_size % plan.per_group == 0 else
                 f"the {rows} in turn, so every {row} gets the same number of samples over {plan.per_group} steps")
        unit = "classes" if cfg.modes == 1 else f"prompts (--modes {cfg.modes}: {plan.num_rows} prompts in all)"
        print(f"invert: {len(groups)} group(s) of up to {plan.per_group} {unit}, batch {cfg.batch_size}: {share}",
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
                     num_classes=num_classes, image_size=select_info(run).get("image_size"),
                     title="invert: stored bytes of the distilled set")
        if cfg.modes > 1:
            _assign_modes(plan, cfg)
    barrier()
    if cfg.modes > 1:  # every process trains the modes rank 0 recorded
        plan.rows = ModeRows.from_assignment(read_modes(run / MODES_FILE, [len(f) for f in index.files]))
    taken: set[str] = set()
    token_names = [token_name_for(f, taken) for f in plan.rows.token_stems(index.classes)]

    teams = join_teams(schedule, backend.device)  # this process's team per group it works on
    for g, ranks in schedule:
        if rank in ranks:
            _train_group(plan, cfg, groups[g], g, len(groups), folder, show=cfg.progress and rank == 0,
                         team=teams[g])
    barrier()

    prompts_path = run / "prompts.safetensors"
    if rank == 0:
        vectors = []
        for g in range(len(groups)):
            tensors, _ = load_tensors(folder / "groups" / f"g{g:05d}.safetensors", "group result")
            vectors.append(tensors["embeddings"])
        prompts = PromptSet(
            embeddings=torch.cat(vectors), token_names=token_names, class_folders=index.classes,
            template=cfg.template, backend=backend.kind, model_id=backend.model_id, model_hash=backend.model_hash,
            initializers=plan.words, stored_dtype=cfg.prompt_dtype, **plan.rows.prompt_fields(),
        )
        if not prompts.same_as_file(prompts_path):  # a no-op rerun keeps the file (and its mtime) as it was
            prompts.save(prompts_path)
        if world > 1:
            _merge_rank_metrics(folder, world)
    barrier()
    return prompts_path


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
    per_group: int  # classes per batch
    data_image_size: int | None  # side of every (square, equal) training image; None when they differ
    rewrite_classes: bool  # classes.json is missing, lists other classes or other display names
    replaced: bool  # --overwrite replaces a different earlier inversion
    num_rows: int  # prompts to learn: classes, or (class, mode) pairs with --modes
    rows: ModeRows  # one per class until invert reads modes.json
    teacher: object  # --mode-features teacher


def _assign_modes(plan: _Plan, cfg: InvertConfig) -> None:
    """Cluster each class's images into modes (rank 0; `modes.assign_modes` reuses a matching modes.json)."""
    backend, teacher = plan.backend, plan.teacher
    features = (lambda x: backend.encode_images(x)[0]) if teacher is None else partial(penultimate_features, teacher)
    assign_modes(plan.run, plan.index, cfg.modes, features, feature=cfg.mode_features, seed=cfg.seed,
                 resolution=plan.resolution, max_pixels=cfg.max_image_pixels,
                 by=backend.model_hash if teacher is None else teacher.weights_sha256)


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
                 data_size, rewrite_classes, replaced, num_rows, ModeRows.one_per_class(num_classes), teacher)


def _metrics_path(folder: Path) -> Path:
    rank, world = rank_world()
    return folder / ("metrics.jsonl" if world == 1 else f"metrics.rank{rank}.jsonl")


def _merge_rank_metrics(folder: Path, world: int) -> None:
    rows = [r for k in range(world) for r in read_jsonl(folder / f"metrics.rank{k}.jsonl")]
    rows.sort(key=lambda r: (r.get("group", 0), r.get("step", 0)))
    write_text(folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    for k in range(world):
        (folder / f"metrics.rank{k}.jsonl").unlink(missing_ok=True)


def _train_group(plan: _Plan, cfg: InvertConfig, classes: list[int], g: int, num_groups: int, folder: Path,
                 show: bool, team: Team | None = None) -> None:
    """Train the placeholder vectors of one class group; resumes from its checkpoint; writes groups/gNNNNN.

    With a team of several processes, each works on its share of every batch and the gradient is summed over the
    team; every member holds the same vectors, optimizer and generator state, and the leader alone writes files.
    """
    team = team or Team((rank_world()[0],), rank_world()[0])
    backend, index, layout = plan.backend, plan.index, plan.layout
    result_path = folder / "groups" / f"g{g:05d}.safetensors"
    ckpt_path = folder / "checkpoints" / f"g{g:05d}.safetensors"
    data_key = {"split_hash": index.split_hash(), "classes": ",".join(map(str, classes))} | plan.rows.data_key()
    if _matches(result_path, data_key):  # written only after the team's last step: every member sees the same
        ckpt_path.unlink(missing_ok=True)  # a run killed between writing the result and cleaning up
        return  # finished on an earlier run
    device = backend.device
    of = plan.rows.classes_of(classes)  # the classes of the group's rows (the rows themselves without modes)
    means, stds = team_latent_cache(team, backend, cfg, index, of, g, plan.resolution, folder)
    means, stds = plan.rows.take(means, of, classes), plan.rows.take(stds, of, classes)  # per row: its mode's images
    counts = torch.tensor([m.shape[0] for m in means])  # (G,)
    offsets = torch.cumsum(counts, 0) - counts  # (G,) first row of each class in the flat cache
    views = means[0].shape[1]
    flat_means = torch.cat(means).to(device)  # (N, F, c, h, w)
    flat_stds = torch.cat(stds).to(device) if stds[0] is not None else None
    del means, stds

    init = plan.init_vectors[[plan.rows.row_class[r] for r in classes]].unsqueeze(1).repeat(1, cfg.num_vectors, 1)
    vectors = torch.nn.Parameter(init.clone().to(device))
    optimizer = torch.optim.AdamW([vectors], lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "invert", g))
    scaler = LossScaler(backend.dtype)  # fp16: dynamic loss scaling; bf16/fp32: a no-op
    start = 0
    if _matches(ckpt_path, data_key):  # a checkpoint of other data (same path, new files) is not resumed
        start = _load_checkpoint(ckpt_path, vectors, optimizer, generator, scaler)
        if rank_world()[0] == 0:
            print(f"invert group {g + 1}/{num_groups}: resuming from step {start} of {cfg.steps} ({ckpt_path})",
                  flush=True)
    if team.leader:
        _drop_metrics_after(_metrics_path(folder), g, start)  # rows of steps the killed run did past its checkpoint

    group_size = len(classes)
    batch = _group_batch(cfg.batch_size, plan.per_group, group_size)
    lo, hi = span(batch, team.index, team.size)  # this process's share of every batch (all of it alone)
    share = slice(lo, hi)
    loss_sum = torch.zeros(group_size, device=device)
    loss_n = torch.zeros(group_size, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)  # every loss since the start of this process
    trained = 0  # samples this process put through the denoiser
    t0 = time.perf_counter()
    record = None
    bar = progress_bar(total=cfg.steps, initial=start, desc=f"invert group {g + 1}/{num_groups}", disable=not show,
               unit="step")
    for step in range(start, cfg.steps):
        # ---- one batch: the group's classes in turn (each `batch / G` times when G divides the batch) ----------
        # every member draws the random numbers of the whole batch (the same stream) and keeps its share's
        sample_class = _batch_classes(step, batch, group_size)  # (B,) local class of each sample
        pick = (torch.rand(len(sample_class), generator=generator) * counts[sample_class]).long()  # (B,)
        view = torch.randint(0, views, (len(sample_class),), generator=generator)  # (B,)
        rows = to_device((offsets[sample_class] + pick)[share], device)  # (b,) rows of the flat cache, one gather
        view = to_device(view[share], device)
        latents = flat_means[rows, view]  # (b, c, h, w)
        if flat_stds is not None:
            noise = torch.randn((batch, *flat_means.shape[2:]), generator=generator)[share]  # (b, c, h, w)
            latents = latents + flat_stds[rows, view] * to_device(noise, device)
        where = to_device(sample_class[share], device)  # (b,)
        states = backend.encode_placeholder_prompts(layout, vectors)  # (G, L, D_text): one prompt per class
        states = states[where]  # (b, L, D_text), each sample its class's prompt
        per_sample = backend.denoising_loss(latents, states, generator, rows=(lo, hi, batch))  # (b,)
        trained += len(per_sample)
        # the batch mean: alone as before; in a team each member's sum / B, so the team's summed gradient is it
        loss = per_sample.mean() if team.size == 1 else per_sample.sum() / batch
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:  # not for an empty share (a batch smaller than the team)
            scaler.scaled(loss).backward()
        if team.size > 1:
            _sum_gradient(vectors, team)  # before unscaling: every member checks the same summed gradient
        applied = scaler.step(optimizer)  # False only for a step fp16 loss scaling skipped (inf/NaN gradient)
        counted = per_sample.detach().float()
        if applied:
            finite &= torch.isfinite(loss)
            weight = torch.ones_like(counted)
        else:  # the vectors did not change: a finite loss still describes them; an inf one is left out
            weight = torch.isfinite(counted).float()
            counted = counted.nan_to_num(0.0, 0.0, 0.0)
            if scaler.exhausted:
                _stop_if_diverged(torch.zeros((), dtype=torch.bool), vectors, step + 1, g, ckpt_path, cfg, scaler)
        loss_sum.index_add_(0, where, counted)
        loss_n.index_add_(0, where, weight)
        done = step + 1
        bar.update(1)

        if done % cfg.log_every == 0 or done == cfg.steps:
            finite = team.all_finite(finite)
            team.all_reduce_(loss_sum)  # the per-class losses of the whole batch, as one process logs them
            team.all_reduce_(loss_n)
            record = _metrics(vectors.detach(), init.to(device), loss_sum / loss_n.clamp_min(1),
                              plan.rows.labels(index.classes, classes), g, done, _lr_at(step, cfg),
                              time.perf_counter() - t0) | scaler.metrics()
            _stop_if_diverged(finite, vectors, done, g, ckpt_path, cfg, scaler)
            if team.leader:
                append_jsonl(_metrics_path(folder), record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            loss_sum.zero_()
            loss_n.zero_()
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            finite = team.all_finite(finite)
            _stop_if_diverged(finite, vectors, done, g, ckpt_path, cfg, scaler)  # never checkpoint a bad state
            if team.leader:
                _save_checkpoint(ckpt_path, vectors, optimizer, generator, done, data_key, scaler)
    bar.close()
    finite = team.all_finite(finite)
    _stop_if_diverged(finite, vectors, cfg.steps, g, ckpt_path, cfg, scaler)
    if team.size > 1:
        print(f"invert group {g + 1}/{num_groups}: process {team.rank} trained {trained} of "
              f"the group's {batch * (cfg.steps - start)} samples (data parallel over processes "
              f"{', '.join(map(str, team.ranks))})", flush=True)
    if not team.leader:
        return
    if record is not None:
        skipped = (f" ({scaler.skipped} skipped by fp16 loss scaling for an inf/NaN gradient; loss scale now "
                   f"{scaler.scale:g})" if scaler.enabled else "")
        print(f"invert group {g + 1}/{num_groups}: done, {cfg.steps} steps{skipped}; final loss {record['loss']:.4f} "
              f"(mean of the last {min(cfg.log_every, cfg.steps - start)} steps)", flush=True)
    save_tensors(result_path, {"embeddings": vectors.detach().float().cpu(), "init": init.cpu()},
                 {"group": str(g), "steps": str(cfg.steps)} | data_key)
    ckpt_path.unlink(missing_ok=True)
    (folder / "latents" / f"g{g:05d}.safetensors").unlink(missing_ok=True)


def _sum_gradient(vectors: torch.nn.Parameter, team: Team) -> None:
    """Sum the (G, V, D) gradient of the placeholder vectors over the team (a member with no sample adds zeros)."""
    if vectors.grad is None:
        vectors.grad = torch.zeros_like(vectors)
    team.all_reduce_(vectors.grad)


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


def _stop_if_diverged(finite: torch.Tensor, vectors: torch.Tensor, step: int, g: int, ckpt_path: Path, cfg,
                      scaler: LossScaler | None = None) -> None:
    """Raise TrainingDiverged if a loss or a vector became NaN/inf, or fp16 loss scaling ran out of scale (a host
    sync: only at log and checkpoint steps), with the likely cause for the dtype the model runs in."""
    if bool(finite) and bool(torch.isfinite(vectors).all()) and not (scaler is not None and scaler.exhausted):
        return
    kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.is_file() else "no checkpoint was written yet"
    what = "the loss became NaN or inf"
    if scaler is not None and scaler.exhausted:
        what = (f"the gradient stayed NaN or inf in fp16 while loss scaling halved its scale to {scaler.scale:g} "
                f"({scaler.skipped} steps skipped)")
    raise TrainingDiverged(
        f"{what} by step {step} of group {g}; {kept}. {divergence_advice(cfg.dtype, cfg.lr)}, and rerun with "
        "--overwrite"
    )


def _drop_metrics_after(path: Path, g: int, step: int) -> None:
    """Remove metrics rows of group `g` past `step` (and a torn last line), so a resumed run logs each step once."""
    if not path.is_file():
        return
    rows = read_jsonl(path)
    kept = [r for r in rows if not (r.get("group") == g and r.get("step", 0) > step)]
    text = path.read_text(encoding="utf-8")
    if len(kept) != len(rows) or (text and not text.endswith("\n")) or len(rows) != len(text.splitlines()):
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _metrics(vectors, init, class_loss, names, g, step, lr, elapsed) -> dict:
    delta = (vectors - init).flatten(1).norm(dim=1)  # (G,)
    cosine = torch.nn.functional.cosine_similarity(vectors, init, dim=-1).mean(dim=1)  # (G,) mean over V
    return {
        "group": g,
        "step": step,
        "loss": float(class_loss.mean()),
        "lr": lr,
        "seconds": round(elapsed, 3),
        "classes": names,
        "class_loss": [round(float(x), 6) for x in class_loss],
        "delta_norm": [round(float(x), 6) for x in delta],
        "cosine": [round(float(x), 6) for x in cosine],
    }


def _matches(path: Path, key: dict[str, str]) -> bool:
    """The group file exists, is intact, and was made from the same data."""
    if not path.is_file():
        return False
    try:
        _, meta = load_tensors(path, "group file")
    except UserError:
        return False  # damaged (it cannot be: writes are atomic) or foreign: train again
    return all(meta.get(k) == v for k, v in key.items())


def _save_checkpoint(path: Path, vectors, optimizer, generator, step: int, key: dict[str, str],
                     scaler: LossScaler) -> None:
    state = optimizer.state[vectors]
    tensors = {  # without a state AdamW has not stepped yet (fp16 loss scaling skipped every step): its fresh state
        "vectors": vectors.detach().cpu(),
        "exp_avg": state["exp_avg"].cpu() if state else torch.zeros(vectors.shape),
        "exp_avg_sq": state["exp_avg_sq"].cpu() if state else torch.zeros(vectors.shape),
        "adam_step": torch.as_tensor(state.get("step", 0.0)).reshape(1).float().cpu(),
        "rng_state": generator.get_state(),
        "loss_scaler": scaler.state(),  # (scale, good steps, skipped steps): fp16 resumes bit for bit
    }
    save_tensors(path, tensors, {"step": str(step)} | key)


def _load_checkpoint(path: Path, vectors, optimizer, generator, scaler: LossScaler) -> int:
    tensors, meta = load_tensors(path, "checkpoint")
    with torch.no_grad():
        vectors.copy_(tensors["vectors"].to(vectors.device))
    optimizer.state[vectors] = {
        "step": tensors["adam_step"].reshape(()).clone(),
        "exp_avg": tensors["exp_avg"].to(vectors.device).clone(),
        "exp_avg_sq": tensors["exp_avg_sq"].to(vectors.device).clone(),
    }
    generator.set_state(tensors["rng_state"])
    if "loss_scaler" in tensors:
        scaler.load_state(tensors["loss_scaler"])
    return int(meta["step"])
