"""Frozen teacher classifiers (patch selection, soft labels) loaded from `NAME:PATH.safetensors`, or from the bare
PATH of a file `promptset teacher` wrote (its metadata names the architecture, classes, input size, normalisation).

A `Teacher` takes images in [0, 1] and returns logits; weights are read from safetensors only, never pickles.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from promptset.errors import UserError
from promptset.models.cifar_resnet import ImageNormalize
from promptset.models.students import _CONVNET, STUDENTS, create_student
from promptset.runfolder import check_same_classes

GRAMMAR = (
    "teacher spec must be 'none', the PATH of a teacher made by `promptset teacher`, or 'NAME:PATH' with NAME one of "
    f"{', '.join(STUDENTS)}, convnetD, timm/<model>, torchvision/<model> and PATH a .safetensors state dict "
    "(e.g. 'resnet20:weights/cifar10_resnet20.safetensors'); NAME@SIZE:PATH names the input side the teacher was "
    "trained at (e.g. 'timm/resnet18@224:teacher.safetensors')"
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


def _builtin_geometry(name: str, state: dict[str, torch.Tensor], path: Path) -> tuple[int, int, bool]:
    """(image_size, channels, size_known) of a built-in network, read off its weight shapes.

    A ConvNet's classifier width fixes its input side exactly; the CIFAR ResNets (resnet20/56) are 32 px networks.
    A ResNet-18's stem says only "64 px or less" (3x3) or "more than 64 px" (7x7): its size is then not known.
    """
    try:
        if name == "convnet_tiny" or _CONVNET.fullmatch(name):
            depth = 2 if name == "convnet_tiny" else int(name[len("convnet") :])
            first, head = state["features.0.weight"], state["classifier.weight"]
            side = math.isqrt(head.shape[1] // first.shape[0])
            return side << depth, int(first.shape[1]), True
        if name == "resnet18":
            first = state["conv1.weight"]
            return (32 if first.shape[-1] == 3 else 224), int(first.shape[1]), False
    except KeyError as err:
        raise UserError(f"teacher weights {path} are not a {name} state dict (no {err.args[0]!r})") from None
    return 32, 3, True


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
        image_size: Input side it was trained at (inputs are resized to it): from its file's metadata, the spec's
            NAME@SIZE, or the architecture (ConvNets, CIFAR ResNets); None when unknown (see `require_input_size`).
        class_folders: Its classes in order when its file lists them, else None.
    """

    def __init__(
        self,
        net: nn.Module,
        spec: str,
        name: str,
        weights_path: Path,
        weights_sha256: str,
        normalize: nn.Module | None = None,
        image_size: int | None = None,
    ):
        super().__init__()
        self.net = net
        self.normalize = normalize if normalize is not None else nn.Identity()
        self.spec = spec
        self.name = name
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256
        self.image_size = image_size
        self.class_folders: list[str] | None = None
        self.metadata: dict = {}
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
        """Logits for images in [0, 1] (B, 3, H, W) -> (B, num_classes); resized first to the size the teacher was
        trained at whenever that is known."""
        size = self.image_size
        if size and tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                   align_corners=False).clamp(0, 1)  # fmt: skip
        return self.net(self.normalize(images))  # (B, num_classes)


TEACHER_FORMAT = "promptset.teacher"  # metadata `format` of files written by `promptset teacher`


def read_teacher_metadata(path: Path) -> dict:
    """The metadata of a teacher weights file, with `class_folders` and `normalize` decoded ({} if it has none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read teacher weights {path}: {err}") from None
    raw = meta.get("class_folders") or meta.get("classes")
    if raw is not None:
        try:
            folders = json.loads(raw)
            if not isinstance(folders, list):
                raise TypeError("not a list")
        except (json.JSONDecodeError, TypeError) as err:
            raise UserError(f"teacher weights {path}: metadata class list is not a JSON list ({err})") from None
        meta["class_folders"] = [str(c) for c in folders]
    if "normalize" in meta:
        meta["normalize"] = json.loads(meta["normalize"])
    return meta


def _split_spec(spec: str) -> tuple[str, Path, int | None]:
    """(architecture name or '', path, input side or None) of `NAME[@SIZE]:PATH` or of a bare `PATH` (whose file
    names its architecture)."""
    name, sep, raw_path = spec.partition(":")
    name, raw_path = name.strip(), raw_path.strip()
    bare = not sep or (spec.lower().endswith(".safetensors") and Path(spec).expanduser().is_file())
    if bare:
        return "", Path(spec).expanduser(), None
    if not name or not raw_path:
        raise UserError(f"bad teacher spec {spec!r}: {GRAMMAR}")
    name, at, size = name.partition("@")
    if at and not (size.isdigit() and int(size) > 0):
        raise UserError(f"bad teacher spec {spec!r}: SIZE in NAME@SIZE:PATH must be a positive number of pixels")
    return name.strip(), Path(raw_path).expanduser(), int(size) if at else None


def require_input_size(teacher: Teacher, what: str) -> int:
    """The input side `teacher` expects, or a UserError saying how to name it (`what` says who needs it)."""
    if teacher.image_size:
        return int(teacher.image_size)
    raise UserError(
        f"{what}: teacher {teacher.spec} does not say which image size it was trained at, so it cannot be fed images "
        f"at the size it expects; name it as {teacher.name}@SIZE:{teacher.weights_path} (e.g. "
        f"{teacher.name}@224:{teacher.weights_path}), or train one with `promptset teacher`, whose file records it"
    )


def load_teacher(
    spec: str,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    class_folders: list[str] | None = None,
) -> Teacher | None:
    """Loads a frozen teacher from `none`, `NAME:PATH` or `PATH` (PATH a `.safetensors` state dict).

    A file written by `promptset teacher` names its architecture, classes, input size and normalisation in its
    metadata, so its bare PATH is enough; it then resizes every input to the size it was trained at.

    Args:
        spec: `none`, `PATH` of a promptset teacher, or `NAME:PATH` with NAME a built-in network (`resnet20`,
            `resnet56`, `convnet3`, `resnet18`, ...), `timm/<model>` or `torchvision/<model>`.
        num_classes: If given, the number of classes the caller's data has; the teacher must match it.
        device: Where to put the teacher.
        class_folders: If given, the caller's class folders in order; a teacher whose file lists its classes must
            list exactly these.

    Returns:
        The teacher in eval mode with gradients off, or None for `none`.

    Raises:
        UserError: Bad spec, missing or non-safetensors file, weights that do not fit the architecture, or classes
            that differ from `num_classes` / `class_folders`.
    """
    spec = spec.strip()
    if spec.lower() == "none":
        return None
    name, path, spec_size = _split_spec(spec)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(
            f"teacher weights {path} look like a pickle ({path.suffix}); pickles are never loaded. Convert the "
            "state dict with safetensors.torch.save_file(model.state_dict(), 'teacher.safetensors') and pass that"
        )
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"teacher weights {path} must be a .safetensors file; {GRAMMAR}")
    if not path.is_file():
        raise UserError(f"teacher weights not found: {path}. Pass an existing .safetensors file as PATH or NAME:PATH")
    meta = read_teacher_metadata(path)
    stored_arch = meta.get("arch", "")
    if not name:
        if not stored_arch:
            raise UserError(f"teacher weights {path} do not name their architecture; pass NAME:PATH. {GRAMMAR}")
        name = stored_arch
    elif stored_arch and stored_arch != name:
        raise UserError(
            f"teacher spec {spec!r} names {name!r} but {path} was trained as {stored_arch!r}; pass "
            f"{stored_arch}:{path} or just {path}"
        )
    kind, _, arch = name.partition("/")
    external = kind in ("timm", "torchvision") and bool(arch)
    if not external and name not in STUDENTS and not _CONVNET.fullmatch(name):
        raise UserError(f"unknown teacher name {name!r} in {spec!r}: {GRAMMAR}")
    if class_folders is not None and meta.get("class_folders") is not None:
        check_same_classes(class_folders, meta["class_folders"], f"teacher weights {path} (its class list)",
                           "pass a teacher trained on these classes, in classes.json order (train one with "
                           "`promptset teacher --data DIR --out FILE.safetensors` on this data)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read teacher weights {path}: {err}") from None
    trained_size = int(meta["image_size"]) if meta.get("image_size") else None
    if spec_size and trained_size and spec_size != trained_size:
        raise UserError(f"teacher spec {spec!r} says {spec_size} px but {path} records that it was trained at "
                        f"{trained_size} px; drop @{spec_size} or pass @{trained_size}")
    known_size = trained_size or spec_size

    if external:
        probe = _build_external(kind, arch, num_classes)
        width = _classes_in_state(probe, state)
        net = probe if width in (None, num_classes) else _build_external(kind, arch, width)
        norm = meta.get("normalize") or {}
        normalize = ImageNormalize(3, norm.get("mean"), norm.get("std"))
    else:
        image_size, channels, certain = _builtin_geometry(name, state, path)
        known_size = known_size or (image_size if certain else None)
        image_size = known_size or image_size
        probe = create_student(name, num_classes or 10, image_size, channels)
        width = _classes_in_state(probe, state)
        net = probe if width in (None, num_classes or 10) else create_student(name, width, image_size, channels)
        normalize = None  # built-in networks normalise inside

    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = str(err).splitlines()[0:3]
        raise UserError(f"teacher weights {path} do not fit architecture {name!r}: {' '.join(detail)}") from None

    teacher = Teacher(net, spec, name, path, _sha256(path), normalize, image_size=known_size).to(device)
    teacher.class_folders = meta.get("class_folders")
    teacher.metadata = {k: v for k, v in meta.items() if k not in ("content_sha256", "metadata_sha256")}
    if num_classes is not None and teacher.num_classes != num_classes:
        raise UserError(
            f"teacher weights {path} predict {teacher.num_classes} classes but the data has {num_classes}; "
            "pass a teacher trained on the same classes"
        )
    return teacher


@torch.no_grad()
def label_pixels(teacher: nn.Module, pixels: torch.Tensor, chunk: int) -> torch.Tensor:
    """The teacher's logits (N, C) fp32 on the CPU for uint8 images (N, 3, S, S), computed on the teacher's device.

    The teacher always sees exactly `chunk` images (the last chunk padded with copies of its last image), so an
    image's logits do not depend on which images it was labelled with, nor on the process that labelled it. The
    inputs are `pixels / 255`, exactly what `to_tensor` gives for the PNG of those pixels.
    """
    device = next(teacher.parameters()).device
    out = []
    for s in range(0, len(pixels), chunk):
        part = pixels[s : s + chunk]
        real = len(part)
        if real < chunk:
            part = torch.cat([part, part[-1:].expand(chunk - real, *part.shape[1:])])
        x = part.to(device).float().div_(255)  # (chunk, 3, S, S) in [0, 1]
        out.append(teacher(x)[:real].float())
    return torch.cat(out).cpu() if out else torch.zeros(0, getattr(teacher, "num_classes", 0))


def penultimate_layer(teacher: nn.Module) -> nn.Linear:
    """The classifier head (the last `nn.Linear`) of a teacher or network, whose input is its penultimate features;
    a UserError when it has none (e.g. a convolutional head)."""
    head = _final_linear(getattr(teacher, "net", teacher))
    if head is None:
        raise UserError(f"teacher {getattr(teacher, 'spec', type(teacher).__name__)} has no final linear layer, so "
                        "its penultimate features cannot be read; pass a teacher whose classifier ends in nn.Linear "
                        "(every built-in, most timm ones)")
    return head[1]


@torch.no_grad()
def teacher_features(teacher: Teacher, pixels: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features (N, D), logits (N, C)), fp32 on the CPU, of uint8 images (N, 3, S, S).

    The features are the input of the teacher's final linear layer (read with a forward pre-hook, so the network is
    not changed), flattened. As in `label_pixels`, the teacher always sees exactly `chunk` images (the last chunk
    padded with copies of its last image), so an image's features do not depend on its batch neighbours; images are
    `pixels / 255`, resized by the teacher to its input size.
    """
    head = penultimate_layer(teacher)
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    device = next(teacher.parameters()).device
    features, logits = [], []
    try:
        for s in range(0, len(pixels), chunk):
            part = pixels[s : s + chunk]
            real = len(part)
            if real < chunk:
                part = torch.cat([part, part[-1:].expand(chunk - real, *part.shape[1:])])
            seen.clear()
            out = teacher(part.to(device).float().div_(255))  # (chunk, C)
            if len(seen) != 1:
                raise UserError(f"teacher {teacher.spec}: its final linear layer ran {len(seen)} times in one forward "
                                "pass, so its input is not one penultimate feature vector per image")
            features.append(seen[0].flatten(1)[:real].float().cpu())  # (real, D)
            logits.append(out[:real].float().cpu())
    finally:
        hook.remove()
    if not features:
        return torch.zeros(0, head.in_features), torch.zeros(0, teacher.num_classes)
    return torch.cat(features), torch.cat(logits)

@torch.no_grad()
def penultimate_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What a classifier's final `nn.Linear` sees for images in [0, 1] (B, 3, H, W): its penultimate features (B, F)
    fp32 on the model's device, in one forward pass (a `Teacher` resizes and normalises as for its logits). For many
    images at once with a fixed batch, see `teacher_features`."""
    head = penultimate_layer(model)
    seen = []
    handle = head.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        model(images.to(next(model.parameters()).device))
    finally:
        handle.remove()
    return seen[-1].flatten(1).float()
