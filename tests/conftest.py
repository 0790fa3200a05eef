"""Shared fixtures: offline, CPU-only, deterministic."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

torch.set_flush_denormal(True)
# Two shared cores: one thread per test process avoids oversubscription (5-10x slower otherwise).
torch.set_num_threads(int(os.environ.get("PROMPTSET_TEST_THREADS", "1")))
# ... and the CLI (in-process or in a subprocess) keeps that count instead of adapting it to the load (threads.py).
os.environ["PROMPTSET_THREADS"] = os.environ.get("PROMPTSET_TEST_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]

# File hashes are cached in a folder of this session, never in the user's ~/.cache. Set at import, before test
# modules build their subprocess environments from os.environ.
os.environ["PROMPTSET_CACHE"] = tempfile.mkdtemp(prefix="promptset-test-cache-")
atexit.register(shutil.rmtree, os.environ["PROMPTSET_CACHE"], True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is as fast, and far faster on a busy machine (no OpenMP spin-waits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's ../shared folder (data and weights, docs/DESIGN.md section 7); tests that need it skip when it is
    absent."""
    path = Path(os.environ.get("PROMPTSET_SHARED", REPO.parent / "shared"))
    if not (path / "weights").is_dir():
        pytest.skip(f"shared folder not found at {path} (set PROMPTSET_SHARED)")
    return path


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A random tiny Stable Diffusion folder (diffusers layout), built once per test session."""
    from promptset.backends.tiny import build_sd

    folder = tmp_path_factory.getbasetemp() / "tiny-sd"
    if not (folder / "model_index.json").is_file():
        build_sd(folder)
    return folder


RAW_CLASSES = ("car", "cat", "dog")  # single CLIP tokens
RAW_SIZE = 8  # the raw images' side; the tiny model generates 16 px


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory, tiny_sd) -> SimpleNamespace:
    """`invert` on raw 8 px folders of `RAW_CLASSES` (2 images each, no select) at the tiny model's 16 px, and a random
    CIFAR ResNet-20 as the teacher: `root`, `data`, `run`, `sd`, `teacher` (NAME:PATH). Built once per test module."""
    from PIL import Image
    from safetensors.torch import save_file

    import promptset
    from promptset.models import create_student

    root = tmp_path_factory.mktemp("raw")
    data = root / "data"
    rng = np.random.default_rng(0)
    for c, name in enumerate(RAW_CLASSES):
        (data / name).mkdir(parents=True)
        for i in range(2):
            base = np.array([(60 + 90 * c) % 256, (200 - 70 * c) % 256, (30 + 110 * c) % 256])
            pixels = np.clip(base + rng.integers(-30, 30, (RAW_SIZE, RAW_SIZE, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(data / name / f"{i:03d}.png")
    run = root / "run"
    promptset.invert(out=str(run), backend="sd", model=str(tiny_sd), data=str(data), steps=2, batch_size=3,
                     device="cpu", progress=False)
    torch.manual_seed(0)
    teacher = root / "resnet20.safetensors"
    save_file(create_student("resnet20", len(RAW_CLASSES), 32).state_dict(), str(teacher))
    return SimpleNamespace(root=root, data=data, run=run, sd=tiny_sd, teacher=f"resnet20:{teacher}")
