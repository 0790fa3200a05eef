"""Plain functions several test modules share (`conftest.py` holds the shared fixtures)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_full_batch(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """`steps` full-batch Adam steps of cross-entropy on images `x` (N, C, H, W) and labels `y` (N,); returns the
    last step's loss (computed before that step's update)."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss
