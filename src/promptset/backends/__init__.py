"""Backends: the frozen text-to-image models promptset distills into (`sd`, `mini`), behind one interface."""

from __future__ import annotations

from .base import DiffusionBackend, resolve_device, resolve_dtype

BACKENDS = ("sd", "mini")


def create_backend(
    kind: str, model: str, *, device: str | None = "auto", dtype: str = "fp32", sampler: str = "ddim"
) -> DiffusionBackend:
    """Load a backend by name: `sd` (diffusers Stable Diffusion) or `mini` (promptset's offline model)."""
    from ..errors import UserError

    if kind == "sd":
        from .sd import load_sd

        return load_sd(model, device=device, dtype=dtype, sampler=sampler)
    if kind == "mini":
        from .mini import load_mini

        return load_mini(model, device=device, dtype=dtype, sampler=sampler)
    raise UserError(f"--backend {kind!r} is not one of {list(BACKENDS)}")


__all__ = ["BACKENDS", "DiffusionBackend", "create_backend", "resolve_device", "resolve_dtype"]
