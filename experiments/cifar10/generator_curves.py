"""Learning curves of `mini` generators: the teacher's accuracy on class-prompt samples at fixed step counts.

    .venv/bin/python experiments/cifar10/generator_curves.py --model A=/path/to/model --model B=/path/to/other \
        --ceiling-per-class 100 --json experiments/cifar10/results/generator_curves.json

For each model folder written by `promptset pretrain --eval-every N --teacher ...`, reads the evaluation rows of
`metrics.jsonl` (step, teacher accuracy, per class) and the training rows (loss, training seconds) and the recipe
from `promptset_model.json`. With `--ceiling-per-class N`, also measures the ceiling of any generator in this latent
space: the same teacher on TAEF2 reconstructions (64 px, resized to the teacher's 32 px as generated samples are)
of the first N real foundation images per class, taken from a model's latent cache (`<model>/cache`), next to the
teacher on the real images themselves.

Benchmarks report numbers, they assert nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import promptset  # noqa: F401  (before torch: OpenMP threads then wait passively, threads.py)

# isort: split
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the speed benchmarks' common.py
from common import machine  # noqa: E402

torch.set_flush_denormal(True)

RECIPE_KEYS = (
    "unet_size", "batch_size", "lr", "warmup_steps", "ema_decay", "conditioning", "prediction_type",
    "timestep_spacing", "sample_clip", "snr_gamma", "cfg_dropout", "max_images_per_class", "flip",
)  # fmt: skip


def read_curve(folder: Path) -> dict:
    """The recipe, the loss curve and the evaluation rows of one model folder."""
    info = json.loads((folder / "promptset_model.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "teacher_accuracy" in r]
    seconds = {r["step"]: r["seconds"] for r in train}
    config = info["training"]["config"]
    curve = []
    for r in evals:
        before = [s for s in seconds if s <= r["step"]]
        curve.append({
            "step": r["step"], "accuracy": r["teacher_accuracy"], "confidence": r["mean_class_confidence"],
            "train_seconds": seconds[max(before)] if before else None, "per_class": r["per_class"],
            "samples": r["samples"], "sample_steps": r.get("sample_steps"), "guidance": r.get("guidance"),
        })  # fmt: skip
    summary = {}
    if (folder / "pretrain.json").is_file():
        summary = json.loads((folder / "pretrain.json").read_text())
    q, last = summary.get("quality"), summary.get("steps")
    same = q and curve and all(q.get(k) == curve[-1][k] for k in ("samples", "sample_steps", "guidance"))
    if same and last and last > curve[-1]["step"]:  # pretrain's final evaluation, same settings as the curve's
        curve.append({
            "step": last, "accuracy": q["accuracy"], "confidence": q["mean_class_confidence"],
            "train_seconds": info["training"].get("train_seconds"), "per_class": q["per_class"],
            "samples": q["samples"], "sample_steps": q["sample_steps"], "guidance": q["guidance"],
        })  # fmt: skip
    return {
        "folder": str(folder),
        "recipe": {k: config.get(k) for k in RECIPE_KEYS} | {"unet_params": info.get("unet_params")},
        "class_names": info["class_names"],
        "steps_trained": info["training"].get("step"),
        "train_seconds": info["training"].get("train_seconds"),
        "loss": [{"step": r["step"], "loss": r["loss"]} for r in train[:: max(1, len(train) // 40)]],
        "curve": curve,
        "final_quality": summary.get("quality"),
    }


@torch.no_grad()
def ceiling(folder: Path, teacher_spec: str, data: Path, per_class: int) -> dict:
    """Teacher accuracy on TAEF2 reconstructions of real images (from the latent cache) and on the images."""
    from promptset.artifacts import load_tensors
    from promptset.backends.mini import TAEF2Autoencoder
    from promptset.data import load_class_images, scan_image_folder
    from promptset.models import load_teacher

    info = json.loads((folder / "promptset_model.json").read_text())
    config = info["training"]["config"]
    index = scan_image_folder(str(data), flag="--data")
    if config.get("first_image") or config.get("max_images_per_class"):  # the images the model was trained on
        first = int(config.get("first_image") or 0)
        stop = first + int(config["max_images_per_class"]) if config.get("max_images_per_class") else 1 << 62
        index = index.subset(first, stop)
    teacher = load_teacher(teacher_spec, num_classes=index.num_classes, device="cpu")
    vae = TAEF2Autoencoder.from_dir(folder / "vae", 1.0).eval()
    flip = bool(config.get("flip", True))
    rec_correct, real_correct, per = [], [], {}
    for c in range(index.num_classes):
        n_files = len(index.files[c])
        latents = load_tensors(folder / "cache" / f"class{c:05d}.safetensors", "latent cache")[0]["latents"]
        if len(latents) != n_files * (2 if flip else 1):
            raise SystemExit(f"{folder}/cache holds {len(latents)} latents for class {c}, not {n_files} images' views")
        raw = latents[:per_class]  # the unflipped views come first
        rec = torch.cat([vae.decode(raw[s : s + 50]) for s in range(0, len(raw), 50)])  # (n, 3, 64, 64)
        rec = F.interpolate((rec.clamp(0, 1) * 255).round() / 255, size=(32, 32), mode="bicubic", antialias=True,
                            align_corners=False).clamp(0, 1)  # fmt: skip
        real = load_class_images(index, c, 32)[:per_class]
        a = (teacher(rec).argmax(1) == c).float()
        b = (teacher(real).argmax(1) == c).float()
        rec_correct.append(a)
        real_correct.append(b)
        per[index.classes[c]] = {"reconstruction": round(float(a.mean()), 4), "real": round(float(b.mean()), 4)}
        print(f"ceiling: {index.classes[c]}: reconstructions {a.mean():.1%}, real {b.mean():.1%}", flush=True)
    return {
        "teacher": teacher_spec.split(":")[0],
        "images_per_class": per_class,
        "reconstruction_accuracy": round(float(torch.cat(rec_correct).mean()), 4),
        "real_accuracy": round(float(torch.cat(real_correct).mean()), 4),
        "per_class": per,
    }


@torch.no_grad()
def guidance_sweep(folder: Path, teacher_spec: str, guidances: list[float], per_class: int, steps: int) -> list[dict]:
    """The teacher's accuracy on class-prompt samples of the final model at several guidance scales."""
    import types

    from promptset.backends import create_backend
    from promptset.evaluation.generator import generator_quality
    from promptset.models import load_teacher

    info = json.loads((folder / "promptset_model.json").read_text())
    backend = create_backend("mini", str(folder), device="cpu")
    teacher = load_teacher(teacher_spec, num_classes=len(info["class_names"]), device="cpu")
    rows = []
    for g in guidances:
        cfg = types.SimpleNamespace(seed=0, batch_size=100, sample_steps=steps, guidance=g, eval_samples=per_class,
                                    teacher_size=32, resolution=info["resolution"], sampler="ddim")  # fmt: skip
        q = generator_quality(backend, teacher, info["class_names"], cfg)
        rows.append({"guidance": g, "accuracy": round(q["accuracy"], 4), "per_class": q["per_class"],
                     "samples": q["samples"], "sample_steps": steps})  # fmt: skip
        print(f"guidance {g}: {q['accuracy']:.1%}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], help="NAME=FOLDER of a mini model (repeatable)")
    parser.add_argument("--ceiling-per-class", type=int, default=0, help="real images per class for the ceiling")
    parser.add_argument("--ceiling-model", default="",
                        help="NAME (or folder) of the model whose latent cache the ceiling uses")  # fmt: skip
    parser.add_argument("--data", default="", help="the foundation ImageFolder the models were trained on")
    parser.add_argument("--teacher", default="", help="NAME:PATH of the teacher (ResNet-20)")
    parser.add_argument("--guidance-sweep", default="", help="comma-separated guidance scales for the final model")
    parser.add_argument("--sweep-model", default="", help="NAME of the model the guidance sweep uses")
    parser.add_argument("--sweep-per-class", type=int, default=50, help="class-prompt samples per class in the sweep")
    parser.add_argument("--sweep-steps", type=int, default=10, help="DDIM steps in the sweep")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", default="", help="write the results here (merged into an existing file)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = dict(m.split("=", 1) for m in args.model)
    path = Path(args.json) if args.json else None
    result = json.loads(path.read_text()) if path and path.is_file() else {"models": {}}
    here = machine("cpu")
    for old in result["models"].values():  # curves collected before each one recorded its own machine
        old.setdefault("machine", result.get("machine"))
    result["machine"] = here
    for name, folder in models.items():
        result["models"][name] = read_curve(Path(folder)) | {"machine": here}
        curve = result["models"][name]["curve"]
        print(f"{name}: " + ", ".join(f"{r['step']}: {r['accuracy']:.1%}" for r in curve), flush=True)
    if args.ceiling_per_class:
        name = args.ceiling_model or next(iter(models))
        folder = Path(models.get(name, name))
        result["ceiling"] = ceiling(folder, args.teacher, Path(args.data), args.ceiling_per_class)
        print(f"ceiling: {result['ceiling']['reconstruction_accuracy']:.1%} on reconstructions, "
              f"{result['ceiling']['real_accuracy']:.1%} on the real images", flush=True)  # fmt: skip
    if args.guidance_sweep:
        name = args.sweep_model or next(iter(models))
        scales = [float(g) for g in args.guidance_sweep.split(",")]
        rows = guidance_sweep(Path(models[name]), args.teacher, scales, args.sweep_per_class, args.sweep_steps)
        result["guidance_sweep"] = {"model": name, "rows": rows}
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
