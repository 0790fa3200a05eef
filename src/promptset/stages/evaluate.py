"""Train students on a distilled set (D3M prompts or a baseline) and test them on the real test split.

Protocols (docs/DESIGN.md section 6; docs/PAPER_NOTES.md sections 2-3):
- P1 (D3M's): stored soft labels, no augmentation. Each training sample x carries the teacher's logits t(x), stored
  once (fp16 by default) and counted in the budget; the loss is KL(softmax(t/T) || softmax(s(x)/T)). "Fresh
  variations": ceil(epochs / regen_every) rounds of images are drawn from the prompts with new seeds and labelled by
  the teacher; N (= C x ipc) and the batch size stay fixed, so the total number of optimizer steps
  (epochs x ceil(N / B)) is the same as on a fixed set (`regen_every 0`). `--round-order mixed` (the default) draws
  every epoch's N samples from all rounds, so each image is seen equally often; `sequential` trains on round r alone
  for epochs [r*k, (r+1)*k): on the CIFAR-10 world the student memorises each round within a few epochs, forgets it
  on the next, and ends below the fixed set (BENCHMARKS.md, the fresh-rounds ablation).
- P2: one-hot labels, cross-entropy, random resized crop + horizontal flip on every batch.
- P3 (RDED / SRe2L, Sun et al. 2024): the teacher relabels every augmented batch online (CutMix, then
  KL with temperature 20; RDED's `validation/main.py`), for comparison with published peers.

Methods (`evaluation.methods`), each under the same protocol, student, epochs and seeds: `d3m`, `class-prompt`,
`rded`, `random-real` and `full`. This module resolves the inputs, prints the budget, and drives
`evaluation.student.train_student` for every method and seed; `evaluation.results` writes what comes out.

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

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..accounting import fmt_bytes, png_bytes, real_bytes
from ..atomic import append_jsonl, locked, write_json
from ..backends.base import PREDICTION_TYPES
from ..backends.diversity import Diversity, parse_cads, parse_guidance_interval, parse_selection
from ..backends.sampling import SAMPLER_BATCH, SAMPLERS
from ..backends.selection import AUTO_CANDIDATES
from ..config import make_config, opt
from ..devices import DTYPE_CHOICES, DTYPES, auto_dtype, resolve_device, resolve_dtype_name
from ..dist import barrier, prepared_everywhere, rank_world
from ..errors import UserError
from ..evaluation.methods import METHODS, NEEDS_TRAIN, Context, RealFolder, load_real_folder
from ..evaluation.results import (
    GENERATIVE,
    entry_key,
    load_results,
    make_entry,
    now,
    print_table,
    variant_key,
    write_report,
)
from ..evaluation.student import Recipe, TrainSet, is_batchnorm, train_student
from ..labelcodec import CODEC_HELP, parse_codec
from ..models import create_student
from ..runfolder import (
    absolute_paths,
    artifact_metadata,
    check_same_classes,
    dataset_image_size,
    require_classes,
    require_prompts,
    select_info,
    stage_config,
)
from ..seeding import derive_seed

PROTOCOLS = ("p1", "p2", "p3")


@dataclass
class EvaluateConfig:
    # torchrun's own parser takes `--run` for an abbreviation of its `--run-path`: under torchrun pass --run-dir
    run: str = opt(
        "", "run folder (classes.json, prompts.safetensors, collages/, select.json)", aliases=("--run-dir",)
    )
    test: str = opt("", "ImageFolder of real test images, one folder per class in classes.json")
    train: str = opt("", "real training ImageFolder for random-real and full (default: the data select used)")
    method: str = opt("d3m", "comma-separated methods: " + ", ".join(METHODS) + "; random-real@M (e.g. "
                      "random-real@d3m) = random-real at the IPC whose stored bytes match method M's at each IPC")
    protocol: str = opt(
        "p1", "p1: stored soft labels, no aug; p2: one-hot + aug; p3: online teacher (RDED)", choices=list(PROTOCOLS)
    )
    student: str = opt("convnet3", "student network (convnet3, convnet4, resnet18, resnet20, resnet56, a timm name)")
    ipc: str = opt("", "training images (patches) per class: one number or a comma-separated list (1,10,50), all "
                   "evaluated in this call (default: the run's generate ipc, else 10)")
    image_size: int = opt(0, "student input side in pixels (default: the resolution of the data the prompts were "
                          "learned from, from select.json or invert)")
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
    round_order: str = opt(
        "mixed", "fresh rounds (regen_every > 0): mixed = every epoch draws its batches from the images of all rounds,"
        " "
        "each seen equally often; sequential = round r alone serves epochs [r*k, (r+1)*k) (the order before 0.1; "
        "the CIFAR-10 ablation in BENCHMARKS.md measures both)", choices=["mixed", "sequential"],
    )
    label_codec: str = opt("fp16", "P1: " + CODEC_HELP + "; every stored byte is counted in the budget",
                           aliases=("--label-dtype",))
    class_prompt: str = opt("a photo of a {name}", "class-prompt template; {name} is the class display name")
    backend: str = opt("", "generator backend kind (default: the one invert used)")
    model: str = opt("", "generator model (default: the one invert used)")
    gen_steps: int = opt(0, "denoising steps (default: generate's, else 25)")
    guidance: float | None = opt(
        None, "classifier-free guidance scale, 0 and 1 included (default: generate's, else 7.5)"
    )
    sampler: str = opt(
        "", "sampler (default: generate's, else ddim)", choices=["", *SAMPLERS]
    )
    gen_seed: int = opt(
        -1, "seed of the generated images (default: generate's, else 0); round 0 uses generate's seeds"
    )
    resolution: int = opt(0, "generation resolution in pixels (default: invert's)")
    factor: int = opt(0, "cut each generated image into factor x factor patches (default: select's)")
    candidates: int = opt(0, "d3m/class-prompt seed selection: G candidate images per stored image, the teacher "
                          "keeps the most typical of its class (lowest cross-entropy), only its seed is stored "
                          "(1 = off; round 0 reuses generate's images when generate used the same G; default 0 = "
                          f"auto: generate's G, else {AUTO_CANDIDATES} when a teacher is needed or given, else 1)")
    selection: str = opt("", "d3m/class-prompt with --candidates G > 1: typical = keep the lowest cross-entropy; "
                         "diverse[:MARGIN] = spread each class's images (see generate --selection) (default: "
                         "generate's, else typical)")
    guidance_interval: str = opt("", "LO,HI: classifier-free guidance only on the steps k with LO <= k/steps < HI "
                                 "(see generate --guidance-interval); 0,1 = every step (default: generate's, else "
                                 "every step)")
    cads: str = opt("", "TAU1,TAU2[,S[,PSI]]: condition-annealed sampling (see generate --cads); off = none (default: "
                    "generate's, else off)")
    describe: str = opt("", "random: d3m/class-prompt images with attribute words drawn from each image's seed "
                        "around its prompt (see generate --describe); off = none (default: generate's, else off)")
    gen_batch_size: int = opt(32, "images per progress step while regenerating (does not change the images)")
    round_cache: bool = opt(True, "keep generated rounds in <run>/eval/rounds/ (uint8 patches with their seeds), so a "
                            "rerun or resumed evaluate takes them from there instead of denoising them again")
    sampler_batch: int = opt(0, "images denoised together, padded to exactly this many (default: generate's, else 8); "
                             "images depend on it in the last bits, larger is faster")
    dtype: str = opt("auto", "generator dtype; auto = the dtype generate recorded when this device runs it (round 0 "
                     "then reuses generate's images), else bf16/fp16 on a GPU, fp32 on CPU", choices=DTYPE_CHOICES)
    model_config: str = opt("", "sd single-file generator: its diffusers config folder (default: invert's)")
    prediction_type: str = opt("", "sd: override the generator's prediction type (default: invert's)",
                               choices=["", *PREDICTION_TYPES])
    eval_every: int = opt(0, "test every N epochs (and after the last); 0 = about 10 tests per student "
                          "(every epochs/10); best-epoch accuracy is over tested epochs")
    eval_batch_size: int = opt(512, "batch size on the test split")
    device: str = opt("auto", "torch device (auto: CUDA when available)")
    channels_last: bool = opt(False, "channels-last memory format for the student (faster convnets on GPU)")
    compile: bool = opt(False, "torch.compile the student (worth it on GPU for long runs)")
    amp: bool = opt(False, "bf16 autocast for the student on CUDA")
    report: bool = opt(True, "also write eval/report.md, report.csv and accuracy_vs_bytes.png")
    progress: bool = opt(True, "show progress bars")


def evaluate(cfg: EvaluateConfig | None = None, **overrides) -> dict:
    """Train `--seeds` students per method; write `<run>/eval/results.json` and `metrics.jsonl`; return the results."""
    cfg = make_config(EvaluateConfig, cfg, overrides, "evaluate")
    rank, world = rank_world()
    main = rank == 0  # under torchrun only rank 0 prints, shows progress and writes
    methods, ipcs, ctx, test = prepared_everywhere(_prepare, cfg, cfg.progress and main)  # joins the gloo group
    if world > 1 and ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    classes, size = ctx.classes, ctx.image_size
    recipe = _recipe(cfg)
    eval_dir = ctx.run / "eval"
    if main:
        eval_dir.mkdir(parents=True, exist_ok=True)
    test_set = TrainSet(test.images, test.labels).to(ctx.device)
    split_hash = {
        "train": ctx.train.split_hash if ctx.train is not None else select_info(ctx.run).get("split_hash"),
        "test": test.split_hash,
    }
    per_image = real_bytes(1, len(classes), size)
    if main and world > 1 and ctx.device.type != "cuda":
        with torch.random.fork_rng(devices=[]):  # leaves the global random state as on the other ranks
            student = create_student(cfg.student, len(classes), size)
        if any(is_batchnorm(m) for m in student.modules()):
            print(
                f"evaluate: {cfg.student} has batch norm, which on CPU normalises each process's slice of the "
                f"batch (about {cfg.batch_size // world} samples), not the whole batch as one process does",
                flush=True,
            )

    new_entries = {}
    for ipc in ipcs:
        ctx.ipc = ipc
        if main:
            _print_plan(ctx, methods, per_image)
        for method in methods:
            if method == "full" and ipc != ipcs[0]:
                continue  # all of --train: the same at every IPC
            new_entries.update(_train_method(ctx, method, recipe, test_set, per_image, split_hash, main))

    results_path = eval_dir / "results.json"
    if main:
        with locked(results_path):  # another evaluate on this run may be adding its entries right now
            results = load_results(results_path)
            results["run"] = str(ctx.run)
            results["entries"].update(new_entries)
            results["updated_at"] = now()
            write_json(results_path, results)
        print_table(list(new_entries.values()))
    barrier()  # the other ranks return what rank 0 wrote
    if not main:
        return load_results(results_path)
    if cfg.report:
        write_report([ctx.run], eval_dir)
    return results


def _train_method(ctx: Context, method: str, recipe: Recipe, test_set: TrainSet, per_image: int, split_hash: dict,
                  main: bool) -> dict:
    """Train `--seeds` students on one method's set at ctx.ipc; returns {key: results entry} (on rank 0)."""
    cfg, eval_dir = ctx.cfg, ctx.run / "eval"
    started = time.time()
    base, _, target = method.partition("@")
    spec = METHODS[base]
    build = spec.build
    if target:  # random-real at the IPC of target's stored bytes
        build = _equal_bytes_builder(ctx, target, spec.build)
    shared = None if spec.per_seed else build(ctx, None)
    runs, png = [], None
    for s in range(cfg.seed, cfg.seed + cfg.seeds):
        data = shared if shared is not None else build(ctx, s)
        if spec.stores_images and png is None and main:
            png = png_bytes(data.rounds[0].images.cpu())
        key = entry_key(method, cfg.protocol, cfg.student, data.ipc, cfg.regen_every) + variant_key(cfg, method)
        if target:  # one row per IPC of the method it matches
            key += f"/matches-{target}-ipc{ctx.ipc}"
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            torch.manual_seed(derive_seed(s, "student-init"))
            if ctx.device.type == "cuda":
                torch.cuda.manual_seed_all(derive_seed(s, "student-init"))
            model = create_student(cfg.student, len(ctx.classes), ctx.image_size).to(ctx.device)
            log = _epoch_logger(eval_dir / "metrics.jsonl", key, method, cfg, s) if main else None
            result = train_student(model, data.rounds, test_set, recipe, seed=s, teacher=ctx.teacher, on_epoch=log,
                                   progress=cfg.progress and main, desc=f"{method} {cfg.protocol} ipc {data.ipc} "
                                   f"seed {s}")  # fmt: skip
        result["seed"] = s
        runs.append(result)
    if not main:
        return {}
    entry = make_entry(ctx, method, key, data, runs, png=png, per_image=per_image, split_hash=split_hash,
                       recipe=recipe, wall=time.time() - started)
    if base == "random-real":
        entry["distilled"].pop("indices", None)  # differs per seed; not useful in the summary
    return {key: entry}


def _prepare(cfg: EvaluateConfig, show: bool) -> tuple[list[str], list[int], Context, RealFolder]:
    """Everything evaluate can refuse, checked before any output exists (reads only, so every rank runs it)."""
    methods, ipcs = _validate(cfg)
    ctx = _context(cfg, methods)
    ipcs = ipcs or [ctx.ipc]
    ctx.ipc = ipcs[0]
    test = load_real_folder(cfg.test, ctx.image_size, "--test", ctx.classes, progress=show)
    if any(m.partition("@")[0] in NEEDS_TRAIN for m in methods):
        train_root = cfg.train or select_info(ctx.run).get("data")
        if not train_root:
            raise UserError("--method random-real/full needs --train (the real training ImageFolder)")
        # the data select distilled from, as select read it (its --max-images-per-class)
        limit = 0 if cfg.train else int(stage_config(ctx.run, "select").get("max_images_per_class") or 0)
        ctx.train = load_real_folder(train_root, ctx.image_size, "--train", ctx.classes, limit, progress=show)
    create_student(cfg.student, len(ctx.classes), ctx.image_size)  # refuse an unknown student before any compute
    return methods, ipcs, ctx, test


def parse_ipcs(value) -> list[int]:
    """`--ipc` as a list: '' -> [] (the default), 10 or '10' -> [10], '1,10,50' -> [1, 10, 50]; refuses < 1."""
    text = str(value if value is not None else "").strip()
    if text in ("", "None"):
        return []
    out = []
    for part in text.split(","):
        try:
            k = int(part.strip())
        except ValueError:
            raise UserError(f"--ipc {value!r}: give whole numbers, e.g. --ipc 10 or --ipc 1,10,50") from None
        if k < 1:
            raise UserError(f"--ipc {value!r}: images per class must be at least 1 (omit --ipc for the run's "
                            "generate ipc)")
        out.append(k)
    return list(dict.fromkeys(out))


def _validate(cfg: EvaluateConfig) -> tuple[list[str], list[int]]:
    if not cfg.run:
        raise UserError("--run is required (a run folder made by select/invert)")
    if not cfg.test:
        raise UserError("--test is required: the real test split as an ImageFolder (one folder per class)")
    methods = [m.strip() for m in cfg.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS and not _equal_bytes_name(m)]
    if unknown or not methods:
        raise UserError(f"--method {cfg.method!r}: unknown {unknown}; choose from {', '.join(METHODS)}, or "
                        "random-real@M for random-real at the stored bytes of method M")
    if cfg.protocol not in PROTOCOLS:
        raise UserError(f"--protocol {cfg.protocol!r} is not one of {list(PROTOCOLS)}")
    for name in ("epochs", "seeds", "batch_size", "eval_batch_size", "gen_batch_size"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if cfg.candidates < 0:
        raise UserError(f"--candidates must be 0 (auto), 1 (no seed selection) or more, got {cfg.candidates}")
    ipcs = parse_ipcs(cfg.ipc)
    parse_codec(cfg.label_codec)  # K against the class count once classes.json is read (_context)
    for name in ("image_size", "eval_every", "regen_every", "gen_steps", "resolution", "factor", "sampler_batch"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative")
    if cfg.guidance is not None and cfg.guidance < 0:
        raise UserError(f"--guidance {cfg.guidance} must not be negative (1 = no guidance)")
    parse_guidance_interval(cfg.guidance_interval)  # bad text is refused before anything loads
    parse_cads(cfg.cads)
    if cfg.selection:
        parse_selection(cfg.selection)
    if cfg.lr <= 0 or cfg.temperature < 0 or cfg.cutmix < 0 or not 0 <= cfg.crop_scale <= 1:
        raise UserError("--lr must be positive, --temperature and --cutmix not negative, --crop-scale in [0, 1]")
    return list(dict.fromkeys(methods)), ipcs


def _equal_bytes_name(method: str) -> bool:
    base, at, target = method.partition("@")
    return bool(at) and base == "random-real" and target in METHODS and target not in NEEDS_TRAIN


def _equal_bytes_ipc(ctx: Context, target: str) -> tuple[int, int, bool]:
    """(IPC, target's stored bytes, capped): the largest random-real IPC whose stored bytes (images, and P1 soft
    labels) fit in what `target` stores at ctx.ipc, at least 1, at most the training images of the smallest class."""
    budget = sum(METHODS[target].planned_bytes(ctx, target).values())
    per_ipc = sum(METHODS["random-real"].planned_bytes(dataclasses.replace(ctx, ipc=1), "random-real").values())
    have = int(torch.bincount(ctx.train.labels, minlength=len(ctx.classes)).min())
    return min(max(1, budget // per_ipc), have), budget, budget // per_ipc > have


def _equal_bytes_builder(ctx: Context, target: str, build):
    """random-real's builder at the largest IPC whose stored bytes (images, and P1 soft labels) fit in what
    `target` stores at the current IPC (at least 1): the honest equal-budget row."""
    k, budget, capped = _equal_bytes_ipc(ctx, target)
    at = ctx.ipc

    def make(_, seed):
        data = build(dataclasses.replace(ctx, ipc=k), seed)
        data.info["equal_bytes"] = {"method": target, "method_ipc": at, "method_stored_bytes": budget, "ipc": k,
                                    "capped_by_train_images": capped}
        return data

    return make


def _context(cfg: EvaluateConfig, methods: list[str]) -> Context:
    """The run's classes, sizes, generator settings and teacher, from the flags and what earlier stages recorded."""
    from ..models import load_teacher
    from ..models.teachers import penultimate_layer, require_input_size

    run = Path(cfg.run)
    classes = require_classes(run)
    folders = [c.folder for c in classes]
    selected = select_info(run)
    invert_cfg = stage_config(run, "invert")
    meta = artifact_metadata(run, "labels.safetensors")
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
        require_prompts(run, classes)
    image_size = cfg.image_size or dataset_image_size(run) or int(meta.get("image_size") or 32)
    ipc = int(meta.get("ipc") or 10)  # the default; --ipc values replace it
    factor = cfg.factor or int(meta.get("factor") or selected.get("factor") or 1)
    prompts_meta = artifact_metadata(run, "prompts.safetensors")
    gen = {
        "backend": cfg.backend or invert_cfg.get("backend") or prompts_meta.get("backend", ""),
        "model": cfg.model or invert_cfg.get("model") or prompts_meta.get("model_id", ""),
        "resolution": cfg.resolution or int(invert_cfg.get("resolution") or 0),
        "steps": cfg.gen_steps or int(meta.get("steps") or 25),
        "guidance": float(cfg.guidance if cfg.guidance is not None else meta.get("guidance", 7.5)),
        "sampler": cfg.sampler or meta.get("sampler") or "ddim",
        "seed": cfg.gen_seed if cfg.gen_seed >= 0 else int(meta.get("seed") or 0),
        "sampler_batch": cfg.sampler_batch or int(meta.get("sampler_batch") or SAMPLER_BATCH),  # generate's default
    }
    generate_cfg = stage_config(run, "generate")
    generation = json.loads(meta.get("generation") or "{}")  # the stored seeds' settings (candidates only when > 1)
    spec = cfg.teacher or meta.get("teacher") or next(
        (t for t in (generate_cfg.get("teacher"), selected.get("teacher")) if t and t != "none"), "")
    if cfg.candidates == 0:  # auto: the stored set's own recipe (generate's G), else selection when a teacher scores
        recorded = generation.get("candidates", 1) if generation else generate_cfg.get("candidates")
        if not any(m.partition("@")[0] in GENERATIVE for m in methods):
            cfg.candidates = 1  # nothing is generated
        else:
            cfg.candidates = int(recorded or (AUTO_CANDIDATES if cfg.protocol in ("p1", "p3") or cfg.teacher else 1))
    gen.update(_diversity(cfg, generation, gen["guidance"]).settings())  # recorded only when on
    needs_teacher = cfg.protocol in ("p1", "p3") or cfg.candidates > 1
    if needs_teacher and (not spec or spec == "none"):
        why = f"--protocol {cfg.protocol} needs a teacher for its soft labels" if cfg.protocol != "p2" else \
            "--candidates needs a teacher to score the candidate images"
        raise UserError(f"{why}: pass --teacher NAME:PATH.safetensors (a classifier trained on the classes in "
                        "classes.json)")
    device = resolve_device(cfg.device)
    gen["dtype"] = _generator_dtype(cfg.dtype, generation.get("dtype"), device)
    if absolute_paths({"model": gen["model"]})["model"] == invert_cfg.get("model"):  # load it as invert did
        gen["model_config"] = cfg.model_config or invert_cfg.get("model_config") or ""
        gen["prediction_type"] = cfg.prediction_type or invert_cfg.get("prediction_type") or ""
    else:
        gen["model_config"], gen["prediction_type"] = cfg.model_config, cfg.prediction_type
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
        teacher = load_teacher(spec, num_classes=None, device=device, class_folders=folders)
        if needs_teacher:
            require_input_size(teacher, "evaluate --candidates" if cfg.protocol == "p2" else
                               f"evaluate --protocol {cfg.protocol}")  # fed at its own size
        if "selection" in gen:
            penultimate_layer(teacher)  # --selection diverse measures distances in its penultimate features
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
    if cfg.protocol == "p1":
        parse_codec(cfg.label_codec, len(classes))
    rounds = math.ceil(cfg.epochs / cfg.regen_every) if cfg.regen_every else 1
    return Context(cfg=cfg, run=run, classes=classes, device=device, image_size=image_size, ipc=ipc, factor=factor,
                   gen=gen, teacher=teacher, needs_soft=cfg.protocol == "p1", rounds=rounds)


def _diversity(cfg: EvaluateConfig, recorded: dict, guidance: float) -> Diversity:
    """--guidance-interval, --cads, --selection and --describe, each given or else generate's (`recorded`: its
    generation settings); written back into `cfg` in canonical form (results keys and labels name them). An inherited
    interval is dropped under --guidance 1, and inherited diverse selection without candidates: there is nothing to
    restrict or choose from; given ones are refused (`Diversity.parse`)."""
    was = Diversity.from_settings(recorded).texts()
    interval = cfg.guidance_interval or ("" if guidance == 1.0 else was["guidance_interval"])
    selection = cfg.selection or (was["selection"] if cfg.candidates > 1 else "typical")
    diversity = Diversity.parse(interval, cfg.cads or was["cads"], selection, guidance=guidance,
                                candidates=cfg.candidates, describe=cfg.describe or was["describe"])
    texts = diversity.texts()
    cfg.guidance_interval, cfg.cads, cfg.selection = texts["guidance_interval"], texts["cads"], texts["selection"]
    cfg.describe = texts["describe"]
    return diversity


def _generator_dtype(flag: str, recorded: str | None, device: torch.device) -> str:
    """The dtype evaluate generates in: `--dtype` when given; for `auto`, the one generate recorded (its images are
    then round 0) when this device runs it well (fp16 on any GPU, bf16 on capability 8.0+, fp32 anywhere), else
    `auto_dtype(device)`, with a note that round 0 is generated again."""
    if flag != "auto":
        return resolve_dtype_name(flag, device)
    best = auto_dtype(device)
    if recorded not in DTYPES or recorded in ("fp32", best) or (device.type == "cuda" and recorded == "fp16"):
        return recorded if recorded in DTYPES else best
    if rank_world()[0] == 0:
        print(f"evaluate: generate made its images in {recorded}, which {device} does not run well; the generator "
              f"runs in {best} here (--dtype auto), so round 0 is generated again (pass --dtype {recorded} to "
              "match it)", flush=True)
    return best


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
        epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, schedule=cfg.schedule, targets=targets, temperature=temperature,
        # testing every epoch cost more than training on small sets (issue 12): about 10 tests per student by default
        augment=augment, regen_every=cfg.regen_every, eval_every=cfg.eval_every or max(1, cfg.epochs // 10),
        eval_batch_size=cfg.eval_batch_size, channels_last=cfg.channels_last, compile=cfg.compile, amp=cfg.amp,
        round_order=cfg.round_order,
    )


def _epoch_logger(path: Path, key: str, method: str, cfg: EvaluateConfig, seed: int):
    def log(row: dict) -> None:
        append_jsonl(
            path, {"key": key, "method": method, "protocol": cfg.protocol, "student": cfg.student, "seed": seed, **row}
        )

    return log


def _print_plan(ctx: Context, methods: list[str], per_image: int) -> None:
    """Stored bytes and IPC-equivalent of every method, printed before any compute is spent."""
    cfg = ctx.cfg
    print(
        f"evaluate {ctx.run}: {cfg.student} on {len(ctx.classes)} classes at {ctx.image_size} px, protocol "
        f"{cfg.protocol}, IPC {ctx.ipc}, {cfg.epochs} epochs x {cfg.seeds} seeds",
        flush=True,
    )
    for m in methods:
        base, _, target = m.partition("@")
        at = ctx
        if target:
            at = dataclasses.replace(ctx, ipc=_equal_bytes_ipc(ctx, target)[0])
        parts = METHODS[base].planned_bytes(at, base)
        total = sum(parts.values())
        detail = " + ".join(f"{k} {fmt_bytes(v)}" for k, v in parts.items())
        print(
            f"  {m:<13} IPC {'all' if base == 'full' else at.ipc:>4}  stored {fmt_bytes(total):>10} = "
            f"{total / per_image:8.3f} IPC-equivalent  ({detail})",
            flush=True,
        )
