"""Frozen teacher classifiers (patch selection, soft labels) loaded from a spec string `NAME:PATH.safetensors`.

A `Teacher` takes images in [0, 1] and returns logits; weights are read from safetensors only, never pickles.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from promptset.errors import UserError
from promptset.models.cifar_resnet import ImageNormalize
from promptset.models.students import _CONVNET, STUDENTS, create_student

GRAMMAR = (
    "teacher spec must be 'none' or 'NAME:PATH' with NAME one of "
    f"{', '.join(STUDENTS)}, convnetD, timm/<model>, torchvision/<model> and PATH a .safetensors state dict "
    "(e.g. 'resnet20:weights/cifar10_resnet20.safetensors')"
)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _final_linear(net: nn.Module) -> tuple[str, nn.Linear] | None:
    """The last `nn.Linear` in registration order: the classifier head of every network used here."""
    found = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    return found


def _classes_in_state(net: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """Output width of the state dict's classifier, found through the freshly built network's head name."""
    head = _final_linear(net)
    weight = state.get(f"{head[0]}.weight") if head else None
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def _builtin_geometry(name: str, state: dict[str, torch.Tensor], path: Path) -> tuple[int, int]:
    """(image_size, channels) a built-in student was trained at, read off its weight shapes."""
    try:
        if name == "convnet_tiny" or _CONVNET.fullmatch(name):
            depth = 2 if name == "convnet_tiny" else int(name[len("convnet") :])
            first, head = state["features.0.weight"], state["classifier.weight"]
            side = math.isqrt(head.shape[1] // first.shape[0])
            return side << depth, int(first.shape[1])
        if name == "resnet18":
            first = state["conv1.weight"]
            return (32 if first.shape[-1] == 3 else 224), int(first.shape[1])
    except KeyError as err:
        raise UserError(f"teacher weights {path} are not a {name} state dict (no {err.args[0]!r})") from None
    return 32, 3


def _build_external(kind: str, arch: str, num_classes: int | None) -> nn.Module:
    """A randomly initialised timm/torchvision network (imported lazily)."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if kind == "timm":
        try:
            import timm
        except ImportError:
            raise UserError(f"teacher 'timm/{arch}' needs timm: pip install timm") from None
        if not timm.is_model(arch):
            raise UserError(f"timm has no model named {arch!r} (see timm.list_models())")
        return timm.create_model(arch, pretrained=False, **kwargs)
    try:
        import torchvision
    except ImportError:
        raise UserError(f"teacher 'torchvision/{arch}' needs torchvision: pip install torchvision") from None
    try:
        return torchvision.models.get_model(arch, weights=None, **kwargs)
    except ValueError as err:
        raise UserError(f"torchvision has no model named {arch!r}: {err}") from None


class Teacher(nn.Module):
    """A frozen classifier: images in [0, 1] (B, 3, H, W) -> logits (B, num_classes).

    Attributes:
        net: The wrapped network.
        normalize: Input normalisation applied before `net` (identity for built-in networks, which normalise
            themselves with the ImageNet mean/std; ImageNet mean/std for timm/torchvision networks).
        num_classes: Output width of the final linear layer.
        spec: The spec string it was loaded from.
        name: The architecture name (e.g. `resnet20`, `timm/resnet50`).
        weights_path: The safetensors file.
        weights_sha256: Hex sha256 of the weights file.
    """

    def __init__(
        self,
        net: nn.Module,
        spec: str,
        name: str,
        weights_path: Path,
        weights_sha256: str,
        normalize: nn.Module | None = None,
    ):
        super().__init__()
        self.net = net
        self.normalize = normalize if normalize is not None else nn.Identity()
        self.spec = spec
        self.name = name
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256
        self.requires_grad_(False)
        self.eval()
        head = _final_linear(net)
        if head is not None:
            self.num_classes = head[1].out_features
        else:  # e.g. a convolutional head: read the width off one forward pass
            with torch.no_grad():
                self.num_classes = int(self(torch.zeros(1, 3, 64, 64)).shape[-1])

    def train(self, mode: bool = True) -> Teacher:
        """Stays in eval mode: the teacher is frozen even inside a module switched to training."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for images in [0, 1] (B, 3, H, W) -> (B, num_classes)."""
        return self.net(self.normalize(images))  # (B, num_classes)


def load_teacher(spec: str, num_classes: int | None = None, device: str | torch.device = "cpu") -> Teacher | None:
    """Loads a frozen teacher from `none` or `NAME:PATH` (PATH a `.safetensors` state dict).

    Args:
        spec: `none`, or `NAME:PATH` with NAME a built-in network (`resnet20`, `resnet56`, `convnet3`, `resnet18`,
            ...), `timm/<model>` or `torchvision/<model>`.
        num_classes: If given, the number of classes the caller's data has; the teacher must match it.
        device: Where to put the teacher.

    Returns:
        The teacher in eval mode with gradients off, or None for `none`.

    Raises:
        UserError: Bad spec, missing or non-safetensors file, weights that do not fit the architecture, or a
            class count that differs from `num_classes`.
    """
    spec = spec.strip()
    if spec.lower() == "none":
        return None
    name, sep, raw_path = spec.partition(":")
    name, raw_path = name.strip(), raw_path.strip()
    if not sep or not name or not raw_path:
        raise UserError(f"bad teacher spec {spec!r}: {GRAMMAR}")
    kind, _, arch = name.partition("/")
    external = kind in ("timm", "torchvision") and bool(arch)
    if not external and name not in STUDENTS and not _CONVNET.fullmatch(name):
        raise UserError(f"unknown teacher name {name!r} in {spec!r}: {GRAMMAR}")
    path = Path(raw_path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(
            f"teacher weights {path} look like a pickle ({path.suffix}); pickles are never loaded. Convert the "
            "state dict with safetensors.torch.save_file(model.state_dict(), 'teacher.safetensors') and pass that"
        )
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"teacher weights {path} must be a .safetensors file; {GRAMMAR}")
    if not path.is_file():
        raise UserError(f"teacher weights not found: {path}. Pass an existing .safetensors file in '{name}:PATH'")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read teacher weights {path}: {err}") from None

    if external:
        probe = _build_external(kind, arch, num_classes)
        width = _classes_in_state(probe, state)
        net = probe if width in (None, num_classes) else _build_external(kind, arch, width)
        normalize = ImageNormalize(3)
    else:
        image_size, channels = _builtin_geometry(name, state, path)
        probe = create_student(name, num_classes or 10, image_size, channels)
        width = _classes_in_state(probe, state)
        net = probe if width in (None, num_classes or 10) else create_student(name, width, image_size, channels)
        normalize = None  # built-in networks normalise inside

    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = str(err).splitlines()[0:3]
        raise UserError(f"teacher weights {path} do not fit architecture {name!r}: {' '.join(detail)}") from None

    teacher = Teacher(net, spec, name, path, _sha256(path), normalize).to(device)
    if num_classes is not None and teacher.num_classes != num_classes:
        raise UserError(
            f"teacher weights {path} predict {teacher.num_classes} classes but the data has {num_classes}; "
            "pass a teacher trained on the same classes"
        )
    return teacher
