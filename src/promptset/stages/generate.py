"""Regenerate training images from the learned prompts (D3M step 3/4), and optionally the teacher's soft labels.

Image i of class c depends only on (prompts, seed, c, i, sampler batch) (see `backends.sampling`), so its PNG is
byte-identical for any `--batch-size`, resume or process count. Each generated collage is cut into its
factor x factor patches, resized to the dataset resolution. A rerun skips images whose files exist, decode, and were
made with the same settings (the manifest records their key), so an interrupted or partly deleted generation is
completed, not redone. `labels.safetensors` records the settings themselves, so `evaluate` can tell whether these
images are the ones it would make. With modes (`invert --modes K`), image i of class c is drawn from the mode
`modes.mode_of` spreads it to by the stored mode weights (every prefix of a class's images is spread in proportion
to its modes' training images); the manifest names each image's mode, and the folders stay one per class.
`--guidance-interval`, `--cads` and `--selection diverse` widen the set without storing anything
(`backends.diversity`); they are part of the generation settings only when on.

Under torchrun every process takes a contiguous share of the (class, index) jobs (`sampling.rank_share`, as `evaluate`
shares its fresh rounds), so any class count keeps every process busy. PNGs are encoded and written on a writer
thread while the sampler goes on; the teacher labels each batch's patches on the model's device, from the pixels
just made (what the PNG holds), and rank 0 gathers every process's labels into `labels.safetensors`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import threads
from ..artifacts import PromptSet, image_digests, images_sha256, made_with, save_tensors
from ..atomic import BackgroundWriter, append_jsonl, read_jsonl, save_image, write_text
from ..backends import sampling
from ..backends.base import PREDICTION_TYPES
from ..backends.diversity import Diversity, job_shares
from ..backends.sampling import SAMPLERS, Job, PromptConditioner, generation_key, generation_settings, jobs_for
from ..backends.selection import AUTO_CANDIDATES, best_of_candidates, candidate_seeds
from ..config import make_config, opt, to_dict
from ..data import load_image, quantize_pixels, to_pil, to_tensor
from ..devices import DTYPE_CHOICES, dtype_name
from ..dist import all_gather_rows, barrier, prepared_everywhere, rank_world
from ..errors import UserError
from ..grids import labeled_grid
from ..labelcodec import CODEC_HELP, encode_labels, parse_codec
from ..models import label_pixels, teacher_features
from ..modes import MODE_RULE
from ..progress import progress_bar
from ..runfolder import (
    ClassInfo,
    absolute_paths,
    check_same_classes,
    dataset_image_size,
    remove_stale_tmp,
    require_classes,
    select_info,
    stage_config,
    write_config,
)


@dataclass
class GenerateConfig:
    # torchrun's own parser takes `--run` for an abbreviation of its `--run-path`: under torchrun pass --run-dir
    run: str = opt("", "run folder with prompts.safetensors (from invert)", aliases=("--run-dir",))
    out: str = opt("", "where generated/, grid.png and labels.safetensors go (default: the run folder)")
    ipc: int = opt(10, "training images (patches) per class")
    steps: int = opt(25, "denoising steps")
    guidance: float = opt(7.5, "classifier-free guidance scale (1 = off)")
    batch_size: int = opt(8, "images per progress step (never changes the images)")
    sampler_batch: int = opt(8, "images denoised together, padded to exactly this many; images depend on it in the "
                             "last bits, so keep it fixed to reproduce a stored set (larger is faster on a GPU)")
    seed: int = opt(0, "random seed; image seeds are derived from (seed, class, index)")
    backend: str = opt("", "backend kind (default: the one invert used)")
    model: str = opt("", "model (default: the one invert used)")
    sampler: str = opt("ddim", "sampler", choices=list(SAMPLERS))
    resolution: int = opt(0, "generation resolution in pixels (default: invert's)")
    factor: int = opt(0, "cut each image into factor x factor patches (default: select's factor, else 1)")
    image_size: int = opt(0, "side of each saved patch in pixels (default: the resolution of the data the prompts "
                          "were learned from: select's patch size, else the side of invert's images)")
    soft_labels: bool = opt(False, "store the teacher's soft labels (logits) per patch in labels.safetensors")
    teacher: str = opt("", "teacher for --soft-labels and --candidates, as NAME:PATH.safetensors or a promptset "
                       "teacher's PATH")
    label_codec: str = opt("fp16", CODEC_HELP + "; every stored byte is counted", aliases=("--label-dtype",))
    candidates: int = opt(0, "seed selection: draw G candidate images per stored image and keep the one the teacher "
                          "finds most typical of its class (lowest cross-entropy); only the chosen seed is stored, so "
                          "it costs G-1 extra generations and no byte (1 = off; default 0 = auto: "
                          f"{AUTO_CANDIDATES} with --teacher, else 1; BENCHMARKS.md measures the gain)")
    selection: str = opt("typical", "which of the --candidates the teacher keeps: typical = the lowest cross-entropy; "
                         "diverse[:MARGIN] = among those within MARGIN nats of it (default 0.1), the farthest in the "
                         "teacher's penultimate features from the class's earlier images (image i depends on images "
                         "0..i-1 of its class only, so a smaller IPC is a prefix; under torchrun each process takes "
                         "whole classes)")
    guidance_interval: str = opt("", "LO,HI: classifier-free guidance only on the steps k whose position k/steps lies "
                                 "in [LO, HI) (0 = the first step, from pure noise), the conditional prediction alone "
                                 "(its unconditional pass skipped) on the others, e.g. 0.3,1: none on the first 30% "
                                 "(Kynkaanniemi et al. 2024); default: every step")
    cads: str = opt("", "TAU1,TAU2[,S[,PSI]]: condition-annealed sampling (CADS, Sadat et al. 2024): Gaussian noise "
                    "of scale S (default 0.25) on the prompt's states, all of it at diffusion time t >= TAU2, none at "
                    "t <= TAU1 (t = 1 - k/steps), rescaled to their mean and std with weight PSI (default 1), each "
                    "image's noise from its own seed; e.g. 0.6,0.9 (the paper's); default off")
    describe: str = opt("off", "random: each image's prompt gets attribute words drawn from its own seed around its "
                        "token ('a photo of a distant grey <token> on a busy blue background'; sizes, colours, "
                        "height, "
                        "texture, brightness, as `promptset caption` writes them), for generators trained on "
                        "per-image captions (pretrain --captions); stores nothing; off = the prompts' template")
    device: str = opt("auto", "torch device")
    dtype: str = opt("auto", "model dtype: auto = bf16 on GPUs of compute capability 8.0+, fp16 on older GPUs, fp32 "
                     "on CPU (recorded resolved, so evaluate can reuse these images)", choices=DTYPE_CHOICES)
    model_config: str = opt("", "sd single-file checkpoint: its diffusers config folder (default: invert's)")
    prediction_type: str = opt("", "sd: override the scheduler's prediction type (default: invert's)",
                               choices=["", *PREDICTION_TYPES])
    compile: bool = opt(False, "torch.compile the UNet: one compile up front (tens of seconds), then faster batches; "
                        "images match uncompiled ones to float rounding, not bit for bit (measure with "
                        "benchmarks/bench_generate.py --compile)")
    progress: bool = opt(True, "show progress bars")


def generate(cfg: GenerateConfig | None = None, **overrides) -> Path:
    """Write `generated/<class>/<idx>.png`, `generated/manifest.jsonl`, `grid.png` (and `labels.safetensors`)."""
    cfg = make_config(GenerateConfig, cfg, overrides, "generate")
    rank, world = rank_world()
    plan = prepared_everywhere(_prepare, cfg)
    run, out, classes, backend = plan.run, plan.out, plan.classes, plan.backend
    factor, image_size, key = plan.factor, plan.image_size, plan.key
    gen_dir = out / "generated"
    per_class = math.ceil(cfg.ipc / factor**2)
    if rank == 0:
        if out == run:
            write_config(run, "generate", to_dict(cfg))
        remove_stale_tmp(gen_dir)  # left by a killed run; nobody writes here before the barrier below
        _say_image_size(plan, cfg)
    every = jobs_for(list(range(len(classes))), per_class, cfg.seed)  # (class, index) order
    spans = job_shares(every, world, whole_classes=plan.diversity.selection is not None)  # diverse: classes whole
    lo, hi = spans[rank]
    jobs = every[lo:hi]  # this process's share
    done = _finished_images(gen_dir, classes, jobs, key, factor, cfg.ipc, image_size, cfg.candidates)
    todo = [j for j in jobs if (j.cls, j.index) not in done]
    if rank == 0 and done:
        mine = "" if world == 1 else " (this process's share)"
        print(f"generate: {len(done)} of {len(jobs)} images{mine} already made with these settings; "
              f"making {len(todo)}", flush=True)
    if rank == 0 and plan.diversity.describe(cfg.guidance, cfg.steps):
        print(f"generate: {plan.diversity.describe(cfg.guidance, cfg.steps)}", flush=True)
    barrier()

    labels = None
    if cfg.soft_labels:  # images made by an earlier run are labelled from their files
        labels = _Labels(plan.teacher, lo, len(jobs), factor, cfg.ipc, cfg.sampler_batch)
        labels.add_files(gen_dir, classes, [j for j in jobs if (j.cls, j.index) in done], image_size)
    conditioner = PromptConditioner(backend, plan.prompts)
    with torch.no_grad():
        uncond = backend.encode_prompts([""]) if cfg.guidance != 1.0 else None
    chunk = cfg.sampler_batch * factor**2  # --selection diverse: a class's images an earlier run made, from files
    selector = plan.diversity.spread(lambda px: teacher_features(plan.teacher, px, chunk),
                                     lambda c, idx: _stored_pixels(gen_dir, classes, [Job(c, i, 0) for i in idx],
                                                                   factor, cfg.ipc, image_size))
    part = gen_dir / f".manifest.rank{rank}.jsonl"
    bar = progress_bar(total=len(jobs), initial=len(jobs) - len(todo), desc="generate", unit="img",
               disable=not (cfg.progress and rank == 0))
    with BackgroundWriter() as writer:  # PNG encoding and fsync off the sampling thread
        for s in range(0, len(todo), cfg.batch_size):
            batch = todo[s : s + cfg.batch_size]
            # (B, P, 3, S, S) uint8, what the PNGs hold; with --candidates the jobs carry the chosen seeds
            batch, pixels, extras = _make_images(plan, cfg, conditioner, uncond, batch, selector)
            if labels is not None:
                labels.add(batch, pixels)
            writer.submit(_write_images, gen_dir, classes, batch, pixels, factor, cfg.ipc, part, key, extras)
            bar.update(len(batch))
    bar.close()
    if world > 1:
        print(f"generate: process {rank} made {len(todo)} of its {len(jobs)} images (jobs {lo}-{hi - 1} of "
              f"{len(every)} in (class, index) order)", flush=True)
    logits = None if labels is None else all_gather_rows(labels.logits, len(every), spans)  # (N, P, C) everywhere
    barrier()
    if rank == 0:
        _finish(plan, cfg, gen_dir, per_class, logits)
        what = "seeds and the teacher's soft labels" if cfg.soft_labels else "seeds"
        best = (f", each the teacher's pick of {cfg.candidates} candidates ({plan.diversity.texts()['selection']}; "
                "--candidates 1: no seed selection)" if cfg.candidates > 1 else "")
        spread = (f", each class's images spread over its modes ({plan.prompts.num_prompts} prompts) in proportion "
                  "to their training images" if plan.prompts.has_modes else "")
        print(f"generate: {len(classes) * cfg.ipc} images ({len(classes)} classes x {cfg.ipc}, "
              f"{len(todo)} made now{best}{spread}) in {gen_dir}; grid {plan.out / 'grid.png'}; {what} in "
              f"{plan.out / 'labels.safetensors'}", flush=True)
    barrier()
    return gen_dir


def _write_images(gen_dir: Path, classes, batch: list[Job], pixels: torch.Tensor, factor: int, ipc: int,
                  manifest: Path, key: str, extras: list[dict]) -> None:
    """The patch PNGs of a batch of images (atomic, fsynced), then one manifest row per image (on the writer)."""
    for job, job_pixels, extra in zip(batch, pixels, extras):
        folder = classes[job.cls].folder
        for p, idx in enumerate(_patch_indices(job, factor, ipc)):
            save_image(gen_dir / folder / f"{idx:05d}.png", to_pil(job_pixels[p]))
        # one manifest row per image, appended after its files exist: a resumed run trusts these rows
        append_jsonl(manifest, {"class_index": job.cls, "image": job.index, "seed": job.seed, "key": key, **extra})


def _make_images(plan: _Plan, cfg: GenerateConfig, conditioner, uncond, batch: list[Job], spread,
                 ) -> tuple[list[Job], torch.Tensor, list[dict]]:
    """(jobs as stored, their patches (B, P, 3, S, S) uint8, manifest extras): the jobs' own images, or with
    --candidates G the best of G candidates per job (the job then carries the chosen candidate's seed); `spread`:
    --selection diverse's `SpreadSelection`, or None."""
    kw = dict(steps=cfg.steps, guidance=cfg.guidance, factor=plan.factor, image_size=plan.image_size, uncond=uncond,
              micro_batch=cfg.sampler_batch, diversity=plan.diversity)
    if cfg.candidates == 1:
        patches = sampling.generate_batch(plan.backend, conditioner, batch, **kw)  # (B, P, 3, S, S) in [0, 1]
        return batch, quantize_pixels(patches), [{} for _ in batch]
    chunk = cfg.sampler_batch * plan.factor**2  # fixed teacher batches: a score never depends on the grouping
    chosen, pixels, ce, best = best_of_candidates(plan.backend, conditioner, batch, cfg.candidates,
                                                  lambda px: label_pixels(plan.teacher, px, chunk), spread=spread,
                                                  **kw)
    extras = [{"candidate": int(g), "teacher_ce": round(float(e[g]), 6)} for e, g in zip(ce, best)]
    return chosen, pixels, extras


def _say_image_size(plan: _Plan, cfg: GenerateConfig) -> None:
    """Say at which size patches are stored when it is not the size they are generated at, and why."""
    made = plan.backend.resolution // plan.factor
    if plan.image_size != made:
        why = "--image-size" if cfg.image_size else "the resolution of the data the prompts were learned from"
        print(f"generate: patches are generated at {made} px and stored at {plan.image_size} px ({why})", flush=True)


class _Labels:
    """The teacher's logits of this process's images (its `span` share [lo, lo + count) of all jobs): (count, P, C).

    Patches past `ipc` (the last image of a class cut into more patches than needed) keep zero logits."""

    def __init__(self, teacher, lo: int, count: int, factor: int, ipc: int, sampler_batch: int):
        self.teacher, self.lo, self.factor, self.ipc = teacher, lo, factor, ipc
        self.chunk = sampler_batch * factor**2  # patches per teacher call, fixed: labels never depend on batching
        self.per_class = math.ceil(ipc / factor**2)
        self.logits = torch.zeros(count, factor**2, teacher.num_classes)

    def add(self, batch: list[Job], pixels: torch.Tensor) -> None:
        """Label the patches (B, P, 3, S, S) uint8 of a batch of jobs."""
        logits = label_pixels(self.teacher, pixels.flatten(0, 1), self.chunk).view(len(batch), self.factor**2, -1)
        for job, row in zip(batch, logits):
            n = len(_patch_indices(job, self.factor, self.ipc))
            self.logits[job.cls * self.per_class + job.index - self.lo, :n] = row[:n]

    def add_files(self, gen_dir: Path, classes, jobs: list[Job], image_size: int) -> None:
        """Label images an earlier run made, read back from their PNGs."""
        for s in range(0, len(jobs), 64):
            batch = jobs[s : s + 64]
            self.add(batch, _stored_pixels(gen_dir, classes, batch, self.factor, self.ipc, image_size))


def _stored_pixels(gen_dir: Path, classes, jobs: list[Job], factor: int, ipc: int, image_size: int) -> torch.Tensor:
    """The saved patches of the jobs' images (B, P, 3, S, S) uint8; patches past `ipc` (not saved) stay zero."""
    pixels = torch.zeros(len(jobs), factor**2, 3, image_size, image_size, dtype=torch.uint8)
    for b, job in enumerate(jobs):
        for q, idx in enumerate(_patch_indices(job, factor, ipc)):
            with load_image(gen_dir / classes[job.cls].folder / f"{idx:05d}.png") as image:
                pixels[b, q] = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return pixels


@dataclass
class _Plan:
    """What `generate` resolved and checked before writing anything."""

    run: Path
    out: Path
    classes: list[ClassInfo]
    backend: object
    prompts: PromptSet
    teacher: object  # labels (--soft-labels) and scores (--candidates) the patches; None without either
    factor: int
    image_size: int
    settings: dict  # everything that changes a pixel (`generation_settings`)
    diversity: Diversity  # guidance interval, CADS, selection (`backends.diversity`)

    @property
    def key(self) -> str:
        return generation_key(self.settings)


def _prepare(cfg: GenerateConfig) -> _Plan:
    """Check the run, the prompts and the flags, and load the model; raises UserError before anything is written."""
    from ..backends import create_backend

    if not cfg.run:
        raise UserError("--run is required")
    run = Path(cfg.run)
    for name in ("ipc", "steps", "batch_size", "sampler_batch"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    classes = require_classes(run)
    prompts_path = run / "prompts.safetensors"
    prompts = PromptSet.load(prompts_path)
    check_same_classes([c.folder for c in classes], prompts.class_folders, f"prompts file {prompts_path}",
                       "regenerate the prompts with invert in this run folder")
    invert_cfg, selected = stage_config(run, "invert"), select_info(run)
    kind = cfg.backend or invert_cfg.get("backend") or prompts.backend
    model = cfg.model or invert_cfg.get("model") or prompts.model_id
    factor = cfg.factor or int(selected.get("factor", 1))
    parse_codec(cfg.label_codec, len(classes))  # a bad codec string is refused before the model loads
    if cfg.candidates < 0:
        raise UserError(f"--candidates must be 0 (auto), 1 (no seed selection) or more, got {cfg.candidates}")
    if cfg.candidates == 0:  # auto: seed selection whenever a teacher can score the candidates
        cfg.candidates = AUTO_CANDIDATES if cfg.teacher else 1
    if cfg.candidates > 1 and not cfg.teacher:
        raise UserError("--candidates needs --teacher: the teacher scores the candidate images")
    if cfg.soft_labels and not cfg.teacher:
        raise UserError("--soft-labels needs --teacher PATH.safetensors (from `promptset teacher`) or NAME:PATH")
    diversity = Diversity.parse(cfg.guidance_interval, cfg.cads, cfg.selection, guidance=cfg.guidance,
                                candidates=cfg.candidates, describe=cfg.describe)
    teacher = None
    if cfg.soft_labels or cfg.candidates > 1:  # checked before the model loads; it labels on the model's device
        from ..models import load_teacher
        from ..models.teachers import penultimate_layer, require_input_size

        teacher = load_teacher(cfg.teacher, num_classes=len(classes), device="cpu",
                               class_folders=[c.folder for c in classes])
        # it labels (and scores) every patch at the size it expects
        require_input_size(teacher, "generate --soft-labels" if cfg.soft_labels else "generate --candidates")
        if diversity.selection is not None:
            penultimate_layer(teacher)  # --selection diverse measures distances in its penultimate features
    if absolute_paths({"model": model})["model"] == invert_cfg.get("model"):  # load it as invert did
        cfg.model_config = cfg.model_config or invert_cfg.get("model_config") or ""
        cfg.prediction_type = cfg.prediction_type or invert_cfg.get("prediction_type") or ""
    backend = create_backend(kind, model, device=cfg.device, dtype=cfg.dtype, sampler=cfg.sampler,
                             model_config=cfg.model_config, prediction_type=cfg.prediction_type)
    cfg.dtype = dtype_name(backend.dtype)  # `auto` resolved: recorded in config.yaml and labels.safetensors
    if teacher is not None:
        teacher = teacher.to(backend.device)
    prompts.check_backend(backend, prompts_path)
    if cfg.compile:
        backend.compile_denoiser()
    if cfg.resolution or invert_cfg.get("resolution"):
        backend.resolution = int(cfg.resolution or invert_cfg["resolution"])
    image_size = cfg.image_size or dataset_image_size(run) or backend.resolution // factor
    out = Path(cfg.out) if cfg.out else run
    settings = generation_settings(
        prompts_hash=prompts.content_hash(), template=prompts.template,
        model_hash=backend.model_hash, steps=cfg.steps, guidance=cfg.guidance, sampler=cfg.sampler, seed=cfg.seed,
        resolution=backend.resolution, factor=factor, image_size=image_size, dtype=cfg.dtype,
        sampler_batch=cfg.sampler_batch, compile=cfg.compile, mode_rule=MODE_RULE if prompts.has_modes else "",
        cpu_threads=threads.current() if backend.device.type == "cpu" else None, diversity=diversity,
    )
    if cfg.candidates > 1:  # another image is kept: part of what the stored set is (keys of G = 1 runs unchanged)
        settings.update({"candidates": cfg.candidates, "selection_teacher": teacher.weights_sha256})
    return _Plan(run, out, classes, backend, prompts, teacher, factor, image_size, settings, diversity)


def _finished_images(gen_dir: Path, classes, jobs: list[Job], key: str, factor: int, ipc: int,
                     image_size: int, candidates: int) -> set[tuple[int, int]]:
    """(class, image) pairs already generated with these settings: in a manifest, and every patch file decodes."""
    rows = _manifest_rows(gen_dir)
    done = set()
    for job in jobs:
        row = rows.get((job.cls, job.index))
        if row is not None and row.get("key") == key and row.get("seed") in candidate_seeds(job.seed, candidates):
            files = [gen_dir / classes[job.cls].folder / f"{idx:05d}.png" for idx in _patch_indices(job, factor, ipc)]
            if all(_image_ok(f, image_size) for f in files):
                done.add((job.cls, job.index))
    return done


def _manifest_rows(gen_dir: Path) -> dict[tuple[int, int], dict]:
    """Per (class, image), the latest row of the final manifest or of any process's partial manifest."""
    rows = {}
    for path in [gen_dir / "manifest.jsonl", *sorted(gen_dir.glob(".manifest.rank*.jsonl"))]:
        for row in read_jsonl(path):
            if isinstance(row.get("class_index"), int) and isinstance(row.get("image"), int):
                rows[(row["class_index"], row["image"])] = row
    return rows


def _patch_indices(job: Job, factor: int, ipc: int) -> list[int]:
    first = job.index * factor**2
    return list(range(first, min(first + factor**2, ipc)))


def _image_ok(path: Path, size: int) -> bool:
    """The file exists, decodes completely, and has the patch size."""
    try:
        with load_image(path) as img:
            return img.size == (size, size)
    except (UserError, OSError):
        return False


def _finish(plan: _Plan, cfg: GenerateConfig, gen_dir: Path, per_class: int, logits: torch.Tensor | None) -> None:
    """Write the final manifest, grid.png and labels.safetensors (with the generation settings) from rank 0.

    logits: the teacher's logits of every patch (N, P, C) fp32 in (class, index) order, or None without a teacher."""
    classes, factor, image_size, teacher, key = plan.classes, plan.factor, plan.image_size, plan.teacher, plan.key
    rows = _manifest_rows(gen_dir)
    manifest, seeds = [], []
    for job in jobs_for(list(range(len(classes))), per_class, cfg.seed):
        row = rows.get((job.cls, job.index))
        if row is None or row.get("key") != key or row.get("seed") not in candidate_seeds(job.seed, cfg.candidates):
            raise RuntimeError(f"generate: image {job.index} of class {job.cls} is missing from every manifest")
        info = classes[job.cls]
        job = Job(job.cls, job.index, row["seed"])  # the chosen candidate's seed, which alone regenerates it
        modes = _mode_fields(plan.prompts, job)
        seeds.append(job.seed)
        for p, idx in enumerate(_patch_indices(job, factor, cfg.ipc)):
            manifest.append({"class": info.folder, "class_index": job.cls, "index": idx, "image": job.index,
                             "seed": job.seed, "patch": p, "file": f"{info.folder}/{idx:05d}.png", "key": key,
                             **{k: row[k] for k in ("candidate", "teacher_ce") if k in row}, **modes})
    write_text(gen_dir / "manifest.jsonl", "".join(json.dumps(m) + "\n" for m in manifest))
    for part in gen_dir.glob(".manifest.rank*.jsonl"):
        part.unlink(missing_ok=True)
    _remove_unlisted(gen_dir, classes, {m["file"] for m in manifest})
    _grid(plan.out / "grid.png", gen_dir, classes, min(cfg.ipc, 8), image_size)
    meta = {"ipc": str(cfg.ipc), "factor": str(factor), "images_per_class": str(per_class),
            "steps": str(cfg.steps), "guidance": str(cfg.guidance), "sampler": cfg.sampler,
            "sampler_batch": str(cfg.sampler_batch), "seed": str(cfg.seed),
            "image_size": str(image_size), "class_folders": json.dumps([c.folder for c in classes]),
            "generation_key": key, "generation": json.dumps(plan.settings, sort_keys=True)}
    tensors = {"seeds": torch.tensor(seeds, dtype=torch.int32)}  # (N,)
    saved = _stored_patches(gen_dir, manifest)  # what materialize checks: the set's hash, each image's, the machine
    meta.update(image_sha256=json.dumps([images_sha256(saved)]), image_digests=json.dumps([image_digests(saved)]),
                made_with=json.dumps(made_with(plan.backend.device)))
    if cfg.soft_labels:
        stored, label_meta = encode_labels(logits, parse_codec(cfg.label_codec, len(classes)))
        tensors.update(stored)
        meta.update({"teacher": teacher.spec, "teacher_sha256": teacher.weights_sha256} | label_meta)
    save_tensors(plan.out / "labels.safetensors", tensors, meta)


def _mode_fields(prompts: PromptSet, job: Job) -> dict:
    """With modes, the manifest names the mode (within its class) and the prompt (row) an image was drawn from."""
    if not prompts.has_modes:
        return {}
    row = prompts.row_of(job.cls, job.index)
    return {"mode": prompts.class_rows(job.cls).index(row), "prompt": row, "token": prompts.token_names[row]}


def _remove_unlisted(gen_dir: Path, classes, listed: set[str]) -> None:
    """Delete PNGs of an earlier, larger generation, so `generated/` holds exactly the manifest's images."""
    for info in classes:
        for path in (gen_dir / info.folder).glob("*.png"):
            if f"{info.folder}/{path.name}" not in listed:
                path.unlink()


def _stored_patches(gen_dir: Path, manifest: list[dict]) -> torch.Tensor:
    """The saved patches as uint8 (ipc * C, 3, S, S) in ImageFolder order (class, then file name)."""
    files = sorted((m["class_index"], m["index"], m["file"]) for m in manifest)
    return torch.stack([torch.from_numpy(np.array(load_image(gen_dir / f), dtype=np.uint8)).permute(2, 0, 1)
                        for _, _, f in files])


def _grid(path: Path, gen_dir: Path, classes, per_row: int, size: int) -> None:
    """A row per class, labelled with its display name: the first `per_row` patches, enlarged to be readable."""
    rows = [torch.stack([to_tensor(load_image(gen_dir / info.folder / f"{i:05d}.png")) for i in range(per_row)])
            for info in classes]  # (per_row, 3, S, S) each
    save_image(path, labeled_grid(rows, [info.name for info in classes]))
