"""Crash safety (issue 6): `invert` killed with SIGKILL at random points resumes to the same prompts as an
uninterrupted run, no file in the run folder is ever partial, a NaN loss stops the run (exit 3) and keeps the last
good checkpoint, and `generate` redoes only the images that are missing or broken.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from promptset.artifacts import load_tensors
from promptset.backends.base import DiffusionBackend
from promptset.cli import main
from promptset.stages.generate import generate
from promptset.stages.invert import InvertConfig, invert
from promptset.stages.select import select

CLASSES = ("car", "cat", "dog")
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}




@pytest.fixture(scope="module")
def collages(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / "data" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "data" / name / f"{i}.png")
    return select(data=str(root / "data"), out=str(root / "run"), resolution=16, progress=False)


def invert_argv(model: Path, data: Path, out: Path, *extra) -> list[str]:
    # three groups of one class each, so kills land in different groups, between checkpoints, and in assembly
    args = ["invert", "--backend", "sd", "--model", model, "--data", data, "--out", out, "--steps", 40,
            "--batch-size", 6, "--classes-per-batch", 1, "--resolution", 16, "--device", "cpu",
            "--checkpoint-every", 3, "--log-every", 1, "--no-progress", *extra]
    return [str(a) for a in args]


def progress(out: Path, steps: int = 40) -> int:
    """Steps done over all groups, as the files on disk say (finished groups, then checkpoints)."""
    done = 0
    for g in range(len(CLASSES)):
        if (out / "invert" / "groups" / f"g{g:05d}.safetensors").is_file():
            done += steps
            continue
        try:
            with safe_open(str(out / "invert" / "checkpoints" / f"g{g:05d}.safetensors"), framework="pt") as f:
                done += int(f.metadata()["step"])
        except (OSError, Exception):  # absent, or renamed while we read it
            pass
    return done


def assert_nothing_partial(out: Path) -> None:
    """Every artifact loads and every JSON parses; only `.tmp-*` files may be half-written."""
    for path in out.rglob("*"):
        if not path.is_file() or path.name.startswith(".tmp-"):
            continue
        if path.suffix == ".safetensors":
            load_tensors(path)  # raises on a truncated file or a content-hash mismatch
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".yaml":
            assert isinstance(yaml.safe_load(path.read_text()), dict)
        elif path.suffix == ".jsonl":
            lines = path.read_text().splitlines()
            for line in lines[:-1]:  # an append cut by the kill may only tear the last line
                json.loads(line)


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_gives_identical_prompts(tiny_sd, collages, tmp_path):
    command = [sys.executable, "-m", "promptset"]
    reference = tmp_path / "reference"  # uninterrupted, on the other core meanwhile
    uninterrupted = subprocess.Popen(command + invert_argv(tiny_sd, collages, reference), env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills, seen = [], -1
    for attempt in range(5):
        proc = subprocess.Popen(command + invert_argv(tiny_sd, collages, out), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if attempt == 0:
            time.sleep(rng.uniform(0.5, 2.5))  # while loading the model or building the latent cache
        else:
            while proc.poll() is None and progress(out) <= seen:  # wait for a new checkpoint, then kill past it
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.12))
        if proc.poll() is not None:
            break  # finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(progress(out))
        seen = max(seen, kills[-1])
        assert_nothing_partial(out)
    assert len(kills) == 5, kills
    assert kills[-1] < 3 * 40 and not (out / "prompts.safetensors").exists()

    # a stale temp file like a kill can leave mid-write must not break the resume
    stale = out / "invert" / "checkpoints" / ".tmp-g00002.safetensors.x1y2z3.safetensors"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"\x00" * 100)
    final = subprocess.run(command + invert_argv(tiny_sd, collages, out), env=ENV, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-3000:]
    assert_nothing_partial(out)
    assert not [p for p in out.rglob(".tmp-*")]

    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read()[-3000:]
    a, b = load_tensors(reference / "prompts.safetensors")[0], load_tensors(out / "prompts.safetensors")[0]
    assert torch.equal(a["embeddings"], b["embeddings"]), kills
    rows = [json.loads(line) for line in (out / "invert" / "metrics.jsonl").read_text().splitlines()]
    for g in range(len(CLASSES)):  # each step logged exactly once, though some were trained twice
        assert [r["step"] for r in rows if r["group"] == g] == list(range(1, 41))


def test_nan_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tiny_sd, collages, tmp_path, capsys,
                                                                       monkeypatch):
    calls = {"n": 0}
    real_loss = DiffusionBackend.denoising_loss

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_loss(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] >= 8 else loss

    monkeypatch.setattr(DiffusionBackend, "denoising_loss", poisoned)
    out = tmp_path / "run"
    argv = invert_argv(tiny_sd, collages, out, "--checkpoint-every", 2, "--log-every", 5, "--classes-per-batch", 3)
    code = main(argv)
    err = capsys.readouterr().err
    ckpt = out / "invert" / "checkpoints" / "g00000.safetensors"
    assert code == 3
    assert f"stopped: the loss became NaN or inf by step 8 of group 0; the last good checkpoint {ckpt} is kept" in err
    tensors, meta = load_tensors(ckpt)
    assert meta["step"] == "6" and torch.isfinite(tensors["vectors"]).all()
    assert not (out / "prompts.safetensors").exists() and not (out / "invert" / "groups").exists()

    monkeypatch.undo()
    code = main(invert_argv(tiny_sd, collages, tmp_path / "huge", "--lr", "1e20", "--checkpoint-every", 1))
    err = capsys.readouterr().err
    assert code == 3 and "the loss became NaN or inf" in err and "Lower --lr (now 1e+20)" in err


def test_generate_redoes_only_missing_or_broken_images(tiny_sd, collages, tmp_path, monkeypatch):
    run = collages.parent
    invert(InvertConfig(out=str(run), backend="sd", model=str(tiny_sd), steps=2, batch_size=3, resolution=16,
                        device="cpu", progress=False))
    options = dict(run=str(run), ipc=3, steps=2, batch_size=4, device="cpu", progress=False)
    gen = generate(**options)
    before = {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*.png"))}
    before["manifest"] = (gen / "manifest.jsonl").read_bytes()

    (gen / "cat" / "00001.png").unlink()
    truncated = gen / "dog" / "00002.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    untouched = gen / "car" / "00000.png"
    mtime = untouched.stat().st_mtime_ns

    redone = []
    module = importlib.import_module("promptset.backends.sampling")  # generate and evaluate sample through it
    real_batch = module.generate_batch

    def counting(backend, conditioner, jobs, **kwargs):
        redone.extend((CLASSES[j.cls], j.index) for j in jobs)
        return real_batch(backend, conditioner, jobs, **kwargs)

    monkeypatch.setattr(module, "generate_batch", counting)
    generate(**options)
    assert sorted(redone) == [("cat", 1), ("dog", 2)]
    after = {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*.png"))}
    after["manifest"] = (gen / "manifest.jsonl").read_bytes()
    assert after == before
    assert untouched.stat().st_mtime_ns == mtime

    redone.clear()
    generate(**options)  # a finished generation is not redone
    assert redone == []
    generate(**options | {"ipc": 2})  # fewer images: nothing to generate, the extra files go
    assert redone == [] and sorted(p.name for p in (gen / "cat").glob("*.png")) == ["00000.png", "00001.png"]
    generate(**options | {"seed": 1, "ipc": 1})  # other settings: those images are made again
    assert sorted(redone) == [(c, 0) for c in CLASSES]


_COUNTER = """
import json, sys, time
from pathlib import Path
from promptset.atomic import locked, write_json
path = Path(sys.argv[1])
for i in range(25):
    with locked(path):  # a read-modify-write, as evaluate updates results.json
        data = json.loads(path.read_text())
        time.sleep(0.002)  # widen the window a lost update needs
        data[sys.argv[2] + str(i)] = i
        write_json(path, data)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_locked_read_modify_writes_of_two_processes_lose_nothing(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("{}")
    procs = [subprocess.Popen([sys.executable, "-c", _COUNTER, str(path), tag]) for tag in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(json.loads(path.read_text())) == 50
