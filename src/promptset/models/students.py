"""Student networks trained on the distilled images, behind one factory: `create_student("convnet3", 10, 32)`.

Every student takes images in [0, 1] (B, C, H, W) and normalises them itself (ImageNet mean/std), so callers never do.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from promptset.errors import UserError
from promptset.models.cifar_resnet import ImageNormalize, ResidualBlock, cifar_resnet

STUDENTS = ["convnet3", "convnet4", "convnet_tiny", "resnet18", "resnet20", "resnet56"]
_CONVNET = re.compile(r"convnet(\d+)")


class ConvNet(nn.Module):
    """The dataset-distillation ConvNet (Zhao et al. 2021): depth x [conv3x3, instance norm, ReLU, avgpool 2]."""

    def __init__(self, num_classes: int, image_size: int, channels: int = 3, depth: int = 3, width: int = 128):
        super().__init__()
        if depth < 1:
            raise UserError(f"ConvNet depth must be at least 1, got {depth}")
        side = image_size >> depth
        if side < 1:
            raise UserError(f"ConvNet of depth {depth} needs images of at least {2**depth} px, got {image_size}")
        self.normalize = ImageNormalize(channels)
        layers: list[nn.Module] = []
        c_in = channels
        for _ in range(depth):
            # GroupNorm with one group per channel is instance norm with a learned affine, as in the DD code.
            layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.GroupNorm(width, width, affine=True)]
            layers += [nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            c_in = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))  # (B, width, H / 2^depth, W / 2^depth)
        return self.classifier(x.flatten(1))  # (B, num_classes)


class BasicBlock(ResidualBlock):
    """ResNet basic block with a 1x1 projection shortcut where the shape changes (torchvision layout)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__(c_in, c_out, stride)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016) with torchvision's parameter names.

    At `image_size <= 64` the stem is the CIFAR one (3x3 conv, stride 1, no max-pool), which keeps enough
    resolution for small images; larger images get the ImageNet stem (7x7 conv, stride 2, then max-pool).
    """

    def __init__(self, num_classes: int, image_size: int, channels: int = 3):
        super().__init__()
        self.normalize = ImageNormalize(channels)
        if image_size <= 64:
            self.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        c_in = 64
        for i, width in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(c_in, width, stride), BasicBlock(width, width)))
            c_in = width
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(self.normalize(x)))))  # (B, 64, H', W')
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512, H'/8, W'/8)
        return self.fc(x.mean(dim=(2, 3)))  # (B, num_classes)


class Normalized(nn.Module):
    """Wraps a network that expects normalised inputs (e.g. a timm model) so that it takes images in [0, 1]."""

    def __init__(self, net: nn.Module, channels: int = 3):
        super().__init__()
        self.normalize = ImageNormalize(channels)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))  # (B, num_classes)


def _available() -> str:
    return ", ".join(STUDENTS) + ", convnetD (any depth D), or a timm model name (when timm is installed)"


def create_student(name: str, num_classes: int, image_size: int, channels: int = 3) -> nn.Module:
    """Builds a randomly initialised student network that takes images in [0, 1] and returns logits.

    Args:
        name: One of `STUDENTS`, `convnetD` for a ConvNet of depth D, or a timm model name.
        num_classes: Number of output logits.
        image_size: Side of the (square) input images in pixels; sets the ConvNet classifier width and the
            ResNet-18 stem.
        channels: Input channels (3 for RGB).

    Returns:
        A module mapping (B, channels, image_size, image_size) images in [0, 1] to logits (B, num_classes).

    Raises:
        UserError: Unknown name, or a size the network cannot take.
    """
    if num_classes < 1:
        raise UserError(f"num_classes must be at least 1, got {num_classes}")
    if name == "convnet_tiny":
        return ConvNet(num_classes, image_size, channels, depth=2, width=16)
    if match := _CONVNET.fullmatch(name):
        return ConvNet(num_classes, image_size, channels, depth=int(match.group(1)))
    if name == "resnet18":
        return ResNet18(num_classes, image_size, channels)
    if name in ("resnet20", "resnet56"):
        if channels != 3:
            raise UserError(f"student {name} takes RGB images (channels=3), got channels={channels}; use convnet3")
        return cifar_resnet(int(name[len("resnet") :]), num_classes)
    try:
        import timm
    except ImportError:
        raise UserError(f"unknown student {name!r}; available: {_available()}") from None
    if not timm.is_model(name):
        raise UserError(f"unknown student {name!r}; available: {_available()}")
    net = timm.create_model(name, num_classes=num_classes, pretrained=False, in_chans=channels)
    return Normalized(net, channels)
