"""Backends: the frozen text-to-image models promptset distills into (`sd`, `mini`), behind one interface."""

from __future__ import annotations

from .base import DiffusionBackend, resolve_device, resolve_dtype

BACKENDS = ("sd", "mini")


def create_backend(
    kind: str, model: str, *, device: str | None = "auto", dtype: str = "auto", sampler: str = "ddim",
    model_config: str = "", prediction_type: str = "", quiet: bool = False,
) -> DiffusionBackend:
    """Load a backend by name: `sd` (diffusers Stable Diffusion) or `mini` (promptset's offline model).

    Prints what was loaded (device, resolved dtype, prediction type, native resolution) on rank 0 unless `quiet`.
    `model_config` and `prediction_type` are for `sd` (see `load_sd`).
    """
    from ..dist import rank_world
    from ..errors import UserError

    if kind == "sd":
        from .sd import load_sd

        backend = load_sd(model, device=device, dtype=dtype, sampler=sampler, model_config=model_config,
                          prediction_type=prediction_type)
    elif kind == "mini":
        from .mini import load_mini

        if model_config or prediction_type:
            raise UserError("--model-config and --prediction-type are for --backend sd; a mini model folder records "
                            "its own configuration")
        backend = load_mini(model, device=device, dtype=dtype, sampler=sampler)
    else:
        raise UserError(f"--backend {kind!r} is not one of {list(BACKENDS)}")
    if not quiet and rank_world()[0] == 0:
        print(backend.describe(), flush=True)
    return backend


__all__ = ["BACKENDS", "DiffusionBackend", "create_backend", "resolve_device", "resolve_dtype"]
