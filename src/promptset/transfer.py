"""Host-to-device copies that do not stall the GPU.

Random numbers in the hot loops are drawn on the CPU (one seeded `torch.Generator` per stream, so results do not
depend on the device). A plain `.to("cuda")` of a pageable CPU tensor synchronises the host with the device; copying
through a pinned staging buffer with `non_blocking=True` queues the copy on the stream instead, so the host can run
ahead and queue the next step. The caching host allocator keeps the pinned buffer alive until the copy is done.
"""

from __future__ import annotations

import torch


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`x` on `device`; from CPU to CUDA without a host-device synchronisation (elsewhere a plain `.to`)."""
    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)
