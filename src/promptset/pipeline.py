"""The drivers that chain stages: `promptset run` (the stages a config file names, in order) and `promptset demo`
(the whole D3M pipeline on scikit-learn's digits, offline, in minutes on a laptop CPU). Only here and in the CLI does
one stage's output feed another's call.

Digits (1,797 8x8 images, 10 classes, shipped inside scikit-learn) are RGB images split per class like the CIFAR-10
benchmark world: a foundation split trains the `mini` generator, a disjoint split is distilled, and a held-out split
tests the students; `promptset teacher` trains the teacher on foundation + distilled split (the paper's teachers see
the whole training set). The students are evaluated under the paper's main protocol, P1 (stored soft labels, fresh
images every `regen_every` epochs, 300 epochs: with soft labels students converge slowly), next to P2 (one-hot labels
with augmentation). Nothing is downloaded, and the CIFAR-10 world's assets (`../shared`, docs/DESIGN.md section 7)
are not needed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic import write_json
from .config import make_config, opt, resolve, to_dict
from .errors import UserError

# the stages `run` chains, in order; each reads its own section of the config file
STAGE_ORDER = ["teacher", "select", "invert", "generate", "budget", "evaluate", "report"]

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class DemoConfig:
    out: str = opt("runs/demo", "demo folder (data, generator, run, results)")
    quick: bool = opt(False, "a much smaller run (about a minute) that checks every stage works")
    image_size: int = opt(8, "side of the digit images in pixels (8 = the native digits resolution)")
    pretrain_steps: int = opt(0, "generator training steps (0 = 400, or 100 with --quick)")
    invert_steps: int = opt(0, "inversion steps (0 = 200, or 20 with --quick)")
    ipc: int = opt(10, "images per class for every method")
    epochs: int = opt(0, "student epochs under P1 and P2 (0 = 300, or 3 with --quick)")
    regen_every: int = opt(0, "d3m: fresh images every N epochs (0 = 30, or 1 with --quick)")
    seeds: int = opt(0, "student seeds (0 = 2, or 1 with --quick; more for tighter error bars)")
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "torch device")
    progress: bool = opt(True, "show progress bars")


def write_digits(root: Path, size: int) -> dict[str, Path]:
    """Digits as three ImageFolders (foundation / train / test, split per class by index: 45% / 30% / 25%)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    splits = {"foundation": root / "foundation", "train": root / "train", "test": root / "test",
              "labelled": root / "labelled"}
    if all((p / DIGIT_NAMES[-1]).is_dir() for p in splits.values()):
        return splits
    for c, name in enumerate(DIGIT_NAMES):
        images = digits.images[digits.target == c]  # (N, 8, 8) in [0, 16]
        n = len(images)
        cut1, cut2 = int(0.45 * n), int(0.75 * n)
        bounds = {"foundation": (0, cut1), "train": (cut1, cut2), "test": (cut2, n), "labelled": (0, cut2)}
        for split, (a, b) in bounds.items():
            folder = splits[split] / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(a, b):
                gray = (images[i] / 16.0 * 255).astype(np.uint8)
                img = Image.fromarray(gray, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
                img.save(folder / f"{i:04d}.png")
    return splits


DEMO_SAMPLER_BATCH = 100


def demo(cfg: DemoConfig | None = None, **overrides) -> dict:
    """Run pretrain -> select -> invert -> generate -> evaluate on digits; print and return the results table."""
    cfg = make_config(DemoConfig, cfg, overrides, "demo")
    from .devices import resolve_device
    from .stages.evaluate import evaluate
    from .stages.generate import generate
    from .stages.invert import invert
    from .stages.pretrain import pretrain
    from .stages.select import select
    from .stages.teacher import teacher as train_teacher

    quick = cfg.quick
    pretrain_steps = cfg.pretrain_steps or (100 if quick else 400)
    invert_steps = cfg.invert_steps or (20 if quick else 200)
    epochs = cfg.epochs or (3 if quick else 300)
    regen_every = cfg.regen_every or (1 if quick else 30)
    seeds = cfg.seeds or (1 if quick else 2)
    size = cfg.image_size
    root = Path(cfg.out)
    device = resolve_device(cfg.device)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    def stage(name: str):
        print(f"\n== demo: {name} ==", flush=True)
        timings[name] = time.perf_counter()

    def done(name: str) -> None:
        timings[name] = round(time.perf_counter() - timings[name], 1)

    stage("data")
    splits = write_digits(root / "data", size)
    done("data")

    stage("teacher")
    teacher = str(root / "teacher_convnet3.safetensors")
    train_teacher(data=str(splits["labelled"]), test=str(splits["test"]), out=teacher, arch="convnet3",
                  image_size=size, epochs=3 if quick else 15, lr=2e-3, crop_scale=1.0, flip=False, seed=cfg.seed,
                  device=str(device), progress=cfg.progress)
    done("teacher")

    stage("pretrain the mini generator on the foundation split")
    model = root / "generator"
    pretrain(out=str(model), data=str(splits["foundation"]), vae="identity", resolution=size, unet_size="tiny",
             steps=pretrain_steps, batch_size=64, lr=1e-3, warmup_steps=min(100, pretrain_steps // 5),
             checkpoint_every=max(50, pretrain_steps // 5), teacher=teacher, teacher_size=size,
             eval_samples=5 if quick else 20, sample_steps=10 if quick else 15, guidance=3.0, flip=False,
             seed=cfg.seed, device=str(device), progress=cfg.progress)
    done("pretrain the mini generator on the foundation split")

    run = root / "run"
    stage("select")
    select(data=str(splits["train"]), out=str(run), teacher=teacher, resolution=size, factor=1, num_crops=5,
           crop_scale=0.5, seed=cfg.seed, device=str(device), progress=cfg.progress)
    done("select")

    stage("invert")
    invert(backend="mini", model=str(model), out=str(run), steps=invert_steps, batch_size=20, lr=2e-2,
           resolution=size, flip=False, checkpoint_every=max(10, invert_steps // 5), seed=cfg.seed,
           device=str(device), progress=cfg.progress)
    done("invert")

    stage("generate")
    gen_steps = 10 if quick else 15  # DDIM steps; 15 keep the 8 px digits (the demo's time budget is 5 minutes)
    # 100 images per denoiser call (evaluate's fresh rounds inherit it): at 8 px a call of 8 is per-call overhead,
    # and 100 jobs x 4 seed candidates fill whole calls (the images depend on this setting; it is recorded)
    generate(run=str(run), ipc=cfg.ipc, steps=gen_steps, guidance=3.0, batch_size=50, sampler_batch=DEMO_SAMPLER_BATCH,
             seed=cfg.seed, soft_labels=True, teacher=teacher, device=str(device), progress=cfg.progress)
    done("generate")

    common = dict(run=str(run), test=str(splits["test"]), train=str(splits["train"]), student="convnet3",
                  ipc=cfg.ipc, epochs=epochs, seeds=seeds, seed=cfg.seed, batch_size=50, gen_steps=gen_steps,
                  guidance=3.0, regen_every=regen_every, device=str(device), progress=cfg.progress, report=False)
    stage("evaluate P1")  # the paper's protocol: stored soft labels, fresh images, a budget long enough to converge
    evaluate(method="d3m,rded,random-real,random-real@d3m", protocol="p1", **common)
    done("evaluate P1")
    stage("evaluate P2")
    results = evaluate(method="d3m,random-real", protocol="p2", **common)
    done("evaluate P2")
    from .evaluation.results import write_report

    write_report([run], run / "eval", title="promptset demo (digits)")
    timings["total"] = round(time.perf_counter() - t_all, 1)
    quality = json.loads((model / "pretrain.json").read_text()) if (model / "pretrain.json").is_file() else {}
    reading = _reading(results, cfg.ipc, epochs, regen_every)
    import torch

    flags = [(f"--{k}" if v is True else f"--no-{k}" if v is False else f"--{k} {v}").replace("_", "-")
             for k, v in to_dict(cfg).items()
             if v != DemoConfig.__dataclass_fields__[k].default and k not in ("out", "progress", "device")]
    summary = {"out": str(root.resolve()), "quick": quick, "timings_s": timings, "generator_quality": quality,
               "results": str((run / "eval" / "results.json").resolve()), "reading": reading,
               "command": " ".join(["promptset demo", *flags]), "torch_threads": torch.get_num_threads(),
               "device": str(device)}  # fmt: skip
    write_json(root / "demo.json", summary)
    _print_summary(results, reading)
    print(f"\ndemo finished in {timings['total']:.0f} s; results in {run / 'eval'}, sample grid {run / 'grid.png'}")
    return results


def _print_summary(results: dict, reading: str) -> None:
    """Both protocols in one table, and the one line that says what the numbers mean."""
    from .accounting import fmt_bytes

    rows = sorted(results["entries"].values(), key=lambda e: (e["protocol"], e["method"] != "d3m", e["method"]))
    print("\n== demo: results (top-1 % on held-out digits, mean ± std over seeds) ==")
    print(f"{'protocol':<9}{'method':<17}{'IPC':>4}{'stored':>11}{'IPC-eq':>8}   final top-1")
    for e in rows:
        f = e["final_top1"]
        print(f"{e['protocol'].upper():<9}{e['method']:<17}{e['ipc'] or 'all':>4}{fmt_bytes(e['stored_bytes']):>11}"
              f"{e['ipc_equivalent']:>8.2f}   {f['mean']:6.2f} ± {f['std']:.2f}")
    print(reading)


def _reading(results: dict, ipc: int, epochs: int, regen_every: int) -> str:
    """One line: what the numbers mean (which protocol, what d3m is compared with, at which bytes)."""
    entries = results["entries"].values()

    def get(method: str, protocol: str):
        return next((e for e in entries if e["method"] == method and e["protocol"] == protocol), None)

    d1, r1, e1 = get("d3m", "p1"), get("random-real", "p1"), get("random-real@d3m", "p1")
    d2, r2 = get("d3m", "p2"), get("random-real", "p2")
    if not (d1 and r1 and d2 and r2):
        return "reading: some rows are missing; see eval/report.md"

    def acc(e: dict) -> float:
        return e["final_top1"]["mean"]

    equal = f"; random-real at d3m's stored bytes (IPC {e1['ipc']}): {acc(e1):.1f}%" if e1 else ""
    return (f"reading: under P1 (the paper's protocol: stored soft labels, fresh images every {regen_every} epochs, "
            f"{epochs} epochs) d3m reaches {acc(d1):.1f}% vs {acc(r1):.1f}% for {ipc} real images per class, storing "
            f"{d1['ipc_equivalent']:.1f} IPC-equivalent (prompts + seeds + soft labels of every round){equal}; under "
            f"P2 (one-hot + augmentation) {acc(d2):.1f}% vs {acc(r2):.1f}%.")


def stage(name: str) -> tuple[type, object]:
    """The config class and verb of stage `name` (its module is imported on first use)."""
    import importlib

    module = importlib.import_module(f"promptset.stages.{name}")
    return getattr(module, f"{name.capitalize()}Config"), getattr(module, name)


def resolved_sections(recipe: dict, config_path: str, run: str | None) -> list[tuple[str, object, str]]:
    """Every stage run of a loaded recipe (`runconfig.load_recipe`), in `STAGE_ORDER`, as (stage, resolved config,
    source label); an unknown option anywhere is refused here, before any stage runs."""
    stages = recipe["stages"]
    run = run or recipe["run"]
    if not stages:
        raise UserError(f"--config {config_path}: no stage sections ({', '.join(STAGE_ORDER)})")
    if not run and any(name != "teacher" for name in stages):
        raise UserError(f"--config {config_path}: give the run folder as a top-level 'run:' or pass --run")
    out = []
    for name, items in stages.items():
        cls, _ = stage(name)
        fields = cls.__dataclass_fields__
        for i, item in enumerate(items):
            section = dict(item)
            for key in ("out", "run"):  # teacher's out is its file; generate's out defaults to the run folder
                skip = name == "teacher" or (name == "generate" and key == "out")
                if key in fields and key not in section and not skip:
                    section[key] = run
            if name == "report":
                section.setdefault("runs", run)
            if name == "evaluate" and "report" in stages:
                section.setdefault("report", False)  # the report section draws it once, after evaluate
            source = f"--config {config_path} [{name}]" + (f"[{i}]" if len(items) > 1 else "")
            out.append((name, resolve(cls, section, {}, source=source), source))
    return out


def run_all(config_path: str, run: str | None, sets: list[str] | None = None) -> None:
    """Run the stages the config file has sections for, in `STAGE_ORDER`, all in run folder `run`; `sets` are
    `--set KEY=VALUE` overrides (see `runconfig`). Every section is resolved and every input folder checked first."""
    from .runconfig import check_inputs, load_recipe

    recipe = load_recipe(config_path, sets, STAGE_ORDER)
    runs = resolved_sections(recipe, config_path, run)
    check_inputs(recipe["stages"])
    for k, (name, cfg, source) in enumerate(runs):
        print(f"== promptset run: {name} ({k + 1} of {len(runs)}) ==", flush=True)
        try:
            if name == "teacher":
                teacher_step(cfg, source)
            else:
                stage(name)[1](cfg)
        except UserError as err:
            raise UserError(f"{source}: {err}") from None


def teacher_step(cfg, source: str) -> None:
    """`teacher:` in a recipe: its `out` is the teacher every later stage uses. A bare PATH is trained with
    `promptset teacher` when missing (a file it made with these options is reused); `NAME[@SIZE]:PATH` names an
    existing teacher (e.g. an ImageNet-pretrained ResNet-18), which is used as given and not trained."""
    from .models.teachers import TEACHER_FORMAT, read_teacher_metadata

    spec = str(cfg.out or "").strip()
    if not spec:
        raise UserError("'out:' is required: the teacher file to train, or NAME@SIZE:PATH of an existing one "
                        "(in a recipe: out: ${teacher})")
    named = ":" in spec and not Path(spec).expanduser().is_file()
    path = Path(spec.partition(":")[2].strip() if named else spec).expanduser()
    if named:
        if not path.is_file():
            raise UserError(f"teacher {spec}: {path} does not exist. Pass the weights file of that network "
                            "(safetensors), or a bare PATH to train one here (--set paths.teacher=FILE.safetensors)")
        print(f"teacher: using {spec} as given (an existing teacher; this section's training options are not "
              "used)", flush=True)
        return
    if path.is_file() and read_teacher_metadata(path).get("format") != TEACHER_FORMAT:
        raise UserError(f"teacher {path} exists but was not made by `promptset teacher`, so its architecture and "
                        f"input size are unknown: name them, --set paths.teacher=NAME@SIZE:{path} (e.g. "
                        f"resnet18@224:{path} for torchvision's ResNet-18 weights)")
    from .stages.teacher import teacher

    teacher(cfg)
