"""Copy a trained `mini` model folder into the repository (`experiments/cifar10/models/<name>`), small enough to
commit.

    .venv/bin/python experiments/cifar10/commit_generator.py --model /path/to/trained/model --name cifar10-mini \
        --command-file /path/to/command.txt

What is kept: the EMA UNet (cast to fp16, which halves its size; it is loaded back in the backend's dtype), the noise
scheduler, `promptset_model.json`, the training record (`pretrain.json`, `metrics.jsonl`, `samples.png`) and a
`COMMAND.md` with the command that trained it. What is left out: checkpoints (optimizer state), the latent cache,
and the copy of the TAEF2 weights: those stay in `../shared/weights`, and the model's `vae.source` is rewritten
relative to the model folder, so a clone with `../shared` beside it loads the model as it is (the weights'
fingerprint is still checked).

Benchmarks report numbers, they assert nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import promptset  # noqa: F401  (before torch: OpenMP threads then wait passively, threads.py)

# isort: split
import torch
from safetensors.torch import load_file, save_file

STUDY_DIR = Path(__file__).resolve().parent  # experiments/cifar10
REPO = STUDY_DIR.parents[1]
KEEP = ("pretrain.json", "metrics.jsonl", "samples.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the trained model folder (pretrain --out)")
    ap.add_argument("--name", default="cifar10-mini", help="folder name under experiments/cifar10/models")
    ap.add_argument("--shared-weights", default=str(REPO.parent / "shared" / "weights"),
                    help="where TAEF2's weights are in a clone (../shared/weights)")  # fmt: skip
    ap.add_argument("--command-file", default="", help="text file holding the exact training command(s)")
    args = ap.parse_args(argv)
    src = Path(args.model)
    dst = STUDY_DIR / "models" / args.name
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "unet").mkdir(parents=True)
    shutil.copyfile(src / "unet" / "config.json", dst / "unet" / "config.json")
    weights = load_file(str(src / "unet" / "diffusion_pytorch_model.safetensors"))
    save_file({k: v.to(torch.float16).contiguous() for k, v in weights.items()},
              str(dst / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    shutil.copytree(src / "scheduler", dst / "scheduler")
    info = json.loads((src / "promptset_model.json").read_text())
    if info["vae"]["kind"] == "taef2":
        info["vae"]["source"] = os.path.relpath(Path(args.shared_weights).resolve(), dst.resolve())
        info["vae"]["spec"] = "taef2:" + info["vae"]["source"]
        info["vae"].pop("copy", None)
    info["committed"] = {"unet_dtype": "fp16", "from": str(src)}
    (dst / "promptset_model.json").write_text(json.dumps(info, indent=1) + "\n")
    for name in KEEP:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    if args.command_file:
        cmd = Path(args.command_file).read_text().strip()
        (dst / "COMMAND.md").write_text(
            f"# {args.name}: how this model was trained\n\n```bash\n{cmd}\n```\n\n"
            "Rerunning the same command resumes or reproduces it (bit for bit on CPU with the same thread count). "
            "The committed UNet is the EMA weights cast to fp16 by `experiments/cifar10/commit_generator.py`.\n"
        )
    size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    print(f"wrote {dst} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
