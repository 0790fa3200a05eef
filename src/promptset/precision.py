"""Half precision done right: fp16 loss scaling for inversion, and finite checks whose errors say what to do.

fp16 has 5 exponent bits: its smallest normal number is 6.1e-5 and its largest 65504. Textual inversion's loss is a
mean over every latent element, so at SD-1.5's 64x64 latents the gradient reaching the denoiser's output is ~1e-6
per element and flushes to (sub)normal noise in fp16: measured on CPU, the placeholder vectors' gradient was 34.5%
off fp32's. `LossScaler` multiplies the loss by 2^16 before the backward pass and divides the fp32 gradient of the
vectors by it afterwards, so the fp16 backward works at ~0.06 instead; a step whose gradient overflowed (inf/NaN) is
skipped and the scale halved, as in Micikevicius et al. 2018 (torch.amp.GradScaler's rule). bf16 has fp32's exponent
range and needs no scaling; neither does fp32.
"""

from __future__ import annotations

import torch

from .errors import TrainingDiverged

HALF_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


class NonFiniteOutput(TrainingDiverged):
    """A model produced NaN or inf latents or images; nothing made from them was written."""


def _name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        return dtype
    return HALF_DTYPES.get(dtype, "fp32")


def fp16_advice(part: str = "the model") -> str:
    return (f"{part} overflows or underflows in fp16 (its range ends at 65504): rerun with --dtype bf16 (GPUs of "
            "compute capability 8.0 and later: A100, H100, RTX 30xx/40xx) or --dtype fp32")


def divergence_advice(dtype: torch.dtype | str, lr: float) -> str:
    """What to do about a loss or vector that became NaN/inf, for the dtype the model ran in."""
    if _name(dtype) == "fp16":
        return fp16_advice() + f"; if it diverges in bf16/fp32 too, lower --lr (now {lr})"
    return f"Lower --lr (now {lr})"


def check_finite(x: torch.Tensor, what: str, dtype: torch.dtype | str, part: str) -> None:
    """Raise `NonFiniteOutput` naming `what` and the likely cause if `x` holds NaN or inf (one host sync)."""
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return
    rows = int(bad.flatten(1).any(1).sum()) if x.ndim > 1 else int(bad.sum())
    name = _name(dtype)
    if name == "fp16":
        advice = fp16_advice(part)
        if part == "the VAE":
            advice += ", or a VAE made to run in fp16 (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL's VAE)"
    else:
        advice = (f"{part} produced them in {name}, where that points to NaN/inf in the model's weights (check the "
                  "--model files) rather than to the dtype")
    raise NonFiniteOutput(f"{what}: {rows} of {len(x)} hold NaN or inf; nothing was saved from them. {advice}")


class LossScaler:
    """Dynamic loss scaling for a model that runs in fp16 (disabled, and free, for bf16 and fp32).

    Usage per step: `scaler.scaled(loss).backward()`, then `applied = scaler.step(optimizer)`. For fp16, `step`
    divides the gradients by the scale, and applies the optimizer step only if every gradient is finite (one host
    sync per step); otherwise it skips the step, halves the scale and counts it. After `growth_interval` good steps
    in a row the scale doubles. `exhausted` means the scale fell below `min_scale`: the overflow is in the forward
    pass or in the model, not a matter of scaling.
    """

    def __init__(self, dtype: torch.dtype, *, init_scale: float = 2.0**16, growth_interval: int = 2000,
                 min_scale: float = 2.0**-8):
        self.enabled = dtype == torch.float16
        self.scale = float(init_scale) if self.enabled else 1.0
        self.growth_interval = int(growth_interval)
        self.min_scale = float(min_scale)
        self.good_steps = 0  # finite steps since the scale last changed
        self.skipped = 0  # steps skipped for an inf/NaN gradient, over the whole run (resumes included)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale, check and apply one optimizer step; False when fp16 loss scaling skipped it."""
        if not self.enabled:
            optimizer.step()
            return True
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        for g in grads:
            g.mul_(1.0 / self.scale)  # a power of two: exact
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
        if finite:
            optimizer.step()
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale *= 2.0
                self.good_steps = 0
        else:
            self.skipped += 1
            self.scale /= 2.0
            self.good_steps = 0
        return finite

    @property
    def exhausted(self) -> bool:
        return self.enabled and self.scale < self.min_scale

    def metrics(self) -> dict:
        """What a metrics row records about loss scaling ({} when disabled)."""
        return {"loss_scale": self.scale, "skipped_steps": self.skipped} if self.enabled else {}

    def state(self) -> torch.Tensor:
        """(scale, good steps, skipped steps) as a float64 tensor, for checkpoints."""
        return torch.tensor([self.scale, self.good_steps, self.skipped], dtype=torch.float64)

    def load_state(self, state: torch.Tensor) -> None:
        scale, good, skipped = (float(v) for v in state.tolist())
        if self.enabled:
            self.scale, self.good_steps = scale, int(good)
        self.skipped = int(skipped)
