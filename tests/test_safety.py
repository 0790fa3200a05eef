"""Artifacts are verified, never unpickled (issue 6): a truncated or edited `prompts.safetensors` or
`labels.safetensors` is refused with exit code 2 and a message naming the file; no code path unpickles.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from promptset.cli import main
from promptset.stages.generate import generate
from promptset.stages.invert import invert
from promptset.stages.select import select

SRC = Path(__file__).resolve().parents[1] / "src" / "promptset"




@pytest.fixture(scope="module")
def finished_run(tiny_sd, tmp_path_factory) -> Path:
    """A run with prompts.safetensors and labels.safetensors."""
    root = tmp_path_factory.mktemp("safety")
    rng = np.random.default_rng(0)
    for name in ("car", "cat"):
        (root / "data" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "data" / name / f"{i}.png")
    run = root / "run"
    select(data=str(root / "data"), out=str(run), resolution=16, progress=False)
    invert(out=str(run), backend="sd", model=str(tiny_sd), steps=2, batch_size=2, resolution=16, device="cpu",
           progress=False)
    generate(run=str(run), ipc=1, steps=1, device="cpu", progress=False)
    return run


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 7])


def _flip_tensor_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # the tensor data is at the end of a safetensors file
    path.write_bytes(bytes(data))


def _edit_metadata(path: Path) -> None:
    """Rewrite one metadata string in the JSON header (same length, so the file stays well-formed)."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    meta = header["__metadata__"]
    key = "template" if "template" in meta else "sampler"
    meta[key] = meta[key][::-1]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(size)
    path.write_bytes(data[:8] + text + data[8 + size :])


@pytest.mark.parametrize("damage", [_truncate, _flip_tensor_byte, _edit_metadata], ids=["truncated", "tensor-edit",
                                                                                         "metadata-edit"])
@pytest.mark.parametrize("artifact, command", [("prompts.safetensors", "export"), ("labels.safetensors", "budget")])
def test_damaged_artifact_is_refused_with_exit_2(finished_run, artifact, command, damage, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run / artifact)
    code = main([command, "--run", str(run)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(run / artifact) in err
    assert re.search(r"not a readable safetensors file|does not match its (content )?hash", err), err


def test_every_artifact_carries_content_and_metadata_hashes(finished_run):
    from promptset.artifacts import load_tensors

    for name in ("prompts.safetensors", "labels.safetensors"):
        _, meta = load_tensors(finished_run / name)
        assert len(meta["content_sha256"]) == 64 and len(meta["metadata_sha256"]) == 64


_UNPICKLING = [
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib|shelve)\b", re.M), "a pickle module import"),
    (re.compile(r"\b(c?pickle|dill|joblib)\.(loads?|Unpickler)\b"), "an unpickler call"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
    (re.compile(r"\b(all_gather|broadcast|gather|scatter)_object(_list)?\("), "a torch.distributed *_object call"),
    (re.compile(r"\bpd\.read_pickle\b|\btorch\.jit\.load\b"), "a pickle-based loader"),
]


def test_no_code_path_unpickles():
    offenders = []
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 15
    for path in files:
        text = path.read_text(encoding="utf-8")
        for pattern, what in _UNPICKLING:
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                offenders.append(f"{path.relative_to(SRC)}:{line}: {what}")
    assert offenders == []


def test_sd_folder_with_only_pickled_weights_is_refused_without_unpickling(tiny_sd, tmp_path, capsys, monkeypatch):
    model = tmp_path / "pickled-sd"
    shutil.copytree(tiny_sd, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(weights)), model / "unet" / "diffusion_pytorch_model.bin")  # the legacy pickle format
    weights.unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    data = tmp_path / "data"
    for name in ("car", "cat"):
        (data / name).mkdir(parents=True)
        Image.new("RGB", (16, 16), (200, 10, 10)).save(data / name / "0.png")
    code = main(["invert", "--backend", "sd", "--model", str(model), "--data", str(data), "--out",
                 str(tmp_path / "run"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"--model {model}" in err and "pickled .bin weights are never loaded" in err
    assert not (tmp_path / "run").exists()
