"""How work is shared over processes (issue 16), in one process: the team schedule of inversion groups, the share
of a data-parallel batch, `generate`'s writer thread and in-memory soft labels, the NCCL group of SyncBatchNorm and
the GPU binding under a launcher (CUDA stubbed). The multi-process runs themselves are in test_multiprocess.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import promptset.stages.generate as generate_stage
from promptset import dist
from promptset.artifacts import load_tensors
from promptset.atomic import BackgroundWriter
from promptset.backends import create_backend
from promptset.data import quantize_pixels, to_pil, to_tensor
from promptset.evaluation.student import data_parallel_parts
from promptset.models import create_student, label_pixels, load_teacher
from promptset.stages.generate import generate
from promptset.stages.invert import invert

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ("car", "cat", "dog")


# ---- inversion: which processes train which group ------------------------------------------------------------


def test_team_schedule_keeps_every_process_busy_for_any_group_count():
    assert dist.team_schedule(4, 2) == [(0, (0,)), (1, (1,)), (2, (0,)), (3, (1,))]  # whole rounds: one each
    assert dist.team_schedule(1, 2) == [(0, (0, 1))]  # CIFAR-10-like: fewer groups than processes
    assert dist.team_schedule(3, 2) == [(0, (0,)), (1, (1,)), (2, (0, 1))]  # the last group shared
    assert dist.team_schedule(2, 8) == [(0, (0, 1, 2, 3)), (1, (4, 5, 6, 7))]
    assert dist.team_schedule(3, 8) == [(0, (0, 1, 2)), (1, (3, 4, 5)), (2, (6, 7))]
    assert dist.team_schedule(5, 1) == [(g, (0,)) for g in range(5)]
    for groups in range(1, 20):
        for world in range(1, 9):
            schedule = dist.team_schedule(groups, world)
            assert [g for g, _ in schedule] == list(range(groups))
            assert {r for _, ranks in schedule for r in ranks} == set(range(world)), (groups, world)


def test_a_share_of_the_batch_has_the_losses_of_those_rows_of_the_whole_batch(tiny_sd):
    backend = create_backend("sd", str(tiny_sd), device="cpu")
    layout = backend.layout("a photo of {token}", 1)
    vectors = backend.initializer_vectors(["car", "cat"], "--initializers", fallback=False)[0].unsqueeze(1)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(5, backend.autoencoder.latent_channels, 4, 4, generator=g)
    with torch.no_grad():
        states = backend.encode_placeholder_prompts(layout, vectors)[torch.tensor([0, 1, 0, 1, 0])]  # (5, L, D)
        stream = torch.Generator().manual_seed(1)
        whole = backend.denoising_loss(latents, states, stream)  # (5,)
        parts = []
        for lo, hi in [(0, 3), (3, 5), (5, 5)]:  # the last an empty share (a batch smaller than the team)
            gen = torch.Generator().manual_seed(1)
            parts.append(backend.denoising_loss(latents[lo:hi], states[lo:hi], gen, rows=(lo, hi, 5)))
            assert torch.equal(gen.get_state(), stream.get_state())  # every share leaves the stream in step
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-7)
    assert parts[2].shape == (0,)


# ---- generate: writer thread, labels from the pixels in memory ---------------------------------------------------


def test_background_writer_runs_in_order_off_the_caller_and_raises_a_failure_in_the_caller():
    seen = []
    with BackgroundWriter(max_pending=2) as writer:
        for i in range(6):
            writer.submit(lambda i=i: seen.append((i, threading.current_thread() is threading.main_thread())))
    assert seen == [(i, False) for i in range(6)]

    ran = []

    def task(i):
        if i == 2:
            raise OSError("disk full")
        ran.append(i)

    with pytest.raises(OSError, match="disk full"):
        with BackgroundWriter(max_pending=1) as writer:
            for i in range(50):
                writer.submit(task, i)
    assert ran == [0, 1]  # nothing after the failed task was written


def test_the_saved_png_holds_exactly_the_quantized_pixels():
    x = torch.rand(3, 7, 5)
    x[0, 0, 0] = float("nan")
    x[1, 0, 0] = 1.7
    pixels = quantize_pixels(x)
    assert torch.equal(to_tensor(to_pil(x)), pixels.float().div_(255))
    assert np.array_equal(np.array(to_pil(x)), np.array(to_pil(pixels)))


def test_teacher_labels_do_not_depend_on_the_images_labelled_alongside():
    torch.manual_seed(0)
    teacher = create_student("convnet_tiny", 4, 16).eval()
    pixels = torch.randint(0, 256, (11, 3, 16, 16), dtype=torch.uint8)
    whole = label_pixels(teacher, pixels, chunk=8)
    assert whole.shape == (11, 4) and whole.dtype == torch.float32
    parts = torch.cat([label_pixels(teacher, pixels[s : s + 3], chunk=8) for s in range(0, 11, 3)])
    assert torch.equal(parts, whole)
    with torch.no_grad():
        direct = teacher(pixels.float() / 255)
    torch.testing.assert_close(whole, direct, rtol=1e-5, atol=1e-6)


def _soft_label_run(tiny_sd, root: Path) -> tuple[Path, str]:
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / "data" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "data" / name / f"{i}.png")
    run = root / "run"
    invert(out=str(run), data=str(root / "data"), backend="sd", model=str(tiny_sd), steps=2, batch_size=3,
           resolution=16, device="cpu", progress=False)
    torch.manual_seed(0)
    net = create_student("convnet_tiny", len(CLASSES), 16)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "teacher.safetensors"))
    return run, f"convnet_tiny:{root / 'teacher.safetensors'}"


def test_generate_writes_pngs_on_a_writer_thread_and_labels_in_memory_like_the_files(tiny_sd, tmp_path,
                                                                                      monkeypatch):
    run, teacher = _soft_label_run(tiny_sd, tmp_path)
    options = dict(run=str(run), ipc=3, steps=2, batch_size=2, sampler_batch=2, device="cpu", progress=False,
                   soft_labels=True, teacher=teacher)
    threads = []
    real_save = generate_stage.save_image

    def recording(path, image):
        threads.append(threading.current_thread() is threading.main_thread())
        real_save(path, image)

    monkeypatch.setattr(generate_stage, "save_image", recording)
    gen = generate(**options)
    assert len(threads) == len(CLASSES) * 3 + 1 and not any(threads[:-1])  # the grid is written at the end
    labels = load_tensors(run / "labels.safetensors")[0]["soft_labels"]  # (N, P, C)

    # the labels made in memory are the teacher's logits of the PNGs as saved (what a student reads)
    model = load_teacher(teacher, num_classes=len(CLASSES))
    files = torch.stack([to_tensor(Image.open(gen / c / f"{i:05d}.png").convert("RGB"))
                         for c in CLASSES for i in range(3)])
    with torch.no_grad():
        from_files = model(files).to(torch.float16)
    torch.testing.assert_close(labels[:, 0].float(), from_files.float(), rtol=2e-3, atol=2e-3)

    # a resumed run labels the images it keeps from their files: the same labels as one that made them all
    (gen / "cat" / "00001.png").unlink()
    generate(**options)
    assert torch.equal(load_tensors(run / "labels.safetensors")[0]["soft_labels"], labels)


def test_a_failed_png_write_stops_generate_in_the_main_thread_and_lists_no_unwritten_image(tiny_sd, tmp_path,
                                                                                           monkeypatch):
    run, _ = _soft_label_run(tiny_sd, tmp_path)
    real_save = generate_stage.save_image
    calls = {"n": 0}

    def failing(path, image):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(f"No space left on device: {path}")
        real_save(path, image)

    monkeypatch.setattr(generate_stage, "save_image", failing)
    with pytest.raises(OSError, match="No space left on device"):
        generate(run=str(run), ipc=3, steps=2, batch_size=1, device="cpu", progress=False)
    rows = [line for line in (run / "generated" / ".manifest.rank0.jsonl").read_text().splitlines() if line]
    assert len(rows) == 3  # the images written before the failure, none after
    monkeypatch.undo()
    generate(run=str(run), ipc=3, steps=2, batch_size=1, device="cpu", progress=False)  # a rerun completes it
    assert len(list((run / "generated").rglob("*.png"))) == len(CLASSES) * 3


# ---- students and devices under a launcher (CUDA stubbed) --------------------------------------------------------


def test_sync_batchnorm_reduces_in_the_nccl_group_on_cuda(monkeypatch):
    made = []
    nccl = object()

    def new_group(*args, **kwargs):
        made.append(kwargs.get("backend"))
        return nccl

    monkeypatch.setattr(dist.torch_dist, "new_group", new_group)
    monkeypatch.setattr(dist, "_NCCL_GROUPS", {})
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    model, group, sync_bn = data_parallel_parts(net, torch.device("cuda", 0), world=2)
    assert made == ["nccl"] and group is nccl and sync_bn
    norms = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert len(norms) == 1 and norms[0].process_group is nccl

    made.clear()
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model, group, sync_bn = data_parallel_parts(net, torch.device("cpu"), world=2)  # gloo, per-process batch norm
    assert made == [] and group is None and not sync_bn and model is net
    assert data_parallel_parts(net, torch.device("cuda", 0), world=1) == (net, None, False)


def test_every_process_binds_its_own_gpu_before_any_cuda_work(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")  # e.g. the second process of the second node
    assert dist.rank_world() == (3, 4)  # every stage asks this first, before loading anything
    assert calls == [1]

    calls.clear()
    monkeypatch.setenv("LOCAL_RANK", "6")  # more processes than GPUs: a CPU run, nothing to bind
    dist.rank_world()
    monkeypatch.delenv("LOCAL_RANK")
    dist.rank_world()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    dist.rank_world()
    assert calls == []
