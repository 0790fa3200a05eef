"""CIFAR ResNet-20/56 (He et al. 2016, option-A shortcuts), the teachers for patch selection and soft labels.

Layout and names match akamaster/pytorch_resnet_cifar10, so `cifar10_resnet{20,56}.safetensors` load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WIDTHS = (16, 32, 64)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNormalize(nn.Module):
    """Maps images in [0, 1] to `(x - mean) / std` per channel; buffers are not saved in the state dict.

    Three channels use the ImageNet statistics; other channel counts use their average (0.449, 0.226).
    """

    def __init__(self, channels: int = 3, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        if mean is None or std is None:
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.449,) * channels, (0.226,) * channels)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std  # (B, C, H, W)


class ResidualBlock(nn.Module):
    """The ResNet basic block: conv3x3-bn-relu-conv3x3-bn, plus `shortcut(x)`, then ReLU. The shortcut is the
    subclass's: option A here (`BasicBlock`), torchvision's 1x1 projection in `students.BasicBlock`."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class BasicBlock(ResidualBlock):
    """The CIFAR block: option A shortcut (strided identity, zero-padded channels)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__(c_in, c_out, stride)
        self.stride = stride
        self.pad = c_out - c_in  # option A: zero-pad the missing channels, half on each side

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]  # (B, C_in, H/s, W/s)
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))  # (B, C_out, H/s, W/s)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32 px inputs in [0, 1]; it normalises them itself (ImageNet mean/std)."""

    def __init__(self, n: int, num_classes: int = 10):
        super().__init__()
        self.normalize = ImageNormalize(3)
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        c_in = WIDTHS[0]
        for i, width in enumerate(WIDTHS):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c_in, width, stride=2 if (i > 0 and j == 0) else 1))
                c_in = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(WIDTHS[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(self.normalize(x))))  # (B, 16, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 64, H/4, W/4)
        x = x.mean(dim=(2, 3))  # (B, 64)
        return self.linear(x)  # (B, num_classes)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """Builds a CIFAR ResNet of depth 6n+2 (20 -> n=3, 56 -> n=9), randomly initialised; inputs in [0, 1].

    Args:
        depth: Network depth; must satisfy depth = 6n + 2.
        num_classes: Width of the final `linear` layer.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes)
