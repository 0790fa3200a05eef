"""`promptset.devices.to_device`: the copy helper of the hot loops."""

from __future__ import annotations

import pytest
import torch

from promptset.devices import to_device


def test_cpu_to_cpu_is_the_same_tensor():
    x = torch.arange(5)
    assert to_device(x, "cpu") is x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cpu_to_cuda_copies_without_blocking_and_keeps_values():
    x = torch.randn(1000)
    original = x.clone()
    y = to_device(x, "cuda")
    x.add_(1.0)  # the staging buffer is a pinned copy: changing x after the call cannot change y
    torch.cuda.synchronize()
    assert y.device.type == "cuda" and torch.equal(y.cpu(), original)
