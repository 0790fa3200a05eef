"""Where tensors live: the `--device` and `--dtype` flags, and host-to-device copies that do not stall the GPU.

Random numbers in the hot loops are drawn on the CPU (one seeded `torch.Generator` per stream, so results do not
depend on the device). A plain `.to("cuda")` of a pageable CPU tensor synchronises the host with the device; copying
through a pinned staging buffer with `non_blocking=True` queues the copy on the stream instead, so the host can run
ahead and queue the next step. The caching host allocator keeps the pinned buffer alive until the copy is done.
"""

from __future__ import annotations

import os

import torch

from .errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map a `--dtype` flag to a torch dtype, refusing half precision on CPU (slow or unsupported there)."""
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not one of {sorted(DTYPES)}")
    if device.type == "cpu" and name != "fp32":
        raise UserError(f"--dtype {name} on CPU is very slow or unsupported; pass --dtype fp32 on CPU")
    return DTYPES[name]


def resolve_device(name: str | None) -> torch.device:
    """`auto` (or None) picks CUDA when available, else CPU. A bare `cuda` under a launcher is `cuda:LOCAL_RANK`."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a valid torch device (try cpu, cuda, cuda:0)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available; pass --device cpu")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`x` on `device`; from CPU to CUDA without a host-device synchronisation (elsewhere a plain `.to`)."""
    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)
