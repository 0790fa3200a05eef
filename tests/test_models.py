"""Tests for the shared networks: TAEF2 autoencoder, CIFAR ResNet teachers, student registry.

Real weights and a 200-image CIFAR-10 JPEG sample come from the shared folder; those tests skip without it.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import fit_full_batch
from PIL import Image
from safetensors.torch import load_file, save_file

from promptset.errors import UserError
from promptset.models import STUDENTS, TAEF2, Teacher, cifar_resnet, create_student, load_teacher
from promptset.models.taef2 import TAEF2Decoder, TAEF2Encoder

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS = 20


@pytest.fixture(scope="module")
def cifar_sample(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 20 test images of each class, (200, 3, 32, 32) in [0, 1], and their labels (200,)."""
    out = tmp_path_factory.mktemp("cifar")
    wanted = {f"test/{c}/{i:04d}.jpg" for c in CLASSES for i in range(PER_CLASS)}
    with tarfile.open(shared_dir / "data" / "cifar10-jpeg.tar.gz") as tar:
        for member in tar:  # stream: only the wanted members are written out
            name = member.name.removeprefix("./").removeprefix("cifar10-jpeg/")
            if name in wanted:
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                (out / name).write_bytes(tar.extractfile(member).read())
    files = sorted(out.glob("test/*/*.jpg"))
    assert len(files) == len(wanted), f"found {len(files)} of {len(wanted)} sample images in the archive"
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])  # (N, 32, 32, 3)
    labels = torch.tensor([CLASSES.index(f.parent.name) for f in files])  # (N,)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, labels


@pytest.fixture(scope="module")
def taef2(shared_dir: Path) -> TAEF2:
    return TAEF2.from_dir(shared_dir / "weights")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / F.mse_loss(a, b)))


# --- TAEF2 -----------------------------------------------------------------------------------------------------


def test_taef2_weights_load_strictly(shared_dir: Path):
    for module, file in ((TAEF2Encoder(), "taef2_encoder"), (TAEF2Decoder(), "taef2_decoder")):
        state = load_file(str(shared_dir / "weights" / f"{file}.safetensors"))
        assert set(state) == set(module.state_dict())
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model = TAEF2.from_dir(shared_dir / "weights")
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert not model.training


def test_taef2_round_trip_on_real_images(taef2: TAEF2, cifar_sample):
    images, _ = cifar_sample
    x = images[::PER_CLASS]  # one image per class, (10, 3, 32, 32)
    x = F.interpolate(x, size=64, mode="bilinear", align_corners=False).clamp(0, 1)  # (10, 3, 64, 64)
    with torch.no_grad():
        latents = taef2.encode(x)
        recon = taef2.decode(latents)
    assert latents.shape == (10, 32, 8, 8)
    assert recon.shape == x.shape and recon.min() >= 0 and recon.max() <= 1
    assert psnr(recon, x) > 25  # README: about 32.5 dB; a [-1, 1] convention mix-up gives about 19 dB


def test_taef2_missing_file_names_path(tmp_path: Path):
    with pytest.raises(UserError, match="taef2_encoder.safetensors") as err:
        TAEF2.from_dir(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_taef2_rejects_bad_shapes(taef2: TAEF2):
    with pytest.raises(ValueError, match="multiples of 8"):
        taef2.encode(torch.rand(1, 3, 30, 30))


# --- CIFAR ResNet teachers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [20, 56])
def test_cifar_resnet_loads_strictly(shared_dir: Path, depth: int):
    """The shared weights name exactly the network's tensors, with its shapes, and every one of them is loaded."""
    weights = load_file(str(shared_dir / "weights" / f"cifar10_resnet{depth}.safetensors"))
    net = cifar_resnet(depth)
    # every tensor but BatchNorm's step counters (not stored; torch sets them to 0 when a state dict lacks them)
    wanted = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert {k: tuple(v.shape) for k, v in weights.items()} == wanted
    result = net.load_state_dict(weights, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    # depth 6n + 2: 6n + 1 convolutions (option-A shortcuts have none) and the final linear layer
    convs = [k for k, v in weights.items() if k.endswith("weight") and v.ndim == 4]
    assert len(convs) == depth - 1 and weights["linear.weight"].shape == (10, 64)


def test_resnet20_teacher_classifies_real_images(shared_dir: Path, cifar_sample):
    images, labels = cifar_sample
    path = shared_dir / "weights" / "cifar10_resnet20.safetensors"
    teacher = load_teacher(f"resnet20:{path}", num_classes=10)
    with torch.no_grad():
        logits = teacher(images)  # (200, 10)
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    assert accuracy > 0.6, f"ResNet-20 accuracy {accuracy:.3f} on {len(labels)} JPEG test images"


def test_teacher_attributes(shared_dir: Path):
    path = shared_dir / "weights" / "cifar10_resnet20.safetensors"
    teacher = load_teacher(f"resnet20:{path}")
    assert isinstance(teacher, Teacher)
    assert (teacher.num_classes, teacher.name, teacher.spec) == (10, "resnet20", f"resnet20:{path}")
    assert teacher.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.net.training  # stays frozen, BN statistics untouched


def test_load_teacher_none():
    assert load_teacher("none") is None
    assert load_teacher(" None ") is None


@pytest.mark.parametrize("spec", ["resnet20", "resnet20:", ":w.safetensors", "nosuchnet:w.safetensors"])
def test_load_teacher_bad_spec(spec: str):
    with pytest.raises(UserError, match="NAME:PATH"):
        load_teacher(spec)


def test_load_teacher_missing_file(tmp_path: Path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(UserError, match="not found") as err:
        load_teacher(f"resnet20:{path}")
    assert str(path) in str(err.value)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_load_teacher_refuses_pickles(tmp_path: Path, suffix: str):
    path = tmp_path / f"teacher{suffix}"
    path.write_bytes(b"not loaded")
    with pytest.raises(UserError, match="safetensors") as err:
        load_teacher(f"resnet20:{path}")
    assert str(path) in str(err.value)


def test_load_teacher_class_count_mismatch(shared_dir: Path):
    path = shared_dir / "weights" / "cifar10_resnet20.safetensors"
    with pytest.raises(UserError, match="same classes") as err:
        load_teacher(f"resnet20:{path}", num_classes=100)
    assert str(path) in str(err.value) and "10 classes" in str(err.value) and "100" in str(err.value)


def test_load_teacher_wrong_architecture(shared_dir: Path):
    path = shared_dir / "weights" / "cifar10_resnet20.safetensors"
    with pytest.raises(UserError) as err:
        load_teacher(f"resnet56:{path}")
    assert str(path) in str(err.value)


@pytest.mark.parametrize(("name", "size", "channels"), [("convnet_tiny", 24, 3), ("convnet3", 32, 1)])
def test_student_weights_reload_as_teacher(tmp_path: Path, name: str, size: int, channels: int):
    torch.manual_seed(0)
    student = create_student(name, 7, size, channels).eval()
    path = tmp_path / f"{name}.safetensors"
    save_file(student.state_dict(), str(path))
    teacher = load_teacher(f"{name}:{path}", num_classes=7)
    x = torch.rand(3, channels, size, size)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), student(x))


# --- students --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size", "channels"),
    [
        ("convnet3", 32, 3),
        ("convnet4", 64, 3),
        ("convnet2", 28, 1),
        ("convnet_tiny", 16, 3),
        ("resnet18", 32, 3),
        ("resnet18", 96, 3),  # ImageNet stem
        ("resnet20", 32, 3),
        ("resnet56", 32, 3),
    ],
)
def test_student_builds_and_gives_logits(name: str, size: int, channels: int):
    net = create_student(name, 5, size, channels).eval()
    with torch.no_grad():
        logits = net(torch.rand(2, channels, size, size))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


def test_students_list_covers_registry():
    assert {"convnet3", "convnet4", "convnet_tiny", "resnet18", "resnet20", "resnet56"} <= set(STUDENTS)


def test_unknown_student_lists_names():
    with pytest.raises(UserError, match="convnet3"):
        create_student("no_such_student_net", 10, 32)


def test_convnet_too_small_image():
    with pytest.raises(UserError, match="at least 8 px"):
        create_student("convnet3", 10, 4)


def test_convnet_tiny_fits_coloured_squares():
    """A real learning check: red vs green squares at random places on grey noise, 64 images, full-batch Adam."""
    g = torch.Generator().manual_seed(0)
    n, size = 64, 16
    images = 0.5 + 0.1 * torch.randn(n, 3, size, size, generator=g)  # (n, 3, 16, 16)
    labels = torch.arange(n) % 2  # (n,)
    for i in range(n):
        r, c = torch.randint(0, size - 6, (2,), generator=g).tolist()
        images[i, :, r : r + 6, c : c + 6] = 0.1
        images[i, int(labels[i]), r : r + 6, c : c + 6] = 0.9  # red square for class 0, green for class 1
    images = images.clamp(0, 1)

    torch.manual_seed(0)
    net = create_student("convnet_tiny", 2, size)
    loss = fit_full_batch(net, images, labels, steps=60, lr=3e-3)
    with torch.no_grad():
        accuracy = (net(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.9, f"train accuracy {accuracy:.2f}, final loss {loss.item():.3f}"
