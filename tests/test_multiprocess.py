"""Multi-process runs (issue 6): `torchrun --nproc-per-node 2 -m promptset select|invert|generate` (CPU, gloo) gives
the same prompts, bit for bit, and the same files as one process; `accelerate launch` does too.

Every process runs with OMP_NUM_THREADS=1 (torchrun's own default for its workers): on CPU the number of intra-op
threads changes how reductions are split, hence the last bits of a float, so bitwise comparisons hold at equal
threads per process, whatever the number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import promptset
from promptset.artifacts import PromptSet, load_tensors
from promptset.models import create_student
from promptset.runfolder import write_classes

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
CLASSES = ("ant", "bee", "car", "dog")
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}



def run(*argv, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=ENV, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def torchrun(*argv, **kwargs) -> subprocess.CompletedProcess:
    return run(BIN / "torchrun", "--nproc-per-node", 2, "--master-port", _free_port(), "-m", "promptset", *argv,
               **kwargs)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_args(model: Path, teacher: Path, data: Path, out: Path) -> dict[str, list]:
    spec = f"convnet_tiny:{teacher}"
    return {
        "select": ["select", "--data", data, "--out", out, "--resolution", 16, "--teacher", spec, "--num-crops", 3],
        "invert": ["invert", "--backend", "sd", "--model", model, "--out", out, "--steps", 6, "--batch-size", 4,
                   "--classes-per-batch", 2, "--resolution", 16, "--device", "cpu", "--log-every", 2],
        # torchrun's parser mistakes `--run` for its own `--run-path`, hence --run-dir
        "generate": ["generate", "--run-dir", out, "--ipc", 3, "--steps", 2, "--device", "cpu", "--soft-labels",
                     "--teacher", spec],
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_sd):
    root = tmp_path_factory.mktemp("multi")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        for i in range(4):
            (root / "data" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "data" / name / f"{i}.png")
    net = create_student("convnet_tiny", len(CLASSES), 16)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "teacher.safetensors"))
    return root, tiny_sd


@pytest.fixture(scope="module")
def single(inputs):
    """The reference: every stage in one process."""
    root, model = inputs
    out = root / "single"
    args = stage_args(model, root / "teacher.safetensors", root / "data", out)
    logs = {stage: ok(run(sys.executable, "-m", "promptset", *args[stage])) for stage in ("select", "invert",
                                                                                          "generate")}
    return out, logs


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_tensors(a: Path, b: Path) -> None:
    (ta, ma), (tb, mb) = load_tensors(a), load_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), (a.name, key)
    assert ma == mb  # safetensors orders header keys at random, so the files' bytes may differ; the content does not


def test_torchrun_two_processes_match_one_process(inputs, single):
    root, model = inputs
    reference, single_logs = single
    out = root / "torchrun"
    args = stage_args(model, root / "teacher.safetensors", root / "data", out)

    ok(torchrun(*args["select"]))
    assert tree(out / "collages") == tree(reference / "collages")
    assert json.loads((out / "select.json").read_text()) == json.loads((reference / "select.json").read_text())

    logs = ok(torchrun(*args["invert"]))
    same_tensors(out / "prompts.safetensors", reference / "prompts.safetensors")
    # the progress bar only on rank 0: rank 1 trains group 2 silently
    assert "invert group 1/2" in logs.stderr and "invert group 2/2" not in logs.stderr
    assert "invert group 2/2" in single_logs["invert"].stderr
    assert logs.stdout.count("invert: stored bytes") == 1  # the budget is printed once
    # rank 0 merged the per-rank metrics: same rows as one process, timing aside
    rows = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out / "invert" / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (reference / "invert" / "metrics.jsonl").read_text().splitlines()]
    assert rows == ref_rows and len(rows) == 6
    assert not list((out / "invert").glob("metrics.rank*"))

    ok(torchrun(*args["generate"]))
    generated, ref_generated = tree(out / "generated"), tree(reference / "generated")
    assert generated.keys() == ref_generated.keys() and len(generated) == len(CLASSES) * 3 + 1
    assert generated == ref_generated  # PNG bytes and manifest
    assert (out / "grid.png").read_bytes() == (reference / "grid.png").read_bytes()
    same_tensors(out / "labels.safetensors", reference / "labels.safetensors")
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-") or ".manifest.rank" in p.name]


def test_accelerate_launch_matches_one_process(inputs, single):
    """`accelerate launch --multi_gpu` starts torchrun-style workers, which run on CPU here (gloo). Its `--cpu`
    mode starts a single process unless MPI is set up (`--mpirun_hostfile`), so it gives the same prompts too."""
    if shutil.which("accelerate", path=str(BIN)) is None:
        pytest.skip("accelerate is not installed")
    root, model = inputs
    reference, _ = single
    out = root / "accelerate"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("config.yaml", "invert", "prompts.safetensors",
                                                                   "generated", "labels.safetensors", "grid.png"))
    args = stage_args(model, root / "teacher.safetensors", root / "data", out)["invert"]
    ok(run(BIN / "accelerate", "launch", "--multi_gpu", "--num_processes", 2, "--num_machines", 1,
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _free_port(),
           "-m", "promptset", *args))
    same_tensors(out / "prompts.safetensors", reference / "prompts.safetensors")


def test_a_refusal_on_any_rank_stops_every_rank_before_writing(inputs, single, tmp_path):
    root, model = inputs
    reference, _ = single
    before = tree(reference)
    args = stage_args(model, root / "teacher.safetensors", root / "data", reference)["select"]
    result = torchrun(*args, "--resolution", 8, timeout=120)  # a different run is already in --out
    assert result.returncode != 0
    assert "already holds a different select run (changed: resolution)" in result.stderr
    assert tree(reference) == before

    # a refusal seen by one rank only reaches the others (as bytes, never pickled) instead of leaving them waiting
    script = tmp_path / "agree.py"
    script.write_text(
        "from promptset.dist import agree, rank_world\n"
        "from promptset.errors import UserError\n"
        "rank = rank_world()[0]\n"
        "try:\n"
        "    agree(UserError('--data x: bad image on rank 1') if rank == 1 else None)\n"
        "except UserError as err:\n"
        "    print(f'rank {rank} refused: {err}', flush=True)\n"
    )
    result = ok(run(BIN / "torchrun", "--nproc-per-node", 2, "--master-port", _free_port(), script, timeout=120))
    assert "rank 0 refused: --data x: bad image on rank 1 (reported by process 1)" in result.stdout
    assert "rank 1 refused: --data x: bad image on rank 1" in result.stdout


def test_fewer_groups_than_processes_train_data_parallel_like_one_process(inputs, tmp_path):
    """Issue 16: 3 classes at batch 8 are one group; both processes train it (each its half of every batch, the
    gradient summed over both) and the prompts are one process's up to float summation order."""
    root, model = inputs
    data = tmp_path / "data"
    for name in CLASSES[:3]:
        shutil.copytree(root / "data" / name, data / name)
    args = ["invert", "--backend", "sd", "--model", model, "--data", data, "--steps", 4, "--batch-size", 8,
            "--resolution", 16, "--device", "cpu", "--log-every", 2, "--checkpoint-every", 2, "--no-progress"]
    ok(run(sys.executable, "-m", "promptset", *args, "--out", tmp_path / "one"))
    logs = ok(torchrun(*args, "--out", tmp_path / "two"))
    assert "1 group(s) of up to 3 classes" in logs.stdout
    assert "group 1 data parallel over processes 0, 1" in logs.stdout
    for rank in (0, 1):  # each process logs the samples it trained: half of 4 steps x 8
        assert f"invert group 1/1: process {rank} trained 16 of the group's 32 samples" in logs.stdout
    one = load_tensors(tmp_path / "one" / "prompts.safetensors")[0]["embeddings"]
    two = load_tensors(tmp_path / "two" / "prompts.safetensors")[0]["embeddings"]
    init = load_tensors(tmp_path / "one" / "invert" / "groups" / "g00000.safetensors")[0]["init"]
    assert (one - init).abs().max() > 1e-3  # the vectors moved, so agreeing is not trivial
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)
    rows = {k: [json.loads(line) for line in (tmp_path / k / "invert" / "metrics.jsonl").read_text().splitlines()]
            for k in ("one", "two")}
    assert [r["step"] for r in rows["two"]] == [r["step"] for r in rows["one"]] == [2, 4]
    for a, b in zip(rows["one"], rows["two"]):  # the whole batch's per-class losses, gathered from both
        assert b["class_loss"] == pytest.approx(a["class_loss"], rel=1e-5)
    left = sorted(p.relative_to(tmp_path / "two" / "invert").as_posix()
                  for p in (tmp_path / "two" / "invert").rglob("*.safetensors"))
    assert left == ["groups/g00000.safetensors"]  # the leader wrote it and removed the checkpoint and latent cache


def test_generate_shares_one_class_over_two_processes(inputs, tmp_path):
    """Issue 16: (class, index) jobs are shared, so one class keeps both processes busy; the PNGs and the soft
    labels (each process labels its own images, rank 0 gathers them) are one process's, bit for bit."""
    root, model = inputs
    for name in CLASSES[:2]:  # inversion needs two classes; generation then runs on the first alone
        shutil.copytree(root / "data" / name, tmp_path / "data" / name)
    net = create_student("convnet_tiny", 1, 16)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "teacher.safetensors"))
    promptset.invert(backend="sd", model=str(model), data=str(tmp_path / "data"), out=str(tmp_path / "one"), steps=2,
                     batch_size=2, resolution=16, device="cpu", progress=False)
    prompts = PromptSet.load(tmp_path / "one" / "prompts.safetensors")
    first = dataclasses.replace(prompts, embeddings=prompts.embeddings[:1], token_names=prompts.token_names[:1],
                                class_folders=prompts.class_folders[:1], initializers=prompts.initializers[:1])
    first.save(tmp_path / "one" / "prompts.safetensors")
    write_classes(tmp_path / "one", [CLASSES[0]], [CLASSES[0]])
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    args = ["generate", "--ipc", 5, "--steps", 2, "--batch-size", 2, "--sampler-batch", 2, "--device", "cpu",
            "--soft-labels", "--teacher", f"convnet_tiny:{tmp_path / 'teacher.safetensors'}", "--no-progress"]
    ok(run(sys.executable, "-m", "promptset", *args, "--run-dir", tmp_path / "one"))
    logs = ok(torchrun(*args, "--run-dir", tmp_path / "two"))
    assert "generate: process 0 made 3 of its 3 images (jobs 0-2 of 5" in logs.stdout
    assert "generate: process 1 made 2 of its 2 images (jobs 3-4 of 5" in logs.stdout
    generated = tree(tmp_path / "two" / "generated")
    assert generated == tree(tmp_path / "one" / "generated") and len(generated) == 5 + 1
    same_tensors(tmp_path / "two" / "labels.safetensors", tmp_path / "one" / "labels.safetensors")
