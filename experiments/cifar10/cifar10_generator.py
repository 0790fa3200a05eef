"""Train the CIFAR-10 `mini` generator (or one of the recipe variants its learning curves compare), resumably.

    .venv/bin/python experiments/cifar10/cifar10_generator.py --variant pooled-v --cache ~/.cache/promptset \
        --steps 4000

Prepares the foundation split (train files 0-2499 of each class, as ImageFolders of symlinks in the cache, shared
with `cifar10_world.py`), then runs `promptset pretrain` with the variant's flags on one CPU thread and prints the
exact command first. Rerun the same line to resume (pretrain checkpoints every 250 steps), or with a larger
`--steps` to train on. Every 250 steps the ResNet-20 teacher's accuracy on 200 class-prompt samples is appended to
`<out>/metrics.jsonl` (the learning curve `generator_curves.py` collects).

Captions (`experiments/cifar10/cifar10_captions.json`) name five classes (airplane, automobile, bird, cat, deer) and
describe the other five only by a coarser word (dog: "pet", frog: "small animal", horse: "farm animal", ship: "vessel",
truck: "vehicle"), so the generator can draw every class but knows only half by name: the class-name prompt is a
weak baseline there, and inversion has work to do.

Benchmarks report numbers, they assert nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

STUDY_DIR = Path(__file__).resolve().parent  # experiments/cifar10
REPO = STUDY_DIR.parents[1]
sys.path.insert(0, str(STUDY_DIR))
from cifar10_common import SPLIT, symlink_split, unpack  # noqa: E402

COMMON = {"--resolution": "64", "--unet-size": "base", "--batch-size": "64", "--warmup-steps": "100",
          "--ema-decay": "0.999", "--teacher-size": "32", "--eval-every": "250", "--eval-samples": "20",
          "--sample-steps": "10", "--guidance": "3", "--checkpoint-every": "250", "--log-every": "50"}
# Each variant changes one lever of `pooled-v` (the recipe of the committed cifar10-mini); its learning curve is
# compared with pooled-v's at the same steps (generator_curves.py). `images` = foundation images per class.
VARIANTS = {
    # the committed model: pooled caption vector in the time embedding + masked cross-attention, v-prediction
    "pooled-v": {"--conditioning": "pooled", "--prediction-type": "v_prediction"},
    # conditioning: the same without the pooled vector (class identity through masked cross-attention alone)
    "cross-v": {"--conditioning": "cross", "--prediction-type": "v_prediction"},
    # objective: the same as pooled-v with epsilon prediction
    "pooled-eps": {"--conditioning": "pooled", "--prediction-type": "epsilon"},
    # width: the `small` UNet (channels 32/64, 1.9M parameters) instead of `base` (64/128, 7.0M)
    "pooled-v-small": {"--conditioning": "pooled", "--prediction-type": "v_prediction", "--unet-size": "small"},
    # EMA: the raw weights (decay 0) instead of an EMA with decay 0.999
    "pooled-v-noema": {"--conditioning": "pooled", "--prediction-type": "v_prediction", "--ema-decay": "0"},
    # data: all 2,500 foundation images per class (and mirrors) instead of the first 1,000, from scratch
    "pooled-v-2500": {"--conditioning": "pooled", "--prediction-type": "v_prediction", "images": "2500"},
    # captions (cifar10-mini-v3): a caption per image (`promptset caption` on the foundation split, with the teacher's
    # runner-up class), the class-name templates on 20% of the samples, 32 text tokens; no mirror images (their
    # encoding doubles the latent cache's cost on CPU); warm-started from v2 with --init-from
    "captions": {"--conditioning": "pooled", "--prediction-type": "v_prediction", "images": "2500",
                 "--captions": "auto", "--template-prob": "0.2", "--max-length": "32", "--no-flip": ""},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=list(VARIANTS), default="pooled-v", help="recipe (see VARIANTS)")
    ap.add_argument("--steps", type=int, default=4000, help="total training steps")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/promptset"), help="data and model folder")
    ap.add_argument("--out", default="", help="model folder (default: <cache>/generators/<variant>)")
    ap.add_argument("--shared", default=os.environ.get("PROMPTSET_SHARED", str(REPO.parent / "shared")),
                    help="folder holding data/ and weights/")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--images-per-class", type=int, default=0,
                    help="foundation images per class (of 2500, each also mirrored; 0: the variant's)")  # fmt: skip
    ap.add_argument("--lr", default="1e-3", help="AdamW learning rate after warm-up")
    ap.add_argument("--init-from", default="",
                    help="start from this finished mini model's UNet (promptset pretrain --init-from)")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="print the command only")
    args = ap.parse_args(argv)
    shared = Path(args.shared).resolve()
    cache = Path(args.cache).expanduser().resolve()
    out = Path(args.out) if args.out else cache / "generators" / args.variant
    weights = shared / "weights"
    recipe = COMMON | VARIANTS[args.variant]
    variant_images = int(recipe.pop("images", 1000))  # not a pretrain flag
    images = args.images_per_class or variant_images
    foundation = cache / "cifar10-jpeg-splits" / "foundation"
    teacher = f"resnet20:{weights / 'cifar10_resnet20.safetensors'}"
    captions = cache / "captions" / "foundation.jsonl"
    caption_cmd = [sys.executable, "-m", "promptset", "caption", "--data", str(foundation), "--out", str(captions),
                   "--class-names", str(STUDY_DIR / "cifar10_captions.json"), "--teacher", teacher, "--no-progress"]
    if recipe.get("--captions") == "auto":
        recipe["--captions"] = str(captions)
    cmd = [sys.executable, "-m", "promptset", "pretrain", "--out", str(out),
           "--data", str(cache / "cifar10-jpeg-splits" / "foundation"), "--vae", f"taef2:{weights}",
           "--class-names", str(STUDY_DIR / "cifar10_captions.json"),
           "--teacher", f"resnet20:{weights / 'cifar10_resnet20.safetensors'}", "--steps", str(args.steps),
           "--no-progress", "--max-images-per-class", str(images), "--lr", args.lr,
           *(x for flag, value in recipe.items() for x in ((flag, value) if value else (flag,)))]  # fmt: skip
    if args.init_from:
        cmd += ["--init-from", str(Path(args.init_from).resolve())]
    if "--captions" in recipe:
        print(f"OMP_NUM_THREADS={args.threads} " + shlex.join(caption_cmd), flush=True)
    print(f"OMP_NUM_THREADS={args.threads} " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    data = unpack(shared, cache)
    symlink_split(data / "train", cache / "cifar10-jpeg-splits" / "foundation", 0, SPLIT)
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if "--captions" in recipe and not captions.is_file():  # deterministic: the same file on a rerun
        if subprocess.call(caption_cmd, env=env):
            return 1
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
