"""Shared fixtures: offline, CPU-only, deterministic."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

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
