"""Does `torch.compile` give the right gradients through diffusers' UNet? (Why `promptset invert` has no --compile.)

A diagnostic, not a speed benchmark: it answers one question (measured on CPU: BENCHMARKS.md, "Why `promptset invert`
does not use torch.compile"; still to be asked on a GPU before invert may compile there).

Textual inversion backpropagates through the frozen UNet to its `encoder_hidden_states`. This script compares, for
one random batch, the UNet's output and the gradients of a random projection of it with respect to
`encoder_hidden_states` and to the noisy latents: eager fp32 and `torch.compile` (inductor) against an fp64 eager
reference. It asserts nothing; it prints and (with --json) writes the relative errors.

    python benchmarks/diagnostics/check_compile_grad.py --json compile_grad.json         # CPU, tiny random model
    python benchmarks/diagnostics/check_compile_grad.py --device cuda --size sd15 --json compile_grad_gpu.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import promptset  # noqa: F401  (before torch: OpenMP threads then wait passively, threads.py)

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import common  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="tiny", choices=["tiny", "sd15"])
    p.add_argument("--model", default="", help="existing diffusers SD folder instead of a random-weight one")
    p.add_argument("--batch-size", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    common.quiet_libraries()
    from diffusers import UNet2DConditionModel

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="compile_grad_") as tmp:
        model = args.model or str(common.build_model(Path(tmp) / f"model-{args.size}", args.size))
        unet = UNet2DConditionModel.from_pretrained(Path(model) / "unet", use_safetensors=True)
    unet = unet.to(device).eval().requires_grad_(False)
    cfg = unet.config
    side, b = int(cfg.sample_size), args.batch_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, cfg.in_channels, side, side, generator=gen)
    states = torch.randn(b, 77, cfg.cross_attention_dim, generator=gen)
    t = torch.randint(0, 1000, (b,), generator=gen)
    weight = torch.randn(b, cfg.out_channels, side, side, generator=gen)

    def grads(module, dtype):
        xx = x.to(device, dtype).requires_grad_(True)
        ss = states.to(device, dtype).requires_grad_(True)
        out = module(xx, t.to(device), encoder_hidden_states=ss).sample
        g_states, g_x = torch.autograd.grad((out * weight.to(device, dtype)).sum(), [ss, xx])
        return out.detach().double().cpu(), g_states.double().cpu(), g_x.double().cpu()

    reference = grads(unet.double(), torch.float64)
    unet = unet.float()
    rows = []
    for name, module in (("eager", unet), ("torch.compile (inductor)", torch.compile(unet, dynamic=False))):
        t0 = time.perf_counter()
        got = grads(module, torch.float32)
        seconds = time.perf_counter() - t0
        err = [float((g - r).norm() / r.norm()) for g, r in zip(got, reference)]
        rows.append(
            {
                "variant": name,
                "output_rel_err": err[0],
                "grad_states_rel_err": err[1],
                "grad_latents_rel_err": err[2],
                "first_call_s": seconds,
            }
        )
    print(f"UNet gradients vs fp64 eager ({common.model_label(args.size, args.model)}, {args.device}, batch {b}):")
    print(
        common.table(
            rows,
            [
                ("variant", "variant", ""),
                ("output", "output_rel_err", ".2e"),
                ("d/d states", "grad_states_rel_err", ".2e"),
                ("d/d latents", "grad_latents_rel_err", ".2e"),
                ("first call s", "first_call_s", ".1f"),
            ],
        )
    )
    payload = {
        "benchmark": "compile_grad",
        "machine": common.machine(args.device),
        "torch": torch.__version__,
        "size": args.size,
        "random_weights": not args.model,
        "rows": rows,
    }
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
