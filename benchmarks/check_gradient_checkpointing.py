"""Does `invert --gradient-checkpointing` checkpoint on the installed diffusers? (0.30-0.31 need `block.training`.)

Loads a random tiny SD through promptset, runs one inversion-step backward with checkpointing enabled the old way
(`unet.enable_gradient_checkpointing()` on the eval-mode UNet) and promptset's way
(`DiffusionBackend.enable_gradient_checkpointing`), and counts calls of `torch.utils.checkpoint.checkpoint`. To check
an older diffusers without touching the environment, install it aside and put it first on the path:

    pip install --no-deps --target /tmp/df030 diffusers==0.30.3
    PYTHONPATH=/tmp/df030:src python benchmarks/check_gradient_checkpointing.py --model /tmp/tiny-sd

(diffusers 0.30-0.31 cannot import StableDiffusionPipeline next to transformers 5, so build the model folder with the
current diffusers first: `python -c "from promptset.backends.tiny import build_sd; build_sd('/tmp/tiny-sd')"`.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import promptset  # noqa: F401  (before torch: OpenMP threads then wait passively, threads.py)

# isort: split
import torch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="tiny SD folder (default: build one in a temporary folder)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    import diffusers
    import torch.utils.checkpoint as ckpt

    from promptset.backends import create_backend

    model = args.model
    if not model:
        from promptset.backends.tiny import build_sd

        model = str(build_sd(Path(tempfile.mkdtemp()) / "tiny-sd"))
    calls = []
    real = ckpt.checkpoint
    ckpt.checkpoint = lambda fn, *a, **k: calls.append(1) or real(fn, *a, **k)
    out = {"diffusers": diffusers.__version__}
    for way in ("unet.enable_gradient_checkpointing", "DiffusionBackend.enable_gradient_checkpointing"):
        backend = create_backend("sd", model, device="cpu", quiet=True)
        if way.startswith("unet"):
            backend.unet.enable_gradient_checkpointing()
        else:
            backend.enable_gradient_checkpointing()
        calls.clear()
        side = backend.latent_size
        latents = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
        layout = backend.layout("a photo of {token}", 1)
        vectors = torch.nn.Parameter(backend.initializer_vector("car").expand(2, 1, -1).clone())
        states = backend.encode_placeholder_prompts(layout, vectors)
        backend.denoising_loss(latents, states, torch.Generator().manual_seed(1)).mean().backward()
        out[way] = len(calls)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
